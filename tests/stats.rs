//! `speedrun stats` end to end through the binary: the rows `train --json` writes group by
//! configuration and two recipes compare with Welch's t-test; bad input (a missing or empty
//! file, a truncated last line, a row of an unknown version, a repeated seed, a malformed row)
//! is reported by file and line while the valid rows still count.

mod common;

use serde_json::Value;
use speedrun::train::{Config, Recipe};
use std::path::Path;
use std::process::{Command, Output};

fn speedrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_speedrun")).args(args).env_remove("SPEEDRUN_DATA").output().expect("run speedrun")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn ok(o: &Output) -> (String, String) {
    let (out, err) = text(o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    (out, err)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A row as `train --json` writes it (the fields `stats` reads), for `seed`.
fn row(seed: u64, accuracy: f64, time: f64) -> String {
    serde_json::json!({
        "recipe": "airbench94", "config_fingerprint": "0123456789abcdef", "version": env!("CARGO_PKG_VERSION"), "commit": "abc1234",
        "backend": "cpu", "device": "test CPU", "seed": seed, "train_images": 2048, "test_images": 500, "epochs": 1.0,
        "batch_size": 1024, "widths": [8, 8, 8], "tta_accuracy": accuracy, "time_seconds": time,
    })
    .to_string()
}

#[test]
fn rows_from_train_group_by_recipe_and_compare_with_welch() {
    let data = common::cifar_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("airbench94.jsonl"), tmp.path().join("hiverge.jsonl"));
    for (recipe, file) in [("airbench94", &a), ("hiverge", &b)] {
        let args = ["train", "--backend", "cpu", "--data-dir", path(&data), "--recipe", recipe, "--widths", "8,8,8"];
        let tiny = ["--train-limit", "2048", "--test-limit", "500", "--epochs", "1", "--runs", "2", "--seed", "5"];
        ok(&speedrun(&[&args[..], &tiny, &["--json", path(file)]].concat()));
    }
    // Every row says what it is: version, commit, the fingerprint and values of its Config.
    let first: Value = serde_json::from_str(std::fs::read_to_string(&a).unwrap().lines().next().unwrap()).unwrap();
    let cfg = Config { epochs: 1.0, widths: [8, 8, 8], ..Recipe::Airbench94.config() };
    assert_eq!(first["config_fingerprint"], cfg.fingerprint().as_str());
    assert_eq!(first["config"], cfg.settings());
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
    assert!(first["commit"].as_str().is_some_and(|c| !c.is_empty()), "{first}");

    let (out, err) = ok(&speedrun(&["stats", "--compare", path(&a), path(&b)]));
    println!("{out}");
    assert!(err.is_empty(), "{err}");
    assert!(out.starts_with("4 runs in 2 files: 2 configurations\n"), "{out}");
    assert!(out.contains("[1] airbench94 on cpu") && out.contains("[2] hiverge on cpu"), "{out}");
    assert_eq!(out.matches("2 runs, seeds 5-6").count(), 2, "{out}");
    assert!(out.contains("Welch's t-test, [1] − [2]:") && out.contains("settings that differ: recipe, "), "{out}");
    assert!(out.contains("    TTA accuracy   difference ") && out.contains("    time (s)       difference "), "{out}");

    let (json, _) = ok(&speedrun(&["stats", "--json", "--compare=2,1", "--target", "0.1", path(&a), path(&b)]));
    let report: Value = serde_json::from_str(&json).unwrap();
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    let mean = |g: usize, what: &str| groups[g][what]["mean"].as_f64().unwrap();
    let c = &report["comparison"];
    assert_eq!(c["groups"], serde_json::json!([2, 1]));
    let diff = c["tta_accuracy"]["difference"].as_f64().unwrap();
    assert!((diff - (mean(1, "tta_accuracy") - mean(0, "tta_accuracy"))).abs() < 1e-12, "{c}");
    let (lo, hi) = (c["time_seconds"]["ci95"][0].as_f64().unwrap(), c["time_seconds"]["ci95"][1].as_f64().unwrap());
    assert!(lo < c["time_seconds"]["difference"].as_f64().unwrap() && hi > lo, "{c}");
    let differ: Vec<&str> = c["differing_settings"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(differ.contains(&"recipe") && differ.contains(&"muon") && !differ.contains(&"widths"), "{differ:?}");
    assert_eq!(report["target"], 0.1);
    assert!(groups[0]["p_value_mean_below_target"].as_f64().is_some(), "{report}");

    // The same files again: every row is a duplicate of one already counted.
    let (out, err) = ok(&speedrun(&["stats", path(&a), path(&a)]));
    assert!(out.starts_with("2 runs in 2 files: 1 configuration (2 problems in the input, above)"), "{out}");
    let line2 = format!("{}:2: same configuration and seed 6 as {}:2 (identical results): duplicate dropped", path(&a), path(&a));
    assert!(err.contains(&line2), "{err}");
    // --compare needs two groups.
    let o = speedrun(&["stats", "--compare", path(&a)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("--compare needs exactly two groups and there are 1"), "{}", text(&o).1);
}

#[test]
fn bad_input_is_named_by_file_and_line_and_valid_rows_still_count() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = dir.join("good.jsonl");
    std::fs::write(&good, format!("{}\n{}\n\n{}\n", row(0, 0.5, 1.0), row(1, 0.6, 1.1), row(2, 0.7, 1.2))).unwrap();
    let truncated = dir.join("truncated.jsonl");
    let cut = row(4, 0.6, 1.0);
    std::fs::write(&truncated, format!("{}\n{}", row(3, 0.55, 1.05), &cut[..cut.len() / 2])).unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let missing = dir.join("missing.jsonl");
    let versions = dir.join("versions.jsonl");
    let unversioned = row(5, 0.5, 1.0).replace(&format!(r#""version":"{}","#, env!("CARGO_PKG_VERSION")), "");
    let future = row(6, 0.5, 1.0).replace(&format!(r#""version":"{}""#, env!("CARGO_PKG_VERSION")), r#""version":"99.0.0""#);
    let no_seed = row(7, 0.5, 1.0).replace(r#""seed":7,"#, "");
    std::fs::write(&versions, [unversioned, future, "not json".into(), no_seed, row(1, 0.9, 9.0)].join("\n") + "\n").unwrap();

    let files = [&good, &truncated, &empty, &missing, &versions];
    let args: Vec<&str> = ["stats"].into_iter().chain(files.iter().map(|p| path(p))).collect();
    let (out, err) = ok(&speedrun(&args));
    println!("{out}\n{err}");
    let (g, t, v) = (path(&good), path(&truncated), path(&versions));
    for needle in [
        format!("{t}:2: truncated row: the file ends inside it (was the run stopped while writing?); row skipped"),
        format!("{}: empty file, no runs in it", path(&empty)),
        format!("{}: cannot read it (", path(&missing)),
        format!("{v}:1: row from an unknown speedrun version (no `version` field"),
        format!(r#"{v}:2: row from an unknown speedrun version "99.0.0" (this is speedrun {}"#, env!("CARGO_PKG_VERSION")),
        format!("{v}:3: not a JSON row (expected ident at line 1 column 2); row skipped"),
        format!("{v}:4: no whole-number field `seed`; row skipped"),
        format!("{v}:5: same configuration and seed 1 as {g}:2 (different results): duplicate dropped"),
    ] {
        assert!(err.contains(&needle), "expected {needle:?} in stderr:\n{err}");
    }
    assert_eq!(err.lines().count(), 8, "{err}");
    // The valid rows: seeds 0, 1, 2 of good.jsonl and 3 of truncated.jsonl.
    assert!(out.starts_with("4 runs in 5 files: 1 configuration (8 problems in the input, above)"), "{out}");
    assert!(out.contains("4 runs, seeds 0-3") && out.contains("TTA accuracy   0.5875 ± 0.0854"), "{out}");

    // Nothing valid at all: an error, exit status 1.
    let o = speedrun(&["stats", path(&empty), path(&missing)]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error: no valid runs in 2 files (see the warnings above)") && !err.contains("panicked"), "{err}");
    // A missing FILE argument is a usage error (status 2).
    assert_eq!(speedrun(&["stats"]).status.code(), Some(2));
}
