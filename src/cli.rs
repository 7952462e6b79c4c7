//! The `speedrun` command line (native targets): train, bench, download, info, profile, web, eval, predict.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
#[cfg(feature = "cuda")]
use speedrun::backend::cuda::{self, Cuda};
#[cfg(feature = "wgpu")]
use speedrun::backend::wgpu::{self as webgpu, Wgpu};
use speedrun::backend::{block_on, cpu::Cpu, Backend, Precision};
use speedrun::data::{self, Split, CLASS_NAMES};
use speedrun::model::Net;
use speedrun::run::{argmax, run as train_run, EpochLog, Event, Flow, RunResult};
use speedrun::train::{Config, DeviceSplit, Evaluator, Recipe, Trainer};
use speedrun::{checkpoint, download, memory, stats};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `println!` that never panics: see `out_line`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out_line(format_args!($($arg)*))
    };
}
pub(crate) use out;

/// `eprintln!` that never panics: a closed stderr (`speedrun train 2>&1 | head -1`) must not
/// end a run that is still training.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use err;

/// The first failed write to stdout (a closed pipe, as in `speedrun train | head -1`, or a full
/// disk); once set, stdout output is dropped. `main` reports it after the command has done its
/// work, so a training run whose reader went away still finishes and saves what it was asked to.
static STDOUT_FAILED: Mutex<Option<std::io::Error>> = Mutex::new(None);

/// When `main` started: the cold start (launch to the first step, kernels and caches
/// included) is measured from here.
static LAUNCHED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Writes one line to stdout, or, when stdout has failed, nothing.
pub(crate) fn out_line(args: std::fmt::Arguments) {
    let mut failed = STDOUT_FAILED.lock().unwrap_or_else(|e| e.into_inner());
    if failed.is_none() {
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush()) {
            *failed = Some(e);
        }
    }
}

/// The stdout failure, if any, as a message; None also for a closed pipe (`speedrun info |
/// head -1`), which is the reader's choice, not a failure.
fn stdout_failure() -> Option<String> {
    let failed = STDOUT_FAILED.lock().unwrap_or_else(|e| e.into_inner());
    failed.as_ref().filter(|e| e.kind() != std::io::ErrorKind::BrokenPipe).map(|e| format!("cannot write to standard output ({e})"))
}

