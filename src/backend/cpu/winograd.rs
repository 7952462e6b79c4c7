//! Winograd F(4×4, 3×3) for the 3×3 convolutions (Lavin & Gray, 2015): each 4×4 block of
//! outputs comes from a 6×6 input tile through 36 element-wise products instead of 144
//! multiply-adds, so the GEMMs — one per tile element ξ, over all tiles of a chunk — do a
//! quarter of a direct convolution's work. The transforms are separable (a matrix from the
//! left, then one from the right) and run over whole channel vectors (NHWC keeps them
//! contiguous); the GEMMs are `gemm.rs`'s; every sum has a fixed order, so the result is
//! deterministic whatever the thread count.

use super::gemm::{gemm, pack, packed_len, row_major, transposed, Rhs};
use super::{fixed_groups, sum_in_order, THREAD_SCRATCH};
use crate::backend::ConvShape;
use rayon::prelude::*;

/// Outputs per tile side.
const M: usize = 4;
/// Inputs per tile side (M + 3 − 1), and the number of tile elements ξ.
const A: usize = 6;
const AA: usize = A * A;
/// Tiles per GEMM: enough rows per call, few enough that a chunk's tiles stay in cache
/// (64 and 256 measured within the run-to-run noise of 128).
const TILES_PER_CHUNK: usize = 128;
/// Tiles per weight-gradient GEMM, whose reduction runs over tiles: longer, so that each
/// call's (c_out, c_in) result is read and written fewer times. It sets where the sums over
/// tiles restart, so it is part of the rounding (a multiple of 256 keeps today's bits).
const TILES_PER_WGRAD_CHUNK: usize = 256;

// The transforms of F(4, 3) from the interpolation points 0, 1, −1, 2, −1/2 and ∞ (Toom–Cook,
// the 1/f normalisation in G): Barabasz et al. (2020) show these points round less than
// Lavin's 0, ±1, ±2; here 3.2e-6 against 9.8e-6 of the largest output of a conv with 256
// input channels (tests/ops.rs `conv_deep`, whose tolerance is 1e-5).

/// Input transform Bᵀ (A, A): V = Bᵀ d B for a 6×6 input tile d.
const BT: [[f32; A]; A] = [
    [1.0, 1.5, -2.0, -1.5, 1.0, 0.0],
    [0.0, -1.0, -2.5, -0.5, 1.0, 0.0],
    [0.0, 1.0, 0.5, -2.5, 1.0, 0.0],
    [0.0, -0.5, -1.0, 0.5, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 1.0, 1.5, -2.0, -1.5, 1.0],
];
/// Filter transform G (A, 3): U = G g Gᵀ for a 3×3 filter g.
const G: [[f32; 3]; A] = [
    [1.0, 0.0, 0.0],
    [-1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
    [1.0 / 3.0, -1.0 / 3.0, 1.0 / 3.0],
    [1.0 / 15.0, 2.0 / 15.0, 4.0 / 15.0],
    [-16.0 / 15.0, 8.0 / 15.0, -4.0 / 15.0],
    [0.0, 0.0, 1.0],
];
/// Output transform Aᵀ (M, A): y = Aᵀ m A for a 6×6 tile of products m.
const AT: [[f32; A]; M] =
    [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -0.5, 0.0], [0.0, 1.0, 1.0, 4.0, 0.25, 0.0], [0.0, 1.0, -1.0, 8.0, -0.125, 1.0]];

/// Aᵀ's adjoint A (A, M): the output gradient's transform, dm = A dy Aᵀ.
const A_OF_AT: [[f32; M]; A] = transpose(AT);
/// Gᵀ (3, A): the filter gradient's transform, dw = Gᵀ du G.
const GT: [[f32; A]; 3] = transpose(G);

const fn transpose<const R: usize, const C: usize>(m: [[f32; C]; R]) -> [[f32; R]; C] {
    let mut t = [[0.0; R]; C];
    let mut i = 0;
    while i < R {
        let mut j = 0;
        while j < C {
            t[j][i] = m[i][j];
            j += 1;
        }
        i += 1;
    }
    t
}

