//! cuDNN convolutions: one plan (descriptors and algorithm) per conv shape and pass, made on
//! first use. The algorithm is chosen by timing every one cuDNN accepts on the real buffers,
//! as PyTorch's `cudnn.benchmark`; this happens in the first training step (the warm-up run
//! of `speedrun bench`), never in a captured or timed step, and the choice goes into the
//! start-up cache (`cache.rs`), keyed by GPU, cuDNN version, shape, pass and math, so later
//! processes take it from there instead of timing again.

use super::cache::Lookup;
use super::Cuda;
use crate::backend::ConvShape;
use cudarc::cudnn::{self, sys as dnn, ConvDescriptor, CudnnError, FilterDescriptor, TensorDescriptor};
use cudarc::driver::{sys::CUevent_flags, CudaSlice};
use std::rc::Rc;

/// Which convolution pass a plan is for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

impl Pass {
    /// The pass as the profiles name it.
    fn short(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::BackwardData => "dgrad",
            Pass::BackwardFilter => "wgrad",
        }
    }
}

/// cuDNN's algorithm for one pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Algo {
    Forward(dnn::cudnnConvolutionFwdAlgo_t),
    BackwardData(dnn::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(dnn::cudnnConvolutionBwdFilterAlgo_t),
}

impl Algo {
    /// Every algorithm of `pass`. `exact` leaves out the FFT and Winograd transforms, which
    /// round differently from a direct sum, for the f32 comparisons with the CPU.
    fn candidates(pass: Pass, exact: bool) -> Vec<Algo> {
        use dnn::cudnnConvolutionBwdDataAlgo_t as D;
        use dnn::cudnnConvolutionBwdFilterAlgo_t as F;
        use dnn::cudnnConvolutionFwdAlgo_t as X;
        let all: Vec<Algo> = match pass {
            Pass::Forward => [
                X::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                X::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                X::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
                X::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
                X::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                X::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
                X::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                X::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            ]
            .map(Algo::Forward)
            .to_vec(),
            Pass::BackwardData => [
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            ]
            .map(Algo::BackwardData)
            .to_vec(),
            Pass::BackwardFilter => [
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            ]
            .map(Algo::BackwardFilter)
            .to_vec(),
        };
        all.into_iter().filter(|a| !exact || !a.is_transform()).collect()
    }

    /// The algorithm's name in the start-up cache, e.g. `Forward(CUDNN_CONVOLUTION_FWD_ALGO_GEMM)`.
    fn cache_name(&self) -> String {
        format!("{self:?}")
    }

    /// The one of `algos` whose cache name is `name`.
    fn named(algos: &[Algo], name: &[u8]) -> Option<Algo> {
        algos.iter().copied().find(|a| a.cache_name().as_bytes() == name)
    }

    /// The algorithm's name without cuDNN's prefix, e.g. `IMPLICIT_PRECOMP_GEMM`.
    fn short(&self) -> String {
        let name = format!("{self:?}");
        let inner = name.split_once('(').map_or(name.as_str(), |(_, rest)| rest.trim_end_matches(')'));
        ["CUDNN_CONVOLUTION_FWD_ALGO_", "CUDNN_CONVOLUTION_BWD_DATA_ALGO_", "CUDNN_CONVOLUTION_BWD_FILTER_ALGO_"]
            .iter()
            .find_map(|prefix| inner.strip_prefix(prefix))
            .unwrap_or(inner)
            .to_string()
    }

    fn is_transform(&self) -> bool {
        let name = format!("{self:?}");
        name.contains("FFT") || name.contains("WINOGRAD")
    }
}

/// Descriptors and algorithm for one pass of one conv shape.
pub(super) struct ConvPlan {
    pub conv: ConvDescriptor<f32>,
    pub x: TensorDescriptor<f32>, // (n, h, w, c_in) NHWC
    pub w: FilterDescriptor<f32>, // (c_out, k, k, c_in) OHWI = cuDNN's NHWC filter layout
    pub y: TensorDescriptor<f32>, // (n, oh, ow, c_out) NHWC
    pub algo: Algo,
}

