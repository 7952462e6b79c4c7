//! Thin launchers: each `Backend` op as cuDNN calls or a few kernels of `kernels/*.cu`.
//! Every pointer is passed already offset to its window; shapes go as u32 scalars.

use super::conv::{Algo, Pass};
use super::{view, view_mut, Cuda, CudaImages};
use crate::backend::{Act, Backend, BnMode, ConvShape, PoolBnShape, View, ViewMut, MOMENTS};
use cudarc::cudnn;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

/// Launches kernel `$name` with config `$cfg` and the arguments in the order of its signature
/// (timed under its name while profiling).
macro_rules! launch {
    ($cuda:expr, $name:literal, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let cfg = $cfg;
        // One expression, so the argument views live until the launch.
        // SAFETY: the arguments follow the kernel's signature in kernels/*.cu, and every
        // buffer holds the elements the kernel indexes for these shapes.
        let launched = $cuda.timed(|| $name.to_string(), 0.0, || unsafe {
            $cuda.stream.launch_builder($cuda.function($name))$(.arg($arg))*.launch(cfg)
        });
        if let Err(e) = launched {
            panic!("CUDA kernel {}: {e:?}", $name);
        }
    }};
}

/// Threads per block of the elementwise kernels, which walk their elements grid-stride.
const THREADS: usize = 256;
/// Rows per partial sum in the two-stage channel reductions: short, so that even the
/// smallest layer (1024 × 3 × 3 rows) gives a few hundred blocks.
const CHUNK_ROWS: usize = 32;

fn elementwise(count: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (count.div_ceil(THREADS).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One 64-thread block per (chunk of rows, 64 channels) for the `partials_*` kernels.
fn partials(rows: usize, c: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(CHUNK_ROWS) as u32, c.div_ceil(64) as u32, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 }
}

/// Threads per block of the kernels that sum over their block (REDUCE_THREADS in common.cuh).
const REDUCE_THREADS: u32 = 256;

/// `blocks` blocks of REDUCE_THREADS: one per channel (`finalize_*`), per weight
/// (`linear_bwd_filter`), or per REDUCE_THREADS rows (`cross_entropy`).
fn reducing(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (u(blocks.max(1)), 1, 1), block_dim: (REDUCE_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Threads of `max_pool_bwd`: one per window of the pooling grid extended over the input.
fn pool_windows(s: &PoolBnShape) -> usize {
    s.n * s.h.div_ceil(s.pool) * s.w.div_ceil(s.pool) * s.c
}

/// Pooling shape as norm.cu's `Pool`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Pool {
    n: u32,
    h: u32,
    w: u32,
    c: u32,
    pool: u32,
    oh: u32,
    ow: u32,
}

// SAFETY: plain `repr(C)` u32s, laid out as the C struct.
unsafe impl DeviceRepr for Pool {}

impl Pool {
    fn new(s: &PoolBnShape) -> Pool {
        let [n, h, w, c, pool, oh, ow] = [s.n, s.h, s.w, s.c, s.pool, s.out_h(), s.out_w()].map(|v| v as u32);
        Pool { n, h, w, c, pool, oh, ow }
    }
}

/// The activation as norm.cu's `act` argument (ACT_GELU, ACT_SILU in common.cuh).
fn act(a: Act) -> u32 {
    match a {
        Act::Gelu => 0,
        Act::Silu => 1,
    }
}

/// Partial sums of `scale_to_norm`'s first pass (blocks of `sum_squares`), at most one per
/// thread of `scale_by_norm`'s blocks, which each add them all.
fn norm_parts(len: usize) -> usize {
    len.div_ceil(8 * REDUCE_THREADS as usize).clamp(1, REDUCE_THREADS as usize)
}

fn u(v: usize) -> u32 {
    u32::try_from(v).expect("sizes fit in u32 (max_tensor_len)")
}

fn check<T, E: std::fmt::Debug>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e:?}"))
}

impl Cuda {
    /// Chunks of `CHUNK_ROWS` rows in a channel reduction over `rows`.
    fn chunks(rows: usize) -> u32 {
        u(rows.div_ceil(CHUNK_ROWS))
    }
}

impl Backend for Cuda {
    type Tensor = CudaSlice<f32>;
    type Index = CudaSlice<u32>;
    type Images = CudaImages;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn max_tensor_len(&self) -> usize {
        i32::MAX as usize // kernels index with 32-bit unsigned ints
    }

