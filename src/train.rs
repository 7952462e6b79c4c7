//! The airbench94 training loop, generic over `Backend`: every knob in `Config`, the lr
//! schedule, Nesterov SGD with two parameter groups, lookahead, alternating-flip
//! augmentation, and test-time augmentation. Timing follows recipe §3: the clock runs from the
//! whitening init to the end of the final TTA; per-epoch diagnostics are outside it.

use crate::backend::{all, all_mut, Backend, BnMode, Crop, View, ViewMut, CLASSES, MOMENTS};
use crate::data::Split;
use crate::model::{patch_covariance, whitening_filters, Layout, Net, WHITEN_OUT};
use crate::rng::Rng;
use anyhow::{bail, Result};
use web_time::Instant; // std's on native; performance.now() in the browser

/// Every hyperparameter, with airbench94's defaults.
#[derive(Clone, Debug)]
pub struct Config {
    pub epochs: f64,
    pub batch_size: usize,
    /// Learning rate "per 1024 examples" (decoupled form, recipe §1.1).
    pub lr: f64,
    pub momentum: f64,
    /// Weight decay "per 1024 examples".
    pub weight_decay: f64,
    /// BN biases train with `bias_scaler`× the base lr.
    pub bias_scaler: f64,
    pub label_smoothing: f32,
    /// The whitening bias trains for this many epochs, then freezes.
    pub whiten_bias_epochs: usize,
    pub whiten_eps: f64,
    pub whiten_images: usize,
    pub flip: bool,
    pub translate: i32,
    pub widths: [usize; 3],
    /// Running statistics: `running = bn_momentum·running + (1 − bn_momentum)·batch`.
    pub bn_momentum: f32,
    pub bn_eps: f32,
    pub tta_level: usize,
    /// Lr multiplier: `lr_start` → 1 over the first `warmup_frac` of steps, then → `lr_end`.
    pub warmup_frac: f64,
    pub lr_start: f64,
    pub lr_end: f64,
    /// Lookahead every `lookahead_every` steps with decay `ema_base^every · (t/T)³`.
    pub lookahead_every: usize,
    pub ema_base: f64,
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            epochs: 9.9,
            batch_size: 1024,
            lr: 11.5,
            momentum: 0.85,
            weight_decay: 0.0153,
            bias_scaler: 64.0,
            label_smoothing: 0.2,
            whiten_bias_epochs: 3,
            whiten_eps: 5e-4,
            whiten_images: 5000,
            flip: true,
            translate: 2,
            widths: [64, 256, 256],
            bn_momentum: 0.6,
            bn_eps: 1e-12,
            tta_level: 2,
            warmup_frac: 0.23,
            lr_start: 0.2,
            lr_end: 0.07,
            lookahead_every: 5,
            ema_base: 0.95,
            seed: 0,
        }
    }
}

/// PyTorch SGD hyperparameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub lr: f64,
    pub weight_decay: f64,
}

