//! Training steps as CUDA graphs. Each step's launches are captured from the stream (nothing
//! runs while capturing), then an executable graph of the same shape is updated in place with
//! the new arguments (`cuGraphExecUpdate`: cheap when only kernel parameters differ, such as
//! the batch's offset and the learning rate) and replayed as one launch. Steps of another
//! shape (the whitening bias stops training after epoch 3; lookahead runs every few steps)
//! get their own executable graph. A step that allocates (cuDNN plans, scratch buffers) is
//! never captured: it runs directly, and the steps after it are captured.

use super::Cuda;
use cudarc::driver::{result, sys};

/// Executable graphs of the step shapes seen so far, and the capture state.
#[derive(Default)]
pub(super) struct StepGraphs {
    execs: Vec<sys::CUgraphExec>,
    capturing: bool,
    /// Steps replayed as graphs so far.
    replays: usize,
    /// The allocation count when the current step began.
    allocations_at_begin: usize,
    /// Whether the last step allocated nothing (so the next one can be captured).
    last_step_clean: bool,
}

impl Drop for StepGraphs {
    fn drop(&mut self) {
        for &exec in &self.execs {
            // SAFETY: created by `instantiate` below and destroyed once, here.
            unsafe { result::graph::exec_destroy(exec) }.ok();
        }
    }
}

impl Cuda {
    pub(super) fn capturing(&self) -> bool {
        self.graphs.borrow().capturing
    }

    /// Training steps replayed as CUDA graphs so far, and the executable graphs made.
    pub fn graph_stats(&self) -> (usize, usize) {
        let g = self.graphs.borrow();
        (g.replays, g.execs.len())
    }

    /// Starts capturing a training step, unless graphs are off or the last step allocated.
    pub(super) fn begin_graph_step(&self) {
        let mut g = self.graphs.borrow_mut();
        g.allocations_at_begin = self.allocations.get();
        if self.use_graphs.get() && g.last_step_clean {
            let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
            // SAFETY: the backend's own stream, idle of other captures.
            unsafe { result::stream::begin_capture(self.stream.cu_stream(), mode) }.unwrap_or_else(|e| panic!("CUDA graph capture: {e:?}"));
            g.capturing = true;
        }
    }

    /// Ends the step: replays the captured graph through an executable graph of its shape.
    pub(super) fn end_graph_step(&self) {
        let mut g = self.graphs.borrow_mut();
        g.last_step_clean = self.allocations.get() == g.allocations_at_begin;
        if !std::mem::take(&mut g.capturing) {
            return;
        }
        let stream = self.stream.cu_stream();
        // SAFETY: the capture begun in `begin_graph_step` on this stream; the graph is
        // destroyed below, after the executable graph has taken what it needs.
        let graph = unsafe { result::stream::end_capture(stream) }
            .unwrap_or_else(|e| panic!("CUDA graph capture of a training step failed ({e:?}); SPEEDRUN_CUDA_GRAPHS=0 turns graphs off"));
        let updated = g.execs.iter().position(|&exec| {
            let mut info = std::mem::MaybeUninit::<sys::CUgraphExecUpdateResultInfo>::zeroed();
            // SAFETY: a live executable graph and a captured graph; info is written by the call.
            let status = unsafe { sys::cuGraphExecUpdate_v2(exec, graph, info.as_mut_ptr()) };
            status == sys::CUresult::CUDA_SUCCESS
        });
        let exec = match updated {
            Some(i) => g.execs[i],
            None => {
                // SAFETY: instantiating a complete captured graph.
                let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
                    .unwrap_or_else(|e| panic!("cannot instantiate a CUDA graph: {e:?}"));
                g.execs.push(exec);
                exec
            }
        };
        g.replays += 1;
        // SAFETY: exec is live; the graph is no longer needed once updated/instantiated.
        unsafe {
            result::graph::launch(exec, stream).unwrap_or_else(|e| panic!("CUDA graph launch: {e:?}"));
            result::graph::destroy(graph).ok();
        }
    }
}
