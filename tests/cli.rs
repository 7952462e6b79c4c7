//! The `speedrun` binary end to end: a reduced run on real data, its checkpoint through
//! `eval` and `predict`, and clean errors (exit code 1, no panic) for bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn speedrun(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_speedrun"));
    cmd.args(args).env_remove("SPEEDRUN_DATA");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run speedrun")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Asserts a clean failure: exit code `code`, `needle` in stderr, no panic.
fn fails_with(o: &Output, code: i32, needle: &str) {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(code), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(needle), "expected {needle:?} in stderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn reduced_run_on_real_data_then_eval_and_predict() {
    let data = common::cifar_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (json, ckpt) = (tmp.path().join("runs.jsonl"), tmp.path().join("net.safetensors"));
    let args = [
        "train",
        "--data-dir",
        data.to_str().unwrap(),
        "--widths",
        "32,64,64",
        "--train-limit",
        "10000",
        "--test-limit",
        "2000",
        "--epochs",
        "2",
    ];
    let o = speedrun(&[&args[..], &["--json", json.to_str().unwrap(), "--save", ckpt.to_str().unwrap()]].concat(), &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(" run  epoch  train_loss  train_acc  accuracy  tta_accuracy   time_s"), "{out}");
    let line = std::fs::read_to_string(&json).unwrap();
    let r: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    for key in [
        "backend",
        "device",
        "seed",
        "epochs",
        "batch_size",
        "widths",
        "train_images",
        "test_images",
        "accuracy",
        "tta_accuracy",
        "time_seconds",
        "steps",
    ] {
        assert!(r.get(key).is_some(), "JSON lacks {key}: {line}");
    }
    assert_eq!((r["train_images"].as_u64(), r["test_images"].as_u64(), r["steps"].as_u64()), (Some(10_000), Some(2000), Some(18)));
    // 18 steps of a 32/64/64 net: well above the 10% of chance (measured: 0.39).
    let tta = r["tta_accuracy"].as_f64().unwrap();
    assert!(tta > 0.30, "TTA accuracy {tta} after the reduced run");
    // The checkpoint evaluates to the same TTA accuracy.
    let o = speedrun(&["eval", "--checkpoint", ckpt.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "--test-limit", "2000"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&format!("{:.2}%", 100.0 * tta)), "eval printed {out}, the run measured {tta}");
    // predict: one test image written as a PNG.
    let test = speedrun::data::load_test(&data, Some(1)).unwrap();
    let png = tmp.path().join("img.png");
    image::RgbImage::from_raw(32, 32, test.pixels).unwrap().save(&png).unwrap();
    let o = speedrun(&["predict", "--checkpoint", ckpt.to_str().unwrap(), png.to_str().unwrap()], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let classes = speedrun::data::CLASS_NAMES.iter().filter(|c| out.contains(&format!("{c} "))).count();
    assert!(out.starts_with(png.to_str().unwrap()) && classes == 3 && out.contains('%'), "{out}");
}

/// A data folder with a valid `data_batch_1.bin` (enough for `--train-limit`) and a test
/// file made by `test`.
fn small_data(dir: &Path, test: impl Fn(&mut Vec<u8>)) {
    let mut batch = vec![0u8; 3073 * 10_000];
    for (i, rec) in batch.chunks_exact_mut(3073).enumerate() {
        rec[0] = (i % 10) as u8;
        rec[1..].iter_mut().enumerate().for_each(|(j, p)| *p = ((i * 31 + j * 7) % 256) as u8);
    }
    std::fs::write(dir.join("data_batch_1.bin"), &batch).unwrap();
    test(&mut batch);
    std::fs::write(dir.join("test_batch.bin"), &batch).unwrap();
}

const TINY: [&str; 8] = ["--train-limit", "64", "--test-limit", "32", "--widths", "8,8,8", "--epochs", "1"];

#[test]
fn bad_data_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    // Missing data and no way to download it (a closed local port stands for no internet).
    let empty = tmp.path().join("empty");
    let o =
        speedrun(&["train", "--data-dir", empty.to_str().unwrap()], &[("SPEEDRUN_CIFAR_URL", "http://127.0.0.1:9/cifar-10-binary.tar.gz")]);
    fails_with(&o, 1, "cannot download");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nothing half-written");
    let o = speedrun(&["eval", "--checkpoint", "x.safetensors", "--data-dir", empty.to_str().unwrap()], &[]);
    fails_with(&o, 1, "speedrun download");
    // A truncated file.
    small_data(tmp.path(), |b| b.truncate(b.len() - 100));
    fails_with(
        &speedrun(&[&["train", "--data-dir", dir, "--batch-size", "32"][..], &TINY].concat(), &[]),
        1,
        "test_batch.bin is 30729900 bytes",
    );
    // A label out of range.
    small_data(tmp.path(), |b| b[3073 * 17] = 10);
    fails_with(&speedrun(&[&["train", "--data-dir", dir, "--batch-size", "32"][..], &TINY].concat(), &[]), 1, "record 17 has label 10");
}

