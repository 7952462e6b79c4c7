//! The run driver, generic over `Backend`: datasets on the device, evaluation with test-time
//! augmentation (airbench's weighted views, or hiverge's selective TTA), the per-epoch rows,
//! and one full run on the recipe's clock (§3: from the whitening init to the end of the final
//! TTA; the per-epoch diagnostics are outside it).

use crate::backend::{all, all_mut, Backend, BnMode, Crop, View, ViewMut, CLASSES};
use crate::data::Split;
use crate::model::Net;
use crate::train::Trainer;
use anyhow::{bail, Result};
use web_time::Instant; // std's on native; performance.now() in the browser

/// Test-time augmentation views and their weights: level 0 the image, level 1 adds its
/// mirror, level 2 adds both under one-pixel translations (reflect padding) at half weight.
pub fn tta_views(level: usize) -> Vec<(f32, Crop)> {
    let c = |dy, dx, flip| Crop { dy, dx, flip };
    match level {
        0 => vec![(1.0, Crop::IDENTITY)],
        1 => vec![(0.5, Crop::IDENTITY), (0.5, c(0, 0, true))],
        // Mirroring a view shifted by dx equals shifting the mirrored image by −dx.
        _ => vec![
            (0.25, Crop::IDENTITY),
            (0.25, c(0, 0, true)),
            (0.125, c(-1, -1, false)),
            (0.125, c(-1, 1, true)),
            (0.125, c(1, 1, false)),
            (0.125, c(1, -1, true)),
        ],
    }
}

/// A dataset resident on the backend, with the identity index for evaluation.
pub struct DeviceSplit<B: Backend> {
    pub images: B::Images,
    pub labels: Vec<u8>,
    pub order: B::Index, // (n) 0..n
}

