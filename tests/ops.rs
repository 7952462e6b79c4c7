//! Every backend op against independent float64 loops written here, and every backward op
//! against central finite differences of its forward. Each test body is generic over
//! `Backend` and instantiated per backend by `backend_tests!` (CPU; wgpu, skipped with a
//! message when no adapter exists; CUDA with the `cuda` feature, skipped without a driver).
//! `half_storage` checks half precision (the CPU's emulation, wgpu's f16 storage) against the
//! f32 CPU backend.

mod common;

use speedrun::backend::cpu::Cpu;
use speedrun::backend::{all, all_mut, block_on, reflect, Act, Backend, BnMode, ConvShape, Crop, PoolBnShape, Precision, View, ViewMut};
use speedrun::rng::Rng;

fn upload<B: Backend>(b: &B, v: &[f32]) -> B::Tensor {
    let mut t = b.zeros(v.len());
    b.upload(all_mut(&mut t, v.len()), v);
    t
}

fn read<B: Backend>(b: &B, t: &B::Tensor, len: usize) -> Vec<f32> {
    block_on(b.read(all(t, len)))
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| r.symmetric(1.0)).collect()
}

/// Distinct values spaced ≥ 0.05 apart (no max-pool ties, even after ±1e-3 nudges).
fn distinct(len: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).permutation(len).iter().map(|&p| p as f32 * 0.05 - len as f32 * 0.025).collect()
}

/// Every value within `tol` of the largest magnitude in `want`; reports the largest error.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (scale {scale})");
    }
    let worst = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs() / scale).fold(0.0, f64::max);
    report(what, worst, "of the largest value", tol);
}

/// One line per comparison, seen with `--nocapture`: the per-op reports from GPU machines.
fn report(what: &str, worst: f64, relative_to: &str, tol: f64) {
    println!("{what}: largest error {worst:.1e} {relative_to} (tolerance {tol:.0e})");
}

/// Central finite difference of `loss` along coordinate `i` of `x`.
fn numeric_grad(x: &mut [f32], i: usize, h: f32, mut loss: impl FnMut(&[f32]) -> f64) -> f64 {
    let keep = x[i];
    x[i] = keep + h;
    let up = loss(x);
    x[i] = keep - h;
    let down = loss(x);
    x[i] = keep;
    (up - down) / (2.0 * h as f64)
}

/// Checks `analytic` against finite differences of `loss` at every 7th coordinate;
/// reports the largest error.
fn check_grad(what: &str, x: &mut [f32], analytic: &[f32], h: f32, loss: impl FnMut(&[f32]) -> f64 + Copy) {
    let scale = analytic.iter().fold(1e-3f32, |m, v| m.max(v.abs())) as f64;
    let mut worst = 0.0f64;
    for i in (0..x.len()).step_by(7) {
        let numeric = numeric_grad(x, i, h, loss);
        assert!((numeric - analytic[i] as f64).abs() <= 2e-3 * scale, "{what}[{i}]: analytic {}, numeric {numeric}", analytic[i]);
        worst = worst.max((numeric - analytic[i] as f64).abs() / scale);
    }
    report(what, worst, "of the largest gradient, against central differences", 2e-3);
}

fn dot(a: &[f32], r: &[f32]) -> f64 {
    a.iter().zip(r).map(|(a, r)| *a as f64 * *r as f64).sum()
}

const SHAPES: [ConvShape; 2] =
    [ConvShape { n: 2, h: 5, w: 6, c_in: 3, c_out: 4, k: 3, pad: 1 }, ConvShape { n: 3, h: 4, w: 4, c_in: 3, c_out: 5, k: 2, pad: 0 }];

/// Direct float64 convolution, NHWC / OHWI.
fn conv_ref(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f64> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let mut y = vec![0.0; s.n * oh * ow * s.c_out];
    for (b, oy, ox, o) in
        (0..s.n).flat_map(|b| (0..oh).flat_map(move |oy| (0..ow).flat_map(move |ox| (0..s.c_out).map(move |o| (b, oy, ox, o)))))
    {
        for (ky, kx, i) in (0..s.k).flat_map(|ky| (0..s.k).flat_map(move |kx| (0..s.c_in).map(move |i| (ky, kx, i)))) {
            let (iy, ix) = ((oy + ky) as isize - s.pad as isize, (ox + kx) as isize - s.pad as isize);
            if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                let xv = x[((b * s.h + iy as usize) * s.w + ix as usize) * s.c_in + i] as f64;
                y[((b * oh + oy) * ow + ox) * s.c_out + o] += xv * w[((o * s.k + ky) * s.k + kx) * s.c_in + i] as f64;
            }
        }
    }
    y
}

fn w_len(s: &ConvShape) -> usize {
    s.c_out * s.k * s.k * s.c_in
}

pub fn conv_forward<B: Backend>(b: &B) {
    for s in SHAPES {
        let (x, w) = (random(s.n * s.h * s.w * s.c_in, 1), random(w_len(&s), 2));
        let mut y = b.zeros(s.n * s.out_h() * s.out_w() * s.c_out);
        b.conv_forward(s, &upload(b, &x), all(&upload(b, &w), w.len()), &mut y);
        assert_close("conv_forward", &read(b, &y, y_len(&s)), &conv_ref(&s, &x, &w), 1e-5);
        b.conv_forward_inference(s, &upload(b, &x), all(&upload(b, &w), w.len()), &mut y);
        assert_close("conv_forward_inference", &read(b, &y, y_len(&s)), &conv_ref(&s, &x, &w), 1e-5);
    }
}

fn y_len(s: &ConvShape) -> usize {
    s.n * s.out_h() * s.out_w() * s.c_out
}

pub fn conv_backward<B: Backend>(b: &B) {
    for s in SHAPES.into_iter().filter(|s| s.pad == 1) {
        let (mut x, mut w, r) = (random(s.n * s.h * s.w * s.c_in, 3), random(w_len(&s), 4), random(y_len(&s), 5));
        let loss = |x: &[f32], w: &[f32]| conv_ref(&s, x, w).iter().zip(&r).map(|(y, r)| y * *r as f64).sum::<f64>();
        let (tx, tw, tr) = (upload(b, &x), upload(b, &w), upload(b, &r));
        let (mut dx, mut dw) = (b.zeros(x.len()), b.zeros(w.len()));
        b.conv_backward_data(s, &tr, all(&tw, w.len()), &mut dx);
        b.conv_backward_filter(s, &tx, &tr, all_mut(&mut dw, w.len()));
        let (dx, dw) = (read(b, &dx, x.len()), read(b, &dw, w.len()));
        // The loss is bilinear, so differences with h = 1 are exact up to rounding.
        let wc = w.clone();
        check_grad("conv dx", &mut x, &dx, 1.0, |x| loss(x, &wc));
        let xc = x.clone();
        check_grad("conv dw", &mut w, &dw, 1.0, |w| loss(&xc, w));
    }
}

