//! The convolutions' GEMM, `C (m, n) (+)= A (m, k) · B (k, n)`, without packing A: a register
//! tile of C (`MR` rows × `NR` columns) is a chain of fused multiply-adds that reads A where it
//! lies — rows anywhere in memory, elements at a fixed step: the pixels of a padded image
//! (the direct convolution without im2col), Winograd's transformed tiles, a transposed
//! matrix — and B from panels of `NR` columns (`Rhs`, `pack`), each panel's k rows one
//! contiguous run, so that a tile's reads of B are sequential (rows of a wide B read `NR` at a
//! time at a stride of a whole row cost up to a fifth of a Winograd product's time when B
//! comes from L3). A general SGEMM copies both operands on every call; here B is packed once
//! per filter (per call of a convolution) or per chunk, and A needs no copy at all.
//!
//! Rounding: each element of C is one chain of fused multiply-adds over k ascending, restarted
//! every `KC` products and added to C (`C = s₀`, `C = C + s₁`, …), at every position of C,
//! whatever the tile, the thread count or the instruction set. Equal patches so give equal
//! outputs (the max-pools' ties), and the results are bitwise those of `matrixmultiply` (the
//! same chains and the same `KC`), which this replaced for the convolutions. `sgemm` at the
//! end is `matrixmultiply`'s general SGEMM, for the products whose operands come with any
//! strides (the linear layers, Muon).

use std::ptr;

/// Products per chain before it is added to C (`matrixmultiply`'s KC: the same rounding).
const KC: usize = 256;
/// Rows of A per block: with one `KC` slice of them (~96 KiB at KC floats a row) they stay in
/// the L2 cache while every column tile of B runs over them.
const ROW_BLOCK: usize = 96;

/// A run of consecutive k whose elements lie at `offset + j·step` from a row's start.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub offset: usize,
    pub len: usize,
}

/// The left operand: element (i, k) of A is `data[row(i) + segment.offset + j·step]`, where k
/// is the j-th element of `segment` and the segments follow each other along k.
pub struct Lhs<'a, F: Fn(usize) -> usize> {
    pub data: &'a [f32],
    pub row: F,
    pub segments: Segments<'a>,
    pub step: usize,
}

/// A row's segments: one (`row_major`, `transposed`), or the caller's list (no allocation
/// per call either way).
pub enum Segments<'a> {
    One(Segment),
    Many(&'a [Segment]),
}

impl Segments<'_> {
    fn as_slice(&self) -> &[Segment] {
        match self {
            Segments::One(s) => std::slice::from_ref(s),
            Segments::Many(s) => s,
        }
    }
}

/// A (m, k) row-major in `data`, row i at `i·ld`.
pub fn row_major(data: &[f32], k: usize, ld: usize) -> Lhs<'_, impl Fn(usize) -> usize> {
    Lhs { data, row: move |i| i * ld, segments: Segments::One(Segment { offset: 0, len: k }), step: 1 }
}

/// A = Dᵀ for a row-major D (k, m) in `data` with `ld` floats a row: row i of A is column i
/// of D.
pub fn transposed(data: &[f32], k: usize, ld: usize) -> Lhs<'_, impl Fn(usize) -> usize> {
    Lhs { data, row: |i| i, segments: Segments::One(Segment { offset: 0, len: k }), step: ld }
}

/// The right operand B (k, n) in panels: panel p holds columns `p·width..(p+1)·width` as k
/// rows of `width` contiguous floats, `(n / width, k, width)`, the last panel zero-padded.
#[derive(Clone, Copy)]
pub struct Rhs<'a> {
    data: &'a [f32],
    k: usize,
    n: usize,
    width: usize,
}

/// Columns per panel of `Rhs` on this CPU: the `NR` of the widest register tile it can run
/// (which `gemm` then runs).
pub fn panel_width() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return 32;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return 16;
        }
    }
    8
}

