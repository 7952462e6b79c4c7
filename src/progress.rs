//! Training progress between the epoch rows, on stderr: a live bar (indicatif) when stderr is a
//! terminal, else (logs, CI, Slurm) a plain line every `SPEEDRUN_PROGRESS_SECONDS` seconds
//! (default 30; 0 turns the lines off), so that a log shows a run is alive between rows that can
//! be minutes apart.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Seconds between two plain progress lines unless `SPEEDRUN_PROGRESS_SECONDS` says otherwise.
pub const DEFAULT_SECONDS: f64 = 30.0;

/// Where a step is: which run and epoch, and the step within the epoch.
#[derive(Clone, Copy, Debug)]
pub struct Position {
    pub run: u32,
    pub runs: u32,
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub steps: usize,
}

pub enum Progress {
    /// A terminal: one bar per epoch (made at its first step), redrawn at most 4 times a second.
    Bar(Option<ProgressBar>),
    /// Plain lines, at most one per interval.
    Lines(Lines),
    Off,
}

impl Progress {
    /// The bar when stderr is a terminal, else plain lines at the interval of
    /// `SPEEDRUN_PROGRESS_SECONDS`.
    pub fn on_stderr() -> Progress {
        if std::io::stderr().is_terminal() {
            return Progress::Bar(None);
        }
        match interval_from(std::env::var("SPEEDRUN_PROGRESS_SECONDS").ok().as_deref()) {
            Some(interval) => Progress::Lines(Lines::new(interval, Instant::now())),
            None => Progress::Off,
        }
    }

    /// A run starts (the plain lines count its seconds from here).
    pub fn start_run(&mut self) {
        if let Progress::Lines(lines) = self {
            *lines = Lines::new(lines.interval, Instant::now());
        }
    }

    /// A training step was recorded.
    pub fn step(&mut self, at: Position) {
        match self {
            Progress::Bar(bar) => {
                let bar = bar.get_or_insert_with(|| {
                    let style =
                        ProgressStyle::with_template("{prefix}  step {pos}/{len}  {wide_bar}  {elapsed}").expect("a valid template");
                    let bar = ProgressBar::with_draw_target(Some(at.steps as u64), ProgressDrawTarget::hidden());
                    bar.set_style(style.progress_chars("=> "));
                    bar.set_prefix(format!("run {}/{}, epoch {}/{}", at.run, at.runs, at.epoch, at.epochs));
                    bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
                    bar
                });
                bar.set_position(at.step as u64);
            }
            Progress::Lines(lines) => {
                if let Some(line) = lines.due(Instant::now(), at) {
                    crate::cli::err!("{line}");
                }
            }
            Progress::Off => {}
        }
    }

    /// Before a line goes to stdout: the bar leaves the terminal.
    pub fn clear(&mut self) {
        if let Progress::Bar(bar) = self {
            if let Some(bar) = bar.take() {
                bar.finish_and_clear();
            }
        }
    }
}

/// The interval for `SPEEDRUN_PROGRESS_SECONDS`: unset, empty or unreadable gives the default;
/// 0 (or less) none.
pub fn interval_from(value: Option<&str>) -> Option<Duration> {
    let seconds = value.and_then(|v| v.trim().parse::<f64>().ok()).filter(|s| s.is_finite()).unwrap_or(DEFAULT_SECONDS);
    (seconds > 0.0).then(|| Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
}

/// Plain progress lines: one when `interval` has passed since the run started or since the last.
pub struct Lines {
    interval: Duration,
    started: Instant,
    last: Instant,
}

impl Lines {
    pub fn new(interval: Duration, now: Instant) -> Lines {
        Lines { interval, started: now, last: now }
    }

    /// The line to print for a step at `now`, if one is due.
    pub fn due(&mut self, now: Instant, at: Position) -> Option<String> {
        if now.duration_since(self.last) < self.interval {
            return None;
        }
        self.last = now;
        Some(format!(
            "progress: run {}/{}, epoch {}/{}, step {}/{} of the epoch, {:.0} s into the run",
            at.run,
            at.runs,
            at.epoch,
            at.epochs,
            at.step,
            at.steps,
            now.duration_since(self.started).as_secs_f64()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_comes_from_the_environment_or_the_default() {
        assert_eq!(interval_from(None), Some(Duration::from_secs(30)));
        assert_eq!(interval_from(Some("")), Some(Duration::from_secs(30)));
        assert_eq!(interval_from(Some("nonsense")), Some(Duration::from_secs(30)));
        assert_eq!(interval_from(Some("2.5")), Some(Duration::from_millis(2500)));
        assert_eq!(interval_from(Some("0")), None);
        assert_eq!(interval_from(Some("inf")), Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_plain_line_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut lines = Lines::new(Duration::from_secs(30), t0);
        let at = |step| Position { run: 1, runs: 2, epoch: 3, epochs: 10, step, steps: 48 };
        let s = Duration::from_secs;
        assert_eq!(lines.due(t0 + s(29), at(5)), None);
        assert_eq!(
            lines.due(t0 + s(30), at(6)).as_deref(),
            Some("progress: run 1/2, epoch 3/10, step 6/48 of the epoch, 30 s into the run")
        );
        assert_eq!(lines.due(t0 + s(59), at(11)), None);
        assert!(lines.due(t0 + s(61), at(12)).unwrap().ends_with("step 12/48 of the epoch, 61 s into the run"));
    }
}