/// dx and dW of `Σ r·conv(x, w)` in float64, by direct loops.
fn conv_ref_backward(s: &ConvShape, x: &[f32], w: &[f32], r: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (oh, ow) = (s.out_h(), s.out_w());
    let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
    for (b, oy, ox, o) in
        (0..s.n).flat_map(|b| (0..oh).flat_map(move |oy| (0..ow).flat_map(move |ox| (0..s.c_out).map(move |o| (b, oy, ox, o)))))
    {
        let g = r[((b * oh + oy) * ow + ox) * s.c_out + o] as f64;
        for (ky, kx, i) in (0..s.k).flat_map(|ky| (0..s.k).flat_map(move |kx| (0..s.c_in).map(move |i| (ky, kx, i)))) {
            let (iy, ix) = ((oy + ky) as isize - s.pad as isize, (ox + kx) as isize - s.pad as isize);
            if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                let xi = ((b * s.h + iy as usize) * s.w + ix as usize) * s.c_in + i;
                let wi = ((o * s.k + ky) * s.k + kx) * s.c_in + i;
                dx[xi] += g * w[wi] as f64;
                dw[wi] += g * x[xi] as f64;
            }
        }
    }
    (dx, dw)
}

/// A conv spanning several output tiles, reduction slices and weight-gradient splits.
pub fn conv_large<B: Backend>(b: &B) {
    check_conv(b, ConvShape { n: 3, h: 9, w: 9, c_in: 20, c_out: 70, k: 3, pad: 1 });
}

/// A conv as deep as the network's widest (256 input channels, 2,304 products per output):
/// rounding grows with the reduction length, so the small shapes alone would not show it.
pub fn conv_deep<B: Backend>(b: &B) {
    check_conv(b, ConvShape { n: 2, h: 7, w: 7, c_in: 256, c_out: 24, k: 3, pad: 1 });
}

/// Forward, dx and dW of one conv against the float64 loops.
fn check_conv<B: Backend>(b: &B, s: ConvShape) {
    let (x, w, r) = (random(s.n * s.h * s.w * s.c_in, 21), random(w_len(&s), 22), random(y_len(&s), 23));
    let (tx, tw, tr) = (upload(b, &x), upload(b, &w), upload(b, &r));
    let mut y = b.zeros(y_len(&s));
    b.conv_forward(s, &tx, all(&tw, w.len()), &mut y);
    let name = format!("conv {}→{} {}²", s.c_in, s.c_out, s.h);
    assert_close(&format!("{name} forward"), &read(b, &y, y_len(&s)), &conv_ref(&s, &x, &w), 1e-5);
    b.conv_forward_inference(s, &tx, all(&tw, w.len()), &mut y);
    assert_close(&format!("{name} inference forward"), &read(b, &y, y_len(&s)), &conv_ref(&s, &x, &w), 1e-5);
    let (mut dx, mut dw) = (b.zeros(x.len()), b.zeros(w.len()));
    b.conv_backward_data(s, &tr, all(&tw, w.len()), &mut dx);
    b.conv_backward_filter(s, &tx, &tr, all_mut(&mut dw, w.len()));
    let (want_dx, want_dw) = conv_ref_backward(&s, &x, &w, &r);
    assert_close(&format!("{name} dx"), &read(b, &dx, x.len()), &want_dx, 1e-5);
    assert_close(&format!("{name} dw"), &read(b, &dw, w.len()), &want_dw, 1e-5);
}

pub fn bias_gelu<B: Backend>(b: &B) {
    let (pixels, c) = (10, 4);
    let (z0, bias, r) = (random(pixels * c, 6), random(c, 7), random(pixels * c, 8));
    let forward = |z0: &[f32], bias: &[f32]| -> (Vec<f32>, Vec<f32>) {
        let (mut z, mut a) = (upload(b, z0), b.zeros(z0.len()));
        b.bias_gelu_forward(pixels, c, &mut z, all(&upload(b, bias), c), &mut a);
        (read(b, &z, z0.len()), read(b, &a, z0.len()))
    };
    let (z, a) = forward(&z0, &bias);
    let gelu = |v: f64| 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2));
    let want: Vec<f64> = z0.iter().enumerate().map(|(i, &v)| gelu(v as f64 + bias[i % c] as f64)).collect();
    assert_close("gelu(z + bias)", &a, &want, 1e-6);
    let mut dbias = b.zeros(c);
    b.bias_gelu_backward(pixels, c, &upload(b, &z), &upload(b, &r), all_mut(&mut dbias, c));
    let mut bias = bias.clone();
    check_grad("dbias", &mut bias, &read(b, &dbias, c), 1e-2, |bias| dot(&forward(&z0, bias).1, &r));
}

/// The activation and its derivative in float64.
fn act_ref(act: Act, z: f64) -> (f64, f64) {
    match act {
        Act::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(z / std::f64::consts::SQRT_2));
            (z * cdf, cdf + z * (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt())
        }
        Act::Silu => {
            let sigmoid = 1.0 / (1.0 + (-z).exp());
            (z * sigmoid, sigmoid * (1.0 + z * (1.0 - sigmoid)))
        }
    }
}

/// Pool → BN (batch statistics) → `s.act` in float64: returns (a, dy, dβ) for the upstream
/// gradient `r`, and the running (mean, var) after a momentum-0.6 update from (0, 1).
fn pool_bn_act_ref(s: &PoolBnShape, y: &[f32], beta: &[f32], r: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (c, p) = (s.c, s.pool);
    let rows = s.n * s.out_h() * s.out_w();
    let window = |row: usize, k: usize| {
        let (bi, oy, ox) = (row / (s.out_h() * s.out_w()), row / s.out_w() % s.out_h(), row % s.out_w());
        (bi * s.h + oy * p + k / p) * s.w + ox * p + k % p
    };
    let (mut a, mut dy, mut dbeta, mut running) = (vec![0.0; rows * c], vec![0.0; y.len()], vec![0.0; c], vec![0.0; 2 * c]);
    for ch in 0..c {
        // First maximum of each window, as PyTorch.
        let arg: Vec<usize> = (0..rows)
            .map(|row| (0..p * p).fold(0, |best, k| if y[window(row, k) * c + ch] > y[window(row, best) * c + ch] { k } else { best }))
            .collect();
        let v: Vec<f64> = (0..rows).map(|row| y[window(row, arg[row]) * c + ch] as f64).collect();
        let mean = v.iter().sum::<f64>() / rows as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / rows as f64;
        let istd = 1.0 / (var + 1e-12).sqrt();
        running[ch] = 0.4 * mean;
        running[c + ch] = 0.6 + 0.4 * var * rows as f64 / (rows - 1) as f64;
        let xhat: Vec<f64> = v.iter().map(|x| (x - mean) * istd).collect();
        let dz: Vec<f64> = (0..rows)
            .map(|row| {
                let (value, slope) = act_ref(s.act, xhat[row] + beta[ch] as f64);
                a[row * c + ch] = value;
                r[row * c + ch] as f64 * slope
            })
            .collect();
        dbeta[ch] = dz.iter().sum();
        let (mean_dz, mean_dzx) = (dbeta[ch] / rows as f64, dz.iter().zip(&xhat).map(|(d, x)| d * x).sum::<f64>() / rows as f64);
        for row in 0..rows {
            dy[window(row, arg[row]) * c + ch] = istd * (dz[row] - mean_dz - xhat[row] * mean_dzx);
        }
    }
    (a, dy, dbeta, running)
}

