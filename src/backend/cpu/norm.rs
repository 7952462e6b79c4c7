//! GELU, SiLU, max-pooling and BatchNorm on the CPU, forward and backward.
//! Reductions run over a fixed partition of the rows and are summed in f64 in a fixed
//! order, so results do not depend on the thread count or scheduling.

use super::fixed_groups;
use crate::backend::{Act, BnMode, PoolBnShape};
use rayon::prelude::*;

/// erf(x) for f32 to about 1e-7 absolute: a rational approximation (the one Eigen and XLA
/// use) that vectorises, unlike libm's branchy `erff`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_6e-5);
    p = p.mul_add(x2, -7.349_906e-4);
    p = p.mul_add(x2, -2.954_600_2e-3);
    p = p.mul_add(x2, -1.609_603_4e-2);
    let mut q = -1.456_607_2e-5f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

/// exp(x) for f32 to a few ulp (Cephes' expf), written to vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// GELU with the exact erf: `z·Φ(z)`.
#[inline(always)]
pub fn gelu(z: f32) -> f32 {
    0.5 * z * (1.0 + erf(z * std::f32::consts::FRAC_1_SQRT_2))
}

/// d/dz GELU(z) = Φ(z) + z·φ(z).
#[inline(always)]
pub fn gelu_grad(z: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + erf(z * std::f32::consts::FRAC_1_SQRT_2)) + z * INV_SQRT_2PI * exp(-0.5 * z * z)
}

/// SiLU: `z·σ(z)`.
#[inline(always)]
pub fn silu(z: f32) -> f32 {
    z / (1.0 + exp(-z))
}

/// d/dz SiLU(z) = σ(z)·(1 + z·(1 − σ(z))).
#[inline(always)]
pub fn silu_grad(z: f32) -> f32 {
    let sigmoid = 1.0 / (1.0 + exp(-z));
    sigmoid * (1.0 + z * (1.0 - sigmoid))
}

#[inline(always)]
fn activate(act: Act, z: f32) -> f32 {
    match act {
        Act::Gelu => gelu(z),
        Act::Silu => silu(z),
    }
}

#[inline(always)]
fn activate_grad(act: Act, z: f32) -> f32 {
    match act {
        Act::Gelu => gelu_grad(z),
        Act::Silu => silu_grad(z),
    }
}

/// Rows per parallel task for elementwise passes over `(rows, c)` tensors.
fn rows_per_task(c: usize) -> usize {
    (16384 / c).max(1)
}

widest! {
    pub fn bias_gelu_forward(pixels: usize, c: usize, z: &mut [f32], bias: &[f32], a: &mut [f32]) {
        let chunk = rows_per_task(c) * c;
        z[..pixels * c].par_chunks_mut(chunk).zip(a[..pixels * c].par_chunks_mut(chunk)).for_each(|(z, a)| {
            for (z, a) in z.chunks_exact_mut(c).zip(a.chunks_exact_mut(c)) {
                for ((z, a), b) in z.iter_mut().zip(a).zip(bias) {
                    *z += b;
                    *a = gelu(*z);
                }
            }
        });
    }
}

/// Two per-channel sums over the rows of a `(rows, c)` tensor: `add_row(row, out, first,
/// second)` adds one row's terms to `first (c)` and `second (c)` (separate arrays, so that the
/// loop over channels vectorises), and may write that row of `out (rows, c)` (or of an empty
/// `out`: an empty row) on the way, sparing a pass of its own. Rows are split into a fixed
/// partition, summed in f64.
fn channel_sums(
    rows: usize,
    c: usize,
    out: &mut [f32],
    add_row: impl Fn(usize, &mut [f32], &mut [f64], &mut [f64]) + Sync,
) -> [Vec<f64>; 2] {
    let groups = fixed_groups(rows);
    let width = if out.is_empty() { 0 } else { c };
    let mut parts = Vec::with_capacity(groups.len()); // out's rows of each group
    let mut rest = &mut out[..rows * width];
    for g in &groups {
        let (part, tail) = rest.split_at_mut(g.len() * width);
        parts.push(part);
        rest = tail;
    }
    let partials: Vec<[Vec<f64>; 2]> = groups
        .into_par_iter()
        .zip(parts)
        .map(|(rows, out)| {
            let [mut first, mut second] = [vec![0.0f64; c], vec![0.0f64; c]];
            for (i, r) in rows.enumerate() {
                add_row(r, &mut out[i * width..(i + 1) * width], &mut first, &mut second);
            }
            [first, second]
        })
        .collect();
    let mut total = [vec![0.0f64; c], vec![0.0f64; c]];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            t.iter_mut().zip(v).for_each(|(t, v)| *t += v);
        }
    }
    total
}

