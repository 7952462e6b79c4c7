//! Short training runs for the tests: synthetic data, and a run that records each step's
//! loss (async, so that the browser test can await its readbacks).
#![allow(dead_code)] // each test binary uses a different subset

use speedrun::backend::Backend;
use speedrun::data::Split;
use speedrun::rng::Rng;
use speedrun::train::{Config, DeviceSplit, Evaluator, Trainer};

/// `n` 32×32 images, class i = a fixed colour per class with ±40 of noise per pixel:
/// learnable in a few steps.
pub fn synthetic(n: usize, seed: u64) -> Split {
    let mut rng = Rng::new(seed);
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let pixels = labels
        .iter()
        .flat_map(|&l| (0..32 * 32 * 3).map(move |j| (l as usize, j % 3)))
        .map(|(l, c)| ((l * 53 + c * 97) % 176 + 40) as f32 + rng.symmetric(40.0))
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    Split { pixels, labels }
}

/// Each step's mean loss, then the plain and TTA test accuracy.
pub async fn train<B: Backend>(b: &B, cfg: &Config, train: &Split, test: &Split) -> (Vec<f64>, f64, f64) {
    let (train, test) = (DeviceSplit::new(b, train), DeviceSplit::new(b, test));
    let mut t = Trainer::new(b, cfg.clone(), &train).unwrap();
    t.reset(cfg.seed);
    t.init_whitening().await;
    let steps_per_epoch = cfg.steps_per_epoch(train.len());
    let mut losses = Vec::new();
    for epoch in 0..t.total_steps.div_ceil(steps_per_epoch) {
        t.start_epoch(epoch);
        let mut before = 0.0;
        for batch in 0..steps_per_epoch.min(t.total_steps - t.step) {
            t.train_step(batch);
            let (mean, _) = t.epoch_stats(batch + 1).await;
            let cumulative = mean * (batch + 1) as f64;
            losses.push(cumulative - before);
            before = cumulative;
        }
    }
    let plain = Evaluator::new(b, test.len(), cfg.batch_size, 0).accuracy(b, &mut t.net, &test, cfg.bn_eps).await;
    let tta = Evaluator::new(b, test.len(), cfg.batch_size, 2).accuracy(b, &mut t.net, &test, cfg.bn_eps).await;
    (losses, plain, tta)
}

/// Per step: both losses and their relative difference.
pub fn loss_table(a: &[f64], b: &[f64]) -> Vec<(f64, f64, f64)> {
    a.iter().zip(b).map(|(&x, &y)| (x, y, (x - y).abs() / x.abs())).collect()
}