/// f32 values of one thread's scratch for a layer of `c_in → c_out` channels: the largest of
/// `forward`'s and `backward_filter`'s (for images of at most 256 tiles, 64×64 outputs).
pub fn scratch_len(c_in: usize, c_out: usize) -> usize {
    AA * (TILES_PER_CHUNK.max(TILES_PER_WGRAD_CHUNK) * (c_in + c_out) + c_in * c_out) + packed_len(TILES_PER_WGRAD_CHUNK, c_in)
}

/// Whether a convolution takes this path: 3×3 filters, any padding, stride 1.
pub fn applies(s: &ConvShape) -> bool {
    s.k == 3
}

/// Tiles per image (rows, columns) covering the output.
fn tiles(s: &ConvShape) -> (usize, usize) {
    (s.out_h().div_ceil(M), s.out_w().div_ceil(M))
}

fn images_per_chunk(s: &ConvShape, tiles_wanted: usize) -> usize {
    let (th, tw) = tiles(s);
    (tiles_wanted / (th * tw)).max(1)
}

/// Lanes per block in `apply`: one AVX2 register (AVX-512 blocks of 16 come first where the
/// CPU has them: see `widest!`).
const LANES: usize = 8;

/// `dst[r] = Σ_k mat[r][k]·src[k]` for `R` output and `K` input vectors of `len` lanes, input
/// `k` at `src[k·src_stride..]` and output `r` at `dst[r·dst_stride..]`; per lane k ascending
/// with fused multiply-adds (so the same bits whatever `WIDE`, the lanes per block of the
/// first pass). Zero coefficients are multiplied too: a branch on each cost more (the
/// compiler does not fold the constant matrices into the loop).
#[inline(always)]
fn apply<const R: usize, const K: usize, const WIDE: usize>(
    mat: &[[f32; K]; R],
    src: &[f32],
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    len: usize,
) {
    let mut lane = 0;
    while lane + WIDE <= len {
        apply_block::<R, K, WIDE>(mat, src, src_stride, dst, dst_stride, lane);
        lane += WIDE;
    }
    while lane + LANES <= len {
        apply_block::<R, K, LANES>(mat, src, src_stride, dst, dst_stride, lane);
        lane += LANES;
    }
    for lane in lane..len {
        apply_block::<R, K, 1>(mat, src, src_stride, dst, dst_stride, lane);
    }
}

/// `apply` on the `W` lanes from `lane`.
#[inline(always)]
fn apply_block<const R: usize, const K: usize, const W: usize>(
    mat: &[[f32; K]; R],
    src: &[f32],
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    lane: usize,
) {
    let x: [[f32; W]; K] = std::array::from_fn(|k| src[k * src_stride + lane..][..W].try_into().expect("W lanes"));
    for (r, row) in mat.iter().enumerate() {
        let mut acc = [0.0f32; W];
        for (xk, &m) in x.iter().zip(row) {
            acc.iter_mut().zip(xk).for_each(|(a, &v)| *a = m.mul_add(v, *a));
        }
        dst[r * dst_stride + lane..][..W].copy_from_slice(&acc);
    }
}

/// `dst (R, C) = L (R, K) · src (K, K) · Rᵀ (K, C)` over vectors of `len` lanes: element
/// (i, j) of `src` is read at `i·src_row + j·src_col`, of `dst` written at
/// `i·dst_row + j·dst_col` (so tiles are read and written in place in ξ-major buffers);
/// `half` (R, K, len) holds `L · src`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn two_sided<const R: usize, const C: usize, const K: usize, const WIDE: usize>(
    left: &[[f32; K]; R],
    right: &[[f32; K]; C],
    src: &[f32],
    (src_row, src_col): (usize, usize),
    half: &mut [f32],
    dst: &mut [f32],
    (dst_row, dst_col): (usize, usize),
    len: usize,
) {
    for j in 0..K {
        apply::<R, K, WIDE>(left, &src[j * src_col..], src_row, &mut half[j * len..], K * len, len);
    }
    for i in 0..R {
        apply::<C, K, WIDE>(right, &half[i * K * len..], len, &mut dst[i * dst_row..], dst_col, len);
    }
}

