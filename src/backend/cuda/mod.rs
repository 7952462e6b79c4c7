//! The CUDA backend: convolutions through cuDNN (NHWC, f32 data with TF32 tensor-core math by
//! default), matrix products through cuBLAS (the same math setting), everything else in the
//! kernels of `kernels/*.cu`, compiled with NVRTC for the device when the backend starts.
//! Built with the `cuda` feature; every CUDA library is loaded at run time, so the crate
//! builds without a CUDA toolkit.
//!
//! Libraries (found through `LD_LIBRARY_PATH` or ldconfig): the driver's `libcuda.so.1`,
//! `libnvrtc.so.13`, `libcublas.so.13` and `libcudnn.so.9`. PyTorch's pip wheels carry the
//! last three, in `site-packages/nvidia/cu13/lib` and `site-packages/nvidia/cudnn/lib`.

mod blas;
mod conv;
mod graph;
mod launch;

use crate::backend::{ConvShape, View, ViewMut};
use anyhow::{bail, Context, Result};
use cudarc::cudnn::{self, Cudnn};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// Prepended to every kernel family.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// The kernel families (one NVRTC program each) and their entry points.
pub const FAMILIES: [(&str, &str, &[&str]); 4] = [
    ("data", include_str!("../../../kernels/data.cu"), &["load_batch", "patch_moments"]),
    (
        "norm",
        include_str!("../../../kernels/norm.cu"),
        &[
            "bias_gelu_fwd",
            "max_pool_fwd",
            "max_pool_bwd",
            "partials_sum",
            "partials_sqdev",
            "partials_gelu_grad",
            "partials_bn_bwd",
            "finalize_sum",
            "finalize_mean",
            "finalize_var",
            "eval_stats",
            "finalize_bn_bwd",
            "bn_act_apply",
            "bn_bwd_apply",
        ],
    ),
    ("head", include_str!("../../../kernels/head.cu"), &["linear_product", "linear_bwd_filter", "cross_entropy", "cross_entropy_total"]),
    (
        "optim",
        include_str!("../../../kernels/optim.cu"),
        &["sgd", "lookahead", "nesterov", "sum_squares", "scale_by_norm", "axpby", "fill"],
    ),
];

/// Compiles one kernel family to PTX for `arch` (e.g. "sm_90").
pub fn compile_family(name: &str, source: &str, arch: &'static str) -> Result<Ptx> {
    let opts = CompileOptions { arch: Some(arch), name: Some(format!("{name}.cu")), ..Default::default() };
    compile_ptx_with_opts(format!("{COMMON}\n{source}"), opts)
        .map_err(|e| anyhow::anyhow!("NVRTC failed on kernels/{name}.cu for {arch}: {e}"))
}

/// Whether the libraries the backend needs can be loaded; the error names the fix.
pub fn check_libraries() -> Result<()> {
    // cudarc panics when a library is missing, so look before touching it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!(
            "no CUDA driver (libcuda.so.1) found: the cuda backend needs an NVIDIA GPU and its driver; use --backend wgpu or --backend cpu"
        );
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "NVRTC (libnvrtc.so.13) not found: `pip install nvidia-cuda-nvrtc` and add its `site-packages/nvidia/cu13/lib` \
             to LD_LIBRARY_PATH (PyTorch's environment already has it)"
        );
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        bail!(
            "cuBLAS (libcublas.so.13) not found: `pip install nvidia-cublas` and add its `site-packages/nvidia/cu13/lib` \
             to LD_LIBRARY_PATH (PyTorch's environment already has it)"
        );
    }
    if !unsafe { cudnn::sys::is_culib_present() } {
        bail!(
            "cuDNN 9 (libcudnn.so.9) not found: `pip install nvidia-cudnn-cu13` and add its `site-packages/nvidia/cudnn/lib` \
             to LD_LIBRARY_PATH (PyTorch's environment already has it)"
        );
    }
    Ok(())
}

