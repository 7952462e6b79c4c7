//! The airbench94-family network, generic over `Backend`: the flat parameter arena and its
//! typed layout, init, and forward and backward as plain functions in a fixed order.
//!
//! whiten conv 2×2 (3→24, bias, frozen weight) → GELU
//! → 3 × [conv3×3 → maxpool2 → BN → act → conv3×3 → BN → act]  (widths w1, w2, w3; act GELU or SiLU)
//! → global maxpool 3×3 → linear (w3→10, no bias) × logit scale (1/9, or 1/256 in the Muon recipes)

use crate::backend::{all, all_mut, Act, Backend, BnMode, ConvShape, PoolBnShape, View, ViewMut, CHANNELS, CLASSES, PATCH, SIDE};
use crate::rng::Rng;
use std::ops::Range;

pub use crate::whiten::{patch_covariance, whitening_filters};

/// Output channels of the whitening conv: 12 eigen-filters and their negatives.
pub const WHITEN_OUT: usize = 2 * PATCH;
/// Side of the whitening output (2×2 conv, no padding).
const WHITEN_SIDE: usize = SIDE - 1;

/// One named tensor of the arena. `shape` is the internal layout (conv weights OHWI).
#[derive(Clone, Debug)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// What distinguishes the recipes' networks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arch {
    pub widths: [usize; 3],
    /// The activation of the conv blocks (the whitening layer's is always GELU).
    pub act: Act,
    /// Logits are `head(x) · logit_scale`.
    pub logit_scale: f32,
}

/// One conv → [pool] → BN → act layer: block `block` (1-based), conv `conv` (1 or 2).
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    pub block: usize,
    pub conv: usize,
    pub side: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub pool: usize,
}

impl Layer {
    pub fn conv_shape(&self, n: usize) -> ConvShape {
        ConvShape { n, h: self.side, w: self.side, c_in: self.c_in, c_out: self.c_out, k: 3, pad: 1 }
    }
    pub fn bn_shape(&self, n: usize, act: Act) -> PoolBnShape {
        PoolBnShape { n, h: self.side, w: self.side, c: self.c_out, pool: self.pool, act }
    }
    /// The filter as a `(c_out, 9·c_in)` matrix.
    pub fn filter_matrix(&self) -> (usize, usize) {
        (self.c_out, 9 * self.c_in)
    }
    pub fn out_side(&self) -> usize {
        self.side / self.pool
    }
}

/// The six conv layers for block widths `widths`.
pub fn layers(widths: [usize; 3]) -> Vec<Layer> {
    let mut out = Vec::new();
    let (mut side, mut c_in) = (WHITEN_SIDE, WHITEN_OUT);
    for (b, &w) in widths.iter().enumerate() {
        out.push(Layer { block: b + 1, conv: 1, side, c_in, c_out: w, pool: 2 });
        side /= 2;
        out.push(Layer { block: b + 1, conv: 2, side, c_in: w, c_out: w, pool: 1 });
        c_in = w;
    }
    out
}

/// Where every tensor lives. `params` = [whiten.bias | conv weights | head | BN biases |
/// whiten.weight]: the first `trainable` entries have gradients; `running` holds each BN's
/// (mean, var) pair. The named ranges below index the same arena; `params` and `running`
/// list every tensor with its checkpoint name and shape.
#[derive(Clone, Debug)]
pub struct Layout {
    pub widths: [usize; 3],
    pub layers: Vec<Layer>,
    pub params: Vec<Slot>,
    pub running: Vec<Slot>,
    pub trainable: usize,
    pub running_len: usize,
    pub whiten_bias: Range<usize>,
    pub whiten_weight: Range<usize>,
    /// Per layer: conv weight `(c_out, 3, 3, c_in)`, BN bias `(c_out)`, running (mean, var) `(2, c_out)`.
    pub conv: Vec<Range<usize>>,
    pub bn_bias: Vec<Range<usize>>,
    pub bn_running: Vec<Range<usize>>,
    pub head: Range<usize>,
}

fn push(slots: &mut Vec<Slot>, name: String, shape: Vec<usize>) -> Range<usize> {
    let start = slots.last().map_or(0, |s| s.range.end);
    let end = start + shape.iter().product::<usize>();
    slots.push(Slot { name, shape, range: start..end });
    start..end
}

