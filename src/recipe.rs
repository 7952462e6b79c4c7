//! Every hyperparameter in one `Config`, and the named recipes as presets of it
//! (`../shared/docs/recipe.md`-style descriptions in the README, "Recipes"):
//! - `airbench94`: Keller Jordan's airbench94 (Nesterov SGD, lookahead, 9.9 epochs of 1024).
//! - `airbench94-muon`: airbench94_muon (Muon for the conv filters, 8 epochs of 2000).
//! - `hiverge`: hiverge's record (Muon, SiLU, colour jitter, selective TTA, 7.59 epochs of 1536).
//!
//! Also the arithmetic every recipe derives from its `Config`: optimizer groups, step counts,
//! the lr schedule and the lookahead decays.

use crate::backend::{Act, Precision};
use anyhow::{bail, Result};
use serde::Serialize;

/// A named recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    Airbench94,
    Airbench94Muon,
    Hiverge,
}

impl Recipe {
    pub const ALL: [Recipe; 3] = [Recipe::Airbench94, Recipe::Airbench94Muon, Recipe::Hiverge];

    pub fn name(self) -> &'static str {
        match self {
            Recipe::Airbench94 => "airbench94",
            Recipe::Airbench94Muon => "airbench94-muon",
            Recipe::Hiverge => "hiverge",
        }
    }

    pub fn summary(self) -> &'static str {
        match self {
            Recipe::Airbench94 => "94.01% in 3.09 s (A100): Nesterov SGD + lookahead, 476 steps of 1024, GELU, TTA level 2",
            Recipe::Airbench94Muon => "94.01% in 2.59 s (A100): Muon for the conv filters, no lookahead, 200 steps of 2000, logits / 256",
            Recipe::Hiverge => {
                "94.01% in 2.015 s (A100, the record): Muon with renormalisation cadence and weight decay, SiLU blocks, \
                 colour jitter, 243 steps of 1536, selective TTA"
            }
        }
    }

    pub fn from_name(name: &str) -> Result<Recipe> {
        match Recipe::ALL.into_iter().find(|r| r.name() == name) {
            Some(r) => Ok(r),
            None => bail!("unknown recipe {name:?}: choose one of {}", Recipe::ALL.map(Recipe::name).join(", ")),
        }
    }

    /// The recipe's `Config`.
    pub fn config(self) -> Config {
        let airbench94 = Config::default();
        match self {
            Recipe::Airbench94 => airbench94,
            Recipe::Airbench94Muon => Config {
                recipe: self,
                epochs: 8.0,
                batch_size: 2000,
                lr: 0.24,
                weight_decay: 2e-6,
                muon: Some(Muon {
                    momentum: 0.6,
                    coefficients: [3.4445, -4.7750, 2.0315],
                    iterations: 3,
                    eps: 1e-7,
                    renorm: Renorm::EveryStep,
                    decoupled_weight_decay: false,
                    whiten_bias_lr: 0.053,
                    bias_lr: 0.053,
                    head_lr: 0.67,
                }),
                logit_scale: 1.0 / 256.0,
                head_unit_std: true,
                whiten_bias_default_init: true,
                warmup_frac: 0.0,
                lr_end: 0.0,
                lookahead_every: 0,
                ..airbench94
            },
            Recipe::Hiverge => Config {
                recipe: self,
                epochs: 7.59,
                batch_size: 1536,
                lr: 0.205,
                momentum: 0.825,
                weight_decay: 1.0418e-6,
                muon: Some(Muon {
                    momentum: 0.655,
                    coefficients: [3.4576, -4.7391, 2.0843],
                    iterations: 3,
                    eps: 1e-5,
                    renorm: Renorm::Hiverge,
                    decoupled_weight_decay: true,
                    whiten_bias_lr: 0.0573,
                    bias_lr: 0.0573,
                    head_lr: 0.5415,
                }),
                label_smoothing: 0.09,
                whiten_bias_epochs: 0.19,
                whiten_images: 960,
                jitter: Some(Jitter { brightness: 0.1399, contrast: 0.1308 }),
                act: Act::Silu,
                logit_scale: 1.0 / 256.0,
                head_unit_std: true,
                whiten_bias_default_init: true,
                bn_momentum: 0.5566,
                tta_select: Some(0.25),
                warmup_frac: 0.0,
                lr_end: 0.0,
                lookahead_every: 0,
                ..airbench94
            },
        }
    }
}

/// Muon for the conv filters (Nesterov momentum, then the filter's update orthogonalised by
/// a quintic Newton–Schulz iteration); the biases and the head keep Nesterov SGD.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Muon {
    pub momentum: f64,
    /// (a, b, c) of X ← aX + (bA + cA²)X, A = XXᵀ.
    pub coefficients: [f64; 3],
    pub iterations: usize,
    /// X = g / (‖g‖ + eps) before the iterations.
    pub eps: f64,
    pub renorm: Renorm,
    /// Also shrink the filters by (1 − lr_t·wd) every step, wd = `weight_decay`·batch size.
    pub decoupled_weight_decay: bool,
    /// SGD lrs of the other groups (their weight decay is L2, wd/lr, as in PyTorch's SGD).
    /// The whitening bias's lr decays linearly to 0 over its own training steps.
    pub whiten_bias_lr: f64,
    pub bias_lr: f64,
    pub head_lr: f64,
}

