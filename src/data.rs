//! CIFAR-10, binary version: `data_batch_1..5.bin` and `test_batch.bin`, each 10,000 records
//! of 1 label byte + 1024 R, 1024 G, 1024 B bytes. Loaded into NHWC u8 for the backends.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const RECORD: usize = 1 + 3 * 32 * 32;
pub const RECORDS_PER_FILE: usize = 10_000;
pub const TRAIN_FILES: [&str; 5] = ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
pub const TEST_FILE: &str = "test_batch.bin";
/// The folder the official archive extracts to.
pub const ARCHIVE_FOLDER: &str = "cifar-10-batches-bin";
/// The checksums `speedrun download` records beside the files it extracts (`sha256sum -c`
/// format), against which it later checks them.
pub const CHECKSUMS: &str = "SHA256SUMS";
pub const CLASS_NAMES: [&str; 10] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Images as `(n, 32, 32, 3)` NHWC u8 and their labels 0..9.
#[derive(Clone, Debug)]
pub struct Split {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// The first `n` images.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.pixels.truncate(n * (RECORD - 1));
        self.labels.truncate(n);
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// The data folder: `--data-dir`, else `$SPEEDRUN_DATA`, else the per-user cache
/// (`~/.cache/speedrun/cifar10` on Linux, the platform's cache folder elsewhere).
pub fn resolve_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("SPEEDRUN_DATA").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir().unwrap_or_else(|| PathBuf::from(".")).join("speedrun").join("cifar10")
}

/// The folder holding the `.bin` files: `dir` itself or its `cifar-10-batches-bin/`,
/// preferring one that holds all six files at their exact sizes, and of those one that
/// `speedrun download` wrote (with its checksums).
pub fn batches_dir(dir: &Path) -> Option<PathBuf> {
    let candidates = [dir.to_path_buf(), dir.join(ARCHIVE_FOLDER)];
    let has_any = |d: &&PathBuf| d.join(TEST_FILE).is_file() || d.join(TRAIN_FILES[0]).is_file();
    let downloaded = |d: &&PathBuf| all_files_sized(d) && d.join(CHECKSUMS).is_file();
    candidates
        .iter()
        .find(downloaded)
        .or_else(|| candidates.iter().find(|d| all_files_sized(d)))
        .or_else(|| candidates.iter().find(has_any))
        .cloned()
}

fn all_files_sized(d: &Path) -> bool {
    TRAIN_FILES
        .iter()
        .chain([&TEST_FILE])
        .all(|f| std::fs::metadata(d.join(f)).is_ok_and(|m| m.len() == (RECORD * RECORDS_PER_FILE) as u64))
}

/// Whether `dir` holds all six files at their exact sizes (a cheap check; `load` also
/// validates the labels).
pub fn is_complete(dir: &Path) -> bool {
    batches_dir(dir).is_some_and(|d| all_files_sized(&d))
}

fn fix_hint(dir: &Path) -> String {
    format!(
        "run `speedrun download --data-dir {}` to fetch CIFAR-10 (it checks a copy already there and replaces a damaged one), or point --data-dir (or SPEEDRUN_DATA) at a folder holding the CIFAR-10 binary version",
        dir.display()
    )
}

/// The bytes of one batch file, read only if it is a regular file (not a device or a FIFO
/// behind a name or a symlink) and never more than one byte past the expected size.
pub fn read_batch_bytes(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let expected = RECORD * RECORDS_PER_FILE;
    // Checked before opening: opening a FIFO would wait for a writer.
    let cannot_read = || format!("cannot read CIFAR-10 file {}", path.display());
    let meta = std::fs::metadata(path).with_context(cannot_read)?;
    if !meta.is_file() {
        bail!("CIFAR-10 file {} is not a regular file (a device, a FIFO or a folder, possibly behind a symlink)", path.display());
    }
    let mut bytes = Vec::with_capacity(expected + 1);
    std::fs::File::open(path).and_then(|f| f.take(expected as u64 + 1).read_to_end(&mut bytes)).with_context(cannot_read)?;
    match bytes.len() {
        n if n < expected => bail!(
            "CIFAR-10 file {} is {n} bytes, expected {expected} (10,000 records of 3,073 bytes): it is truncated or not a CIFAR-10 binary batch",
            path.display()
        ),
        n if n > expected => bail!(
            "CIFAR-10 file {} is longer than the {expected} bytes of a CIFAR-10 batch (10,000 records of 3,073 bytes): it is not one",
            path.display()
        ),
        _ => Ok(bytes),
    }
}