/// The range spanning `ranges` (consecutive in the arena).
pub fn span(ranges: &[Range<usize>]) -> Range<usize> {
    ranges[0].start..ranges[ranges.len() - 1].end
}

impl Layout {
    pub fn new(widths: [usize; 3]) -> Layout {
        let layers = layers(widths);
        let mut params = Vec::new();
        let whiten_bias = push(&mut params, "whiten.bias".into(), vec![WHITEN_OUT]);
        let name = |l: &Layer, what: &str| format!("block{}.{what}{}", l.block, l.conv);
        let conv = layers.iter().map(|l| push(&mut params, name(l, "conv") + ".weight", vec![l.c_out, 3, 3, l.c_in])).collect();
        let head = push(&mut params, "head.weight".into(), vec![CLASSES, widths[2]]);
        let bn_bias = layers.iter().map(|l| push(&mut params, name(l, "norm") + ".bias", vec![l.c_out])).collect();
        let trainable = params.last().unwrap().range.end;
        let whiten_weight = push(&mut params, "whiten.weight".into(), vec![WHITEN_OUT, 2, 2, CHANNELS]);
        let mut running = Vec::new();
        let bn_running = layers
            .iter()
            .map(|l| {
                let mean = push(&mut running, name(l, "norm") + ".running_mean", vec![l.c_out]);
                mean.start..push(&mut running, name(l, "norm") + ".running_var", vec![l.c_out]).end
            })
            .collect();
        let running_len = running.last().unwrap().range.end;
        Layout { widths, layers, params, running, trainable, running_len, whiten_bias, whiten_weight, conv, bn_bias, bn_running, head }
    }

    /// The range of the tensor named `name` (checkpoint names).
    pub fn param(&self, name: &str) -> Range<usize> {
        self.params.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no parameter {name}")).range.clone()
    }

    pub fn params_len(&self) -> usize {
        self.params.last().unwrap().range.end
    }

