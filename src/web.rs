//! The browser entry point (wasm32, through wasm-bindgen): the same `Trainer`, `train::run`
//! and WGSL backend as the command line, driven by `web/app.js`. Built by `web/build.sh`.
//!
//! Events reach the page as JSON strings through its `on_event` callback, whose return value
//! (`true`) stops the run. About five times a second the run waits for the GPU and reports
//! the running loss, which also hands the event loop to the page for repaints and clicks.

use crate::backend::wgpu::{default_adapter, Wgpu};
use crate::backend::{Backend, Precision};
use crate::checkpoint;
use crate::data::{parse_records, Split};
use crate::run::{self, Event, Flow};
use crate::train::{Config, DeviceSplit, Evaluator, Recipe, Trainer};
use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;
use web_time::Instant;

/// Seconds between waits for the GPU (progress reports and repaints).
const SYNC_INTERVAL: f64 = 0.2;

fn js_error(e: anyhow::Error) -> JsError {
    JsError::new(&format!("{e:#}"))
}

/// The adapter the page trains on, as JSON: name, backend, device type, shader-f16,
/// subgroups, and the limits that matter here.
#[wasm_bindgen]
pub async fn adapter_info() -> Result<String, JsError> {
    let gpu = Wgpu::new().await.map_err(js_error)?;
    let (info, features, limits) = (gpu.adapter_info(), gpu.adapter_features(), gpu.adapter_limits());
    Ok(json!({
        "name": info.name, "backend": format!("{:?}", info.backend), "device_type": format!("{:?}", info.device_type),
        "shader_f16": features.contains(wgpu::Features::SHADER_F16), "subgroups": features.contains(wgpu::Features::SUBGROUP),
        "max_storage_binding_mib": limits.max_storage_buffer_binding_size >> 20,
        "max_buffer_mib": limits.max_buffer_size >> 20,
        "workgroup_memory_kib": limits.max_compute_workgroup_storage_size >> 10,
        "invocations_per_workgroup": limits.max_compute_invocations_per_workgroup,
    })
    .to_string())
}

