//! Convolutions on the CPU. The training forward is direct: per chunk of images, a GEMM
//! (`gemm.rs`) that reads each output pixel's patch in place in the zero-padded images, parallel
//! over chunks; it rounds the same way at every pixel, which keeps max-pool ties as exact as
//! in the float64 reference (`Backend::conv_forward_inference`). The inference forward and
//! both gradients of the 3×3 convs run Winograd F(4×4, 3×3) (`winograd.rs`: a quarter of
//! the multiplies); other filter sizes' weight gradient multiplies dy with an im2col matrix.

use super::gemm::{gemm, pack, packed_len, transposed, Lhs, Segment, Segments};
use super::{fixed_groups, sum_in_order, winograd, THREAD_SCRATCH};
use crate::backend::ConvShape;
use rayon::prelude::*;

/// Output pixels per chunk: per GEMM call of the forward, per im2col of the weight gradient.
const ROWS_PER_CHUNK: usize = 1024;

fn images_per_chunk(s: &ConvShape) -> usize {
    (ROWS_PER_CHUNK / (s.out_h() * s.out_w())).max(1)
}

/// Writes the patch matrix `(images·oh·ow, k·k·c_in)` of images `b0..b0+count` of `x`.
fn im2col(s: &ConvShape, x: &[f32], b0: usize, count: usize, col: &mut [f32]) {
    let (oh, ow, cin, k) = (s.out_h(), s.out_w(), s.c_in, s.k);
    let row_len = k * k * cin;
    let mut rows = col.chunks_exact_mut(row_len);
    for b in b0..b0 + count {
        let image = &x[b * s.h * s.w * cin..(b + 1) * s.h * s.w * cin];
        for oy in 0..oh {
            for ox in 0..ow {
                let row = rows.next().expect("patch matrix sized for the chunk");
                for ky in 0..k {
                    let iy = (oy + ky) as isize - s.pad as isize;
                    for kx in 0..k {
                        let ix = (ox + kx) as isize - s.pad as isize;
                        let dst = &mut row[(ky * k + kx) * cin..(ky * k + kx + 1) * cin];
                        if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                            dst.fill(0.0);
                        } else {
                            let at = (iy as usize * s.w + ix as usize) * cin;
                            dst.copy_from_slice(&image[at..at + cin]);
                        }
                    }
                }
            }
        }
    }
}

/// Images `b0..b0+count` of `x` with `pad` zeros around each: `(count, h + 2·pad, w + 2·pad, c_in)`.
fn pad_images(s: &ConvShape, x: &[f32], b0: usize, count: usize, padded: &mut Vec<f32>) {
    let (c, p) = (s.c_in, s.pad);
    let (hp, wp) = (s.h + 2 * p, s.w + 2 * p);
    padded.resize(count * hp * wp * c, 0.0);
    for (b, dst) in padded.chunks_exact_mut(hp * wp * c).enumerate() {
        let image = &x[(b0 + b) * s.h * s.w * c..(b0 + b + 1) * s.h * s.w * c];
        let (top, rest) = dst.split_at_mut(p * wp * c);
        top.fill(0.0);
        let (middle, bottom) = rest.split_at_mut(s.h * wp * c);
        bottom.fill(0.0);
        for (row, src) in middle.chunks_exact_mut(wp * c).zip(image.chunks_exact(s.w * c)) {
            row[..p * c].fill(0.0);
            row[p * c..(p + s.w) * c].copy_from_slice(src);
            row[(p + s.w) * c..].fill(0.0);
        }
    }
}

