//! GPU time per op from CUDA events (`speedrun profile --backend cuda`): while profiling, each
//! kernel launch, cuDNN convolution and cuBLAS product is bracketed by two events on the
//! stream, labelled like the wgpu profile (the kernel; for convolutions the layer shape, the
//! pass and cuDNN's algorithm; for products the shape). Steps run without CUDA graphs
//! meanwhile, so every op is launched, and timed, on its own. Reading the events waits only
//! at the end of the profile. An op's time runs from the GPU reaching its start event to its
//! end event: where the GPU waits for the host's next launch (small kernels, one launch
//! each), that wait counts too, so the sum can exceed a graph-launched step's time.

use super::Cuda;
use crate::backend::{KernelTime, Profile};
use anyhow::{Context, Result};
use cudarc::driver::{sys::CUevent_flags, CudaEvent};

pub(super) struct Profiler {
    /// (label, useful FLOPs, start, end) per timed op, in launch order.
    ops: Vec<(String, f64, CudaEvent, CudaEvent)>,
    /// Whether steps ran as graphs before profiling (restored after it).
    graphs_were_on: bool,
}

impl Cuda {
    /// Runs `op` (which launches work on the stream), timed under the label `name()` with
    /// `flops` useful operations while profiling; just runs it otherwise.
    pub(super) fn timed<R>(&self, name: impl FnOnce() -> String, flops: f64, op: impl FnOnce() -> R) -> R {
        if self.profiler.borrow().is_none() {
            return op();
        }
        let ctx = self.stream.context();
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap_or_else(|e| panic!("CUDA event: {e:?}"));
        let (start, end) = (event(), event());
        start.record(&self.stream).unwrap_or_else(|e| panic!("CUDA event record: {e:?}"));
        let result = op();
        end.record(&self.stream).unwrap_or_else(|e| panic!("CUDA event record: {e:?}"));
        if let Some(p) = self.profiler.borrow_mut().as_mut() {
            p.ops.push((name(), flops, start, end));
        }
        result
    }
}

impl Profile for Cuda {
    fn start_profile(&self) -> Result<()> {
        self.stream.synchronize().context("CUDA synchronize before profiling")?;
        let graphs_were_on = self.use_graphs.replace(false);
        *self.profiler.borrow_mut() = Some(Profiler { ops: Vec::new(), graphs_were_on });
        Ok(())
    }

    async fn finish_profile(&self) -> Vec<KernelTime> {
        let Some(profiler) = self.profiler.borrow_mut().take() else { return Vec::new() };
        self.use_graphs.set(profiler.graphs_were_on);
        self.stream.synchronize().unwrap_or_else(|e| panic!("CUDA synchronize after profiling: {e:?}"));
        KernelTime::totals(profiler.ops.into_iter().map(|(name, flops, start, end)| {
            let ms = start.elapsed_ms(&end).unwrap_or_else(|e| panic!("CUDA event time of {name}: {e:?}"));
            (name, ms as f64 * 1e-3, flops)
        }))
    }
}
