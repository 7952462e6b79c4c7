//! One training step, and a short training run, on the CPU and on each GPU backend from the
//! same seed, data and init: the step's gradients and updates agree, the loss agrees step by
//! step and the final accuracies agree. wgpu runs on lavapipe in CI (skipped with a message
//! where there is no adapter, a failure under `SPEEDRUN_REQUIRE_WGPU=1`); CUDA where there is
//! a driver (`SPEEDRUN_REQUIRE_CUDA=1`), with exact f32 convolutions and with TF32.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;
#[path = "common/short_run.rs"]
mod short_run;

use speedrun::backend::{all, block_on, cpu::Cpu, Backend, Precision};
use speedrun::data::{load_test, load_train, Split};
use speedrun::train::{Config, DeviceSplit, Recipe, Trainer};

/// After one training step from the same state: logits, every gradient, BN statistics and
/// the updated parameters, compared as `tests/reference.rs` compares with PyTorch.
fn one_step_matches_the_cpu<G: Backend>(gpu: &G) {
    let data = common::cifar_dir();
    let split = load_train(&data, Some(256)).unwrap();
    let cfg = Config { widths: [16, 32, 32], batch_size: 256, whiten_images: 256, ..Config::default() };
    fn step<B: Backend>(b: &B, cfg: &Config, split: &Split) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let train = DeviceSplit::new(b, split);
        let mut t = Trainer::new(b, cfg.clone(), &train).unwrap();
        t.reset(cfg.seed);
        block_on(t.init_whitening());
        t.start_epoch(0);
        t.train_step(0);
        let logits = block_on(b.read(all(&t.net.logits, 256 * 10)));
        let grads = block_on(b.read(all(&t.net.grads, t.layout().trainable)));
        let (params, running) = block_on(t.net.state(b));
        (logits, grads, params, running)
    }
    let (cpu, dev) = (step(&Cpu::new(), &cfg, &split), step(gpu, &cfg, &split));
    let layout = speedrun::model::Layout::new(cfg.widths);
    let rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
    };
    let frobenius =
        |a: &[f32], b: &[f32]| (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / b.iter().map(|y| y * y).sum::<f32>()).sqrt();
    assert!(rel(&dev.0, &cpu.0) < 1e-5, "logits: {:.2e}", rel(&dev.0, &cpu.0));
    for slot in layout.params.iter().filter(|s| s.range.end <= layout.trainable) {
        let (g, c) = (&dev.1[slot.range.clone()], &cpu.1[slot.range.clone()]);
        // Conv weight gradients: Frobenius, for the max-pool ties explained in tests/reference.rs.
        let (err, tol) = if slot.name.contains(".conv") { (frobenius(g, c), 5e-3) } else { (rel(g, c), 1e-4) };
        println!("grad {:<24} {err:.2e}", slot.name);
        assert!(err < tol, "gradient of {}: {err:.2e}", slot.name);
    }
    assert!(rel(&dev.2, &cpu.2) < 1e-5, "parameters after the step: {:.2e}", rel(&dev.2, &cpu.2));
    assert!(rel(&dev.3, &cpu.3) < 1e-5, "running statistics: {:.2e}", rel(&dev.3, &cpu.3));
}

/// 16 steps of a small net trained by `recipe`, in the GPU backend's precision on both (the
/// CPU emulates half): per-step losses within `loss_tolerance` (relative; a pair: the first
/// `MUON_EXACT_STEPS` steps, then the rest), accuracies within `accuracy_margin`.
fn trains_like_the_cpu<G: Backend>(gpu: &G, recipe: Recipe, loss_tolerance: (f64, f64), accuracy_margin: f64) {
    let data = common::cifar_dir();
    let (train_split, test_split) = (load_train(&data, Some(1024)).unwrap(), load_test(&data, Some(256)).unwrap());
    let precision = gpu.precision();
    let cfg = Config { widths: [8, 16, 16], batch_size: 128, epochs: 2.0, whiten_images: 1024, precision, ..recipe.config() };
    println!("recipe {}, precision {}", recipe.name(), precision.name());
    let cpu = Cpu::with_precision(precision);
    let (cpu_losses, cpu_plain, cpu_tta) = block_on(short_run::train(&cpu, &cfg, &train_split, &test_split));
    if precision != Precision::F32 {
        // What half precision changes, for the record (the assertions compare like with like).
        let f32_cfg = Config { precision: Precision::F32, ..cfg.clone() };
        let (losses, plain, tta) = block_on(short_run::train(&Cpu::new(), &f32_cfg, &train_split, &test_split));
        let worst = short_run::loss_table(&losses, &cpu_losses).into_iter().map(|r| r.2).fold(0.0, f64::max);
        println!("cpu f32: accuracy {plain:.4} (TTA {tta:.4}); per-step losses up to {worst:.2e} (relative) from the emulated half's");
    }
    let (gpu_losses, gpu_plain, gpu_tta) = block_on(short_run::train(gpu, &cfg, &train_split, &test_split));
    println!("step   cpu loss   {:>4} loss   relative difference", gpu.name());
    let mut worst = [0.0f64; 2];
    for (i, (c, g, rel)) in short_run::loss_table(&cpu_losses, &gpu_losses).into_iter().enumerate() {
        let later = (i >= MUON_EXACT_STEPS) as usize;
        worst[later] = worst[later].max(rel);
        println!("{:>4} {c:>10.5} {g:>11.5} {rel:>12.2e}", i + 1);
    }
    println!("accuracy: cpu {cpu_plain:.4} (TTA {cpu_tta:.4}), {} {gpu_plain:.4} (TTA {gpu_tta:.4})", gpu.name());
    assert_eq!(cpu_losses.len(), 16);
    assert!(worst[0] < loss_tolerance.0, "per-step losses of the first steps differ by up to {:.2e} (relative)", worst[0]);
    assert!(worst[1] < loss_tolerance.1, "per-step losses of the later steps differ by up to {:.2e} (relative)", worst[1]);
    assert!((cpu_plain - gpu_plain).abs() <= accuracy_margin && (cpu_tta - gpu_tta).abs() <= accuracy_margin, "accuracies differ");
    assert!(cpu_losses.last() < cpu_losses.first(), "the loss drops");
}

