//! Per-op timings of one airbench94 training step at full width, Muon's Newton–Schulz
//! iteration on the largest filter, and whole-step images/s: where the time of a step goes,
//! per backend.
//!
//! `cargo bench --bench ops [-- --batch N --reps N --backend cpu|wgpu|all --conv tiled|direct|both
//! --precision f32|half|both --w1 64 --w2 256 --w3 256 --only TEXT]` (defaults: batch 64, 3
//! repetitions, every backend; wgpu in both precisions where the adapter has f16, the CPU in
//! f32, as its half is an emulation for accuracy checks; each op is timed after one untimed
//! warm-up call, synchronised before and after). A conv's GFLOP/s counts a direct convolution's 2·MACs,
//! whatever the algorithm (Winograd does a quarter of the multiplies: its rate is effective);
//! `infer` is the inference forward (`conv_forward_inference`), not part of a training step.
//! `--only TEXT` times only the rows whose name contains TEXT (`3² fwd`, `wgrad`, `whole`).

use speedrun::backend::{all, all_mut, block_on, cpu::Cpu, Act, Backend, BnMode, ConvShape, Precision, View, ViewMut};
use speedrun::model::{layers, Arch, Layout, Net};
use speedrun::rng::Rng;
use std::time::Instant;

fn arg_str(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default.to_string(), |v| v.clone())
}

fn arg(name: &str, default: usize) -> usize {
    arg_str(name, &default.to_string()).parse().expect("a number")
}

/// Whether `--only` selects the row `name`.
fn wanted(name: &str) -> bool {
    name.contains(&arg_str("--only", ""))
}

/// Mean seconds per call of `f`, after one warm-up call; NaN (not run) unless `--only`
/// selects the row `name`.
fn time<B: Backend>(b: &B, name: &str, reps: usize, mut f: impl FnMut()) -> f64 {
    if !wanted(name) {
        return f64::NAN;
    }
    f();
    block_on(b.sync());
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    block_on(b.sync());
    t.elapsed().as_secs_f64() / reps as f64
}

/// `t` (of `len` values) filled with uniform values in ±1.
fn random<B: Backend>(b: &B, mut t: B::Tensor, len: usize, rng: &mut Rng) -> B::Tensor {
    b.upload(all_mut(&mut t, len), &(0..len).map(|_| rng.symmetric(1.0)).collect::<Vec<_>>());
    t
}

fn bench<B: Backend>(b: &B, n: usize, reps: usize, widths: [usize; 3]) {
    println!("backend {} on {}; {} storage; batch {n}; widths {widths:?}; {reps} reps", b.name(), b.device_name(), b.precision().name());
    println!("{:<28} {:>10} {:>10}", "op", "ms", "GFLOP/s");
    let mut rng = Rng::new(0);
    let row = |name: &str, secs: f64, flops: f64| {
        if secs.is_nan() {
            return;
        }
        let gflops = if flops > 0.0 { format!("{:.1}", flops / secs / 1e9) } else { String::new() };
        println!("{name:<28} {:>10.2} {gflops:>10}", secs * 1e3);
    };
    let mut total = 0.0;
    for l in layers(widths) {
        let s: ConvShape = l.conv_shape(n);
        let flops = 2.0 * s.macs() as f64;
        let (x_len, y_len) = (n * s.h * s.w * s.c_in, n * s.out_h() * s.out_w() * s.c_out);
        let x = random(b, b.activations(x_len), x_len, &mut rng);
        let w = random(b, b.zeros(w_len(&s)), w_len(&s), &mut rng);
        let mut y = random(b, b.activations(y_len), y_len, &mut rng);
        let mut dx = b.activations(x_len);
        let mut dw = b.zeros(w_len(&s));
        let name = format!("block{}.conv{} {}→{} {}²", l.block, l.conv, s.c_in, s.c_out, s.h);
        let [fwd, infer, dgrad, wgrad] = ["fwd", "infer", "dgrad", "wgrad"].map(|pass| format!("{name} {pass}"));
        let f = time(b, &fwd, reps, || b.conv_forward(s, &x, all(&w, w_len(&s)), &mut y));
        let fi = time(b, &infer, reps, || b.conv_forward_inference(s, &x, all(&w, w_len(&s)), &mut y));
        let d = time(b, &dgrad, reps, || b.conv_backward_data(s, &y, all(&w, w_len(&s)), &mut dx));
        let g = time(b, &wgrad, reps, || b.conv_backward_filter(s, &x, &y, all_mut(&mut dw, w_len(&s))));
        row(&fwd, f, flops);
        row(&infer, fi, flops);
        row(&dgrad, d, flops);
        row(&wgrad, g, flops);
        let bs = l.bn_shape(n, Act::Gelu);
        let out = n * l.out_side().pow(2) * l.c_out;
        let (beta, mut running) = (random(b, b.zeros(l.c_out), l.c_out, &mut rng), random(b, b.zeros(2 * l.c_out), 2 * l.c_out, &mut rng));
        let (mut z, mut a, mut saved) = (b.activations(out), b.activations(out), b.zeros(2 * l.c_out));
        let (mut da, mut dbeta, mut dy) = (random(b, b.activations(out), out, &mut rng), b.zeros(l.c_out), b.activations(y_len));
        let mode = BnMode::Train { momentum: 0.6, eps: 1e-12 };
        let norm = format!("block{}.norm{} pool{}", l.block, l.conv, l.pool);
        let (norm_fwd, norm_bwd) = (format!("{norm} fwd"), format!("{norm} bwd"));
        let bf = time(b, &norm_fwd, reps, || {
            b.pool_bn_act_forward(bs, mode, &y, all(&beta, l.c_out), all_mut(&mut running, 2 * l.c_out), &mut z, &mut a, &mut saved)
        });
        let bb = time(b, &norm_bwd, reps, || {
            b.pool_bn_act_backward(bs, &y, &z, &saved, all(&beta, l.c_out), &mut da, &mut dy, all_mut(&mut dbeta, l.c_out))
        });
        row(&norm_fwd, bf, 0.0);
        row(&norm_bwd, bb, 0.0);
        total += f + d + g + bf + bb;
    }
    row("sum of the training ops", total, 0.0);
    newton_schulz(b, reps, widths, row);
    step(b, n, reps, widths);
}

