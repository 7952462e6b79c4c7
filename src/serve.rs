//! `speedrun web`: serves the browser demo (`web/`, with the `web/pkg/` that `web/build.sh`
//! builds) and the CIFAR-10 files on 127.0.0.1. Static GET requests only, a thread per
//! connection; `/data/files.json` lists the CIFAR-10 files the page can fetch from `/data/`.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

const DATA_FILES: [&str; 6] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin", "test_batch.bin"];

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
        Some(d) => println!("serving CIFAR-10 from {}", d.display()),
        None => println!("no CIFAR-10 here (run `speedrun download`); the page can also open cifar-10-binary.tar.gz"),
    }
    println!("speedrun web: open http://127.0.0.1:{port}/ in a browser with WebGPU (Ctrl-C stops)");
    std::io::stdout().flush()?;
    for stream in listener.incoming().flatten() {
        let (site, data) = (site.to_path_buf(), data.clone());
        std::thread::spawn(move || {
            let _ = respond(stream, &site, data.as_deref()); // a dropped connection is the client's business
        });
    }
    Ok(())
}

fn respond(mut stream: TcpStream, site: &Path, data: Option<&Path>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear(); // headers are not needed
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = path.split('?').next().unwrap_or("/");
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
        Some((f, mut handle)) => {
            let len = handle.metadata()?.len();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
                content_type(&f)
            )?;
            std::io::copy(&mut handle, &mut stream)?;
            Ok(())
        }
        None => reply(&mut stream, "404 Not Found", "text/plain", b"not found\n"),
    }
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