pub fn pool_bn_act<B: Backend>(b: &B) {
    // Small shapes also against finite differences; the large one spans several row chunks
    // and channel groups of the two-stage reductions.
    let shapes = [
        (PoolBnShape { n: 3, h: 4, w: 5, c: 3, pool: 1, act: Act::Gelu }, true),
        (PoolBnShape { n: 3, h: 4, w: 5, c: 3, pool: 2, act: Act::Gelu }, true),
        (PoolBnShape { n: 8, h: 17, w: 16, c: 70, pool: 2, act: Act::Gelu }, false),
    ];
    let silu = shapes.map(|(s, fd)| (PoolBnShape { act: Act::Silu, ..s }, fd));
    for (s, finite_differences) in shapes.into_iter().chain(silu) {
        let shape = format!("({}, {}, {}, {}) pool {} {:?}", s.n, s.h, s.w, s.c, s.pool, s.act);
        let out = s.n * s.out_h() * s.out_w() * s.c;
        let (mut y, mut beta, r) = (distinct(s.n * s.h * s.w * s.c, 9), random(s.c, 10), random(out, 11));
        let mode = BnMode::Train { momentum: 0.6, eps: 1e-12 };
        let forward = |y: &[f32], beta: &[f32]| {
            let mut running = upload(b, &[vec![0.0; s.c], vec![1.0; s.c]].concat());
            let (mut z, mut a, mut saved) = (b.zeros(out), b.zeros(out), b.zeros(2 * s.c));
            b.pool_bn_act_forward(
                s,
                mode,
                &upload(b, y),
                all(&upload(b, beta), s.c),
                all_mut(&mut running, 2 * s.c),
                &mut z,
                &mut a,
                &mut saved,
            );
            (z, a, saved, read(b, &running, 2 * s.c))
        };
        let (z, a, saved, running) = forward(&y, &beta);
        let (want_a, want_dy, want_dbeta, want_running) = pool_bn_act_ref(&s, &y, &beta, &r);
        assert_close(&format!("{shape} bn act"), &read(b, &a, out), &want_a, 1e-5);
        assert_close(&format!("{shape} running stats (unbiased var)"), &running, &want_running, 1e-5);
        // dy starts with stale values: the op must write every position, pooled away or not.
        let (mut dy, mut dbeta) = (upload(b, &vec![7.0; y.len()]), b.zeros(s.c));
        let mut da = upload(b, &r);
        b.pool_bn_act_backward(s, &upload(b, &y), &z, &saved, all(&upload(b, &beta), s.c), &mut da, &mut dy, all_mut(&mut dbeta, s.c));
        let (dy, dbeta) = (read(b, &dy, y.len()), read(b, &dbeta, s.c));
        assert_close(&format!("{shape} dy"), &dy, &want_dy, 1e-4);
        assert_close(&format!("{shape} dbeta"), &dbeta, &want_dbeta, 1e-4);
        if finite_differences {
            let loss = |y: &[f32], beta: &[f32]| dot(&read(b, &forward(y, beta).1, out), &r);
            let bc = beta.clone();
            check_grad(&format!("{shape} dy"), &mut y, &dy, 1e-2, |y| loss(y, &bc));
            let yc = y.clone();
            check_grad(&format!("{shape} dbeta"), &mut beta, &dbeta, 1e-2, |beta| loss(&yc, beta));
        }
    }
}

pub fn max_pool<B: Backend>(b: &B) {
    let s = PoolBnShape { n: 2, h: 7, w: 7, c: 3, pool: 3, act: Act::Gelu }; // floor: 7 → 2
    let out = s.n * 2 * 2 * s.c;
    let (mut x, r) = (distinct(s.n * 49 * s.c, 12), random(out, 13));
    let forward = |x: &[f32]| {
        let mut y = b.zeros(out);
        b.max_pool_forward(s, &upload(b, x), &mut y);
        read(b, &y, out)
    };
    let mut dx = upload(b, &vec![7.0; x.len()]); // stale values, all to be overwritten
    b.max_pool_backward(s, &upload(b, &x), &upload(b, &r), &mut dx);
    let dx = read(b, &dx, x.len());
    check_grad("max_pool dx", &mut x, &dx, 1e-2, |x| dot(&forward(x), &r));
    // The last row and column of each image fall outside every window (floor mode).
    assert!(dx.iter().enumerate().filter(|(i, _)| i / 3 % 7 == 6 || i / 21 % 7 == 6).all(|(_, &g)| g == 0.0));
}

pub fn linear_and_loss<B: Backend>(b: &B) {
    let (n, c_in, scale) = (4, 6, 1.0 / 9.0);
    let (mut x, mut w) = (random(n * c_in, 14), random(10 * c_in, 15));
    let labels = [3u32, 0, 9, 3];
    let mut tl = b.index_zeros(n);
    b.upload_index(all_mut(&mut tl, n), &labels);
    let loss = |x: &[f32], w: &[f32]| {
        let mut y = b.zeros(n * 10);
        b.linear_forward(n, c_in, 10, scale, &upload(b, x), all(&upload(b, w), w.len()), &mut y);
        let mut stats = b.zeros(2);
        b.cross_entropy(n, 0.2, &y, &tl, None, &mut stats);
        (y, read(b, &stats, 2))
    };
    let (logits, stats) = loss(&x, &w);
    let logits = read(b, &logits, n * 10);
    // Summed label-smoothed cross-entropy in float64: target 0.8·onehot + 0.02.
    let mut want = 0.0;
    for (row, &label) in logits.chunks_exact(10).zip(&labels) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        want += (0..10).map(|j| (0.02 + if j == label as usize { 0.8 } else { 0.0 }) * (lse - row[j] as f64)).sum::<f64>();
    }
    assert_close("linear+loss loss", &stats[..1], &[want], 1e-5);
    let correct = logits.chunks_exact(10).zip(&labels).filter(|(r, &l)| speedrun::run::argmax(r) == l as usize).count();
    assert_eq!(stats[1] as usize, correct);
    let mut dlogits = b.zeros(n * 10);
    b.cross_entropy(n, 0.2, &upload(b, &logits), &tl, Some(&mut dlogits), &mut b.zeros(2));
    let (mut dx, mut dw) = (b.zeros(x.len()), b.zeros(w.len()));
    b.linear_backward(n, c_in, 10, scale, &upload(b, &x), all(&upload(b, &w), w.len()), &dlogits, &mut dx, all_mut(&mut dw, w.len()));
    let (dx, dw) = (read(b, &dx, x.len()), read(b, &dw, w.len()));
    let wc = w.clone();
    check_grad("linear+loss dx", &mut x, &dx, 1e-2, |x| loss(x, &wc).1[0] as f64);
    let xc = x.clone();
    check_grad("linear+loss dw", &mut w, &dw, 1e-2, |w| loss(&xc, w).1[0] as f64);
}

