//! Shared helpers for the integration tests: where the test data lives, and comparisons.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `shared/` folder beside the checkout (`$SPEEDRUN_SHARED` overrides).
fn shared_dir() -> PathBuf {
    std::env::var_os("SPEEDRUN_SHARED").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// The JPEG-derived CIFAR-10 as binary batches: `$SPEEDRUN_TEST_DATA`, else
/// `shared/cifar10-jpeg` unpacked once into `target/test-data/cifar10`.
pub fn cifar_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPEEDRUN_TEST_DATA") {
        return PathBuf::from(dir);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-data");
    let dir = target.join("cifar10");
    if speedrun::data::is_complete(&dir) {
        return dir;
    }
    let unpack = shared_dir().join("cifar10-jpeg/unpack.sh");
    assert!(unpack.is_file(), "test data not found: set SPEEDRUN_TEST_DATA to an unpacked CIFAR-10, or SPEEDRUN_SHARED to the folder holding cifar10-jpeg/ ({} is missing)", unpack.display());
    // Unpack into a private folder, then rename: concurrent tests never see a partial copy.
    let staging = target.join(format!("unpack-{}", std::process::id()));
    std::fs::create_dir_all(&staging).unwrap();
    let ok = Command::new("bash").arg(&unpack).arg(&staging).status().expect("run unpack.sh").success();
    assert!(ok, "{} failed", unpack.display());
    if std::fs::rename(&staging, &dir).is_err() {
        std::fs::remove_dir_all(&staging).unwrap(); // another test got there first
    }
    assert!(speedrun::data::is_complete(&dir));
    dir
}

/// PyTorch's float64 training step: `$SPEEDRUN_REFERENCE`, else `shared/reference/`.
pub fn reference_file() -> PathBuf {
    let path =
        std::env::var_os("SPEEDRUN_REFERENCE").map(PathBuf::from).unwrap_or_else(|| shared_dir().join("reference/reference.safetensors"));
    assert!(path.is_file(), "reference not found at {}: set SPEEDRUN_REFERENCE or SPEEDRUN_SHARED", path.display());
    path
}

/// A wgpu device on the default adapter, or None (with a message) when there is none.
/// With `SPEEDRUN_REQUIRE_WGPU=1` (as `.ci/run` sets) a missing adapter fails the test.
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> Option<speedrun::backend::wgpu::Wgpu> {
    match speedrun::backend::block_on(speedrun::backend::wgpu::Wgpu::new()) {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os("SPEEDRUN_REQUIRE_WGPU").is_none() => {
            eprintln!("SKIPPED: no wgpu adapter ({e:#}); set SPEEDRUN_REQUIRE_WGPU=1 to make this a failure");
            None
        }
        Err(e) => panic!("SPEEDRUN_REQUIRE_WGPU is set but there is no wgpu adapter: {e:#}"),
    }
}

/// The CUDA backend on GPU 0, with TF32 convolutions on or off, or None (with a message) where
/// there is no driver. With `SPEEDRUN_REQUIRE_CUDA=1` (set on GPU machines) that fails the test.
#[cfg(feature = "cuda")]
pub fn cuda_device(tf32: bool) -> Option<speedrun::backend::cuda::Cuda> {
    match speedrun::backend::cuda::Cuda::new() {
        Ok(device) => {
            device.set_tf32(tf32);
            Some(device)
        }
        Err(e) if std::env::var_os("SPEEDRUN_REQUIRE_CUDA").is_none() => {
            eprintln!("SKIPPED: no CUDA device ({e:#}); set SPEEDRUN_REQUIRE_CUDA=1 to make this a failure");
            None
        }
        Err(e) => panic!("SPEEDRUN_REQUIRE_CUDA is set but the CUDA backend cannot start: {e:#}"),
    }
}

/// Largest absolute difference, relative to the largest magnitude in `want`.
pub fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max) / scale
}
