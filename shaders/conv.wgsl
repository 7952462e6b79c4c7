// Convolutions, NHWC activations and OHWI weights, stride 1, zero padding.
// As GEMMs: output pixel m = (b, oy, ox), output channel o, patch index k = (ky, kx, c).
//   forward:  y[m, o]  = Σ_k A[m, k] · W[o, k]        A = the patches of x, gathered on the fly
//   dgrad:    forward of dy with the rotated, channel-swapped kernel (`rotate`)
//   wgrad:    dW[o, k] = Σ_m dy[m, o] · A[m, k]        split over m, then `reduce_splits`
// Workgroups of 16×16 invocations compute T×T output tiles, each invocation an R×R register
// block, from 16-deep slices of A and W staged in workgroup memory (8 KiB for R = 4).
// R comes from the preamble: 4 for wide layers, 1 where fewer than 64 channels would leave
// most of a 64-wide tile idle. Index arithmetic (integer division is slow everywhere) is
// done once per invocation and then stepped, not redone per element.

struct Params {
    n: u32, h: u32, w: u32, c_in: u32,
    c_out: u32, k: u32, pad: u32, oh: u32,
    ow: u32, m_total: u32, kdim: u32, w_off: u32,
    split_rows: u32, splits: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;          // x (forward, wgrad) or dy (dgrad)
@group(0) @binding(2) var<storage, read> wt: array<f32>;           // weights (c_out, k, k, c_in) at w_off
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;    // y, dx, or dW at w_off
@group(0) @binding(4) var<storage, read> dy: array<f32>;           // wgrad: (m_total, c_out)
@group(0) @binding(5) var<storage, read_write> scratch: array<f32>; // rotated kernel, or wgrad partials

const T: u32 = 16u * R; // output tile side
const TK: u32 = 16u;    // reduction slice

var<workgroup> tile_a: array<f32, TK * T>; // [TK][T]
var<workgroup> tile_b: array<f32, TK * T>; // [TK][T]

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
    return src[px.base + (u32(iy) * p.w + u32(ix)) * p.c_in + t.c];
}

// Accumulates the TK-deep slice staged in tile_a (rows) and tile_b (columns).
fn multiply_slice(acc: ptr<function, array<f32, R * R>>, row: u32, col: u32) {
    for (var kk = 0u; kk < TK; kk++) {
        var a: array<f32, R>;
        var b: array<f32, R>;
        for (var i = 0u; i < R; i++) {
            a[i] = tile_a[kk * T + row + 16u * i];
            b[i] = tile_b[kk * T + col + 16u * i];
        }
        for (var i = 0u; i < R; i++) {
            for (var j = 0u; j < R; j++) {
                (*acc)[i * R + j] = fma(a[i], b[j], (*acc)[i * R + j]);
            }
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
    var px: array<Pixel, R>;
    for (var i = 0u; i < R; i++) {
        px[i] = pixel(m0 + tid / TK + 16u * i);
    }
    var t = tap(kk);
    var acc: array<f32, R * R>;
    for (var k0 = 0u; k0 < p.kdim; k0 += TK) {
        let k = k0 + kk;
        for (var i = 0u; i < R; i++) {
            let r = tid / TK + 16u * i;
            tile_a[kk * T + r] = patch_value(px[i], t, k);
            let o = o0 + r;
            var wv = 0.0;
            if (o < p.c_out && k < p.kdim) {
                wv = wt[p.w_off + o * p.kdim + k];
            }
            tile_b[kk * T + r] = wv;
        }
        t = advance(t, TK);
        workgroupBarrier();
        multiply_slice(&acc, lid.y, lid.x);
        workgroupBarrier();
    }
    for (var i = 0u; i < R; i++) {
        let m = m0 + lid.y + 16u * i;
        for (var j = 0u; j < R; j++) {
            let o = o0 + lid.x + 16u * j;
            if (m < p.m_total && o < p.c_out) {
                dst[m * p.c_out + o] = acc[i * R + j];
            }
        }
    }
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
// Invocation tid stages tile column col = tid % T (an output channel of dy, a patch index
// of A) for pixels m0 + tid / T + (256 / T)·i.
@compute @workgroup_size(16, 16)
fn wgrad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let o0 = wg.x * T;
    let k0 = wg.y * T;
    let first = wg.z * p.split_rows;
    let last = min(first + p.split_rows, p.m_total);
    let tid = lid.y * 16u + lid.x;
    let col = tid % T;
    let o = o0 + col;
    let k = k0 + col;
    let t = tap(k);
    let rows_per_pass = 256u / T;
    var px: array<Pixel, R>;
    for (var i = 0u; i < R; i++) {
        px[i] = pixel(first + tid / T + rows_per_pass * i);
    }
    var acc: array<f32, R * R>;
    for (var m0 = first; m0 < last; m0 += TK) {
        for (var i = 0u; i < R; i++) {
            let mm = tid / T + rows_per_pass * i;
            var g = 0.0;
            var a = 0.0;
            if (px[i].m < last) {
                if (o < p.c_out) {
                    g = dy[px[i].m * p.c_out + o];
                }
                a = patch_value(px[i], t, k);
            }
            tile_a[mm * T + col] = g;
            tile_b[mm * T + col] = a;
            px[i] = step_pixel(px[i], TK);
        }
        workgroupBarrier();
        multiply_slice(&acc, lid.y, lid.x);
        workgroupBarrier();
    }
    for (var i = 0u; i < R; i++) {
        let oo = o0 + lid.y + 16u * i;
        for (var j = 0u; j < R; j++) {
            let kk = k0 + lid.x + 16u * j;
            if (oo < p.c_out && kk < p.kdim) {
                scratch[(wg.z * p.c_out + oo) * p.kdim + kk] = acc[i * R + j];
            }
        }
    }
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
    dst[p.w_off + e] = s;
}

// Direct variants: one output value per invocation, no workgroup memory and no barriers.
// For CPU-emulated adapters (lavapipe, SwiftShader), where barriers cost more than they save;
// also the naive baseline the tiled kernels are measured against.

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
                s = fma(src[xb + c], wt[wb + c], s);
            }
        }
    }
    dst[e] = s;
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
        s = fma(dy[px.m * p.c_out + o], patch_value(px, t, k), s);
    }
    scratch[e] = s;
}
