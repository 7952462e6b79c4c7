//! `speedrun web`: serves the browser demo (`web/`, with the `web/pkg/` that `web/build.sh`
//! builds) and the CIFAR-10 files on 127.0.0.1. Static GET requests only, a thread per
//! connection; `/data/files.json` lists the CIFAR-10 files the page can fetch from `/data/`.
//!
//! Bounded against careless and hostile clients: a request's head (request line and headers)
//! may take `MAX_HEAD` bytes and must arrive within `HEAD_TIMEOUT` (a connection that sent
//! nothing by then is closed without an answer); a client that stops reading a reply is
//! dropped after `WRITE_TIMEOUT`; at most `MAX_CONNECTIONS` are served at once (more get 503 at
//! once); and only requests whose `Host` is a loopback name are answered, so a web page cannot
//! reach the server through DNS rebinding.
//!
//! A small HTTP crate was considered instead (tiny_http 0.12, the usual choice): it reads a
//! header line without a length limit, sets no socket timeouts and grows its thread pool with
//! the connections, so it would need the same bounds around it; this server is small enough
//! to carry them itself.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DATA_FILES: [&str; 6] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin", "test_batch.bin"];

/// The most bytes of a request's head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// The time a client has to send a request's head after connecting.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The time one write of a reply may wait for a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves until killed. `data` is the folder holding the CIFAR-10 `.bin` files, if any.
pub fn serve(site: &Path, data: Option<PathBuf>, port: u16) -> Result<()> {
    if !site.join("index.html").is_file() {
        bail!("no web page in {} (pass --site, the web/ folder of the speedrun sources)", site.display());
    }
    if !site.join("pkg/speedrun_bg.wasm").is_file() {
        bail!("{} has no pkg/speedrun_bg.wasm: build it with web/build.sh", site.display());
    }
    let listener =
        TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("cannot listen on 127.0.0.1:{port} (pick another --port)"))?;
    let port = listener.local_addr()?.port();
    match &data {
        Some(d) => crate::cli::out!("serving CIFAR-10 from {}", d.display()),
        None => crate::cli::out!("no CIFAR-10 here (run `speedrun download`); the page can also open cifar-10-binary.tar.gz"),
    }
    crate::cli::out!("speedrun web: open http://127.0.0.1:{port}/ in a browser with WebGPU (Ctrl-C stops)");
    let open = Arc::new(AtomicUsize::new(0));
    for mut stream in listener.incoming().flatten() {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            // Answered here, without a thread: the reply fits in the socket's buffer.
            let _ = reply(&mut stream, "503 Service Unavailable", "text/plain", b"too many connections; try again\n");
            continue;
        }
        let (site, data) = (site.to_path_buf(), data.clone());
        let slot = Slot::take(&open);
        std::thread::spawn(move || {
            let _slot = slot;
            let _ = respond(stream, &site, data.as_deref()); // a dropped connection is the client's business
        });
    }
    Ok(())
}

/// One of the `MAX_CONNECTIONS`, given back when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Slot {
        open.fetch_add(1, Ordering::SeqCst);
        Slot(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a request's head could not be read.
enum HeadError {
    TooLarge,
    /// With the bytes received by then.
    TimedOut(usize),
    Io,
}

/// Reads a request's head (up to the blank line) within `MAX_HEAD` bytes and `HEAD_TIMEOUT`.
/// Whatever follows the head is ignored: only GET is served, and a GET has no body.
fn read_head(stream: &mut TcpStream) -> std::result::Result<String, HeadError> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TimedOut(head.len()));
        }
        stream.set_read_timeout(Some(left)).map_err(|_| HeadError::Io)?;
        let n = match stream.read(&mut buf[..(MAX_HEAD + 1 - head.len()).min(4096)]) {
            Ok(0) => return Err(HeadError::Io),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(HeadError::TimedOut(head.len()))
            }
            Err(_) => return Err(HeadError::Io),
        };
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head[searched_from..].windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(searched_from + end);
            return Ok(String::from_utf8_lossy(&head).into_owned());
        }
        // A bare-LF client (`printf 'GET / HTTP/1.0\n\n'`) is still a client.
        if let Some(end) = head[searched_from..].windows(2).position(|w| w == b"\n\n") {
            head.truncate(searched_from + end);
            return Ok(String::from_utf8_lossy(&head).into_owned());
        }
        if head.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Whether a `Host` header names this machine's loopback interface (any port).
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name == "::1" || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

