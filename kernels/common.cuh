// Shared helpers, prepended to every kernel family at load time (NVRTC compiles each family
// as one program, so there is no include path to set up). Kernels are launched with 1-D
// grids and walk their elements with a grid-stride loop.

#define FOR_EACH(e, count) \
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < (count); e += gridDim.x * blockDim.x)

// Threads per block of every kernel that sums over its block with `block_sum`.
#define REDUCE_THREADS 256

// Σ of v over the block's REDUCE_THREADS threads as a tree in a fixed order (deterministic,
// no atomics); the result is valid in thread 0. Every thread must call it.
__device__ float2 block_sum(float2 v) {
    __shared__ float2 sums[REDUCE_THREADS];
    unsigned t = threadIdx.x;
    sums[t] = v;
    __syncthreads();
    for (unsigned stride = REDUCE_THREADS / 2; stride > 0; stride /= 2) {
        if (t < stride) {
            sums[t].x += sums[t + stride].x;
            sums[t].y += sums[t + stride].y;
        }
        __syncthreads();
    }
    float2 total = sums[0];
    __syncthreads(); // sums is free for the next call
    return total;
}

// erf to about 1e-7 (the rational approximation the CPU and WGSL backends use).
__device__ float erf_approx(float x_in) {
    float x = fminf(fmaxf(x_in, -4.0f), 4.0f);
    float x2 = x * x;
    float p = -2.7261423e-10f;
    p = fmaf(p, x2, 2.7706814e-8f);
    p = fmaf(p, x2, -2.101024e-6f);
    p = fmaf(p, x2, -5.6925066e-5f);
    p = fmaf(p, x2, -7.349906e-4f);
    p = fmaf(p, x2, -2.9546002e-3f);
    p = fmaf(p, x2, -1.6096034e-2f);
    float q = -1.4566072e-5f;
    q = fmaf(q, x2, -2.1337406e-4f);
    q = fmaf(q, x2, -1.682827e-3f);
    q = fmaf(q, x2, -7.373329e-3f);
    q = fmaf(q, x2, -1.426474e-2f);
    return x * p / q;
}

// GELU with the exact erf: z·Φ(z).
__device__ float gelu(float z) {
    return 0.5f * z * (1.0f + erf_approx(z * 0.70710678f));
}

// d/dz GELU(z) = Φ(z) + z·φ(z).
__device__ float gelu_grad(float z) {
    return 0.5f * (1.0f + erf_approx(z * 0.70710678f)) + z * 0.3989423f * expf(-0.5f * z * z);
}

// SiLU: z·σ(z).
__device__ float silu(float z) {
    return z / (1.0f + expf(-z));
}

// d/dz SiLU(z) = σ(z)·(1 + z·(1 − σ(z))).
__device__ float silu_grad(float z) {
    float sigmoid = 1.0f / (1.0f + expf(-z));
    return sigmoid * (1.0f + z * (1.0f - sigmoid));
}

// The activation after BatchNorm, as a kernel argument (`Act` on the host).
#define ACT_GELU 0u
#define ACT_SILU 1u

__device__ float activate(unsigned act, float z) {
    return act == ACT_SILU ? silu(z) : gelu(z);
}

__device__ float activate_grad(unsigned act, float z) {
    return act == ACT_SILU ? silu_grad(z) : gelu_grad(z);
}
