//! The WGSL backend: every op is a compute shader from `shaders/*.wgsl` (one file per layer
//! family, with `shaders/common.wgsl` prepended, and `shaders/gemm.wgsl`, the tiles they
//! share, before the GEMM families `conv` and `linalg`), run through wgpu on Vulkan, Metal,
//! DX12 or the browser's WebGPU. NHWC, as the CPU reference; all math in f32, activations
//! stored in f32 or, under `Precision::Half` (adapters with `shader-f16`), in f16.
//!
//! How a step runs: every op records its dispatches into one open command encoder; nothing
//! waits for the device until `read` or `sync`. Pipelines are built once at start-up, bind
//! groups once per distinct set of buffers (then reused every step), and each dispatch's
//! parameters go into a 256-byte slot of one uniform ring buffer, selected with a dynamic
//! offset and written once per submission.

mod launch;
mod profile;

use crate::backend::Precision;
use anyhow::{anyhow, bail, Result};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;

/// A device buffer of `len` f32 or u32 values, or f16 values where `half` is set
/// (activations under half precision).
pub struct Buf {
    buffer: wgpu::Buffer,
    len: usize,
    half: bool,
}

/// The dataset on the device: u8 NHWC images packed four to a u32, split into two bindings
/// (images `[0, split)` and `[split, n)`) so each stays under the storage-binding limit.
pub struct GpuImages {
    parts: [Buf; 2],
    labels: Buf,
    split: usize,
}

/// One shader family: its source (after `common.wgsl`; the GEMM families start with
/// `gemm.wgsl`, the tiles they share), which storage bindings it declares
/// read-only, and each entry point with the bindings it uses (binding 0 is always the
/// parameter slot) and, of those declared `array<Tn>`, the ones holding activations there.
struct Family {
    name: &'static str,
    source: &'static str,
    read_only: &'static [u32],
    entries: &'static [Entry],
}

/// An entry point, its bindings, and which of its `Tn` bindings hold activations.
type Entry = (&'static str, &'static [u32], &'static [u32]);

const NONE: &[u32] = &[];

const COMMON: &str = include_str!("../../../shaders/common.wgsl");

const CONV_ENTRIES: &[Entry] = &[
    ("forward", &[1, 2, 3], &[3]),
    ("rotate", &[2, 5], NONE),
    ("wgrad", &[1, 4, 5], NONE),
    ("reduce_splits", &[3, 5], NONE),
    ("forward_direct", &[1, 2, 3], &[3]),
    ("wgrad_direct", &[1, 4, 5], NONE),
];

const FAMILIES: [Family; 6] = [
    Family {
        name: "conv.wgsl",
        source: concat!(include_str!("../../../shaders/gemm.wgsl"), "\n", include_str!("../../../shaders/conv.wgsl")),
        read_only: &[1, 2, 4],
        entries: CONV_ENTRIES,
    },
    Family {
        name: "norm.wgsl",
        source: include_str!("../../../shaders/norm.wgsl"),
        read_only: &[1, 2, 3],
        entries: &[
            ("bias_gelu_fwd", &[1, 4, 5], &[4, 5]),
            ("max_pool_fwd", &[1, 4], &[1, 4]),
            ("max_pool_bwd", &[1, 2, 4], &[1, 2, 4]),
            ("partials_sum", &[1, 6], &[1]),
            ("partials_sqdev", &[1, 2, 6], &[1]),
            ("partials_gelu_grad", &[1, 2, 6], &[1, 2]),
            ("partials_bn_bwd", &[1, 2, 4, 6, 7], &[1, 4]),
            ("finalize_sum", &[4, 6], NONE),
            ("finalize_mean", &[4, 6], NONE),
            ("finalize_var", &[4, 5, 6], NONE),
            ("eval_stats", &[1, 4], NONE),
            ("finalize_bn_bwd", &[4, 5, 6], NONE),
            ("bn_act_apply", &[1, 2, 4, 5], &[4, 5]),
            ("bn_bwd_apply", &[1, 2, 3, 4, 5, 7], &[1, 4]),
        ],
    },
    Family {
        name: "head.wgsl",
        source: include_str!("../../../shaders/head.wgsl"),
        read_only: &[1, 2, 3],
        entries: &[
            ("linear_fwd", &[1, 2, 4], &[1]),
            ("linear_bwd_data", &[1, 2, 4], &[4]),
            ("linear_bwd_filter", &[1, 2, 4], &[2]),
            ("cross_entropy", &[1, 3, 4, 6], NONE),
            ("cross_entropy_total", &[5, 6], NONE),
        ],
    },
    Family {
        name: "optim.wgsl",
        source: include_str!("../../../shaders/optim.wgsl"),
        read_only: &[1],
        entries: &[
            ("sgd", &[1, 2, 3], NONE),
            ("lookahead", &[2, 3], NONE),
            ("nesterov", &[1, 2, 3], NONE),
            ("axpby", &[1, 2], NONE),
            ("fill", &[2], NONE),
            ("copy", &[1, 2], NONE),
            ("sumsq_partials", &[2, 4], NONE),
            ("scale_by_norm", &[2, 4], NONE),
        ],
    },
    Family {
        name: "data.wgsl",
        source: include_str!("../../../shaders/data.wgsl"),
        read_only: &[1, 2, 3, 4, 5, 9],
        entries: &[("load_batch", &[1, 2, 3, 4, 5, 9, 6, 7], NONE), ("patch_moments", &[1, 2, 4, 8], NONE)],
    },
    Family {
        name: "linalg.wgsl",
        source: concat!(include_str!("../../../shaders/gemm.wgsl"), "\n", include_str!("../../../shaders/linalg.wgsl")),
        read_only: &[1, 2],
        entries: &[("matmul", &[1, 2, 3, 4], NONE), ("matmul_reduce", &[3, 4], NONE)],
    },
];

/// Bytes of one dispatch's parameter slot (the uniform offset alignment WebGPU guarantees).
const PARAM_SLOT: usize = 256;
/// Parameter slots per submission.
const RING_SLOTS: usize = 4096;

struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    slots: &'static [u32],
}