/// Floats of `pack`'s output for a B of `k` rows and `n` columns.
pub fn packed_len(k: usize, n: usize) -> usize {
    let width = panel_width();
    n.div_ceil(width) * width * k
}

/// B (k, n), row-major with `ldb` floats between rows, packed into `out` as `Rhs`.
pub fn pack<'a>(b: &[f32], k: usize, n: usize, ldb: usize, out: &'a mut [f32]) -> Rhs<'a> {
    pack_as(panel_width(), b, k, n, ldb, out)
}

fn pack_as<'a>(width: usize, b: &[f32], k: usize, n: usize, ldb: usize, out: &'a mut [f32]) -> Rhs<'a> {
    assert!(k > 0 && ldb >= n && b.len() >= (k - 1) * ldb + n, "pack: B too short");
    let out = &mut out[..n.div_ceil(width) * width * k];
    for (p, panel) in out.chunks_exact_mut(k * width).enumerate() {
        let cols = width.min(n - p * width);
        for (row, dst) in panel.chunks_exact_mut(width).enumerate() {
            dst[..cols].copy_from_slice(&b[row * ldb + p * width..][..cols]);
            dst[cols..].fill(0.0);
        }
    }
    Rhs { data: out, k, n, width }
}

/// One product's operands as the blocked loops read them (C aside).
struct Product<'a, F: Fn(usize) -> usize> {
    m: usize,
    a: &'a Lhs<'a, F>,
    b: Rhs<'a>,
    accumulate: bool,
}

/// `C (m, n) = A · B`, or `C += A · B` when `accumulate`, for B (k, n) packed by `pack`; C
/// row-major without gaps (`n` floats a row).
pub fn gemm<F: Fn(usize) -> usize>(m: usize, a: &Lhs<F>, b: Rhs, c: &mut [f32], accumulate: bool) {
    let (k, n) = (a.segments.as_slice().iter().map(|s| s.len).sum::<usize>(), b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0 && a.segments.as_slice().iter().all(|s| s.len > 0), "gemm: empty reduction");
    assert!(b.k == k && b.width == panel_width(), "gemm: B packed for another shape or CPU");
    assert!(c.len() >= m * n, "gemm: C too short");
    // The farthest element of A from a row's start; every row is checked against it below.
    let reach = a.segments.as_slice().iter().map(|s| s.offset + (s.len - 1) * a.step).max().unwrap_or(0);
    assert!((0..m).all(|i| (a.row)(i) + reach < a.data.len()), "gemm: A's rows overrun its data");
    let p = Product { m, a, b, accumulate };
    // SAFETY: the asserts above keep every read of A and B and every write of C in bounds,
    // and `panel_width` chose the tile whose instructions this CPU has.
    unsafe {
        match b.width {
            #[cfg(target_arch = "x86_64")]
            32 => blocked_avx512(&p, c),
            #[cfg(target_arch = "x86_64")]
            16 => blocked_avx2(&p, c),
            _ => blocked::<8, 8, F>(&p, c),
        }
    }
}

/// 8 × 32: sixteen 512-bit accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn blocked_avx512<F: Fn(usize) -> usize>(p: &Product<F>, c: &mut [f32]) {
    blocked::<8, 32, F>(p, c)
}

/// 6 × 16: twelve 256-bit accumulators of the sixteen registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn blocked_avx2<F: Fn(usize) -> usize>(p: &Product<F>, c: &mut [f32]) {
    blocked::<6, 16, F>(p, c)
}