impl<B: Backend> DeviceSplit<B> {
    pub fn new(b: &B, split: &Split) -> DeviceSplit<B> {
        let mut order = b.index_zeros(split.len());
        b.upload_index(all_mut(&mut order, split.len()), &(0..split.len() as u32).collect::<Vec<_>>());
        DeviceSplit { images: b.upload_images(&split.pixels, &split.labels), labels: split.labels.clone(), order }
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Runs the net in eval mode over a split under TTA views, accumulating weighted logits.
pub struct Evaluator<B: Backend> {
    views: Vec<(f32, B::Index)>, // each (weight, (capacity) one packed crop repeated)
    logits: B::Tensor,           // (n, 10) weighted sum over views
    chosen: B::Index,            // (n) the images of a selective pass
}

/// A `(capacity)` index buffer holding one packed crop in every entry.
fn constant_crops<B: Backend>(b: &B, crop: Crop, capacity: usize) -> B::Index {
    let mut buf = b.index_zeros(capacity);
    b.upload_index(all_mut(&mut buf, capacity), &vec![crop.pack(); capacity]);
    buf
}

impl<B: Backend> Evaluator<B> {
    pub fn new(b: &B, n: usize, capacity: usize, level: usize) -> Evaluator<B> {
        let views = tta_views(level).into_iter().map(|(w, crop)| (w, constant_crops(b, crop, capacity))).collect();
        Evaluator { views, logits: b.zeros(n * CLASSES), chosen: b.index_zeros(n) }
    }

    /// Logits `(n, 10)` of every image of `data`, read back to the host.
    pub async fn logits(&mut self, b: &B, net: &mut Net<B>, data: &DeviceSplit<B>, eps: f32) -> Vec<f32> {
        view_logits(b, net, data, (&data.order, data.len()), &self.views, false, &mut self.logits, eps).await
    }

    /// The predicted class (argmax logit) of every image of `data`.
    pub async fn predictions(&mut self, b: &B, net: &mut Net<B>, data: &DeviceSplit<B>, eps: f32) -> Vec<u8> {
        self.logits(b, net, data, eps).await.chunks_exact(CLASSES).map(|l| argmax(l) as u8).collect()
    }

    /// Fraction of `data` whose argmax logit is the label.
    pub async fn accuracy(&mut self, b: &B, net: &mut Net<B>, data: &DeviceSplit<B>, eps: f32) -> f64 {
        fraction_correct(&self.predictions(b, net, data, eps).await, &data.labels)
    }

    /// hiverge's selective TTA: the plain `logits (n, 10)` of every image, except that the
    /// `fraction` least confident ones get the mean of this evaluator's views instead.
    #[allow(clippy::too_many_arguments)]
    pub async fn selective(
        &mut self,
        b: &B,
        net: &mut Net<B>,
        data: &DeviceSplit<B>,
        mut logits: Vec<f32>,
        fraction: f64,
        eps: f32,
    ) -> Vec<f32> {
        let chosen = least_confident(&logits, (fraction * data.len() as f64) as usize);
        b.upload_index(all_mut(&mut self.chosen, chosen.len()), &chosen);
        let views = view_logits(b, net, data, (&self.chosen, chosen.len()), &self.views, true, &mut self.logits, eps).await;
        for (&i, v) in chosen.iter().zip(views.chunks_exact(CLASSES)) {
            logits[i as usize * CLASSES..(i as usize + 1) * CLASSES].copy_from_slice(v);
        }
        logits
    }
}

/// Logits `(n, 10)` of the `n` images `index` of `data` under `views`, weighted or (with
/// `equal_weights`) averaged, summed in `sum` and read back to the host.
#[allow(clippy::too_many_arguments)]
async fn view_logits<B: Backend>(
    b: &B,
    net: &mut Net<B>,
    data: &DeviceSplit<B>,
    (index, n): (&B::Index, usize),
    views: &[(f32, B::Index)],
    equal_weights: bool,
    sum: &mut B::Tensor,
    eps: f32,
) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    b.fill(all_mut(sum, n * CLASSES), 0.0);
    for start in (0..n).step_by(net.capacity) {
        let count = net.capacity.min(n - start);
        for (weight, crops) in views {
            let index = View { buf: index, range: start..start + count };
            b.load_batch(&data.images, index, View { buf: crops, range: 0..count }, None, &mut net.x, &mut net.labels);
            net.forward(b, count, BnMode::Eval { eps });
            let weight = if equal_weights { 1.0 / views.len() as f32 } else { *weight };
            let dst = ViewMut { buf: &mut *sum, range: start * CLASSES..(start + count) * CLASSES };
            b.axpby(weight, all(&net.logits, count * CLASSES), 1.0, dst);
        }
    }
    b.read(all(sum, n * CLASSES)).await
}

/// The `k` rows of `logits (n, 10)` with the lowest softmax confidence (largest probability),
/// least confident first; ties in index order.
pub fn least_confident(logits: &[f32], k: usize) -> Vec<u32> {
    let confidence = |l: &[f32]| {
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        1.0 / l.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>()
    };
    let mut rows: Vec<(f64, u32)> = logits.chunks_exact(CLASSES).enumerate().map(|(i, l)| (confidence(l), i as u32)).collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    rows.into_iter().take(k).map(|(_, i)| i).collect()
}

fn fraction_correct(predictions: &[u8], labels: &[u8]) -> f64 {
    predictions.iter().zip(labels).filter(|(p, y)| p == y).count() as f64 / labels.len() as f64
}

/// Index of the first largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// One row of the per-epoch table.
#[derive(Clone, Debug)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_acc: f64,
    pub tta_acc: Option<f64>,
    /// Seconds on the §3 clock so far.
    pub seconds: f64,
}

/// The outcome of one run; times in seconds.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub accuracy: f64,
    pub tta_accuracy: f64,
    pub time_seconds: f64,
    pub whiten_seconds: f64,
    pub train_seconds: f64,
    pub tta_seconds: f64,
    pub steps: usize,
    pub train_images: usize,
    pub test_images: usize,
}

/// A stopwatch that can pause, for the §3 clock.
struct Clock {
    total: f64,
    since: Option<Instant>,
}

impl Clock {
    fn new() -> Clock {
        Clock { total: 0.0, since: None }
    }
    fn start(&mut self) {
        self.since = Some(Instant::now());
    }
    /// Seconds of the running lap (0 when stopped).
    fn lap(&self) -> f64 {
        self.since.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
    fn stop(&mut self) -> f64 {
        let lap = self.lap();
        self.since = None;
        self.total += lap;
        lap
    }
}

/// Progress events of a run, for the caller to display.
pub enum Event<'e> {
    /// A step was recorded (not necessarily run yet).
    Step { epoch: usize, step: usize, steps: usize },
    /// After `Flow::Sync`: the device finished the epoch's steps so far, with these means.
    Synced { epoch: usize, step: usize, train_loss: f64, train_acc: f64, seconds: f64 },
    /// An epoch's row, and the plain (no TTA) prediction for every test image.
    Epoch { log: &'e EpochLog, predictions: &'e [u8] },
}

