//! The CPU backend: plain f32 Rust, NHWC, multi-threaded with rayon; convolutions as GEMMs
//! (direct, or Winograd's for 3×3 filters). It is the readable reference every other backend
//! is tested against, and it is deterministic: reductions use a fixed partition and order,
//! whatever the threads. Under `Precision::Half` it emulates f16 storage: every activation
//! and activation gradient an op writes is rounded to f16 (`store`), and the convolutions
//! read f16-rounded copies of their weights; the arithmetic stays f32.

/// `$vis fn $name(args) $body`, compiled twice: for AVX-512 (closures defined in the body
/// inherit it: the per-channel loops inside rayon's tasks too) and for the build's target
/// (AVX2), and run as the former where the CPU has AVX-512F (unless `PORTABLE_ONLY`).
/// `lanes L` declares `const L` in the body: 16 in the AVX-512 copy, 8 in the other. Each
/// lane computes the same operations in the same order either way, so the results are the
/// same bits, only sooner (fewer instructions per value: the elementwise passes, Winograd's
/// transforms). Other architectures compile the body once.
macro_rules! widest {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(lanes $lanes:ident)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if !crate::backend::cpu::PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
                && std::arch::is_x86_feature_detected!("avx512f")
            {
                $(#[$attr])*
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    $(const $lanes: usize = 16;)?
                    $body
                }
                // SAFETY: the CPU has AVX-512F.
                return unsafe { avx512($($arg),*) };
            }
            $(const $lanes: usize = 8;)?
            $body
        }
    };
}

/// Set, `widest!` runs the build target's copies even where the CPU has AVX-512: the test that
/// both copies give the same bits sets it (which, for that very reason, changes nothing for
/// whatever else runs meanwhile).
#[cfg(target_arch = "x86_64")]
static PORTABLE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

mod conv;
mod gemm;
pub mod norm;
mod winograd;

pub use winograd::scratch_len as winograd_scratch;

use super::{Backend, BnMode, ConvShape, Crop, PoolBnShape, Precision, View, ViewMut, CHANNELS, CLASSES, MEAN, MOMENTS, PATCH, SIDE, STD};
use half::f16;
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::RefCell;
use std::future::{ready, Future};
use std::ops::Range;

thread_local! {
    /// Per-thread scratch for patch matrices, reused across calls.
    static THREAD_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Splits `0..n` into at most 16 contiguous non-empty ranges, independent of the thread
/// count, so that partial sums are always added in the same order.
fn fixed_groups(n: usize) -> Vec<Range<usize>> {
    let groups = n.clamp(1, 16);
    (0..groups).map(|g| g * n / groups..(g + 1) * n / groups).filter(|r| !r.is_empty()).collect()
}

/// `out = Σ partials`, added in their order at every element (parallel over elements: the
/// same sums whatever the threads).
fn sum_in_order(partials: &[Vec<f32>], out: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, out)| {
        out.fill(0.0);
        for partial in partials {
            out.iter_mut().zip(&partial[i * CHUNK..]).for_each(|(o, &p)| *o += p);
        }
    });
}

#[derive(Default)]
pub struct Cpu {
    precision: Precision,
}

/// CIFAR images in host memory: `(n, 32, 32, 3)` NHWC pixels and one label each.
pub struct HostImages {
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

fn window<'a, T>(v: &View<'a, Vec<T>>) -> &'a [T] {
    &v.buf[v.range.clone()]
}

fn window_mut<'a, 'b, T>(v: &'b mut ViewMut<'a, Vec<T>>) -> &'b mut [T] {
    &mut v.buf[v.range.clone()]
}

impl Cpu {
    pub fn new() -> Cpu {
        Cpu::with_precision(Precision::F32)
    }

    pub fn with_precision(precision: Precision) -> Cpu {
        Cpu { precision }
    }

    /// `values`, just written by an op, as the storage holds them: rounded to the nearest f16
    /// (ties to even; beyond ±65504 infinite) under half precision, untouched in f32.
    fn store(&self, values: &mut [f32]) {
        if self.precision == Precision::Half {
            values.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()));
        }
    }

    /// The conv weights as a convolution reads them: an f16-rounded copy under half precision
    /// (the copy a GPU's f16 convolution multiplies with), the weights themselves in f32.
    fn conv_weights<'a>(&self, w: &View<'a, Vec<f32>>) -> Cow<'a, [f32]> {
        let w = window(w);
        match self.precision {
            Precision::F32 => Cow::Borrowed(w),
            Precision::Half => {
                let mut copy = w.to_vec();
                self.store(&mut copy);
                Cow::Owned(copy)
            }
        }
    }
}

