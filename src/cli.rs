//! The `speedrun` command line (native targets): train, bench, download, info, profile, web, eval, predict.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
#[cfg(feature = "cuda")]
use speedrun::backend::cuda::{self, Cuda};
#[cfg(feature = "wgpu")]
use speedrun::backend::wgpu::{self as webgpu, Wgpu};
use speedrun::backend::{block_on, cpu::Cpu, Backend};
use speedrun::data::{self, Split, CLASS_NAMES};
use speedrun::model::Net;
use speedrun::run::{argmax, run as train_run, EpochLog, Event, Flow, RunResult};
use speedrun::train::{Config, DeviceSplit, Evaluator, Recipe, Trainer};
use speedrun::{checkpoint, download, stats};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "speedrun",
    version,
    about = "CIFAR-10 to 94% in seconds: the airbench94 family of recipes in Rust, on CPU, WebGPU and CUDA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum BackendKind {
    Cpu,
    Wgpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Train a recipe's network (downloads CIFAR-10 first if it is missing).
    Train(TrainArgs),
    /// Time `--runs` training runs by the recipe's protocol: one untimed warm-up run first
    /// (kernel loading, cuDNN plans, caches), then each run on the clock; mean ± std at the end.
    Bench(TrainArgs),
    /// Download CIFAR-10 (binary version) into the data folder.
    Download {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Test accuracy of a checkpoint.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Test-time augmentation: 0 none, 1 mirror, 2 mirror and translate.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
        tta: u8,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        test_limit: Option<usize>,
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
    },
    /// List the devices each backend can use.
    Info,
    /// List the recipes `--recipe` takes.
    Recipes,
    /// GPU time per kernel of a few training steps, from timestamp queries (wgpu backend).
    Profile(ProfileArgs),
    /// Serve the browser demo (built by web/build.sh) and CIFAR-10 on 127.0.0.1.
    Web {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The page's folder (default: web/ of these sources).
        #[arg(long)]
        site: Option<PathBuf>,
    },
    /// Classify image files (any size; resized to 32×32) with a checkpoint.
    Predict {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
    },
}

/// The recipe and the flags that override its values.
#[derive(clap::Args)]
struct RecipeArgs {
    /// The recipe (`speedrun recipes` lists them); the flags below override its values.
    #[arg(long, value_parser = Recipe::from_name, default_value = "airbench94")]
    recipe: Recipe,
    /// Training epochs (default: the recipe's; airbench94 9.9).
    #[arg(long)]
    epochs: Option<f64>,
    /// Images per training step (default: the recipe's; airbench94 1024).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate: airbench94's SGD lr per 1024 examples (11.5), or Muon's lr in the Muon recipes.
    #[arg(long)]
    lr: Option<f64>,
    /// Block widths (default 64,256,256).
    #[arg(long, value_parser = parse_widths)]
    widths: Option<[usize; 3]>,
}

