//! The training step, generic over `Backend`: the optimizer (Nesterov SGD groups, and Muon
//! with its Newton–Schulz iteration for the conv filters), lookahead, and the augmentation
//! stream (alternating flip, translation, colour jitter). `Config`, the recipes and their
//! schedule arithmetic are in `recipe.rs`; the run driver (clock, evaluation, TTA) in `run.rs`.

use crate::backend::{all, all_mut, Backend, BnMode, Crop, View, ViewMut, MOMENTS};
use crate::model::{patch_covariance, span, whitening_filters, Layout, Net};
use crate::rng::Rng;
use anyhow::{bail, Result};

pub use crate::recipe::{Config, Group, Groups, Jitter, Muon, Recipe, Renorm};
// Where the tests and tools have always found them.
pub use crate::run::{DeviceSplit, Evaluator};

/// Scratch of the Newton–Schulz iteration for `(rows, cols)` matrices up to `len` values.
pub struct NewtonSchulz<B: Backend> {
    pub x: B::Tensor, // (rows, cols) the iterate; the input, then the result
    y: B::Tensor,     // (rows, cols) the next iterate
    a: B::Tensor,     // (rows, rows) X·Xᵀ
    p: B::Tensor,     // (rows, rows) b·A + c·A²
}

impl<B: Backend> NewtonSchulz<B> {
    pub fn new(b: &B, max_rows: usize, max_len: usize) -> NewtonSchulz<B> {
        NewtonSchulz { x: b.zeros(max_len), y: b.zeros(max_len), a: b.zeros(max_rows * max_rows), p: b.zeros(max_rows * max_rows) }
    }

    /// Orthogonalises `x (rows, cols)`, rows ≤ cols, in place: X ← X / (‖X‖ + eps), then
    /// `iterations` × {A = XXᵀ; X ← aX + (bA + cA²)X}, which drives every singular value of X
    /// into a band around 1 (about 0.7–1.2 for Muon's coefficients).
    pub fn run(&mut self, b: &B, (rows, cols): (usize, usize), [ca, cb, cc]: [f64; 3], iterations: usize, eps: f32) {
        assert!(rows <= cols, "Newton–Schulz is written for rows ≤ cols");
        let (len, square) = (rows * cols, rows * rows);
        b.scale_to_norm(1.0, eps, all_mut(&mut self.x, len));
        for _ in 0..iterations {
            b.matmul((rows, cols, rows), 1.0, all(&self.x, len), all(&self.x, len), true, 0.0, all_mut(&mut self.a, square));
            b.copy(all(&self.a, square), all_mut(&mut self.p, square));
            b.matmul(
                (rows, rows, rows),
                cc as f32,
                all(&self.a, square),
                all(&self.a, square),
                false,
                cb as f32,
                all_mut(&mut self.p, square),
            );
            b.copy(all(&self.x, len), all_mut(&mut self.y, len));
            b.matmul((rows, rows, cols), 1.0, all(&self.p, square), all(&self.x, len), false, ca as f32, all_mut(&mut self.y, len));
            std::mem::swap(&mut self.x, &mut self.y);
        }
    }
}

/// Muon on one filter `w (rows, cols)` with gradient `g` and momentum `m`: m ← μm + g;
/// X = NS(g + μm); with `renorm`, W ← W·√rows/‖W‖; then W ← decay·(W − lr·X).
#[allow(clippy::too_many_arguments)]
pub fn muon_update<B: Backend>(
    b: &B,
    ns: &mut NewtonSchulz<B>,
    muon: &Muon,
    (rows, cols): (usize, usize),
    (lr, decay, renorm): (f32, f32, bool),
    g: View<B::Tensor>,
    m: ViewMut<B::Tensor>,
    w: ViewMut<B::Tensor>,
) {
    b.nesterov(muon.momentum as f32, g, m, all_mut(&mut ns.x, rows * cols));
    ns.run(b, (rows, cols), muon.coefficients, muon.iterations, muon.eps as f32);
    if renorm {
        b.scale_to_norm((rows as f32).sqrt(), 0.0, ViewMut { buf: &mut *w.buf, range: w.range.clone() });
    }
    b.axpby(-lr * decay, all(&ns.x, rows * cols), decay, w);
}

