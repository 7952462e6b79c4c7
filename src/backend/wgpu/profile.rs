//! GPU time per kernel from timestamp queries (`speedrun profile`). Every dispatch already
//! runs in its own compute pass, so the pass's begin and end timestamps time one kernel.
//! Each submission resolves its timestamps into a staging buffer that is read back once, at
//! the end of the profile, so profiling adds no waits inside the profiled steps.

use super::Wgpu;
use crate::backend::{KernelTime, Profile};
use anyhow::{bail, Result};

/// Timestamps per query set: two per dispatch (`QUERY_SET_MAX_QUERIES`).
pub(super) const QUERIES: u32 = wgpu::QUERY_SET_MAX_QUERIES;

/// What one dispatch is: its kernel (with the layer shape, for convolutions) and its useful
/// floating-point operations (0 where not counted).
pub(super) struct Label {
    pub name: String,
    pub flops: f64,
}

pub(super) struct Profiler {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer, // (QUERIES) u64 ticks
    /// The dispatches recorded in the open encoder; dispatch i wrote timestamps 2i, 2i+1.
    pub open: Vec<Label>,
    /// Per submission: its timestamps (in a mappable buffer) and its dispatches.
    done: Vec<(wgpu::Buffer, Vec<Label>)>,
}

impl Profiler {
    /// The timestamp writes of the next dispatch, recorded as `label`.
    pub fn next(&mut self, label: Label) -> wgpu::ComputePassTimestampWrites<'_> {
        let i = self.open.len() as u32;
        self.open.push(label);
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        }
    }

    pub fn full(&self) -> bool {
        2 * (self.open.len() as u32 + 1) > QUERIES
    }

    /// Resolves the open encoder's timestamps into a fresh staging buffer (before submit).
    pub fn resolve(&mut self, device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder) {
        if self.open.is_empty() {
            return;
        }
        let count = 2 * self.open.len() as u32;
        let bytes = count as u64 * wgpu::QUERY_SIZE as u64;
        encoder.resolve_query_set(&self.queries, 0..count, &self.resolved, 0);
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &staging, 0, bytes);
        self.done.push((staging, std::mem::take(&mut self.open)));
    }
}

impl Profile for Wgpu {
    /// Starts timing every dispatch. Needs the adapter's `TIMESTAMP_QUERY` feature.
    fn start_profile(&self) -> Result<()> {
        if !self.device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            bail!("the adapter {} does not support timestamp queries, which profiling needs", self.info.name);
        }
        self.flush();
        let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: QUERIES,
        });
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("resolved timestamps"),
            size: QUERIES as u64 * wgpu::QUERY_SIZE as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.state.borrow_mut().profiler = Some(Profiler { queries, resolved, open: Vec::new(), done: Vec::new() });
        Ok(())
    }

    async fn finish_profile(&self) -> Vec<KernelTime> {
        self.flush();
        let Some(profiler) = self.state.borrow_mut().profiler.take() else { return Vec::new() };
        let period_ns = self.queue.get_timestamp_period() as f64;
        let mut calls = Vec::new();
        for (staging, labels) in profiler.done {
            let bytes = self.map_read(&staging).await;
            let ticks: Vec<u64> = bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
            for (label, pair) in labels.into_iter().zip(ticks.chunks_exact(2)) {
                calls.push((label.name, pair[1].saturating_sub(pair[0]) as f64 * period_ns * 1e-9, label.flops));
            }
        }
        KernelTime::totals(calls)
    }
}