    fn free_memory(&self) -> Option<(u64, String)> {
        let (free, _) = self.stream.context().mem_get_info().ok()?;
        Some((free as u64, "free memory on the GPU".to_string()))
    }

    fn zeros(&self, len: usize) -> CudaSlice<f32> {
        check("allocation", self.stream.alloc_zeros(len.max(1)))
    }

    fn index_zeros(&self, len: usize) -> CudaSlice<u32> {
        check("allocation", self.stream.alloc_zeros(len.max(1)))
    }

    fn upload(&self, mut dst: ViewMut<CudaSlice<f32>>, src: &[f32]) {
        assert_eq!(dst.range.len(), src.len());
        check("upload", self.stream.memcpy_htod(src, &mut view_mut(&mut dst)));
    }

    fn upload_index(&self, mut dst: ViewMut<CudaSlice<u32>>, src: &[u32]) {
        assert_eq!(dst.range.len(), src.len());
        check("upload", self.stream.memcpy_htod(src, &mut view_mut(&mut dst)));
    }

    fn upload_images(&self, pixels: &[u8], labels: &[u8]) -> CudaImages {
        CudaImages {
            pixels: check("image upload", self.stream.clone_htod(pixels)),
            labels: check("label upload", self.stream.clone_htod(labels)),
        }
    }

    fn copy(&self, src: View<CudaSlice<f32>>, mut dst: ViewMut<CudaSlice<f32>>) {
        assert_eq!(src.range.len(), dst.range.len());
        check("copy", self.stream.memcpy_dtod(&view(&src), &mut view_mut(&mut dst)));
    }

    fn fill(&self, mut dst: ViewMut<CudaSlice<f32>>, value: f32) {
        let len = u(dst.range.len());
        launch!(self, "fill", elementwise(dst.range.len()); &mut view_mut(&mut dst), &len, &value);
    }

    async fn read(&self, src: View<'_, CudaSlice<f32>>) -> Vec<f32> {
        let values = check("read", self.stream.clone_dtoh(&view(&src)));
        check("synchronize", self.stream.synchronize());
        values
    }

    async fn sync(&self) {
        check("synchronize", self.stream.synchronize());
    }

    fn begin_step(&self) {
        self.begin_graph_step();
    }

    fn end_step(&self) {
        self.end_graph_step();
    }

    fn load_batch(
        &self,
        images: &CudaImages,
        index: View<CudaSlice<u32>>,
        crops: View<CudaSlice<u32>>,
        jitter: Option<View<CudaSlice<f32>>>,
        x: &mut CudaSlice<f32>,
        labels: &mut CudaSlice<u32>,
    ) {
        let n = index.range.len();
        let (index, crops, count, cfg) = (view(&index), view(&crops), u(n), elementwise(n * 3072));
        let (images, all_labels) = (&images.pixels, &images.labels);
        match jitter {
            Some(j) => {
                assert!(j.range.len() >= 2 * n, "jitter holds (brightness, contrast) per image");
                launch!(self, "load_batch", cfg; images, all_labels, &index, &crops, &view(&j), x, labels, &count);
            }
            None => launch!(self, "load_batch", cfg; images, all_labels, &index, &crops, &0u64, x, labels, &count), // null: no jitter
        }
    }

