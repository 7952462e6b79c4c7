// Elementwise updates over windows of the flat buffers: the SGD step, lookahead, and the
// small vector ops (axpy, fill, copy).

struct Params {
    len: u32, off0: u32, off1: u32, off2: u32,
    lr: f32, wd: f32, momentum: f32, a: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read_write> out0: array<f32>;
@group(0) @binding(3) var<storage, read_write> out1: array<f32>;

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

// out0[off0..] += a · in0[off1..]
@compute @workgroup_size(256)
fn axpy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e < p.len) {
        out0[p.off0 + e] = fma(p.a, in0[p.off1 + e], out0[p.off0 + e]);
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