widest! {
    pub fn bias_gelu_backward(pixels: usize, c: usize, z: &[f32], da: &[f32], dbias: &mut [f32]) {
        let [sums, _] = channel_sums(pixels, c, &mut [], |r, _, acc, _| {
            for ch in 0..c {
                acc[ch] += (da[r * c + ch] * gelu_grad(z[r * c + ch])) as f64;
            }
        });
        for (d, s) in dbias.iter_mut().zip(sums) {
            *d = s as f32;
        }
    }
}

widest! {
    /// Max-pool `x (n, h, w, c)` into `y (n, h/p, w/p, c)` (floor); `p == 1` copies.
    pub fn max_pool(s: &PoolBnShape, x: &[f32], y: &mut [f32]) {
        let (oh, ow, c) = (s.out_h(), s.out_w(), s.c);
        if s.pool == 1 {
            y[..s.n * s.h * s.w * c].copy_from_slice(&x[..s.n * s.h * s.w * c]);
            return;
        }
        y[..s.n * oh * ow * c].par_chunks_mut(oh * ow * c).enumerate().for_each(|(b, y)| {
            for (o, y) in y.chunks_exact_mut(c).enumerate() {
                pool_window(s, x, b * oh * ow + o, y);
            }
        });
    }
}

/// `out (c)` = the maximum over window `r` (pooled pixels in NHWC order) of `x (n, h, w, c)`.
#[inline(always)]
fn pool_window(s: &PoolBnShape, x: &[f32], r: usize, out: &mut [f32]) {
    let (oh, ow, c, p) = (s.out_h(), s.out_w(), s.c, s.pool);
    let (b, oy, ox) = (r / (oh * ow), r % (oh * ow) / ow, r % ow);
    let x = &x[b * s.h * s.w * c..];
    out.fill(f32::NEG_INFINITY);
    for i in 0..p * p {
        let at = ((oy * p + i / p) * s.w + ox * p + i % p) * c;
        for (y, &x) in out.iter_mut().zip(&x[at..at + c]) {
            *y = if x > *y { x } else { *y };
        }
    }
}

/// Routes `dy (n, h/p, w/p, c)` to the first maximum (row-major window order, as PyTorch)
/// of each window of `x`; every other position of `dx (n, h, w, c)` gets 0.
pub fn max_pool_backward(s: &PoolBnShape, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    route_to_maxima(s, x, |r, g| g.copy_from_slice(&dy[r * s.c..(r + 1) * s.c]), dx);
}