    fn patch_moments(&self, images: &CudaImages, index: View<CudaSlice<u32>>, mut out: ViewMut<CudaSlice<f32>>) {
        let n = index.range.len();
        assert!(out.range.len() >= n * MOMENTS);
        let (index, count) = (view(&index), u(n));
        let cfg = LaunchConfig { grid_dim: (u(n.max(1)), 1, 1), block_dim: (MOMENTS as u32, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "patch_moments", cfg; &images.pixels, &index, &mut view_mut(&mut out), &count);
    }

    fn conv_forward(&self, s: ConvShape, x: &CudaSlice<f32>, w: View<CudaSlice<f32>>, y: &mut CudaSlice<f32>) {
        let w = view(&w);
        self.run_conv(s, Pass::Forward, &mut |plan, algo, workspace| {
            let Algo::Forward(algo) = algo else { unreachable!("a forward plan") };
            let op = cudnn::ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
            // SAFETY: the plan's descriptors describe these buffers (f32, NHWC/OHWI, shape `s`).
            unsafe { op.launch(algo, Some(workspace), (1.0, 0.0), x, &w, y) }
        });
    }

    fn conv_backward_data(&self, s: ConvShape, dy: &CudaSlice<f32>, w: View<CudaSlice<f32>>, dx: &mut CudaSlice<f32>) {
        let w = view(&w);
        self.run_conv(s, Pass::BackwardData, &mut |plan, algo, workspace| {
            let Algo::BackwardData(algo) = algo else { unreachable!("a backward-data plan") };
            let op = cudnn::ConvBackwardData { conv: &plan.conv, dx: &plan.x, w: &plan.w, dy: &plan.y };
            // SAFETY: as in `conv_forward`.
            unsafe { op.launch(algo, Some(workspace), (1.0, 0.0), dx, &w, dy) }
        });
    }

    fn conv_backward_filter(&self, s: ConvShape, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, mut dw: ViewMut<CudaSlice<f32>>) {
        let mut dw = view_mut(&mut dw);
        self.run_conv(s, Pass::BackwardFilter, &mut |plan, algo, workspace| {
            let Algo::BackwardFilter(algo) = algo else { unreachable!("a backward-filter plan") };
            let op = cudnn::ConvBackwardFilter { conv: &plan.conv, x: &plan.x, dw: &plan.w, dy: &plan.y };
            // SAFETY: as in `conv_forward`.
            unsafe { op.launch(algo, Some(workspace), (1.0, 0.0), x, &mut dw, dy) }
        });
    }

    fn bias_gelu_forward(&self, pixels: usize, c: usize, z: &mut CudaSlice<f32>, bias: View<CudaSlice<f32>>, a: &mut CudaSlice<f32>) {
        let (bias, rows, cu) = (view(&bias), u(pixels), u(c));
        launch!(self, "bias_gelu_fwd", elementwise(pixels * c); z, &bias, a, &rows, &cu);
    }

    fn bias_gelu_backward(&self, pixels: usize, c: usize, z: &CudaSlice<f32>, da: &CudaSlice<f32>, mut dbias: ViewMut<CudaSlice<f32>>) {
        let (rows, cu, chunk, chunks) = (u(pixels), u(c), u(CHUNK_ROWS), Self::chunks(pixels));
        let mut part = self.take_scratch("channel partials", chunks as usize * c * 2);
        launch!(self, "partials_gelu_grad", partials(pixels, c); z, da, &mut part, &rows, &cu, &chunk);
        launch!(self, "finalize_sum", reducing(c); &part, &mut view_mut(&mut dbias), &cu, &chunks);
        self.put_scratch("channel partials", part);
    }

    fn pool_bn_act_forward(
        &self,
        s: PoolBnShape,
        mode: BnMode,
        y: &CudaSlice<f32>,
        beta: View<CudaSlice<f32>>,
        mut running: ViewMut<CudaSlice<f32>>,
        z: &mut CudaSlice<f32>,
        a: &mut CudaSlice<f32>,
        saved: &mut CudaSlice<f32>,
    ) {
        let (c, rows) = (s.c, s.n * s.out_h() * s.out_w());
        let (rows_u, cu, chunk, chunks) = (u(rows), u(c), u(CHUNK_ROWS), Self::chunks(rows));
        // BatchNorm reads y itself where there is no pooling, else its pooled copy.
        let mut pooled_copy = (s.pool > 1).then(|| self.take_scratch("pooled", rows * c));
        if let Some(p) = pooled_copy.as_mut() {
            self.max_pool_forward(s, y, p);
        }
        let pooled = pooled_copy.as_ref().unwrap_or(y);
        let mut running = view_mut(&mut running);
        match mode {
            BnMode::Train { momentum, eps } => {
                let mut part = self.take_scratch("channel partials", chunks as usize * c * 2);
                launch!(self, "partials_sum", partials(rows, c); pooled, &mut part, &rows_u, &cu, &chunk);
                launch!(self, "finalize_mean", reducing(c); &part, &mut *saved, &rows_u, &cu, &chunks);
                launch!(self, "partials_sqdev", partials(rows, c); pooled, &*saved, &mut part, &rows_u, &cu, &chunk);
                launch!(self, "finalize_var", reducing(c); &part, &mut *saved, &mut running, &rows_u, &cu, &chunks, &momentum, &eps);
                self.put_scratch("channel partials", part);
            }
            BnMode::Eval { eps } => launch!(self, "eval_stats", elementwise(c); &running.as_view(), &mut *saved, &cu, &eps),
        }
        launch!(self, "bn_act_apply", elementwise(rows * c); pooled, &*saved, &view(&beta), z, a, &rows_u, &cu, &act(s.act));
        if let Some(p) = pooled_copy {
            self.put_scratch("pooled", p);
        }
    }

    fn pool_bn_act_backward(
        &self,
        s: PoolBnShape,
        y: &CudaSlice<f32>,
        z: &CudaSlice<f32>,
        saved: &CudaSlice<f32>,
        beta: View<CudaSlice<f32>>,
        da: &mut CudaSlice<f32>,
        dy: &mut CudaSlice<f32>,
        mut dbeta: ViewMut<CudaSlice<f32>>,
    ) {
        let (c, rows) = (s.c, s.n * s.out_h() * s.out_w());
        let (rows_u, cu, chunk, chunks) = (u(rows), u(c), u(CHUNK_ROWS), Self::chunks(rows));
        let beta = view(&beta);
        let mut part = self.take_scratch("channel partials", chunks as usize * c * 2);
        let mut means = self.take_scratch("bn backward means", 2 * c);
        launch!(self, "partials_bn_bwd", partials(rows, c); z, &beta, &mut *da, &mut part, &rows_u, &cu, &chunk, &act(s.act));
        launch!(self, "finalize_bn_bwd", reducing(c); &part, &mut view_mut(&mut dbeta), &mut means, &rows_u, &cu, &chunks);
        if s.pool == 1 {
            launch!(self, "bn_bwd_apply", elementwise(rows * c); &*da, z, &beta, saved, &means, dy, &rows_u, &cu);
        } else {
            let mut dpooled = self.take_scratch("pooled", rows * c);
            launch!(self, "bn_bwd_apply", elementwise(rows * c); &*da, z, &beta, saved, &means, &mut dpooled, &rows_u, &cu);
            self.max_pool_backward(s, y, &dpooled, dy);
            self.put_scratch("pooled", dpooled);
        }
        self.put_scratch("channel partials", part);
        self.put_scratch("bn backward means", means);
    }

    fn max_pool_forward(&self, s: PoolBnShape, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        launch!(self, "max_pool_fwd", elementwise(s.n * s.out_h() * s.out_w() * s.c); x, y, &Pool::new(&s));
    }

    fn max_pool_backward(&self, s: PoolBnShape, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        launch!(self, "max_pool_bwd", elementwise(pool_windows(&s)); x, dy, dx, &Pool::new(&s));
    }

    fn linear_forward(
        &self,
        n: usize,
        c_in: usize,
        c_out: usize,
        scale: f32,
        x: &CudaSlice<f32>,
        w: View<CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) {
        let (w, nu, iu, ou) = (view(&w), u(n), u(c_in), u(c_out));
        // y = x · wᵀ: k = c_in, m = c_out, w strides (c_in, 1).
        launch!(self, "linear_product", elementwise(n * c_out); x, &w, y, &nu, &iu, &ou, &iu, &1u32, &scale);
    }

    fn linear_backward(
        &self,
        n: usize,
        c_in: usize,
        c_out: usize,
        scale: f32,
        x: &CudaSlice<f32>,
        w: View<CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        mut dw: ViewMut<CudaSlice<f32>>,
    ) {
        let (w, nu, iu, ou) = (view(&w), u(n), u(c_in), u(c_out));
        // dx = dy · w: k = c_out, m = c_in, w strides (1, c_in).
        launch!(self, "linear_product", elementwise(n * c_in); dy, &w, dx, &nu, &ou, &iu, &1u32, &iu, &scale);
        launch!(self, "linear_bwd_filter", reducing(c_out * c_in); dy, x, &mut view_mut(&mut dw), &nu, &iu, &ou, &scale);
    }

    fn cross_entropy(
        &self,
        n: usize,
        smoothing: f32,
        logits: &CudaSlice<f32>,
        labels: &CudaSlice<u32>,
        dlogits: Option<&mut CudaSlice<f32>>,
        stats: &mut CudaSlice<f32>,
    ) {
        let (blocks, nu) = (u(n.div_ceil(REDUCE_THREADS as usize).max(1)), u(n));
        let cfg = reducing(blocks as usize);
        let mut part = self.take_scratch("loss partials", 2 * blocks as usize);
        match dlogits {
            Some(d) => launch!(self, "cross_entropy", cfg; logits, labels, d, &mut part, &nu, &smoothing),
            None => launch!(self, "cross_entropy", cfg; logits, labels, &0u64, &mut part, &nu, &smoothing), // null: no gradient
        }
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "cross_entropy_total", one; &part, stats, &blocks);
        self.put_scratch("loss partials", part);
    }

