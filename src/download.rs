//! `speedrun download`: fetches the official CIFAR-10 binary archive, verifies its MD5,
//! extracts it into a staging folder, checks the six files and records their SHA-256 (in
//! `cifar-10-batches-bin/SHA256SUMS`), and renames it into place, so an interrupted or
//! corrupt download never leaves anything that looks like valid data. Run again, it checks the
//! copy it finds (against those checksums, or every label where there are none) and replaces
//! a damaged one.

use crate::data::{self, ARCHIVE_FOLDER, CHECKSUMS};
use anyhow::{anyhow, bail, Context, Result};
use md5::{Digest, Md5};
use sha2::Sha256;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where to fetch the archive from, and what it must hash to.
pub struct Source {
    pub url: String,
    pub md5: String,
    /// The archive's size: a download is refused beyond it, and must reach it.
    pub size: Option<u64>,
}

pub const OFFICIAL_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

/// The official archive, fetched from `$SPEEDRUN_CIFAR_URL` (a mirror of the same file)
/// when that is set.
pub fn official() -> Source {
    let url = std::env::var("SPEEDRUN_CIFAR_URL").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| OFFICIAL_URL.to_string());
    Source { url, md5: "c32a1d4ab5d03f1284b67883e8d87530".into(), size: Some(170_052_171) }
}

const PART: &str = ".cifar-10-binary.tar.gz.part";
const STAGING: &str = ".extracting";

/// What `check_and_repair` found and did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The data was there and checked out.
    Present,
    /// There was none (or an incomplete copy); it was downloaded.
    Downloaded,
    /// A complete-looking copy was damaged (`problem`); a fresh one replaced it. `stale` is the
    /// folder whose damaged files stay behind, unused, when they were not the download's own.
    Repaired { problem: String, stale: Option<PathBuf> },
}

/// Makes sure `dir` holds CIFAR-10 (all six files at their sizes), downloading it when it
/// does not. Returns whether it downloaded.
pub fn ensure(dir: &Path, source: &Source, progress: bool) -> Result<bool> {
    check_folder(dir)?;
    if data::is_complete(dir) {
        return Ok(false);
    }
    eprintln!("CIFAR-10 not found in {}; downloading {}", dir.display(), source.url);
    download(dir, source, progress)?;
    Ok(true)
}

/// `speedrun download`: like `ensure`, but a copy that is there is also checked, against the
/// checksums recorded when it was downloaded or, for a copy from elsewhere, label by label,
/// and replaced by a fresh download when it is damaged.
pub fn check_and_repair(dir: &Path, source: &Source, progress: bool) -> Result<Outcome> {
    check_folder(dir)?;
    let Some(batches) = data::batches_dir(dir).filter(|_| data::is_complete(dir)) else {
        eprintln!("CIFAR-10 not found in {}; downloading {}", dir.display(), source.url);
        download(dir, source, progress)?;
        return Ok(Outcome::Downloaded);
    };
    let Err(problem) = verify(&batches) else { return Ok(Outcome::Present) };
    eprintln!("CIFAR-10 in {} is damaged: {problem}; downloading a fresh copy from {}", batches.display(), source.url);
    download(dir, source, progress).with_context(|| format!("the copy in {} stays as it was (damaged: {problem})", batches.display()))?;
    let stale = (batches != dir.join(ARCHIVE_FOLDER)).then_some(batches);
    Ok(Outcome::Repaired { problem, stale })
}

/// Checks the six files in `batches`: against its `SHA256SUMS` where `speedrun download`
/// wrote one, else each file's size and labels. The error says what is wrong.
pub fn verify(batches: &Path) -> std::result::Result<(), String> {
    let recorded = std::fs::read_to_string(batches.join(CHECKSUMS)).ok();
    for name in data::TRAIN_FILES.iter().chain([&data::TEST_FILE]) {
        let path = batches.join(name);
        let bytes = data::check_batch(&path).map_err(|e| format!("{e:#}"))?;
        if let Some(recorded) = &recorded {
            let want = recorded.lines().find_map(|l| l.strip_suffix(name).and_then(|h| h.strip_suffix("  "))).unwrap_or("");
            if sha256_hex(&bytes) != want {
                return Err(format!("{} does not match the SHA-256 recorded in {CHECKSUMS} when it was downloaded", path.display()));
            }
        }
    }
    Ok(())
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails, before anything is printed or fetched, when `dir` exists but is not a folder.
fn check_folder(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("the data folder {} is a file, not a folder: point --data-dir (or SPEEDRUN_DATA) at a folder", dir.display());
    }
    Ok(())
}

