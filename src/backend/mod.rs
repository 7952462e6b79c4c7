//! The `Backend` trait: every op the airbench94-family networks and their training loops need.
//!
//! Conventions shared by all backends (the CPU backend is the reference for each op):
//! - Activations are NHWC: `(n, h, w, c)` with `c` contiguous; f32 values, held in f32 or,
//!   under `Precision::Half`, rounded to f16 wherever an op stores them.
//! - Conv weights are OHWI: `(c_out, k, k, c_in)`, so a weight is a `(c_out, k*k*c_in)`
//!   matrix whose columns follow the NHWC patch order `(ky, kx, c)`.
//! - Buffers are backend-owned handles; shapes live on the host and are passed to each op.
//!   Ops allocate only their scratch, on first use (the first training step), and never wait
//!   for the device; only `read` and `sync` do.
//! - Ops that take `n` work on the first `n` images of buffers sized for a larger batch.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use std::future::Future;
use std::ops::Range;

/// CIFAR-10 channel means and standard deviations (airbench94's fixed normalisation).
pub const MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
/// Image side and channels of every input.
pub const SIDE: usize = 32;
pub const CHANNELS: usize = 3;
pub const CLASSES: usize = 10;
/// Length of one 2×2×3 whitening patch.
pub const PATCH: usize = 12;
/// Values per image of `Backend::patch_moments`: Σ q qᵀ (12×12), then Σ q (12).
pub const MOMENTS: usize = PATCH * PATCH + PATCH;

/// A read-only window into a backend buffer, in elements.
pub struct View<'a, T> {
    pub buf: &'a T,
    pub range: Range<usize>,
}

/// A writable window into a backend buffer, in elements.
pub struct ViewMut<'a, T> {
    pub buf: &'a mut T,
    pub range: Range<usize>,
}

/// A stride-1 convolution with square kernel `k` and zero padding `pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn out_h(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }
    pub fn out_w(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }
    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        self.n * self.out_h() * self.out_w() * self.c_out * self.k * self.k * self.c_in
    }
}

/// The activation after BatchNorm in the conv blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    /// `z·Φ(z)` with the exact erf (airbench94).
    Gelu,
    /// `z·σ(z)` (hiverge).
    Silu,
}

/// MaxPool(pool, floor) → BatchNorm(γ = 1) → `act` over an `(n, h, w, c)` conv output.
/// `pool == 1` means no pooling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolBnShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub pool: usize,
    pub act: Act,
}

impl PoolBnShape {
    pub fn out_h(&self) -> usize {
        self.h / self.pool
    }
    pub fn out_w(&self) -> usize {
        self.w / self.pool
    }
}

/// How a backend stores the activations and their gradients (`--precision`). Parameters,
/// their gradients, optimizer state, BatchNorm statistics, the logits and the loss stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    // IEEE binary16 (f16) storage, f32 arithmetic; the conv weights are rounded to f16 as the
    // convolutions read them. (A plain comment: a doc comment here would turn clap's `--help`
    // into its long, two-line-per-flag layout.)
    Half,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
    /// The name `--precision` takes.
    pub fn name(&self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Half => "half",
        }
    }
}

/// How BatchNorm gets its statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BnMode {
    /// Normalise with the biased batch variance; then
    /// `running = momentum·running + (1 − momentum)·batch` (unbiased variance).
    Train { momentum: f32, eps: f32 },
    /// Normalise with the running statistics.
    Eval { eps: f32 },
}

/// One view of an image: a translation (reflect padding) of a possibly mirrored image.
/// Output pixel `(y, x)` is source pixel `(reflect(y + dy), reflect(x + dx))` of the image,
/// mirrored left-right first when `flip` is set. `|dy|, |dx| <= 3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    pub dy: i32,
    pub dx: i32,
    pub flip: bool,
}

impl Crop {
    pub const IDENTITY: Crop = Crop { dy: 0, dx: 0, flip: false };

    /// Packs into a u32 for upload: bits 0–2 `dy + 3`, bits 3–5 `dx + 3`, bit 6 `flip`.
    pub fn pack(self) -> u32 {
        debug_assert!(self.dy.abs() <= 3 && self.dx.abs() <= 3);
        (self.dy + 3) as u32 | ((self.dx + 3) as u32) << 3 | (self.flip as u32) << 6
    }
    pub fn unpack(v: u32) -> Crop {
        Crop { dy: (v & 7) as i32 - 3, dx: ((v >> 3) & 7) as i32 - 3, flip: v >> 6 & 1 == 1 }
    }
}

