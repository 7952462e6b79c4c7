// Dense matrix products for the optimizer (Muon's Newton–Schulz iterations: X·Xᵀ, A·A, B·X),
// row-major, on the 64×64 tiles of gemm.wgsl (prepended to this file):
//   c (m, n) = alpha · a (m, k) · b (k, n) + beta · c,   b stored (n, k) when b_transposed.
// With splits > 1 (few output tiles, a long k) the sum over k is split into `splits` ranges
// of `split_k` values: `matmul` writes each range's product to `partials`, and
// `matmul_reduce` adds them in order (deterministic) and applies alpha and beta.
// beta == 0 never reads c, so whatever it holds (NaN too) is ignored.

struct Params {
    m: u32, k: u32, n: u32, a_off: u32,
    b_off: u32, c_off: u32, b_transposed: u32, split_k: u32,
    splits: u32, alpha: f32, beta: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;               // (m, k) at a_off
@group(0) @binding(2) var<storage, read> b: array<f32>;               // (k, n), or (n, k) transposed, at b_off
@group(0) @binding(3) var<storage, read_write> c: array<f32>;         // (m, n) at c_off
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;  // (splits, m, n)

// c[row, col .. col + 4] (or the partial product of split z) from the block row v.
fn store_row(z: u32, row: u32, col: u32, v: vec4<f32>) {
    if (row >= p.m) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (col + j >= p.n) {
            return;
        }
        let e = row * p.n + col + j;
        if (p.splits > 1u) {
            partials[z * p.m * p.n + e] = v[j];
        } else if (p.beta == 0.0) {
            c[p.c_off + e] = p.alpha * v[j];
        } else {
            c[p.c_off + e] = p.alpha * v[j] + p.beta * c[p.c_off + e];
        }
    }
}

// Workgroups: x numbers the tiles of columns, y those of rows, z the split of k.
// Invocation tid stages column kk = tid % 16 of the slice for the tile rows tid / 16 + 16i
// of a (and of b when transposed: both read along k); b (k, n) is staged a row of the slice
// at a time instead, tid / 64 + 4i, at column tid % 64, so that reads run along n.
@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m0 = wg.y * T;
    let n0 = wg.x * T;
    let first = wg.z * p.split_k;
    let last = min(first + p.split_k, p.k);
    let tid = lid.y * 16u + lid.x;
    let kk = tid % TK;
    let row = tid / TK;
    let col = tid % T;
    let slice_row = tid / T;
    var acc = zero_block();
    for (var k0 = first; k0 < last; k0 += TK) {
        let k = k0 + kk;
        for (var i = 0u; i < 4u; i++) {
            let r = row + 16u * i;
            var av = 0.0;
            if (m0 + r < p.m && k < last) {
                av = a[p.a_off + (m0 + r) * p.k + k];
            }
            stage_a(kk, r, av);
        }
        if (p.b_transposed == 1u) {
            for (var i = 0u; i < 4u; i++) {
                let r = row + 16u * i;
                var bv = 0.0;
                if (n0 + r < p.n && k < last) {
                    bv = b[p.b_off + (n0 + r) * p.k + k];
                }
                stage_b(kk, r, bv);
            }
        } else {
            for (var i = 0u; i < 4u; i++) {
                let s = slice_row + 4u * i;
                var bv = 0.0;
                if (n0 + col < p.n && k0 + s < last) {
                    bv = b[p.b_off + (k0 + s) * p.n + n0 + col];
                }
                stage_b(s, col, bv);
            }
        }
        workgroupBarrier();
        acc = multiply_slice(acc, lid.y, lid.x);
        workgroupBarrier();
    }
    let r = m0 + 4u * lid.y;
    let cc = n0 + 4u * lid.x;
    store_row(wg.z, r, cc, acc.r0);
    store_row(wg.z, r + 1u, cc, acc.r1);
    store_row(wg.z, r + 2u, cc, acc.r2);
    store_row(wg.z, r + 3u, cc, acc.r3);
}

// c = alpha · Σ_z partials[z] (in order) + beta · c, one invocation per value.
@compute @workgroup_size(256)
fn matmul_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    let len = p.m * p.n;
    if (e >= len) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < p.splits; z++) {
        s += partials[z * len + e];
    }
    if (p.beta == 0.0) {
        c[p.c_off + e] = p.alpha * s;
    } else {
        c[p.c_off + e] = p.alpha * s + p.beta * c[p.c_off + e];
    }
}
