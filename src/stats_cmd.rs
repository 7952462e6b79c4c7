//! `speedrun stats`: statistics over the JSON Lines rows that `train` and `bench --json` write,
//! from any number of runs, files and machines. Rows are grouped by configuration (recipe,
//! the fingerprint of every `Config` value, training and test images, backend, device,
//! speedrun version and commit); a repeated (configuration, seed) is dropped with a warning;
//! each group gets n, mean ± std, the 95% confidence interval of the mean, min and max of the
//! TTA accuracy and the time, and the one-sided t-test against `--target`. `--compare`
//! adds Welch's t-test between two groups. Bad input (a missing or empty file, a truncated or
//! malformed line, a row of an unknown version) is reported by file and line; the valid rows
//! still count.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use speedrun::stats::{self, Summary, Welch};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

/// This build's version, and the git commit of its sources (build.rs; "unknown" outside git).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("SPEEDRUN_GIT_COMMIT");

/// Confidence level of the intervals.
const LEVEL: f64 = 0.95;

#[derive(clap::Args)]
pub struct StatsArgs {
    /// JSON Lines files from `train`/`bench --json` (any number, from any machines).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Accuracy target of the one-sided t-test "the true mean is below the target".
    #[arg(long, default_value_t = 0.94)]
    target: f64,
    /// Welch's t-test between two groups: bare `--compare` when there are exactly two,
    /// `--compare=I,J` for groups I and J as numbered in the output.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "", value_name = "I,J")]
    compare: Option<String>,
    /// Print the statistics as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What identifies a configuration: runs with equal keys are samples of the same thing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    recipe: String,
    fingerprint: String,
    train_images: u64,
    test_images: u64,
    backend: String,
    device: String,
    version: String,
    commit: String,
}

#[derive(Debug)]
struct Run {
    seed: u64,
    accuracy: f64,
    time: f64,
}

struct Group {
    key: Key,
    /// The first row, for the settings it shows (epochs, batch size, widths, `config`).
    row: Map<String, Value>,
    runs: Vec<Run>,
}

pub fn stats_command(args: &StatsArgs) -> Result<()> {
    let mut problems: Vec<String> = Vec::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    let mut seen: HashMap<(usize, u64), String> = HashMap::new();
    let mut duplicates = 0;
    for path in &args.files {
        let name = path.display().to_string();
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                problems.push(format!("{name}: cannot read it ({e}); its runs are not counted"));
                continue;
            }
        };
        if text.trim().is_empty() {
            problems.push(format!("{name}: empty file, no runs in it"));
            continue;
        }
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{name}:{}", i + 1);
            let last_unterminated = i + 1 == lines.len() && !text.ends_with('\n');
            let (key, run) = match parse_row(line, last_unterminated) {
                Ok(row) => row,
                Err(why) => {
                    problems.push(format!("{at}: {why}; row skipped"));
                    continue;
                }
            };
            let g = *index.entry(key.clone()).or_insert_with(|| {
                let first = serde_json::from_str::<Map<String, Value>>(line).unwrap_or_default();
                groups.push(Group { key, row: first, runs: Vec::new() });
                groups.len() - 1
            });
            if let Some(first) = seen.get(&(g, run.seed)) {
                let same = groups[g].runs.iter().any(|r| r.seed == run.seed && r.accuracy == run.accuracy && r.time == run.time);
                let results = if same { "identical results" } else { "different results" };
                problems.push(format!("{at}: same configuration and seed {} as {first} ({results}): duplicate dropped", run.seed));
                duplicates += 1;
                continue;
            }
            seen.insert((g, run.seed), at);
            groups[g].runs.push(run);
        }
    }
    for p in &problems {
        eprintln!("warning: {p}");
    }
    let counted: usize = groups.iter().map(|g| g.runs.len()).sum();
    if counted == 0 {
        bail!("no valid runs in {} (see the warnings above)", plural(args.files.len(), "file"));
    }
    let comparison = match &args.compare {
        Some(which) => Some(compare(&groups, which)?),
        None => None,
    };
    let report = if args.json {
        serde_json::to_string_pretty(&report_json(args, &groups, comparison, &problems, duplicates))? + "\n"
    } else {
        report_text(args, &groups, comparison, problems.len())
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(report.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to standard output"),
        _ => Ok(()), // a closed pipe (`speedrun stats ... | head`) is the reader's choice
    }
}