/// Reflect padding index (PyTorch `'reflect'`: the edge pixel is not repeated).
pub fn reflect(i: i32, len: i32) -> usize {
    let i = if i < 0 { -i } else { i };
    (if i >= len { 2 * (len - 1) - i } else { i }) as usize
}

pub trait Backend {
    /// An f32 buffer.
    type Tensor;
    /// A u32 buffer (indices, labels, packed crops).
    type Index;
    /// A dataset: `(n, 32, 32, 3)` NHWC u8 images and their u8 labels.
    type Images;

    /// Short backend name, as on the command line.
    fn name(&self) -> &'static str;
    /// The device this backend runs on, for logs.
    fn device_name(&self) -> String;
    /// How this backend stores activations and their gradients.
    fn precision(&self) -> Precision {
        Precision::F32
    }

    // ---- memory ----
    /// The longest tensor (in values) the device can bind.
    fn max_tensor_len(&self) -> usize;
    /// Bytes the device's buffers can still take and where that number comes from, where the
    /// backend knows (`memory::check` refuses a network beyond it); None where it does not.
    fn free_memory(&self) -> Option<(u64, String)> {
        None
    }
    fn zeros(&self, len: usize) -> Self::Tensor;
    /// A zeroed buffer for activations or their gradients, stored as `precision` says
    /// (f32 `zeros` where the backend stores f32 only). `copy` and `fill` need f32 tensors.
    fn activations(&self, len: usize) -> Self::Tensor {
        self.zeros(len)
    }
    fn index_zeros(&self, len: usize) -> Self::Index;
    fn upload(&self, dst: ViewMut<Self::Tensor>, src: &[f32]);
    fn upload_index(&self, dst: ViewMut<Self::Index>, src: &[u32]);
    fn upload_images(&self, pixels: &[u8], labels: &[u8]) -> Self::Images;
    fn copy(&self, src: View<Self::Tensor>, dst: ViewMut<Self::Tensor>);
    fn fill(&self, dst: ViewMut<Self::Tensor>, value: f32);
    /// Reads a window back to the host once all work queued before it is done.
    fn read(&self, src: View<Self::Tensor>) -> impl Future<Output = Vec<f32>>;
    /// Resolves when all queued work is done (for timing).
    fn sync(&self) -> impl Future<Output = ()>;
    /// Bracket the ops of one training step. A backend may record them and replay them as
    /// one unit (CUDA graphs); by default they just run as they come.
    fn begin_step(&self) {}
    fn end_step(&self) {}

    // ---- data ----
    /// Gathers `n` images `index[i]` of `images` under the views `crops[i]` (packed `Crop`s),
    /// normalised with `MEAN`/`STD`, into `x (n, 32, 32, 3)`, and their labels into `labels (n)`.
    /// With `jitter (n, 2)` = (brightness, contrast) per image, every value of image `i`
    /// becomes `(x + brightness) · contrast` after normalisation.
    fn load_batch(
        &self,
        images: &Self::Images,
        index: View<Self::Index>,
        crops: View<Self::Index>,
        jitter: Option<View<Self::Tensor>>,
        x: &mut Self::Tensor,
        labels: &mut Self::Index,
    );
    /// For each image `index[i]`, over its 31×31 2×2 patches `q` of centred pixel values
    /// (value − 128, flattened in PyTorch's `(c, ky, kx)` order): `Σ q qᵀ` then `Σ q`, into
    /// `out (n, 156)`. Every sum is an integer below 2²⁴ in magnitude, so exact in f32 and
    /// the same on every backend; the host normalises them in f64 (the smallest eigenvalues
    /// of the patch covariance are ~1e-5 of the largest, below f32 rounding elsewhere).
    fn patch_moments(&self, images: &Self::Images, index: View<Self::Index>, out: ViewMut<Self::Tensor>);

    // ---- convolution (no bias) ----
    /// `y (n, oh, ow, c_out) = conv(x (n, h, w, c_in), w (c_out, k, k, c_in))`.
    fn conv_forward(&self, s: ConvShape, x: &Self::Tensor, w: View<Self::Tensor>, y: &mut Self::Tensor);