widest! {
    fn transform_input(s: &ConvShape, x: &[f32], b0: usize, count: usize, v: &mut [f32]) lanes WIDE {
        transform_input_with::<WIDE>(s, x, b0, count, v)
    }
}
widest! {
    fn transform_output(s: &ConvShape, m: &[f32], count: usize, y: &mut [f32]) lanes WIDE {
        transform_output_with::<WIDE>(s, m, count, y)
    }
}
widest! {
    fn transform_output_grad(s: &ConvShape, dy: &[f32], b0: usize, count: usize, dm: &mut [f32]) lanes WIDE {
        transform_output_grad_with::<WIDE>(s, dy, b0, count, dm)
    }
}

/// `V (AA, tiles, c_in)`: the transformed 6×6 input tiles of images `b0..b0+count` of `x`.
#[inline(always)] // into both of `widest`'s copies
fn transform_input_with<const WIDE: usize>(s: &ConvShape, x: &[f32], b0: usize, count: usize, v: &mut [f32]) {
    let (c, (th, tw)) = (s.c_in, tiles(s));
    let t_all = count * th * tw;
    let (mut tile, mut half) = (vec![0.0; AA * c], vec![0.0; AA * c]); // (A, A, c_in) each
    for (t, (b, ty, tx)) in (0..count).flat_map(|b| (0..th).flat_map(move |ty| (0..tw).map(move |tx| (b, ty, tx)))).enumerate() {
        let image = &x[(b0 + b) * s.h * s.w * c..(b0 + b + 1) * s.h * s.w * c];
        let (y0, x0) = ((ty * M) as isize - s.pad as isize, (tx * M) as isize - s.pad as isize);
        let dst = (&mut v[t * c..], (A * t_all * c, t_all * c));
        if y0 >= 0 && x0 >= 0 && y0 as usize + A <= s.h && x0 as usize + A <= s.w {
            // inside the image: read the tile in place
            let at = (y0 as usize * s.w + x0 as usize) * c;
            two_sided::<A, A, A, WIDE>(&BT, &BT, &image[at..], (s.w * c, c), &mut half, dst.0, dst.1, c);
            continue;
        }
        for (i, j) in (0..A).flat_map(|i| (0..A).map(move |j| (i, j))) {
            let (iy, ix) = (y0 + i as isize, x0 + j as isize);
            let dst = &mut tile[(i * A + j) * c..(i * A + j + 1) * c];
            if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                dst.fill(0.0);
            } else {
                let at = (iy as usize * s.w + ix as usize) * c;
                dst.copy_from_slice(&image[at..at + c]);
            }
        }
        two_sided::<A, A, A, WIDE>(&BT, &BT, &tile, (A * c, c), &mut half, dst.0, dst.1, c);
    }
}

/// `U (AA, c_in, c_out)`: the transformed filters `G g Gᵀ` of `w (c_out, 3, 3, c_in)`, each
/// ξ's (c_in, c_out) row-major, to be packed as the GEMM's right-hand side.
fn transform_filter(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let lanes = s.c_in * s.c_out;
    let mut taps = vec![0.0f32; 9 * lanes]; // (3, 3, c_in, c_out)
    for (o, filter) in w[..9 * lanes].chunks_exact(9 * s.c_in).enumerate() {
        for (i, &v) in filter.iter().enumerate() {
            taps[i * s.c_out + o] = v;
        }
    }
    let mut u = vec![0.0f32; AA * lanes];
    u.par_chunks_mut(lanes).enumerate().for_each(|(xi, u)| {
        let coeff: [f32; 9] = std::array::from_fn(|tap| G[xi / A][tap / 3] * G[xi % A][tap % 3]);
        apply::<1, 9, LANES>(&[coeff], &taps, lanes, u, 0, lanes);
    });
    u
}

