// Convolutions, NHWC activations and OHWI weights, stride 1, zero padding.
// As GEMMs: output pixel m = (b, oy, ox), output channel o, patch index k = (ky, kx, c).
//   forward:  y[m, o]  = Σ_k A[m, k] · W[o, k]        A = the patches of x, gathered on the fly
//   dgrad:    forward of dy with the rotated, channel-swapped kernel (`rotate`)
//   wgrad:    dW[o, k] = Σ_m dy[m, o] · A[m, k]        split over m, then `reduce_splits`
// Tiled kernels (layers of 16 or more output channels): the 64×64 tiles of gemm.wgsl
// (prepended to this file), the patches gathered into them on the fly. Direct kernels
// (narrower layers; the naive baseline): one output per invocation, no workgroup memory.
// Index arithmetic (integer division is slow everywhere) is done once per invocation and
// then stepped.

struct Params {
    n: u32, h: u32, w: u32, c_in: u32,
    c_out: u32, k: u32, pad: u32, oh: u32,
    ow: u32, m_total: u32, kdim: u32, w_off: u32,
    split_rows: u32, splits: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// Activations are stored as H (common.wgsl); dst as T3, H for y and dx, f32 for dW.
@group(0) @binding(1) var<storage, read> src: array<H>;            // x (forward, wgrad) or dy (dgrad)
@group(0) @binding(2) var<storage, read> wt: array<f32>;           // weights (c_out, k, k, c_in) at w_off
@group(0) @binding(3) var<storage, read_write> dst: array<T3>;     // y, dx, or dW at w_off
@group(0) @binding(4) var<storage, read> dy: array<H>;             // wgrad: (m_total, c_out)
@group(0) @binding(5) var<storage, read_write> scratch: array<f32>; // rotated kernel, or wgrad partials

// An output pixel m = (b, oy, ox), with `base` the first input value of image b.
struct Pixel {
    m: u32,
    base: u32,
    oy: u32,
    ox: u32,
}

fn pixel(m: u32) -> Pixel {
    let t = m / p.ow;
    return Pixel(m, (t / p.oh) * p.h * p.w * p.c_in, t % p.oh, m % p.ow);
}

// The pixel `by` further on, without dividing.
fn step_pixel(px: Pixel, by: u32) -> Pixel {
    var r = px;
    r.m += by;
    r.ox += by;
    while (r.ox >= p.ow) {
        r.ox -= p.ow;
        r.oy += 1u;
        if (r.oy == p.oh) {
            r.oy = 0u;
            r.base += p.h * p.w * p.c_in;
        }
    }
    return r;
}

// A patch index k = (ky, kx, c), stepped by TK at a time.
struct Tap {
    ky: u32,
    kx: u32,
    c: u32,
}

fn tap(k: u32) -> Tap {
    let t = k / p.c_in;
    return Tap(t / p.k, t % p.k, k % p.c_in);
}

fn advance(t: Tap, by: u32) -> Tap {
    var r = t;
    r.c += by;
    while (r.c >= p.c_in) {
        r.c -= p.c_in;
        r.kx += 1u;
        if (r.kx == p.k) {
            r.kx = 0u;
            r.ky += 1u;
        }
    }
    return r;
}

// A[m, k]: 0 outside the image (padding) or the matrix.
fn patch_value(px: Pixel, t: Tap, k: u32) -> f32 {
    let iy = i32(px.oy + t.ky) - i32(p.pad);
    let ix = i32(px.ox + t.kx) - i32(p.pad);
    if (px.m >= p.m_total || k >= p.kdim || iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return f32(src[px.base + (u32(iy) * p.w + u32(ix)) * p.c_in + t.c]);
}

// y[m, o .. o + 4] = v, inside the matrix.
fn store_output(m: u32, o: u32, v: vec4<f32>) {
    if (m >= p.m_total) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (o + j < p.c_out) {
            dst[m * p.c_out + o + j] = T3(v[j]);
        }
    }
}

// The partial dW[o, k .. k + 4] = v of the split starting at scratch[at], inside the matrix.
fn store_partial(at: u32, o: u32, k: u32, v: vec4<f32>) {
    if (o >= p.c_out) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (k + j < p.kdim) {
            scratch[at + o * p.kdim + k + j] = v[j];
        }
    }
}

// Workgroups: x and z number the tiles of output pixels (z·nwg.x + x), y those of channels.
// Invocation tid stages patch column kk = tid % 16 of tile rows tid / 16 + 16i.
@compute @workgroup_size(16, 16)
fn forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = (wg.z * nwg.x + wg.x) * T;
    let o0 = wg.y * T;
    let tid = lid.y * 16u + lid.x;
    let kk = tid % TK;
    let row = tid / TK;
    let px0 = pixel(m0 + row);
    let px1 = pixel(m0 + row + 16u);
    let px2 = pixel(m0 + row + 32u);
    let px3 = pixel(m0 + row + 48u);
    var t = tap(kk);
    var acc = zero_block();
    for (var k0 = 0u; k0 < p.kdim; k0 += TK) {
        let k = k0 + kk;
        stage_a(kk, row, patch_value(px0, t, k));
        stage_a(kk, row + 16u, patch_value(px1, t, k));
        stage_a(kk, row + 32u, patch_value(px2, t, k));
        stage_a(kk, row + 48u, patch_value(px3, t, k));
        for (var i = 0u; i < 4u; i++) {
            let o = o0 + row + 16u * i;
            var wv = 0.0;
            if (o < p.c_out && k < p.kdim) {
                wv = weight(wt[p.w_off + o * p.kdim + k]);
            }
            stage_b(kk, row + 16u * i, wv);
        }
        t = advance(t, TK);
        workgroupBarrier();
        acc = multiply_slice(acc, lid.y, lid.x);
        workgroupBarrier();
    }
    let m = m0 + 4u * lid.y;
    let o = o0 + 4u * lid.x;
    store_output(m, o, acc.r0);
    store_output(m + 1u, o, acc.r1);
    store_output(m + 2u, o, acc.r2);
    store_output(m + 3u, o, acc.r3);
}

