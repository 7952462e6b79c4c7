//! The start-up cache: what the CUDA backend would otherwise redo in every process — NVRTC's
//! PTX of each kernel family, cuDNN's timed choice of algorithm for each convolution — kept
//! on disk in the per-user cache folder (`~/.cache/speedrun/cuda` on Linux, or
//! `$SPEEDRUN_CACHE`), so a second process neither compiles nor times again.
//!
//! One file per entry, named by the SHA-256 of its key; the key says everything the value
//! depends on (for PTX: the source's hash, the architecture, NVRTC's version and the options;
//! for an algorithm: the GPU, cuDNN's version, the shape, the pass and the math). A file holds
//! its key and its payload's SHA-256, so an entry that is truncated, garbled or under another
//! key is rebuilt and overwritten, never trusted. Entries are written to a temporary file and
//! renamed, so a crash, a full disk or another process writing the same entry leaves no half
//! file; a cache that cannot be written costs only the time it would have saved. Past
//! `MAX_BYTES`, the least recently used entries are deleted (every edit of a kernel source
//! adds its family's PTX anew).

use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The first bytes of every entry (bumped if the format changes: old entries then read as corrupt).
const MAGIC: &[u8; 8] = b"spdrun1\n";
/// Bytes before the key: magic, key length, payload length (u64 LE each), payload SHA-256.
const HEADER: usize = 8 + 8 + 8 + 32;
/// The most bytes of entries kept: one build's kernels are about 130 KB of PTX and its cuDNN
/// choices a few KB, so this holds many builds and GPUs.
const MAX_BYTES: u64 = 64 << 20;

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit(Vec<u8>),
    Miss,
    /// A file is there but is not a whole entry for this key: it will be rebuilt.
    Corrupt,
}

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cached,
    Built,
}

pub struct DiskCache {
    /// None: caching is off (`SPEEDRUN_CACHE=off`, or no cache folder on this system).
    dir: Option<PathBuf>,
    /// Whether a failed write was reported (once per process is enough).
    warned: Cell<bool>,
}

impl DiskCache {
    /// The folder `$SPEEDRUN_CACHE` names (`off`: no caching), else the per-user cache folder's
    /// `speedrun/cuda`.
    pub fn open() -> DiskCache {
        let dir = match std::env::var_os("SPEEDRUN_CACHE") {
            Some(v) if v == "off" => None,
            Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
            _ => dirs::cache_dir().map(|d| d.join("speedrun").join("cuda")),
        };
        DiskCache { dir, warned: Cell::new(false) }
    }

    pub fn at(dir: &Path) -> DiskCache {
        DiskCache { dir: Some(dir.to_path_buf()), warned: Cell::new(false) }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Entries and their bytes in the folder, for `speedrun info`.
    pub fn usage(&self) -> (usize, u64) {
        let entries = self.entries();
        (entries.len(), entries.iter().map(|e| e.1).sum())
    }

    /// Every entry file: (path, bytes, last used).
    fn entries(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let files = self.dir.as_deref().and_then(|d| std::fs::read_dir(d).ok()).into_iter().flatten().flatten();
        files
            .filter(|f| f.file_name().to_string_lossy().ends_with(".entry"))
            .filter_map(|f| f.metadata().ok().map(|m| (f.path(), m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH))))
            .collect()
    }

