//! cuBLAS SGEMM for `Backend::matmul`: one handle bound to the backend's stream, so its
//! launches are captured into the step graphs like the kernels', with a workspace of its own
//! (cuBLAS must not allocate one while a graph is being captured).

use cudarc::cublas::{sys as blas, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut};
use std::sync::Arc;

/// Bytes of the cuBLAS workspace: NVIDIA's recommendation for Hopper (32 MiB; 4 MiB suffices
/// for older GPUs).
const WORKSPACE: usize = 32 << 20;

/// The cuBLAS handle and its workspace (dropped in this order: the handle first).
pub(super) struct Blas {
    handle: CudaBlas,
    /// (WORKSPACE) bytes, cuBLAS's for the life of the handle.
    _workspace: CudaSlice<u8>,
}

impl Blas {
    /// A handle on `stream` with its own workspace, with TF32 math or exact f32 (`tf32`).
    pub fn new(stream: Arc<CudaStream>, tf32: bool) -> anyhow::Result<Blas> {
        let handle = CudaBlas::new(stream.clone()).map_err(|e| anyhow::anyhow!("cannot start cuBLAS: {e:?}"))?;
        let mut workspace = stream.alloc_zeros::<u8>(WORKSPACE)?;
        {
            let (ptr, _sync) = workspace.device_ptr_mut(&stream);
            // SAFETY: a live handle and a device buffer of WORKSPACE bytes that lives as long
            // as the handle (field order). Set after `CudaBlas::new`'s cublasSetStream, which
            // resets the workspace to cuBLAS's own pool.
            unsafe { blas::cublasSetWorkspace_v2(*handle.handle(), ptr as *mut _, WORKSPACE) }
                .result()
                .map_err(|e| anyhow::anyhow!("cannot set the cuBLAS workspace: {e:?}"))?;
        }
        let blas = Blas { handle, _workspace: workspace };
        blas.set_tf32(tf32);
        Ok(blas)
    }

    /// TF32 tensor-core math (as the convolutions' default) or exact f32 FMA math.
    pub fn set_tf32(&self, on: bool) {
        let mode = if on { blas::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { blas::cublasMath_t::CUBLAS_DEFAULT_MATH };
        // SAFETY: a live handle; the call only sets a mode on it.
        unsafe { blas::cublasSetMathMode(*self.handle.handle(), mode) }
            .result()
            .unwrap_or_else(|e| panic!("cublasSetMathMode failed: {e:?}"));
    }

    /// cuBLAS's version number (e.g. 130100 for 13.1.0).
    pub fn version(&self) -> i32 {
        let mut version = 0;
        // SAFETY: a live handle; the call only writes the int.
        unsafe { blas::cublasGetVersion_v2(*self.handle.handle(), &mut version) };
        version
    }

    /// Row-major `c (m, n) = alpha · a (m, k) · b (k, n) + beta · c`, `b` stored `(n, k)`
    /// when `b_transposed`. cuBLAS is column-major, where a row-major `(r, s)` matrix is its
    /// transpose `(s, r)`: so it computes `cᵀ (n, m) = bᵀ (n, k) · aᵀ (k, m)`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        (m, k, n): (usize, usize, usize),
        alpha: f32,
        a: &CudaView<f32>,
        b: &CudaView<f32>,
        b_transposed: bool,
        beta: f32,
        c: &mut CudaViewMut<f32>,
    ) {
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matmul views shorter than ({m}, {k}) · ({k}, {n})");
        if m == 0 || n == 0 {
            return;
        }
        let int = |v: usize| i32::try_from(v.max(1)).expect("matmul sizes fit in i32");
        use blas::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        // b (k, n) row-major is bᵀ column-major with leading dimension n; b stored (n, k)
        // row-major is b column-major (k, n), leading dimension k, used transposed.
        let (transa, lda) = if b_transposed { (CUBLAS_OP_T, int(k)) } else { (CUBLAS_OP_N, int(n)) };
        let cfg = GemmConfig {
            transa,
            transb: CUBLAS_OP_N,
            m: int(n),
            n: int(m),
            k: i32::try_from(k).expect("matmul sizes fit in i32"),
            alpha,
            lda,
            ldb: int(k), // a (m, k) row-major = aᵀ (k, m) column-major
            beta,
            ldc: int(n), // c (m, n) row-major = cᵀ (n, m) column-major
        };
        // SAFETY: the asserts above keep every index cuBLAS reads or writes inside the views;
        // alpha and beta are host values (the handle's default pointer mode).
        if let Err(e) = unsafe { self.handle.gemm(cfg, b, a, c) } {
            panic!("cuBLAS SGEMM ({m}, {k}) · ({k}, {n}) failed: {e:?}");
        }
    }
}
