//! The same model, loop and WGSL backend in a browser tab: a short run on WebGPU (headless
//! Chromium) against the CPU backend compiled to wasm beside it, from the same seed, init and
//! data, as `tests/cross_backend.rs` does natively. The data is synthetic (the test page has
//! no files; `short_run::synthetic`), so the loss visibly drops in a few steps.
//!
//! `CHROMEDRIVER=/usr/bin/chromedriver cargo test --release --target wasm32-unknown-unknown
//! --no-default-features --features wgpu --test web` (the runner is set in
//! `.cargo/config.toml`, Chromium's flags in `webdriver.json`; WebGPU needs
//! `--enable-unsafe-webgpu` in headless Chromium).
#![cfg(all(target_arch = "wasm32", feature = "wgpu"))]

#[path = "common/short_run.rs"]
mod short_run;

use speedrun::backend::{cpu::Cpu, wgpu::Wgpu};
use speedrun::train::Config;
use wasm_bindgen_test::{console_log, wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
async fn webgpu_in_the_browser_trains_like_the_cpu() {
    let gpu = Wgpu::new().await.expect("a WebGPU adapter (headless Chromium needs --enable-unsafe-webgpu)");
    let info = gpu.adapter_info();
    console_log!("adapter: {} ({:?}, {:?})", info.name, info.backend, info.device_type);
    assert_eq!(info.backend, wgpu::Backend::BrowserWebGpu, "the browser's WebGPU, not a native API");
    let (train, test) = (short_run::synthetic(128, 1), short_run::synthetic(64, 2));
    // Four times the default learning rate: this few steps at batch 32 barely move otherwise.
    let cfg = Config {
        widths: [8, 16, 16],
        batch_size: 32,
        epochs: 2.0,
        whiten_images: 128,
        lr: 4.0 * Config::default().lr,
        ..Config::default()
    };
    let (cpu_losses, cpu_plain, cpu_tta) = short_run::train(&Cpu::new(), &cfg, &train, &test).await;
    let (web_losses, web_plain, web_tta) = short_run::train(&gpu, &cfg, &train, &test).await;
    let table = short_run::loss_table(&cpu_losses, &web_losses);
    for (i, (c, w, rel)) in table.iter().enumerate() {
        console_log!("step {:>2}: cpu {c:.5}  webgpu {w:.5}  relative difference {rel:.2e}", i + 1);
    }
    console_log!("accuracy: cpu {cpu_plain:.4} (TTA {cpu_tta:.4}), webgpu {web_plain:.4} (TTA {web_tta:.4})");
    assert_eq!(web_losses.len(), 8);
    // As natively (tests/cross_backend.rs): the same f32 arithmetic up to summation order.
    const LOSS_TOLERANCE: f64 = 1e-4;
    let worst = table.iter().map(|r| r.2).fold(0.0, f64::max);
    assert!(worst < LOSS_TOLERANCE, "per-step losses differ by up to {worst:.2e} (relative)");
    // 64 test images: one image is 1.6 points.
    const ACCURACY_MARGIN: f64 = 0.04;
    assert!((cpu_plain - web_plain).abs() <= ACCURACY_MARGIN && (cpu_tta - web_tta).abs() <= ACCURACY_MARGIN, "accuracies differ");
    // It learns: measured 2.287 → 2.190 over the 8 steps (the head's 1/9 scale and the
    // warm-up keep early steps small) and 50% test accuracy, against 10% for chance.
    assert!(web_losses[7] < web_losses[0] - 0.05, "the loss drops: {web_losses:?}");
    assert!(web_tta >= 0.3, "TTA accuracy {web_tta} is not well above chance (0.1)");
}