/// Reads one batch file and checks it (its size, every label 0..9), returning its bytes.
pub fn check_batch(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_batch_bytes(path)?;
    if let Some(i) = bytes.chunks_exact(RECORD).position(|rec| rec[0] > 9) {
        bail!("CIFAR-10 file {} is corrupt: record {i} has label {} (labels are 0..9)", path.display(), bytes[i * RECORD]);
    }
    Ok(bytes)
}

/// Reads and validates one batch file, appending its images (as NHWC) and labels.
fn read_file(path: &Path, data_dir: &Path, out: &mut Split) -> Result<()> {
    let bytes = read_batch_bytes(path).map_err(|e| anyhow::anyhow!("{e:#}; {}", fix_hint(data_dir)))?;
    parse_records(&bytes, out).map_err(|e| anyhow::anyhow!("CIFAR-10 file {} is corrupt: {e}; {}", path.display(), fix_hint(data_dir)))
}

/// Appends whole records (a label byte, then the R, G and B planes) as NHWC images. Fails
/// on a partial record or a label outside 0..9.
pub fn parse_records(bytes: &[u8], out: &mut Split) -> Result<()> {
    if !bytes.len().is_multiple_of(RECORD) {
        bail!("{} bytes is not a whole number of {RECORD}-byte records", bytes.len());
    }
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] > 9 {
            bail!("record {i} has label {} (labels are 0..9)", rec[0]);
        }
        out.labels.push(rec[0]);
        let planes = &rec[1..];
        out.pixels.extend((0..1024).flat_map(|p| [planes[p], planes[1024 + p], planes[2048 + p]]));
    }
    Ok(())
}

/// Loads `files` from `dir`, stopping once `limit` images are read.
fn load_files(dir: &Path, files: &[&str], limit: Option<usize>) -> Result<Split> {
    if dir.is_file() {
        bail!("the data folder {} is a file, not a folder: point --data-dir (or SPEEDRUN_DATA) at a folder", dir.display());
    }
    let batches = batches_dir(dir).with_context(|| format!("no CIFAR-10 data in {}: {}", dir.display(), fix_hint(dir)))?;
    let mut split = Split { pixels: Vec::new(), labels: Vec::new() };
    for f in files {
        if limit.is_some_and(|l| split.len() >= l) {
            break;
        }
        read_file(&batches.join(f), dir, &mut split)?;
    }
    if let Some(l) = limit {
        split.truncate(l);
    }
    Ok(split)
}

pub fn load_train(dir: &Path, limit: Option<usize>) -> Result<Split> {
    load_files(dir, &TRAIN_FILES, limit)
}

pub fn load_test(dir: &Path, limit: Option<usize>) -> Result<Split> {
    load_files(dir, &[TEST_FILE], limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_batch(dir: &Path, name: &str, label: impl Fn(usize) -> u8) {
        let mut bytes = vec![0u8; RECORD * RECORDS_PER_FILE];
        for (i, rec) in bytes.chunks_exact_mut(RECORD).enumerate() {
            rec[0] = label(i);
            rec[1] = i as u8; // R of pixel 0
            rec[1 + 1024] = 100; // G of pixel 0
            rec[1 + 2048 + 1023] = 200; // B of the last pixel
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    #[test]
    fn loads_nhwc_finds_subfolder_and_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let sub = tmp.path().join(ARCHIVE_FOLDER);
        std::fs::create_dir(&sub).unwrap();
        write_batch(&sub, TEST_FILE, |i| (i % 10) as u8);
        let split = load_test(tmp.path(), Some(25)).unwrap();
        assert_eq!(split.len(), 25);
        assert_eq!(split.pixels.len(), 25 * 3072);
        assert_eq!(split.labels[13], 3);
        let img = &split.pixels[7 * 3072..8 * 3072];
        assert_eq!(&img[..3], &[7, 100, 0]);
        assert_eq!(img[3071], 200);
    }

    #[test]
    fn bad_files_are_clean_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load_test(tmp.path(), None).unwrap_err().to_string();
        assert!(err.contains("no CIFAR-10 data") && err.contains("speedrun download"), "{err}");
        write_batch(tmp.path(), TEST_FILE, |i| if i == 4321 { 10 } else { 1 });
        let err = load_test(tmp.path(), None).unwrap_err().to_string();
        assert!(err.contains("record 4321 has label 10") && err.contains("--data-dir"), "{err}");
        let path = tmp.path().join(TEST_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = load_test(tmp.path(), None).unwrap_err().to_string();
        assert!(err.contains("truncated") && err.contains(TEST_FILE), "{err}");
        assert!(!is_complete(tmp.path()));
        let err = load_train(tmp.path(), None).unwrap_err().to_string();
        assert!(err.contains("data_batch_1.bin") && err.contains("speedrun download"), "{err}");
    }
}
