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
pub mod cache;
mod conv;
mod graph;
mod launch;
mod profile;

use crate::backend::{ConvShape, View, ViewMut};
use anyhow::{bail, Context, Result};
use cache::{DiskCache, Source};
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

fn compile_options(name: &str, arch: &'static str) -> CompileOptions {
    CompileOptions { arch: Some(arch), name: Some(format!("{name}.cu")), ..Default::default() }
}

/// Compiles one kernel family to PTX for `arch` (e.g. "sm_90").
pub fn compile_family(name: &str, source: &str, arch: &'static str) -> Result<Ptx> {
    compile_ptx_with_opts(format!("{COMMON}\n{source}"), compile_options(name, arch))
        .map_err(|e| anyhow::anyhow!("NVRTC failed on kernels/{name}.cu for {arch}: {e}"))
}

/// `compile_family`'s PTX from `cache` where an entry for this source, architecture, NVRTC
/// version and options is there; else compiled and stored.
pub fn compile_family_cached(cache: &DiskCache, name: &str, source: &str, arch: &'static str) -> Result<(Ptx, Source)> {
    let (major, minor) = nvrtc_version();
    let key = format!(
        "NVRTC PTX of kernels/{name}.cu\nsource sha256 {}\nNVRTC {major}.{minor}\noptions {:?}",
        crate::download::sha256_hex(format!("{COMMON}\n{source}").as_bytes()),
        compile_options(name, arch)
    );
    let (ptx, from) = cache.get_or_build(&key, || compile_family(name, source, arch).map(|ptx| ptx.to_src().into_bytes()))?;
    Ok((Ptx::from_src(String::from_utf8(ptx).context("a cached PTX is not text")?), from))
}

/// NVRTC's (major, minor) version; NVRTC must be loadable (`Libraries::probe`).
pub fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the call only writes the two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// Which of the libraries the backend loads at run time are there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Libraries {
    /// The driver's libcuda.so.1: there is an NVIDIA GPU (and driver).
    pub driver: bool,
    pub nvrtc: bool,
    pub cublas: bool,
    pub cudnn: bool,
}

/// The fix named for each library the driver does not bring: (name, what to install, its folder
/// under `site-packages/nvidia`).
const TOOLKIT: [(&str, &str, &str); 3] = [
    ("NVRTC (libnvrtc.so.13)", "nvidia-cuda-nvrtc", "cu13/lib"),
    ("cuBLAS (libcublas.so.13)", "nvidia-cublas", "cu13/lib"),
    ("cuDNN 9 (libcudnn.so.9)", "nvidia-cudnn-cu13", "cudnn/lib"),
];

impl Libraries {
    /// Looks for each library by the name cudarc loads it by (`LD_LIBRARY_PATH` and the
    /// loader's usual paths), without touching cudarc's own loader, which panics when one is missing.
    pub fn probe() -> Libraries {
        unsafe {
            Libraries {
                driver: cudarc::driver::sys::is_culib_present(),
                nvrtc: cudarc::nvrtc::sys::is_culib_present(),
                cublas: cudarc::cublas::sys::is_culib_present(),
                cudnn: cudnn::sys::is_culib_present(),
            }
        }
    }

    /// The toolkit libraries that are missing, as indices into `TOOLKIT`.
    fn missing(&self) -> Vec<usize> {
        [self.nvrtc, self.cublas, self.cudnn].iter().enumerate().filter(|(_, present)| !**present).map(|(i, _)| i).collect()
    }

    /// Ok when all are there; else what is missing and the fix.
    pub fn check(&self) -> Result<()> {
        if !self.driver {
            bail!(
                "no CUDA driver (libcuda.so.1) found: the cuda backend needs an NVIDIA GPU and its driver; use --backend wgpu or --backend cpu"
            );
        }
        if let Some(reason) = self.missing_toolkit() {
            bail!("{reason}");
        }
        Ok(())
    }

    /// With a driver, the missing toolkit libraries and how to get them, in one line.
    fn missing_toolkit(&self) -> Option<String> {
        let missing = self.missing();
        if missing.is_empty() {
            return None;
        }
        let names: Vec<&str> = missing.iter().map(|&i| TOOLKIT[i].0).collect();
        let packages: Vec<&str> = missing.iter().map(|&i| TOOLKIT[i].1).collect();
        let mut folders: Vec<String> = missing.iter().map(|&i| format!("$SP/{}", TOOLKIT[i].2)).collect();
        folders.dedup();
        Some(format!(
            "{} not found: `pip install {}` (PyTorch's environment for CUDA 13 already has {}), then \
             `SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')/nvidia; export LD_LIBRARY_PATH={}:$LD_LIBRARY_PATH`",
            names.join(", "),
            packages.join(" "),
            if missing.len() == 1 { "it" } else { "them" },
            folders.join(":")
        ))
    }

