//! The recipes' loop arithmetic: optimizer groups, lr schedules, lookahead, Muon's
//! renormalisation cadence, TTA views and selective TTA's choice, alternating flip, colour
//! jitter, determinism, and the NaN guard.

#[path = "common/short_run.rs"]
mod short_run;

use short_run::synthetic;
use speedrun::backend::{block_on, cpu::Cpu, Crop, Precision};
use speedrun::data::Split;
use speedrun::rng::Rng;
use speedrun::run::{least_confident, run, tta_views, Event, Flow};
use speedrun::train::{epoch_crops, epoch_jitter, Config, DeviceSplit, Evaluator, Recipe, Renorm, Trainer};

#[test]
fn groups_follow_the_decoupled_formulas() {
    let g = Config::default().groups();
    assert_eq!((g.whiten_bias, g.head), (g.filters, g.filters), "one base group");
    let (base, bias) = (g.filters, g.bn_bias);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.abs();
    assert!(close(base.lr, 11.5 / 7_850.666_666_666_667), "lr {}", base.lr);
    assert!(close(base.weight_decay, 0.0153 * 1024.0 / 11.5), "wd {}", base.weight_decay); // 1.36237
    assert!(close(bias.lr, 0.093_75), "bias lr {}", bias.lr);
    assert!(close(bias.weight_decay, 0.0153 * 1024.0 / (11.5 * 64.0)), "bias wd {}", bias.weight_decay); // 0.021287
                                                                                                         // Every parameter decays by the same lr·wd per step.
    assert!(close(base.lr * base.weight_decay, bias.lr * bias.weight_decay));
}

#[test]
fn schedule_and_step_counts_match_the_recipe() {
    let cfg = Config::default();
    assert_eq!(cfg.steps_per_epoch(50_000), 48);
    assert_eq!(cfg.total_steps(50_000), 476);
    let m = |s| cfg.lr_multiplier(s, 476);
    assert_eq!(m(0), 0.2);
    assert!((m(108) - (0.2 * (1.0 - 108.0 / 109.0) + 108.0 / 109.0)).abs() < 1e-12);
    assert_eq!(m(109), 1.0);
    assert!((m(475) - (1.0 - 366.0 / 367.0 + 0.07 * 366.0 / 367.0)).abs() < 1e-12);
}

#[test]
fn muon_recipes_have_their_scripts_numbers() {
    let muon = Recipe::Airbench94Muon.config();
    assert_eq!((muon.steps_per_epoch(50_000), muon.total_steps(50_000), muon.whiten_bias_steps(50_000)), (25, 200, 75));
    let g = muon.groups();
    let wd = 2e-6 * 2000.0; // SGD's weight_decay argument is wd/lr: every group decays by wd·schedule
    for (group, lr) in [(g.whiten_bias, 0.053), (g.bn_bias, 0.053), (g.head, 0.67)] {
        assert!((group.lr - lr).abs() < 1e-12 && (group.lr * group.weight_decay - wd).abs() < 1e-12, "{group:?}");
    }
    assert_eq!((g.filters.lr, g.filters.weight_decay), (0.24, 0.0), "Muon without weight decay");
    assert!(muon.lookahead_decays(5, 200).is_empty() && muon.lookahead_decays(200, 200).is_empty(), "no lookahead");
    let hiverge = Recipe::Hiverge.config();
    assert_eq!((hiverge.steps_per_epoch(50_000), hiverge.total_steps(50_000), hiverge.whiten_bias_steps(50_000)), (32, 243, 7));
    let g = hiverge.groups();
    assert!((g.filters.weight_decay - 1.0418e-6 * 1536.0).abs() < 1e-15, "decoupled decay {}", g.filters.weight_decay);
    assert!((g.head.lr - 0.5415).abs() < 1e-12 && (g.bn_bias.lr - 0.0573).abs() < 1e-12);
    // Linear decay to 0 without warm-up.
    for (cfg, total) in [(&muon, 200), (&hiverge, 243)] {
        assert_eq!(cfg.lr_multiplier(0, total), 1.0);
        assert!((cfg.lr_multiplier(100, total) - (1.0 - 100.0 / total as f64)).abs() < 1e-12);
    }
}

#[test]
fn hiverge_renormalises_on_its_cadence() {
    // After step t (1-based) of 243 when t − last ≥ 2 + ⌊15·t/243⌋: every 2nd step at first,
    // every 16th at the end; 37 times in all.
    let mut last = 0;
    let fired: Vec<usize> = (1..=243)
        .filter(|&t| {
            let due = Renorm::Hiverge.due(t, 243, last);
            if due {
                last = t;
            }
            due
        })
        .collect();
    assert_eq!(fired[..9], [2, 4, 6, 8, 10, 12, 14, 16, 19]);
    assert_eq!((fired.len(), fired[fired.len() - 2..].to_vec()), (37, vec![214, 230]));
    assert!((1..=200).all(|t| Renorm::EveryStep.due(t, 200, t - 1)));
}