#[test]
fn bad_flags_and_paths_are_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    small_data(tmp.path(), |_| {});
    fails_with(&speedrun(&["train", "--widths", "1,2"], &[]), 2, "three positive widths");
    // `--backend cuda` where it cannot run: a clean error naming the fix.
    #[cfg(not(feature = "cuda"))]
    fails_with(&speedrun(&["train", "--backend", "cuda"], &[]), 1, "not in this build (rebuild with `--features cuda`)");
    #[cfg(feature = "cuda")]
    if let Err(missing) = speedrun::backend::cuda::check_libraries() {
        fails_with(&speedrun(&["train", "--backend", "cuda"], &[]), 1, &missing.to_string());
    }
    fails_with(&speedrun(&["train", "--backend", "tpu"], &[]), 2, "possible values: cpu, wgpu, cuda");
    fails_with(&speedrun(&["train", "--precision", "double"], &[]), 2, "possible values: f32, half");
    fails_with(&speedrun(&["train", "--data-dir", dir, "--epochs", "0"], &[]), 1, "--epochs must be positive");
    fails_with(&speedrun(&[&["train", "--data-dir", dir, "--batch-size", "100"][..], &TINY].concat(), &[]), 1, "batch size (100)");
    // The run works on this data; saving into a missing folder fails cleanly, leaving nothing.
    let missing = tmp.path().join("no/such/net.safetensors");
    let o =
        speedrun(&[&["train", "--data-dir", dir, "--batch-size", "32"][..], &TINY, &["--save", missing.to_str().unwrap()]].concat(), &[]);
    fails_with(&o, 1, "cannot write checkpoint");
    assert!(!tmp.path().join("no").exists());
    let not_image = tmp.path().join("data_batch_1.bin");
    fails_with(&speedrun(&["predict", "--checkpoint", "missing.safetensors", not_image.to_str().unwrap()], &[]), 1, "cannot read image");
    fails_with(&speedrun(&["eval", "--checkpoint", not_image.to_str().unwrap(), "--data-dir", dir], &[]), 1, "not a speedrun checkpoint");
    // An image given as the checkpoint: named for what it is not, without the parser's jargon;
    // a damaged PNG: its decoder's reason once.
    let png = tmp.path().join("img.png");
    image::RgbImage::new(8, 8).save(&png).unwrap();
    let o = speedrun(&["eval", "--checkpoint", png.to_str().unwrap(), "--data-dir", dir], &[]);
    fails_with(&o, 1, "is not a safetensors file");
    assert!(!text(&o).1.contains("header too large"), "{}", text(&o).1);
    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"not a png at all").unwrap();
    let o = speedrun(&["predict", "--checkpoint", png.to_str().unwrap(), broken.to_str().unwrap()], &[]);
    let err = text(&o).1;
    assert!(o.status.code() == Some(1) && err.contains("broken.png"), "{err}");
    let reason = err.lines().find(|l| l.contains("broken.png")).unwrap();
    assert!(reason.matches("signature").count() <= 1 && reason.matches("Invalid").count() <= 1, "the reason repeats itself: {reason}");
    // No internet: the message names the ways to give speedrun the data (port 9 is closed).
    let empty = tempfile::tempdir().unwrap();
    let o = speedrun(
        &["train", "--data-dir", empty.path().to_str().unwrap()],
        &[("SPEEDRUN_CIFAR_URL", "http://127.0.0.1:9/cifar-10-binary.tar.gz")],
    );
    fails_with(&o, 1, "cannot download");
    let err = text(&o).1;
    assert!(err.contains("--data-dir") && err.contains("SPEEDRUN_DATA") && err.contains("SPEEDRUN_CIFAR_URL"), "{err}");
    fails_with(
        &speedrun(&["eval", "--checkpoint", "x", "--data-dir", dir, "--test-limit", "0"], &[]),
        1,
        "--test-limit must be at least 1",
    );
}

