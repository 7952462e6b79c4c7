//! The browser demo end to end: `speedrun web` serves the page (built by `web/build.sh`) and
//! the test data, and `web/e2e.mjs` drives headless Chromium: it opens a small
//! `cifar-10-binary.tar.gz`-like archive built here, then trains a short run on a small slice
//! loaded from the server (see there), saving `target/web-e2e.png`; the checkpoint the page offers for
//! download then gives the same test accuracy under `speedrun eval`. Skipped with a message when the built
//! page, node, playwright-core or Chromium is missing, unless `SPEEDRUN_REQUIRE_BROWSER=1`
//! (as `.ci/run` sets) makes that a failure.
#![cfg(feature = "wgpu")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Kills the server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn page_trains_and_shows_its_results() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let needs = [
        (root.join("web/pkg/speedrun_bg.wasm").is_file(), "the built page: run web/build.sh"),
        (root.join("web/node_modules/playwright-core").is_dir(), "playwright-core: run `npm install --prefix web`"),
        (Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success()), "node"),
        (Path::new("/usr/bin/chromium").is_file(), "Chromium at /usr/bin/chromium: apt-get install chromium"),
    ];
    if let Some((_, what)) = needs.iter().find(|(ok, _)| !ok) {
        assert!(std::env::var_os("SPEEDRUN_REQUIRE_BROWSER").is_none(), "SPEEDRUN_REQUIRE_BROWSER is set but this is missing: {what}");
        eprintln!("SKIPPED: the browser test needs {what}");
        return;
    }
    let data = common::cifar_dir();
    let child = Command::new(env!("CARGO_BIN_EXE_speedrun"))
        .args(["web", "--port", "0", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start speedrun web");
    let mut server = Server(child);
    let stdout = BufReader::new(server.0.stdout.take().unwrap());
    let url = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("http://127.0.0.1:")).map(str::to_string))
        .expect("speedrun web prints its URL");
    let (shot, ckpt, archive) =
        (root.join("target/web-e2e.png"), root.join("target/web-e2e.safetensors"), root.join("target/web-e2e-cifar.tar.gz"));
    let _ = (std::fs::remove_file(&shot), std::fs::remove_file(&ckpt));
    write_archive(&archive, &speedrun::data::batches_dir(&data).unwrap());
    let args = [&url, shot.to_str().unwrap(), ckpt.to_str().unwrap(), archive.to_str().unwrap()];
    let out = Command::new("node").arg(root.join("web/e2e.mjs")).args(args).output();
    let out = out.expect("run node");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "web/e2e.mjs failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "no screenshot at {}", shot.display());
    let page: serde_json::Value = serde_json::from_str(stdout.trim()).expect("e2e.mjs prints JSON");
    let from_archive = page["from_archive"].as_str().unwrap_or_default();
    assert_eq!(from_archive, "10000 training and 10000 test images from web-e2e-cifar.tar.gz.");
    let eval = Command::new(env!("CARGO_BIN_EXE_speedrun"))
        .args(["eval", "--backend", "cpu", "--test-limit", "500", "--checkpoint", ckpt.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .output()
        .expect("run speedrun eval");
    let text = String::from_utf8_lossy(&eval.stdout);
    assert!(eval.status.success(), "{text}{}", String::from_utf8_lossy(&eval.stderr));
    let percent: f64 = text.split("accuracy (TTA level 2): ").nth(1).and_then(|t| t.split('%').next()).unwrap().parse().unwrap();
    // The browser's TTA accuracy on the same 500 images, from the same weights: f32 sums in
    // another order may flip an image or two near a tie.
    let tta = page["tta"].as_f64().unwrap();
    assert!((percent / 100.0 - tta).abs() <= 0.004, "eval {percent}% vs the page's {tta}");
}

/// A gzipped tar with the layout of `cifar-10-binary.tar.gz`, holding one training file and
/// the test file.
fn write_archive(path: &Path, batches: &Path) {
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for name in ["data_batch_1.bin", "test_batch.bin"] {
        tar.append_path_with_name(batches.join(name), format!("cifar-10-batches-bin/{name}")).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}