impl Config {
    /// Rejects settings no run can use, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if !(self.epochs > 0.0 && self.epochs.is_finite()) {
            bail!("--epochs must be positive (got {})", self.epochs);
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be positive (got {})", self.lr);
        }
        if !(0..=3).contains(&self.translate) {
            bail!("translate must be 0..3 pixels (got {})", self.translate);
        }
        if self.whiten_images == 0 {
            bail!("the whitening needs at least one image");
        }
        Ok(())
    }

    /// (base group, BN-bias group) from the decoupled hyperparameters, as airbench94.
    pub fn groups(&self) -> (Group, Group) {
        let kilostep_scale = 1024.0 * (1.0 + 1.0 / (1.0 - self.momentum));
        let lr = self.lr / kilostep_scale;
        let wd = self.weight_decay * self.batch_size as f64 / kilostep_scale;
        let lr_bias = lr * self.bias_scaler;
        (Group { lr, weight_decay: wd / lr }, Group { lr: lr_bias, weight_decay: wd / lr_bias })
    }

    pub fn steps_per_epoch(&self, train_images: usize) -> usize {
        train_images / self.batch_size // drop_last
    }

    pub fn total_steps(&self, train_images: usize) -> usize {
        (self.steps_per_epoch(train_images) as f64 * self.epochs).ceil() as usize
    }

    /// The lr multiplier at `step` (0-based) of `total`.
    pub fn lr_multiplier(&self, step: usize, total: usize) -> f64 {
        let warmup = (self.warmup_frac * total as f64) as usize;
        if step < warmup {
            let frac = step as f64 / warmup as f64;
            self.lr_start * (1.0 - frac) + frac
        } else {
            let frac = (step - warmup) as f64 / (total - warmup) as f64;
            (1.0 - frac) + self.lr_end * frac
        }
    }

    /// Lookahead decays due after `t` steps (1-based) of `total`, in order: the periodic
    /// update every `lookahead_every` steps, then at the last step a reset of the net to
    /// the average (decay 1), which discards the last steps since the previous update.
    pub fn lookahead_decays(&self, t: usize, total: usize) -> Vec<f64> {
        let mut decays = Vec::new();
        if t.is_multiple_of(self.lookahead_every) {
            decays.push(self.ema_base.powi(self.lookahead_every as i32) * (t as f64 / total as f64).powi(3));
        }
        if t == total {
            decays.push(1.0);
        }
        decays
    }
}

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
        Evaluator { views, logits: b.zeros(n * CLASSES) }
    }

    /// Logits `(n, 10)` of every image of `data`, read back to the host.
    pub async fn logits(&mut self, b: &B, net: &mut Net<B>, data: &DeviceSplit<B>, eps: f32) -> Vec<f32> {
        let n = data.len();
        if n == 0 {
            return Vec::new();
        }
        b.fill(all_mut(&mut self.logits, n * CLASSES), 0.0);
        for start in (0..n).step_by(net.capacity) {
            let count = net.capacity.min(n - start);
            for (weight, crops) in &self.views {
                let index = View { buf: &data.order, range: start..start + count };
                b.load_batch(&data.images, index, View { buf: crops, range: 0..count }, &mut net.x, &mut net.labels);
                net.forward(b, count, BnMode::Eval { eps });
                let dst = ViewMut { buf: &mut self.logits, range: start * CLASSES..(start + count) * CLASSES };
                b.axpy(*weight, all(&net.logits, count * CLASSES), dst);
            }
        }
        b.read(all(&self.logits, n * CLASSES)).await
    }

    /// The predicted class (argmax logit) of every image of `data`.
    pub async fn predictions(&mut self, b: &B, net: &mut Net<B>, data: &DeviceSplit<B>, eps: f32) -> Vec<u8> {
        self.logits(b, net, data, eps).await.chunks_exact(CLASSES).map(|l| argmax(l) as u8).collect()
    }

    /// Fraction of `data` whose argmax logit is the label.
    pub async fn accuracy(&mut self, b: &B, net: &mut Net<B>, data: &DeviceSplit<B>, eps: f32) -> f64 {
        fraction_correct(&self.predictions(b, net, data, eps).await, &data.labels)
    }
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

/// Everything a training run keeps between steps, allocated once.
pub struct Trainer<'a, B: Backend> {
    pub b: &'a B,
    pub cfg: Config,
    pub net: Net<B>,
    train: &'a DeviceSplit<B>,
    momentum: B::Tensor,   // (trainable) SGD momentum buffers
    ema_params: B::Tensor, // (params_len) lookahead copy of the arena
    ema_running: B::Tensor,
    order: B::Index,    // (n_train) this epoch's shuffle
    crops: B::Index,    // (n_train) this epoch's packed crops, in shuffled order
    stats: B::Tensor,   // (2) this epoch's summed loss and correct count
    moments: B::Tensor, // (whiten_images, 156) per-image patch moments
    rng: Rng,
    flip_base: Vec<bool>,
    pub step: usize,
    pub total_steps: usize,
}