/// The loss over more rows than one workgroup reduces, against float64.
pub fn loss_many_rows<B: Backend>(b: &B) {
    let n = 700;
    let logits = random(n * 10, 24).iter().map(|v| 4.0 * v).collect::<Vec<_>>();
    let labels: Vec<u32> = (0..n as u32).map(|i| i * 7 % 10).collect();
    let mut tl = b.index_zeros(n);
    b.upload_index(all_mut(&mut tl, n), &labels);
    let (mut dlogits, mut stats) = (b.zeros(n * 10), upload(b, &[1.0, 2.0]));
    b.cross_entropy(n, 0.2, &upload(b, &logits), &tl, Some(&mut dlogits), &mut stats);
    let (mut loss, mut correct, mut grad) = (1.0, 2.0, vec![0.0; n * 10]);
    for (row, (l, &label)) in logits.chunks_exact(10).zip(&labels).enumerate() {
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + l.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        for j in 0..10 {
            let t = 0.02 + if j == label as usize { 0.8 } else { 0.0 };
            loss += t * (lse - l[j] as f64);
            grad[row * 10 + j] = (l[j] as f64 - lse).exp() - t;
        }
        correct += (speedrun::run::argmax(l) == label as usize) as usize as f64;
    }
    assert_close("accumulated loss and correct count", &read(b, &stats, 2), &[loss, correct], 1e-6);
    assert_close("dlogits", &read(b, &dlogits, n * 10), &grad, 1e-6);
}

pub fn load_batch_views<B: Backend>(b: &B) {
    // Three images whose pixels all differ.
    let pixels: Vec<u8> = (0..3 * 3072).map(|i| (i * 7 % 251) as u8).collect();
    let images = b.upload_images(&pixels, &[4, 5, 6]);
    let crops =
        [Crop { dy: 2, dx: -1, flip: true }, Crop { dy: -2, dx: 0, flip: false }, Crop::IDENTITY, Crop { dy: -1, dx: 1, flip: true }];
    let index = [2u32, 0, 1, 2];
    // Per image (brightness, contrast), behind two unused rows: the view's offset counts.
    let jitter = upload(b, &[9.0, 9.0, 9.0, 9.0, 0.1, 1.1, -0.05, 0.9, 0.0, 1.0, 0.13, 1.13]);
    let load_jittered = |index: &[u32], crops: &[Crop], jitter: Option<View<B::Tensor>>| {
        let (mut ti, mut tc) = (b.index_zeros(index.len()), b.index_zeros(index.len()));
        b.upload_index(all_mut(&mut ti, index.len()), index);
        b.upload_index(all_mut(&mut tc, index.len()), &crops.iter().map(|c| c.pack()).collect::<Vec<_>>());
        let (mut x, mut labels) = (b.zeros(index.len() * 3072), b.index_zeros(index.len()));
        b.load_batch(&images, all(&ti, index.len()), all(&tc, index.len()), jitter, &mut x, &mut labels);
        read(b, &x, index.len() * 3072)
    };
    let load = |index: &[u32], crops: &[Crop]| load_jittered(index, crops, None);
    let x = load(&index, &crops);
    let (mean, std) = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]);
    let mut worst = 0.0f64;
    for (k, (&i, crop)) in index.iter().zip(&crops).enumerate() {
        for (y, xx, c) in (0..32).flat_map(|y| (0..32).flat_map(move |xx| (0..3).map(move |c| (y, xx, c)))) {
            let (sy, sx) = (reflect(y as i32 + crop.dy, 32), reflect(xx as i32 + crop.dx, 32));
            let sx = if crop.flip { 31 - sx } else { sx };
            let want = (pixels[i as usize * 3072 + (sy * 32 + sx) * 3 + c] as f64 / 255.0 - mean[c]) / std[c];
            let got = x[k * 3072 + (y * 32 + xx) * 3 + c] as f64;
            assert!((got - want).abs() < 1e-5, "image {k} pixel ({y},{xx},{c}): {got} vs {want}");
            worst = worst.max((got - want).abs());
        }
    }
    report("load_batch pixels", worst, "(absolute)", 1e-5);
    // Colour jitter: every value of image k becomes (x + brightness_k)·contrast_k.
    let jittered = load_jittered(&index, &crops, Some(View { buf: &jitter, range: 4..12 }));
    let j = [(0.1, 1.1), (-0.05, 0.9), (0.0, 1.0), (0.13, 1.13)];
    let want: Vec<f64> = x.iter().enumerate().map(|(i, &v)| (v as f64 + j[i / 3072].0) * j[i / 3072].1).collect();
    assert_close("load_batch colour jitter", &jittered, &want, 1e-6);
    // Mirroring a view equals the mirrored image's view at −dx: what TTA and the
    // alternating flip rely on.
    let mirror = |img: &[f32]| -> Vec<f32> { (0..3072).map(|j| img[(j / 96) * 96 + (31 - j / 3 % 32) * 3 + j % 3]).collect() };
    for &(dy, dx) in &[(1, 1), (-1, -1), (2, -2), (0, 1)] {
        let pair = load(&[1, 1], &[Crop { dy, dx, flip: false }, Crop { dy, dx: -dx, flip: true }]);
        assert_eq!(mirror(&pair[..3072]), pair[3072..].to_vec(), "mirror of shift ({dy},{dx})");
    }
    report("mirrored views", 0.0, "(bit-exact)", 0.0);
}

pub fn patch_moments<B: Backend>(b: &B) {
    let pixels: Vec<u8> = (0..3 * 3072).map(|i| (i * 31 % 256) as u8).collect();
    let images = b.upload_images(&pixels, &[0, 1, 2]);
    let mut index = b.index_zeros(2);
    b.upload_index(all_mut(&mut index, 2), &[2, 0]);
    let mut out = b.zeros(3 * 156);
    b.patch_moments(&images, all(&index, 2), ViewMut { buf: &mut out, range: 156..3 * 156 });
    let got = read(b, &out, 3 * 156);
    assert!(got[..156].iter().all(|&v| v == 0.0), "writes only its window");
    for (k, image) in [2usize, 0].into_iter().enumerate() {
        let mut want = vec![0i64; 156];
        for (y, x) in (0..31).flat_map(|y| (0..31).map(move |x| (y, x))) {
            // (c, ky, kx) order, centred
            let q: Vec<i64> = (0..12).map(|j| pixels[image * 3072 + ((y + j / 2 % 2) * 32 + x + j % 2) * 3 + j / 4] as i64 - 128).collect();
            for i in 0..12 {
                want[144 + i] += q[i];
                (0..12).for_each(|j| want[i * 12 + j] += q[i] * q[j]);
            }
        }
        assert!(want.iter().all(|v| v.abs() < 1 << 24), "exact in f32");
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_eq!(got[156 * (k + 1)..156 * (k + 2)], want[..], "image {image}: exact integer sums");
    }
    report("patch_moments integer sums", 0.0, "(bit-exact)", 0.0);
}

