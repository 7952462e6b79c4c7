//! Every kernel family of `kernels/` compiles with NVRTC to PTX for sm_80 (A100) and sm_90
//! (H100/H200), and exports every entry point the backend loads. Needs only libnvrtc (no GPU):
//! skipped with a message when it cannot be loaded, a failure under `SPEEDRUN_REQUIRE_NVRTC=1`
//! (as in CI, which installs it from pip).
#![cfg(feature = "cuda")]

use speedrun::backend::cuda::{compile_family, FAMILIES};

#[test]
fn every_kernel_family_compiles_for_sm80_and_sm90() {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        assert!(std::env::var_os("SPEEDRUN_REQUIRE_NVRTC").is_none(), "SPEEDRUN_REQUIRE_NVRTC is set but libnvrtc cannot be loaded");
        eprintln!("SKIPPED: libnvrtc not found (pip install nvidia-cuda-nvrtc; add nvidia/cu13/lib to LD_LIBRARY_PATH)");
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