#[derive(Parser)]
#[command(
    name = "speedrun",
    version,
    about = "CIFAR-10 to 94% in seconds: the airbench94 family of recipes in Rust, on CPU, WebGPU and CUDA",
    after_help = ENVIRONMENT
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The environment variables, for `--help`.
const ENVIRONMENT: &str = "Environment:
  SPEEDRUN_DATA               the data folder when --data-dir is not given (default: the per-user cache, ~/.cache/speedrun/cifar10 on Linux)
  SPEEDRUN_CIFAR_URL          a mirror of cifar-10-binary.tar.gz to download from (the MD5 is checked all the same)
  SPEEDRUN_PROGRESS_SECONDS   seconds between plain progress lines when stderr is not a terminal (default 30; 0: none)
  LD_LIBRARY_PATH             where the CUDA backend finds NVRTC, cuBLAS and cuDNN (see the README's \"CUDA\")
  SPEEDRUN_CACHE              the CUDA backend's start-up cache of compiled kernels and cuDNN choices (default: ~/.cache/speedrun/cuda on Linux; off: none)
  SPEEDRUN_CUDA_LOG=1         print the cuDNN algorithm chosen for each convolution
  SPEEDRUN_CUDA_GRAPHS=0      run CUDA training steps without CUDA graphs";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum BackendKind {
    Cpu,
    Wgpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Train a recipe's network (downloads CIFAR-10 first if it is missing).
    #[command(after_help = ENVIRONMENT)]
    Train(TrainArgs),
    /// Time `--runs` training runs by the recipe's protocol: one untimed warm-up run first
    /// (kernel loading, cuDNN plans, caches), then each run on the clock; mean ± std at the end.
    #[command(after_help = ENVIRONMENT)]
    Bench(TrainArgs),
    /// Download CIFAR-10 (binary version) into the data folder, or check and repair the copy there.
    #[command(after_help = ENVIRONMENT)]
    Download {
        /// Folder for CIFAR-10 (default: $SPEEDRUN_DATA, else ~/.cache/speedrun/cifar10).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Test accuracy of a checkpoint (without TTA, or with TTA level 1 or 2).
    #[command(after_help = ENVIRONMENT)]
    Eval {
        /// A safetensors checkpoint, as `train --save` or the browser page writes it.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Test-time augmentation: 0 none, 1 mirror, 2 mirror and translate.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
        tta: u8,
        /// Folder with CIFAR-10 (default: $SPEEDRUN_DATA, else ~/.cache/speedrun/cifar10).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Evaluate on the first N test images only.
        #[arg(long)]
        test_limit: Option<usize>,
        /// Backend to run on; default: the fastest available (`speedrun info` says which).
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
        /// Port on 127.0.0.1 (from another machine: `ssh -L 8080:127.0.0.1:8080 HOST`).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Folder with CIFAR-10, served to the page (default: $SPEEDRUN_DATA, else ~/.cache/speedrun/cifar10).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The page's folder (default: web/ of these sources).
        #[arg(long)]
        site: Option<PathBuf>,
    },
    /// Statistics over the JSON Lines of any number of runs and files (`train`/`bench --json`),
    /// grouped by configuration; `--compare` adds Welch's t-test between two groups.
    Stats(crate::stats_cmd::StatsArgs),
    /// Classify image files (any size; resized to 32×32) with a checkpoint.
    Predict {
        /// A safetensors checkpoint, as `train --save` or the browser page writes it.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Image files (PNG, JPEG or BMP, told by their content; any size, resized to 32×32).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Backend to run on; default: the fastest available (`speedrun info` says which).
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
    /// Storage of activations and their gradients: f32, or half (f16 storage, f32 math;
    /// on the CPU backend an emulation, for checking what half precision does to accuracy).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}

impl RecipeArgs {
    /// The recipe's `Config` with the explicit flags applied.
    fn config(&self) -> Result<Config> {
        let mut cfg = self.recipe.config();
        cfg.epochs = self.epochs.unwrap_or(cfg.epochs);
        cfg.batch_size = self.batch_size.unwrap_or(cfg.batch_size);
        cfg.lr = self.lr.unwrap_or(cfg.lr);
        cfg.widths = self.widths.unwrap_or(cfg.widths);
        cfg.precision = self.precision;
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
    /// Seed of the first run (run i uses seed + i - 1): initial weights, shuffling, augmentation.
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
    /// The GPU backend to profile: wgpu (its default adapter) or cuda.
    #[arg(long, value_enum, default_value = "wgpu")]
    backend: BackendKind,
    /// Folder with CIFAR-10 (default: $SPEEDRUN_DATA, else ~/.cache/speedrun/cifar10).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Train on the first N training images only.
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
fn pick_backend(kind: Option<BackendKind>, precision: Precision) -> Result<Chosen> {
    #[cfg(feature = "cuda")]
    match kind {
        Some(BackendKind::Cuda) => return Ok(Chosen::Cuda(Box::new(start_cuda()?))),
        None if cuda::check_libraries().is_ok() => match start_cuda() {
            Ok(c) => return Ok(Chosen::Cuda(Box::new(c))),
            Err(e) => err!("note: not using CUDA ({e:#}); trying the other backends"),
        },
        // A driver (so an NVIDIA GPU) but a library missing: say why CUDA is passed over.
        None => {
            if let Some(note) = cuda::Libraries::probe().fallback_note() {
                err!("note: {note}");
            }
        }
        _ => {}
    }
    match kind {
        Some(BackendKind::Cpu) => Ok(Chosen::Cpu(Cpu::with_precision(precision))),
        #[cfg(feature = "wgpu")]
        Some(BackendKind::Wgpu) => {
            Ok(Chosen::Wgpu(Box::new(block_on(Wgpu::with_precision(block_on(webgpu::default_adapter())?, precision))?)))
        }
        #[cfg(feature = "wgpu")]
        None => match block_on(webgpu::default_adapter()) {
            Ok(adapter) if adapter.get_info().device_type != ::wgpu::DeviceType::Cpu => {
                Ok(Chosen::Wgpu(Box::new(block_on(Wgpu::with_precision(adapter, precision))?)))
            }
            _ => Ok(Chosen::Cpu(Cpu::with_precision(precision))),
        },
        #[cfg(not(feature = "wgpu"))]
        None => Ok(Chosen::Cpu(Cpu::with_precision(precision))),
        Some(other) => {
            let name = format!("{other:?}").to_lowercase();
            bail!("backend `{name}` is not in this build (rebuild with `--features {name}`); this build has: {}", built_backends())
        }
    }
}

#[cfg(feature = "cuda")]
fn start_cuda() -> Result<Cuda> {
    let c = Cuda::new()?;
    out!("cuda: {}; {}", c.device_name(), c.versions());
    Ok(c)
}

fn info() {
    let cpu = Cpu::new();
    out!("cpu: {}", cpu.device_name());
    #[cfg(feature = "wgpu")]
    {
        let adapters = block_on(webgpu::all_adapters());
        if adapters.is_empty() {
            out!("wgpu: no adapter (install a Vulkan, Metal or DX12 driver; on Linux without a GPU: mesa-vulkan-drivers)");
        }
        for a in adapters {
            let (i, f, l) = (a.get_info(), a.features(), a.limits());
            out!("wgpu: {} ({:?}, {:?}, driver {} {})", i.name, i.backend, i.device_type, i.driver, i.driver_info);
            out!(
                "      shader-f16 {}, subgroups {} (size {}..{}), timestamps {}",
                f.contains(::wgpu::Features::SHADER_F16),
                f.contains(::wgpu::Features::SUBGROUP),
                i.subgroup_min_size,
                i.subgroup_max_size,
                f.contains(::wgpu::Features::TIMESTAMP_QUERY)
            );
            out!(
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
    out!("wgpu: not built (build with the `wgpu` feature)");
    // What `pick_backend` would choose without --backend.
    #[allow(unused_mut)]
    let mut default = "cpu (no GPU adapter; a CPU-emulated one such as lavapipe is slower than the CPU backend)";
    #[cfg(feature = "wgpu")]
    if block_on(webgpu::default_adapter()).is_ok_and(|a| a.get_info().device_type != ::wgpu::DeviceType::Cpu) {
        default = "wgpu";
    }
    #[cfg(feature = "cuda")]
    match start_cuda() {
        Ok(_) => {
            cuda::loaded_libraries().iter().for_each(|lib| out!("      loaded {lib}"));
            default = "cuda";
        }
        Err(e) => out!("cuda: unavailable: {e:#}"),
    }
    #[cfg(feature = "cuda")]
    {
        let cache = cuda::cache::DiskCache::open();
        match cache.dir() {
            Some(dir) => {
                let (entries, bytes) = cache.usage();
                out!("      start-up cache (PTX, cuDNN choices): {} ({entries} entries, {} KiB)", dir.display(), bytes.div_ceil(1024))
            }
            None => out!("      start-up cache: off (SPEEDRUN_CACHE=off, or no per-user cache folder)"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    out!("cuda: not built (build with `--features cuda`)");
    out!("default backend (train, bench, eval, predict without --backend): {default}");
}

pub fn main() {
    LAUNCHED.get_or_init(std::time::Instant::now);
    quiet_headless_vulkan();
    let result = run(Cli::parse()).and_then(|()| match stdout_failure() {
        Some(failure) => bail!("{failure}; the output after that was dropped"),
        None => Ok(()),
    });
    if let Err(e) = result {
        err!("error: {e:#}");
        std::process::exit(1);
    }
}

/// On a machine without a Wayland session, Mesa's Vulkan device-selection layer (loaded with
/// every Mesa driver, lavapipe included) probes for a Wayland display whenever wgpu lists the
/// Vulkan adapters, and libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment." for each probe. Without XDG_RUNTIME_DIR (and an absolute WAYLAND_DISPLAY) no
/// Wayland display can be reached anyway, so pointing it at a folder that does not exist makes
/// the probe fail quietly; nothing else changes. Called first thing in `main`, while this is
/// the only thread.
fn quiet_headless_vulkan() {
    #[cfg(all(feature = "wgpu", unix, not(target_vendor = "apple")))]
    {
        let runtime_dir_ok = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_absolute());
        let absolute_display = std::env::var_os("WAYLAND_DISPLAY").is_some_and(|d| Path::new(&d).is_absolute());
        if !runtime_dir_ok && !absolute_display {
            std::env::set_var("XDG_RUNTIME_DIR", "/nonexistent/speedrun-no-runtime-dir");
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => with_backend!(pick_backend(args.backend, args.recipe.precision)?, |b| train_command(b, &args, false)),
        Command::Bench(args) => with_backend!(pick_backend(args.backend, args.recipe.precision)?, |b| train_command(b, &args, true)),
        Command::Info => {
            info();
            Ok(())
        }
        Command::Recipes => {
            for r in Recipe::ALL {
                let (cfg, default) = (r.config(), if r == Recipe::Airbench94 { " (default)" } else { "" });
                out!("{:<16} {}{default}", r.name(), r.summary());
                out!("{:<16} {} steps of {} images per run on the 50,000 training images", "", cfg.total_steps(50_000), cfg.batch_size);
            }
            Ok(())
        }
        Command::Profile(args) => profile_command(&args),
        Command::Stats(args) => crate::stats_cmd::stats_command(&args),
        Command::Web { port, data_dir, site } => {
            let data = data::batches_dir(&data::resolve_dir(data_dir.as_deref()));
            let site = site.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("web"));
            crate::serve::serve(&site, data, port)
        }
        Command::Download { data_dir } => {
            let dir = data::resolve_dir(data_dir.as_deref());
            match download::check_and_repair(&dir, &download::official(), true)? {
                download::Outcome::Present => {
                    out!("CIFAR-10 is already present in {} and its contents check out; nothing to do", dir.display())
                }
                download::Outcome::Downloaded => out!("CIFAR-10 is ready in {}", dir.display()),
                download::Outcome::Repaired { problem, stale } => {
                    out!("CIFAR-10 in {} was damaged ({problem}); a fresh copy replaced it", dir.display());
                    if let Some(stale) = stale {
                        out!(
                            "the damaged files in {} are no longer read (the fresh copy in its {} is): delete them",
                            stale.display(),
                            data::ARCHIVE_FOLDER
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Eval { checkpoint, tta, data_dir, test_limit, backend } => {
            let test = data::load_test(&data::resolve_dir(data_dir.as_deref()), test_limit)?;
            if test.is_empty() {
                bail!("--test-limit must be at least 1");
            }
            let logits = with_backend!(pick_backend(backend, Precision::F32)?, |b| predict_logits(b, &checkpoint, &test, tta as usize))?;
            let correct = logits.chunks_exact(10).zip(&test.labels).filter(|(l, &y)| argmax(l) == y as usize).count();
            out!("test accuracy (TTA level {tta}): {:.2}% of {} images", 100.0 * correct as f64 / test.len() as f64, test.len());
            Ok(())
        }
        Command::Predict { checkpoint, images, backend } => {
            let (read, unreadable) = read_images(&images);
            if read.is_empty() {
                bail!("{}", unreadable.join("; "));
            }
            let split = Split { pixels: read.iter().flat_map(|(_, pixels)| pixels.iter().copied()).collect(), labels: vec![0; read.len()] };
            let logits = with_backend!(pick_backend(backend, Precision::F32)?, |b| predict_logits(b, &checkpoint, &split, 2))?;
            for ((path, _), l) in read.iter().zip(logits.chunks_exact(10)) {
                let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                let mut ranked: Vec<usize> = (0..10).collect();
                ranked.sort_by(|&i, &j| e[j].total_cmp(&e[i]));
                let top: Vec<String> = ranked[..3].iter().map(|&i| format!("{} {:.1}%", CLASS_NAMES[i], 100.0 * e[i] / sum)).collect();
                out!("{}: {}", path.display(), top.join(", "));
            }
            if !unreadable.is_empty() {
                bail!("{} of {} images could not be read: {}", unreadable.len(), images.len(), unreadable.join("; "));
            }
            Ok(())
        }
    }
}

/// Logits of every image of `split` under TTA `level`, from a checkpoint.
fn predict_logits<B: Backend>(b: &B, path: &Path, split: &Split, level: usize) -> Result<Vec<f32>> {
    err!("backend {} ({})", b.name(), b.device_name());
    let ckpt = checkpoint::load(path)?;
    let mut net = Net::new(b, ckpt.arch, split.len().min(1024))?;
    net.set_state(b, &ckpt.params, &ckpt.running);
    let data = DeviceSplit::new(b, split);
    let mut eval = Evaluator::new(b, split.len(), net.capacity, level);
    Ok(block_on(eval.logits(b, &mut net, &data, Config::default().bn_eps)))
}

/// Each image as 32×32 RGB pixels, in the order given, and a message for each that cannot be
/// read. The format comes from the file's content, not its name.
fn read_images(paths: &[PathBuf]) -> (Vec<(&Path, Vec<u8>)>, Vec<String>) {
    let (mut read, mut unreadable) = (Vec::new(), Vec::new());
    for p in paths {
        let decoded = image::ImageReader::open(p).and_then(|r| r.with_guessed_format()).map_err(image::ImageError::IoError);
        match decoded.and_then(|r| r.decode()) {
            Ok(img) => {
                let small = image::imageops::resize(&img.to_rgb8(), 32, 32, image::imageops::FilterType::Triangle);
                read.push((p.as_path(), small.into_raw()));
            }
            Err(e) => unreadable.push(format!("cannot read image {}: {e}", p.display())),
        }
    }
    (read, unreadable)
}

/// The epoch table; `accuracy` and `tta_accuracy` are the test accuracy without and with TTA, as in `--json`.
const HEADER: &str = " run  epoch  train_loss  train_acc  accuracy  tta_accuracy   time_s";

fn format_row(run: u32, e: &EpochLog) -> String {
    let tta = e.tta_acc.map_or(String::new(), |t| format!("{:.4}", t));
    format!("{run:>4}  {:>5}  {:>10.4}  {:>9.4}  {:>8.4}  {tta:>12}  {:>7.2}", e.epoch, e.train_loss, e.train_acc, e.val_acc, e.seconds)
}

fn train_command<B: Backend>(b: &B, args: &TrainArgs, warm_up: bool) -> Result<()> {
    let cfg = Config { seed: args.seed, ..args.recipe.config()? };
    if let Some(path) = &args.save {
        check_writable(path)?; // before a run that may take an hour, not after it
    }
    // Before reading 180 MB of data: a network that cannot fit is refused with the numbers.
    let (train_images, test_images) = (args.train_limit.unwrap_or(50_000).min(50_000), args.test_limit.unwrap_or(10_000).min(10_000));
    let what = format!("training widths {:?} at batch size {} on {train_images} + {test_images} images", cfg.widths, cfg.batch_size);
    memory::check(b, memory::run_bytes(&cfg, train_images, test_images), &what)?;
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
    let (fingerprint, settings) = (cfg.fingerprint(), cfg.settings());
    out!(
        "speedrun: recipe {} on backend {} ({device}, {} storage); {} train / {} test images; widths {:?}; batch {}; {} steps",
        cfg.recipe.name(),
        b.name(),
        cfg.precision.name(),
        train_data.len(),
        test_data.len(),
        cfg.widths,
        cfg.batch_size,
        trainer.total_steps
    );
    if warm_up {
        let started = std::time::Instant::now();
        let since_launch = LAUNCHED.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
        trainer.reset(args.seed);
        block_on(train_run(&mut trainer, &test_data, &mut plain, &mut tta, &mut |_| Flow::Continue))?;
        out!("warm-up run (not counted): {:.2} s, begun {since_launch:.2} s after launch", started.elapsed().as_secs_f64());
    }
    out!("{HEADER}");
    let mut progress = crate::progress::Progress::on_stderr();
    let epochs = trainer.total_steps.div_ceil(cfg.steps_per_epoch(train_data.len()));
    let mut results: Vec<RunResult> = Vec::new();
    // What is on disk so far, for the message of a failure after a run has trained.
    let mut saved = Saved { checkpoint: None, json_rows: 0, json: args.json.as_deref() };
    for run in 1..=args.runs {
        let seed = args.seed + run as u64 - 1;
        trainer.reset(seed);
        progress.start_run();
        let mut on = |event: Event| {
            match event {
                Event::Step { epoch, step, steps } => {
                    progress.step(crate::progress::Position { run, runs: args.runs, epoch, epochs, step, steps });
                }
                Event::Epoch { log, .. } => {
                    progress.clear();
                    out!("{}", format_row(run, log));
                }
                _ => {}
            }
            Flow::Continue
        };
        let r = block_on(train_run(&mut trainer, &test_data, &mut plain, &mut tta, &mut on)).map_err(|e| {
            if run > 1 {
                anyhow::anyhow!("run {run}: {e:#}; before it, {}", saved.describe())
            } else {
                e
            }
        })?;
        // The run has trained: its checkpoint is written first, whatever fails after it. Each
        // run's replaces the one before (atomically), so the file holds the last finished run,
        // even when a later run fails.
        let save = |trainer: &Trainer<B>, saved: &mut Saved| -> Result<()> {
            let Some(path) = &args.save else { return Ok(()) };
            let (params, running) = block_on(trainer.net.state(b));
            let meta = [
                ("tta_accuracy", format!("{:.4}", r.tta_accuracy)),
                ("seed", trainer.cfg.seed.to_string()),
                ("recipe", cfg.recipe.name().to_string()),
            ];
            checkpoint::save(path, &trainer.net.arch, &params, &running, &meta)?;
            saved.checkpoint = Some((path.clone(), run));
            Ok(())
        };
        let mut failure = save(&trainer, &mut saved).err();
        let images_per_second = (r.steps * cfg.batch_size) as f64 / r.train_seconds;
        out!(
            "run {run}: TTA accuracy {:.4} in {:.2} s (whitening {:.2} s, training {:.2} s, TTA {:.2} s); {:.0} train images/s",
            r.tta_accuracy,
            r.time_seconds,
            r.whiten_seconds,
            r.train_seconds,
            r.tta_seconds,
            images_per_second
        );
        if let (Some(f), Some(p)) = (json.as_mut(), &args.json) {
            let line = serde_json::json!({
                "recipe": cfg.recipe.name(), "config_fingerprint": fingerprint, "version": crate::stats_cmd::VERSION,
                "commit": crate::stats_cmd::COMMIT, "backend": b.name(), "device": device, "run": run, "seed": seed, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "widths": cfg.widths, "train_images": r.train_images,
                "test_images": r.test_images, "accuracy": r.accuracy, "tta_accuracy": r.tta_accuracy,
                "time_seconds": r.time_seconds, "whiten_seconds": r.whiten_seconds, "train_seconds": r.train_seconds,
                "tta_seconds": r.tta_seconds, "steps": r.steps, "train_images_per_second": images_per_second, "config": settings,
            });
            match f.write_all(format!("{line}\n").as_bytes()) {
                Ok(()) => saved.json_rows += 1,
                Err(e) => {
                    let e = anyhow::Error::new(e).context(format!("cannot append run {run}'s row to the --json file {}", p.display()));
                    failure = Some(match failure {
                        Some(first) => anyhow::anyhow!("{first:#}; {e:#}"),
                        None => e,
                    });
                }
            }
        }
        if let Some(e) = failure {
            bail!("{e:#}; {}", saved.describe());
        }
        if let Some((path, _)) = &saved.checkpoint {
            out!("saved checkpoint {}", path.display());
        }
        results.push(r);
    }
    if results.len() > 1 {
        print_summary(&results, args.target);
    }
    let pipe_closed =
        STDOUT_FAILED.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
    if pipe_closed {
        // The reader went away (`speedrun train | head -1`): its choice, not a failure.
        err!("note: standard output was closed, so the output after that was dropped; training finished: {}", saved.describe());
    } else if let Some(failure) = stdout_failure() {
        bail!("{failure}; the output after that was dropped; training finished: {}", saved.describe());
    }
    Ok(())
}

/// What `train` has written so far.
struct Saved<'a> {
    checkpoint: Option<(PathBuf, u32)>,
    json_rows: usize,
    json: Option<&'a Path>,
}

impl Saved<'_> {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some((path, run)) = &self.checkpoint {
            parts.push(format!("run {run}'s weights were saved to {}", path.display()));
        }
        if let Some(json) = self.json.filter(|_| self.json_rows > 0) {
            parts.push(format!("{} row(s) were appended to {}", self.json_rows, json.display()));
        }
        if parts.is_empty() {
            "nothing was saved".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// The data folder, with CIFAR-10 downloaded into it first if it is missing.
fn data_dir_downloading(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = data::resolve_dir(dir);
    if data::batches_dir(&dir).is_none() {
        download::ensure(&dir, &download::official(), true)?;
    }
    Ok(dir)
}

/// Profiles on `--backend` (wgpu by default, on its default adapter; or cuda).
fn profile_command(args: &ProfileArgs) -> Result<()> {
    let kind = args.backend;
    if kind == BackendKind::Cpu {
        bail!("profile times GPU kernels; the CPU backend's time per op: `cargo bench --bench ops -- --backend cpu`");
    }
    match pick_backend(Some(kind), args.recipe.config()?.precision)? {
        #[cfg(feature = "wgpu")]
        Chosen::Wgpu(b) => profile_steps(&*b, args),
        #[cfg(feature = "cuda")]
        Chosen::Cuda(b) => profile_steps(&*b, args),
        Chosen::Cpu(_) => unreachable!("the CPU backend was refused above"),
    }
}

/// Profiles `--steps` training steps of epoch `--epoch` and prints GPU time per kernel,
/// longest first.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn profile_steps<B: speedrun::backend::Profile>(b: &B, args: &ProfileArgs) -> Result<()> {
    let cfg = args.recipe.config()?;
    let split = data::load_train(&data_dir_downloading(args.data_dir.as_deref())?, args.train_limit)?;
    let train = DeviceSplit::new(b, &split);
    let mut t = Trainer::new(b, cfg, &train)?;
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
    out!(
        "profile: recipe {} on {} ({}, {} storage); batch {}; widths {:?}; epoch {epoch}; {steps} steps",
        t.cfg.recipe.name(),
        b.name(),
        b.device_name(),
        b.precision().name(),
        t.cfg.batch_size,
        t.cfg.widths
    );
    out!("{:<44} {:>6} {:>9} {:>6} {:>9}", "kernel", "calls", "ms/step", "share", "GFLOP/s");
    for k in &kernels {
        let ms = k.seconds * 1e3 / steps as f64;
        let gflops = if k.flops > 0.0 { format!("{:.1}", k.flops / k.seconds / 1e9) } else { String::new() };
        out!("{:<44} {:>6} {ms:>9.3} {:>5.1}% {gflops:>9}", k.name, k.calls / steps, 100.0 * ms / gpu_ms);
    }
    out!("GPU time {gpu_ms:.2} ms/step (sum of kernels); wall time {wall_ms:.2} ms/step (timestamps on)");
    Ok(())
}

/// Fails unless a file can be created beside `path` (its folder exists and is writable) and
/// renamed to `path` (it is not a folder).
fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!(
            "cannot write checkpoint {}: it is a folder; give --save a file name, e.g. {}",
            path.display(),
            path.join("net.safetensors").display()
        );
    }
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
    out!("{} runs: TTA accuracy mean {:.4} ± {:.4} (min {:.4}, max {:.4})", a.n, a.mean, a.std, a.min, a.max);
    out!("time per run mean {:.2} ± {:.2} s (min {:.2}, max {:.2})", t.mean, t.std, t.min, t.max);
    if let Some(p) = stats::p_value_mean_below(&acc, target) {
        out!("one-sided t-test, true mean below {target}: p = {p:.3e}");
    }
}