/// `--recipe` picks a preset that the explicit flags override; the JSON row and the checkpoint
/// name it, and the checkpoint carries the recipe's network (SiLU, logits / 256) into `eval`.
#[test]
fn recipes_train_from_the_command_line() {
    let o = speedrun(&["recipes"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for (name, steps) in [("airbench94", "476 steps of 1024"), ("airbench94-muon", "200 steps of 2000"), ("hiverge", "243 steps of 1536")] {
        assert!(out.lines().any(|l| l.starts_with(name)) && out.contains(steps), "{name}: {out}");
    }
    fails_with(&speedrun(&["train", "--recipe", "fastest"], &[]), 2, "choose one of airbench94, airbench94-muon, hiverge");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    small_data(tmp.path(), |_| {});
    let (json, ckpt) = (tmp.path().join("runs.jsonl"), tmp.path().join("net.safetensors"));
    let files = ["--json", json.to_str().unwrap(), "--save", ckpt.to_str().unwrap()];
    let o = speedrun(&[&["train", "--recipe", "hiverge", "--data-dir", dir, "--batch-size", "32"][..], &TINY, &files].concat(), &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("recipe hiverge") && out.contains("batch 32; 2 steps"), "{out}");
    let r: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&json).unwrap().trim()).unwrap();
    assert_eq!((r["recipe"].as_str(), r["batch_size"].as_u64(), r["epochs"].as_f64()), (Some("hiverge"), Some(32), Some(1.0)));
    let bytes = std::fs::read(&ckpt).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!((meta["recipe"].as_str(), meta["activation"].as_str(), meta["logit_scale"].as_str()), ("hiverge", "silu", "0.00390625"));
    // The same flags on the WGSL backend (lavapipe in CI).
    #[cfg(feature = "wgpu")]
    if common::wgpu_device().is_some() {
        let o = speedrun(
            &[&["train", "--backend", "wgpu", "--recipe", "hiverge", "--data-dir", dir, "--batch-size", "32"][..], &TINY].concat(),
            &[],
        );
        let (out, err) = text(&o);
        assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("recipe hiverge on backend wgpu") && out.contains("TTA accuracy"), "{out}");
    }
    // Without TTA, eval sees exactly the run's last plain accuracy: the same network.
    let o = speedrun(&["eval", "--checkpoint", ckpt.to_str().unwrap(), "--data-dir", dir, "--tta", "0", "--test-limit", "32"], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains(&format!("{:.2}%", 100.0 * r["accuracy"].as_f64().unwrap())),
        "eval printed {out}, the run measured {}",
        r["accuracy"]
    );
}

/// `--precision half` on the CPU (the emulation) and on wgpu (f16 storage, lavapipe in CI):
/// the banner and the JSON row's settings say it; f32 rows leave it out (their fingerprints
/// stay what they were).
#[test]
fn half_precision_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    small_data(tmp.path(), |_| {});
    #[cfg(feature = "wgpu")]
    let wgpu = common::wgpu_half_device().map(|_| "wgpu");
    #[cfg(not(feature = "wgpu"))]
    let wgpu = None;
    for backend in std::iter::once("cpu").chain(wgpu) {
        for precision in ["half", "f32"] {
            let json = tmp.path().join(format!("{backend}-{precision}.jsonl"));
            let flags = ["--backend", backend, "--precision", precision, "--json", json.to_str().unwrap()];
            let o = speedrun(&[&["train", "--data-dir", dir, "--batch-size", "32"][..], &TINY, &flags].concat(), &[]);
            let (out, err) = text(&o);
            assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
            assert!(out.contains(&format!("{precision} storage")), "{out}");
            let r: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&json).unwrap().trim()).unwrap();
            let want = (precision == "half").then_some("half");
            assert_eq!(r["config"]["precision"].as_str(), want, "backend {backend}");
        }
    }
}