/// The CUDA libraries mapped into this process, from /proc/self/maps.
pub fn loaded_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| ["libcuda.", "libnvrtc", "libcublas", "libcudnn"].iter().any(|n| p.contains(n)))
        .map(String::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// A dataset on the device: `(n, 32, 32, 3)` u8 pixels and u8 labels.
pub struct CudaImages {
    pixels: CudaSlice<u8>,
    labels: CudaSlice<u8>,
}

/// The backend on GPU 0: one stream, one cuDNN and one cuBLAS handle, the compiled kernels,
/// and the conv plans, scratch buffers and step graphs made as the ops first need them.
pub struct Cuda {
    stream: Arc<CudaStream>,
    cudnn: Arc<Cudnn>,
    blas: blas::Blas,
    functions: HashMap<&'static str, CudaFunction>,
    plans: RefCell<HashMap<(ConvShape, conv::Pass), Rc<conv::ConvPlan>>>,
    /// cuDNN workspace, grown to the largest plan's need (during the first steps).
    workspace: RefCell<CudaSlice<u8>>,
    /// Scratch buffers by purpose, grown on demand.
    scratch: RefCell<HashMap<&'static str, CudaSlice<f32>>>,
    tf32: Cell<bool>,
    /// Training steps as CUDA graphs (on unless SPEEDRUN_CUDA_GRAPHS=0).
    use_graphs: Cell<bool>,
    graphs: RefCell<graph::StepGraphs>,
    /// Allocations made by ops (plans, workspace, scratch), so graph capture can skip steps
    /// that allocate.
    allocations: Cell<usize>,
    name: String,
    /// Seconds NVRTC took for all kernel families (outside any timed region).
    compile_seconds: f64,
}

impl Cuda {
    /// The first GPU, with every kernel compiled for it.
    pub fn new() -> Result<Cuda> {
        check_libraries()?;
        let ctx = CudaContext::new(0).context("cannot open CUDA device 0")?;
        let (major, minor) = ctx.compute_capability()?;
        let name = format!("{} (sm_{major}{minor}, {} GiB)", ctx.name()?, ctx.total_mem()? >> 30);
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let started = std::time::Instant::now();
        let mut functions = HashMap::new();
        for (family, source, entries) in FAMILIES {
            let module = ctx.load_module(compile_family(family, source, arch)?)?;
            for &entry in entries {
                functions.insert(entry, module.load_function(entry).with_context(|| format!("kernel {entry} of kernels/{family}.cu"))?);
            }
        }
        let compile_seconds = started.elapsed().as_secs_f64();
        // A stream of our own (the default stream cannot be captured into a graph), and no
        // per-buffer event tracking: everything runs in order on this one stream.
        // SAFETY: no buffer exists yet, and the backend uses only this stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let cudnn = Cudnn::new(stream.clone()).context("cannot start cuDNN")?;
        let blas = blas::Blas::new(stream.clone(), true)?;
        let workspace = stream.alloc_zeros::<u8>(1 << 20)?;
        Ok(Cuda {
            stream,
            cudnn,
            blas,
            functions,
            plans: RefCell::new(HashMap::new()),
            workspace: RefCell::new(workspace),
            scratch: RefCell::new(HashMap::new()),
            tf32: Cell::new(true),
            use_graphs: Cell::new(std::env::var("SPEEDRUN_CUDA_GRAPHS").map_or(true, |v| v != "0")),
            graphs: RefCell::new(graph::StepGraphs::default()),
            allocations: Cell::new(0),
            name,
            compile_seconds,
        })
    }

    /// TF32 tensor-core math in the convolutions and matrix products (default, as PyTorch's
    /// cuDNN default), or exact f32 FMA math (the op tests compare with the CPU at f32
    /// precision).
    pub fn set_tf32(&self, on: bool) {
        if self.tf32.replace(on) != on {
            self.plans.borrow_mut().clear();
        }
        self.blas.set_tf32(on);
    }

    /// Library versions, for `speedrun info`.
    pub fn versions(&self) -> String {
        let (mut driver, mut major, mut minor) = (0, 0, 0);
        // SAFETY: both libraries are loaded (checked in `new`); the calls only write the ints.
        unsafe {
            cudarc::driver::sys::cuDriverGetVersion(&mut driver);
            cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor);
        }
        format!(
            "driver CUDA {}.{}, NVRTC {major}.{minor}, cuBLAS {}, cuDNN {}; kernels compiled in {:.2} s",
            driver / 1000,
            driver % 1000 / 10,
            self.blas.version(),
            cudnn::result::get_version(),
            self.compile_seconds
        )
    }

    fn function(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    /// A scratch buffer of at least `len` values for `purpose`; give it back with `put_scratch`.
    fn take_scratch(&self, purpose: &'static str, len: usize) -> CudaSlice<f32> {
        match self.scratch.borrow_mut().remove(purpose) {
            Some(buf) if buf.len() >= len => buf,
            _ => {
                self.count_allocation();
                self.stream.alloc_zeros(len.max(1)).unwrap_or_else(|e| panic!("cannot allocate {len} floats on the GPU: {e:?}"))
            }
        }
    }

    /// Notes an allocation made by an op. Steps that allocate are never captured (see
    /// graph.rs), so one that does while capturing is a bug in that rule.
    fn count_allocation(&self) {
        assert!(!self.capturing(), "a captured training step allocated GPU memory; SPEEDRUN_CUDA_GRAPHS=0 turns graphs off");
        self.allocations.set(self.allocations.get() + 1);
    }

    fn put_scratch(&self, purpose: &'static str, buf: CudaSlice<f32>) {
        self.scratch.borrow_mut().insert(purpose, buf);
    }

    /// Training steps as CUDA graphs (default) or launched one op at a time.
    pub fn set_graphs(&self, on: bool) {
        self.use_graphs.set(on);
    }
}

fn view<'a, T>(v: &'a View<CudaSlice<T>>) -> CudaView<'a, T> {
    v.buf.slice(v.range.clone())
}

fn view_mut<'a, T>(v: &'a mut ViewMut<CudaSlice<T>>) -> CudaViewMut<'a, T> {
    v.buf.slice_mut(v.range.clone())
}
