// The tiles of the GEMM kernels, prepended to conv.wgsl and linalg.wgsl (after common.wgsl).
// Workgroups of 16×16 invocations compute 64×64 output tiles from TK-deep slices of the two
// operands staged in workgroup memory (8 KiB); each invocation accumulates a 4×4 block in
// four vec4 registers, reading one vec4 from each tile per step.

const T: u32 = 64u;  // output tile side
const TK: u32 = 16u; // reduction slice

var<workgroup> tile_a: array<vec4<f32>, 256>; // [TK][T / 4]: the rows of the output tile
var<workgroup> tile_b: array<vec4<f32>, 256>; // [TK][T / 4]: its columns

// A 4×4 block of the output tile: row 4·ty + i, columns 4·tx .. 4·tx + 3 in `r{i}`.
struct Block {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

fn zero_block() -> Block {
    return Block(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
}

// Adds the TK-deep slice staged in tile_a (rows) and tile_b (columns) to `acc`.
fn multiply_slice(acc: Block, ty: u32, tx: u32) -> Block {
    var r = acc;
    for (var kk = 0u; kk < TK; kk++) {
        let a = tile_a[kk * 16u + ty];
        let b = tile_b[kk * 16u + tx];
        r.r0 = fma(vec4<f32>(a.x), b, r.r0);
        r.r1 = fma(vec4<f32>(a.y), b, r.r1);
        r.r2 = fma(vec4<f32>(a.z), b, r.r2);
        r.r3 = fma(vec4<f32>(a.w), b, r.r3);
    }
    return r;
}

fn stage_a(kk: u32, r: u32, v: f32) {
    tile_a[kk * 16u + r / 4u][r % 4u] = v;
}

fn stage_b(kk: u32, r: u32, v: f32) {
    tile_b[kk * 16u + r / 4u][r % 4u] = v;
}
