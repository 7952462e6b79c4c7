//! The Slurm fan-out on a real cluster: `examples/slurm/speedrun-array.sbatch` submitted as a
//! job array of 4 tiny CPU tasks (widths 8,8,8, 2,048 training images, 1 epoch, one run each),
//! waited for with a bound, then `speedrun stats` over the job's results folder must find 4
//! runs with 4 distinct seeds, grouped as one configuration.
//!
//! Needs `sbatch` and a running cluster: `.ci/slurm up` starts a one-node one on this machine
//! (export SLURM_CONF=target/slurm/slurm.conf). Without them the test says SKIPPED and passes,
//! unless `SPEEDRUN_REQUIRE_SLURM=1` (as `.ci/run` sets), which makes that a failure.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TASKS: usize = 4;
/// The bound on the wait for the whole array (each task takes seconds on two cores).
const WAIT: Duration = Duration::from_secs(600);

fn run(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.output()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// None with a SKIPPED message, or a panic under SPEEDRUN_REQUIRE_SLURM=1.
fn unavailable(why: String) -> Option<()> {
    if std::env::var("SPEEDRUN_REQUIRE_SLURM").is_ok_and(|v| v == "1") {
        panic!("SPEEDRUN_REQUIRE_SLURM=1 but {why}");
    }
    eprintln!("SKIPPED: {why}; set SPEEDRUN_REQUIRE_SLURM=1 to make this a failure");
    None
}

/// Whether sbatch runs and a controller answers.
fn cluster() -> Option<()> {
    match run(Command::new("sbatch").arg("--version")) {
        Ok(o) if o.status.success() => {}
        Ok(o) => return unavailable(format!("`sbatch --version` failed: {}", text(&o.stderr))),
        Err(e) => return unavailable(format!("no sbatch ({e}): install slurm-wlm, or run .ci/slurm up")),
    }
    match run(Command::new("sinfo").args(["-h", "-o", "%P %a %D %t"])) {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => {
            eprintln!("slurm: {}", text(&o.stdout));
            Some(())
        }
        Ok(o) => unavailable(format!("no Slurm cluster answers (sinfo: {}); start one with .ci/slurm up", text(&o.stderr))),
        Err(e) => unavailable(format!("cannot run sinfo ({e})")),
    }
}

/// Everything the tasks wrote, for a failure's message.
fn logs(scratch: &Path) -> String {
    let mut files: Vec<PathBuf> = walk(scratch).into_iter().filter(|p| p.extension().is_some_and(|e| e == "out" || e == "log")).collect();
    files.sort();
    files.iter().map(|p| format!("== {}\n{}\n", p.display(), std::fs::read_to_string(p).unwrap_or_default())).collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().map(|e| e.path()).flat_map(|p| if p.is_dir() { walk(&p) } else { vec![p] }).collect()
}

#[test]
fn job_array_fans_out_and_stats_groups_its_runs() {
    if cluster().is_none() {
        return;
    }
    let data = common::cifar_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = root.join("target/slurm-test");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).unwrap();
    }
    std::fs::create_dir_all(&scratch).unwrap();
    let results = scratch.join("results");

    let started = Instant::now();
    let submit = run(Command::new("sbatch")
        .args(["--parsable", &format!("--array=0-{}", TASKS - 1), "--gpus-per-task=0", "--job-name=speedrun-test"])
        .arg(format!("--output={}/slurm-%A_%a.out", scratch.display()))
        .arg(format!("--chdir={}", scratch.display()))
        .arg(root.join("examples/slurm/speedrun-array.sbatch"))
        .args(["--widths", "8,8,8", "--train-limit", "2048", "--epochs", "1", "--test-limit", "2000"])
        .env("SPEEDRUN", env!("CARGO_BIN_EXE_speedrun"))
        .env("SPEEDRUN_RUNS", "1")
        .env("SPEEDRUN_DATA", &data)
        .env("SPEEDRUN_RESULTS", &results))
    .expect("run sbatch");
    assert!(submit.status.success(), "sbatch failed: {}", text(&submit.stderr));
    let job = text(&submit.stdout).split(';').next().unwrap().to_string();
    assert!(!job.is_empty() && job.chars().all(|c| c.is_ascii_digit()), "sbatch --parsable printed {job:?}");
    eprintln!("slurm: submitted job array {job} ({TASKS} tasks)");

    // Wait until none of the array's tasks is pending, running or completing.
    loop {
        let q = run(Command::new("squeue").args(["-h", "-j", &job, "-o", "%i %T"])).expect("run squeue");
        let active = text(&q.stdout);
        if active.is_empty() {
            break;
        }
        if started.elapsed() > WAIT {
            let _ = run(Command::new("scancel").arg(&job));
            panic!("job {job} not done after {} s:\n{active}\n{}", WAIT.as_secs(), logs(&scratch));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let waited = started.elapsed().as_secs_f64();
    // Every task completed (Slurm keeps finished jobs' records for MinJobAge, 300 s).
    let show = run(Command::new("scontrol").args(["-o", "show", "job", &job])).expect("run scontrol");
    let states: Vec<String> = text(&show.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("JobState=")).map(str::to_string))
        .collect();
    assert!(states.iter().all(|s| s == "COMPLETED"), "task states {states:?}\n{}", logs(&scratch));

    let folder = results.join(&job);
    let mut files: Vec<PathBuf> = walk(&folder).into_iter().filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect();
    files.sort();
    assert_eq!(files.len(), TASKS, "one JSON Lines file per task in {}:\n{}", folder.display(), logs(&scratch));

    // `speedrun stats` from the results' parent folder, as the README shows it.
    let relative: Vec<PathBuf> = files.iter().map(|f| f.strip_prefix(&scratch).unwrap().to_path_buf()).collect();
    let stats = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_speedrun"));
        cmd.arg("stats").args(json.then_some("--json")).args(&relative).current_dir(&scratch);
        let o = run(&mut cmd).expect("run speedrun stats");
        assert!(o.status.success(), "speedrun stats failed:\n{}\n{}", text(&o.stdout), text(&o.stderr));
        assert!(o.stderr.is_empty(), "speedrun stats warned:\n{}", text(&o.stderr));
        text(&o.stdout)
    };
    let report: Value = serde_json::from_str(&stats(true)).unwrap();
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "one configuration: {report:#}");
    let g = &groups[0];
    assert_eq!(g["n"], TASKS, "{g:#}");
    assert_eq!(g["seeds"], serde_json::json!([0, 1, 2, 3]), "task i ran seed i: {g:#}");
    assert_eq!((g["recipe"].as_str(), g["backend"].as_str(), g["train_images"].as_u64()), (Some("airbench94"), Some("cpu"), Some(2048)));
    assert_eq!(report["duplicates_dropped"], 0);
    let pattern = relative[0].parent().unwrap().join("*.jsonl");
    println!("slurm: job {job}: {TASKS} tasks done in {waited:.1} s\n$ speedrun stats {}\n{}", pattern.display(), stats(false));
}