/// Blocks of `ROW_BLOCK` rows; in each, slices of `KC` along k; in each, every column tile of
/// B (a panel) over every row tile.
#[inline(always)]
unsafe fn blocked<const MR: usize, const NR: usize, F: Fn(usize) -> usize>(p: &Product<F>, c: &mut [f32]) {
    let Product { m, a, b, accumulate } = *p;
    let (n, k) = (b.n, b.k);
    assert_eq!(b.width, NR, "B packed for another tile width");
    let data = a.data.as_ptr();
    let mut pieces = Vec::with_capacity(a.segments.as_slice().len());
    for r0 in (0..m).step_by(ROW_BLOCK) {
        let rows_here = ROW_BLOCK.min(m - r0);
        // Row starts per tile; a last tile short of MR rows repeats its last row (not stored).
        let tiles: Vec<[*const f32; MR]> =
            (0..rows_here.div_ceil(MR)).map(|t| std::array::from_fn(|i| data.add((a.row)(r0 + (t * MR + i).min(rows_here - 1))))).collect();
        for k0 in (0..k).step_by(KC) {
            slice_pieces(a, k0..(k0 + KC).min(k), &mut pieces);
            let first = k0 == 0 && !accumulate;
            for j0 in (0..n).step_by(NR) {
                let b_at = b.data.as_ptr().add((j0 / NR * k + k0) * NR);
                for (t, rows) in tiles.iter().enumerate() {
                    let (i0, cols) = (r0 + t * MR, NR.min(n - j0));
                    let out = c.as_mut_ptr().add(i0 * n + j0);
                    tile::<MR, NR>(rows, &pieces, a.step, b_at, out, n, MR.min(m - i0), cols, first);
                }
            }
        }
    }
}

/// The parts of A's segments inside the k range `ks`: (offset from a row's start, length).
fn slice_pieces<F: Fn(usize) -> usize>(a: &Lhs<F>, ks: std::ops::Range<usize>, pieces: &mut Vec<(usize, usize)>) {
    pieces.clear();
    let mut start = 0;
    for s in a.segments.as_slice() {
        let (lo, hi) = (ks.start.max(start), ks.end.min(start + s.len));
        if lo < hi {
            pieces.push((s.offset + (lo - start) * a.step, hi - lo));
        }
        start += s.len;
    }
}

/// One register tile: `acc (MR, NR) = Σ_k A[rows, k] · B[k, 0..NR]` over `pieces` (B's rows
/// contiguous, a panel's), then `C = acc` (`first`) or `C = C + acc`, for the top-left `m × n`
/// of the tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const MR: usize, const NR: usize>(
    rows: &[*const f32; MR],
    pieces: &[(usize, usize)],
    step: usize,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    first: bool,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for &(offset, len) in pieces {
        let mut at = offset;
        for _ in 0..len {
            let bk = ptr::read_unaligned(b as *const [f32; NR]);
            for (acc, row) in acc.iter_mut().zip(rows) {
                let a = *row.add(at);
                acc.iter_mut().zip(&bk).for_each(|(acc, &b)| *acc = a.mul_add(b, *acc));
            }
            at += step;
            b = b.add(NR);
        }
    }
    if m == MR && n == NR {
        store(&acc, c, ldc, MR, NR, first);
    } else {
        // Through a copy: indexing the accumulators themselves by run-time bounds would keep
        // them in memory through the whole loop above.
        let spilled = acc;
        store(&spilled, c, ldc, m, n, first);
    }
}

#[inline(always)]
unsafe fn store<const MR: usize, const NR: usize>(acc: &[[f32; NR]; MR], c: *mut f32, ldc: usize, m: usize, n: usize, first: bool) {
    for (i, acc) in acc.iter().enumerate().take(m) {
        let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
        if first {
            row.copy_from_slice(&acc[..n]);
        } else {
            row.iter_mut().zip(acc).for_each(|(c, &s)| *c += s);
        }
    }
}