    /// Deletes the least recently used entries until the rest take at most `max_bytes`.
    fn prune(&self, max_bytes: u64) {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort_by_key(|e| e.2);
        for (path, bytes, _) in entries {
            if total <= max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= bytes;
            }
        }
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{}.entry", crate::download::sha256_hex(key.as_bytes()))))
    }

    pub fn get(&self, key: &str) -> Lookup {
        let Some(path) = self.path(key) else { return Lookup::Miss };
        let Ok(bytes) = std::fs::read(&path) else { return Lookup::Miss };
        let Some(payload) = parse(&bytes, key) else { return Lookup::Corrupt };
        // Marked as just used, for `prune` (where the folder cannot be written, it stays as it was).
        let _ = std::fs::File::options().append(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
        Lookup::Hit(payload.to_vec())
    }

    /// Stores `payload` under `key`, replacing whatever was there.
    pub fn put(&self, key: &str, payload: &[u8]) -> std::io::Result<()> {
        let (Some(dir), Some(path)) = (self.dir.as_ref(), self.path(key)) else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        let mut bytes = Vec::with_capacity(HEADER + key.len() + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(payload));
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(payload);
        // A name no other process or thread writes to, renamed over the entry when complete.
        let tmp = path.with_extension(format!("{}.{:?}.tmp", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
        crate::checkpoint::write_atomically(&bytes, &tmp, &path)
    }

    /// The value under `key`, else `build`'s, stored for next time. A corrupt entry is rebuilt;
    /// a failed write is reported once on stderr and otherwise ignored.
    pub fn get_or_build<E>(&self, key: &str, build: impl FnOnce() -> Result<Vec<u8>, E>) -> Result<(Vec<u8>, Source), E> {
        if let Lookup::Hit(payload) = self.get(key) {
            return Ok((payload, Source::Cached));
        }
        let payload = build()?;
        self.store(key, &payload);
        Ok((payload, Source::Built))
    }

    /// `put` (then `prune`), with a failure reported once on stderr and otherwise ignored.
    pub fn store(&self, key: &str, payload: &[u8]) {
        let stored = self.put(key, payload);
        if stored.is_ok() {
            self.prune(MAX_BYTES);
        }
        if let Err(e) = stored {
            if !self.warned.replace(true) {
                let dir = self.dir.as_deref().map_or_else(String::new, |d| d.display().to_string());
                eprintln!(
                    "note: cannot write the CUDA start-up cache in {dir} ({e}); set SPEEDRUN_CACHE to a writable folder, or to `off`"
                );
            }
        }
    }
}

/// The payload of entry `bytes` if it is a whole, intact entry for `key`.
fn parse<'a>(bytes: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let header = bytes.get(..HEADER)?;
    let len = |at: usize| usize::try_from(u64::from_le_bytes(header[at..at + 8].try_into().ok()?)).ok();
    let (key_len, payload_len) = (len(8)?, len(16)?);
    let body = &bytes[HEADER..];
    let whole = header[..8] == MAGIC[..] && key_len.checked_add(payload_len) == Some(body.len());
    let (stored_key, payload) = body.split_at_checked(key_len).filter(|_| whole)?;
    (stored_key == key.as_bytes() && Sha256::digest(payload)[..] == header[24..HEADER]).then_some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `get_or_build` on `cache`, counting the builds in `builds`.
    fn fetch(cache: &DiskCache, key: &str, value: &[u8], builds: &mut usize) -> (Vec<u8>, Source) {
        cache
            .get_or_build(key, || {
                *builds += 1;
                Ok::<_, ()>(value.to_vec())
            })
            .unwrap()
    }

    #[test]
    fn a_miss_builds_and_stores_then_a_hit_does_not_build() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(&dir.path().join("new folder"));
        let mut builds = 0;
        assert_eq!(cache.get("ptx a"), Lookup::Miss);
        assert_eq!(fetch(&cache, "ptx a", b"PTX of a", &mut builds), (b"PTX of a".to_vec(), Source::Built));
        assert_eq!(fetch(&cache, "ptx a", b"never built", &mut builds), (b"PTX of a".to_vec(), Source::Cached));
        // Another process (a new handle on the same folder) finds it too.
        assert_eq!(DiskCache::at(cache.dir().unwrap()).get("ptx a"), Lookup::Hit(b"PTX of a".to_vec()));
        assert_eq!(builds, 1);
        assert_eq!(cache.usage().0, 1, "one entry, no temporary file left behind");
        assert_eq!(std::fs::read_dir(cache.dir().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_changed_version_in_the_key_is_a_miss_beside_the_old_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(dir.path());
        let mut builds = 0;
        fetch(&cache, "family norm\narch sm_90\nnvrtc 13.0", b"old", &mut builds);
        assert_eq!(cache.get("family norm\narch sm_90\nnvrtc 13.1"), Lookup::Miss);
        assert_eq!(fetch(&cache, "family norm\narch sm_90\nnvrtc 13.1", b"new", &mut builds).1, Source::Built);
        assert_eq!(cache.get("family norm\narch sm_90\nnvrtc 13.0"), Lookup::Hit(b"old".to_vec()));
        assert_eq!((builds, cache.usage().0), (2, 2));
    }

    #[test]
    fn a_corrupt_entry_is_rebuilt_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(dir.path());
        let mut builds = 0;
        fetch(&cache, "key", b"the payload", &mut builds);
        let path = cache.path("key").unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1; // one payload bit
        let mut long_key = good.clone();
        long_key[8] += 1; // the key's length
        let other = {
            fetch(&cache, "other key", b"the payload", &mut builds);
            std::fs::read(cache.path("other key").unwrap()).unwrap()
        };
        let damaged: [(&str, Vec<u8>); 6] = [
            ("truncated", good[..good.len() - 3].to_vec()),
            ("a byte appended", [&good[..], b"x"].concat()),
            ("a payload bit flipped", flipped),
            ("a wrong key length", long_key),
            ("another key's entry", other),
            ("empty", Vec::new()),
        ];
        for (what, bytes) in damaged {
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(cache.get("key"), Lookup::Corrupt, "{what}");
            let before = builds;
            assert_eq!(fetch(&cache, "key", b"the payload", &mut builds), (b"the payload".to_vec(), Source::Built), "{what}");
            assert_eq!(builds, before + 1, "{what}: rebuilt");
            assert_eq!(std::fs::read(&path).unwrap(), good, "{what}: overwritten with a whole entry");
        }
    }

    #[test]
    fn the_least_recently_used_entries_go_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(dir.path());
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            cache.put(key, &[0; 1000]).unwrap();
            // Written long ago, a first, c last.
            let written = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 * (i as u64 + 1));
            std::fs::File::options().append(true).open(cache.path(key).unwrap()).unwrap().set_modified(written).unwrap();
        }
        assert!(matches!(cache.get("a"), Lookup::Hit(_)), "a used now: the most recent");
        let (n, bytes) = cache.usage();
        assert_eq!(n, 3);
        cache.prune(bytes);
        assert_eq!(cache.usage(), (3, bytes), "within the limit: nothing goes");
        cache.prune(bytes - 1);
        assert_eq!(cache.get("b"), Lookup::Miss, "b, the least recently used, went first");
        cache.prune(bytes / 3);
        assert_eq!((cache.get("c"), cache.usage().0), (Lookup::Miss, 1), "then c");
        assert!(matches!(cache.get("a"), Lookup::Hit(_)));
    }

    #[test]
    fn an_unwritable_cache_still_gives_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a file");
        std::fs::write(&file, b"not a folder").unwrap();
        let cache = DiskCache::at(&file.join("cuda"));
        let mut builds = 0;
        assert!(cache.put("key", b"v").is_err());
        assert_eq!(fetch(&cache, "key", b"v", &mut builds), (b"v".to_vec(), Source::Built));
        assert_eq!(fetch(&cache, "key", b"v", &mut builds), (b"v".to_vec(), Source::Built));
        assert_eq!(builds, 2);
        let off = DiskCache { dir: None, warned: Cell::new(false) };
        assert_eq!(fetch(&off, "key", b"v", &mut builds).1, Source::Built);
        assert_eq!(off.usage(), (0, 0));
    }
}