    fn axpby(&self, alpha: f32, x: View<CudaSlice<f32>>, beta: f32, mut y: ViewMut<CudaSlice<f32>>) {
        assert_eq!(x.range.len(), y.range.len());
        let len = u(y.range.len());
        launch!(self, "axpby", elementwise(y.range.len()); &mut view_mut(&mut y), &view(&x), &len, &alpha, &beta);
    }

    fn sgd_step(
        &self,
        mut p: ViewMut<CudaSlice<f32>>,
        g: View<CudaSlice<f32>>,
        mut m: ViewMut<CudaSlice<f32>>,
        lr: f32,
        wd: f32,
        momentum: f32,
    ) {
        let len = u(p.range.len());
        launch!(self, "sgd", elementwise(p.range.len()); &mut view_mut(&mut p), &view(&g), &mut view_mut(&mut m), &len, &lr, &wd, &momentum);
    }

    fn lookahead(&self, decay: f32, mut ema: ViewMut<CudaSlice<f32>>, mut net: ViewMut<CudaSlice<f32>>) {
        let len = u(ema.range.len());
        launch!(self, "lookahead", elementwise(ema.range.len()); &mut view_mut(&mut ema), &mut view_mut(&mut net), &len, &decay);
    }

    fn nesterov(&self, momentum: f32, g: View<CudaSlice<f32>>, mut m: ViewMut<CudaSlice<f32>>, mut out: ViewMut<CudaSlice<f32>>) {
        assert!(g.range.len() == m.range.len() && g.range.len() == out.range.len());
        let len = u(g.range.len());
        let (g, mut m, mut out) = (view(&g), view_mut(&mut m), view_mut(&mut out));
        launch!(self, "nesterov", elementwise(g.len()); &g, &mut m, &mut out, &len, &momentum);
    }