impl ConvPlan {
    /// Bytes of workspace `algo` needs on this plan (an error where cuDNN has no kernel for it).
    fn workspace_size(&self, algo: Algo) -> Result<usize, CudnnError> {
        let (conv, x, w, y) = (&self.conv, &self.x, &self.w, &self.y);
        match algo {
            Algo::Forward(a) => cudnn::ConvForward { conv, x, w, y }.get_workspace_size(a),
            Algo::BackwardData(a) => cudnn::ConvBackwardData { conv, dx: x, w, dy: y }.get_workspace_size(a),
            Algo::BackwardFilter(a) => cudnn::ConvBackwardFilter { conv, x, dw: w, dy: y }.get_workspace_size(a),
        }
    }
}

/// Runs one pass of a plan with the given algorithm and workspace.
pub(super) type Launch<'a> = dyn FnMut(&ConvPlan, Algo, &mut CudaSlice<u8>) -> Result<(), CudnnError> + 'a;

/// Algorithms needing more workspace than this are not tried.
const MAX_WORKSPACE: usize = 512 << 20;

impl Cuda {
    /// Runs pass `pass` of conv `s` through `launch`, planning it first if it is new.
    pub(super) fn run_conv(&self, s: ConvShape, pass: Pass, launch: &mut Launch) {
        let known = self.plans.borrow().get(&(s, pass)).cloned();
        let plan = known.unwrap_or_else(|| {
            self.count_allocation();
            let plan = Rc::new(self.make_plan(s, pass, launch).unwrap_or_else(|e| panic!("cuDNN cannot plan {pass:?} of {s:?}: {e:?}")));
            self.plans.borrow_mut().insert((s, pass), plan.clone());
            plan
        });
        let mut workspace = self.workspace.borrow_mut();
        let name = || format!("conv {} {}→{} {}² (cuDNN {})", pass.short(), s.c_in, s.c_out, s.h, plan.algo.short());
        if let Err(e) = self.timed(name, 2.0 * s.macs() as f64, || launch(&plan, plan.algo, &mut workspace)) {
            panic!("cuDNN {pass:?} of {s:?} with {:?} failed: {e:?}", plan.algo);
        }
    }

    fn make_plan(&self, s: ConvShape, pass: Pass, launch: &mut Launch) -> Result<ConvPlan, CudnnError> {
        let nhwc = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let dims = |n: usize, c: usize, h: usize, w: usize| [n, c, h, w].map(|d| d as i32);
        let pad = s.pad as i32;
        let mut conv = self.cudnn.create_conv2d::<f32>([pad, pad], [1, 1], [1, 1], dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)?;
        let exact = !self.tf32.get();
        conv.set_math_type(if exact { dnn::cudnnMathType_t::CUDNN_FMA_MATH } else { dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH })?;
        let x = self.cudnn.create_4d_tensor::<f32>(nhwc, dims(s.n, s.c_in, s.h, s.w))?;
        let w = self.cudnn.create_4d_filter::<f32>(nhwc, dims(s.c_out, s.c_in, s.k, s.k))?;
        let y = self.cudnn.create_4d_tensor::<f32>(nhwc, dims(s.n, s.c_out, s.out_h(), s.out_w()))?;
        // cuDNN's heuristic choice, kept if no other algorithm is faster.
        let heuristic = match pass {
            Pass::Forward => Algo::Forward(cudnn::ConvForward { conv: &conv, x: &x, w: &w, y: &y }.pick_algorithm()?),
            Pass::BackwardData => Algo::BackwardData(cudnn::ConvBackwardData { conv: &conv, dx: &x, w: &w, dy: &y }.pick_algorithm()?),
            Pass::BackwardFilter => {
                Algo::BackwardFilter(cudnn::ConvBackwardFilter { conv: &conv, x: &x, dw: &w, dy: &y }.pick_algorithm()?)
            }
        };
        let mut plan = ConvPlan { conv, x, w, y, algo: heuristic };
        let key = format!(
            "cuDNN algorithm\nGPU {}\ncuDNN {}\n{pass:?} of {s:?}\nmath {}\nworkspace at most {MAX_WORKSPACE}",
            self.name,
            cudnn::result::get_version(),
            if exact { "FMA" } else { "default (TF32)" }
        );
        // The algorithms to time, the heuristic's first.
        let contenders: Vec<Algo> =
            std::iter::once(heuristic).chain(Algo::candidates(pass, exact).into_iter().filter(|&a| a != heuristic)).collect();
        if let Some((algo, bytes)) = self.cached_algo(&key, &contenders, &plan) {
            self.reserve_workspace(bytes);
            plan.algo = algo;
            if std::env::var_os("SPEEDRUN_CUDA_LOG").is_some() {
                eprintln!("cuDNN {pass:?} {}→{} {}² n={}: {algo:?} (from the cache)", s.c_in, s.c_out, s.h, s.n);
            }
            return Ok(plan);
        }
        let mut best = (f32::INFINITY, heuristic);
        let mut tried = Vec::new();
        for algo in contenders {
            let Ok(bytes) = plan.workspace_size(algo) else { continue };
            if bytes > MAX_WORKSPACE {
                continue;
            }
            if let Some(ms) = self.time_conv(&plan, algo, bytes, launch) {
                tried.push(format!("{algo:?} {ms:.3} ms"));
                if ms < best.0 {
                    best = (ms, algo);
                }
            }
        }
        plan.algo = best.1;
        self.cache.store(&key, plan.algo.cache_name().as_bytes());
        if std::env::var_os("SPEEDRUN_CUDA_LOG").is_some() {
            eprintln!("cuDNN {pass:?} {}→{} {}² n={}: {:?}; tried {}", s.c_in, s.c_out, s.h, s.n, plan.algo, tried.join(", "));
        }
        Ok(plan)
    }