fn w_len(s: &ConvShape) -> usize {
    s.c_out * s.k * s.k * s.c_in
}

/// Muon's Newton–Schulz iteration (3 steps, hiverge's coefficients) on the largest filter.
fn newton_schulz<B: Backend>(b: &B, reps: usize, widths: [usize; 3], row: impl Fn(&str, f64, f64)) {
    let (rows, cols) = layers(widths).iter().map(|l| l.filter_matrix()).max_by_key(|&(r, c)| r * c).unwrap();
    let mut ns = speedrun::train::NewtonSchulz::new(b, rows, rows * cols);
    let muon = speedrun::train::Recipe::Hiverge.config().muon.unwrap();
    let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
    let name = format!("newton_schulz {rows}×{cols} ×{}", muon.iterations);
    let secs = time(b, &name, reps, || {
        b.upload(all_mut(&mut ns.x, rows * cols), &x);
        ns.run(b, (rows, cols), muon.coefficients, muon.iterations, muon.eps as f32);
    });
    let flops = muon.iterations as f64 * 2.0 * (2.0 * (rows * rows * cols) as f64 + (rows * rows * rows) as f64);
    row(&name, secs, flops);
}

/// A whole forward + backward + SGD step on random data, as the trainer runs it.
fn step<B: Backend>(b: &B, n: usize, reps: usize, widths: [usize; 3]) {
    const NAME: &str = "whole training step";
    if !wanted(NAME) {
        return;
    }
    let mut net = Net::new(b, Arch { widths, act: Act::Gelu, logit_scale: 1.0 / 9.0 }, n).expect("buffers fit");
    let layout = Layout::new(widths);
    let (params, running) = layout.init(&mut Rng::new(1), false, false);
    net.set_state(b, &params, &running);
    let mut rng = Rng::new(2);
    let x: Vec<f32> = (0..n * 3072).map(|_| rng.symmetric(1.0)).collect();
    b.upload(all_mut(&mut net.x, n * 3072), &x);
    let mut stats = b.zeros(2);
    let mut momentum = b.zeros(layout.trainable);
    let secs = time(b, NAME, reps, || {
        net.forward(b, n, BnMode::Train { momentum: 0.6, eps: 1e-12 });
        b.cross_entropy(n, 0.2, &net.logits, &net.labels, Some(&mut net.dlogits), &mut stats);
        net.backward(b, n, false);
        let range = 0..layout.trainable;
        let (p, g) = (ViewMut { buf: &mut net.params, range: range.clone() }, View { buf: &net.grads, range: range.clone() });
        b.sgd_step(p, g, ViewMut { buf: &mut momentum, range }, 1e-4, 0.0, 0.85);
    });
    println!("{NAME}: {:.1} ms, {:.0} images/s", secs * 1e3, n as f64 / secs);
}

fn main() {
    let (n, reps) = (arg("--batch", 64), arg("--reps", 3));
    let widths = [arg("--w1", 64), arg("--w2", 256), arg("--w3", 256)];
    let which = arg_str("--backend", "all");
    let precision = arg_str("--precision", "");
    let precisions = |default: &'static [Precision]| -> &'static [Precision] {
        match precision.as_str() {
            "" => default,
            "f32" => &[Precision::F32],
            "half" => &[Precision::Half],
            "both" => &[Precision::F32, Precision::Half],
            other => panic!("--precision f32, half or both, not {other}"),
        }
    };
    if which == "cpu" || which == "all" {
        for &p in precisions(&[Precision::F32]) {
            bench(&Cpu::with_precision(p), n, reps, widths);
        }
    }
    #[cfg(feature = "wgpu")]
    if which == "wgpu" || which == "all" {
        use speedrun::backend::wgpu::{default_adapter, Wgpu};
        let variants: &[bool] = match arg_str("--conv", "both").as_str() {
            "tiled" => &[true],
            "direct" => &[false],
            _ => &[true, false],
        };
        for &p in precisions(&[Precision::F32, Precision::Half]) {
            let gpu = match block_on(default_adapter()).and_then(|a| block_on(Wgpu::with_precision(a, p))) {
                Ok(gpu) => gpu,
                Err(e) => {
                    println!("wgpu, {} storage: skipped ({e:#})", p.name());
                    continue;
                }
            };
            for &tiled in variants {
                gpu.set_tiled_convolutions(tiled);
                println!("\nwgpu convolutions: {}", if tiled { "tiled (the GPU path)" } else { "direct (the CPU-adapter path)" });
                bench(&gpu, n, reps, widths);
            }
        }
    }
}