#[derive(Default)]
struct State {
    encoder: Option<wgpu::CommandEncoder>,
    params: Vec<u8>, // the parameter slots of the open encoder
    bind_groups: HashMap<(&'static str, Vec<wgpu::Buffer>), wgpu::BindGroup>,
    scratch: HashMap<&'static str, Buf>,
    profiler: Option<profile::Profiler>,
    /// What the next dispatch computes, while profiling (see `label_next`).
    next_label: Option<profile::Label>,
}

pub struct Wgpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    adapter_features: wgpu::Features,
    adapter_limits: wgpu::Limits,
    max_binding: u64,
    kernels: HashMap<&'static str, Kernel>,
    ring: wgpu::Buffer,
    state: RefCell<State>,
    /// Convolutions with workgroup-memory tiling where they have 16 or more output channels
    /// (the default), or all direct (the naive baseline, for tests and benchmarks).
    tiled: std::cell::Cell<bool>,
    precision: Precision,
}

/// The adapter wgpu picks (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME` etc. steer it), preferring a
/// high-performance GPU.
pub async fn default_adapter() -> Result<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let options = wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() };
    instance.request_adapter(&options).await.map_err(|e| {
        anyhow!("wgpu found no adapter ({e}); install a GPU driver with Vulkan, Metal or DX12 (on Linux without a GPU: mesa-vulkan-drivers, for lavapipe)")
    })
}

/// Every adapter wgpu can see, for `speedrun info`.
pub async fn all_adapters() -> Vec<wgpu::Adapter> {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env()).enumerate_adapters(wgpu::Backends::all()).await
}

impl Wgpu {
    /// A device on the default adapter, with every pipeline built.
    pub async fn new() -> Result<Wgpu> {
        Wgpu::on(default_adapter().await?).await
    }

    /// A device on `adapter`, f32 throughout.
    pub async fn on(adapter: wgpu::Adapter) -> Result<Wgpu> {
        Wgpu::with_precision(adapter, Precision::F32).await
    }