widest! {
    /// `max_pool_backward` of the gradient that `grad(r, g)` writes into `g (c)` for pooled pixel
    /// `r`, computed as it is routed (no pass through memory); `p == 1` writes it into `dx`.
    fn route_to_maxima(s: &PoolBnShape, x: &[f32], grad: impl Fn(usize, &mut [f32]) + Sync, dx: &mut [f32]) {
        let (oh, ow, c, p) = (s.out_h(), s.out_w(), s.c, s.pool);
        if p == 1 {
            let rows = rows_per_task(c);
            dx[..s.n * s.h * s.w * c].par_chunks_mut(rows * c).enumerate().for_each(|(chunk, dx)| {
                for (i, g) in dx.chunks_exact_mut(c).enumerate() {
                    grad(chunk * rows + i, g);
                }
            });
            return;
        }
        // Per-channel maxima, their window positions and the gradient, (c) each: one set per
        // rayon task rather than per image.
        let scratch = || (vec![0.0f32; c], vec![0u32; c], vec![0.0f32; c]);
        let images = dx[..s.n * s.h * s.w * c].par_chunks_mut(s.h * s.w * c).enumerate();
        images.for_each_init(scratch, |(best, arg, g), (b, dx)| {
            let x = &x[b * s.h * s.w * c..(b + 1) * s.h * s.w * c];
            // the rows and columns that floor pooling drops
            dx[oh * p * s.w * c..].fill(0.0);
            for row in dx[..oh * p * s.w * c].chunks_exact_mut(s.w * c) {
                row[ow * p * c..].fill(0.0);
            }
            for o in 0..oh * ow {
                let (oy, ox) = (o / ow, o % ow);
                let at = |i: usize| ((oy * p + i / p) * s.w + ox * p + i % p) * c;
                best.fill(f32::NEG_INFINITY);
                for i in 0..p * p {
                    for ((best, arg), &x) in best.iter_mut().zip(arg.iter_mut()).zip(&x[at(i)..at(i) + c]) {
                        (*best, *arg) = if x > *best { (x, i as u32) } else { (*best, *arg) };
                    }
                }
                // every position of the window written, branch-free: the gradient or 0
                grad(b * oh * ow + o, g);
                for i in 0..p * p {
                    for ((dx, &arg), &dy) in dx[at(i)..at(i) + c].iter_mut().zip(arg.iter()).zip(g.iter()) {
                        *dx = if arg == i as u32 { dy } else { 0.0 };
                    }
                }
            }
        });
    }
}

widest! {
    /// See `Backend::pool_bn_act_forward`.
    #[allow(clippy::too_many_arguments)]
    pub fn pool_bn_act_forward(
        s: &PoolBnShape,
        mode: BnMode,
        y: &[f32],
        beta: &[f32],
        running: &mut [f32],
        z: &mut [f32],
        a: &mut [f32],
        saved: &mut [f32],
    ) {
        let c = s.c;
        let rows = s.n * s.out_h() * s.out_w();
        // Pooling writes z, which BatchNorm then normalises in place. Without pooling BatchNorm
        // reads y itself, and the normalising pass copies each chunk of y into z while it is in
        // cache, instead of a separate copy of the whole tensor.
        let (mean, istd) = saved[..2 * c].split_at_mut(c);
        match mode {
            BnMode::Train { momentum, eps } => {
                // The first pass pools as it sums.
                let pooled_out: &mut [f32] = if s.pool > 1 { &mut z[..rows * c] } else { &mut [] };
                let [sums, _] = channel_sums(rows, c, pooled_out, |r, out, acc, _| {
                    let row: &[f32] = if s.pool > 1 {
                        pool_window(s, y, r, out);
                        out
                    } else {
                        &y[r * c..(r + 1) * c]
                    };
                    for ch in 0..c {
                        acc[ch] += row[ch] as f64;
                    }
                });
                let pooled: &[f32] = if s.pool > 1 { z } else { y };
                let mu: Vec<f64> = sums.iter().map(|s| s / rows as f64).collect();
                let [sq, _] = channel_sums(rows, c, &mut [], |r, _, acc, _| {
                    for ch in 0..c {
                        acc[ch] += (pooled[r * c + ch] as f64 - mu[ch]).powi(2);
                    }
                });
                let (run_mean, run_var) = running[..2 * c].split_at_mut(c);
                for ch in 0..c {
                    let var = sq[ch] / rows as f64;
                    let unbiased = var * rows as f64 / (rows as f64 - 1.0).max(1.0);
                    mean[ch] = mu[ch] as f32;
                    istd[ch] = (1.0 / (var + eps as f64).sqrt()) as f32;
                    run_mean[ch] = momentum * run_mean[ch] + (1.0 - momentum) * mu[ch] as f32;
                    run_var[ch] = momentum * run_var[ch] + (1.0 - momentum) * unbiased as f32;
                }
            }
            BnMode::Eval { eps } => {
                if s.pool > 1 {
                    max_pool(s, y, z);
                }
                for ch in 0..c {
                    mean[ch] = running[ch];
                    istd[ch] = 1.0 / (running[c + ch] + eps).sqrt();
                }
            }
        }
        let (mean, istd) = (&*mean, &*istd);
        let chunk = rows_per_task(c) * c;
        let zay = z[..rows * c].par_chunks_mut(chunk).zip(a[..rows * c].par_chunks_mut(chunk)).zip(y[..rows * c].par_chunks(chunk));
        zay.for_each(|((z, a), y)| {
            if s.pool == 1 {
                z.copy_from_slice(y);
            }
            for (z, a) in z.chunks_exact_mut(c).zip(a.chunks_exact_mut(c)) {
                for ch in 0..c {
                    z[ch] = (z[ch] - mean[ch]) * istd[ch] + beta[ch];
                    a[ch] = activate(s.act, z[ch]);
                }
            }
        });
    }
}