/// Everything a training run keeps between steps, allocated once.
pub struct Trainer<'a, B: Backend> {
    pub b: &'a B,
    pub cfg: Config,
    pub net: Net<B>,
    pub(crate) train: &'a DeviceSplit<B>,
    momentum: B::Tensor,   // (trainable) SGD and Muon momentum buffers
    ema_params: B::Tensor, // (params_len) lookahead copy of the arena
    ema_running: B::Tensor,
    order: B::Index,             // (n_train) this epoch's shuffle
    crops: B::Index,             // (n_train) this epoch's packed crops, in shuffled order
    jitter: Option<B::Tensor>,   // (n_train, 2) this epoch's (brightness, contrast), in shuffled order
    stats: B::Tensor,            // (2) this epoch's summed loss and correct count
    moments: B::Tensor,          // (whiten_images, 156) per-image patch moments
    ns: Option<NewtonSchulz<B>>, // Muon's scratch
    rng: Rng,
    flip_base: Vec<bool>,
    last_renorm: usize,
    pub step: usize,
    pub total_steps: usize,
}

impl<'a, B: Backend> Trainer<'a, B> {
    pub fn new(b: &'a B, cfg: Config, train: &'a DeviceSplit<B>) -> Result<Trainer<'a, B>> {
        cfg.validate()?;
        if b.precision() != cfg.precision {
            bail!(
                "--precision {}: the {} backend stores activations in {} here (half precision runs on wgpu adapters with \
                 shader-f16, and on --backend cpu as an emulation of f16 storage); use --precision {}",
                cfg.precision.name(),
                b.name(),
                b.precision().name(),
                b.precision().name()
            );
        }
        if train.len() < cfg.batch_size {
            bail!("the batch size ({}) must be between 1 and the number of training images ({})", cfg.batch_size, train.len());
        }
        let net = Net::new(b, cfg.arch(), cfg.batch_size)?;
        let layout = &net.layout;
        let filters = layout.layers.iter().map(|l| l.filter_matrix());
        let ns =
            cfg.muon.map(|_| NewtonSchulz::new(b, filters.clone().map(|f| f.0).max().unwrap(), filters.map(|(r, c)| r * c).max().unwrap()));
        Ok(Trainer {
            momentum: b.zeros(layout.trainable),
            ema_params: b.zeros(layout.params_len()),
            ema_running: b.zeros(layout.running_len),
            order: b.index_zeros(train.len()),
            crops: b.index_zeros(train.len()),
            jitter: cfg.jitter.map(|_| b.zeros(2 * train.len())),
            stats: b.zeros(2),
            moments: b.zeros(cfg.whiten_images.min(train.len()) * MOMENTS),
            ns,
            rng: Rng::new(cfg.seed),
            flip_base: Vec::new(),
            last_renorm: 0,
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
        let (params, running) = self.net.layout.init(&mut self.rng, self.cfg.head_unit_std, self.cfg.whiten_bias_default_init);
        self.net.set_state(self.b, &params, &running);
        let layout = &self.net.layout;
        self.b.fill(all_mut(&mut self.momentum, layout.trainable), 0.0);
        self.flip_base = (0..self.train.len()).map(|_| self.cfg.flip && self.rng.coin()).collect();
        self.step = 0;
        self.last_renorm = 0;
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
        b.upload(ViewMut { buf: &mut net.params, range: net.layout.whiten_weight.clone() }, &weights);
        let layout = &net.layout;
        b.copy(all(&net.params, layout.params_len()), all_mut(&mut self.ema_params, layout.params_len()));
        b.copy(all(&net.running, layout.running_len), all_mut(&mut self.ema_running, layout.running_len));
        eigenvalues
    }

    /// Draws this epoch's shuffle and augmentation and uploads them.
    pub fn start_epoch(&mut self, epoch: usize) {
        let (order, crops) = epoch_crops(&mut self.rng, &self.flip_base, epoch, &self.cfg);
        self.set_epoch(&order, &crops);
        if let (Some(jitter), Some(buf)) = (self.cfg.jitter, self.jitter.as_mut()) {
            let values = epoch_jitter(&mut self.rng, self.train.len(), jitter);
            self.b.upload(all_mut(buf, values.len()), &values);
        }
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
        let jitter = self.jitter.as_ref().map(|j| View { buf: j, range: 2 * rows.start..2 * rows.end });
        let (order, crops) = (View { buf: &self.order, range: rows.clone() }, View { buf: &self.crops, range: rows });
        b.load_batch(&self.train.images, order, crops, jitter, &mut net.x, &mut net.labels);
        net.forward(b, bs, BnMode::Train { momentum: cfg.bn_momentum, eps: cfg.bn_eps });
        b.cross_entropy(bs, cfg.label_smoothing, &net.logits, &net.labels, Some(&mut net.dlogits), &mut self.stats);
        let whiten_steps = cfg.whiten_bias_steps(self.train.len());
        let whiten_bias = self.step < whiten_steps;
        net.backward(b, bs, whiten_bias);
        let (groups, mult) = (cfg.groups(), cfg.lr_multiplier(self.step, self.total_steps));
        let layout = &net.layout;
        let mut sgd = |group: Group, mult: f64, range: std::ops::Range<usize>| {
            let (p, g) = (ViewMut { buf: &mut net.params, range: range.clone() }, View { buf: &net.grads, range: range.clone() });
            let m = ViewMut { buf: &mut self.momentum, range };
            b.sgd_step(p, g, m, (group.lr * mult) as f32, group.weight_decay as f32, cfg.momentum as f32);
        };
        if cfg.muon.is_none() {
            // airbench94: one base group over the whitening bias (while it trains), the filters
            // and the head, which are consecutive in the arena.
            let first = if whiten_bias { layout.whiten_bias.start } else { layout.whiten_bias.end };
            sgd(groups.filters, mult, first..layout.head.end);
        } else {
            if whiten_bias {
                // With Muon the whitening bias has its own schedule: linear decay over its steps.
                sgd(groups.whiten_bias, 1.0 - self.step as f64 / whiten_steps as f64, layout.whiten_bias.clone());
            }
            sgd(groups.head, mult, layout.head.clone());
        }
        sgd(groups.bn_bias, mult, span(&layout.bn_bias));
        if let Some(muon) = cfg.muon {
            let renorm = muon.renorm.due(self.step + 1, self.total_steps, self.last_renorm);
            if renorm {
                self.last_renorm = self.step + 1;
            }
            self.muon_step(&muon, groups.filters, mult, renorm);
        }
        self.step += 1;
        let (params_len, running_len, net) = (self.net.layout.params_len(), self.net.layout.running_len, &mut self.net);
        for decay in self.cfg.lookahead_decays(self.step, self.total_steps) {
            b.lookahead(decay as f32, all_mut(&mut self.ema_params, params_len), all_mut(&mut net.params, params_len));
            b.lookahead(decay as f32, all_mut(&mut self.ema_running, running_len), all_mut(&mut net.running, running_len));
        }
        b.end_step();
    }

    /// Muon on every conv filter (see `muon_update`).
    fn muon_step(&mut self, muon: &Muon, group: Group, mult: f64, renorm: bool) {
        let (b, net, ns) = (self.b, &mut self.net, self.ns.as_mut().expect("Muon scratch"));
        let lr = group.lr * mult;
        let decay = 1.0 - lr * group.weight_decay;
        for (layer, range) in net.layout.layers.iter().zip(&net.layout.conv) {
            let g = View { buf: &net.grads, range: range.clone() };
            let (m, w) =
                (ViewMut { buf: &mut self.momentum, range: range.clone() }, ViewMut { buf: &mut net.params, range: range.clone() });
            muon_update(b, ns, muon, layer.filter_matrix(), (lr as f32, decay as f32, renorm), g, m, w);
        }
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

/// One epoch's colour jitter, `(n, 2)` = (brightness, contrast) per position of the shuffle:
/// brightness U(±b), contrast 1 + U(±c).
pub fn epoch_jitter(rng: &mut Rng, n: usize, jitter: Jitter) -> Vec<f32> {
    (0..n).flat_map(|_| [rng.symmetric(jitter.brightness), 1.0 + rng.symmetric(jitter.contrast)]).collect()
}