impl RecipeArgs {
    /// The recipe's `Config` with the explicit flags applied.
    fn config(&self) -> Result<Config> {
        let mut cfg = self.recipe.config();
        cfg.epochs = self.epochs.unwrap_or(cfg.epochs);
        cfg.batch_size = self.batch_size.unwrap_or(cfg.batch_size);
        cfg.lr = self.lr.unwrap_or(cfg.lr);
        cfg.widths = self.widths.unwrap_or(cfg.widths);
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Backend to run on; default: the fastest available.
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// Folder with CIFAR-10 (default: $SPEEDRUN_DATA, else ~/.cache/speedrun/cifar10).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    recipe: RecipeArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Independent runs (seeds seed, seed+1, ...), summarised at the end.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Train on the first N training images only.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Append one JSON object per run to this file (JSON Lines).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Save the last run's weights as a safetensors checkpoint.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Accuracy target for the t-test over runs.
    #[arg(long, default_value_t = 0.94)]
    target: f64,
}

#[derive(clap::Args)]
struct ProfileArgs {
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    recipe: RecipeArgs,
    #[arg(long)]
    train_limit: Option<usize>,
    /// Profile steps of this epoch (1-based): epochs 1-3 also train the whitening bias.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    epoch: u32,
    /// Steps to profile, after one untimed warm-up step.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
}

fn parse_widths(s: &str) -> Result<[usize; 3], String> {
    let w: Vec<usize> = s.split(',').map(|p| p.trim().parse::<usize>().map_err(|e| format!("{p:?}: {e}"))).collect::<Result<_, _>>()?;
    match w[..] {
        [a, b, c] if a > 0 && b > 0 && c > 0 => Ok([a, b, c]),
        _ => Err("expected three positive widths, e.g. 64,256,256".into()),
    }
}

/// A backend picked at run time; `with_backend!` runs generic code on whichever it is.
enum Chosen {
    Cpu(Cpu),
    #[cfg(feature = "wgpu")]
    Wgpu(Box<Wgpu>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Cuda>),
}

macro_rules! with_backend {
    ($chosen:expr, |$b:ident| $body:expr) => {
        match $chosen {
            Chosen::Cpu($b) => {
                let $b = &$b;
                $body
            }
            #[cfg(feature = "wgpu")]
            Chosen::Wgpu($b) => {
                let $b = &*$b;
                $body
            }
            #[cfg(feature = "cuda")]
            Chosen::Cuda($b) => {
                let $b = &*$b;
                $body
            }
        }
    };
}

/// The backends this build has.
fn built_backends() -> String {
    let built = [("cpu", true), ("wgpu", cfg!(feature = "wgpu")), ("cuda", cfg!(feature = "cuda"))];
    built.iter().filter(|b| b.1).map(|b| b.0).collect::<Vec<_>>().join(", ")
}

/// The backend asked for, or the fastest one available: CUDA where this build has it and a
/// driver is present, then wgpu on a real GPU, else the CPU (a CPU-emulated adapter such as
/// lavapipe is far slower than the CPU backend).
fn pick_backend(kind: Option<BackendKind>) -> Result<Chosen> {
    #[cfg(feature = "cuda")]
    match kind {
        Some(BackendKind::Cuda) => return Ok(Chosen::Cuda(Box::new(start_cuda()?))),
        None if cuda::check_libraries().is_ok() => match start_cuda() {
            Ok(c) => return Ok(Chosen::Cuda(Box::new(c))),
            Err(e) => eprintln!("note: not using CUDA ({e:#}); trying the other backends"),
        },
        _ => {}
    }
    match kind {
        Some(BackendKind::Cpu) => Ok(Chosen::Cpu(Cpu::new())),
        #[cfg(feature = "wgpu")]
        Some(BackendKind::Wgpu) => Ok(Chosen::Wgpu(Box::new(block_on(Wgpu::new())?))),
        #[cfg(feature = "wgpu")]
        None => match block_on(webgpu::default_adapter()) {
            Ok(adapter) if adapter.get_info().device_type != ::wgpu::DeviceType::Cpu => {
                Ok(Chosen::Wgpu(Box::new(block_on(Wgpu::on(adapter))?)))
            }
            _ => Ok(Chosen::Cpu(Cpu::new())),
        },
        #[cfg(not(feature = "wgpu"))]
        None => Ok(Chosen::Cpu(Cpu::new())),
        Some(other) => {
            let name = format!("{other:?}").to_lowercase();
            bail!("backend `{name}` is not in this build (rebuild with `--features {name}`); this build has: {}", built_backends())
        }
    }
}

#[cfg(feature = "cuda")]
fn start_cuda() -> Result<Cuda> {
    let c = Cuda::new()?;
    println!("cuda: {}; {}", c.device_name(), c.versions());
    Ok(c)
}

fn info() {
    let cpu = Cpu::new();
    println!("cpu: {}", cpu.device_name());
    #[cfg(feature = "wgpu")]
    {
        let adapters = block_on(webgpu::all_adapters());
        if adapters.is_empty() {
            println!("wgpu: no adapter (install a Vulkan, Metal or DX12 driver; on Linux without a GPU: mesa-vulkan-drivers)");
        }
        for a in adapters {
            let (i, f, l) = (a.get_info(), a.features(), a.limits());
            println!("wgpu: {} ({:?}, {:?}, driver {} {})", i.name, i.backend, i.device_type, i.driver, i.driver_info);
            println!(
                "      shader-f16 {}, subgroups {} (size {}..{}), timestamps {}",
                f.contains(::wgpu::Features::SHADER_F16),
                f.contains(::wgpu::Features::SUBGROUP),
                i.subgroup_min_size,
                i.subgroup_max_size,
                f.contains(::wgpu::Features::TIMESTAMP_QUERY)
            );
            println!(
                "      max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB, {} invocations/workgroup, {} storage buffers/stage",
                l.max_storage_buffer_binding_size >> 20,
                l.max_buffer_size >> 20,
                l.max_compute_workgroup_storage_size >> 10,
                l.max_compute_invocations_per_workgroup,
                l.max_storage_buffers_per_shader_stage
            );
        }
    }
    #[cfg(not(feature = "wgpu"))]
    println!("wgpu: not built (build with the `wgpu` feature)");
    #[cfg(feature = "cuda")]
    match start_cuda() {
        Ok(_) => cuda::loaded_libraries().iter().for_each(|lib| println!("      loaded {lib}")),
        Err(e) => println!("cuda: unavailable: {e:#}"),
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not built (build with `--features cuda`)");
}

pub fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => with_backend!(pick_backend(args.backend)?, |b| train_command(b, &args, false)),
        Command::Bench(args) => with_backend!(pick_backend(args.backend)?, |b| train_command(b, &args, true)),
        Command::Info => {
            info();
            Ok(())
        }
        Command::Recipes => {
            for r in Recipe::ALL {
                let (cfg, default) = (r.config(), if r == Recipe::Airbench94 { " (default)" } else { "" });
                println!("{:<16} {}{default}", r.name(), r.summary());
                println!("{:<16} {} steps of {} images per run on the 50,000 training images", "", cfg.total_steps(50_000), cfg.batch_size);
            }
            Ok(())
        }
        Command::Profile(args) => profile_command(&args),
        Command::Web { port, data_dir, site } => {
            let data = data::batches_dir(&data::resolve_dir(data_dir.as_deref()));
            let site = site.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("web"));
            crate::serve::serve(&site, data, port)
        }
        Command::Download { data_dir } => {
            let dir = data::resolve_dir(data_dir.as_deref());
            if download::ensure(&dir, &download::official(), true)? {
                println!("CIFAR-10 is ready in {}", dir.display());
            } else {
                println!("CIFAR-10 is already present and complete in {}; nothing to do", dir.display());
            }
            Ok(())
        }
        Command::Eval { checkpoint, tta, data_dir, test_limit, backend } => {
            let test = data::load_test(&data::resolve_dir(data_dir.as_deref()), test_limit)?;
            if test.is_empty() {
                bail!("--test-limit must be at least 1");
            }
            let logits = with_backend!(pick_backend(backend)?, |b| predict_logits(b, &checkpoint, &test, tta as usize))?;
            let correct = logits.chunks_exact(10).zip(&test.labels).filter(|(l, &y)| argmax(l) == y as usize).count();
            println!("test accuracy (TTA level {tta}): {:.2}% of {} images", 100.0 * correct as f64 / test.len() as f64, test.len());
            Ok(())
        }
        Command::Predict { checkpoint, images, backend } => {
            let split = read_images(&images)?;
            let logits = with_backend!(pick_backend(backend)?, |b| predict_logits(b, &checkpoint, &split, 2))?;
            for (path, l) in images.iter().zip(logits.chunks_exact(10)) {
                let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                let mut ranked: Vec<usize> = (0..10).collect();
                ranked.sort_by(|&i, &j| e[j].total_cmp(&e[i]));
                let top: Vec<String> = ranked[..3].iter().map(|&i| format!("{} {:.1}%", CLASS_NAMES[i], 100.0 * e[i] / sum)).collect();
                println!("{}: {}", path.display(), top.join(", "));
            }
            Ok(())
        }
    }
}