widest! {
    /// See `Backend::pool_bn_act_backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn pool_bn_act_backward(
        s: &PoolBnShape,
        y: &[f32],
        z: &[f32],
        saved: &[f32],
        beta: &[f32],
        da: &mut [f32],
        dy: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let c = s.c;
        let rows = s.n * s.out_h() * s.out_w();
        let istd = &saved[c..2 * c];
        // da ← dz = da·act'(z), summed as it is written: with γ = 1 and x̂ = z − β, Σdz is dβ, and
        // Σdz·x̂ projects out the variance direction.
        let [sum_dz, sum_dzx] = channel_sums(rows, c, &mut da[..rows * c], |r, d, sum_dz, sum_dzx| {
            let z = &z[r * c..(r + 1) * c];
            for ch in 0..c {
                d[ch] *= activate_grad(s.act, z[ch]);
                let xhat = z[ch] - beta[ch];
                sum_dz[ch] += d[ch] as f64;
                sum_dzx[ch] += (d[ch] * xhat) as f64;
            }
        });
        let mean_dz: Vec<f32> = sum_dz.iter().map(|s| (s / rows as f64) as f32).collect();
        let mean_dzx: Vec<f32> = sum_dzx.iter().map(|s| (s / rows as f64) as f32).collect();
        for (d, s) in dbeta.iter_mut().zip(&sum_dz) {
            *d = *s as f32;
        }
        // d(pooled) = istd·(dz − mean(dz) − x̂·mean(dz·x̂)), routed to the maxima (or, without
        // pooling, written to dy) as it is computed.
        let dz = &*da;
        let grad = |r: usize, g: &mut [f32]| {
            let (dz, z) = (&dz[r * c..(r + 1) * c], &z[r * c..(r + 1) * c]);
            for ch in 0..c {
                let xhat = z[ch] - beta[ch];
                g[ch] = istd[ch] * (dz[ch] - mean_dz[ch] - xhat * mean_dzx[ch]);
            }
        };
        route_to_maxima(s, y, grad, dy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_and_exp_match_libm() {
        let (mut erf_err, mut exp_err) = (0.0f64, 0.0f64);
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            erf_err = erf_err.max((erf(x) as f64 - libm::erf(x as f64)).abs());
            let e = x * 14.0;
            exp_err = exp_err.max(((exp(e) as f64 - (e as f64).exp()) / (e as f64).exp()).abs());
        }
        assert!(erf_err < 5e-7, "erf error {erf_err:e}");
        assert!(exp_err < 5e-7, "exp relative error {exp_err:e}");
    }
}
