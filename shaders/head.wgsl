// The classifier head: linear layer (no bias) forward and backward, and the label-smoothed
// cross-entropy summed over the batch.

struct Params {
    n: u32, c_in: u32, c_out: u32, off: u32,
    write_grad: u32, scale: f32, smoothing: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// Tn: binding n's element type in this kernel (see common.wgsl), H where it holds the
// pooled features or their gradient.
@group(0) @binding(1) var<storage, read> in0: array<T1>;
@group(0) @binding(2) var<storage, read> in1: array<T2>;
@group(0) @binding(3) var<storage, read> labels: array<u32>;
@group(0) @binding(4) var<storage, read_write> out0: array<T4>;
@group(0) @binding(5) var<storage, read_write> out1: array<f32>;
@group(0) @binding(6) var<storage, read_write> part: array<f32>; // (workgroups, 2)

// out0 (n, c_out) = scale · in0 (n, c_in) · in1ᵀ, in1 = w (c_out, c_in) at off.
@compute @workgroup_size(256)
fn linear_fwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.n * p.c_out) {
        return;
    }
    let b = e / p.c_out;
    let o = e % p.c_out;
    var s = 0.0;
    for (var i = 0u; i < p.c_in; i++) {
        s = fma(f32(in0[b * p.c_in + i]), f32(in1[p.off + o * p.c_in + i]), s);
    }
    out0[e] = T4(p.scale * s);
}

// out0 = dx (n, c_in) = scale · in0 (dy, (n, c_out)) · in1 (w at off).
@compute @workgroup_size(256)
fn linear_bwd_data(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.n * p.c_in) {
        return;
    }
    let b = e / p.c_in;
    let i = e % p.c_in;
    var s = 0.0;
    for (var o = 0u; o < p.c_out; o++) {
        s = fma(f32(in0[b * p.c_out + o]), f32(in1[p.off + o * p.c_in + i]), s);
    }
    out0[e] = T4(p.scale * s);
}

// out0 = dw (c_out, c_in) at off = scale · in0ᵀ (dy) · in1 (x).
@compute @workgroup_size(256)
fn linear_bwd_filter(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.c_out * p.c_in) {
        return;
    }
    let o = e / p.c_in;
    let i = e % p.c_in;
    var s = 0.0;
    for (var b = 0u; b < p.n; b++) {
        s = fma(f32(in0[b * p.c_out + o]), f32(in1[b * p.c_in + i]), s);
    }
    out0[p.off + e] = T4(p.scale * s);
}

var<workgroup> sums: array<vec2<f32>, 256>;

// Per row of in0 = logits (n, 10): the smoothed cross-entropy and whether the argmax (first
// maximum) is the label; out0 = its gradient when write_grad. Each workgroup's sums go to part.
@compute @workgroup_size(256)
fn cross_entropy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = flat_id(wg, nwg, lid);
    var here = vec2<f32>(0.0, 0.0);
    if (b < p.n) {
        let label = labels[b];
        var best = f32(in0[b * 10u]);
        var arg = 0u;
        for (var j = 1u; j < 10u; j++) {
            if (f32(in0[b * 10u + j]) > best) {
                best = f32(in0[b * 10u + j]);
                arg = j;
            }
        }
        var sum = 0.0;
        for (var j = 0u; j < 10u; j++) {
            sum += exp(f32(in0[b * 10u + j]) - best);
        }
        let lse = best + log(sum);
        var loss = 0.0;
        for (var j = 0u; j < 10u; j++) {
            var t = p.smoothing / 10.0;
            if (j == label) {
                t += 1.0 - p.smoothing;
            }
            loss += t * (lse - f32(in0[b * 10u + j]));
            if (p.write_grad == 1u) {
                out0[b * 10u + j] = T4(exp(f32(in0[b * 10u + j]) - lse) - t);
            }
        }
        here = vec2<f32>(loss, select(0.0, 1.0, arg == label));
    }
    sums[lid.x] = here;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride /= 2u) {
        if (lid.x < stride) {
            sums[lid.x] += sums[lid.x + stride];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        let g = wg.y * nwg.x + wg.x;
        part[g * 2u] = sums[0].x;
        part[g * 2u + 1u] = sums[0].y;
    }
}

// out1[0..2] += Σ part over the `off` workgroups of `cross_entropy`, in order.
@compute @workgroup_size(1)
fn cross_entropy_total() {
    var s = vec2<f32>(0.0, 0.0);
    for (var g = 0u; g < p.off; g++) {
        s += vec2<f32>(part[g * 2u], part[g * 2u + 1u]);
    }
    out1[0] += s.x;
    out1[1] += s.y;
}