impl<'a, B: Backend> Trainer<'a, B> {
    pub fn new(b: &'a B, cfg: Config, train: &'a DeviceSplit<B>) -> Result<Trainer<'a, B>> {
        cfg.validate()?;
        if train.len() < cfg.batch_size {
            bail!("the batch size ({}) must be between 1 and the number of training images ({})", cfg.batch_size, train.len());
        }
        let net = Net::new(b, cfg.widths, cfg.batch_size)?;
        let layout = &net.layout;
        Ok(Trainer {
            momentum: b.zeros(layout.trainable),
            ema_params: b.zeros(layout.params_len()),
            ema_running: b.zeros(layout.running_len),
            order: b.index_zeros(train.len()),
            crops: b.index_zeros(train.len()),
            stats: b.zeros(2),
            moments: b.zeros(cfg.whiten_images.min(train.len()) * MOMENTS),
            rng: Rng::new(cfg.seed),
            flip_base: Vec::new(),
            step: 0,
            total_steps: cfg.total_steps(train.len()),
            b,
            net,
            train,
            cfg,
        })
    }

    /// Fresh weights and optimizer state for a run with `seed` (outside the clock).
    pub fn reset(&mut self, seed: u64) {
        self.cfg.seed = seed;
        self.rng = Rng::new(seed);
        let (params, running) = self.net.layout.init(&mut self.rng);
        self.net.set_state(self.b, &params, &running);
        let layout = &self.net.layout;
        self.b.fill(all_mut(&mut self.momentum, layout.trainable), 0.0);
        self.flip_base = (0..self.train.len()).map(|_| self.cfg.flip && self.rng.coin()).collect();
        self.step = 0;
    }

    /// Sets the whitening weights from the first `whiten_images` training images, then
    /// starts the lookahead copy. Returns the eigenvalues.
    pub async fn init_whitening(&mut self) -> Vec<f64> {
        let (b, net) = (self.b, &mut self.net);
        let n = self.cfg.whiten_images.min(self.train.len());
        b.patch_moments(&self.train.images, View { buf: &self.train.order, range: 0..n }, all_mut(&mut self.moments, n * MOMENTS));
        let mut sums = vec![0.0f64; MOMENTS];
        for image in b.read(all(&self.moments, n * MOMENTS)).await.chunks_exact(MOMENTS) {
            sums.iter_mut().zip(image).for_each(|(s, &v)| *s += v as f64);
        }
        let cov = patch_covariance(&sums, (n * 31 * 31) as f64);
        let (weights, eigenvalues) = whitening_filters(&cov, self.cfg.whiten_eps);
        let range = net.layout.param("whiten.weight");
        b.upload(ViewMut { buf: &mut net.params, range }, &weights);
        let layout = &net.layout;
        b.copy(all(&net.params, layout.params_len()), all_mut(&mut self.ema_params, layout.params_len()));
        b.copy(all(&net.running, layout.running_len), all_mut(&mut self.ema_running, layout.running_len));
        eigenvalues
    }

    /// Draws this epoch's shuffle and augmentation and uploads them.
    pub fn start_epoch(&mut self, epoch: usize) {
        let (order, crops) = epoch_crops(&mut self.rng, &self.flip_base, epoch, &self.cfg);
        self.set_epoch(&order, &crops);
    }

    /// Uses `order` (image indices) and `crops` (packed `Crop`s, in that order) this epoch.
    pub fn set_epoch(&mut self, order: &[u32], crops: &[u32]) {
        let n = self.train.len();
        self.b.upload_index(all_mut(&mut self.order, n), order);
        self.b.upload_index(all_mut(&mut self.crops, n), crops);
        self.b.fill(all_mut(&mut self.stats, 2), 0.0);
    }

    /// One optimizer step on batch `batch` of the current epoch. Never waits on the device.
    pub fn train_step(&mut self, batch: usize) {
        let (b, cfg, bs) = (self.b, &self.cfg, self.cfg.batch_size);
        let net = &mut self.net;
        let rows = batch * bs..(batch + 1) * bs;
        b.begin_step();
        b.load_batch(
            &self.train.images,
            View { buf: &self.order, range: rows.clone() },
            View { buf: &self.crops, range: rows },
            &mut net.x,
            &mut net.labels,
        );
        net.forward(b, bs, BnMode::Train { momentum: cfg.bn_momentum, eps: cfg.bn_eps });
        b.cross_entropy(bs, cfg.label_smoothing, &net.logits, &net.labels, Some(&mut net.dlogits), &mut self.stats);
        let steps_per_epoch = cfg.steps_per_epoch(self.train.len());
        let whiten_bias = self.step < cfg.whiten_bias_epochs * steps_per_epoch;
        net.backward(b, bs, whiten_bias);
        let mult = cfg.lr_multiplier(self.step, self.total_steps);
        let (base, bias) = cfg.groups();
        let layout = &net.layout;
        let first = if whiten_bias { 0 } else { WHITEN_OUT }; // the whitening bias is first
        let momentum = cfg.momentum as f32;
        for (group, range) in [(base, layout.base_group.start + first..layout.base_group.end), (bias, layout.bias_group.clone())] {
            let p = ViewMut { buf: &mut net.params, range: range.clone() };
            let g = View { buf: &net.grads, range: range.clone() };
            let m = ViewMut { buf: &mut self.momentum, range };
            b.sgd_step(p, g, m, (group.lr * mult) as f32, group.weight_decay as f32, momentum);
        }
        self.step += 1;
        for decay in cfg.lookahead_decays(self.step, self.total_steps) {
            b.lookahead(decay as f32, all_mut(&mut self.ema_params, layout.params_len()), all_mut(&mut net.params, layout.params_len()));
            b.lookahead(decay as f32, all_mut(&mut self.ema_running, layout.running_len), all_mut(&mut net.running, layout.running_len));
        }
        b.end_step();
    }

    /// Mean train loss and accuracy over the steps of the current epoch so far.
    pub async fn epoch_stats(&self, steps: usize) -> (f64, f64) {
        let s = self.b.read(all(&self.stats, 2)).await;
        let n = (steps * self.cfg.batch_size) as f64;
        (s[0] as f64 / n, s[1] as f64 / n)
    }

    pub fn layout(&self) -> &Layout {
        &self.net.layout
    }
}

/// One epoch's shuffle and per-image views, drawn on the host so every backend sees the
/// same stream: a random translation of up to `translate` pixels, and (alternating flip) the
/// image's fixed random orientation `flip_base`, mirrored on odd epochs.
pub fn epoch_crops(rng: &mut Rng, flip_base: &[bool], epoch: usize, cfg: &Config) -> (Vec<u32>, Vec<u32>) {
    let order = rng.permutation(flip_base.len());
    let t = cfg.translate;
    let mirror_all = cfg.flip && epoch % 2 == 1;
    let crops = order
        .iter()
        .map(|&i| {
            let mut shift = || if t > 0 { rng.below(2 * t as usize + 1) as i32 - t } else { 0 };
            let (dy, dx) = (shift(), shift());
            // Mirroring the cropped image equals cropping the mirrored image at −dx.
            let dx = if mirror_all { -dx } else { dx };
            Crop { dy, dx, flip: flip_base[i as usize] ^ mirror_all }.pack()
        })
        .collect();
    (order, crops)
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
/// outside the clock) and the final evaluation with TTA (`tta`).
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
    let tta_accuracy = tta.accuracy(b, &mut t.net, test, eps).await;
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