/// `C (m, n) = alpha·A (m, k)·B (k, n) + beta·C` with arbitrary strides for A and B: the
/// general SGEMM of `matrixmultiply` (packing both operands), for the linear layers and Muon.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    beta: f32,
    c: &mut [f32],
) {
    let last = |rows: usize, cols: usize, (rs, cs): (usize, usize)| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, k, a_strides) < a.len() && last(k, n, b_strides) < b.len() && m * n <= c.len());
    // SAFETY: the asserts above keep every index of A, B and C inside its slice.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            a_strides.0 as isize,
            a_strides.1 as isize,
            b.as_ptr(),
            b_strides.0 as isize,
            b_strides.1 as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Bitwise `matrixmultiply`'s results (the claim of the module's doc) over shapes with
    /// partial row and column tiles, several KC slices, segments that cross them, rows read
    /// in place with gaps, a transposed A, and accumulation — for every tile shape this CPU runs.
    #[test]
    fn bitwise_matrixmultiply() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("fma") {
            // matrixmultiply multiplies and adds separately there: other bits, by design.
            eprintln!("bitwise_matrixmultiply: SKIPPED (no FMA on this CPU)");
            return;
        }
        let mut rng = Rng::new(7);
        for &(m, n, segs, step, accumulate) in &[
            (37, 70, &[300usize][..], 1, false),
            (200, 24, &[72, 72, 72][..], 1, true),
            (9, 256, &[768, 768, 768][..], 1, false),
            (50, 33, &[513][..], 3, true),
        ] {
            let k: usize = segs.iter().sum();
            // Row i of A starts at 5·i·k (gaps between rows); segment s at 2·s·k·step.
            let row = |i: usize| 5 * i * k * step;
            let mut segments = Vec::new();
            let mut offset = 0;
            for &len in segs {
                segments.push(Segment { offset, len });
                offset += 2 * len * step;
            }
            let data: Vec<f32> = (0..row(m) + offset * 2 + 1).map(|_| rng.symmetric(1.0)).collect();
            let lhs = Lhs { data: &data, row, segments: Segments::Many(&segments), step };
            let mut dense = Vec::with_capacity(m * k); // A gathered: (m, k)
            for i in 0..m {
                for s in &segments {
                    dense.extend((0..s.len).map(|j| data[row(i) + s.offset + j * step]));
                }
            }
            let ldb = n + 3;
            let b: Vec<f32> = (0..k * ldb).map(|_| rng.symmetric(1.0)).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.symmetric(4.0)).collect();
            let mut want = c0.clone();
            sgemm(m, k, n, 1.0, &dense, (k, 1), &b, (ldb, 1), if accumulate { 1.0 } else { 0.0 }, &mut want);
            // `gemm`, then every tile shape this CPU can run, not only the one `gemm` picks.
            let mut results = Vec::new();
            let mut run = |name: &str, f: &dyn Fn(&mut [f32])| {
                let mut got = c0.clone();
                f(&mut got);
                results.push((name.to_string(), got));
            };
            let mut packed = vec![f32::NAN; packed_len(k, n).max(k * n.div_ceil(8) * 8)];
            run("gemm", &|c| gemm(m, &lhs, pack(&b, k, n, ldb, &mut packed.clone()), c, accumulate));
            // SAFETY: the shapes fit (`gemm` checks them); each variant runs only where its instructions exist.
            let p = Product { m, a: &lhs, b: pack_as(8, &b, k, n, ldb, &mut packed), accumulate };
            run("8×8", &|c| unsafe { blocked::<8, 8, _>(&p, c) });
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let mut packed = vec![f32::NAN; k * n.div_ceil(32) * 32];
                if has!("avx2") && has!("fma") {
                    let p = Product { m, a: &lhs, b: pack_as(16, &b, k, n, ldb, &mut packed), accumulate };
                    run("AVX2 6×16", &|c| unsafe { blocked_avx2(&p, c) });
                }
                if has!("avx512f") {
                    let p = Product { m, a: &lhs, b: pack_as(32, &b, k, n, ldb, &mut packed), accumulate };
                    run("AVX-512 8×32", &|c| unsafe { blocked_avx512(&p, c) });
                }
            }
            for (name, got) in &results {
                let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
                assert_eq!(
                    differ, 0,
                    "{name} {m}×{n}, k {k} (segments {segs:?}, step {step}): {differ} elements differ from matrixmultiply"
                );
            }
        }
    }
}