/// Logits of every image of `split` under TTA `level`, from a checkpoint.
fn predict_logits<B: Backend>(b: &B, path: &Path, split: &Split, level: usize) -> Result<Vec<f32>> {
    let ckpt = checkpoint::load(path)?;
    let mut net = Net::new(b, ckpt.arch, split.len().min(1024))?;
    net.set_state(b, &ckpt.params, &ckpt.running);
    let data = DeviceSplit::new(b, split);
    let mut eval = Evaluator::new(b, split.len(), net.capacity, level);
    Ok(block_on(eval.logits(b, &mut net, &data, Config::default().bn_eps)))
}

fn read_images(paths: &[PathBuf]) -> Result<Split> {
    let mut split = Split { pixels: Vec::new(), labels: Vec::new() };
    for p in paths {
        let img = image::open(p).with_context(|| format!("cannot read image {}", p.display()))?.to_rgb8();
        let small = image::imageops::resize(&img, 32, 32, image::imageops::FilterType::Triangle);
        split.pixels.extend_from_slice(small.as_raw());
        split.labels.push(0);
    }
    Ok(split)
}

const HEADER: &str = " run  epoch  train_loss  train_acc  val_acc  tta_acc   time_s";

fn format_row(run: u32, e: &EpochLog) -> String {
    let tta = e.tta_acc.map_or(String::new(), |t| format!("{:.4}", t));
    format!("{run:>4}  {:>5}  {:>10.4}  {:>9.4}  {:>7.4}  {tta:>7}  {:>7.2}", e.epoch, e.train_loss, e.train_acc, e.val_acc, e.seconds)
}

