//! Where the data-dependent tests find CIFAR-10 (`common::find_cifar`), so that a fresh clone
//! anywhere passes them: `$SPEEDRUN_TEST_DATA`, else the shared JPEG-derived copy (unpacked once),
//! else the real CIFAR-10 in speedrun's data folder (the per-user cache), fetched there with
//! speedrun's own MD5-checked download when it is missing. Every place is a temporary folder, and
//! the "download" comes from a server on 127.0.0.1 with an archive built here.

mod common;

use common::{find_cifar, DataPlaces};
use speedrun::data::{RECORD, RECORDS_PER_FILE, TEST_FILE, TRAIN_FILES};
use speedrun::download::Source;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::OnceLock;

/// Six CIFAR-10-sized files in `dir` (sparse: sizes are what `is_complete` checks).
fn fake_copy(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        std::fs::File::create(dir.join(name)).unwrap().set_len((RECORD * RECORDS_PER_FILE) as u64).unwrap();
    }
}

/// A shared folder whose `cifar10-jpeg/unpack.sh DEST` writes a (sparse) copy into DEST, or fails.
fn fake_shared(root: &Path, works: bool) -> std::path::PathBuf {
    let shared = root.join("shared");
    std::fs::create_dir_all(shared.join("cifar10-jpeg")).unwrap();
    let files: Vec<&str> = TRAIN_FILES.iter().chain([&TEST_FILE]).copied().collect();
    let body = if works {
        format!("set -e\nfor f in {}; do truncate -s {} \"$1/$f\"; done\n", files.join(" "), RECORD * RECORDS_PER_FILE)
    } else {
        "exit 1\n".to_string()
    };
    std::fs::write(shared.join("cifar10-jpeg/unpack.sh"), body).unwrap();
    shared
}

/// A source that must not be used: nothing listens at its port.
fn unused_source() -> Source {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(); // closed again at once
    Source { url: format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz"), md5: "0".repeat(32), size: None }
}

fn places(root: &Path, test_data: Option<&Path>, shared: std::path::PathBuf, source: Source) -> DataPlaces {
    DataPlaces {
        test_data: test_data.map(Path::to_path_buf),
        shared,
        unpacked: root.join("target/test-data"),
        cache: root.join("cache/speedrun/cifar10"),
        source,
    }
}

#[test]
fn speedrun_test_data_comes_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mine = tmp.path().join("mine");
    let shared = fake_shared(tmp.path(), true);
    fake_copy(&tmp.path().join("cache/speedrun/cifar10"));
    let (dir, what) = find_cifar(&places(tmp.path(), Some(&mine), shared, unused_source()));
    assert_eq!((dir, what), (mine, "$SPEEDRUN_TEST_DATA"));
    assert!(!tmp.path().join("target/test-data/cifar10").exists(), "the shared copy was unpacked although not needed");
}

#[test]
fn the_shared_copy_is_unpacked_once_and_preferred_to_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = fake_shared(tmp.path(), true);
    fake_copy(&tmp.path().join("cache/speedrun/cifar10"));
    let want = tmp.path().join("target/test-data/cifar10");
    let (dir, what) = find_cifar(&places(tmp.path(), None, shared, unused_source()));
    assert_eq!(dir, want);
    assert!(what.contains("shared") && speedrun::data::is_complete(&dir), "{what}");
    // Unpacked: a shared folder that could no longer unpack is not asked again.
    let broken = fake_shared(&tmp.path().join("elsewhere"), false);
    assert_eq!(find_cifar(&places(tmp.path(), None, broken, unused_source())).0, want);
}

#[test]
fn without_a_shared_copy_the_cache_is_used_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache/speedrun/cifar10");
    fake_copy(&cache.join("cifar-10-batches-bin"));
    let (dir, what) = find_cifar(&places(tmp.path(), None, tmp.path().join("no-shared"), unused_source()));
    assert_eq!(dir, cache);
    assert_eq!(what, "the real CIFAR-10 in the data folder");
}

/// The speedrun-shaped archive (six files of 10,000 records, labels 0..9, pixels 0), gzipped.
fn archive() -> &'static [u8] {
    static ARCHIVE: OnceLock<Vec<u8>> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let batch: Vec<u8> =
            (0..RECORDS_PER_FILE).flat_map(|i| std::iter::once((i % 10) as u8).chain(std::iter::repeat_n(0, RECORD - 1))).collect();
        common::cifar_archive(&batch)
    })
}

/// Serves one request on 127.0.0.1: the archive with `status` 200, else an empty reply with it.
fn serve(status: u16) -> Source {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cifar-10-binary.tar.gz", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let body = if status == 200 { archive() } else { &[] };
        let reason = if status == 200 { "OK" } else { "Not Found" };
        let _ = write!(stream, "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        let _ = stream.write_all(body);
    });
    let md5 = {
        use md5::Digest;
        md5::Md5::digest(archive()).iter().map(|b| format!("{b:02x}")).collect()
    };
    Source { url, md5, size: Some(archive().len() as u64) }
}

#[test]
fn a_missing_cache_is_downloaded_and_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, what) = find_cifar(&places(tmp.path(), None, tmp.path().join("no-shared"), serve(200)));
    assert_eq!(dir, tmp.path().join("cache/speedrun/cifar10"));
    assert_eq!(what, "the real CIFAR-10, downloaded into the data folder");
    assert!(speedrun::data::is_complete(&dir));
    assert!(dir.join("cifar-10-batches-bin/SHA256SUMS").is_file(), "not written by speedrun's download");
    let test = speedrun::data::load_test(&dir, None).unwrap();
    assert_eq!(test.labels[..12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
}

#[test]
fn no_data_anywhere_is_a_failure_naming_the_fixes() {
    let tmp = tempfile::tempdir().unwrap();
    let places = places(tmp.path(), None, tmp.path().join("no-shared"), serve(404));
    let panic = std::panic::catch_unwind(|| find_cifar(&places)).expect_err("found data where there is none");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    for needle in [
        "HTTP 404",
        "no-shared/cifar10-jpeg/unpack.sh is missing",
        "cargo run --release -- download",
        "SPEEDRUN_CIFAR_URL",
        "SPEEDRUN_TEST_DATA",
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    assert!(!places.cache.join("cifar-10-batches-bin").exists(), "a failed download left data behind");
}