/// `y (n, oh, ow, c_out) = x (n, h, w, c_in) ⊛ w (c_out, k, k, c_in)`: per chunk of images, a
/// GEMM whose A rows are the patches read in place in the zero-padded images (each filter row
/// ky a contiguous run of k·c_in floats) and whose B is `w` transposed.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (oh, ow, k, c) = (s.out_h(), s.out_w(), s.k, s.c_in);
    let (hp, wp) = (s.h + 2 * s.pad, s.w + 2 * s.pad);
    let kdim = k * k * c;
    let mut wt = vec![0.0f32; kdim * s.c_out]; // (k, k, c_in, c_out)
    for (o, filter) in w[..s.c_out * kdim].chunks_exact(kdim).enumerate() {
        filter.iter().enumerate().for_each(|(i, &v)| wt[i * s.c_out + o] = v);
    }
    let mut panels = vec![0.0f32; packed_len(kdim, s.c_out)];
    let wt = pack(&wt, kdim, s.c_out, s.c_out, &mut panels);
    let segments: Vec<Segment> = (0..k).map(|ky| Segment { offset: ky * wp * c, len: k * c }).collect();
    let ipc = images_per_chunk(s);
    y[..s.n * oh * ow * s.c_out].par_chunks_mut(ipc * oh * ow * s.c_out).enumerate().for_each(|(chunk, y)| {
        let count = y.len() / (oh * ow * s.c_out);
        THREAD_SCRATCH.with_borrow_mut(|padded| {
            pad_images(s, x, chunk * ipc, count, padded);
            let row = |r: usize| ((r / (oh * ow) * hp + r % (oh * ow) / ow) * wp + r % ow) * c;
            let patches = Lhs { data: padded, row, segments: Segments::Many(&segments), step: 1 };
            gemm(count * oh * ow, &patches, wt, y, false);
        });
    });
}

/// `forward` for inference: Winograd for 3×3 filters.
pub fn forward_inference(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    if winograd::applies(s) {
        winograd::forward(s, x, w, y);
    } else {
        forward(s, x, w, y);
    }
}

/// `dx` of a stride-1 convolution: the forward convolution of `dy` with the kernel rotated by
/// 180° and its channel axes swapped, padded by `k − 1 − pad`.
pub fn backward_data(s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (k, cin, cout) = (s.k, s.c_in, s.c_out);
    let mut rotated = vec![0.0f32; w.len()]; // (c_in, k, k, c_out)
    for o in 0..cout {
        for ky in 0..k {
            for kx in 0..k {
                for i in 0..cin {
                    rotated[((i * k + (k - 1 - ky)) * k + (k - 1 - kx)) * cout + o] = w[((o * k + ky) * k + kx) * cin + i];
                }
            }
        }
    }
    let transposed = ConvShape { n: s.n, h: s.out_h(), w: s.out_w(), c_in: cout, c_out: cin, k, pad: k - 1 - s.pad };
    forward_inference(&transposed, dy, &rotated, dx); // dx feeds no max-pool: Winograd's rounding is harmless
}

/// `dw (c_out, k, k, c_in) = Σ_pixels dy ⊗ patch`, summed in a fixed order for determinism.
pub fn backward_filter(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    if winograd::applies(s) {
        return winograd::backward_filter(s, x, dy, dw);
    }
    let per_image = s.out_h() * s.out_w();
    let ipc = images_per_chunk(s);
    let kdim = s.k * s.k * s.c_in;
    let partials: Vec<Vec<f32>> = fixed_groups(s.n)
        .into_par_iter()
        .map(|images| {
            let mut acc = vec![0.0f32; s.c_out * kdim];
            let mut panels = Vec::new();
            THREAD_SCRATCH.with_borrow_mut(|col| {
                for b0 in images.clone().step_by(ipc) {
                    let count = ipc.min(images.end - b0);
                    let rows = count * per_image;
                    col.resize(rows * kdim, 0.0);
                    im2col(s, x, b0, count, col);
                    let dy = &dy[b0 * per_image * s.c_out..(b0 + count) * per_image * s.c_out];
                    // acc += dyᵀ · col: row o of dyᵀ is column o of dy (rows, c_out).
                    panels.resize(packed_len(rows, kdim), 0.0);
                    let col = pack(col, rows, kdim, kdim, &mut panels);
                    gemm(s.c_out, &transposed(dy, rows, s.c_out), col, &mut acc, true);
                }
            });
            acc
        })
        .collect();
    sum_in_order(&partials, &mut dw[..s.c_out * kdim]);
}