/// What the caller wants after an event.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flow {
    Continue,
    /// Wait for the device and report `Event::Synced`; in a browser this also lets the page
    /// repaint and handle input before the next step.
    Sync,
    /// End the run now; `run` returns an error saying it was stopped.
    Stop,
}

/// One full run: whitening init, training, per-epoch evaluation without TTA (`plain`,
/// outside the clock) and the final evaluation with TTA (`tta`; selective when the recipe
/// says so).
pub async fn run<B: Backend>(
    t: &mut Trainer<'_, B>,
    test: &DeviceSplit<B>,
    plain: &mut Evaluator<B>,
    tta: &mut Evaluator<B>,
    on: &mut dyn FnMut(Event) -> Flow,
) -> Result<RunResult> {
    let b = t.b;
    let eps = t.cfg.bn_eps;
    let steps_per_epoch = t.cfg.steps_per_epoch(t.train.len());
    let epochs = t.total_steps.div_ceil(steps_per_epoch);
    let mut clock = Clock::new();
    b.sync().await;
    clock.start();
    t.init_whitening().await;
    b.sync().await;
    let whiten_seconds = clock.stop();
    let (mut train_seconds, mut last) = (0.0, None);
    clock.start();
    for epoch in 0..epochs {
        t.start_epoch(epoch);
        let steps = steps_per_epoch.min(t.total_steps - t.step);
        for batch in 0..steps {
            t.train_step(batch);
            let mut flow = on(Event::Step { epoch: epoch + 1, step: batch + 1, steps });
            if flow == Flow::Sync {
                let (train_loss, train_acc) = t.epoch_stats(batch + 1).await;
                let seconds = clock.total + clock.lap();
                flow = on(Event::Synced { epoch: epoch + 1, step: batch + 1, train_loss, train_acc, seconds });
            }
            if flow == Flow::Stop {
                bail!("stopped in epoch {} at step {}", epoch + 1, batch + 1);
            }
        }
        b.sync().await;
        train_seconds += clock.stop();
        let (train_loss, train_acc) = t.epoch_stats(steps).await;
        if !train_loss.is_finite() {
            bail!("training diverged: the loss is {train_loss} in epoch {}; lower --lr or check the data", epoch + 1);
        }
        let predictions = plain.predictions(b, &mut t.net, test, eps).await;
        let val_acc = fraction_correct(&predictions, &test.labels);
        let log = EpochLog { epoch: epoch + 1, train_loss, train_acc, val_acc, tta_acc: None, seconds: clock.total };
        if epoch + 1 < epochs && on(Event::Epoch { log: &log, predictions: &predictions }) == Flow::Stop {
            bail!("stopped after epoch {}", epoch + 1);
        }
        last = Some((log, predictions));
        clock.start();
    }
    let tta_accuracy = match t.cfg.tta_select {
        None => tta.accuracy(b, &mut t.net, test, eps).await,
        Some(fraction) => {
            let logits = plain.logits(b, &mut t.net, test, eps).await;
            let logits = tta.selective(b, &mut t.net, test, logits, fraction, eps).await;
            fraction_correct(&logits.chunks_exact(CLASSES).map(|l| argmax(l) as u8).collect::<Vec<_>>(), &test.labels)
        }
    };
    let tta_seconds = clock.stop();
    let (mut log, predictions) = last.expect("at least one epoch");
    log.tta_acc = Some(tta_accuracy);
    log.seconds = clock.total;
    on(Event::Epoch { log: &log, predictions: &predictions });
    Ok(RunResult {
        accuracy: log.val_acc,
        tta_accuracy,
        time_seconds: clock.total,
        whiten_seconds,
        train_seconds,
        tta_seconds,
        steps: t.step,
        train_images: t.train.len(),
        test_images: test.len(),
    })
}
