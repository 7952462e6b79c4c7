//! Every kernel family of `kernels/` compiles with NVRTC to PTX for sm_80 (A100) and sm_90
//! (H100/H200), and exports every entry point the backend loads. Needs only libnvrtc (no GPU):
//! skipped with a message when it cannot be loaded, a failure under `SPEEDRUN_REQUIRE_NVRTC=1`
//! (as in CI, which installs it from pip). And the start-up cache gives back the PTX NVRTC gave.
#![cfg(feature = "cuda")]

use speedrun::backend::cuda::cache::{DiskCache, Source};
use speedrun::backend::cuda::{compile_family, compile_family_cached, FAMILIES};

/// Whether libnvrtc can be loaded; without it the tests skip, unless SPEEDRUN_REQUIRE_NVRTC is set.
fn nvrtc_present() -> bool {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        assert!(std::env::var_os("SPEEDRUN_REQUIRE_NVRTC").is_none(), "SPEEDRUN_REQUIRE_NVRTC is set but libnvrtc cannot be loaded");
        eprintln!("SKIPPED: libnvrtc not found (pip install nvidia-cuda-nvrtc; add nvidia/cu13/lib to LD_LIBRARY_PATH)");
        return false;
    }
    true
}

#[test]
fn every_kernel_family_compiles_for_sm80_and_sm90() {
    if !nvrtc_present() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for (name, source, entries) in FAMILIES {
            let ptx = compile_family(name, source, arch).unwrap_or_else(|e| panic!("{e:#}"));
            let text = ptx.to_src();
            assert!(text.contains(&format!(".target {arch}")), "{name}.cu: PTX not for {arch}");
            for entry in entries {
                assert!(text.contains(&format!(".entry {entry}(")), "{name}.cu has no kernel {entry} for {arch}");
            }
            println!("kernels/{name}.cu → {arch}: {} bytes of PTX, {} kernels", text.len(), entries.len());
        }
    }
}

#[test]
fn the_start_up_cache_gives_back_nvrtcs_ptx_per_architecture() {
    if !nvrtc_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::at(dir.path());
    for (name, source, _) in FAMILIES {
        let compiled = compile_family(name, source, "sm_90").unwrap().to_src();
        let (first, from) = compile_family_cached(&cache, name, source, "sm_90").unwrap();
        assert_eq!((first.to_src(), from), (compiled.clone(), Source::Built), "{name}.cu: first compile");
        let (again, from) = compile_family_cached(&cache, name, source, "sm_90").unwrap();
        assert_eq!((again.to_src(), from), (compiled, Source::Cached), "{name}.cu: from the cache");
        // Another architecture, or the source changed, is another entry.
        assert_eq!(compile_family_cached(&cache, name, source, "sm_80").unwrap().1, Source::Built, "{name}.cu for sm_80");
        let edited = format!("{source}\n// edited");
        assert_eq!(compile_family_cached(&cache, name, &edited, "sm_90").unwrap().1, Source::Built, "{name}.cu edited");
    }
    assert_eq!(cache.usage().0, 3 * FAMILIES.len());
}