/// The recipes for the page's knobs, as JSON: `[{name, summary, epochs, batch_size, lr}]`.
#[wasm_bindgen]
pub fn recipes() -> String {
    let list = Recipe::ALL.map(|r| {
        let c = r.config();
        json!({ "name": r.name(), "summary": r.summary(), "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr })
    });
    Value::from(list.to_vec()).to_string()
}

/// `options` (JSON) → the run's `Config` (`precision`: `f32`, the default, or `half`, which
/// needs an adapter with shader-f16) and the train/test image limits.
fn parse_options(options: &str) -> Result<(Config, Option<usize>, Option<usize>)> {
    let o: Value = serde_json::from_str(options).context("options are not JSON")?;
    let number = |key: &str| o.get(key).and_then(Value::as_f64);
    let count = |key: &str| number(key).map(|v| v as usize);
    let recipe = o.get("recipe").and_then(Value::as_str).map_or(Ok(Recipe::Airbench94), Recipe::from_name)?;
    let mut cfg: Config = recipe.config();
    cfg.epochs = number("epochs").unwrap_or(cfg.epochs);
    cfg.batch_size = count("batch_size").unwrap_or(cfg.batch_size);
    cfg.lr = number("lr").unwrap_or(cfg.lr);
    cfg.seed = number("seed").map_or(cfg.seed, |v| v as u64);
    cfg.precision = match o.get("precision").and_then(Value::as_str) {
        None | Some("f32") => Precision::F32,
        Some("half") => Precision::Half,
        Some(other) => return Err(anyhow!("precision must be f32 or half, not {other}")),
    };
    if let Some(w) = o.get("widths").and_then(Value::as_array) {
        let w: Vec<usize> = w.iter().filter_map(Value::as_u64).map(|v| v as usize).collect();
        cfg.widths = w.try_into().ok().filter(|w: &[usize; 3]| !w.contains(&0)).context("widths must be three positive numbers")?;
    }
    cfg.validate()?;
    Ok((cfg, count("train_limit"), count("test_limit")))
}

fn split(records: &[u8], limit: Option<usize>, what: &str) -> Result<Split> {
    let mut s = Split { pixels: Vec::new(), labels: Vec::new() };
    parse_records(records, &mut s).with_context(|| format!("the {what} data is not CIFAR-10's binary version"))?;
    if let Some(n) = limit {
        s.truncate(n);
    }
    if s.is_empty() {
        return Err(anyhow!("no {what} images"));
    }
    Ok(s)
}

/// Trains one run on the browser's WebGPU from CIFAR-10 binary records (the five training
/// files concatenated, and the test file) and returns the trained net as a safetensors
/// checkpoint, the same format as `speedrun train --save`.
#[wasm_bindgen]
pub async fn train(train_records: Vec<u8>, test_records: Vec<u8>, options: String, on_event: js_sys::Function) -> Result<Vec<u8>, JsError> {
    run(&train_records, &test_records, &options, &on_event).await.map_err(js_error)
}

async fn run(train_records: &[u8], test_records: &[u8], options: &str, on_event: &js_sys::Function) -> Result<Vec<u8>> {
    let (cfg, train_limit, test_limit) = parse_options(options)?;
    let (train_split, test_split) = (split(train_records, train_limit, "training")?, split(test_records, test_limit, "test")?);
    let gpu = Wgpu::with_precision(default_adapter().await?, cfg.precision).await?;
    let (train_data, test_data) = (DeviceSplit::new(&gpu, &train_split), DeviceSplit::new(&gpu, &test_split));
    let mut trainer = Trainer::new(&gpu, cfg.clone(), &train_data)?;
    trainer.reset(cfg.seed);
    let mut plain = Evaluator::new(&gpu, test_data.len(), cfg.batch_size, 0);
    let mut tta = Evaluator::new(&gpu, test_data.len(), cfg.batch_size, cfg.tta_level);
    let (batch, steps_per_epoch) = (cfg.batch_size, cfg.steps_per_epoch(train_data.len()));
    let send = |event: Value| on_event.call1(&JsValue::NULL, &JsValue::from_str(&event.to_string())).map(|r| r.is_truthy()).unwrap_or(true);
    let stop_now = send(json!({
        "kind": "start", "device": gpu.device_name(), "precision": cfg.precision.name(),
        "train_images": train_data.len(), "test_images": test_data.len(),
        "steps": trainer.total_steps, "steps_per_epoch": steps_per_epoch, "batch_size": batch, "widths": cfg.widths,
    }));
    if stop_now {
        return Err(anyhow!("stopped before the first step"));
    }
    let mut last_sync = Instant::now();
    let mut on = |event: Event| -> Flow {
        let stop = match event {
            Event::Step { .. } if last_sync.elapsed().as_secs_f64() < SYNC_INTERVAL => false,
            Event::Step { .. } => {
                last_sync = Instant::now();
                return Flow::Sync;
            }
            Event::Synced { epoch, step, train_loss, train_acc, seconds } => {
                let done = (epoch - 1) * steps_per_epoch + step;
                send(json!({
                    "kind": "progress", "epoch": epoch, "step": done, "train_loss": train_loss, "train_acc": train_acc,
                    "seconds": seconds, "images_per_second": (done * batch) as f64 / seconds,
                }))
            }
            Event::Epoch { log, predictions } => send(json!({
                "kind": "epoch", "epoch": log.epoch, "train_loss": log.train_loss, "train_acc": log.train_acc,
                "val_acc": log.val_acc, "tta_acc": log.tta_acc, "seconds": log.seconds, "predictions": predictions,
            })),
        };
        if stop {
            Flow::Stop
        } else {
            Flow::Continue
        }
    };
    let result = run::run(&mut trainer, &test_data, &mut plain, &mut tta, &mut on).await?;
    let (params, running) = trainer.net.state(&gpu).await;
    let meta = [
        ("tta_accuracy", format!("{:.4}", result.tta_accuracy)),
        ("seed", cfg.seed.to_string()),
        ("trained_on", gpu.device_name()),
        ("recipe", cfg.recipe.name().to_string()),
    ];
    send(json!({
        "kind": "done", "tta_acc": result.tta_accuracy, "val_acc": result.accuracy, "seconds": result.time_seconds,
        "train_seconds": result.train_seconds, "images_per_second": (result.steps * batch) as f64 / result.train_seconds,
    }));
    checkpoint::to_bytes(&trainer.net.arch, &params, &running, &meta)
}