/// `y (count, oh, ow, c_out) = Aᵀ m A` of every tile of `m (AA, tiles, c_out)`, clipped to the output.
#[inline(always)] // into both of `widest`'s copies
fn transform_output_with<const WIDE: usize>(s: &ConvShape, m: &[f32], count: usize, y: &mut [f32]) {
    let (c, (th, tw), (oh, ow)) = (s.c_out, tiles(s), (s.out_h(), s.out_w()));
    let t_all = count * th * tw;
    let (mut half, mut out) = (vec![0.0; M * A * c], vec![0.0; M * M * c]); // (M, A, c_out), (M, M, c_out)
    for (t, (b, ty, tx)) in (0..count).flat_map(|b| (0..th).flat_map(move |ty| (0..tw).map(move |tx| (b, ty, tx)))).enumerate() {
        let src = (&m[t * c..], (A * t_all * c, t_all * c));
        let (y0, x0) = (ty * M, tx * M);
        if y0 + M <= oh && x0 + M <= ow {
            // inside the output: write the tile in place
            let at = ((b * oh + y0) * ow + x0) * c;
            two_sided::<M, M, A, WIDE>(&AT, &AT, src.0, src.1, &mut half, &mut y[at..], (ow * c, c), c);
            continue;
        }
        two_sided::<M, M, A, WIDE>(&AT, &AT, src.0, src.1, &mut half, &mut out, (M * c, c), c);
        for (i, j) in (0..M).flat_map(|i| (0..M).map(move |j| (i, j))) {
            let (oy, ox) = (y0 + i, x0 + j);
            if oy < oh && ox < ow {
                let at = ((b * oh + oy) * ow + ox) * c;
                y[at..at + c].copy_from_slice(&out[(i * M + j) * c..(i * M + j + 1) * c]);
            }
        }
    }
}

/// `y (n, oh, ow, c_out) = x (n, h, w, c_in) ⊛ w (c_out, 3, 3, c_in)`.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let u = transform_filter(s, w);
    let u_len = packed_len(s.c_in, s.c_out);
    let mut panels = vec![0.0f32; AA * u_len];
    let u: Vec<Rhs> = panels
        .chunks_exact_mut(u_len)
        .zip(u.chunks_exact(s.c_in * s.c_out))
        .map(|(out, u)| pack(u, s.c_in, s.c_out, s.c_out, out))
        .collect();
    let (th, tw) = tiles(s);
    let (ipc, out_len) = (images_per_chunk(s, TILES_PER_CHUNK), s.out_h() * s.out_w() * s.c_out);
    y[..s.n * out_len].par_chunks_mut(ipc * out_len).enumerate().for_each(|(chunk, y)| {
        let count = y.len() / out_len;
        let t = count * th * tw;
        THREAD_SCRATCH.with_borrow_mut(|scratch| {
            scratch.resize(AA * t * (s.c_in + s.c_out), 0.0);
            let (v, m) = scratch.split_at_mut(AA * t * s.c_in); // (AA, t, c_in), (AA, t, c_out)
            transform_input(s, x, chunk * ipc, count, v);
            for xi in 0..AA {
                // m[ξ] (t, c_out) = v[ξ] (t, c_in) · u[ξ] (c_in, c_out)
                let v = row_major(&v[xi * t * s.c_in..], s.c_in, s.c_in);
                gemm(t, &v, u[xi], &mut m[xi * t * s.c_out..], false);
            }
            transform_output(s, m, count, y);
        });
    });
}