#[test]
fn selective_tta_picks_the_least_confident_images() {
    // Row i's confidence (largest softmax probability) falls with the gap between its logits.
    let gaps = [5.0f32, 0.1, 3.0, 0.0, 0.1, 8.0];
    let logits: Vec<f32> = gaps.iter().flat_map(|&g| (0..10).map(move |j| if j == 3 { g } else { 0.0 })).collect();
    assert_eq!(least_confident(&logits, 3), vec![3, 1, 4], "least confident first, ties by index");
    assert_eq!(least_confident(&logits, 0), Vec::<u32>::new());
    assert_eq!(least_confident(&logits, 6).len(), 6);
}

#[test]
fn colour_jitter_stays_in_its_ranges() {
    let j = Recipe::Hiverge.config().jitter.unwrap();
    let values = epoch_jitter(&mut Rng::new(5), 10_000, j);
    let (brightness, contrast): (Vec<f32>, Vec<f32>) = values.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
    assert!(brightness.iter().all(|b| b.abs() <= j.brightness) && contrast.iter().all(|c| (c - 1.0).abs() <= j.contrast));
    let mean = |v: &[f32], c: f32| v.iter().map(|x| (x - c) as f64).sum::<f64>() / v.len() as f64;
    assert!(mean(&brightness, 0.0).abs() < 0.005 && mean(&contrast, 1.0).abs() < 0.005, "centred");
    assert!(brightness.iter().any(|b| b.abs() > 0.9 * j.brightness), "uses the whole range");
    assert_ne!(values, epoch_jitter(&mut Rng::new(6), 10_000, j), "drawn from the stream");
}

#[test]
fn lookahead_decays_and_final_revert() {
    let cfg = Config::default();
    assert!(cfg.lookahead_decays(4, 476).is_empty());
    let d5 = cfg.lookahead_decays(5, 476)[0];
    assert!((d5 - 0.95f64.powi(5) * (5.0f64 / 476.0).powi(3)).abs() < 1e-15);
    assert!(d5 < 1e-5, "negligible at the start");
    let d475 = cfg.lookahead_decays(475, 476)[0];
    assert!((d475 - 0.95f64.powi(5) * (475.0f64 / 476.0).powi(3)).abs() < 1e-15 && d475 < 0.774, "{d475}");
    // Step 476 is not a multiple of 5, yet resets the net to the average (decay 1).
    assert_eq!(cfg.lookahead_decays(476, 476), vec![1.0]);
    // A last step that is a multiple of 5 gets the periodic update, then the reset.
    let last = cfg.lookahead_decays(480, 480);
    assert!(last.len() == 2 && (last[0] - 0.95f64.powi(5)).abs() < 1e-15 && last[1] == 1.0, "{last:?}");
}

#[test]
fn tta_level_2_has_six_views_with_recipe_weights() {
    let views = tta_views(2);
    let weights: Vec<f32> = views.iter().map(|v| v.0).collect();
    assert_eq!(weights, vec![0.25, 0.25, 0.125, 0.125, 0.125, 0.125]);
    assert_eq!(views.iter().filter(|v| v.1.flip).count(), 3);
    // Translations by one pixel both ways, each with its mirror.
    for (dy, dx) in [(-1, -1), (1, 1)] {
        assert!(views.contains(&(0.125, Crop { dy, dx, flip: false })));
        assert!(views.contains(&(0.125, Crop { dy, dx: -dx, flip: true })));
    }
    assert_eq!(tta_views(1).iter().map(|v| v.0).sum::<f32>(), 1.0);
    assert_eq!(tta_views(0), vec![(1.0, Crop::IDENTITY)]);
}

#[test]
fn alternating_flip_mirrors_every_image_on_odd_epochs() {
    let cfg = Config::default();
    let mut rng = Rng::new(5);
    let base: Vec<bool> = (0..1000).map(|_| rng.coin()).collect();
    let flipped = base.iter().filter(|&&f| f).count();
    assert!((400..600).contains(&flipped), "about half start mirrored: {flipped}");
    let mut seen_shifts = std::collections::HashSet::new();
    for epoch in 0..4 {
        let (order, crops) = epoch_crops(&mut rng, &base, epoch, &cfg);
        for (&i, &c) in order.iter().zip(&crops) {
            let c = Crop::unpack(c);
            assert_eq!(c.flip, base[i as usize] ^ (epoch % 2 == 1), "image {i} epoch {epoch}");
            assert!(c.dy.abs() <= 2 && c.dx.abs() <= 2);
            seen_shifts.insert((c.dy, c.dx));
        }
    }
    assert_eq!(seen_shifts.len(), 25, "all 25 translations occur");
}

fn small_config() -> Config {
    Config { widths: [8, 16, 16], batch_size: 32, epochs: 2.0, whiten_images: 64, ..Config::default() }
}

fn train_once(cfg: Config, train: &Split, test: &Split) -> anyhow::Result<(f64, Vec<f32>)> {
    train_with(cfg, train, test, &mut |_| Flow::Continue)
}