/// Values in `s`'s output `(n, oh, ow, c_out)`.
fn conv_out_len(s: &ConvShape) -> usize {
    s.n * s.out_h() * s.out_w() * s.c_out
}

/// Values in `s`'s pooled output `(n, oh, ow, c)`.
fn pooled_len(s: &PoolBnShape) -> usize {
    s.n * s.out_h() * s.out_w() * s.c
}

impl Backend for Cpu {
    type Tensor = Vec<f32>;
    type Index = Vec<u32>;
    type Images = HostImages;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device_name(&self) -> String {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        format!("{model} ({} threads)", rayon::current_num_threads())
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn max_tensor_len(&self) -> usize {
        usize::MAX
    }

    fn free_memory(&self) -> Option<(u64, String)> {
        crate::memory::host_available()
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(len);
        v.resize(len, 0.0); // writes every page now, not inside the first timed step
        v
    }

    fn index_zeros(&self, len: usize) -> Vec<u32> {
        vec![0; len]
    }

    fn upload(&self, mut dst: ViewMut<Vec<f32>>, src: &[f32]) {
        window_mut(&mut dst).copy_from_slice(src);
    }

    fn upload_index(&self, mut dst: ViewMut<Vec<u32>>, src: &[u32]) {
        window_mut(&mut dst).copy_from_slice(src);
    }

    fn upload_images(&self, pixels: &[u8], labels: &[u8]) -> HostImages {
        assert_eq!(pixels.len(), labels.len() * SIDE * SIDE * CHANNELS);
        HostImages { pixels: pixels.to_vec(), labels: labels.to_vec() }
    }

    fn copy(&self, src: View<Vec<f32>>, mut dst: ViewMut<Vec<f32>>) {
        window_mut(&mut dst).copy_from_slice(window(&src));
    }

    fn fill(&self, mut dst: ViewMut<Vec<f32>>, value: f32) {
        window_mut(&mut dst).fill(value);
    }

    fn read(&self, src: View<Vec<f32>>) -> impl Future<Output = Vec<f32>> {
        ready(window(&src).to_vec())
    }

    fn sync(&self) -> impl Future<Output = ()> {
        ready(())
    }

    fn load_batch(
        &self,
        images: &HostImages,
        index: View<Vec<u32>>,
        crops: View<Vec<u32>>,
        jitter: Option<View<Vec<f32>>>,
        x: &mut Vec<f32>,
        labels: &mut Vec<u32>,
    ) {
        let (index, crops) = (window(&index), window(&crops));
        let jitter = jitter.as_ref().map(window);
        let image_len = SIDE * SIDE * CHANNELS;
        let images_out = x[..index.len() * image_len].par_chunks_mut(image_len).enumerate();
        images_out.zip(index.par_iter().zip(crops)).for_each(|((k, out), (&i, &crop))| {
            let (brightness, contrast) = jitter.map_or((0.0, 1.0), |j| (j[2 * k], j[2 * k + 1]));
            let src = &images.pixels[i as usize * image_len..(i as usize + 1) * image_len];
            let crop = Crop::unpack(crop);
            for (y, row) in out.chunks_exact_mut(SIDE * CHANNELS).enumerate() {
                let sy = super::reflect(y as i32 + crop.dy, SIDE as i32);
                for (x, px) in row.chunks_exact_mut(CHANNELS).enumerate() {
                    let sx = super::reflect(x as i32 + crop.dx, SIDE as i32);
                    let sx = if crop.flip { SIDE - 1 - sx } else { sx };
                    for c in 0..CHANNELS {
                        let v = (src[(sy * SIDE + sx) * CHANNELS + c] as f32 / 255.0 - MEAN[c] as f32) / STD[c] as f32;
                        px[c] = (v + brightness) * contrast;
                    }
                }
            }
        });
        for (l, &i) in labels.iter_mut().zip(index) {
            *l = images.labels[i as usize] as u32;
        }
        self.store(&mut x[..index.len() * image_len]);
    }

    fn patch_moments(&self, images: &HostImages, index: View<Vec<u32>>, mut out: ViewMut<Vec<f32>>) {
        let image_len = SIDE * SIDE * CHANNELS;
        let out = &mut window_mut(&mut out)[..index.range.len() * MOMENTS];
        out.par_chunks_mut(MOMENTS).zip(window(&index).par_iter()).for_each(|(acc, &i)| {
            let img = &images.pixels[i as usize * image_len..(i as usize + 1) * image_len];
            let mut sums = [0i32; MOMENTS];
            for y in 0..SIDE - 1 {
                for x in 0..SIDE - 1 {
                    // PyTorch's (c, ky, kx) order, centred
                    let q: [i32; PATCH] =
                        std::array::from_fn(|j| img[((y + j / 2 % 2) * SIDE + x + j % 2) * CHANNELS + j / 4] as i32 - 128);
                    for (j, &qj) in q.iter().enumerate() {
                        sums[PATCH * PATCH + j] += qj;
                        for (k, &qk) in q.iter().enumerate() {
                            sums[j * PATCH + k] += qj * qk;
                        }
                    }
                }
            }
            acc.iter_mut().zip(sums).for_each(|(a, s)| *a = s as f32);
        });
    }

    fn conv_forward(&self, s: ConvShape, x: &Vec<f32>, w: View<Vec<f32>>, y: &mut Vec<f32>) {
        conv::forward(&s, x, &self.conv_weights(&w), y);
        self.store(&mut y[..conv_out_len(&s)]);
    }

    fn conv_forward_inference(&self, s: ConvShape, x: &Vec<f32>, w: View<Vec<f32>>, y: &mut Vec<f32>) {
        conv::forward_inference(&s, x, &self.conv_weights(&w), y);
        self.store(&mut y[..conv_out_len(&s)]);
    }

    fn conv_backward_data(&self, s: ConvShape, dy: &Vec<f32>, w: View<Vec<f32>>, dx: &mut Vec<f32>) {
        conv::backward_data(&s, dy, &self.conv_weights(&w), dx);
        self.store(&mut dx[..s.n * s.h * s.w * s.c_in]);
    }

    fn conv_backward_filter(&self, s: ConvShape, x: &Vec<f32>, dy: &Vec<f32>, mut dw: ViewMut<Vec<f32>>) {
        conv::backward_filter(&s, x, dy, window_mut(&mut dw));
    }

    fn bias_gelu_forward(&self, pixels: usize, c: usize, z: &mut Vec<f32>, bias: View<Vec<f32>>, a: &mut Vec<f32>) {
        norm::bias_gelu_forward(pixels, c, z, window(&bias), a);
        self.store(&mut z[..pixels * c]);
        self.store(&mut a[..pixels * c]);
    }

    fn bias_gelu_backward(&self, pixels: usize, c: usize, z: &Vec<f32>, da: &Vec<f32>, mut dbias: ViewMut<Vec<f32>>) {
        norm::bias_gelu_backward(pixels, c, z, da, window_mut(&mut dbias));
    }

    fn pool_bn_act_forward(
        &self,
        s: PoolBnShape,
        mode: BnMode,
        y: &Vec<f32>,
        beta: View<Vec<f32>>,
        mut running: ViewMut<Vec<f32>>,
        z: &mut Vec<f32>,
        a: &mut Vec<f32>,
        saved: &mut Vec<f32>,
    ) {
        norm::pool_bn_act_forward(&s, mode, y, window(&beta), window_mut(&mut running), z, a, saved);
        self.store(&mut z[..pooled_len(&s)]);
        self.store(&mut a[..pooled_len(&s)]);
    }

    fn pool_bn_act_backward(
        &self,
        s: PoolBnShape,
        y: &Vec<f32>,
        z: &Vec<f32>,
        saved: &Vec<f32>,
        beta: View<Vec<f32>>,
        da: &mut Vec<f32>,
        dy: &mut Vec<f32>,
        mut dbeta: ViewMut<Vec<f32>>,
    ) {
        norm::pool_bn_act_backward(&s, y, z, saved, window(&beta), da, dy, window_mut(&mut dbeta));
        self.store(&mut dy[..s.n * s.h * s.w * s.c]);
    }

    // Max-pooling only moves values (and zeros): stored values stay f16-exact, no rounding.
    fn max_pool_forward(&self, s: PoolBnShape, x: &Vec<f32>, y: &mut Vec<f32>) {
        norm::max_pool(&s, x, y);
    }

    fn max_pool_backward(&self, s: PoolBnShape, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        norm::max_pool_backward(&s, x, dy, dx);
    }

    fn linear_forward(&self, n: usize, c_in: usize, c_out: usize, scale: f32, x: &Vec<f32>, w: View<Vec<f32>>, y: &mut Vec<f32>) {
        let w = window(&w);
        for (x, y) in x.chunks_exact(c_in).zip(y.chunks_exact_mut(c_out)).take(n) {
            for (y, w) in y.iter_mut().zip(w.chunks_exact(c_in)) {
                *y = scale * x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>();
            }
        }
    }

    fn linear_backward(
        &self,
        n: usize,
        c_in: usize,
        c_out: usize,
        scale: f32,
        x: &Vec<f32>,
        w: View<Vec<f32>>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        mut dw: ViewMut<Vec<f32>>,
    ) {
        let w = window(&w);
        for (dx, dy) in dx.chunks_exact_mut(c_in).zip(dy.chunks_exact(c_out)).take(n) {
            dx.fill(0.0);
            for (&g, w) in dy.iter().zip(w.chunks_exact(c_in)) {
                dx.iter_mut().zip(w).for_each(|(d, w)| *d += scale * g * w);
            }
        }
        self.store(&mut dx[..n * c_in]);
        let dw = window_mut(&mut dw);
        for (o, dw) in dw.chunks_exact_mut(c_in).enumerate() {
            for (i, d) in dw.iter_mut().enumerate() {
                *d = scale * (0..n).map(|b| dy[b * c_out + o] * x[b * c_in + i]).sum::<f32>();
            }
        }
    }

    fn cross_entropy(
        &self,
        n: usize,
        smoothing: f32,
        logits: &Vec<f32>,
        labels: &Vec<u32>,
        mut dlogits: Option<&mut Vec<f32>>,
        stats: &mut Vec<f32>,
    ) {
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for (b, l) in logits.chunks_exact(CLASSES).take(n).enumerate() {
            let label = labels[b] as usize;
            let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let argmax = l.iter().position(|&v| v == max).unwrap_or(0);
            let sum: f32 = l.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            let target = |j: usize| smoothing / CLASSES as f32 + if j == label { 1.0 - smoothing } else { 0.0 };
            loss += (0..CLASSES).map(|j| (target(j) * (lse - l[j])) as f64).sum::<f64>();
            correct += (argmax == label) as usize;
            if let Some(d) = dlogits.as_deref_mut() {
                for j in 0..CLASSES {
                    d[b * CLASSES + j] = (l[j] - lse).exp() - target(j);
                }
            }
        }
        stats[0] += loss as f32;
        stats[1] += correct as f32;
    }

    fn axpby(&self, alpha: f32, x: View<Vec<f32>>, beta: f32, mut y: ViewMut<Vec<f32>>) {
        window_mut(&mut y).iter_mut().zip(window(&x)).for_each(|(y, x)| *y = alpha * x + beta * *y);
    }

    fn sgd_step(&self, mut p: ViewMut<Vec<f32>>, g: View<Vec<f32>>, mut m: ViewMut<Vec<f32>>, lr: f32, wd: f32, momentum: f32) {
        for ((p, &g), m) in window_mut(&mut p).iter_mut().zip(window(&g)).zip(window_mut(&mut m)) {
            let g = g + wd * *p;
            *m = momentum * *m + g;
            *p -= lr * (g + momentum * *m);
        }
    }

    fn lookahead(&self, decay: f32, mut ema: ViewMut<Vec<f32>>, mut net: ViewMut<Vec<f32>>) {
        for (e, n) in window_mut(&mut ema).iter_mut().zip(window_mut(&mut net)) {
            *e += (1.0 - decay) * (*n - *e);
            *n = *e;
        }
    }

    fn nesterov(&self, momentum: f32, g: View<Vec<f32>>, mut m: ViewMut<Vec<f32>>, mut out: ViewMut<Vec<f32>>) {
        for ((&g, m), o) in window(&g).iter().zip(window_mut(&mut m)).zip(window_mut(&mut out)) {
            *m = momentum * *m + g;
            *o = g + momentum * *m;
        }
    }

    fn scale_to_norm(&self, target: f32, eps: f32, mut x: ViewMut<Vec<f32>>) {
        let x = window_mut(&mut x);
        let groups = fixed_groups(x.len());
        let partials: Vec<f64> = groups.into_par_iter().map(|r| x[r].iter().map(|&v| v as f64 * v as f64).sum::<f64>()).collect();
        let norm = partials.iter().sum::<f64>().sqrt();
        let scale = (target as f64 / (norm + eps as f64)) as f32;
        x.par_iter_mut().for_each(|v| *v *= scale);
    }

    fn matmul(
        &self,
        (m, k, n): (usize, usize, usize),
        alpha: f32,
        a: View<Vec<f32>>,
        b: View<Vec<f32>>,
        b_transposed: bool,
        beta: f32,
        mut c: ViewMut<Vec<f32>>,
    ) {
        // b (k, n) has strides (n, 1); stored (n, k) and transposed, (1, k).
        let b_strides = if b_transposed { (1, k) } else { (n, 1) };
        gemm::sgemm(m, k, n, alpha, window(&a), (k, 1), window(&b), b_strides, beta, window_mut(&mut c));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::backend::Act;
    use crate::rng::Rng;
    use std::sync::atomic::Ordering;

    /// `widest!`'s two copies of each op give the same bits (the claim that lets the AVX-512
    /// copies run where the CPU has them): Winograd's transforms through the 3×3 convolutions'
    /// inference forward and filter gradient, pool+BatchNorm+activation forward and backward
    /// (pooled and not, GELU and SiLU), bias+GELU, on random data with channel counts that
    /// leave partial blocks of 16 and of 8 lanes.
    #[test]
    fn widest_copies_agree() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("widest_copies_agree: SKIPPED (no AVX-512 on this CPU: one copy runs)");
            return;
        }
        let outputs = || {
            let mut rng = Rng::new(3);
            let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.symmetric(2.0)).collect() };
            let mut out = Vec::new();
            let s = ConvShape { n: 3, h: 9, w: 9, c_in: 27, c_out: 21, k: 3, pad: 1 };
            let (x, w, dy) = (random(3 * 81 * 27), random(21 * 9 * 27), random(3 * 81 * 21));
            let (mut y, mut dw) = (vec![0.0; 3 * 81 * 21], vec![0.0; 21 * 9 * 27]);
            conv::forward_inference(&s, &x, &w, &mut y);
            conv::backward_filter(&s, &x, &dy, &mut dw);
            out.extend([y, dw]);
            for (pool, act) in [(2, Act::Gelu), (1, Act::Silu)] {
                let p = PoolBnShape { n: 3, h: 9, w: 9, c: 27, pool, act };
                let rows = 3 * p.out_h() * p.out_w();
                let (y, beta, mut running) = (random(3 * 81 * 27), random(27), random(54));
                running[27..].iter_mut().for_each(|v| *v = v.abs() + 0.5); // variances
                let (mut z, mut a, mut saved) = (vec![0.0; rows * 27], vec![0.0; rows * 27], vec![0.0; 54]);
                let mode = BnMode::Train { momentum: 0.6, eps: 1e-5 };
                norm::pool_bn_act_forward(&p, mode, &y, &beta, &mut running, &mut z, &mut a, &mut saved);
                let (mut da, mut dy, mut dbeta) = (random(rows * 27), vec![0.0; 3 * 81 * 27], vec![0.0; 27]);
                norm::pool_bn_act_backward(&p, &y, &z, &saved, &beta, &mut da, &mut dy, &mut dbeta);
                let (mut z_eval, mut a_eval) = (vec![0.0; rows * 27], vec![0.0; rows * 27]);
                norm::pool_bn_act_forward(&p, BnMode::Eval { eps: 1e-5 }, &y, &beta, &mut running, &mut z_eval, &mut a_eval, &mut saved);
                out.extend([z, a, running, dy, dbeta, a_eval]);
            }
            let (mut z, bias, da) = (random(50 * 27), random(27), random(50 * 27));
            let (mut a, mut dbias) = (vec![0.0; 50 * 27], vec![0.0; 27]);
            norm::bias_gelu_forward(50, 27, &mut z, &bias, &mut a);
            norm::bias_gelu_backward(50, 27, &z, &da, &mut dbias);
            out.extend([a, dbias]);
            out
        };
        let wide = outputs();
        PORTABLE_ONLY.store(true, Ordering::Relaxed);
        let narrow = outputs();
        PORTABLE_ONLY.store(false, Ordering::Relaxed);
        for (i, (w, n)) in wide.iter().zip(&narrow).enumerate() {
            let differ = w.iter().zip(n).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "output {i}: {differ} of {} values differ between the AVX-512 and AVX2 copies", w.len());
        }
    }
}
