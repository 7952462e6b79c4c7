//! The whitening layer's maths (recipe §1.1): the uncentered covariance of 2×2 patches from
//! the backend's exact integer moments, and its eigen-filters.

use crate::backend::{CHANNELS, MEAN, PATCH, STD};
use crate::linalg::symmetric_eigen;
use crate::model::WHITEN_OUT;

/// The uncentered covariance `(12, 12)` of normalised 2×2 patches from the summed moments of
/// `Backend::patch_moments` (of q = pixel − 128) over `patches` patches. Normalisation is
/// affine per channel, x = a·q + b with a = 1/(255·std), b = (128/255 − mean)/std, so
/// Σ xᵢxⱼ = aᵢaⱼ Σ qᵢqⱼ + aᵢbⱼ Σ qᵢ + bᵢaⱼ Σ qⱼ + bᵢbⱼ·patches, evaluated in f64.
pub fn patch_covariance(sums: &[f64], patches: f64) -> Vec<f64> {
    let channel = |j: usize| j / 4; // (c, ky, kx) order
    let a = |j: usize| 1.0 / (255.0 * STD[channel(j)]);
    let b = |j: usize| (128.0 / 255.0 - MEAN[channel(j)]) / STD[channel(j)];
    let linear = &sums[PATCH * PATCH..];
    (0..PATCH * PATCH)
        .map(|ij| {
            let (i, j) = (ij / PATCH, ij % PATCH);
            (a(i) * a(j) * sums[ij] + a(i) * b(j) * linear[i] + b(i) * a(j) * linear[j] + b(i) * b(j) * patches) / patches
        })
        .collect()
}

/// Whitening filters from the uncentered patch covariance `cov (12, 12)`: eigenvectors /
/// √(λ + eps) and their negatives, as OHWI `(24, 2, 2, 3)`. Also returns the eigenvalues,
/// descending.
pub fn whitening_filters(cov: &[f64], eps: f64) -> (Vec<f32>, Vec<f64>) {
    let (values, vectors) = symmetric_eigen(cov, PATCH);
    let mut w = vec![0.0f32; WHITEN_OUT * PATCH];
    for (o, (lambda, v)) in values.iter().zip(&vectors).enumerate() {
        for (j, &vj) in v.iter().enumerate() {
            let (c, ky, kx) = (j / 4, j / 2 % 2, j % 2); // PyTorch (c, ky, kx) → OHWI
            let f = (vj / (lambda + eps).sqrt()) as f32;
            w[o * PATCH + (ky * 2 + kx) * CHANNELS + c] = f;
            w[(o + PATCH) * PATCH + (ky * 2 + kx) * CHANNELS + c] = -f;
        }
    }
    (w, values)
}