/// A row's configuration and result, or why it cannot be used.
fn parse_row(line: &str, last_unterminated: bool) -> Result<(Key, Run), String> {
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) if e.is_eof() && last_unterminated => {
            return Err("truncated row: the file ends inside it (was the run stopped while writing?)".into())
        }
        Err(e) if e.is_eof() => return Err(format!("truncated row ({e})")),
        Err(e) => return Err(format!("not a JSON row ({e})")),
    };
    let Some(row) = value.as_object() else { return Err("not a JSON object".into()) };
    match row.get("version") {
        None => {
            return Err(format!(
                "row from an unknown speedrun version (no `version` field: written before speedrun {VERSION} \
                 gave rows their configuration fingerprint; train it again to group it)"
            ))
        }
        Some(v) => match v.as_str().and_then(parse_version) {
            Some(version) if version <= parse_version(VERSION).expect("CARGO_PKG_VERSION is x.y.z") => {}
            _ => {
                return Err(format!(
                    "row from an unknown speedrun version {v} (this is speedrun {VERSION}, which reads rows up to its own version)"
                ))
            }
        },
    }
    let text = |name: &str| row.get(name).and_then(Value::as_str).map(str::to_string).ok_or_else(|| format!("no text field `{name}`"));
    let count = |name: &str| row.get(name).and_then(Value::as_u64).ok_or_else(|| format!("no whole-number field `{name}`"));
    let number = |name: &str| {
        row.get(name).and_then(Value::as_f64).filter(|x| x.is_finite()).ok_or_else(|| format!("no finite number field `{name}`"))
    };
    let key = Key {
        recipe: text("recipe")?,
        fingerprint: text("config_fingerprint")?,
        train_images: count("train_images")?,
        test_images: count("test_images")?,
        backend: text("backend")?,
        device: text("device")?,
        version: text("version")?,
        commit: text("commit")?,
    };
    let run = Run { seed: count("seed")?, accuracy: number("tta_accuracy")?, time: number("time_seconds")? };
    Ok((key, run))
}

/// "1.2.3" (with any "-pre" or "+build" tail ignored) as numbers, for ordering.
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// Sorted seeds as ranges: "0-3, 8, 10-11".
fn seed_ranges(runs: &[Run]) -> String {
    let mut seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seeds.len() {
        let mut j = i;
        while j + 1 < seeds.len() && seeds[j + 1] == seeds[j] + 1 {
            j += 1;
        }
        out.push(if j == i { seeds[i].to_string() } else { format!("{}-{}", seeds[i], seeds[j]) });
        i = j + 1;
    }
    out.join(", ")
}

impl Group {
    fn accuracies(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.accuracy).collect()
    }

    fn times(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.time).collect()
    }

    /// The settings a reader looks for first, from the row.
    fn settings(&self) -> String {
        let get = |name: &str| self.row.get(name).or_else(|| self.row.get("config").and_then(|c| c.get(name)));
        let mut parts = Vec::new();
        for (name, label) in [("epochs", "epochs"), ("batch_size", "batch"), ("lr", "lr")] {
            if let Some(v) = get(name) {
                parts.push(format!("{label} {v}"));
            }
        }
        if let Some(Value::Array(w)) = get("widths") {
            parts.push(format!("widths {}", w.iter().map(Value::to_string).collect::<Vec<_>>().join(",")));
        }
        parts.join(", ")
    }

    /// Every setting, as name → value: the key's fields and the row's `config` object.
    fn all_settings(&self) -> Vec<(String, String)> {
        let k = &self.key;
        let mut out: Vec<(String, String)> = [
            ("recipe", k.recipe.clone()),
            ("train_images", k.train_images.to_string()),
            ("test_images", k.test_images.to_string()),
            ("backend", k.backend.clone()),
            ("device", k.device.clone()),
            ("version", k.version.clone()),
            ("commit", k.commit.clone()),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        if let Some(Value::Object(config)) = self.row.get("config") {
            out.extend(config.iter().filter(|(n, _)| *n != "recipe").map(|(n, v)| (n.clone(), v.to_string())));
        }
        out
    }
}

struct Comparison {
    a: usize,
    b: usize,
    differ: Vec<String>,
    accuracy: Welch,
    time: Welch,
}

