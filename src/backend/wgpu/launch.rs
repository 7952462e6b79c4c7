//! Thin launchers: each `Backend` op as one or a few dispatches of the kernels in
//! `shaders/`. Parameters are u32 words (f32 as bits) in the order of the shader's `Params`.

use super::{Buf, GpuImages, Wgpu};
use crate::backend::{Act, Backend, BnMode, ConvShape, PoolBnShape, Precision, View, ViewMut, CLASSES, MOMENTS, SIDE};
use half::f16;
use std::future::Future;
use std::ops::Range;

/// Workgroups for `n` invocations of `size`, as a 2-D grid (each dimension ≤ 65535).
fn grid(n: usize, size: usize) -> [u32; 3] {
    let groups = n.div_ceil(size).max(1);
    let x = groups.min(65535);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

fn f(v: f32) -> u32 {
    v.to_bits()
}

/// Side of the output tiles of the tiled conv kernels.
const TILE: usize = 64;

/// Rows per partial sum in the two-stage channel reductions.
const CHUNK_ROWS: usize = 256;

/// Most workgroups of the first pass of `scale_to_norm` (its second pass adds their sums in
/// one workgroup of 256 invocations).
const NORM_PARTS: usize = 256;

/// Workgroups a split matmul aims for, and the shortest range of k a split may have.
const MATMUL_GROUPS: usize = 256;
const MATMUL_MIN_SPLIT_K: usize = 256;

impl Wgpu {
    /// conv.wgsl's parameters for shape `s` (weights at `w_off`).
    fn conv_params(s: &ConvShape, w_off: usize, split_rows: usize, splits: usize) -> [u32; 14] {
        let m = s.n * s.out_h() * s.out_w();
        [s.n, s.h, s.w, s.c_in, s.c_out, s.k, s.pad, s.out_h(), s.out_w(), m, s.k * s.k * s.c_in, w_off, split_rows, splits]
            .map(|v| v as u32)
    }

    fn conv(&self, s: &ConvShape, x: &wgpu::Buffer, w: &wgpu::Buffer, w_off: usize, y: &wgpu::Buffer) {
        let params = Self::conv_params(s, w_off, 0, 0);
        if !self.use_tiles(s.c_out) {
            return self.run("forward_direct", &params, &[x, w, y], grid(s.n * s.out_h() * s.out_w() * s.c_out, 256));
        }
        let tiles = (s.n * s.out_h() * s.out_w()).div_ceil(TILE);
        let x_groups = tiles.min(65535);
        let groups = [x_groups as u32, s.c_out.div_ceil(TILE) as u32, tiles.div_ceil(x_groups) as u32];
        self.run("forward", &params, &[x, w, y], groups);
    }

    /// Tiled kernels unless fewer than a quarter of a tile's 64 columns would be used. At full
    /// width the tiled kernels run about 3× (lavapipe) to 20× (H200) the FLOP/s of the direct
    /// ones, so a quarter-used tile still wins on a GPU and about breaks even on lavapipe.
    fn use_tiles(&self, channels: usize) -> bool {
        self.tiled.get() && channels >= TILE / 4
    }

    /// Labels the next dispatch as pass `pass` (fwd, dgrad, wgrad) of the conv layer `s`.
    fn label_conv(&self, pass: &str, s: &ConvShape) {
        self.label_next(|| format!("conv {pass} {}→{} {}²", s.c_in, s.c_out, s.h), 2.0 * s.macs() as f64);
    }

    /// norm.wgsl's parameters (the activation word is GELU's; see `with_act`).
    #[allow(clippy::too_many_arguments)]
    fn norm_params(rows: usize, c: usize, pool: Option<&PoolBnShape>, off0: usize, off1: usize, momentum: f32, eps: f32) -> [u32; 15] {
        let (n, h, w, p, oh, ow) = pool.map_or((0, 0, 0, 1, 0, 0), |s| (s.n, s.h, s.w, s.pool, s.out_h(), s.out_w()));
        let chunks = rows.div_ceil(CHUNK_ROWS);
        let words = [rows, c, n, h, w, p, oh, ow, off0, off1, CHUNK_ROWS, chunks].map(|v| v as u32);
        let mut out = [0u32; 15];
        out[..12].copy_from_slice(&words);
        out[12] = f(momentum);
        out[13] = f(eps);
        out
    }

    /// `params` with the activation after BatchNorm set to `act`.
    fn with_act(mut params: [u32; 15], act: Act) -> [u32; 15] {
        params[14] = match act {
            Act::Gelu => 0,
            Act::Silu => 1,
        };
        params
    }

    /// Groups for a `partials_*` kernel over (rows, c), and the partial-sum scratch.
    fn partials(&self, rows: usize, c: usize) -> ([u32; 3], wgpu::Buffer) {
        let chunks = rows.div_ceil(CHUNK_ROWS);
        ([chunks as u32, c.div_ceil(64) as u32, 1], self.scratch("channel partials", chunks * c * 2))
    }

    fn per_channel(c: usize) -> [u32; 3] {
        [c.div_ceil(64) as u32, 1, 1]
    }

    fn pool(&self, s: &PoolBnShape, entry: &'static str, bufs: &[&wgpu::Buffer]) {
        let n = if entry == "max_pool_fwd" { s.n * s.out_h() * s.out_w() * s.c } else { s.n * s.h * s.w * s.c };
        self.run(entry, &Self::norm_params(0, s.c, Some(s), 0, 0, 0.0, 0.0), bufs, grid(n, 256));
    }

    /// optim.wgsl's parameters: `scalars` = (lr, wd, momentum, a, b).
    fn optim_params(len: usize, offs: [usize; 3], scalars: [f32; 5], parts: usize) -> [u32; 10] {
        let [lr, wd, momentum, a, b] = scalars.map(f);
        [len as u32, offs[0] as u32, offs[1] as u32, offs[2] as u32, lr, wd, momentum, a, b, parts as u32]
    }

    fn optim(&self, entry: &'static str, len: usize, offs: [usize; 3], scalars: [f32; 5], bufs: &[&wgpu::Buffer]) {
        self.run(entry, &Self::optim_params(len, offs, scalars, 0), bufs, grid(len, 256));
    }

    fn head_params(n: usize, c_in: usize, c_out: usize, off: usize, write_grad: bool, scale: f32, smoothing: f32) -> [u32; 7] {
        [n as u32, c_in as u32, c_out as u32, off as u32, write_grad as u32, f(scale), f(smoothing)]
    }
}

impl Backend for Wgpu {
    type Tensor = Buf;
    type Index = Buf;
    type Images = GpuImages;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn device_name(&self) -> String {
        format!("{} ({:?}, {:?})", self.info.name, self.info.backend, self.info.device_type)
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn max_tensor_len(&self) -> usize {
        (self.max_binding / 4) as usize
    }

    /// A CPU adapter (lavapipe, SwiftShader) keeps its buffers in host memory; a GPU reports
    /// no free memory through wgpu.
    fn free_memory(&self) -> Option<(u64, String)> {
        (self.info.device_type == wgpu::DeviceType::Cpu).then(crate::memory::host_available).flatten()
    }

    fn zeros(&self, len: usize) -> Buf {
        self.buffer(len, "tensor") // wgpu zero-initialises every buffer
    }

    fn activations(&self, len: usize) -> Buf {
        self.buffer_of(len, self.precision == Precision::Half, "activations")
    }

    fn index_zeros(&self, len: usize) -> Buf {
        self.buffer(len, "index")
    }

    /// Into an f16 buffer: rounded to f16 on the host, in whole words, so the window must
    /// start at an even index and end at one or at the buffer's end.
    fn upload(&self, dst: ViewMut<Buf>, src: &[f32]) {
        assert_eq!(dst.range.len(), src.len());
        if !dst.buf.half {
            return self.write(dst.buf, dst.range.start * 4, bytemuck::cast_slice(src));
        }
        let Range { start, end } = dst.range;
        assert!(start % 2 == 0 && (end % 2 == 0 || end == dst.buf.len), "an f16 upload must cover whole words");
        let mut halves: Vec<f16> = src.iter().map(|&v| f16::from_f32(v)).collect();
        halves.resize(src.len().div_ceil(2) * 2, f16::ZERO);
        self.write(dst.buf, start * 2, bytemuck::cast_slice(&halves));
    }

    fn upload_index(&self, dst: ViewMut<Buf>, src: &[u32]) {
        assert_eq!(dst.range.len(), src.len());
        self.write(dst.buf, dst.range.start * 4, bytemuck::cast_slice(src));
    }

    fn upload_images(&self, pixels: &[u8], labels: &[u8]) -> GpuImages {
        let per_part = (self.max_binding as usize / (SIDE * SIDE * 3)).max(1);
        self.upload_images_split(pixels, labels, per_part).unwrap_or_else(|e| panic!("{e:#}"))
    }

    // `copy`, `fill` and the optimizer's ops work on f32 tensors (parameters and statistics).
    fn copy(&self, src: View<Buf>, dst: ViewMut<Buf>) {
        assert_eq!(src.range.len(), dst.range.len());
        assert!(!src.buf.half && !dst.buf.half, "copy works on f32 tensors");
        self.optim("copy", dst.range.len(), [dst.range.start, src.range.start, 0], [0.0; 5], &[&src.buf.buffer, &dst.buf.buffer]);
    }

    fn fill(&self, dst: ViewMut<Buf>, value: f32) {
        assert!(!dst.buf.half, "fill works on f32 tensors");
        self.optim("fill", dst.range.len(), [dst.range.start, 0, 0], [0.0, 0.0, 0.0, value, 0.0], &[&dst.buf.buffer]);
    }

    async fn read(&self, src: View<'_, Buf>) -> Vec<f32> {
        if !src.buf.half {
            return bytemuck::cast_slice(&self.read_words(&src.buf.buffer, src.range).await).to_vec();
        }
        // Whole words: from the word holding the first value to the one holding the last.
        let Range { start, end } = src.range;
        let bytes = self.read_words(&src.buf.buffer, start / 2..end.div_ceil(2)).await;
        let halves: &[f16] = bytemuck::cast_slice(&bytes);
        halves[start % 2..start % 2 + (end - start)].iter().map(|v| v.to_f32()).collect()
    }

    fn sync(&self) -> impl Future<Output = ()> {
        self.sync_impl()
    }

    fn load_batch(&self, images: &GpuImages, index: View<Buf>, crops: View<Buf>, jitter: Option<View<Buf>>, x: &mut Buf, labels: &mut Buf) {
        let n = index.range.len();
        let unused = jitter.is_none().then(|| self.scratch("no jitter", 2));
        let (jitter_buf, jitter_off) = match &jitter {
            Some(j) => {
                assert!(j.range.len() >= 2 * n, "jitter holds (brightness, contrast) for each image");
                (&j.buf.buffer, j.range.start)
            }
            None => (unused.as_ref().expect("made above"), 0),
        };
        let params = [n, index.range.start, crops.range.start, images.split, jitter_off, jitter.is_some() as usize].map(|v| v as u32);
        let bufs = [
            &images.parts[0].buffer,
            &images.parts[1].buffer,
            &images.labels.buffer,
            &index.buf.buffer,
            &crops.buf.buffer,
            jitter_buf,
            &x.buffer,
            &labels.buffer,
        ];
        self.run("load_batch", &params, &bufs, grid(n * SIDE * SIDE * 3, 256));
    }

    fn patch_moments(&self, images: &GpuImages, index: View<Buf>, out: ViewMut<Buf>) {
        let n = index.range.len();
        assert!(out.range.start.is_multiple_of(MOMENTS) && out.range.len() >= n * MOMENTS);
        let params = [n, index.range.start, out.range.start / MOMENTS, images.split].map(|v| v as u32);
        let bufs = [&images.parts[0].buffer, &images.parts[1].buffer, &index.buf.buffer, &out.buf.buffer];
        let x_groups = n.clamp(1, 65535);
        self.run("patch_moments", &params, &bufs, [x_groups as u32, n.div_ceil(x_groups) as u32, 1]);
    }

    fn conv_forward(&self, s: ConvShape, x: &Buf, w: View<Buf>, y: &mut Buf) {
        self.label_conv("fwd", &s);
        self.conv(&s, &x.buffer, &w.buf.buffer, w.range.start, &y.buffer);
    }

    fn conv_backward_data(&self, s: ConvShape, dy: &Buf, w: View<Buf>, dx: &mut Buf) {
        let len = s.c_out * s.k * s.k * s.c_in;
        let rotated = self.scratch("rotated kernel", len);
        self.run("rotate", &Self::conv_params(&s, w.range.start, 0, 0), &[&w.buf.buffer, &rotated], grid(len, 256));
        let t = ConvShape { n: s.n, h: s.out_h(), w: s.out_w(), c_in: s.c_out, c_out: s.c_in, k: s.k, pad: s.k - 1 - s.pad };
        self.label_conv("dgrad", &s);
        self.conv(&t, &dy.buffer, &rotated, 0, &dx.buffer);
    }

    fn conv_backward_filter(&self, s: ConvShape, x: &Buf, dy: &Buf, dw: ViewMut<Buf>) {
        let (m, kdim) = (s.n * s.out_h() * s.out_w(), s.k * s.k * s.c_in);
        let tiled = self.use_tiles(s.c_out);
        let (entry, tile) = if tiled { ("wgrad", TILE) } else { ("wgrad_direct", 1) };
        let tiles = s.c_out.div_ceil(tile) * kdim.div_ceil(tile);
        // Split the sum over pixels so that at least about 2048 workgroups (tiled) or
        // invocations (direct) run, and no f32 running sum covers more than 4096 pixels.
        let wanted = 2048usize.div_ceil(tiles).max(m.div_ceil(4096)).clamp(1, m.div_ceil(16));
        let split_rows = m.div_ceil(wanted).div_ceil(16) * 16;
        let splits = m.div_ceil(split_rows);
        let partials = self.scratch("wgrad partials", splits * s.c_out * kdim);
        let params = Self::conv_params(&s, dw.range.start, split_rows, splits);
        let groups = if tiled {
            [s.c_out.div_ceil(tile) as u32, kdim.div_ceil(tile) as u32, splits as u32]
        } else {
            grid(splits * s.c_out * kdim, 256)
        };
        self.label_conv("wgrad", &s);
        self.run(entry, &params, &[&x.buffer, &dy.buffer, &partials], groups);
        self.run("reduce_splits", &params, &[&dw.buf.buffer, &partials], grid(s.c_out * kdim, 256));
    }

    fn bias_gelu_forward(&self, pixels: usize, c: usize, z: &mut Buf, bias: View<Buf>, a: &mut Buf) {
        let params = Self::norm_params(pixels, c, None, bias.range.start, 0, 0.0, 0.0);
        self.run("bias_gelu_fwd", &params, &[&bias.buf.buffer, &z.buffer, &a.buffer], grid(pixels * c, 256));
    }

    fn bias_gelu_backward(&self, pixels: usize, c: usize, z: &Buf, da: &Buf, dbias: ViewMut<Buf>) {
        let params = Self::norm_params(pixels, c, None, dbias.range.start, 0, 0.0, 0.0);
        let (groups, part) = self.partials(pixels, c);
        self.run("partials_gelu_grad", &params, &[&z.buffer, &da.buffer, &part], groups);
        self.run("finalize_sum", &params, &[&dbias.buf.buffer, &part], Self::per_channel(c));
    }

    fn pool_bn_act_forward(
        &self,
        s: PoolBnShape,
        mode: BnMode,
        y: &Buf,
        beta: View<Buf>,
        running: ViewMut<Buf>,
        z: &mut Buf,
        a: &mut Buf,
        saved: &mut Buf,
    ) {
        let (c, rows) = (s.c, s.n * s.out_h() * s.out_w());
        self.pool(&s, "max_pool_fwd", &[&y.buffer, &z.buffer]);
        match mode {
            BnMode::Train { momentum, eps } => {
                let params = Self::norm_params(rows, c, None, beta.range.start, running.range.start, momentum, eps);
                let (groups, part) = self.partials(rows, c);
                self.run("partials_sum", &params, &[&z.buffer, &part], groups);
                self.run("finalize_mean", &params, &[&saved.buffer, &part], Self::per_channel(c));
                self.run("partials_sqdev", &params, &[&z.buffer, &saved.buffer, &part], groups);
                self.run("finalize_var", &params, &[&saved.buffer, &running.buf.buffer, &part], Self::per_channel(c));
            }
            BnMode::Eval { eps } => {
                let params = Self::norm_params(rows, c, None, 0, running.range.start, 0.0, eps);
                self.run("eval_stats", &params, &[&running.buf.buffer, &saved.buffer], Self::per_channel(c));
            }
        }
        let params = Self::with_act(Self::norm_params(rows, c, None, beta.range.start, 0, 0.0, 0.0), s.act);
        self.run("bn_act_apply", &params, &[&saved.buffer, &beta.buf.buffer, &z.buffer, &a.buffer], grid(rows * c, 256));
    }

    fn pool_bn_act_backward(
        &self,
        s: PoolBnShape,
        y: &Buf,
        z: &Buf,
        saved: &Buf,
        beta: View<Buf>,
        da: &mut Buf,
        dy: &mut Buf,
        dbeta: ViewMut<Buf>,
    ) {
        let (c, rows) = (s.c, s.n * s.out_h() * s.out_w());
        let (groups, part) = self.partials(rows, c);
        let means = self.scratch("bn backward means", 2 * c);
        let dz = self.scratch("bn backward dz", rows * c); // f32, whatever the activations' storage
        let params = Self::with_act(Self::norm_params(rows, c, None, beta.range.start, 0, 0.0, 0.0), s.act);
        self.run("partials_bn_bwd", &params, &[&z.buffer, &beta.buf.buffer, &da.buffer, &part, &dz], groups);
        let finalize = Self::norm_params(rows, c, None, dbeta.range.start, 0, 0.0, 0.0);
        self.run("finalize_bn_bwd", &finalize, &[&dbeta.buf.buffer, &means, &part], Self::per_channel(c));
        let bufs = [&z.buffer, &beta.buf.buffer, &saved.buffer, &da.buffer, &means, &dz];
        self.run("bn_bwd_apply", &params, &bufs, grid(rows * c, 256));
        self.pool(&s, "max_pool_bwd", &[&y.buffer, &da.buffer, &dy.buffer]);
    }

    fn max_pool_forward(&self, s: PoolBnShape, x: &Buf, y: &mut Buf) {
        self.pool(&s, "max_pool_fwd", &[&x.buffer, &y.buffer]);
    }

    fn max_pool_backward(&self, s: PoolBnShape, x: &Buf, dy: &Buf, dx: &mut Buf) {
        self.pool(&s, "max_pool_bwd", &[&x.buffer, &dy.buffer, &dx.buffer]);
    }

    fn linear_forward(&self, n: usize, c_in: usize, c_out: usize, scale: f32, x: &Buf, w: View<Buf>, y: &mut Buf) {
        let params = Self::head_params(n, c_in, c_out, w.range.start, false, scale, 0.0);
        self.run("linear_fwd", &params, &[&x.buffer, &w.buf.buffer, &y.buffer], grid(n * c_out, 256));
    }

    fn linear_backward(
        &self,
        n: usize,
        c_in: usize,
        c_out: usize,
        scale: f32,
        x: &Buf,
        w: View<Buf>,
        dy: &Buf,
        dx: &mut Buf,
        dw: ViewMut<Buf>,
    ) {
        let params = Self::head_params(n, c_in, c_out, w.range.start, false, scale, 0.0);
        self.run("linear_bwd_data", &params, &[&dy.buffer, &w.buf.buffer, &dx.buffer], grid(n * c_in, 256));
        let params = Self::head_params(n, c_in, c_out, dw.range.start, false, scale, 0.0);
        self.run("linear_bwd_filter", &params, &[&dy.buffer, &x.buffer, &dw.buf.buffer], grid(c_out * c_in, 256));
    }

    fn cross_entropy(&self, n: usize, smoothing: f32, logits: &Buf, labels: &Buf, dlogits: Option<&mut Buf>, stats: &mut Buf) {
        let groups = grid(n, 256);
        let count = (groups[0] * groups[1]) as usize;
        let part = self.scratch("loss partials", 2 * count);
        let unused = (dlogits.is_none()).then(|| self.scratch("unused gradient", n * CLASSES));
        let grad = dlogits.map_or_else(|| unused.as_ref().expect("made above"), |d| &d.buffer);
        let params = Self::head_params(n, 0, CLASSES, count, unused.is_none(), 0.0, smoothing);
        self.run("cross_entropy", &params, &[&logits.buffer, &labels.buffer, grad, &part], groups);
        self.run("cross_entropy_total", &params, &[&stats.buffer, &part], [1, 1, 1]);
    }

    fn axpby(&self, alpha: f32, x: View<Buf>, beta: f32, y: ViewMut<Buf>) {
        assert_eq!(x.range.len(), y.range.len());
        let offs = [y.range.start, x.range.start, 0];
        self.optim("axpby", y.range.len(), offs, [0.0, 0.0, 0.0, alpha, beta], &[&x.buf.buffer, &y.buf.buffer]);
    }

    fn sgd_step(&self, p: ViewMut<Buf>, g: View<Buf>, m: ViewMut<Buf>, lr: f32, wd: f32, momentum: f32) {
        let offs = [p.range.start, g.range.start, m.range.start];
        self.optim("sgd", p.range.len(), offs, [lr, wd, momentum, 0.0, 0.0], &[&g.buf.buffer, &p.buf.buffer, &m.buf.buffer]);
    }

    fn lookahead(&self, decay: f32, ema: ViewMut<Buf>, net: ViewMut<Buf>) {
        let offs = [ema.range.start, net.range.start, 0];
        self.optim("lookahead", ema.range.len(), offs, [0.0, 0.0, 0.0, decay, 0.0], &[&ema.buf.buffer, &net.buf.buffer]);
    }

    fn nesterov(&self, momentum: f32, g: View<Buf>, m: ViewMut<Buf>, out: ViewMut<Buf>) {
        assert!(g.range.len() == m.range.len() && g.range.len() == out.range.len());
        let offs = [m.range.start, g.range.start, out.range.start];
        self.optim("nesterov", g.range.len(), offs, [0.0, 0.0, momentum, 0.0, 0.0], &[&g.buf.buffer, &m.buf.buffer, &out.buf.buffer]);
    }

    fn scale_to_norm(&self, target: f32, eps: f32, x: ViewMut<Buf>) {
        let len = x.range.len();
        let parts = len.div_ceil(256).clamp(1, NORM_PARTS);
        let part = self.scratch("norm partials", NORM_PARTS);
        let params = Self::optim_params(len, [x.range.start, 0, 0], [0.0, 0.0, 0.0, target, eps], parts);
        self.run("sumsq_partials", &params, &[&x.buf.buffer, &part], [parts as u32, 1, 1]);
        self.run("scale_by_norm", &params, &[&x.buf.buffer, &part], grid(len, 256));
    }

    fn matmul(
        &self,
        (m, k, n): (usize, usize, usize),
        alpha: f32,
        a: View<Buf>,
        b: View<Buf>,
        b_transposed: bool,
        beta: f32,
        c: ViewMut<Buf>,
    ) {
        assert!(a.range.len() >= m * k && b.range.len() >= k * n && c.range.len() >= m * n, "matmul: a view is too short");
        if m * n == 0 {
            return;
        }
        // Split k where the output has too few tiles to fill the device, into ranges of at
        // least MATMUL_MIN_SPLIT_K (a multiple of the 16-deep slices).
        let tiles = m.div_ceil(TILE) * n.div_ceil(TILE);
        let wanted = MATMUL_GROUPS.div_ceil(tiles).min(k.div_ceil(MATMUL_MIN_SPLIT_K)).max(1);
        let split_k = k.div_ceil(wanted).div_ceil(16).max(1) * 16;
        let splits = k.div_ceil(split_k).max(1);
        let partials = self.scratch("matmul partials", if splits > 1 { splits * m * n } else { 1 });
        let words = [m, k, n, a.range.start, b.range.start, c.range.start, b_transposed as usize, split_k, splits].map(|v| v as u32);
        let params = [&words[..], &[f(alpha), f(beta)]].concat();
        let groups =
            [n.div_ceil(TILE), m.div_ceil(TILE), splits].map(|v| u32::try_from(v).ok().filter(|&v| v <= 65535).expect("matmul too large"));
        self.label_next(|| format!("matmul {m}×{k}×{n}{}", if b_transposed { "ᵀ" } else { "" }), 2.0 * (m * k * n) as f64);
        self.run("matmul", &params, &[&a.buf.buffer, &b.buf.buffer, &c.buf.buffer, &partials], groups);
        if splits > 1 {
            self.run("matmul_reduce", &params, &[&c.buf.buffer, &partials], grid(m * n, 256));
        }
    }
}