/// When Muon rescales each filter to Frobenius norm √c_out (before the step's update).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Renorm {
    /// Before every update (airbench94_muon).
    EveryStep,
    /// hiverge's cadence: at step t (1-based) of T, before its update, when t − last ≥ 2 + ⌊15·t/T⌋.
    Hiverge,
}

/// Colour jitter per image and epoch, in normalised units: x ← (x + U(±brightness))·(1 + U(±contrast)).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Jitter {
    pub brightness: f32,
    pub contrast: f32,
}

/// Every hyperparameter, with airbench94's defaults. It serializes (serde) to every value but
/// the seed, which is per run: that is what `fingerprint` hashes.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub recipe: Recipe,
    pub epochs: f64,
    pub batch_size: usize,
    /// airbench94: the SGD learning rate "per 1024 examples" (decoupled form, recipe §1.1).
    /// With Muon: Muon's learning rate.
    pub lr: f64,
    /// Nesterov momentum of the SGD groups.
    pub momentum: f64,
    /// airbench94: weight decay "per 1024 examples" (decoupled form). With Muon: per
    /// example, wd = weight_decay·batch_size.
    pub weight_decay: f64,
    /// airbench94: BN biases train with `bias_scaler`× the base lr.
    pub bias_scaler: f64,
    /// Muon for the conv filters; None: SGD with the base group (airbench94).
    pub muon: Option<Muon>,
    pub label_smoothing: f32,
    /// The whitening bias trains for ⌈this × steps per epoch⌉ steps, then freezes.
    pub whiten_bias_epochs: f64,
    pub whiten_eps: f64,
    pub whiten_images: usize,
    pub flip: bool,
    pub translate: i32,
    pub jitter: Option<Jitter>,
    pub widths: [usize; 3],
    pub act: Act,
    pub logit_scale: f32,
    /// Rescale the head's init to unit std (the Muon recipes).
    pub head_unit_std: bool,
    /// Whitening bias from PyTorch's default U(±1/√12) instead of 0.
    pub whiten_bias_default_init: bool,
    /// Running statistics: `running = bn_momentum·running + (1 − bn_momentum)·batch`.
    pub bn_momentum: f32,
    pub bn_eps: f32,
    pub tta_level: usize,
    /// How the backend stores activations and their gradients. Left out of the settings (and
    /// so of the fingerprint) at f32, the default, so f32 runs keep the fingerprints they had.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Selective TTA: only this fraction of the test images, the least confident after a plain
    /// pass, get the TTA views (at equal weights); None: every image, airbench's weights.
    pub tta_select: Option<f64>,
    /// Lr multiplier: `lr_start` → 1 over the first `warmup_frac` of steps, then → `lr_end`.
    pub warmup_frac: f64,
    pub lr_start: f64,
    pub lr_end: f64,
    /// Lookahead every `lookahead_every` steps (0: none) with decay `ema_base^every · (t/T)³`.
    pub lookahead_every: usize,
    pub ema_base: f64,
    #[serde(skip)]
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            recipe: Recipe::Airbench94,
            epochs: 9.9,
            batch_size: 1024,
            lr: 11.5,
            momentum: 0.85,
            weight_decay: 0.0153,
            bias_scaler: 64.0,
            muon: None,
            label_smoothing: 0.2,
            whiten_bias_epochs: 3.0,
            whiten_eps: 5e-4,
            whiten_images: 5000,
            flip: true,
            translate: 2,
            jitter: None,
            widths: [64, 256, 256],
            act: Act::Gelu,
            logit_scale: 1.0 / 9.0,
            head_unit_std: false,
            whiten_bias_default_init: false,
            bn_momentum: 0.6,
            bn_eps: 1e-12,
            tta_level: 2,
            precision: Precision::F32,
            tta_select: None,
            warmup_frac: 0.23,
            lr_start: 0.2,
            lr_end: 0.07,
            lookahead_every: 5,
            ema_base: 0.95,
            seed: 0,
        }
    }
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
        if self.muon.is_some() {
            let mut c_in = crate::model::WHITEN_OUT;
            for w in self.widths {
                if w > 9 * c_in {
                    bail!(
                        "Muon needs every conv's output channels ≤ 9 × its input channels: --widths {:?} has {w} after {c_in}",
                        self.widths
                    );
                }
                c_in = w;
            }
        }
        Ok(())
    }

    /// The network these settings train.
    pub fn arch(&self) -> crate::model::Arch {
        crate::model::Arch { widths: self.widths, act: self.act, logit_scale: self.logit_scale }
    }

    /// Every value but the seed, as compact JSON in the order of the fields above (floats in
    /// their shortest round-trip form): the text `fingerprint` hashes.
    pub fn settings_json(&self) -> String {
        serde_json::to_string(self).expect("a Config always serializes")
    }

    /// `settings_json` as a JSON value (for the JSON rows): the same text, parsed.
    pub fn settings(&self) -> serde_json::Value {
        serde_json::from_str(&self.settings_json()).expect("settings_json is JSON")
    }

    /// A stable fingerprint of every value but the seed: 16 hex digits of the 64-bit FNV-1a
    /// hash of `settings_json`. Runs with equal fingerprints trained the same recipe with the
    /// same settings (JSON rows carry it, and `speedrun stats` groups runs by it).
    pub fn fingerprint(&self) -> String {
        format!("{:016x}", fnv1a64(self.settings_json().as_bytes()))
    }
}

