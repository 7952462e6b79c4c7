//! The recipe's loop arithmetic: optimizer groups, lr schedule, lookahead, TTA views,
//! alternating flip, determinism, and the NaN guard.

#[path = "common/short_run.rs"]
mod short_run;

use short_run::synthetic;
use speedrun::backend::{block_on, cpu::Cpu, Crop};
use speedrun::data::Split;
use speedrun::rng::Rng;
use speedrun::train::{epoch_crops, run, tta_views, Config, DeviceSplit, Evaluator, Event, Flow, Trainer};

#[test]
fn groups_follow_the_decoupled_formulas() {
    let (base, bias) = Config::default().groups();
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
    let b = Cpu::new();
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
