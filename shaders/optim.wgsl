// Elementwise updates over windows of the flat buffers: the SGD step, lookahead, Nesterov
// momentum (Muon), the small vector ops (axpby, fill, copy), and scaling to a norm.
// Every window is `len` values of a flat buffer from its offset.

struct Params {
    len: u32, off0: u32, off1: u32, off2: u32,
    lr: f32, wd: f32, momentum: f32, a: f32,
    b: f32,
    parts: u32, // scale_to_norm: workgroups of `sumsq_partials`, at most 256
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;        // (len) at off1
@group(0) @binding(2) var<storage, read_write> out0: array<f32>; // (len) at off0
@group(0) @binding(3) var<storage, read_write> out1: array<f32>; // (len) at off1 or off2
@group(0) @binding(4) var<storage, read_write> part: array<f32>; // (parts) partial sums

// PyTorch SGD, Nesterov, dampening 0: g += wd·p; m = momentum·m + g; p -= lr·(g + momentum·m).
// out0 = p at off0, in0 = g at off1, out1 = m at off2.
@compute @workgroup_size(256)
fn sgd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.len) {
        return;
    }
    let g = in0[p.off1 + e] + p.wd * out0[p.off0 + e];
    let m = p.momentum * out1[p.off2 + e] + g;
    out1[p.off2 + e] = m;
    out0[p.off0 + e] -= p.lr * (g + p.momentum * m);
}

// Lookahead with decay a: ema += (1 − a)(net − ema); net = ema. out0 = ema at off0, out1 = net at off1.
@compute @workgroup_size(256)
fn lookahead(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.len) {
        return;
    }
    let ema = out0[p.off0 + e] + (1.0 - p.a) * (out1[p.off1 + e] - out0[p.off0 + e]);
    out0[p.off0 + e] = ema;
    out1[p.off1 + e] = ema;
}

// Nesterov momentum without the step: m = momentum·m + g; out = g + momentum·m.
// out0 = m at off0, in0 = g at off1, out1 = out at off2.
@compute @workgroup_size(256)
fn nesterov(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.len) {
        return;
    }
    let g = in0[p.off1 + e];
    let m = p.momentum * out0[p.off0 + e] + g;
    out0[p.off0 + e] = m;
    out1[p.off2 + e] = g + p.momentum * m;
}

// out0[off0..] = a · in0[off1..] + b · out0[off0..]
@compute @workgroup_size(256)
fn axpby(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e < p.len) {
        out0[p.off0 + e] = p.a * in0[p.off1 + e] + p.b * out0[p.off0 + e];
    }
}

// out0[off0..] = a
@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e < p.len) {
        out0[p.off0 + e] = p.a;
    }
}

// out0[off0..] = in0[off1..]
@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e < p.len) {
        out0[p.off0 + e] = in0[p.off1 + e];
    }
}

// scale_to_norm, x = out0 at off0: x ← x · a / (‖x‖ + b), a = target, b = eps. Two passes
// without atomics, both in a fixed order: `sumsq_partials` (`parts` workgroups) writes each
// workgroup's Σ x² to part; `scale_by_norm` adds the parts in every workgroup the same way
// and scales.

var<workgroup> sums: array<f32, 256>;

// sums[0] = Σ sums[0..256] as a tree, the same order everywhere.
fn reduce_sums(t: u32) {
    for (var stride = 128u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if (t < stride) {
            sums[t] += sums[t + stride];
        }
    }
    workgroupBarrier();
}

// part[g] = Σ x² over x[g·256 + t + i·parts·256] for t < 256, i = 0, 1, ...
@compute @workgroup_size(256)
fn sumsq_partials(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    var s = 0.0;
    for (var e = wg.x * 256u + t; e < p.len; e += p.parts * 256u) {
        let v = out0[p.off0 + e];
        s = fma(v, v, s);
    }
    sums[t] = s;
    reduce_sums(t);
    if (t == 0u) {
        part[wg.x] = sums[0];
    }
}

// x ← x · a / (√(Σ part) + b), the parts added as a tree in every workgroup alike.
@compute @workgroup_size(256)
fn scale_by_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    sums[t] = select(0.0, part[t], t < p.parts);
    reduce_sums(t);
    let scale = p.a / (sqrt(sums[0]) + p.b);
    let e = flat_id(wg, nwg, lid);
    if (e < p.len) {
        out0[p.off0 + e] *= scale;
    }
}