/// 64-bit FNV-1a (Fowler–Noll–Vo), a fixed, platform-independent hash.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// PyTorch SGD hyperparameters of one parameter group (for Muon: lr and decoupled decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub lr: f64,
    pub weight_decay: f64,
}

/// The optimizer groups of a recipe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Groups {
    pub whiten_bias: Group,
    pub filters: Group,
    pub head: Group,
    pub bn_bias: Group,
}

impl Config {
    /// airbench94: one base group (from the decoupled "per 1024 examples" hyperparameters)
    /// and the BN biases at `bias_scaler`×, every parameter decaying by the same lr·wd. With
    /// Muon: each group's own lr, L2 weight decay wd/lr, and Muon's decoupled decay.
    pub fn groups(&self) -> Groups {
        match &self.muon {
            None => {
                let kilostep_scale = 1024.0 * (1.0 + 1.0 / (1.0 - self.momentum));
                let lr = self.lr / kilostep_scale;
                let wd = self.weight_decay * self.batch_size as f64 / kilostep_scale;
                let base = Group { lr, weight_decay: wd / lr };
                let lr_bias = lr * self.bias_scaler;
                Groups { whiten_bias: base, filters: base, head: base, bn_bias: Group { lr: lr_bias, weight_decay: wd / lr_bias } }
            }
            Some(m) => {
                let wd = self.weight_decay * self.batch_size as f64;
                let sgd = |lr: f64| Group { lr, weight_decay: wd / lr };
                let filters = Group { lr: self.lr, weight_decay: if m.decoupled_weight_decay { wd } else { 0.0 } };
                Groups { whiten_bias: sgd(m.whiten_bias_lr), filters, head: sgd(m.head_lr), bn_bias: sgd(m.bias_lr) }
            }
        }
    }

    pub fn steps_per_epoch(&self, train_images: usize) -> usize {
        train_images / self.batch_size // drop_last
    }

    pub fn total_steps(&self, train_images: usize) -> usize {
        (self.steps_per_epoch(train_images) as f64 * self.epochs).ceil() as usize
    }

    /// Steps that train the whitening bias.
    pub fn whiten_bias_steps(&self, train_images: usize) -> usize {
        (self.steps_per_epoch(train_images) as f64 * self.whiten_bias_epochs).ceil() as usize
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
        if self.lookahead_every == 0 {
            return decays;
        }
        if t.is_multiple_of(self.lookahead_every) {
            decays.push(self.ema_base.powi(self.lookahead_every as i32) * (t as f64 / total as f64).powi(3));
        }
        if t == total {
            decays.push(1.0);
        }
        decays
    }
}

impl Renorm {
    /// Whether step `t` (1-based) of `total` rescales the filters, given the last step that
    /// did (0 before any).
    pub fn due(self, t: usize, total: usize, last: usize) -> bool {
        match self {
            Renorm::EveryStep => true,
            Renorm::Hiverge => t - last >= 2 + 15 * t / total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        // From the FNV authors' test suite (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fingerprint_covers_every_value_but_the_seed() {
        let base = Config::default();
        assert_eq!(base.fingerprint().len(), 16);
        assert_eq!(base.fingerprint(), Config { seed: 7, ..Config::default() }.fingerprint());
        let json = base.settings_json();
        assert!(json.starts_with(r#"{"recipe":"airbench94","epochs":9.9,"batch_size":1024,"lr":11.5,"#), "{json}");
        assert!(json.contains(r#""act":"gelu""#) && json.contains(r#""label_smoothing":0.2,"#) && !json.contains("seed"), "{json}");
        let hiverge = Recipe::Hiverge.config().settings_json();
        assert!(hiverge.contains(r#""renorm":"hiverge""#) && hiverge.contains(r#""jitter":{"brightness":0.1399,"#), "{hiverge}");
        let changed = [
            Config { epochs: 9.8, ..base.clone() },
            Config { widths: [8, 8, 8], ..base.clone() },
            Config { tta_select: Some(0.25), ..base.clone() },
            Config { bn_eps: 1e-5, ..base.clone() },
            Config { flip: false, ..base.clone() },
        ];
        let mut all: Vec<String> =
            Recipe::ALL.iter().map(|r| r.config().fingerprint()).chain(changed.iter().map(Config::fingerprint)).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "every change gives another fingerprint");
    }
}