pub fn optimizer_ops<B: Backend>(b: &B) {
    // Three Nesterov SGD steps (PyTorch convention) on two numbers, by hand:
    // g' = g + wd·p; m = 0.85·m + g'; p -= lr·(g' + 0.85·m).
    let (lr, wd, mu) = (0.1f64, 0.5f64, 0.85f64);
    let grads = [[1.0f32, -2.0], [0.5, 0.25], [-1.0, 1.0]];
    let (mut p, mut m) = (upload(b, &[1.0, 2.0]), b.zeros(2));
    let (mut hp, mut hm) = ([1.0f64, 2.0], [0.0f64; 2]);
    for g in grads {
        b.sgd_step(all_mut(&mut p, 2), all(&upload(b, &g), 2), all_mut(&mut m, 2), lr as f32, wd as f32, mu as f32);
        for k in 0..2 {
            let g = g[k] as f64 + wd * hp[k];
            hm[k] = mu * hm[k] + g;
            hp[k] -= lr * (g + mu * hm[k]);
        }
    }
    assert_close("sgd params", &read(b, &p, 2), &hp, 1e-6);
    assert_close("sgd momentum", &read(b, &m, 2), &hm, 1e-6);
    // First step: the momentum buffer equals the gradient (PyTorch's first-step rule).
    let (mut p1, mut m1) = (upload(b, &[3.0]), b.zeros(1));
    b.sgd_step(all_mut(&mut p1, 1), all(&upload(b, &[2.0]), 1), all_mut(&mut m1, 1), 0.1, 0.0, 0.85);
    assert_eq!(read(b, &m1, 1), vec![2.0]);
    assert!((read(b, &p1, 1)[0] - (3.0 - 0.1 * (2.0 + 0.85 * 2.0))).abs() < 1e-6);
    // Lookahead: ema += (1 − d)(net − ema), then net = ema; d = 1 resets net to ema.
    let (mut ema, mut net) = (upload(b, &[1.0, 2.0]), upload(b, &[3.0, -2.0]));
    b.lookahead(0.25, all_mut(&mut ema, 2), all_mut(&mut net, 2));
    assert_eq!((read(b, &ema, 2), read(b, &net, 2)), (vec![2.5, -1.0], vec![2.5, -1.0]));
    let mut net = upload(b, &[7.0, 7.0]);
    b.lookahead(1.0, all_mut(&mut ema, 2), all_mut(&mut net, 2));
    assert_eq!((read(b, &ema, 2), read(b, &net, 2)), (vec![2.5, -1.0], vec![2.5, -1.0]));
    // axpby, fill, copy
    let mut y = upload(b, &[1.0, 1.0, 1.0]);
    b.axpby(0.5, all(&upload(b, &[2.0, 4.0, 6.0]), 3), 1.0, all_mut(&mut y, 3));
    assert_eq!(read(b, &y, 3), vec![2.0, 3.0, 4.0]);
    b.axpby(-1.0, all(&upload(b, &[1.0, 1.0, 1.0]), 3), 0.5, all_mut(&mut y, 3));
    assert_eq!(read(b, &y, 3), vec![0.0, 0.5, 1.0]);
    b.axpby(1.0, all(&upload(b, &[2.0, 3.0, 4.0]), 3), 1.0, all_mut(&mut y, 3));
    b.fill(ViewMut { buf: &mut y, range: 1..3 }, 0.0);
    assert_eq!(read(b, &y, 3), vec![2.0, 0.0, 0.0]);
    b.copy(all(&upload(b, &[9.0]), 1), ViewMut { buf: &mut y, range: 2..3 });
    assert_eq!(read(b, &y, 3), vec![2.0, 0.0, 9.0]);
}

pub fn muon_ops<B: Backend>(b: &B) {
    // Nesterov momentum: m = μm + g; out = g + μm (three steps, by hand), in offset windows.
    let (mu, grads) = (0.6f64, [[1.0f32, -2.0], [0.5, 0.25], [-1.0, 1.0]]);
    let (mut m, mut out) = (b.zeros(3), b.zeros(4));
    let (mut hm, mut hout) = ([0.0f64; 2], [0.0f64; 2]);
    for g in grads {
        let g_buf = upload(b, &[5.0, g[0], g[1]]);
        b.nesterov(
            mu as f32,
            View { buf: &g_buf, range: 1..3 },
            ViewMut { buf: &mut m, range: 1..3 },
            ViewMut { buf: &mut out, range: 2..4 },
        );
        for k in 0..2 {
            hm[k] = mu * hm[k] + g[k] as f64;
            hout[k] = g[k] as f64 + mu * hm[k];
        }
    }
    assert_close("nesterov momentum", &read(b, &m, 3)[1..], &hm, 1e-6);
    assert_close("nesterov output", &read(b, &out, 4)[2..], &hout, 1e-6);
    assert_eq!((read(b, &m, 3)[0], read(b, &out, 4)[..2].to_vec()), (0.0, vec![0.0, 0.0]), "writes only its windows");
    // scale_to_norm over a window long enough for several partial sums on a GPU.
    let x = random(70_001, 30);
    let mut t = upload(b, &[vec![3.0], x.clone(), vec![3.0]].concat());
    b.scale_to_norm(2.5, 0.1, ViewMut { buf: &mut t, range: 1..70_002 });
    let norm = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let want: Vec<f64> = x.iter().map(|&v| v as f64 * 2.5 / (norm + 0.1)).collect();
    let got = read(b, &t, 70_003);
    assert_close("scale_to_norm", &got[1..70_002], &want, 1e-5);
    assert_eq!((got[0], got[70_002]), (3.0, 3.0), "writes only its window");
}

/// `alpha·a·op(b) + beta·c` in float64, row-major.
fn matmul_ref((m, k, n): (usize, usize, usize), alpha: f64, a: &[f32], bm: &[f32], transposed: bool, beta: f64, c: &[f32]) -> Vec<f64> {
    let at = |i: usize, j: usize| if transposed { bm[j * k + i] } else { bm[i * n + j] } as f64;
    (0..m * n).map(|ij| alpha * (0..k).map(|l| a[ij / n * k + l] as f64 * at(l, ij % n)).sum::<f64>() + beta * c[ij] as f64).collect()
}

pub fn matmul<B: Backend>(b: &B) {
    // Shapes around the 64-wide tiles of the GPU kernels, and the Newton–Schulz products.
    for (m, k, n) in [(3, 5, 4), (70, 33, 65), (16, 144, 16), (64, 576, 64), (16, 16, 144)] {
        for transposed in [false, true] {
            let (a, bm, c) = (random(m * k, 31), random(k * n, 32), random(m * n, 33));
            // Offset windows; beta = 0 must ignore the old c, NaN included.
            let (ta, tb) = (upload(b, &[vec![9.0; 3], a.clone()].concat()), upload(b, &[vec![9.0; 5], bm.clone()].concat()));
            for (alpha, beta) in [(1.0, 0.0), (-0.7, 1.3)] {
                let old = if beta == 0.0 { vec![f32::NAN; m * n] } else { c.clone() };
                let mut tc = upload(b, &[vec![4.0; 2], old].concat());
                let (va, vb) = (View { buf: &ta, range: 3..3 + m * k }, View { buf: &tb, range: 5..5 + k * n });
                b.matmul((m, k, n), alpha, va, vb, transposed, beta, ViewMut { buf: &mut tc, range: 2..2 + m * n });
                let got = read(b, &tc, 2 + m * n);
                let want = matmul_ref((m, k, n), alpha as f64, &a, &bm, transposed, beta as f64, &c);
                assert_close(&format!("matmul ({m}, {k}, {n}) transposed {transposed} alpha {alpha} beta {beta}"), &got[2..], &want, 1e-5);
                assert_eq!(got[..2], [4.0, 4.0], "writes only its window");
            }
        }
    }
}

