//! The `speedrun` binary. The command line is native only; in the browser the library is the
//! entry point (a wasm32 build of this binary does nothing, so that `cargo test` for wasm32
//! can build the package's integration tests).

#[cfg(not(target_arch = "wasm32"))]
mod cli;
#[cfg(not(target_arch = "wasm32"))]
mod progress;
#[cfg(not(target_arch = "wasm32"))]
mod serve;
#[cfg(not(target_arch = "wasm32"))]
mod stats_cmd;

fn main() {
    #[cfg(not(target_arch = "wasm32"))]
    cli::main();
}