fn train_with(cfg: Config, train: &Split, test: &Split, on: &mut dyn FnMut(Event) -> Flow) -> anyhow::Result<(f64, Vec<f32>)> {
    let b = Cpu::with_precision(cfg.precision);
    let (train, test) = (DeviceSplit::new(&b, train), DeviceSplit::new(&b, test));
    let mut t = Trainer::new(&b, cfg.clone(), &train)?;
    let mut plain = Evaluator::new(&b, test.len(), cfg.batch_size, 0);
    let mut tta = Evaluator::new(&b, test.len(), cfg.batch_size, cfg.tta_level);
    t.reset(cfg.seed);
    let r = block_on(run(&mut t, &test, &mut plain, &mut tta, on))?;
    assert_eq!(r.steps, t.total_steps);
    Ok((r.tta_accuracy, block_on(t.net.state(&b)).0))
}

#[test]
fn runs_are_deterministic_per_seed() {
    let (train, test) = (synthetic(128, 1), synthetic(64, 2));
    let (acc1, w1) = train_once(small_config(), &train, &test).unwrap();
    let (acc2, w2) = train_once(small_config(), &train, &test).unwrap();
    assert_eq!((acc1, &w1), (acc2, &w2), "same seed, same weights");
    let (_, w3) = train_once(Config { seed: 1, ..small_config() }, &train, &test).unwrap();
    assert_ne!(w1, w3, "another seed, other weights");
}

/// Half precision (the CPU's emulation) is as deterministic, and trains other weights.
#[test]
fn half_precision_runs_are_deterministic() {
    let (train, test) = (synthetic(128, 1), synthetic(64, 2));
    let half = Config { precision: Precision::Half, ..small_config() };
    let (acc1, w1) = train_once(half.clone(), &train, &test).unwrap();
    let (acc2, w2) = train_once(half, &train, &test).unwrap();
    assert_eq!((acc1, &w1), (acc2, &w2), "same seed, same weights");
    let (_, w_f32) = train_once(small_config(), &train, &test).unwrap();
    assert_ne!(w1, w_f32, "f16 storage rounds: other weights than f32's");
}

/// `Flow::Sync` reports the running loss without changing the run; `Flow::Stop` ends it.
#[test]
fn callers_can_sync_and_stop_a_run() {
    let (train, test) = (synthetic(128, 1), synthetic(64, 2));
    let (acc, weights) = train_once(small_config(), &train, &test).unwrap();
    let mut synced = Vec::new();
    let synced_run = train_with(small_config(), &train, &test, &mut |e| {
        if let Event::Synced { epoch, step, train_loss, .. } = e {
            synced.push((epoch, step, train_loss));
        }
        Flow::Sync
    });
    assert_eq!(synced_run.unwrap(), (acc, weights), "syncing changes nothing");
    assert_eq!(synced.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(), [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]);
    assert!(synced.iter().all(|s| s.2.is_finite() && s.2 > 0.0));
    let mut epoch_rows = Vec::new();
    let mut stop = |e: Event| match e {
        Event::Epoch { log, predictions } => {
            epoch_rows.push((log.epoch, predictions.len()));
            Flow::Continue
        }
        Event::Step { epoch: 2, step: 3, .. } => Flow::Stop,
        _ => Flow::Continue,
    };
    let err = train_with(small_config(), &train, &test, &mut stop).unwrap_err().to_string();
    assert!(err.contains("stopped in epoch 2 at step 3"), "{err}");
    assert_eq!(epoch_rows, [(1, 64)], "one epoch row, with a prediction per test image");
}

/// The record recipes' loop (Muon, SiLU, jitter, selective TTA) on a small net: deterministic,
/// and better than chance on separable synthetic data.
#[test]
fn muon_recipes_train_and_repeat() {
    let (train, test) = (synthetic(256, 1), synthetic(128, 2));
    for recipe in [Recipe::Airbench94Muon, Recipe::Hiverge] {
        let cfg = Config { widths: [8, 16, 16], batch_size: 64, epochs: 3.0, whiten_images: 64, ..recipe.config() };
        let (acc1, w1) = train_once(cfg.clone(), &train, &test).unwrap();
        let (acc2, w2) = train_once(cfg, &train, &test).unwrap();
        assert_eq!((acc1, &w1), (acc2, &w2), "{}: same seed, same weights", recipe.name());
        assert!(acc1 > 0.3, "{}: TTA accuracy {acc1} on synthetic data", recipe.name());
    }
}

#[test]
fn a_diverging_run_is_a_clear_error() {
    let (train, test) = (synthetic(128, 1), synthetic(64, 2));
    let err = train_once(Config { lr: 1e12, ..small_config() }, &train, &test).unwrap_err().to_string();
    assert!(err.contains("diverged") && err.contains("--lr"), "{err}");
}

#[test]
fn batch_larger_than_the_data_is_a_clear_error() {
    let (train, test) = (synthetic(16, 1), synthetic(16, 2));
    let err = train_once(small_config(), &train, &test).unwrap_err().to_string();
    assert!(err.contains("batch size (32)") && err.contains("16"), "{err}");
}