    /// A device on `adapter` storing activations as `precision` says (half needs the adapter's
    /// `shader-f16`). Asks for the WebGPU default limits, raised to the adapter's buffer-size
    /// limits (activations at batch 1024 exceed the default 128 MiB binding).
    pub async fn with_precision(adapter: wgpu::Adapter, precision: Precision) -> Result<Wgpu> {
        let have = adapter.limits();
        let half = precision == Precision::Half;
        if half && !adapter.features().contains(wgpu::Features::SHADER_F16) {
            bail!(
                "--precision half needs f16 in shaders (shader-f16), which this adapter ({}) does not offer; use --precision f32",
                adapter.get_info().name
            );
        }
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: have.max_storage_buffer_binding_size,
            max_buffer_size: have.max_buffer_size,
            ..wgpu::Limits::defaults()
        };
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("speedrun"),
            // Timestamps for `speedrun profile`; f16 for half precision.
            required_features: adapter.features() & wgpu::Features::TIMESTAMP_QUERY
                | if half { wgpu::Features::SHADER_F16 } else { wgpu::Features::empty() },
            required_limits: limits,
            ..Default::default()
        };
        let (device, queue) = adapter.request_device(&descriptor).await.map_err(|e| anyhow!("cannot open the wgpu device: {e}"))?;
        let kernels = build_kernels(&device, precision);
        let ring = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("parameter ring"),
            size: (PARAM_SLOT * RING_SLOTS) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let max_binding = have.max_storage_buffer_binding_size.min(have.max_buffer_size);
        let info = adapter.get_info();
        let (adapter_features, adapter_limits) = (adapter.features(), have);
        Ok(Wgpu {
            device,
            queue,
            info,
            adapter_features,
            adapter_limits,
            max_binding,
            kernels,
            ring,
            state: RefCell::default(),
            tiled: std::cell::Cell::new(true),
            precision,
        })
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// What the adapter offers (the device itself asks for little of it).
    pub fn adapter_features(&self) -> wgpu::Features {
        self.adapter_features
    }

    pub fn adapter_limits(&self) -> &wgpu::Limits {
        &self.adapter_limits
    }

    /// Chooses the tiled convolution kernels (the default) or only the direct ones; tests and
    /// benchmarks run both.
    pub fn set_tiled_convolutions(&self, tiled: bool) {
        self.tiled.set(tiled);
    }

    /// A buffer of `len` 4-byte values.
    fn buffer(&self, len: usize, label: &str) -> Buf {
        self.buffer_of(len, false, label)
    }

    /// A buffer of `len` f16 values where `half` is set, else of 4-byte values. Sizes are
    /// rounded up to whole 4-byte words (copies and bindings move whole words).
    fn buffer_of(&self, len: usize, half: bool, label: &str) -> Buf {
        let words = if half { len.max(1).div_ceil(2) } else { len.max(1) };
        let bytes = (words * 4) as u64;
        assert!(
            bytes <= self.max_binding,
            "a {label} buffer of {bytes} bytes exceeds this adapter's binding limit of {} bytes",
            self.max_binding
        );
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffer =
            self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: bytes, usage, mapped_at_creation: false });
        Buf { buffer, len, half }
    }

    /// Writes `data` at byte `offset` (both whole 4-byte words) of `dst`.
    fn write(&self, dst: &Buf, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= dst.buffer.size() as usize, "upload past the end of a buffer");
        self.flush(); // work already recorded must see the old contents
        if !data.is_empty() {
            self.queue.write_buffer(&dst.buffer, offset as u64, data);
        }
    }

    /// An internal buffer named `name` of at least `len` values, grown (rarely) on demand.
    fn scratch(&self, name: &'static str, len: usize) -> wgpu::Buffer {
        if let Some(b) = self.state.borrow().scratch.get(name).filter(|b| b.len >= len) {
            return b.buffer.clone();
        }
        let fresh = self.buffer(len, name);
        let buffer = fresh.buffer.clone();
        self.state.borrow_mut().scratch.insert(name, fresh);
        buffer
    }

    /// Records one dispatch of `entry` with `params` (u32 words; f32 as bits) over
    /// `groups` workgroups, binding `bufs` to the entry's bindings in order.
    fn run(&self, entry: &'static str, params: &[u32], bufs: &[&wgpu::Buffer], groups: [u32; 3]) {
        let kernel = &self.kernels[entry];
        assert_eq!(bufs.len(), kernel.slots.len(), "{entry}: wrong number of buffers");
        if groups.contains(&0) {
            return;
        }
        let full = {
            let st = self.state.borrow();
            st.params.len() + PARAM_SLOT > PARAM_SLOT * RING_SLOTS || st.profiler.as_ref().is_some_and(|p| p.full())
        };
        if full {
            self.flush();
        }
        let mut st = self.state.borrow_mut();
        let offset = st.params.len() as u32;
        let mut slot = [0u8; PARAM_SLOT];
        for (dst, word) in slot.chunks_exact_mut(4).zip(params) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
        st.params.extend_from_slice(&slot);
        let key = (entry, bufs.iter().map(|&b| b.clone()).collect::<Vec<_>>());
        if !st.bind_groups.contains_key(&key) {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.ring,
                    offset: 0,
                    size: wgpu::BufferSize::new(PARAM_SLOT as u64),
                }),
            }];
            entries.extend(
                kernel.slots.iter().zip(bufs).map(|(&binding, b)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() }),
            );
            let bg =
                self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(entry), layout: &kernel.layout, entries: &entries });
            st.bind_groups.insert(key.clone(), bg);
        }
        let st = &mut *st;
        let encoder = st.encoder.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        let timestamp_writes = st.profiler.as_mut().map(|p| {
            let label = st.next_label.take();
            let name = label.as_ref().map_or(entry.to_string(), |l| format!("{} ({entry})", l.name));
            p.next(profile::Label { name, flops: label.map_or(0.0, |l| l.flops) })
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(entry), timestamp_writes });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &st.bind_groups[&key], &[offset]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }

    /// Names the next dispatch `name` with `flops` useful operations in the profile (convs,
    /// whose kernel alone does not say which layer it runs); nothing unless profiling.
    fn label_next(&self, name: impl FnOnce() -> String, flops: f64) {
        let mut st = self.state.borrow_mut();
        if st.profiler.is_some() {
            st.next_label = Some(profile::Label { name: name(), flops });
        }
    }

    /// Submits the recorded work (with its parameter slots).
    fn flush(&self) {
        let mut st = self.state.borrow_mut();
        if let Some(mut encoder) = st.encoder.take() {
            if let Some(p) = st.profiler.as_mut() {
                p.resolve(&self.device, &mut encoder);
            }
            self.queue.write_buffer(&self.ring, 0, &st.params);
            st.params.clear();
            self.queue.submit([encoder.finish()]);
        }
    }

    /// Reads `range` (in 4-byte words) of `src` back once all recorded work is done.
    async fn read_words(&self, src: &wgpu::Buffer, range: Range<usize>) -> Vec<u8> {
        if range.is_empty() {
            return Vec::new();
        }
        self.flush();
        let bytes = (range.len() * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(src, (range.start * 4) as u64, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        self.map_read(&staging).await
    }

    /// The contents of a `MAP_READ` buffer once the work writing it is done.
    async fn map_read(&self, staging: &wgpu::Buffer) -> Vec<u8> {
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait();
        rx.await.expect("the map callback ran").expect("mapping a readback buffer");
        let data = staging.get_mapped_range(..).expect("mapped").to_vec();
        staging.unmap();
        data
    }

    /// Native: block until the device is idle (callbacks fire). The web: a no-op, the
    /// browser's event loop runs the callbacks while the caller awaits.
    fn wait(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::wait_indefinitely()).expect("the device stopped responding");
    }

    async fn sync_impl(&self) {
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        self.wait();
        rx.await.expect("the work-done callback ran");
    }

    /// The dataset in two bindings of at most `per_part` images each.
    fn upload_images_split(&self, pixels: &[u8], labels: &[u8], per_part: usize) -> Result<GpuImages> {
        const IMAGE: usize = 3072;
        let n = labels.len();
        if n > 2 * per_part {
            bail!("{n} images do not fit two storage bindings of {per_part} images on this adapter");
        }
        let split = n.min(per_part);
        let part = |images: Range<usize>| {
            let bytes = &pixels[images.start * IMAGE..images.end * IMAGE];
            let buf = self.buffer(bytes.len() / 4, "images");
            self.write(&buf, 0, bytes);
            buf
        };
        let words: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let label_buf = self.buffer(n, "labels");
        self.write(&label_buf, 0, bytemuck::cast_slice(&words));
        Ok(GpuImages { parts: [part(0..split), part(split..n)], labels: label_buf, split })
    }
}