// f32 backends: same data, init and augmentation stream, so the losses agree to about the
// f32 resolution of the summed loss (wgpu on lavapipe: ~1e-6 over all 16 steps); 256 test
// images, so one image is 0.4 points of accuracy.
const F32_LOSS_TOLERANCE: (f64, f64) = (1e-4, 1e-4);
const F32_ACCURACY_MARGIN: f64 = 0.02;

// Muon amplifies rounding: it replaces each filter's update by its orthogonalised direction,
// so gradient components near f32 noise become updates as large as the rest. The recipes are
// chaotic at this size: on the CPU alone, whitening filters moved by ~1e-7 (eps × (1 + 1e-6))
// give per-step losses that differ by up to 1e-5 in steps 1–4 and up to 7e-4 (hiverge) and
// 5e-4 (airbench94-muon) in steps 5–16, while airbench94's do not move at all. So the first
// steps keep the f32 tolerance and the later ones get 3× the CPU's own spread.
const MUON_EXACT_STEPS: usize = 4;
const MUON_LOSS_TOLERANCE: (f64, f64) = (1e-4, 2e-3);

// Reduced precision (f16 storage; CUDA's TF32 convolutions): see the tests that use them.
const HALF_LOSS_TOLERANCE: (f64, f64) = (1e-2, 1e-2);
const HALF_ACCURACY_MARGIN: f64 = 0.03;

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;

    #[test]
    fn one_step_matches_the_cpu() {
        if let Some(gpu) = common::wgpu_device() {
            super::one_step_matches_the_cpu(&gpu);
        }
    }

    #[test]
    fn trains_like_the_cpu() {
        if let Some(gpu) = common::wgpu_device() {
            super::trains_like_the_cpu(&gpu, Recipe::Airbench94, F32_LOSS_TOLERANCE, F32_ACCURACY_MARGIN);
        }
    }

    /// Muon (Newton–Schulz through the matmul kernel), SiLU, colour jitter.
    #[test]
    fn trains_hiverge_like_the_cpu() {
        if let Some(gpu) = common::wgpu_device() {
            super::trains_like_the_cpu(&gpu, Recipe::Hiverge, MUON_LOSS_TOLERANCE, F32_ACCURACY_MARGIN);
        }
    }

    /// f16 storage against the CPU's emulation of it. Where the two backends' f32 math
    /// differs (~1e-6), a value near the midpoint of two f16 neighbours rounds to the other
    /// one, a step of 2⁻¹⁰: the margins are those of TF32 (11-bit significands as f16's;
    /// set before the first run, not fitted to it): 1% of the loss, 8 of 256 test images.
    #[test]
    fn trains_like_the_cpu_in_half() {
        if let Some(gpu) = common::wgpu_half_device() {
            super::trains_like_the_cpu(&gpu, Recipe::Airbench94, HALF_LOSS_TOLERANCE, HALF_ACCURACY_MARGIN);
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    #[test]
    fn one_step_matches_the_cpu() {
        if let Some(gpu) = common::cuda_device(false) {
            super::one_step_matches_the_cpu(&gpu);
        }
    }

    /// Also checks that the steps after the first two ran as CUDA graphs.
    #[test]
    fn trains_like_the_cpu() {
        if let Some(gpu) = common::cuda_device(false) {
            super::trains_like_the_cpu(&gpu, Recipe::Airbench94, F32_LOSS_TOLERANCE, F32_ACCURACY_MARGIN);
            let (replays, graphs) = gpu.graph_stats();
            println!("{replays} steps replayed from {graphs} CUDA graphs");
            assert_eq!(replays, 14, "steps 3-16 (step 1 makes the cuDNN plans, so step 2 runs directly)");
        }
    }

    #[test]
    fn trains_like_the_cpu_without_graphs() {
        if let Some(gpu) = common::cuda_device(false) {
            gpu.set_graphs(false);
            super::trains_like_the_cpu(&gpu, Recipe::Airbench94, F32_LOSS_TOLERANCE, F32_ACCURACY_MARGIN);
            assert_eq!(gpu.graph_stats().0, 0);
        }
    }

    /// Muon (Newton–Schulz through cuBLAS), SiLU, colour jitter; steps replayed as graphs.
    #[test]
    fn trains_hiverge_like_the_cpu() {
        if let Some(gpu) = common::cuda_device(false) {
            super::trains_like_the_cpu(&gpu, Recipe::Hiverge, MUON_LOSS_TOLERANCE, F32_ACCURACY_MARGIN);
        }
    }

    /// TF32 convolutions (10-bit mantissas, as PyTorch's cuDNN default) round each product to
    /// ~5e-4: the losses may drift apart by more than f32's, so the margins are wider (set
    /// before the first GPU run, not fitted to it): 1% of the loss, 8 of 256 test images.
    #[test]
    fn trains_like_the_cpu_with_tf32() {
        if let Some(gpu) = common::cuda_device(true) {
            super::trains_like_the_cpu(&gpu, Recipe::Airbench94, HALF_LOSS_TOLERANCE, HALF_ACCURACY_MARGIN);
        }
    }
}
