// GELU, SiLU, max-pooling and BatchNorm (γ = 1), forward and backward, over (rows, c) NHWC
// tensors. The activation after BatchNorm is chosen by `act` (0 GELU, 1 SiLU).
// Per-channel sums are two-stage and deterministic: `partials_*` write one pair of sums per
// (chunk of `chunk_rows` rows, channel) into `part`; a `finalize_*` kernel adds the chunks in
// order, one invocation per channel.

struct Params {
    rows: u32, c: u32, n: u32, h: u32,
    w: u32, pool: u32, oh: u32, ow: u32,
    off0: u32, off1: u32, chunk_rows: u32, chunks: u32,
    momentum: f32, eps: f32, act: u32,
}

// Each kernel says what its bindings hold; (rows, c) tensors are the pooled ones, (n, h, w, c)
// the conv outputs before pooling, `saved` (2c) = (mean, 1/std), `running` (2c) = (mean, var).
// Tn is binding n's element type in this kernel (see common.wgsl): H where it holds
// activations, f32 where it holds statistics or parameters.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in0: array<T1>;
@group(0) @binding(2) var<storage, read> in1: array<T2>;
@group(0) @binding(3) var<storage, read> in2: array<f32>;
@group(0) @binding(4) var<storage, read_write> out0: array<T4>;
@group(0) @binding(5) var<storage, read_write> out1: array<T5>;
@group(0) @binding(6) var<storage, read_write> part: array<f32>; // (chunks, c, 2)
@group(0) @binding(7) var<storage, read_write> dz_f32: array<f32>; // BN backward: dz (rows, c)

// The activation after BatchNorm, and its derivative.
fn activate(z: f32) -> f32 {
    if (p.act == 1u) {
        return silu(z);
    }
    return gelu(z);
}

fn activate_grad(z: f32) -> f32 {
    if (p.act == 1u) {
        return silu_grad(z);
    }
    return gelu_grad(z);
}

// out0 = z += bias (in0 at off0), in place; out1 = gelu(z).
@compute @workgroup_size(256)
fn bias_gelu_fwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.rows * p.c) {
        return;
    }
    let z = f32(out0[e]) + f32(in0[p.off0 + e % p.c]);
    out0[e] = T4(z);
    out1[e] = T5(gelu(z));
}

// The index in (n, h, w, c) of element i (row-major) of pooling window (b, oy, ox).
fn window_index(b: u32, oy: u32, ox: u32, i: u32, ch: u32) -> u32 {
    return ((b * p.h + oy * p.pool + i / p.pool) * p.w + ox * p.pool + i % p.pool) * p.c + ch;
}

// out0 (n, oh, ow, c) = max-pool of in0 (n, h, w, c) over pool×pool windows (floor).
@compute @workgroup_size(256)
fn max_pool_fwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.n * p.oh * p.ow * p.c) {
        return;
    }
    let ch = e % p.c;
    let px = e / p.c;
    let ox = px % p.ow;
    let oy = (px / p.ow) % p.oh;
    let b = px / (p.ow * p.oh);
    var best = -3.4e38;
    for (var i = 0u; i < p.pool * p.pool; i++) {
        let v = f32(in0[window_index(b, oy, ox, i, ch)]);
        best = max(best, v);
    }
    out0[e] = T4(best);
}

// out0 (n, h, w, c): in1 (the pooled gradient) at the first maximum (row-major window
// order, as PyTorch) of each window of in0; 0 elsewhere, also where floor pooling drops.
@compute @workgroup_size(256)
fn max_pool_bwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.n * p.h * p.w * p.c) {
        return;
    }
    let ch = e % p.c;
    let px = e / p.c;
    let x = px % p.w;
    let y = (px / p.w) % p.h;
    let b = px / (p.w * p.h);
    let oy = y / p.pool;
    let ox = x / p.pool;
    var g = 0.0;
    if (oy < p.oh && ox < p.ow) {
        var best = -3.4e38;
        var arg = 0u;
        for (var i = 0u; i < p.pool * p.pool; i++) {
            let v = f32(in0[window_index(b, oy, ox, i, ch)]);
            if (v > best) {
                best = v;
                arg = i;
            }
        }
        if (arg == (y - oy * p.pool) * p.pool + (x - ox * p.pool)) {
            g = f32(in1[((b * p.oh + oy) * p.ow + ox) * p.c + ch]);
        }
    }
    out0[e] = T4(g);
}

// One invocation per (chunk, channel): the rows of this chunk.
fn chunk_rows(wg: vec3<u32>) -> vec2<u32> {
    let first = wg.x * p.chunk_rows;
    return vec2<u32>(first, min(first + p.chunk_rows, p.rows));
}

// The pair of sums of this chunk (wg.x) and channel.
fn store_partial(wg: vec3<u32>, ch: u32, a: f32, b: f32) {
    part[(wg.x * p.c + ch) * 2u] = a;
    part[(wg.x * p.c + ch) * 2u + 1u] = b;
}

// part = (Σ in0, 0) per chunk and channel.
@compute @workgroup_size(64)
fn partials_sum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.y * 64u + lid.x;
    if (ch >= p.c) {
        return;
    }
    let r = chunk_rows(wg);
    var s = 0.0;
    for (var row = r.x; row < r.y; row++) {
        s += f32(in0[row * p.c + ch]);
    }
    store_partial(wg, ch, s, 0.0);
}