    /// Why the default backend passes over CUDA although there is a driver (so an NVIDIA GPU),
    /// with the fix, in one line; None without a driver (nothing to say) or when all is there.
    pub fn fallback_note(&self) -> Option<String> {
        self.driver.then(|| self.missing_toolkit()).flatten().map(|reason| format!("not using CUDA: {reason}"))
    }
}

/// Whether the libraries the backend needs can be loaded; the error names the fix.
pub fn check_libraries() -> Result<()> {
    Libraries::probe().check()
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
    /// Seconds NVRTC (or the cache) took for all kernel families (outside any timed region),
    /// and how many came from the cache.
    compile_seconds: f64,
    cached_families: usize,
    /// NVRTC's PTX and cuDNN's algorithm choices from earlier processes.
    cache: DiskCache,
    /// The ops timed so far while `speedrun profile` runs.
    profiler: RefCell<Option<profile::Profiler>>,
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
        let cache = DiskCache::open();
        let (mut functions, mut cached_families) = (HashMap::new(), 0);
        for (family, source, entries) in FAMILIES {
            let (ptx, from) = compile_family_cached(&cache, family, source, arch)?;
            cached_families += usize::from(from == Source::Cached);
            let module = ctx.load_module(ptx)?;
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
            cached_families,
            cache,
            profiler: RefCell::new(None),
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
        let mut driver = 0;
        // SAFETY: the driver is loaded (checked in `new`); the call only writes the int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        let (major, minor) = nvrtc_version();
        format!(
            "driver CUDA {}.{}, NVRTC {major}.{minor}, cuBLAS {}, cuDNN {}; kernels ready in {:.2} s ({} of {} families from the cache)",
            driver / 1000,
            driver % 1000 / 10,
            self.blas.version(),
            cudnn::result::get_version(),
            self.compile_seconds,
            self.cached_families,
            FAMILIES.len()
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

#[cfg(test)]
mod tests {
    use super::Libraries;

    const ALL: Libraries = Libraries { driver: true, nvrtc: true, cublas: true, cudnn: true };

    #[test]
    fn a_missing_library_with_a_driver_is_said_in_one_line_with_its_fix() {
        assert_eq!(ALL.fallback_note(), None);
        assert!(ALL.check().is_ok());
        let note = Libraries { nvrtc: false, ..ALL }.fallback_note().unwrap();
        assert!(note.starts_with("not using CUDA: NVRTC (libnvrtc.so.13) not found: `pip install nvidia-cuda-nvrtc`"), "{note}");
        assert!(note.contains("export LD_LIBRARY_PATH=$SP/cu13/lib:$LD_LIBRARY_PATH"), "{note}");
        assert!(!note.contains('\n'), "{note}");
        let note = Libraries { nvrtc: false, cudnn: false, ..ALL }.fallback_note().unwrap();
        assert!(note.contains("NVRTC (libnvrtc.so.13), cuDNN 9 (libcudnn.so.9) not found"), "{note}");
        assert!(note.contains("`pip install nvidia-cuda-nvrtc nvidia-cudnn-cu13`"), "{note}");
        assert!(note.contains("LD_LIBRARY_PATH=$SP/cu13/lib:$SP/cudnn/lib:$LD_LIBRARY_PATH"), "{note}");
        let err = format!("{:#}", Libraries { cublas: false, ..ALL }.check().unwrap_err());
        assert!(err.starts_with("cuBLAS (libcublas.so.13) not found: `pip install nvidia-cublas`"), "{err}");
    }

    #[test]
    fn without_a_driver_nothing_is_said_and_cuda_is_refused() {
        let none = Libraries { driver: false, nvrtc: false, cublas: false, cudnn: false };
        assert_eq!(none.fallback_note(), None);
        assert_eq!(Libraries { driver: false, ..ALL }.fallback_note(), None);
        assert!(format!("{:#}", none.check().unwrap_err()).contains("no CUDA driver (libcuda.so.1) found"));
    }
}