    /// Fresh parameters as PyTorch initialises the recipes' nets: conv weights kaiming-uniform
    /// U(±1/√(9·c_in)) with the first c_in filters set to identity (dirac), head U(±1/√w3)
    /// (rescaled to unit std with `head_unit_std`), BN biases 0, and the whitening bias 0 or,
    /// with `whiten_bias_default`, PyTorch's default U(±1/√12). The whitening weight comes
    /// from the data.
    pub fn init(&self, rng: &mut Rng, head_unit_std: bool, whiten_bias_default: bool) -> (Vec<f32>, Vec<f32>) {
        let mut params = vec![0.0f32; self.params_len()];
        for (l, range) in self.layers.iter().zip(&self.conv) {
            let w = &mut params[range.clone()];
            let bound = 1.0 / ((9 * l.c_in) as f32).sqrt();
            w.iter_mut().for_each(|v| *v = rng.symmetric(bound));
            for o in 0..l.c_in.min(l.c_out) {
                let filter = &mut w[o * 9 * l.c_in..(o + 1) * 9 * l.c_in];
                filter.fill(0.0);
                filter[4 * l.c_in + o] = 1.0; // centre tap (1, 1) of input channel o
            }
        }
        let head = &mut params[self.head.clone()];
        let bound = 1.0 / (self.widths[2] as f32).sqrt();
        head.iter_mut().for_each(|v| *v = rng.symmetric(bound));
        if head_unit_std {
            let n = head.len() as f64;
            let mean = head.iter().map(|&v| v as f64).sum::<f64>() / n;
            let std = (head.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            head.iter_mut().for_each(|v| *v = (*v as f64 / std) as f32);
        }
        if whiten_bias_default {
            let bound = 1.0 / (PATCH as f32).sqrt();
            params[self.whiten_bias.clone()].iter_mut().for_each(|v| *v = rng.symmetric(bound));
        }
        let mut running = vec![0.0f32; self.running_len];
        for r in &self.bn_running {
            running[r.start + r.len() / 2..r.end].fill(1.0); // running_var
        }
        (params, running)
    }
}

/// Activations of one conv layer, all NHWC at batch capacity.
struct LayerActs<B: Backend> {
    y: B::Tensor,     // (n, side, side, c_out) conv output
    z: B::Tensor,     // (n, side/pool, side/pool, c_out) BN output, before GELU
    a: B::Tensor,     // (n, side/pool, side/pool, c_out) GELU output
    saved: B::Tensor, // (2, c_out) batch mean and 1/std
}

/// The network's parameters and every buffer one step needs, allocated once.
pub struct Net<B: Backend> {
    pub arch: Arch,
    pub layout: Layout,
    pub capacity: usize,
    pub params: B::Tensor,  // (params_len) the arena
    pub running: B::Tensor, // (running_len) BN running statistics
    pub grads: B::Tensor,   // (trainable)
    pub x: B::Tensor,       // (n, 32, 32, 3) input
    pub labels: B::Index,   // (n)
    pub logits: B::Tensor,  // (n, 10)
    pub dlogits: B::Tensor, // (n, 10)
    z0: B::Tensor,          // (n, 31, 31, 24) whitening conv + bias
    a0: B::Tensor,          // (n, 31, 31, 24) GELU of z0
    acts: Vec<LayerActs<B>>,
    pooled: B::Tensor,  // (n, w3) global max
    dpooled: B::Tensor, // (n, w3)
    grad_a: B::Tensor,  // scratch: gradient w.r.t. a layer's output activation
    grad_y: B::Tensor,  // scratch: gradient w.r.t. a conv output
}

impl<B: Backend> Net<B> {
    /// Allocates everything for batches of up to `capacity` images; fails when a buffer
    /// would exceed what the device can bind.
    pub fn new(b: &B, arch: Arch, capacity: usize) -> anyhow::Result<Net<B>> {
        let widths = arch.widths;
        let n = capacity;
        // Checked before any size is computed in usize (absurd widths would overflow it).
        let (largest, max_len) = (crate::memory::largest_tensor(widths, n), b.max_tensor_len() as f64);
        if largest > max_len {
            let fits = (n as f64 * max_len / largest).floor();
            anyhow::bail!(
                "batch size {n} with widths {widths:?} needs {:.0} MiB buffers; this device binds at most {:.0} MiB: {}",
                largest * 4.0 / (1u64 << 20) as f64,
                max_len * 4.0 / (1u64 << 20) as f64,
                if fits >= 1.0 { format!("use --batch-size {fits} or less") } else { "use smaller --widths".to_string() }
            );
        }
        let what = format!("a network of widths {widths:?} for batches of {n}");
        crate::memory::check(b, crate::memory::net_bytes(widths, n), &what)?;
        let layout = Layout::new(widths);
        let whiten_len = n * WHITEN_SIDE * WHITEN_SIDE * WHITEN_OUT;
        let largest = largest as usize;
        let acts: Vec<LayerActs<B>> = layout
            .layers
            .iter()
            .map(|l| LayerActs {
                y: b.activations(n * l.side * l.side * l.c_out),
                z: b.activations(n * l.out_side().pow(2) * l.c_out),
                a: b.activations(n * l.out_side().pow(2) * l.c_out),
                saved: b.zeros(2 * l.c_out),
            })
            .collect();
        Ok(Net {
            params: b.zeros(layout.params_len()),
            running: b.zeros(layout.running_len),
            grads: b.zeros(layout.trainable),
            x: b.activations(n * SIDE * SIDE * CHANNELS),
            labels: b.index_zeros(n),
            logits: b.zeros(n * CLASSES),
            dlogits: b.zeros(n * CLASSES),
            z0: b.activations(whiten_len),
            a0: b.activations(whiten_len),
            acts,
            pooled: b.activations(n * widths[2]),
            dpooled: b.activations(n * widths[2]),
            grad_a: b.activations(largest),
            grad_y: b.activations(largest),
            arch,
            layout,
            capacity,
        })
    }

    fn whiten_shape(n: usize) -> ConvShape {
        ConvShape { n, h: SIDE, w: SIDE, c_in: CHANNELS, c_out: WHITEN_OUT, k: 2, pad: 0 }
    }

    fn final_pool(layout: &Layout, n: usize) -> PoolBnShape {
        let last = layout.layers.last().unwrap();
        PoolBnShape { n, h: last.out_side(), w: last.out_side(), c: last.c_out, pool: last.out_side(), act: Act::Gelu }
    }