// part = (Σ (in0 − mean)², 0), with the mean in in1[0..c].
@compute @workgroup_size(64)
fn partials_sqdev(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.y * 64u + lid.x;
    if (ch >= p.c) {
        return;
    }
    let r = chunk_rows(wg);
    let mean = f32(in1[ch]);
    var s = 0.0;
    for (var row = r.x; row < r.y; row++) {
        let d = f32(in0[row * p.c + ch]) - mean;
        s += d * d;
    }
    store_partial(wg, ch, s, 0.0);
}

// part = (Σ in1 · gelu'(in0), 0): the gradient of a bias before a GELU (in0 = z, in1 = da).
@compute @workgroup_size(64)
fn partials_gelu_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.y * 64u + lid.x;
    if (ch >= p.c) {
        return;
    }
    let r = chunk_rows(wg);
    var s = 0.0;
    for (var row = r.x; row < r.y; row++) {
        s += f32(in1[row * p.c + ch]) * gelu_grad(f32(in0[row * p.c + ch]));
    }
    store_partial(wg, ch, s, 0.0);
}

// BN backward, first pass: dz_f32 = da · act'(z) (out0 holds da (rows, c), in0 = z (rows, c),
// in1 = β at off0); part = (Σ dz, Σ dz · x̂) with x̂ = z − β. dz stays f32 (no rounding
// between the two passes under half precision).
@compute @workgroup_size(64)
fn partials_bn_bwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.y * 64u + lid.x;
    if (ch >= p.c) {
        return;
    }
    let r = chunk_rows(wg);
    let beta = f32(in1[p.off0 + ch]);
    var s = 0.0;
    var sx = 0.0;
    for (var row = r.x; row < r.y; row++) {
        let z = f32(in0[row * p.c + ch]);
        let dz = f32(out0[row * p.c + ch]) * activate_grad(z);
        dz_f32[row * p.c + ch] = dz;
        s += dz;
        sx += dz * (z - beta);
    }
    store_partial(wg, ch, s, sx);
}

// Σ over chunks of part, for channel ch.
fn total(ch: u32) -> vec2<f32> {
    var s = vec2<f32>(0.0, 0.0);
    for (var k = 0u; k < p.chunks; k++) {
        s += vec2<f32>(part[(k * p.c + ch) * 2u], part[(k * p.c + ch) * 2u + 1u]);
    }
    return s;
}

// out0[off0 + ch] = Σ (a bias gradient).
@compute @workgroup_size(64)
fn finalize_sum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.x * 64u + lid.x;
    if (ch < p.c) {
        out0[p.off0 + ch] = T4(total(ch).x);
    }
}

// out0 = saved: the batch mean in [0, c).
@compute @workgroup_size(64)
fn finalize_mean(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.x * 64u + lid.x;
    if (ch < p.c) {
        out0[ch] = T4(total(ch).x / f32(p.rows));
    }
}

// out0 = saved: 1/std in [c, 2c) from the biased variance; out1 = running (mean, var) at
// off1: momentum·running + (1 − momentum)·batch, with the unbiased variance.
@compute @workgroup_size(64)
fn finalize_var(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.x * 64u + lid.x;
    if (ch >= p.c) {
        return;
    }
    let rows = f32(p.rows);
    let var_b = total(ch).x / rows;
    out0[p.c + ch] = T4(1.0 / sqrt(var_b + p.eps));
    let unbiased = var_b * rows / max(rows - 1.0, 1.0);
    out1[p.off1 + ch] = T5(p.momentum * f32(out1[p.off1 + ch]) + (1.0 - p.momentum) * f32(out0[ch]));
    out1[p.off1 + p.c + ch] = T5(p.momentum * f32(out1[p.off1 + p.c + ch]) + (1.0 - p.momentum) * unbiased);
}

// out0 = saved (mean, 1/std) from the running statistics in0 (mean, var) at off1.
@compute @workgroup_size(64)
fn eval_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.x * 64u + lid.x;
    if (ch < p.c) {
        out0[ch] = T4(f32(in0[p.off1 + ch]));
        out0[p.c + ch] = T4(1.0 / sqrt(f32(in0[p.off1 + p.c + ch]) + p.eps));
    }
}

// out0[off0 + ch] = dβ = Σ dz; out1 = (mean dz, mean dz·x̂) for `bn_bwd_apply`.
@compute @workgroup_size(64)
fn finalize_bn_bwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ch = wg.x * 64u + lid.x;
    if (ch >= p.c) {
        return;
    }
    let s = total(ch);
    out0[p.off0 + ch] = T4(s.x);
    out1[ch] = T5(s.x / f32(p.rows));
    out1[p.c + ch] = T5(s.y / f32(p.rows));
}

// out0 = z = (out0 − mean)·(1/std) + β in place (out0 holds the pooled values (rows, c);
// in0 = saved, in1 = β at off0); out1 (rows, c) = act(z).
@compute @workgroup_size(256)
fn bn_act_apply(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.rows * p.c) {
        return;
    }
    let ch = e % p.c;
    let z = (f32(out0[e]) - f32(in0[ch])) * f32(in0[p.c + ch]) + f32(in1[p.off0 + ch]);
    out0[e] = T4(z);
    out1[e] = T5(activate(z));
}

// out0 = d(pooled) = (1/std)·(dz − mean dz − x̂·mean dz·x̂) (dz in dz_f32; in0 = z,
// in1 = β at off0, in2 = saved; out1 = the means from `finalize_bn_bwd`).
@compute @workgroup_size(256)
fn bn_bwd_apply(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.rows * p.c) {
        return;
    }
    let ch = e % p.c;
    let xhat = f32(in0[e]) - f32(in1[p.off0 + ch]);
    out0[e] = T4(in2[p.c + ch] * (dz_f32[e] - f32(out1[ch]) - xhat * f32(out1[p.c + ch])));
}