/// Downloads and extracts into `dir/cifar-10-batches-bin`, replacing an incomplete copy.
pub fn download(dir: &Path, source: &Source, progress: bool) -> Result<()> {
    check_folder(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data folder {}", dir.display()))?;
    let (part, staging) = (dir.join(PART), dir.join(STAGING));
    let cleanup = || {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_dir_all(&staging);
    };
    cleanup(); // leftovers of an interrupted earlier attempt
    let result = fetch_verify_extract(dir, source, progress);
    cleanup();
    result
}

fn fetch_verify_extract(dir: &Path, source: &Source, progress: bool) -> Result<()> {
    let (part, staging) = (dir.join(PART), dir.join(STAGING));
    let md5 = fetch(source, &part, progress)?;
    if md5 != source.md5 {
        bail!("the download from {} is corrupt: its MD5 is {md5}, expected {}; run `speedrun download` again", source.url, source.md5);
    }
    let archive = std::fs::File::open(&part)?;
    tar::Archive::new(flate2::read::GzDecoder::new(archive))
        .unpack(&staging)
        .with_context(|| format!("cannot extract {} into {} (is the disk full?)", source.url, staging.display()))?;
    let extracted = staging.join(ARCHIVE_FOLDER);
    if !data::is_complete(&extracted) {
        bail!("the archive from {} does not hold the six CIFAR-10 .bin files in {ARCHIVE_FOLDER}/", source.url);
    }
    // The files as extracted, checked and recorded: later runs of `speedrun download` check
    // the copy against these sums.
    let mut sums = String::new();
    for name in data::TRAIN_FILES.iter().chain([&data::TEST_FILE]) {
        let bytes = data::check_batch(&extracted.join(name)).with_context(|| format!("the archive from {} is not CIFAR-10", source.url))?;
        sums += &format!("{}  {name}\n", sha256_hex(&bytes));
    }
    std::fs::write(extracted.join(CHECKSUMS), sums).with_context(|| format!("cannot write {} (is the disk full?)", extracted.display()))?;
    let target = dir.join(ARCHIVE_FOLDER);
    if target.exists() {
        std::fs::remove_dir_all(&target).with_context(|| format!("cannot replace the old {}", target.display()))?;
    }
    std::fs::rename(&extracted, &target).with_context(|| format!("cannot move the data into {}", target.display()))?;
    Ok(())
}

/// Streams `source.url` into `part`, returning the hex MD5 of what was received. Never writes
/// more than `source.size` bytes, whatever the server sends or announces.
fn fetch(source: &Source, part: &Path, progress: bool) -> Result<String> {
    // A stalled connection fails instead of hanging; a slow but live one may take its time.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let response = agent.get(&source.url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => anyhow!(
            "cannot download {}: the server answered HTTP {code}{}",
            source.url,
            if source.url == OFFICIAL_URL {
                " (the file may have moved: set SPEEDRUN_CIFAR_URL to a mirror of cifar-10-binary.tar.gz)"
            } else {
                " (is SPEEDRUN_CIFAR_URL the address of a mirror of cifar-10-binary.tar.gz?)"
            }
        ),
        other => anyhow!(
            "cannot download {} ({other}: no internet connection?); without internet, copy CIFAR-10's binary files \
             (cifar-10-binary.tar.gz, unpacked) into a folder and pass --data-dir DIR or set SPEEDRUN_DATA=DIR, \
             or set SPEEDRUN_CIFAR_URL to a mirror of the archive that this machine can reach",
            source.url
        ),
    })?;
    let announced = response.body().content_length();
    if let (Some(announced), Some(size)) = (announced, source.size) {
        if announced != size {
            bail!("{} announces {announced} bytes, but cifar-10-binary.tar.gz is {size} bytes: it is not a mirror of it", source.url);
        }
    }
    let total = announced.or(source.size);
    let mut reader = response.into_body().into_reader();
    let mut file = std::io::BufWriter::new(std::fs::File::create(part).with_context(|| format!("cannot write {}", part.display()))?);
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let (mut received, mut shown) = (0u64, 0u64);
    loop {
        let n =
            reader.read(&mut buf).with_context(|| format!("the download from {} was interrupted after {received} bytes", source.url))?;
        if n == 0 {
            break;
        }
        if let Some(size) = source.size.filter(|&s| received + n as u64 > s) {
            bail!("{} sent more than the {size} bytes of cifar-10-binary.tar.gz: it is not a mirror of it; stopped there", source.url);
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).with_context(|| format!("cannot write {} (is the disk full?)", part.display()))?;
        received += n as u64;
        if progress && received - shown >= 1 << 21 {
            shown = received;
            print_progress(received, total);
        }
    }
    file.flush().with_context(|| format!("cannot write {} (is the disk full?)", part.display()))?;
    if progress {
        print_progress(received, total);
        eprintln!();
    }
    if let Some(size) = source.size.filter(|&s| s != received) {
        bail!("the download from {} is incomplete: got {received} bytes, expected {size}; run `speedrun download` again", source.url);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn print_progress(received: u64, total: Option<u64>) {
    let mb = |b: u64| b as f64 / 1e6;
    match total {
        Some(t) if t > 0 => {
            let frac = (received as f64 / t as f64).min(1.0);
            let bar = (frac * 30.0) as usize;
            eprint!("\r[{}{}] {:5.1}%  {:.1}/{:.1} MB", "#".repeat(bar), " ".repeat(30 - bar), 100.0 * frac, mb(received), mb(t));
        }
        _ => eprint!("\r{:.1} MB", mb(received)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one HTTP response on 127.0.0.1: `declared` as Content-Length, `body` as sent.
    fn serve_once(body: Vec<u8>, declared: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/cifar-10-binary.tar.gz", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        });
        url
    }

    /// A tar.gz laid out like the official archive, with full-size (all-zero) batch files.
    fn archive() -> Vec<u8> {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let file = vec![0u8; data::RECORD * data::RECORDS_PER_FILE];
        for name in data::TRAIN_FILES.iter().chain([&data::TEST_FILE]) {
            let mut header = tar::Header::new_gnu();
            header.set_size(file.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("{ARCHIVE_FOLDER}/{name}"), &file[..]).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    fn md5_hex(bytes: &[u8]) -> String {
        Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
    }

    #[test]
    fn downloads_verifies_and_extracts() {
        let bytes = archive();
        let md5 = md5_hex(&bytes);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cifar");
        let url = serve_once(bytes.clone(), bytes.len());
        let source = Source { url, md5, size: Some(bytes.len() as u64) };
        // A truncated file left at the top of the folder does not shadow the download.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(data::TEST_FILE), [1u8; 100]).unwrap();
        assert!(ensure(&dir, &source, false).unwrap());
        assert!(data::is_complete(&dir));
        let mut left = leftovers(&dir);
        left.sort();
        assert_eq!(left, vec![ARCHIVE_FOLDER.to_string(), data::TEST_FILE.to_string()]);
        assert_eq!(data::load_test(&dir, None).unwrap().len(), 10_000);
        // Already present: nothing is fetched (no server is listening any more).
        assert!(!ensure(&dir, &source, false).unwrap());
    }

    #[test]
    fn checksum_mismatch_leaves_nothing() {
        let bytes = archive();
        let tmp = tempfile::tempdir().unwrap();
        let url = serve_once(bytes.clone(), bytes.len());
        let source = Source { url, md5: "00000000000000000000000000000000".into(), size: None };
        let err = format!("{:#}", download(tmp.path(), &source, false).unwrap_err());
        assert!(err.contains("corrupt") && err.contains("MD5"), "{err}");
        assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));
        assert!(!data::is_complete(tmp.path()));
    }

    #[test]
    fn truncated_transfer_leaves_nothing() {
        let bytes = archive();
        let md5 = md5_hex(&bytes);
        let tmp = tempfile::tempdir().unwrap();
        let url = serve_once(bytes[..bytes.len() / 2].to_vec(), bytes.len());
        let source = Source { url, md5, size: Some(bytes.len() as u64) };
        let err = format!("{:#}", download(tmp.path(), &source, false).unwrap_err());
        assert!(err.contains("interrupted") || err.contains("incomplete"), "{err}");
        assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));
    }
}