/// `dm (AA, tiles, c_out)`: the adjoint of the output transform, `A dy Aᵀ`, of images
/// `b0..b0+count` of `dy`, with zeros where a tile overhangs the output.
#[inline(always)] // into both of `widest`'s copies
fn transform_output_grad_with<const WIDE: usize>(s: &ConvShape, dy: &[f32], b0: usize, count: usize, dm: &mut [f32]) {
    let (c, (th, tw), (oh, ow)) = (s.c_out, tiles(s), (s.out_h(), s.out_w()));
    let t_all = count * th * tw;
    let (mut tile, mut half) = (vec![0.0; M * M * c], vec![0.0; A * M * c]); // (M, M, c_out), (A, M, c_out)
    for (t, (b, ty, tx)) in (0..count).flat_map(|b| (0..th).flat_map(move |ty| (0..tw).map(move |tx| (b, ty, tx)))).enumerate() {
        let image = &dy[(b0 + b) * oh * ow * c..(b0 + b + 1) * oh * ow * c];
        for (i, j) in (0..M).flat_map(|i| (0..M).map(move |j| (i, j))) {
            let (oy, ox) = (ty * M + i, tx * M + j);
            let dst = &mut tile[(i * M + j) * c..(i * M + j + 1) * c];
            if oy < oh && ox < ow {
                dst.copy_from_slice(&image[(oy * ow + ox) * c..(oy * ow + ox + 1) * c]);
            } else {
                dst.fill(0.0);
            }
        }
        two_sided::<A, A, M, WIDE>(&A_OF_AT, &A_OF_AT, &tile, (M * c, c), &mut half, &mut dm[t * c..], (A * t_all * c, t_all * c), c);
    }
}

/// `dw (c_out, 3, 3, c_in) = Σ_pixels dy ⊗ patch` through the adjoint of `forward`:
/// `dU[ξ] = Σ_tiles dm[ξ]ᵀ v[ξ]`, then `dw = Gᵀ dU G`; partial sums over a fixed partition
/// of the images, added in a fixed order.
pub fn backward_filter(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (cin, cout, (th, tw)) = (s.c_in, s.c_out, tiles(s));
    let ipc = images_per_chunk(s, TILES_PER_WGRAD_CHUNK);
    let partials: Vec<Vec<f32>> = fixed_groups(s.n)
        .into_par_iter()
        .map(|images| {
            let lanes = cout * cin;
            let mut partial = vec![0.0f32; cout * 9 * cin]; // (c_out, 3, 3, c_in)
            THREAD_SCRATCH.with_borrow_mut(|scratch| {
                let most = ipc.min(images.len()) * th * tw;
                scratch.resize(AA * (most * (cin + cout) + lanes) + packed_len(most, cin), 0.0);
                let (du, scratch) = scratch.split_at_mut(AA * lanes); // (AA, c_out, c_in)
                let (panels, scratch) = scratch.split_at_mut(packed_len(most, cin)); // v[ξ] packed
                for b0 in images.clone().step_by(ipc) {
                    let count = ipc.min(images.end - b0);
                    let t = count * th * tw;
                    let (v, dm) = scratch.split_at_mut(AA * t * cin); // (AA, t, c_in), (AA, t, c_out)
                    transform_input(s, x, b0, count, v);
                    transform_output_grad(s, dy, b0, count, dm);
                    for xi in 0..AA {
                        // du[ξ] (c_out, c_in) (+)= dm[ξ]ᵀ · v[ξ]: row o of dm[ξ]ᵀ is column o of dm[ξ] (t, c_out).
                        let dm_t = transposed(&dm[xi * t * cout..], t, cout);
                        let v = pack(&v[xi * t * cin..], t, cin, cin, panels);
                        gemm(cout, &dm_t, v, &mut du[xi * lanes..], b0 != images.start);
                    }
                }
                // dw[o] (3, 3, c_in) = Gᵀ du[·, o] G
                let half = &mut scratch[..3 * A * cin]; // (3, A, c_in)
                for o in 0..cout {
                    two_sided::<3, 3, A, LANES>(
                        &GT,
                        &GT,
                        &du[o * cin..],
                        (A * lanes, lanes),
                        half,
                        &mut partial[o * 9 * cin..],
                        (3 * cin, cin),
                        cin,
                    );
                }
            });
            partial
        })
        .collect();
    sum_in_order(&partials, &mut dw[..s.c_out * 9 * s.c_in]);
}