fn train_command<B: Backend>(b: &B, args: &TrainArgs, warm_up: bool) -> Result<()> {
    let cfg = Config { seed: args.seed, ..args.recipe.config()? };
    if let Some(path) = &args.save {
        check_writable(path)?; // before a run that may take an hour, not after it
    }
    let dir = data_dir_downloading(args.data_dir.as_deref())?;
    let train_split = data::load_train(&dir, args.train_limit)?;
    let test_split = data::load_test(&dir, args.test_limit)?;
    if train_split.is_empty() || test_split.is_empty() {
        bail!("--train-limit and --test-limit must be at least 1");
    }
    let mut json = match &args.json {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {} for appending", p.display()))?,
        ),
        None => None,
    };
    let train_data = DeviceSplit::new(b, &train_split);
    let test_data = DeviceSplit::new(b, &test_split);
    let mut trainer = Trainer::new(b, cfg.clone(), &train_data)?;
    let mut plain = Evaluator::new(b, test_data.len(), cfg.batch_size, 0);
    let mut tta = Evaluator::new(b, test_data.len(), cfg.batch_size, cfg.tta_level);
    let device = b.device_name();
    println!(
        "speedrun: recipe {} on backend {} ({device}); {} train / {} test images; widths {:?}; batch {}; {} steps",
        cfg.recipe.name(),
        b.name(),
        train_data.len(),
        test_data.len(),
        cfg.widths,
        cfg.batch_size,
        trainer.total_steps
    );
    if warm_up {
        let started = std::time::Instant::now();
        trainer.reset(args.seed);
        block_on(train_run(&mut trainer, &test_data, &mut plain, &mut tta, &mut |_| Flow::Continue))?;
        println!("warm-up run (not counted): {:.2} s", started.elapsed().as_secs_f64());
    }
    println!("{HEADER}");
    let live = std::io::stderr().is_terminal();
    let mut last_print = std::time::Instant::now();
    let mut results: Vec<RunResult> = Vec::new();
    for run in 1..=args.runs {
        let seed = args.seed + run as u64 - 1;
        trainer.reset(seed);
        let mut on = |event: Event| {
            match event {
                Event::Step { epoch, step, steps } if live && last_print.elapsed().as_secs_f64() > 0.25 => {
                    last_print = std::time::Instant::now();
                    eprint!("\r{run:>4}  {epoch:>5}  step {step}/{steps}   ");
                }
                Event::Epoch { log, .. } => {
                    if live {
                        eprint!("\r{:60}\r", "");
                    }
                    println!("{}", format_row(run, log));
                }
                _ => {}
            }
            Flow::Continue
        };
        let r = block_on(train_run(&mut trainer, &test_data, &mut plain, &mut tta, &mut on))?;
        let images_per_second = (r.steps * cfg.batch_size) as f64 / r.train_seconds;
        println!(
            "run {run}: TTA accuracy {:.4} in {:.2} s (whitening {:.2} s, training {:.2} s, TTA {:.2} s); {:.0} train images/s",
            r.tta_accuracy, r.time_seconds, r.whiten_seconds, r.train_seconds, r.tta_seconds, images_per_second
        );
        if let Some(f) = json.as_mut() {
            let line = serde_json::json!({
                "recipe": cfg.recipe.name(), "backend": b.name(), "device": device, "run": run, "seed": seed, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "widths": cfg.widths, "train_images": r.train_images,
                "test_images": r.test_images, "accuracy": r.accuracy, "tta_accuracy": r.tta_accuracy,
                "time_seconds": r.time_seconds, "whiten_seconds": r.whiten_seconds, "train_seconds": r.train_seconds,
                "tta_seconds": r.tta_seconds, "steps": r.steps, "train_images_per_second": images_per_second,
            });
            writeln!(f, "{line}").context("cannot append to the --json file")?;
        }
        results.push(r);
    }
    if let Some(path) = &args.save {
        let (params, running) = block_on(trainer.net.state(b));
        let tta_acc = results.last().map_or(0.0, |r| r.tta_accuracy);
        let meta =
            [("tta_accuracy", format!("{tta_acc:.4}")), ("seed", trainer.cfg.seed.to_string()), ("recipe", cfg.recipe.name().to_string())];
        checkpoint::save(path, &trainer.net.arch, &params, &running, &meta)?;
        println!("saved checkpoint {}", path.display());
    }
    if results.len() > 1 {
        print_summary(&results, args.target);
    }
    Ok(())
}