// scratch (c_in, k, k, c_out) = wt (c_out, k, k, c_in) rotated by 180°: the kernel whose
// forward convolution of dy (padded by k − 1 − pad) is dx.
@compute @workgroup_size(256)
fn rotate(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.c_out * p.kdim) {
        return;
    }
    let i = e % p.c_in;
    let t = e / p.c_in;
    let kx = t % p.k;
    let t2 = t / p.k;
    let ky = t2 % p.k;
    let o = t2 / p.k;
    scratch[((i * p.k + (p.k - 1u - ky)) * p.k + (p.k - 1u - kx)) * p.c_out + o] = wt[p.w_off + e];
}

// Partial dW over output pixels [z·split_rows, (z+1)·split_rows): scratch[z][o][k].
// Invocation tid stages tile column col = tid % 64 (an output channel of dy, a patch index
// of A) for the pixels m0 + tid / 64 + 4i of each slice.
@compute @workgroup_size(16, 16)
fn wgrad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let o0 = wg.x * T;
    let k0 = wg.y * T;
    let first = wg.z * p.split_rows;
    let last = min(first + p.split_rows, p.m_total);
    let tid = lid.y * 16u + lid.x;
    let col = tid % T;
    let mm = tid / T;
    let t = tap(k0 + col);
    var px0 = pixel(first + mm);
    var px1 = pixel(first + mm + 4u);
    var px2 = pixel(first + mm + 8u);
    var px3 = pixel(first + mm + 12u);
    var acc = zero_block();
    for (var m0 = first; m0 < last; m0 += TK) {
        stage_wgrad(mm, col, o0 + col, k0 + col, t, px0, last);
        stage_wgrad(mm + 4u, col, o0 + col, k0 + col, t, px1, last);
        stage_wgrad(mm + 8u, col, o0 + col, k0 + col, t, px2, last);
        stage_wgrad(mm + 12u, col, o0 + col, k0 + col, t, px3, last);
        px0 = step_pixel(px0, TK);
        px1 = step_pixel(px1, TK);
        px2 = step_pixel(px2, TK);
        px3 = step_pixel(px3, TK);
        workgroupBarrier();
        acc = multiply_slice(acc, lid.y, lid.x);
        workgroupBarrier();
    }
    let at = wg.z * p.c_out * p.kdim;
    let o = o0 + 4u * lid.y;
    let k = k0 + 4u * lid.x;
    store_partial(at, o, k, acc.r0);
    store_partial(at, o + 1u, k, acc.r1);
    store_partial(at, o + 2u, k, acc.r2);
    store_partial(at, o + 3u, k, acc.r3);
}

// Stages dy[m, o] (tile_a) and A[m, k] (tile_b) at slice position mm.
fn stage_wgrad(mm: u32, col: u32, o: u32, k: u32, t: Tap, px: Pixel, last: u32) {
    var g = 0.0;
    var a = 0.0;
    if (px.m < last) {
        if (o < p.c_out) {
            g = f32(dy[px.m * p.c_out + o]);
        }
        a = patch_value(px, t, k);
    }
    stage_a(mm, col, g);
    stage_b(mm, col, a);
}

// dW = Σ_z scratch[z], summed in order (deterministic), into dst at w_off.
@compute @workgroup_size(256)
fn reduce_splits(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    let len = p.c_out * p.kdim;
    if (e >= len) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < p.splits; z++) {
        s += scratch[z * len + e];
    }
    dst[p.w_off + e] = T3(s);
}

// Direct variants: one output value per invocation, no workgroup memory and no barriers.
// For layers too narrow to fill a quarter of a tile; also the naive baseline the tiled
// kernels are measured against.

@compute @workgroup_size(256)
fn forward_direct(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.m_total * p.c_out) {
        return;
    }
    let o = e % p.c_out;
    let px = pixel(e / p.c_out);
    var s = 0.0;
    for (var ky = 0u; ky < p.k; ky++) {
        let iy = i32(px.oy + ky) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) {
            continue;
        }
        for (var kx = 0u; kx < p.k; kx++) {
            let ix = i32(px.ox + kx) - i32(p.pad);
            if (ix < 0 || ix >= i32(p.w)) {
                continue;
            }
            let xb = px.base + (u32(iy) * p.w + u32(ix)) * p.c_in;
            let wb = p.w_off + o * p.kdim + (ky * p.k + kx) * p.c_in;
            for (var c = 0u; c < p.c_in; c++) {
                s = fma(f32(src[xb + c]), weight(wt[wb + c]), s);
            }
        }
    }
    dst[e] = T3(s);
}

// scratch[z][o][k] = Σ over the pixels of split z of dy[m, o] · A[m, k].
@compute @workgroup_size(256)
fn wgrad_direct(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    let len = p.c_out * p.kdim;
    if (e >= p.splits * len) {
        return;
    }
    let z = e / len;
    let o = (e % len) / p.kdim;
    let k = e % p.kdim;
    let t = tap(k);
    let last = min((z + 1u) * p.split_rows, p.m_total);
    var px = pixel(z * p.split_rows);
    var s = 0.0;
    for (; px.m < last; px = step_pixel(px, 1u)) {
        s = fma(f32(dy[px.m * p.c_out + o]), patch_value(px, t, k), s);
    }
    scratch[e] = s;
}
