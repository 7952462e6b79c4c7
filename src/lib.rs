//! speedrun: CIFAR-10 to 94% in seconds — the airbench94 family of recipes behind one
//! `Backend` trait.
//!
//! - `backend`: the trait and its implementations (`backend::cpu` is the reference).
//! - `model`: the network (parameter arena and its typed layout, init, forward, backward).
//! - `train`: the training step: SGD groups, Muon (Newton–Schulz), lookahead, augmentation.
//! - `recipe`: `Config`, the recipes (airbench94, airbench94-muon, hiverge), their schedules.
//! - `run`: one run on the clock: evaluation, (selective) TTA, per-epoch rows.
//! - `whiten`: the whitening filters from patch moments.
//! - `data`, `download`, `checkpoint`: CIFAR-10 files and safetensors checkpoints.
//! - `memory`: the memory a configuration needs, checked before anything is allocated.
//! - `web` (wasm32): the browser entry point for `web/`.

pub mod backend;
pub mod checkpoint;
pub mod data;
#[cfg(not(target_arch = "wasm32"))]
pub mod download;
pub mod linalg;
pub mod memory;
pub mod model;
pub mod recipe;
pub mod rng;
pub mod run;
pub mod stats;
pub mod train;
#[cfg(all(target_arch = "wasm32", feature = "wgpu"))]
pub mod web;
pub mod whiten;