/// The storage types `common.wgsl` describes, for a kernel whose bindings `activations` hold
/// activations: `H` and `T1`..`T9`.
fn preamble(precision: Precision, activations: &[u32]) -> String {
    let h = match precision {
        Precision::F32 => "alias H = f32;\n",
        Precision::Half => "enable f16;\nalias H = f16;\n",
    };
    let t = (1..=9).map(|n| format!("alias T{n} = {};\n", if activations.contains(&n) { "H" } else { "f32" }));
    h.to_string() + &t.collect::<String>()
}

/// Every kernel's pipeline; a family's source is compiled once per distinct preamble of its
/// entries (once in f32, where every `Tn` is f32).
fn build_kernels(device: &wgpu::Device, precision: Precision) -> HashMap<&'static str, Kernel> {
    let mut kernels = HashMap::new();
    for family in &FAMILIES {
        let mut modules: HashMap<String, wgpu::ShaderModule> = HashMap::new();
        for &(entry, slots, activations) in family.entries {
            let preamble = preamble(precision, if precision == Precision::F32 { NONE } else { activations });
            let module = modules.entry(preamble).or_insert_with_key(|preamble| {
                device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(family.name),
                    source: wgpu::ShaderSource::Wgsl(Cow::Owned(format!("{preamble}{COMMON}\n{}", family.source))),
                })
            });
            let mut layout_entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: wgpu::BufferSize::new(PARAM_SLOT as u64),
                },
                count: None,
            }];
            layout_entries.extend(slots.iter().map(|&binding| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: family.read_only.contains(&binding) },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }));
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(entry), entries: &layout_entries });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pipeline_layout),
                module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
            assert!(kernels.insert(entry, Kernel { pipeline, layout, slots }).is_none(), "kernel {entry} defined twice");
        }
    }
    kernels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{all, all_mut, block_on, cpu::Cpu, Backend, ConvShape, Crop, Profile, View};
    use crate::rng::Rng;

    /// A device on the default adapter; None (skipped, with a message) unless
    /// SPEEDRUN_REQUIRE_WGPU makes a missing adapter a failure.
    fn device() -> Option<Wgpu> {
        let gpu = block_on(Wgpu::new()).ok();
        if gpu.is_none() {
            eprintln!("SKIPPED: no wgpu adapter");
            assert!(std::env::var_os("SPEEDRUN_REQUIRE_WGPU").is_none(), "SPEEDRUN_REQUIRE_WGPU is set but there is no adapter");
        }
        gpu
    }

    /// Batches gathered across the two image bindings equal the CPU's.
    #[test]
    fn images_split_across_two_bindings() {
        let Some(gpu) = device() else { return };
        let pixels: Vec<u8> = (0..5 * 3072).map(|i| (i * 13 % 256) as u8).collect();
        let labels = [1u8, 2, 3, 4, 5];
        let images = gpu.upload_images_split(&pixels, &labels, 3).unwrap();
        assert_eq!((images.split, images.parts[1].len), (3, 2 * 3072 / 4));
        let index = [4u32, 0, 2, 3];
        let crops: Vec<u32> = [Crop { dy: 1, dx: -2, flip: true }, Crop::IDENTITY, Crop { dy: -3, dx: 3, flip: false }, Crop::IDENTITY]
            .map(|c| c.pack())
            .to_vec();
        let (mut ti, mut tc, mut x, mut l) = (gpu.index_zeros(4), gpu.index_zeros(4), gpu.zeros(4 * 3072), gpu.index_zeros(4));
        gpu.upload_index(all_mut(&mut ti, 4), &index);
        gpu.upload_index(all_mut(&mut tc, 4), &crops);
        gpu.load_batch(&images, all(&ti, 4), all(&tc, 4), None, &mut x, &mut l);
        let cpu = Cpu::new();
        let (mut cx, mut cl) = (cpu.zeros(4 * 3072), cpu.index_zeros(4));
        cpu.load_batch(&cpu.upload_images(&pixels, &labels), all(&index.to_vec(), 4), all(&crops, 4), None, &mut cx, &mut cl);
        assert_eq!(block_on(gpu.read(all(&x, 4 * 3072))), cx);
        let label_words: Vec<u32> = bytemuck::cast_slice(&block_on(gpu.read_words(&l.buffer, 0..4))).to_vec();
        assert_eq!(label_words, cl);
    }

    /// The profile counts every dispatch once under its label, with the conv's FLOPs,
    /// across submissions (more dispatches than one query set holds), then stops.
    #[test]
    fn profile_counts_every_dispatch() {
        let Some(gpu) = device() else { return };
        if !gpu.device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            eprintln!("SKIPPED: the adapter has no timestamp queries");
            return;
        }
        let s = ConvShape { n: 2, h: 8, w: 8, c_in: 16, c_out: 64, k: 3, pad: 1 };
        let w_len = s.c_out * 9 * s.c_in;
        let (x, w, mut y) = (gpu.zeros(2 * 64 * 16), gpu.zeros(w_len), gpu.zeros(2 * 64 * 64));
        let mut one = gpu.zeros(1);
        gpu.start_profile().unwrap();
        for _ in 0..3 {
            gpu.conv_forward(s, &x, all(&w, w_len), &mut y);
        }
        let fills = profile::QUERIES as usize; // two submissions' worth of timestamps
        for _ in 0..fills {
            gpu.fill(all_mut(&mut one, 1), 1.0);
        }
        let rows = block_on(gpu.finish_profile());
        let conv = rows.iter().find(|r| r.name.starts_with("conv fwd 16→64 8²")).expect("the conv is labelled");
        assert_eq!((conv.calls, conv.flops), (3, 3.0 * 2.0 * s.macs() as f64));
        let fill = rows.iter().find(|r| r.name == "fill").expect("unlabelled dispatches keep their kernel's name");
        assert_eq!((fill.calls, fill.flops), (fills, 0.0));
        assert!(rows.iter().all(|r| r.seconds >= 0.0) && conv.seconds > 0.0);
        assert_eq!(rows.len(), 2);
        gpu.fill(all_mut(&mut one, 1), 2.0);
        assert!(block_on(gpu.finish_profile()).is_empty(), "profiling stopped");
        assert_eq!(block_on(gpu.read(all(&one, 1))), [2.0]);
    }

    /// Muon's largest product, X·Xᵀ of a (256, 2304) filter, and X·Y: few output tiles and a
    /// long k, so the sum over k is split (tests/ops.rs covers the small shapes).
    #[test]
    fn split_matmul_matches_the_cpu() {
        let Some(gpu) = device() else { return };
        let cpu = Cpu::new();
        let (m, k) = (256, 2304);
        let mut r = Rng::new(9);
        let x: Vec<f32> = (0..m * k + 3).map(|_| r.symmetric(1.0)).collect();
        let (cpu_x, mut gpu_x) = (x.clone(), gpu.zeros(x.len()));
        gpu.upload(all_mut(&mut gpu_x, x.len()), &x);
        for b_transposed in [true, false] {
            let n = if b_transposed { m } else { k / 9 };
            let (a, b) = (3..3 + m * k, 3 + m * k - k * n..3 + m * k); // b: the last k·n values
            let mut want = vec![f32::NAN; m * n];
            cpu.matmul(
                (m, k, n),
                0.5,
                View { buf: &cpu_x, range: a.clone() },
                View { buf: &cpu_x, range: b.clone() },
                b_transposed,
                0.0,
                all_mut(&mut want, m * n),
            );
            let mut c = gpu.zeros(m * n);
            gpu.fill(all_mut(&mut c, m * n), f32::NAN);
            gpu.matmul(
                (m, k, n),
                0.5,
                View { buf: &gpu_x, range: a },
                View { buf: &gpu_x, range: b },
                b_transposed,
                0.0,
                all_mut(&mut c, m * n),
            );
            let got = block_on(gpu.read(all(&c, m * n)));
            let scale = want.iter().fold(0.0f32, |s, v| s.max(v.abs()));
            let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f32::max) / scale;
            eprintln!("matmul {m}×{k}×{n} transposed {b_transposed}: largest error {err:.1e} of the largest value");
            assert!(err < 1e-5, "largest error {err:.1e}");
        }
    }
}