    /// The algorithm the start-up cache holds under `key`, with its workspace bytes, if it is one
    /// of `contenders` that cuDNN still accepts on `plan` within the workspace limit (anything
    /// else is timed again, and the entry overwritten).
    fn cached_algo(&self, key: &str, contenders: &[Algo], plan: &ConvPlan) -> Option<(Algo, usize)> {
        let Lookup::Hit(name) = self.cache.get(key) else { return None };
        let algo = Algo::named(contenders, &name)?;
        let bytes = plan.workspace_size(algo).ok().filter(|&b| b <= MAX_WORKSPACE)?;
        Some((algo, bytes))
    }

    /// Grows the workspace to at least `bytes` (only while planning: see `run_conv`).
    fn reserve_workspace(&self, bytes: usize) {
        let mut workspace = self.workspace.borrow_mut();
        if workspace.len() < bytes {
            *workspace =
                self.stream.alloc_zeros::<u8>(bytes).unwrap_or_else(|e| panic!("cannot allocate a {bytes}-byte cuDNN workspace: {e:?}"));
        }
    }

    /// Milliseconds of one run of `algo` (the faster of two), or None where it fails.
    fn time_conv(&self, plan: &ConvPlan, algo: Algo, bytes: usize, launch: &mut Launch) -> Option<f32> {
        self.reserve_workspace(bytes);
        let mut workspace = self.workspace.borrow_mut();
        let ctx = self.stream.context();
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("CUDA event");
        let (start, end) = (event(), event());
        let mut fastest = f32::INFINITY;
        for _ in 0..2 {
            start.record(&self.stream).ok()?;
            launch(plan, algo, &mut workspace).ok()?;
            end.record(&self.stream).ok()?;
            end.synchronize().ok()?;
            fastest = fastest.min(start.elapsed_ms(&end).ok()?);
        }
        Some(fastest)
    }
}

#[cfg(test)]
mod tests {
    use super::{Algo, Pass};

    /// Every algorithm comes back from its cache name, and only it (no GPU needed).
    #[test]
    fn every_algorithm_round_trips_through_its_cache_name() {
        for pass in [Pass::Forward, Pass::BackwardData, Pass::BackwardFilter] {
            let all = Algo::candidates(pass, false);
            assert!(Algo::candidates(pass, true).len() < all.len(), "{pass:?}: exact math leaves out the transforms");
            for a in &all {
                assert_eq!(Algo::named(&all, a.cache_name().as_bytes()), Some(*a));
                assert!(!a.short().is_empty() && !a.short().contains("CUDNN") && !a.short().contains('('), "{a:?}: {}", a.short());
            }
            assert_eq!(Algo::named(&all, b"Forward(NO_SUCH_ALGO)"), None);
        }
    }
}