fn compare(groups: &[Group], which: &str) -> Result<Comparison> {
    let (a, b) = if which.trim().is_empty() {
        if groups.len() != 2 {
            bail!("--compare needs exactly two groups and there are {}: pick two with --compare=I,J", groups.len());
        }
        (0, 1)
    } else {
        let picked: Vec<usize> = which.split(',').filter_map(|p| p.trim().parse::<usize>().ok()).collect();
        match picked[..] {
            [i, j] if i != j && (1..=groups.len()).contains(&i) && (1..=groups.len()).contains(&j) => (i - 1, j - 1),
            _ => bail!("--compare={which}: expected two different group numbers from 1 to {}, e.g. --compare=1,2", groups.len()),
        }
    };
    for g in [a, b] {
        if groups[g].runs.len() < 2 {
            bail!("group {} has {}: Welch's t-test needs at least 2 runs in each group", g + 1, plural(groups[g].runs.len(), "run"));
        }
    }
    let (sa, sb) = (groups[a].all_settings(), groups[b].all_settings());
    let lookup: HashMap<&String, &String> = sb.iter().map(|(n, v)| (n, v)).collect();
    let mut differ: Vec<String> = sa.iter().filter(|(n, v)| lookup.get(n) != Some(&v)).map(|(n, _)| n.clone()).collect();
    differ.extend(sb.iter().filter(|(n, _)| !sa.iter().any(|(m, _)| m == n)).map(|(n, _)| n.clone()));
    let accuracy = stats::welch(&groups[a].accuracies(), &groups[b].accuracies(), LEVEL).expect("two groups of 2 runs or more");
    let time = stats::welch(&groups[a].times(), &groups[b].times(), LEVEL).expect("two groups of 2 runs or more");
    Ok(Comparison { a, b, differ, accuracy, time })
}

fn summary_json(xs: &[f64]) -> Value {
    let s = stats::summarize(xs);
    let ci = stats::mean_confidence_interval(xs, LEVEL).map(|(lo, hi)| json!([lo, hi]));
    json!({ "mean": s.mean, "std": if s.std.is_nan() { Value::Null } else { json!(s.std) }, "ci95": ci, "min": s.min, "max": s.max })
}

fn welch_json(w: &Welch) -> Value {
    json!({ "difference": w.difference, "standard_error": w.standard_error, "ci95": [w.ci.0, w.ci.1], "t": w.t, "df": w.df, "p_two_sided": w.p })
}

fn report_json(args: &StatsArgs, groups: &[Group], comparison: Option<Comparison>, problems: &[String], duplicates: usize) -> Value {
    let groups: Vec<Value> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let k = &g.key;
            let mut seeds: Vec<u64> = g.runs.iter().map(|r| r.seed).collect();
            seeds.sort_unstable();
            json!({
                "group": i + 1, "recipe": k.recipe, "config_fingerprint": k.fingerprint, "backend": k.backend, "device": k.device,
                "version": k.version, "commit": k.commit, "train_images": k.train_images, "test_images": k.test_images,
                "epochs": g.row.get("epochs"), "batch_size": g.row.get("batch_size"), "widths": g.row.get("widths"),
                "n": g.runs.len(), "seeds": seeds,
                "tta_accuracy": summary_json(&g.accuracies()), "time_seconds": summary_json(&g.times()),
                "p_value_mean_below_target": stats::p_value_mean_below(&g.accuracies(), args.target),
            })
        })
        .collect();
    let comparison = comparison.map(|c| {
        json!({ "groups": [c.a + 1, c.b + 1], "differing_settings": c.differ,
                "tta_accuracy": welch_json(&c.accuracy), "time_seconds": welch_json(&c.time) })
    });
    json!({ "target": args.target, "files": args.files, "groups": groups, "comparison": comparison,
            "duplicates_dropped": duplicates, "warnings": problems })
}

