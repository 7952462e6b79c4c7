//! Bakes the sources' git commit into the build as `SPEEDRUN_GIT_COMMIT` (JSON rows and
//! `speedrun stats` report it): `$SPEEDRUN_GIT_COMMIT` if set, else `git rev-parse --short HEAD`
//! where the sources are a git checkout and git runs, else "unknown" (a tarball, a registry
//! crate, no git, any target). Never fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SPEEDRUN_GIT_COMMIT");
    let commit = std::env::var("SPEEDRUN_GIT_COMMIT").ok().filter(|c| !c.trim().is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=SPEEDRUN_GIT_COMMIT={}", commit.as_deref().map_or("unknown", str::trim));
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()))
}

/// `git ARGS` in the sources' folder: its trimmed output, or None if git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(manifest_dir()).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    // Build again when HEAD moves: HEAD itself, the branch it names, the packed refs (only
    // files that exist: a missing one would make cargo run this script on every build).
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = manifest_dir().join(Path::new(&path));
            if path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(commit)
}