    fn scale_to_norm(&self, target: f32, eps: f32, mut x: ViewMut<CudaSlice<f32>>) {
        let len = x.range.len();
        if len == 0 {
            return;
        }
        // Σ x² per block into part, then every block of the scaling pass adds part in the
        // same order: a fixed-order norm on the device, no atomics and no host round trip.
        let (parts, len_u) = (norm_parts(len), u(len));
        // (parts) used of (REDUCE_THREADS): one size for every tensor, so a step that scales
        // several allocates once, in the first step.
        let mut part = self.take_scratch("norm partials", REDUCE_THREADS as usize);
        let mut x = view_mut(&mut x);
        launch!(self, "sum_squares", reducing(parts); &x.as_view(), &mut part, &len_u);
        let blocks = len.div_ceil(REDUCE_THREADS as usize).min(1024);
        launch!(self, "scale_by_norm", reducing(blocks); &mut x, &part, &len_u, &u(parts), &target, &eps);
        self.put_scratch("norm partials", part);
    }

    fn matmul(
        &self,
        shape: (usize, usize, usize),
        alpha: f32,
        a: View<CudaSlice<f32>>,
        b: View<CudaSlice<f32>>,
        b_transposed: bool,
        beta: f32,
        mut c: ViewMut<CudaSlice<f32>>,
    ) {
        let (m, k, n) = shape;
        let name = || format!("matmul {m}×{k}×{n}{} (cuBLAS)", if b_transposed { "ᵀ" } else { "" });
        self.timed(name, 2.0 * (m * k * n) as f64, || {
            self.blas.matmul(shape, alpha, &view(&a), &view(&b), b_transposed, beta, &mut view_mut(&mut c))
        });
    }
}
