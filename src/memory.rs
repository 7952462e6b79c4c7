//! The memory a network or a training run needs, estimated from its configuration before
//! anything is allocated, and the memory the backend has free: a configuration that cannot fit
//! (`--widths 4096,4096,4096`) is refused with both numbers instead of aborting on a failed
//! allocation or driving the machine into swap. Counts are f64, so absurd widths cannot
//! overflow them.

use crate::backend::{cpu, Backend, CHANNELS, CLASSES, MOMENTS, SIDE};
use crate::data::RECORD;
use crate::model::{layers, WHITEN_OUT};
use crate::recipe::Config;
use anyhow::{bail, Result};

const F32: f64 = 4.0;
pub const GIB: f64 = (1u64 << 30) as f64;
/// Side of the whitening conv's output.
const WHITEN_SIDE: f64 = (SIDE - 1) as f64;

/// The conv layers as `(side, c_in, c_out, pool)`.
fn conv_layers(widths: [usize; 3]) -> Vec<(f64, f64, f64, f64)> {
    layers(widths).iter().map(|l| (l.side as f64, l.c_in as f64, l.c_out as f64, l.pool as f64)).collect()
}

/// Values in the parameter arena for `widths` (what `Layout::new(widths).params_len()` is).
pub fn param_count(widths: [usize; 3]) -> f64 {
    let convs: f64 = conv_layers(widths).iter().map(|&(_, c_in, c_out, _)| 9.0 * c_in * c_out + c_out).sum();
    let whiten = (WHITEN_OUT * (1 + 4 * CHANNELS)) as f64;
    whiten + convs + (CLASSES * widths[2]) as f64
}

/// Values in the BatchNorm running statistics for `widths`.
pub fn running_count(widths: [usize; 3]) -> f64 {
    2.0 * conv_layers(widths).iter().map(|l| l.2).sum::<f64>()
}

/// Values in the largest single activation buffer of a network for batches of `capacity`.
pub fn largest_tensor(widths: [usize; 3], capacity: usize) -> f64 {
    let n = capacity as f64;
    let whiten = n * WHITEN_SIDE * WHITEN_SIDE * WHITEN_OUT as f64;
    conv_layers(widths).iter().map(|&(side, c_in, c_out, _)| n * side * side * c_in.max(c_out)).fold(whiten, f64::max)
}

/// Bytes of the buffers `Net::new` allocates for batches of `capacity` images.
pub fn net_bytes(widths: [usize; 3], capacity: usize) -> f64 {
    let n = capacity as f64;
    let per_layer: f64 = conv_layers(widths)
        .iter()
        .map(|&(side, _, c_out, pool)| n * side * side * c_out + 2.0 * n * (side / pool).floor().powi(2) * c_out + 2.0 * c_out)
        .sum();
    let values = 2.0 * param_count(widths) // the arena and its gradients
        + running_count(widths)
        + n * (SIDE * SIDE * CHANNELS) as f64 + n // input and labels
        + 2.0 * n * CLASSES as f64 // logits and their gradient
        + 2.0 * n * WHITEN_SIDE * WHITEN_SIDE * WHITEN_OUT as f64
        + per_layer
        + 2.0 * n * widths[2] as f64
        + 2.0 * largest_tensor(widths, capacity); // gradient scratch
    values * F32
}

/// Bytes a training run of `cfg` on `n_train` images, evaluated on `n_test`, allocates: the
/// network, the optimizer and lookahead state, the evaluators, the datasets (on the host and
/// on the device) and the CPU backend's scratch (per-group filter gradients, per-thread
/// Winograd tiles, transformed filters) and the program itself. Measured on the CPU backend (peak resident memory), within
/// 3% of the estimate for widths 64,256,256 and 128,512,512.
pub fn run_bytes(cfg: &Config, n_train: usize, n_test: usize) -> f64 {
    let (widths, batch) = (cfg.widths, cfg.batch_size);
    let (n_train, n_test, n) = (n_train as f64, n_test as f64, batch as f64);
    let params = param_count(widths);
    let filters: Vec<(f64, f64)> = conv_layers(widths).iter().map(|&(_, c_in, c_out, _)| (c_out, 9.0 * c_in)).collect();
    let largest_filter = filters.iter().map(|(r, c)| r * c).fold(0.0, f64::max);
    let newton_schulz = match cfg.muon {
        Some(_) => 2.0 * largest_filter + 2.0 * filters.iter().map(|(r, _)| r * r).fold(0.0, f64::max),
        None => 0.0,
    };
    let trainer = 2.0 * params + running_count(widths) // momentum, lookahead copy
        + 2.0 * n_train // shuffle and crops
        + if cfg.jitter.is_some() { 2.0 * n_train } else { 0.0 }
        + (cfg.whiten_images as f64).min(n_train) * MOMENTS as f64
        + newton_schulz;
    let evaluators = 2.0 * n_test * (CLASSES + 1) as f64 + 7.0 * n;
    let threads = rayon::current_num_threads() as f64;
    let winograd = conv_layers(widths).iter().map(|l| cpu::winograd_scratch(l.1 as usize, l.2 as usize) as f64).fold(0.0, f64::max);
    let cpu_scratch = 16.0 * largest_filter + threads * winograd + 5.0 * largest_filter; // partials, scratch, transformed filters
    let images = 2.0 * (n_train + n_test) * RECORD as f64 + (RECORD * crate::data::RECORDS_PER_FILE) as f64;
    let program = 64.0 * (1u64 << 20) as f64;
    net_bytes(widths, batch) + (trainer + evaluators + cpu_scratch) * F32 + images + program
}

/// Fails, naming both numbers, when `needed` bytes (for `what`) exceed what `b` has free.
pub fn check<B: Backend>(b: &B, needed: f64, what: &str) -> Result<()> {
    if let Some((free, source)) = b.free_memory() {
        if needed > free as f64 {
            bail!(
                "{what} needs about {:.1} GiB of memory, but {:.1} GiB is available ({source}): use smaller --widths or --batch-size",
                needed / GIB,
                free as f64 / GIB
            );
        }
    }
    Ok(())
}

/// Memory this process can still take on the host, and where the number comes from:
/// `MemAvailable` of /proc/meminfo, lowered to what the process's cgroup (v2) limit leaves.
/// None where neither is known (other systems, the browser).
pub fn host_available() -> Option<(u64, String)> {
    #[cfg(target_os = "linux")]
    {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        let mut available = (kib * 1024, "MemAvailable in /proc/meminfo".to_string());
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok();
        let path = cgroup.as_deref().and_then(|c| c.lines().find_map(|l| l.strip_prefix("0::"))).unwrap_or("/");
        let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok().and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
            let left = max.saturating_sub(current);
            if left < available.0 {
                available = (left, format!("the limit of cgroup {path}"));
            }
        }
        Some(available)
    }
    #[cfg(not(target_os = "linux"))]
    None
}