/// The Newton–Schulz iteration of `NewtonSchulz::run` in float64, on `x (rows, cols)`.
fn newton_schulz_ref(x: &[f32], (rows, cols): (usize, usize), [a, bc, c]: [f64; 3], iterations: usize, eps: f64) -> Vec<f64> {
    let norm = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let mut x: Vec<f64> = x.iter().map(|&v| v as f64 / (norm + eps)).collect();
    let mul = |p: &[f64], q: &[f64], (m, k, n): (usize, usize, usize)| -> Vec<f64> {
        (0..m * n).map(|ij| (0..k).map(|l| p[ij / n * k + l] * q[l * n + ij % n]).sum()).collect()
    };
    for _ in 0..iterations {
        let xt: Vec<f64> = (0..cols * rows).map(|ji| x[ji % rows * cols + ji / rows]).collect();
        let xxt = mul(&x, &xt, (rows, cols, rows));
        let xxt2 = mul(&xxt, &xxt, (rows, rows, rows));
        let p: Vec<f64> = xxt.iter().zip(&xxt2).map(|(a1, a2)| bc * a1 + c * a2).collect();
        let px = mul(&p, &x, (rows, rows, cols));
        x = x.iter().zip(&px).map(|(x, px)| a * x + px).collect();
    }
    x
}

/// Singular values of `x (rows, cols)`, rows ≤ cols, from the eigenvalues of x·xᵀ.
fn singular_values(x: &[f64], (rows, cols): (usize, usize)) -> Vec<f64> {
    let gram: Vec<f64> = (0..rows * rows).map(|ij| (0..cols).map(|l| x[ij / rows * cols + l] * x[ij % rows * cols + l]).sum()).collect();
    speedrun::linalg::symmetric_eigen(&gram, rows).0.iter().map(|l| l.max(0.0).sqrt()).collect()
}

pub fn newton_schulz<B: Backend>(b: &B) {
    let hiverge = speedrun::train::Recipe::Hiverge.config().muon.unwrap();
    let muon = speedrun::train::Recipe::Airbench94Muon.config().muon.unwrap();
    for (shape, m) in [((12, 40), &muon), ((24, 216), &hiverge), ((32, 288), &muon)] {
        let (rows, cols) = shape;
        // A gradient-like matrix: three strong directions over noise of comparable size.
        let (u, v, noise) = (random(rows * 3, 40), random(3 * cols, 41), random(rows * cols, 42));
        let g: Vec<f32> = (0..rows * cols)
            .map(|ij| (0..3).map(|r| u[ij / cols * 3 + r] * v[r * cols + ij % cols] * 3f32.powi(r as i32)).sum::<f32>() + noise[ij])
            .collect();
        let mut ns = speedrun::train::NewtonSchulz::new(b, rows, rows * cols);
        b.upload(all_mut(&mut ns.x, g.len()), &g);
        ns.run(b, shape, m.coefficients, m.iterations, m.eps as f32);
        let got = read(b, &ns.x, rows * cols);
        let want = newton_schulz_ref(&g, shape, m.coefficients, m.iterations, m.eps);
        assert_close(&format!("newton_schulz {shape:?}"), &got, &want, 1e-5);
        // The iteration acts on each singular value σ of g/‖g‖ alone, as the scalar quintic
        // p(σ) = aσ + bσ³ + cσ⁵ applied `iterations` times; Muon's coefficients send every σ
        // above ~0.02 into a band around 1 (from 0.70 at σ = 1 to 1.2 near σ = 0.05).
        let [ca, cb, cc] = m.coefficients;
        let quintic = |s: f64| (0..m.iterations).fold(s, |s, _| ca * s + cb * s.powi(3) + cc * s.powi(5));
        let before = singular_values(&g.iter().map(|&v| v as f64).collect::<Vec<_>>(), shape);
        let norm = before.iter().map(|s| s * s).sum::<f64>().sqrt();
        let after = singular_values(&got.iter().map(|&v| v as f64).collect::<Vec<_>>(), shape);
        let mut predicted: Vec<f64> = before.iter().map(|s| quintic(s / norm)).collect();
        predicted.sort_by(|a, b| b.total_cmp(a));
        let worst = after.iter().zip(&predicted).map(|(a, p)| (a - p).abs()).fold(0.0, f64::max);
        report(&format!("newton_schulz {shape:?} singular values vs the scalar quintic"), worst, "(absolute)", 1e-4);
        assert!(worst < 1e-4, "singular values {after:?} differ from the quintic's {predicted:?}");
        for (s, out) in before.iter().zip(&after) {
            if s / norm > 0.02 {
                assert!((0.5..1.25).contains(out), "σ/‖g‖ = {:.3} ended at {out:.3}, outside Muon's band", s / norm);
            }
        }
        println!(
            "newton_schulz {shape:?}: singular values {:.3}..{:.3} after, from {:.4}..{:.4} of ‖g‖",
            after[rows - 1],
            after[0],
            before[rows - 1] / norm,
            before[0] / norm
        );
    }
}

pub fn muon_step<B: Backend>(b: &B) {
    // One hiverge Muon step with renormalisation and decoupled decay, on a (16, 144) filter
    // inside a larger arena, against the same maths in float64.
    let muon = speedrun::train::Recipe::Hiverge.config().muon.unwrap();
    let (rows, cols, at) = (16, 144, 10);
    let (w, g, m) = (random(rows * cols, 50), random(rows * cols, 51), random(rows * cols, 52));
    let (lr, decay) = (0.2f32, 0.99f32);
    let mut ns = speedrun::train::NewtonSchulz::new(b, rows, rows * cols);
    let arena = |v: &[f32]| upload(b, &[vec![1.0; at], v.to_vec(), vec![1.0; 3]].concat());
    let (tg, mut tm, mut tw) = (arena(&g), arena(&m), arena(&w));
    let range = at..at + rows * cols;
    let views = (View { buf: &tg, range: range.clone() }, ViewMut { buf: &mut tm, range: range.clone() });
    speedrun::train::muon_update(
        b,
        &mut ns,
        &muon,
        (rows, cols),
        (lr, decay, true),
        views.0,
        views.1,
        ViewMut { buf: &mut tw, range: range.clone() },
    );
    let mu = muon.momentum;
    let want_m: Vec<f64> = m.iter().zip(&g).map(|(&m, &g)| mu * m as f64 + g as f64).collect();
    let update: Vec<f32> = g.iter().zip(&want_m).map(|(&g, m)| (g as f64 + mu * m) as f32).collect();
    let x = newton_schulz_ref(&update, (rows, cols), muon.coefficients, muon.iterations, muon.eps);
    let w_norm = w.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let want_w: Vec<f64> =
        w.iter().zip(&x).map(|(&w, x)| decay as f64 * (w as f64 * (rows as f64).sqrt() / w_norm - lr as f64 * x)).collect();
    assert_close("muon momentum", &read(b, &tm, at + rows * cols)[range.clone()], &want_m, 1e-6);
    let got = read(b, &tw, at + rows * cols + 3);
    assert_close("muon weights", &got[range], &want_w, 1e-5);
    assert!(got[..at].iter().chain(&got[at + rows * cols..]).all(|&v| v == 1.0), "writes only its window");
}

