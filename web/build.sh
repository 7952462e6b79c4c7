#!/usr/bin/env bash
# Builds the browser demo into web/pkg/: the library for wasm32 (the WGSL backend on the
# browser's WebGPU) and its wasm-bindgen JS glue. Needs `rustup target add
# wasm32-unknown-unknown` and wasm-bindgen-cli of the wasm-bindgen version in Cargo.lock
# (`cargo install wasm-bindgen-cli --version 0.2.130`). Then: `speedrun web`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo rustc --release --target wasm32-unknown-unknown --lib --no-default-features --features wgpu --crate-type cdylib
wasm-bindgen --target web --no-typescript --out-dir web/pkg target/wasm32-unknown-unknown/release/speedrun.wasm
echo "built web/pkg/ ($(du -h web/pkg/speedrun_bg.wasm | cut -f1) of wasm)"