fn report_text(args: &StatsArgs, groups: &[Group], comparison: Option<Comparison>, problems: usize) -> String {
    let mut out = String::new();
    let runs: usize = groups.iter().map(|g| g.runs.len()).sum();
    let _ = write!(out, "{} in {}: {}", plural(runs, "run"), plural(args.files.len(), "file"), plural(groups.len(), "configuration"));
    let _ =
        writeln!(out, "{}", if problems > 0 { format!(" ({} in the input, above)", plural(problems, "problem")) } else { String::new() });
    for (i, g) in groups.iter().enumerate() {
        let k = &g.key;
        let _ = writeln!(out, "\n[{}] {} on {} ({}), speedrun {} ({})", i + 1, k.recipe, k.backend, k.device, k.version, k.commit);
        let _ = writeln!(out, "    config {}: {}; {} train / {} test images", k.fingerprint, g.settings(), k.train_images, k.test_images);
        let _ = writeln!(out, "    {}, seeds {}", plural(g.runs.len(), "run"), seed_ranges(&g.runs));
        out += "                   mean ± std           95% CI of the mean     min       max\n"; // the columns of `line` below
        let (acc, time) = (g.accuracies(), g.times());
        let line = |label: &str, xs: &[f64], d: usize| {
            let Summary { mean, std, min, max, .. } = stats::summarize(xs);
            let std = if std.is_nan() { "n/a".to_string() } else { format!("{std:.d$}") };
            let ci = stats::mean_confidence_interval(xs, LEVEL).map_or("n/a".to_string(), |(lo, hi)| format!("[{lo:.d$}, {hi:.d$}]"));
            format!("    {label:<14} {:<20} {ci:<22} {min:<9.d$} {max:.d$}\n", format!("{mean:.d$} ± {std}"))
        };
        out += &line("TTA accuracy", &acc, 4);
        out += &line("time (s)", &time, 3);
        match stats::p_value_mean_below(&acc, args.target) {
            Some(p) => writeln!(out, "    one-sided t-test, true mean below {}: p = {p:.3e}", args.target),
            None => writeln!(out, "    one-sided t-test against {}: needs at least 2 runs", args.target),
        }
        .expect("writing to a String");
    }
    if let Some(c) = comparison {
        let _ = writeln!(out, "\nWelch's t-test, [{}] − [{}]:", c.a + 1, c.b + 1);
        let _ = writeln!(out, "    settings that differ: {}", if c.differ.is_empty() { "none".to_string() } else { c.differ.join(", ") });
        for (label, w, d) in [("TTA accuracy", &c.accuracy, 4), ("time (s)", &c.time, 3)] {
            let _ = writeln!(
                out,
                "    {label:<14} difference {:+.d$} (95% CI [{:+.d$}, {:+.d$}]), t = {:.3}, df = {:.1}, two-sided p = {:.3e}",
                w.difference, w.ci.0, w.ci.1, w.t, w.df, w.p
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(fields: &str) -> String {
        format!(
            r#"{{"recipe":"airbench94","config_fingerprint":"00112233aabbccdd","train_images":2048,"test_images":10000,"backend":"cpu","device":"x","version":"{VERSION}","commit":"abc","seed":3,"tta_accuracy":0.5,"time_seconds":1.5{fields}}}"#
        )
    }

    #[test]
    fn rows_parse_and_reject_with_reasons() {
        let (key, run) = parse_row(&row(""), false).unwrap();
        assert_eq!((key.recipe.as_str(), key.train_images, run.seed, run.accuracy), ("airbench94", 2048, 3, 0.5));
        let truncated = &row("")[..60];
        assert!(parse_row(truncated, true).unwrap_err().contains("truncated row: the file ends inside it"));
        assert!(parse_row("[1, 2]", false).unwrap_err().contains("not a JSON object"));
        assert!(parse_row("{ nope", false).unwrap_err().contains("not a JSON row"));
        let old = row("").replace(&format!(r#""version":"{VERSION}","#), "");
        assert!(parse_row(&old, false).unwrap_err().contains("unknown speedrun version (no `version` field"));
        let newer = row("").replace(&format!(r#""version":"{VERSION}""#), r#""version":"999.0.0""#);
        assert!(parse_row(&newer, false).unwrap_err().contains(r#"unknown speedrun version "999.0.0""#));
        let missing = row("").replace(r#""seed":3,"#, "");
        assert_eq!(parse_row(&missing, false).unwrap_err(), "no whole-number field `seed`");
        let nan = row("").replace(r#""tta_accuracy":0.5"#, r#""tta_accuracy":null"#);
        assert_eq!(parse_row(&nan, false).unwrap_err(), "no finite number field `tta_accuracy`");
    }

    #[test]
    fn versions_and_seed_ranges() {
        assert_eq!(parse_version("0.1.0"), Some((0, 1, 0)));
        assert_eq!(parse_version("1.20.3-rc.1+x"), Some((1, 20, 3)));
        assert_eq!(parse_version("1.2"), None);
        assert_eq!(parse_version("1.2.3.4"), None);
        assert!(parse_version(VERSION).is_some());
        let runs: Vec<Run> = [10u64, 0, 1, 2, 3, 8, 11].iter().map(|&seed| Run { seed, accuracy: 0.0, time: 0.0 }).collect();
        assert_eq!(seed_ranges(&runs), "0-3, 8, 10-11");
    }
}