    /// `conv_forward` for inference (evaluation, TTA), whose output no backward pass reads:
    /// a backend may use a faster algorithm whose rounding differs from pixel to pixel. The
    /// CPU backend runs Winograd F(4×4, 3×3) here, while its training forward stays direct:
    /// direct convolution rounds the same way at every pixel, so equal inputs give equal
    /// outputs and max-pool ties route gradients as in the float64 reference (tests/reference.rs).
    fn conv_forward_inference(&self, s: ConvShape, x: &Self::Tensor, w: View<Self::Tensor>, y: &mut Self::Tensor) {
        self.conv_forward(s, x, w, y);
    }
    /// `dx (n, h, w, c_in)` from `dy (n, oh, ow, c_out)`.
    fn conv_backward_data(&self, s: ConvShape, dy: &Self::Tensor, w: View<Self::Tensor>, dx: &mut Self::Tensor);
    /// `dw (c_out, k, k, c_in)` (overwritten) from `x` and `dy`.
    fn conv_backward_filter(&self, s: ConvShape, x: &Self::Tensor, dy: &Self::Tensor, dw: ViewMut<Self::Tensor>);

    // ---- activations and normalisation ----
    /// In place `z += bias` over `(pixels, c)`, then `a = gelu(z)`.
    fn bias_gelu_forward(&self, pixels: usize, c: usize, z: &mut Self::Tensor, bias: View<Self::Tensor>, a: &mut Self::Tensor);
    /// `dbias (c) = Σ_pixels da · gelu'(z)` (overwritten).
    fn bias_gelu_backward(&self, pixels: usize, c: usize, z: &Self::Tensor, da: &Self::Tensor, dbias: ViewMut<Self::Tensor>);
    /// Pool → BatchNorm(γ = 1, β = `beta`) → `s.act`. Reads `y (n, h, w, c)`; writes the
    /// normalised pre-activation `z (n, oh, ow, c)`, `a = act(z)`, and `saved (2c)` =
    /// (mean, 1/std) used. In train mode also updates `running (2c)` = (mean, var).
    #[allow(clippy::too_many_arguments)]
    fn pool_bn_act_forward(
        &self,
        s: PoolBnShape,
        mode: BnMode,
        y: &Self::Tensor,
        beta: View<Self::Tensor>,
        running: ViewMut<Self::Tensor>,
        z: &mut Self::Tensor,
        a: &mut Self::Tensor,
        saved: &mut Self::Tensor,
    );
    /// Backward of `pool_bn_act_forward` in train mode: from `da (n, oh, ow, c)` (clobbered)
    /// writes `dy (n, h, w, c)` (the pooled-away positions get 0) and `dbeta (c)` (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn pool_bn_act_backward(
        &self,
        s: PoolBnShape,
        y: &Self::Tensor,
        z: &Self::Tensor,
        saved: &Self::Tensor,
        beta: View<Self::Tensor>,
        da: &mut Self::Tensor,
        dy: &mut Self::Tensor,
        dbeta: ViewMut<Self::Tensor>,
    );
    /// `y (n, h/p, w/p, c) = maxpool_p(x (n, h, w, c))`, floor mode.
    fn max_pool_forward(&self, s: PoolBnShape, x: &Self::Tensor, y: &mut Self::Tensor);
    /// Routes `dy` to the first maximum of each window of `x`; other positions of `dx` get 0.
    fn max_pool_backward(&self, s: PoolBnShape, x: &Self::Tensor, dy: &Self::Tensor, dx: &mut Self::Tensor);

    // ---- head and loss ----
    /// `y (n, c_out) = scale · x (n, c_in) · wᵀ`, `w (c_out, c_in)`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        n: usize,
        c_in: usize,
        c_out: usize,
        scale: f32,
        x: &Self::Tensor,
        w: View<Self::Tensor>,
        y: &mut Self::Tensor,
    );
    /// `dx = scale · dy · w` and `dw = scale · dyᵀ · x` (both overwritten).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        n: usize,
        c_in: usize,
        c_out: usize,
        scale: f32,
        x: &Self::Tensor,
        w: View<Self::Tensor>,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
        dw: ViewMut<Self::Tensor>,
    );
    /// Label-smoothed cross-entropy of `logits (n, 10)`, summed over the batch. Adds the loss
    /// to `stats[0]` and the number of correct argmax predictions to `stats[1]`; when `dlogits`
    /// is given, writes the gradient of the summed loss into it.
    fn cross_entropy(
        &self,
        n: usize,
        smoothing: f32,
        logits: &Self::Tensor,
        labels: &Self::Index,
        dlogits: Option<&mut Self::Tensor>,
        stats: &mut Self::Tensor,
    );
    /// `y = alpha · x + beta · y`.
    fn axpby(&self, alpha: f32, x: View<Self::Tensor>, beta: f32, y: ViewMut<Self::Tensor>);

    // ---- optimizer ----
    /// PyTorch SGD, Nesterov, dampening 0, L2 weight decay, in this order:
    /// `g += wd·p; m = momentum·m + g; g += momentum·m; p -= lr·g`.
    #[allow(clippy::too_many_arguments)]
    fn sgd_step(&self, p: ViewMut<Self::Tensor>, g: View<Self::Tensor>, m: ViewMut<Self::Tensor>, lr: f32, wd: f32, momentum: f32);
    /// Lookahead: `ema += (1 − decay)·(net − ema); net = ema`.
    fn lookahead(&self, decay: f32, ema: ViewMut<Self::Tensor>, net: ViewMut<Self::Tensor>);
    /// Nesterov momentum without the step (Muon): `m = momentum·m + g; out = g + momentum·m`.
    fn nesterov(&self, momentum: f32, g: View<Self::Tensor>, m: ViewMut<Self::Tensor>, out: ViewMut<Self::Tensor>);
    /// `x ← x · target / (‖x‖ + eps)`, with the Euclidean (Frobenius) norm of the whole
    /// window computed on the device.
    fn scale_to_norm(&self, target: f32, eps: f32, x: ViewMut<Self::Tensor>);
    /// Row-major `c (m, n) = alpha · a (m, k) · b (k, n) + beta · c`; with `b_transposed`,
    /// `b` is stored `(n, k)` and used transposed. `beta == 0` ignores the old `c` (NaN too).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        mkn: (usize, usize, usize),
        alpha: f32,
        a: View<Self::Tensor>,
        b: View<Self::Tensor>,
        b_transposed: bool,
        beta: f32,
        c: ViewMut<Self::Tensor>,
    );
}