/// One `#[test]` per op body, per backend: `$make` gives `Option<backend>` (None skips).
macro_rules! backend_tests {
    ($backend:ident, $make:expr, [$($op:ident),*]) => {
        mod $backend {
            $(#[test] fn $op() { if let Some(b) = $make { super::$op(&b); } })*
        }
    };
}

macro_rules! all_ops {
    ($backend:ident, $make:expr) => {
        backend_tests!(
            $backend,
            $make,
            [
                conv_forward,
                conv_backward,
                conv_large,
                conv_deep,
                bias_gelu,
                pool_bn_act,
                max_pool,
                linear_and_loss,
                loss_many_rows,
                load_batch_views,
                patch_moments,
                optimizer_ops,
                muon_ops,
                matmul,
                newton_schulz,
                muon_step
            ]
        );
    };
}

all_ops!(cpu, Some(speedrun::backend::cpu::Cpu::new()));
// Both convolution variants: tiled (GPUs) and direct (CPU-emulated adapters).
#[cfg(feature = "wgpu")]
all_ops!(wgpu_tiled, crate::common::wgpu_device().inspect(|g| g.set_tiled_convolutions(true)));
#[cfg(feature = "wgpu")]
all_ops!(wgpu_direct, crate::common::wgpu_device().inspect(|g| g.set_tiled_convolutions(false)));
// cuDNN with exact f32 math: the tolerances here are for f32 (TF32 is tested by training).
#[cfg(feature = "cuda")]
all_ops!(cuda, crate::common::cuda_device(false));

/// One f16 rounding (to nearest, 11-bit significand): at most 2⁻¹¹ of the value.
const F16_STEP: f64 = 1.0 / 2048.0;

fn f16_exact(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

fn upload_activations<B: Backend>(b: &B, v: &[f32]) -> B::Tensor {
    let mut t = b.activations(v.len());
    b.upload(all_mut(&mut t, v.len()), v);
    t
}

/// `got` from the half-precision backend against `want` from the f32 CPU backend on the same
/// (f16-exact) inputs. An output stored in f16 is rounded once from f32 math, so it must be
/// f16-exact and may differ by the f32 tolerance `tol` plus one f16 step of the largest value;
/// an output kept in f32 by `tol` alone.
fn check_half(what: &str, got: &[f32], want: &[f32], stored_f16: bool, tol: f64) {
    if stored_f16 {
        assert_eq!(got, f16_exact(got), "{what}: stored values are not f16-exact");
    }
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_close(&format!("{what} (half)"), got, &want, tol + if stored_f16 { F16_STEP } else { 0.0 });
}

/// Half precision: every op that reads or stores activations, against the f32 CPU backend
/// (which the tests above hold to float64 and finite differences), on f16-exact inputs.
pub fn half_storage<B: Backend>(b: &B) {
    assert_eq!(b.precision(), Precision::Half);
    let cpu = Cpu::new();
    // Convolutions: narrow (direct kernels) and 32 channels wide (tiled kernels on wgpu).
    let wide = ConvShape { n: 2, h: 8, w: 8, c_in: 24, c_out: 32, k: 3, pad: 1 };
    for s in SHAPES.into_iter().chain([wide]) {
        let name = format!("conv {}→{} {}² k{}", s.c_in, s.c_out, s.h, s.k);
        // f16-exact weights: the f32 CPU multiplies with what the half convolutions' f16 copies hold.
        let (x, w, r) =
            (f16_exact(&random(s.n * s.h * s.w * s.c_in, 31)), f16_exact(&random(w_len(&s), 32)), f16_exact(&random(y_len(&s), 33)));
        let (tx, tw, tr) = (upload_activations(b, &x), upload(b, &w), upload_activations(b, &r));
        let (mut y, mut want) = (b.activations(y_len(&s)), cpu.zeros(y_len(&s)));
        b.conv_forward(s, &tx, all(&tw, w.len()), &mut y);
        cpu.conv_forward(s, &x, all(&w, w.len()), &mut want);
        check_half(&format!("{name} forward"), &read(b, &y, y_len(&s)), &want, true, 1e-5);
        b.conv_forward_inference(s, &tx, all(&tw, w.len()), &mut y);
        check_half(&format!("{name} inference forward"), &read(b, &y, y_len(&s)), &want, true, 1e-5);
        let (mut dx, mut want_dx) = (b.activations(x.len()), cpu.zeros(x.len()));
        let (mut dw, mut want_dw) = (b.zeros(w.len()), cpu.zeros(w.len()));
        b.conv_backward_data(s, &tr, all(&tw, w.len()), &mut dx);
        cpu.conv_backward_data(s, &r, all(&w, w.len()), &mut want_dx);
        b.conv_backward_filter(s, &tx, &tr, all_mut(&mut dw, w.len()));
        cpu.conv_backward_filter(s, &x, &r, all_mut(&mut want_dw, w.len()));
        if s.pad == 1 {
            check_half(&format!("{name} dx"), &read(b, &dx, x.len()), &want_dx, true, 1e-5);
        }
        check_half(&format!("{name} dw"), &read(b, &dw, w.len()), &want_dw, false, 1e-5);
    }
    // Bias + GELU (the whitening layer).
    let (pixels, c) = (10, 4);
    let (z0, bias, da) = (f16_exact(&random(pixels * c, 34)), random(c, 35), f16_exact(&random(pixels * c, 36)));
    let (mut z, mut a, mut want_z, mut want_a) = (upload_activations(b, &z0), b.activations(z0.len()), z0.clone(), cpu.zeros(z0.len()));
    b.bias_gelu_forward(pixels, c, &mut z, all(&upload(b, &bias), c), &mut a);
    cpu.bias_gelu_forward(pixels, c, &mut want_z, all(&bias, c), &mut want_a);
    let z_half = read(b, &z, z0.len());
    check_half("bias + gelu z", &z_half, &want_z, true, 1e-6);
    check_half("bias + gelu a", &read(b, &a, z0.len()), &want_a, true, 1e-6);
    let (mut dbias, mut want_dbias) = (b.zeros(c), cpu.zeros(c));
    b.bias_gelu_backward(pixels, c, &upload_activations(b, &z_half), &upload_activations(b, &da), all_mut(&mut dbias, c));
    cpu.bias_gelu_backward(pixels, c, &z_half, &da, all_mut(&mut want_dbias, c));
    check_half("bias + gelu dbias", &read(b, &dbias, c), &want_dbias, false, 1e-5);
    // Pool → BN → act, forward and backward, over several row chunks and channel groups.
    for act in [Act::Gelu, Act::Silu] {
        let s = PoolBnShape { n: 8, h: 17, w: 16, c: 70, pool: 2, act };
        let out = s.n * s.out_h() * s.out_w() * s.c;
        let (y, beta, r) = (f16_exact(&random(s.n * s.h * s.w * s.c, 37)), random(s.c, 38), f16_exact(&random(out, 39)));
        let mode = BnMode::Train { momentum: 0.6, eps: 1e-12 };
        let fresh_running = [vec![0.0; s.c], vec![1.0; s.c]].concat();
        let (mut running, mut want_running) = (upload(b, &fresh_running), fresh_running.clone());
        let (ty, tbeta) = (upload_activations(b, &y), upload(b, &beta));
        let (mut z, mut a, mut saved) = (b.activations(out), b.activations(out), b.zeros(2 * s.c));
        let (mut want_z, mut want_a, mut want_saved) = (cpu.zeros(out), cpu.zeros(out), cpu.zeros(2 * s.c));
        b.pool_bn_act_forward(s, mode, &ty, all(&tbeta, s.c), all_mut(&mut running, 2 * s.c), &mut z, &mut a, &mut saved);
        let running_view = all_mut(&mut want_running, 2 * s.c);
        cpu.pool_bn_act_forward(s, mode, &y, all(&beta, s.c), running_view, &mut want_z, &mut want_a, &mut want_saved);
        let what = format!("pool bn {act:?}");
        let z_half = read(b, &z, out);
        check_half(&format!("{what} z"), &z_half, &want_z, true, 1e-5);
        check_half(&format!("{what} a"), &read(b, &a, out), &want_a, true, 1e-5);
        check_half(&format!("{what} saved"), &read(b, &saved, 2 * s.c), &want_saved, false, 1e-5);
        check_half(&format!("{what} running"), &read(b, &running, 2 * s.c), &want_running, false, 1e-5);
        // Backward from the same z and statistics on both sides.
        let (mut da, mut dy, mut dbeta) = (upload_activations(b, &r), upload_activations(b, &vec![7.0; y.len()]), b.zeros(s.c));
        let saved_both = upload(b, &want_saved);
        b.pool_bn_act_backward(
            s,
            &ty,
            &upload_activations(b, &z_half),
            &saved_both,
            all(&tbeta, s.c),
            &mut da,
            &mut dy,
            all_mut(&mut dbeta, s.c),
        );
        let (mut want_da, mut want_dy, mut want_dbeta) = (r.clone(), vec![7.0; y.len()], cpu.zeros(s.c));
        cpu.pool_bn_act_backward(s, &y, &z_half, &want_saved, all(&beta, s.c), &mut want_da, &mut want_dy, all_mut(&mut want_dbeta, s.c));
        check_half(&format!("{what} dy"), &read(b, &dy, y.len()), &want_dy, true, 1e-4);
        check_half(&format!("{what} dbeta"), &read(b, &dbeta, s.c), &want_dbeta, false, 1e-4);
    }
    // Max-pool moves values: exact.
    let s = PoolBnShape { n: 2, h: 7, w: 7, c: 3, pool: 3, act: Act::Gelu };
    let (x, r) = (f16_exact(&random(s.n * 49 * s.c, 40)), f16_exact(&random(s.n * 4 * s.c, 41)));
    let (mut y, mut want_y) = (b.activations(r.len()), cpu.zeros(r.len()));
    b.max_pool_forward(s, &upload_activations(b, &x), &mut y);
    cpu.max_pool_forward(s, &x, &mut want_y);
    check_half("max_pool forward", &read(b, &y, r.len()), &want_y, true, 0.0);
    let (mut dx, mut want_dx) = (upload_activations(b, &vec![7.0; x.len()]), vec![7.0; x.len()]);
    b.max_pool_backward(s, &upload_activations(b, &x), &upload_activations(b, &r), &mut dx);
    cpu.max_pool_backward(s, &x, &r, &mut want_dx);
    check_half("max_pool dx", &read(b, &dx, x.len()), &want_dx, true, 0.0);
    // The head: f16 features in, f32 logits out; the feature gradient stored in f16.
    let (n, c_in, scale) = (4, 6, 1.0 / 9.0);
    let (x, w, dlogits) = (f16_exact(&random(n * c_in, 42)), random(10 * c_in, 43), random(n * 10, 44));
    let (tx, tw) = (upload_activations(b, &x), upload(b, &w));
    let (mut logits, mut want_logits) = (b.zeros(n * 10), cpu.zeros(n * 10));
    b.linear_forward(n, c_in, 10, scale, &tx, all(&tw, w.len()), &mut logits);
    cpu.linear_forward(n, c_in, 10, scale, &x, all(&w, w.len()), &mut want_logits);
    check_half("linear logits", &read(b, &logits, n * 10), &want_logits, false, 1e-5);
    let (mut dx, mut dw, mut want_dx, mut want_dw) = (b.activations(x.len()), b.zeros(w.len()), cpu.zeros(x.len()), cpu.zeros(w.len()));
    b.linear_backward(n, c_in, 10, scale, &tx, all(&tw, w.len()), &upload(b, &dlogits), &mut dx, all_mut(&mut dw, w.len()));
    cpu.linear_backward(n, c_in, 10, scale, &x, all(&w, w.len()), &dlogits, &mut want_dx, all_mut(&mut want_dw, w.len()));
    check_half("linear dx", &read(b, &dx, x.len()), &want_dx, true, 1e-5);
    check_half("linear dw", &read(b, &dw, w.len()), &want_dw, false, 1e-5);
    // The input batch, stored in f16.
    let pixels: Vec<u8> = (0..3 * 3072).map(|i| (i * 7 % 251) as u8).collect();
    let index = [2u32, 0, 1];
    let crop = [Crop { dy: 2, dx: -1, flip: true }, Crop::IDENTITY, Crop { dy: -1, dx: 1, flip: false }].map(|c| c.pack());
    let (mut ti, mut tc, mut tl) = (b.index_zeros(3), b.index_zeros(3), b.index_zeros(3));
    b.upload_index(all_mut(&mut ti, 3), &index);
    b.upload_index(all_mut(&mut tc, 3), &crop);
    let mut x = b.activations(3 * 3072);
    b.load_batch(&b.upload_images(&pixels, &[4, 5, 6]), all(&ti, 3), all(&tc, 3), None, &mut x, &mut tl);
    let (mut want_x, mut want_l) = (cpu.zeros(3 * 3072), cpu.index_zeros(3));
    cpu.load_batch(
        &cpu.upload_images(&pixels, &[4, 5, 6]),
        all(&index.to_vec(), 3),
        all(&crop.to_vec(), 3),
        None,
        &mut want_x,
        &mut want_l,
    );
    check_half("load_batch", &read(b, &x, 3 * 3072), &want_x, true, 1e-6);
}

backend_tests!(cpu_half, Some(speedrun::backend::cpu::Cpu::with_precision(speedrun::backend::Precision::Half)), [half_storage]);
#[cfg(feature = "wgpu")]
backend_tests!(wgpu_half_tiled, crate::common::wgpu_half_device().inspect(|g| g.set_tiled_convolutions(true)), [half_storage]);
#[cfg(feature = "wgpu")]
backend_tests!(wgpu_half_direct, crate::common::wgpu_half_device().inspect(|g| g.set_tiled_convolutions(false)), [half_storage]);