fn respond(mut stream: TcpStream, site: &Path, data: Option<&Path>) -> std::io::Result<()> {
    let head = match read_head(&mut stream) {
        Ok(head) => head,
        Err(HeadError::TooLarge) => {
            let body = format!("the request line and headers may take at most {MAX_HEAD} bytes\n");
            return reject(&mut stream, "431 Request Header Fields Too Large", body.as_bytes());
        }
        // A connection that never sent a byte (a browser's spare) is closed without a word.
        Err(HeadError::TimedOut(0)) => return Ok(()),
        Err(HeadError::TimedOut(_)) => {
            let body = format!("no complete request within {} s\n", HEAD_TIMEOUT.as_secs());
            return reject(&mut stream, "408 Request Timeout", body.as_bytes());
        }
        Err(HeadError::Io) => return Ok(()),
    };
    let mut lines = head.lines();
    let request = lines.next().unwrap_or("");
    let host = lines.filter_map(|l| l.split_once(':')).find(|(name, _)| name.trim().eq_ignore_ascii_case("host")).map(|(_, v)| v.trim());
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = path.split('?').next().unwrap_or("/");
    if !host.is_some_and(loopback_host) {
        return reply(&mut stream, "403 Forbidden", "text/plain", b"this server answers only requests for 127.0.0.1, localhost or [::1]\n");
    }
    if method != "GET" {
        return reply(&mut stream, "405 Method Not Allowed", "text/plain", b"GET only\n");
    }
    if path == "/data/files.json" {
        let files: Vec<&str> = DATA_FILES.iter().copied().filter(|f| data.is_some_and(|d| d.join(f).is_file())).collect();
        return reply(&mut stream, "200 OK", "application/json", serde_json::json!({ "files": files }).to_string().as_bytes());
    }
    let file = match path.strip_prefix("/data/") {
        Some(name) if DATA_FILES.contains(&name) => data.map(|d| d.join(name)),
        Some(_) => None,
        None => site_file(site, path),
    };
    match file.and_then(|f| std::fs::File::open(&f).ok().map(|h| (f, h))) {
        Some((f, handle)) => {
            let len = handle.metadata()?.len();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
                content_type(&f)
            )?;
            std::io::copy(&mut handle.take(len), &mut stream)?;
            Ok(())
        }
        None => reply(&mut stream, "404 Not Found", "text/plain", b"not found\n"),
    }
}

/// Answers a request that was not read to its end, then reads (and drops) a little of what the
/// client still sends, so that closing does not reset the connection before the answer is read.
fn reject(stream: &mut TcpStream, status: &str, body: &[u8]) -> std::io::Result<()> {
    reply(stream, status, "text/plain", body)?;
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = std::io::copy(&mut stream.take(1 << 20), &mut std::io::sink());
    Ok(())
}

/// The file under `site` for a URL path; None for anything that could leave it.
fn site_file(site: &Path, path: &str) -> Option<PathBuf> {
    let rel = if path == "/" { "index.html" } else { path.trim_start_matches('/') };
    let safe = rel
        .split('/')
        .all(|c| !c.is_empty() && !c.starts_with('.') && c.chars().all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch)));
    safe.then(|| site.join(rel)).filter(|p| p.is_file())
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript",
        Some("css") => "text/css",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

fn reply(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8]) -> std::io::Result<()> {
    write!(stream, "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    stream.write_all(body)
}
