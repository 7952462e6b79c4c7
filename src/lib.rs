//! speedrun: CIFAR-10 to 94% in seconds — the airbench94 recipe behind one `Backend` trait.
//!
//! - `backend`: the trait and its implementations (`backend::cpu` is the reference).
//! - `model`: the network (parameter arena, init, forward, backward).
//! - `train`: `Config`, schedule, optimizer, lookahead, TTA, the run loop.
//! - `data`, `download`, `checkpoint`: CIFAR-10 files and safetensors checkpoints.
//! - `web` (wasm32): the browser entry point for `web/`.

pub mod backend;
pub mod checkpoint;
pub mod data;
#[cfg(not(target_arch = "wasm32"))]
pub mod download;
pub mod linalg;
pub mod model;
pub mod rng;
pub mod stats;
pub mod train;
#[cfg(all(target_arch = "wasm32", feature = "wgpu"))]
pub mod web;