/// The data folder, with CIFAR-10 downloaded into it first if it is missing.
fn data_dir_downloading(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = data::resolve_dir(dir);
    if data::batches_dir(&dir).is_none() {
        download::ensure(&dir, &download::official(), true)?;
    }
    Ok(dir)
}

#[cfg(not(feature = "wgpu"))]
fn profile_command(_: &ProfileArgs) -> Result<()> {
    bail!("profiling needs the wgpu backend; this build has only: {}", built_backends())
}

/// Profiles `--steps` training steps of epoch `--epoch` on the default wgpu adapter and
/// prints GPU time per kernel, longest first.
#[cfg(feature = "wgpu")]
fn profile_command(args: &ProfileArgs) -> Result<()> {
    let b = block_on(Wgpu::new())?;
    let cfg = args.recipe.config()?;
    let split = data::load_train(&data_dir_downloading(args.data_dir.as_deref())?, args.train_limit)?;
    let train = DeviceSplit::new(&b, &split);
    let mut t = Trainer::new(&b, cfg, &train)?;
    let (steps_per_epoch, epoch, steps) = (t.cfg.steps_per_epoch(train.len()), args.epoch as usize, args.steps as usize);
    if epoch * steps_per_epoch > t.total_steps || steps + 1 > steps_per_epoch {
        bail!("a run has {} epochs of {steps_per_epoch} steps: pick --epoch and --steps inside them", t.total_steps / steps_per_epoch);
    }
    t.reset(0);
    block_on(t.init_whitening());
    t.start_epoch(epoch - 1);
    t.step = (epoch - 1) * steps_per_epoch;
    t.train_step(0); // pipelines, bind groups and scratch buffers appear in the first step
    block_on(b.sync());
    b.start_profile()?;
    let wall = std::time::Instant::now();
    (1..=steps).for_each(|batch| t.train_step(batch));
    block_on(b.sync());
    let wall_ms = wall.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let kernels = block_on(b.finish_profile());
    let gpu_ms: f64 = kernels.iter().map(|k| k.seconds).sum::<f64>() * 1e3 / steps as f64;
    println!(
        "profile: recipe {} on {} ({}); batch {}; widths {:?}; epoch {epoch}; {steps} steps",
        t.cfg.recipe.name(),
        b.name(),
        b.device_name(),
        t.cfg.batch_size,
        t.cfg.widths
    );
    println!("{:<44} {:>6} {:>9} {:>6} {:>9}", "kernel", "calls", "ms/step", "share", "GFLOP/s");
    for k in &kernels {
        let ms = k.seconds * 1e3 / steps as f64;
        let gflops = if k.flops > 0.0 { format!("{:.1}", k.flops / k.seconds / 1e9) } else { String::new() };
        println!("{:<44} {:>6} {ms:>9.3} {:>5.1}% {gflops:>9}", k.name, k.calls / steps, 100.0 * ms / gpu_ms);
    }
    println!("GPU time {gpu_ms:.2} ms/step (sum of kernels); wall time {wall_ms:.2} ms/step (timestamps on)");
    Ok(())
}

/// Fails unless a file can be created beside `path` (its folder exists and is writable).
fn check_writable(path: &Path) -> Result<()> {
    let probe = path.with_extension("safetensors.tmp");
    std::fs::File::create(&probe)
        .with_context(|| format!("cannot write checkpoint {} (does its folder exist, is it writable?)", path.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

fn print_summary(results: &[RunResult], target: f64) {
    let acc: Vec<f64> = results.iter().map(|r| r.tta_accuracy).collect();
    let time: Vec<f64> = results.iter().map(|r| r.time_seconds).collect();
    let (a, t) = (stats::summarize(&acc), stats::summarize(&time));
    println!("{} runs: TTA accuracy mean {:.4} ± {:.4} (min {:.4}, max {:.4})", a.n, a.mean, a.std, a.min, a.max);
    println!("time per run mean {:.2} ± {:.2} s (min {:.2}, max {:.2})", t.mean, t.std, t.min, t.max);
    if let Some(p) = stats::p_value_mean_below(&acc, target) {
        println!("one-sided t-test, true mean below {target}: p = {p:.3e}");
    }
}