/// GPU time per kernel over the profiled steps (`speedrun profile`), for the backends that
/// can time their kernels on the device.
pub trait Profile: Backend {
    /// Starts timing every kernel (an error where the device cannot).
    fn start_profile(&self) -> anyhow::Result<()>;
    /// Stops timing; each kernel's total, longest first.
    fn finish_profile(&self) -> impl Future<Output = Vec<KernelTime>>;
}

/// One kernel's total over the profiled steps: its label (the kernel, and for convolutions
/// the layer shape and pass), calls, seconds and useful floating-point operations.
pub struct KernelTime {
    pub name: String,
    pub calls: usize,
    pub seconds: f64,
    pub flops: f64,
}

impl KernelTime {
    /// Per-label totals of timed calls `(label, seconds, flops)`, longest first.
    pub fn totals(calls: impl IntoIterator<Item = (String, f64, f64)>) -> Vec<KernelTime> {
        let mut totals: std::collections::HashMap<String, KernelTime> = std::collections::HashMap::new();
        for (name, seconds, flops) in calls {
            let t = totals.entry(name.clone()).or_insert(KernelTime { name, calls: 0, seconds: 0.0, flops: 0.0 });
            t.calls += 1;
            t.seconds += seconds;
            t.flops += flops;
        }
        let mut rows: Vec<KernelTime> = totals.into_values().collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }
}

/// A whole-buffer view.
pub fn all<T>(buf: &T, len: usize) -> View<'_, T> {
    View { buf, range: 0..len }
}

/// A whole-buffer mutable view.
pub fn all_mut<T>(buf: &mut T, len: usize) -> ViewMut<'_, T> {
    ViewMut { buf, range: 0..len }
}

/// Blocks on a backend future (native entry points only; the web build awaits instead).
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: Future>(f: F) -> F::Output {
    pollster::block_on(f)
}
