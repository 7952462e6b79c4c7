//! Shared helpers for the integration tests: where the test data lives, and comparisons.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `shared/` folder beside the checkout (`$SPEEDRUN_SHARED` overrides): this project's own
/// machines and CI have it; a fresh clone elsewhere does not.
fn shared_dir() -> PathBuf {
    std::env::var_os("SPEEDRUN_SHARED").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// Where the data-dependent tests may find CIFAR-10, in the order `find_cifar` tries them.
pub struct DataPlaces {
    /// `$SPEEDRUN_TEST_DATA`: an unpacked CIFAR-10, used as it is.
    pub test_data: Option<PathBuf>,
    /// The shared folder (`cifar10-jpeg/unpack.sh` there unpacks the JPEG-derived copy).
    pub shared: PathBuf,
    /// Where the shared copy is unpacked, once (`target/test-data`; the copy is its `cifar10/`).
    pub unpacked: PathBuf,
    /// The real CIFAR-10 where `speedrun` itself looks: `$SPEEDRUN_DATA`, else the per-user
    /// cache (`~/.cache/speedrun/cifar10` on Linux).
    pub cache: PathBuf,
    /// Where a missing cache is fetched from: the official archive (or `$SPEEDRUN_CIFAR_URL`), MD5-checked.
    pub source: speedrun::download::Source,
}

impl DataPlaces {
    /// The places this test process sees.
    pub fn from_env() -> DataPlaces {
        DataPlaces {
            test_data: std::env::var_os("SPEEDRUN_TEST_DATA").filter(|d| !d.is_empty()).map(PathBuf::from),
            shared: shared_dir(),
            unpacked: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-data"),
            cache: speedrun::data::resolve_dir(None),
            source: speedrun::download::official(),
        }
    }
}

/// CIFAR-10 for the tests: `$SPEEDRUN_TEST_DATA`; else the shared JPEG-derived copy, unpacked
/// once into `target/test-data/cifar10` (this project's machines and CI); else the real
/// CIFAR-10 in speedrun's data folder (the per-user cache), fetched there with speedrun's own
/// MD5-checked download when it is missing. Returns the folder and what it is.
pub fn find_cifar(places: &DataPlaces) -> (PathBuf, &'static str) {
    if let Some(dir) = &places.test_data {
        return (dir.clone(), "$SPEEDRUN_TEST_DATA");
    }
    let dir = places.unpacked.join("cifar10");
    if speedrun::data::is_complete(&dir) {
        return (dir, "the shared JPEG-derived copy, unpacked");
    }
    let unpack = places.shared.join("cifar10-jpeg/unpack.sh");
    if unpack.is_file() {
        // Unpack into a private folder, then rename: concurrent tests never see a partial copy.
        let staging = places.unpacked.join(format!("unpack-{}", std::process::id()));
        std::fs::create_dir_all(&staging).unwrap();
        let ok = Command::new("bash").arg(&unpack).arg(&staging).status().expect("run unpack.sh").success();
        assert!(ok, "{} failed", unpack.display());
        if std::fs::rename(&staging, &dir).is_err() {
            std::fs::remove_dir_all(&staging).unwrap(); // another test got there first
        }
        assert!(speedrun::data::is_complete(&dir), "{} did not unpack CIFAR-10 into {}", unpack.display(), dir.display());
        return (dir, "the shared JPEG-derived copy, unpacked");
    }
    match speedrun::download::ensure(&places.cache, &places.source, false) {
        Ok(false) => (places.cache.clone(), "the real CIFAR-10 in the data folder"),
        Ok(true) => (places.cache.clone(), "the real CIFAR-10, downloaded into the data folder"),
        Err(e) => panic!(
            "test data not found: no $SPEEDRUN_TEST_DATA, no shared copy ({} is missing), and CIFAR-10 could not be fetched into {}: {e:#}\n\
             Fix: run `cargo run --release -- download` (with SPEEDRUN_CIFAR_URL=<mirror of cifar-10-binary.tar.gz> if the official host is unreachable), or set SPEEDRUN_TEST_DATA (or SPEEDRUN_DATA) to a folder holding the CIFAR-10 binary version",
            unpack.display(),
            places.cache.display()
        ),
    }
}

/// CIFAR-10 for this test process (see `find_cifar`), found once; says on stderr which copy.
pub fn cifar_dir() -> PathBuf {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let (dir, what) = find_cifar(&DataPlaces::from_env());
            eprintln!("test data: {} ({what})", dir.display());
            dir
        })
        .clone()
}