    /// `logits = net(x)` for the first `n` images of `self.x`.
    pub fn forward(&mut self, b: &B, n: usize, mode: BnMode) {
        assert!(n <= self.capacity);
        let l = &self.layout;
        let params = &self.params;
        let p = |r: Range<usize>| View { buf: params, range: r };
        b.conv_forward(Self::whiten_shape(n), &self.x, p(l.whiten_weight.clone()), &mut self.z0);
        b.bias_gelu_forward(n * WHITEN_SIDE * WHITEN_SIDE, WHITEN_OUT, &mut self.z0, p(l.whiten_bias.clone()), &mut self.a0);
        for (i, layer) in l.layers.iter().enumerate() {
            let (done, rest) = self.acts.split_at_mut(i);
            let input = done.last().map_or(&self.a0, |prev| &prev.a);
            let act = &mut rest[0];
            match mode {
                BnMode::Train { .. } => b.conv_forward(layer.conv_shape(n), input, p(l.conv[i].clone()), &mut act.y),
                BnMode::Eval { .. } => b.conv_forward_inference(layer.conv_shape(n), input, p(l.conv[i].clone()), &mut act.y),
            }
            let running = ViewMut { buf: &mut self.running, range: l.bn_running[i].clone() };
            let bias = p(l.bn_bias[i].clone());
            b.pool_bn_act_forward(layer.bn_shape(n, self.arch.act), mode, &act.y, bias, running, &mut act.z, &mut act.a, &mut act.saved);
        }
        let last = &self.acts.last().unwrap().a;
        b.max_pool_forward(Self::final_pool(l, n), last, &mut self.pooled);
        b.linear_forward(n, l.widths[2], CLASSES, self.arch.logit_scale, &self.pooled, p(l.head.clone()), &mut self.logits);
    }

    /// Gradients of the loss whose logit gradient is in `self.dlogits`, after a train-mode
    /// `forward`. The whitening bias (and the input gradient of the first conv that it
    /// needs) is computed only when `whiten_bias` is set.
    pub fn backward(&mut self, b: &B, n: usize, whiten_bias: bool) {
        let l = &self.layout;
        let params = &self.params;
        let p = |r: Range<usize>| View { buf: params, range: r };
        let grads = &mut self.grads;
        let head = l.head.clone();
        b.linear_backward(
            n,
            l.widths[2],
            CLASSES,
            self.arch.logit_scale,
            &self.pooled,
            p(head.clone()),
            &self.dlogits,
            &mut self.dpooled,
            ViewMut { buf: grads, range: head },
        );
        b.max_pool_backward(Self::final_pool(l, n), &self.acts.last().unwrap().a, &self.dpooled, &mut self.grad_a);
        for i in (0..l.layers.len()).rev() {
            let (conv, bias) = (l.conv[i].clone(), l.bn_bias[i].clone());
            let act = &self.acts[i];
            let input = if i == 0 { &self.a0 } else { &self.acts[i - 1].a };
            let layer = l.layers[i];
            b.pool_bn_act_backward(
                layer.bn_shape(n, self.arch.act),
                &act.y,
                &act.z,
                &act.saved,
                p(bias.clone()),
                &mut self.grad_a,
                &mut self.grad_y,
                ViewMut { buf: grads, range: bias },
            );
            b.conv_backward_filter(layer.conv_shape(n), input, &self.grad_y, ViewMut { buf: grads, range: conv.clone() });
            if i > 0 || whiten_bias {
                b.conv_backward_data(layer.conv_shape(n), &self.grad_y, p(conv), &mut self.grad_a);
            }
        }
        if whiten_bias {
            let bias = l.whiten_bias.clone();
            b.bias_gelu_backward(n * WHITEN_SIDE * WHITEN_SIDE, WHITEN_OUT, &self.z0, &self.grad_a, ViewMut { buf: grads, range: bias });
        }
    }

    /// Uploads host parameters and running statistics (e.g. from `Layout::init`).
    pub fn set_state(&mut self, b: &B, params: &[f32], running: &[f32]) {
        b.upload(all_mut(&mut self.params, params.len()), params);
        b.upload(all_mut(&mut self.running, running.len()), running);
    }

    /// Reads parameters and running statistics back to the host.
    pub async fn state(&self, b: &B) -> (Vec<f32>, Vec<f32>) {
        let params = b.read(all(&self.params, self.layout.params_len())).await;
        let running = b.read(all(&self.running, self.layout.running_len)).await;
        (params, running)
    }
}