/// `speedrun profile` times every conv pass of a step (epoch 1 includes the whitening-bias
/// gradient through block1.conv1), in f32 and in half, rejects steps outside the run, and refuses
/// the CPU backend (no GPU kernels to time) and a CUDA that cannot run, naming the fix.
#[test]
fn profile_lists_every_conv_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    small_data(tmp.path(), |_| {});
    let args = ["profile", "--data-dir", dir, "--train-limit", "128", "--batch-size", "32", "--widths", "8,8,8", "--steps", "1"];
    #[cfg(not(feature = "wgpu"))]
    fails_with(&speedrun(&args, &[]), 1, "backend `wgpu` is not in this build");
    fails_with(&speedrun(&[&args[..], &["--backend", "cpu"]].concat(), &[]), 1, "profile times GPU kernels");
    #[cfg(not(feature = "cuda"))]
    fails_with(&speedrun(&[&args[..], &["--backend", "cuda"]].concat(), &[]), 1, "backend `cuda` is not in this build");
    #[cfg(feature = "cuda")]
    if let Err(missing) = speedrun::backend::cuda::check_libraries() {
        fails_with(&speedrun(&[&args[..], &["--backend", "cuda"]].concat(), &[]), 1, &missing.to_string());
    }
    #[cfg(feature = "wgpu")]
    if common::wgpu_device().is_some() {
        let o = speedrun(&args, &[]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
        for pass in ["conv fwd 3→24 32²", "conv fwd 24→8 31²", "conv dgrad 24→8 31²", "conv wgrad 24→8 31²", "conv wgrad 8→8 3²"]
        {
            assert!(out.contains(pass), "{pass:?} missing from:\n{out}");
        }
        assert!(out.contains("GPU time") && out.contains("f32 storage"), "{out}");
        fails_with(&speedrun(&[&args[..], &["--epoch", "11"]].concat(), &[]), 1, "pick --epoch and --steps inside them");
    }
    // The same in f16 storage, where the adapter has it.
    #[cfg(feature = "wgpu")]
    if common::wgpu_half_device().is_some() {
        let o = speedrun(&[&args[..], &["--precision", "half"]].concat(), &[]);
        let (out, err) = text(&o);
        assert!(
            o.status.success() && out.contains("half storage") && out.contains("conv wgrad 24→8 31²"),
            "stdout:\n{out}\nstderr:\n{err}"
        );
    }
}

/// Without a terminal (logs, CI, Slurm) `train` prints a plain progress line on stderr at most
/// every `SPEEDRUN_PROGRESS_SECONDS` (default 30 s; here a millisecond, so every step gets one)
/// and no terminal control characters; `SPEEDRUN_PROGRESS_SECONDS=0` turns the lines off.
#[test]
fn progress_lines_without_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    small_data(tmp.path(), |_| {});
    let args = [&["train", "--backend", "cpu", "--data-dir", dir, "--batch-size", "16"][..], &TINY].concat();
    let o = speedrun(&args, &[("SPEEDRUN_PROGRESS_SECONDS", "0.001")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for step in 1..=4 {
        let line = format!("progress: run 1/1, epoch 1/1, step {step}/4 of the epoch, ");
        assert!(err.lines().any(|l| l.starts_with(&line) && l.ends_with(" s into the run")), "{line:?} missing from stderr:\n{err}");
    }
    assert!(!err.contains('\r') && !err.contains('\x1b'), "terminal control characters in stderr: {err:?}");
    assert!(!out.contains("progress:"), "progress went to stdout:\n{out}");
    let o = speedrun(&args, &[("SPEEDRUN_PROGRESS_SECONDS", "0")]);
    let (out, err) = text(&o);
    assert!(o.status.success() && !err.contains("progress:"), "stdout:\n{out}\nstderr:\n{err}");
}

/// `--help` describes every flag of `eval` and `predict` and train's `--seed`, and lists the
/// environment variables; `info` says which backend a command without `--backend` would use.
#[test]
fn help_names_every_flag_and_the_environment() {
    for (command, flags) in
        [("eval", &["--checkpoint", "--tta", "--data-dir", "--test-limit", "--backend"][..]), ("predict", &["--checkpoint", "--backend"])]
    {
        let o = speedrun(&[command, "--help"], &[]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        for flag in flags {
            let line = out.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_else(|| panic!("{flag} missing:\n{out}"));
            let described = line.split_once('>').map_or(line.trim_start()[flag.len()..].trim(), |(_, rest)| rest.trim());
            assert!(!described.is_empty(), "{command} {flag} has no description:\n{out}");
        }
    }
    for args in [&["--help"][..], &["train", "--help"], &["download", "--help"]] {
        let out = text(&speedrun(args, &[])).0;
        for var in ["SPEEDRUN_DATA", "SPEEDRUN_CIFAR_URL", "SPEEDRUN_PROGRESS_SECONDS", "LD_LIBRARY_PATH", "SPEEDRUN_CACHE"] {
            assert!(out.contains(var), "{var} missing from speedrun {args:?}:\n{out}");
        }
    }
    let train = text(&speedrun(&["train", "--help"], &[])).0;
    assert!(train.lines().any(|l| l.contains("--seed <SEED>") && l.contains("Seed of the first run")), "{train}");
    let o = speedrun(&["info"], &[]);
    assert!(o.status.success());
    assert!(text(&o).0.contains("default backend (train, bench, eval, predict without --backend): "), "{}", text(&o).0);
}