/// The float64 references of one training step, each made by PyTorch: this repository's own
/// (`tests/reference/reference.safetensors`, made by `tests/reference/make_reference.py`), and a
/// second, independently written one where it exists: `$SPEEDRUN_REFERENCE` (which must exist),
/// else `shared/reference/reference.safetensors`.
pub fn reference_files() -> Vec<PathBuf> {
    let mut files = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/reference.safetensors")];
    match std::env::var_os("SPEEDRUN_REFERENCE").filter(|p| !p.is_empty()).map(PathBuf::from) {
        Some(path) => {
            assert!(path.is_file(), "SPEEDRUN_REFERENCE names {}, which is not a file", path.display());
            files.push(path);
        }
        None => files.extend(Some(shared_dir().join("reference/reference.safetensors")).filter(|p| p.is_file())),
    }
    files
}

/// `device`, or None with a SKIPPED message when it could not start; with `require` set in
/// the environment (as `.ci/run` and GPU machines set it) a failure instead.
fn or_skip<T>(device: anyhow::Result<T>, what: &str, require: &str) -> Option<T> {
    match device {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os(require).is_none() => {
            eprintln!("SKIPPED: no {what} ({e:#}); set {require}=1 to make this a failure");
            None
        }
        Err(e) => panic!("{require} is set but there is no {what}: {e:#}"),
    }
}

/// A wgpu device on the default adapter (`SPEEDRUN_REQUIRE_WGPU`).
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> Option<speedrun::backend::wgpu::Wgpu> {
    or_skip(speedrun::backend::block_on(speedrun::backend::wgpu::Wgpu::new()), "wgpu adapter", "SPEEDRUN_REQUIRE_WGPU")
}

/// A wgpu device storing activations in f16: an adapter with `shader-f16`
/// (`SPEEDRUN_REQUIRE_F16`, which `.ci/run` sets for lavapipe).
#[cfg(feature = "wgpu")]
pub fn wgpu_half_device() -> Option<speedrun::backend::wgpu::Wgpu> {
    use speedrun::backend::{block_on, wgpu, Precision};
    let device = block_on(wgpu::default_adapter()).and_then(|a| block_on(wgpu::Wgpu::with_precision(a, Precision::Half)));
    or_skip(device, "wgpu adapter with f16", "SPEEDRUN_REQUIRE_F16")
}

/// The CUDA backend on GPU 0, with TF32 convolutions on or off (`SPEEDRUN_REQUIRE_CUDA`, set
/// on GPU machines).
#[cfg(feature = "cuda")]
pub fn cuda_device(tf32: bool) -> Option<speedrun::backend::cuda::Cuda> {
    let device = or_skip(speedrun::backend::cuda::Cuda::new(), "CUDA device", "SPEEDRUN_REQUIRE_CUDA")?;
    device.set_tf32(tf32);
    Some(device)
}

/// Largest absolute difference, relative to the largest magnitude in `want`.
pub fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max) / scale
}

/// A tar.gz laid out like CIFAR-10's binary archive: the six `.bin` files, each `batch`, in
/// `cifar-10-batches-bin/` (for local download servers).
pub fn cifar_archive(batch: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for name in speedrun::data::TRAIN_FILES.iter().chain([&speedrun::data::TEST_FILE]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(batch.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("cifar-10-batches-bin/{name}"), batch).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}
