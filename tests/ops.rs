//! Every backend op against independent float64 loops written here, and every backward op
//! against central finite differences of its forward. Each test body is generic over
//! `Backend` and instantiated per backend by `backend_tests!`.

use speedrun::backend::{all, all_mut, block_on, reflect, Backend, BnMode, ConvShape, Crop, PoolBnShape};
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

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (scale {scale})");
    }
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

/// Checks `analytic` against finite differences of `loss` at every 7th coordinate.
fn check_grad(what: &str, x: &mut [f32], analytic: &[f32], h: f32, loss: impl FnMut(&[f32]) -> f64 + Copy) {
    let scale = analytic.iter().fold(1e-3f32, |m, v| m.max(v.abs())) as f64;
    for i in (0..x.len()).step_by(7) {
        let numeric = numeric_grad(x, i, h, loss);
        assert!((numeric - analytic[i] as f64).abs() <= 2e-3 * scale, "{what}[{i}]: analytic {}, numeric {numeric}", analytic[i]);
    }
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

pub fn pool_bn_gelu<B: Backend>(b: &B) {
    for pool in [1, 2] {
        let s = PoolBnShape { n: 3, h: 4, w: 5, c: 3, pool };
        let out = s.n * s.out_h() * s.out_w() * s.c;
        let (mut y, mut beta, r) = (distinct(s.n * s.h * s.w * s.c, 9), random(s.c, 10), random(out, 11));
        let mode = BnMode::Train { momentum: 0.6, eps: 1e-12 };
        let forward = |y: &[f32], beta: &[f32]| {
            let mut running = upload(b, &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
            let (mut z, mut a, mut saved) = (b.zeros(out), b.zeros(out), b.zeros(2 * s.c));
            b.pool_bn_gelu_forward(
                s,
                mode,
                &upload(b, y),
                all(&upload(b, beta), s.c),
                all_mut(&mut running, 6),
                &mut z,
                &mut a,
                &mut saved,
            );
            (z, a, saved, read(b, &running, 6))
        };
        // Forward against float64: pool, batch statistics, GELU, running-stat update.
        let (z, a, saved, running) = forward(&y, &beta);
        let rows = s.n * s.out_h() * s.out_w();
        let pooled: Vec<f64> = (0..out)
            .map(|i| {
                let (ch, px) = (i % s.c, i / s.c);
                let (bi, oy, ox) = (px / (s.out_h() * s.out_w()), px / s.out_w() % s.out_h(), px % s.out_w());
                let at = |dy: usize, dx: usize| y[((bi * s.h + oy * pool + dy) * s.w + ox * pool + dx) * s.c + ch] as f64;
                (0..pool * pool).map(|k| at(k / pool, k % pool)).fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
        let mut want = vec![0.0; out];
        for ch in 0..s.c {
            let vals: Vec<f64> = (0..rows).map(|r| pooled[r * s.c + ch]).collect();
            let mean = vals.iter().sum::<f64>() / rows as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / rows as f64;
            for r in 0..rows {
                let zz = (vals[r] - mean) / (var + 1e-12).sqrt() + beta[ch] as f64;
                want[r * s.c + ch] = 0.5 * zz * (1.0 + libm::erf(zz / std::f64::consts::SQRT_2));
            }
            assert!((running[ch] as f64 - 0.4 * mean).abs() < 1e-5, "running mean");
            assert!((running[3 + ch] as f64 - (0.6 + 0.4 * var * rows as f64 / (rows - 1) as f64)).abs() < 1e-5, "running var is unbiased");
        }
        assert_close(&format!("pool{pool} bn gelu"), &read(b, &a, out), &want, 1e-5);
        // Backward against finite differences, w.r.t. the conv output and β.
        let (mut dy, mut dbeta) = (b.zeros(y.len()), b.zeros(s.c));
        let mut da = upload(b, &r);
        b.pool_bn_gelu_backward(s, &upload(b, &y), &z, &saved, all(&upload(b, &beta), s.c), &mut da, &mut dy, all_mut(&mut dbeta, s.c));
        let loss = |y: &[f32], beta: &[f32]| dot(&read(b, &forward(y, beta).1, out), &r);
        let (dy, dbeta) = (read(b, &dy, y.len()), read(b, &dbeta, s.c));
        let bc = beta.clone();
        check_grad(&format!("pool{pool} dy"), &mut y, &dy, 1e-2, |y| loss(y, &bc));
        let yc = y.clone();
        check_grad(&format!("pool{pool} dbeta"), &mut beta, &dbeta, 1e-2, |beta| loss(&yc, beta));
    }
}

pub fn max_pool<B: Backend>(b: &B) {
    let s = PoolBnShape { n: 2, h: 7, w: 7, c: 3, pool: 3 }; // floor: 7 → 2
    let out = s.n * 2 * 2 * s.c;
    let (mut x, r) = (distinct(s.n * 49 * s.c, 12), random(out, 13));
    let forward = |x: &[f32]| {
        let mut y = b.zeros(out);
        b.max_pool_forward(s, &upload(b, x), &mut y);
        read(b, &y, out)
    };
    let mut dx = b.zeros(x.len());
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
    assert!((stats[0] as f64 - want).abs() < 1e-5 * want, "loss {} vs {want}", stats[0]);
    let correct = logits.chunks_exact(10).zip(&labels).filter(|(r, &l)| speedrun::train::argmax(r) == l as usize).count();
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

pub fn load_batch_views<B: Backend>(b: &B) {
    // Three images whose pixels all differ.
    let pixels: Vec<u8> = (0..3 * 3072).map(|i| (i * 7 % 251) as u8).collect();
    let images = b.upload_images(&pixels, &[4, 5, 6]);
    let crops =
        [Crop { dy: 2, dx: -1, flip: true }, Crop { dy: -2, dx: 0, flip: false }, Crop::IDENTITY, Crop { dy: -1, dx: 1, flip: true }];
    let index = [2u32, 0, 1, 2];
    let load = |index: &[u32], crops: &[Crop]| {
        let (mut ti, mut tc) = (b.index_zeros(index.len()), b.index_zeros(index.len()));
        b.upload_index(all_mut(&mut ti, index.len()), index);
        b.upload_index(all_mut(&mut tc, index.len()), &crops.iter().map(|c| c.pack()).collect::<Vec<_>>());
        let (mut x, mut labels) = (b.zeros(index.len() * 3072), b.index_zeros(index.len()));
        b.load_batch(&images, all(&ti, index.len()), all(&tc, index.len()), &mut x, &mut labels);
        read(b, &x, index.len() * 3072)
    };
    let x = load(&index, &crops);
    let (mean, std) = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]);
    for (k, (&i, crop)) in index.iter().zip(&crops).enumerate() {
        for (y, xx, c) in (0..32).flat_map(|y| (0..32).flat_map(move |xx| (0..3).map(move |c| (y, xx, c)))) {
            let (sy, sx) = (reflect(y as i32 + crop.dy, 32), reflect(xx as i32 + crop.dx, 32));
            let sx = if crop.flip { 31 - sx } else { sx };
            let want = (pixels[i as usize * 3072 + (sy * 32 + sx) * 3 + c] as f64 / 255.0 - mean[c]) / std[c];
            let got = x[k * 3072 + (y * 32 + xx) * 3 + c] as f64;
            assert!((got - want).abs() < 1e-5, "image {k} pixel ({y},{xx},{c}): {got} vs {want}");
        }
    }
    // Mirroring a view equals the mirrored image's view at −dx: what TTA and the
    // alternating flip rely on.
    let mirror = |img: &[f32]| -> Vec<f32> { (0..3072).map(|j| img[(j / 96) * 96 + (31 - j / 3 % 32) * 3 + j % 3]).collect() };
    for &(dy, dx) in &[(1, 1), (-1, -1), (2, -2), (0, 1)] {
        let pair = load(&[1, 1], &[Crop { dy, dx, flip: false }, Crop { dy, dx: -dx, flip: true }]);
        assert_eq!(mirror(&pair[..3072]), pair[3072..].to_vec(), "mirror of shift ({dy},{dx})");
    }
}

pub fn patch_moments<B: Backend>(b: &B) {
    let n = 2;
    let x = random(n * 3072, 16);
    let mut out = b.zeros(n * 144);
    b.patch_moments(n, &upload(b, &x), all_mut(&mut out, n * 144));
    let mut want = vec![0.0f64; n * 144];
    for (bi, y, xx) in (0..n).flat_map(|bi| (0..31).flat_map(move |y| (0..31).map(move |xx| (bi, y, xx)))) {
        // (c, ky, kx) order
        let p: Vec<f64> = (0..12).map(|j| x[bi * 3072 + ((y + j / 2 % 2) * 32 + xx + j % 2) * 3 + j / 4] as f64).collect();
        for (i, j) in (0..12).flat_map(|i| (0..12).map(move |j| (i, j))) {
            want[bi * 144 + i * 12 + j] += p[i] * p[j];
        }
    }
    assert_close("patch moments", &read(b, &out, n * 144), &want, 1e-6);
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
    // axpy, fill, copy
    let mut y = upload(b, &[1.0, 1.0, 1.0]);
    b.axpy(0.5, all(&upload(b, &[2.0, 4.0, 6.0]), 3), all_mut(&mut y, 3));
    assert_eq!(read(b, &y, 3), vec![2.0, 3.0, 4.0]);
    b.fill(speedrun::backend::ViewMut { buf: &mut y, range: 1..3 }, 0.0);
    assert_eq!(read(b, &y, 3), vec![2.0, 0.0, 0.0]);
    b.copy(all(&upload(b, &[9.0]), 1), speedrun::backend::ViewMut { buf: &mut y, range: 2..3 });
    assert_eq!(read(b, &y, 3), vec![2.0, 0.0, 9.0]);
}

/// One `#[test]` per op body, per backend.
macro_rules! backend_tests {
    ($backend:ident, $make:expr, [$($op:ident),*]) => {
        mod $backend {
            $(#[test] fn $op() { super::$op(&$make); })*
        }
    };
}

backend_tests!(
    cpu,
    speedrun::backend::cpu::Cpu::new(),
    [conv_forward, conv_backward, bias_gelu, pool_bn_gelu, max_pool, linear_and_loss, load_batch_views, patch_moments, optimizer_ops]
);
