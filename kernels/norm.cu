// GELU/SiLU, max-pooling and BatchNorm (γ = 1), forward and backward, over (rows, c) NHWC tensors.
// `act` selects the activation after BatchNorm (ACT_GELU or ACT_SILU, common.cuh).
// Per-channel sums are two-stage and deterministic: a `partials_*` kernel writes one pair of
// sums per (chunk of `chunk_rows` rows, channel) into part (chunks, c, 2), launched as
// (chunks, ⌈c/64⌉) blocks of 64 threads, one thread per channel; a `finalize_*` kernel adds
// the chunks in a fixed order, one block per channel.

// z += bias in place over (rows, c); a = gelu(z).
extern "C" __global__ void bias_gelu_fwd(float* z, const float* bias, float* a, unsigned rows, unsigned c) {
    FOR_EACH(e, rows * c) {
        float v = z[e] + bias[e % c];
        z[e] = v;
        a[e] = gelu(v);
    }
}

struct Pool {
    unsigned n, h, w, c, pool, oh, ow;
};

// The index in (n, h, w, c) of element i (row-major) of pooling window (b, oy, ox).
__device__ unsigned window_index(Pool s, unsigned b, unsigned oy, unsigned ox, unsigned i, unsigned ch) {
    return ((b * s.h + oy * s.pool + i / s.pool) * s.w + ox * s.pool + i % s.pool) * s.c + ch;
}

// y (n, oh, ow, c) = max-pool of x (n, h, w, c) over pool×pool windows (floor).
extern "C" __global__ void max_pool_fwd(const float* x, float* y, Pool s) {
    FOR_EACH(e, s.n * s.oh * s.ow * s.c) {
        unsigned ch = e % s.c, px = e / s.c;
        unsigned ox = px % s.ow, oy = (px / s.ow) % s.oh, b = px / (s.ow * s.oh);
        float best = -3.4e38f;
        for (unsigned i = 0; i < s.pool * s.pool; i++) best = fmaxf(best, x[window_index(s, b, oy, ox, i, ch)]);
        y[e] = best;
    }
}

// dx (n, h, w, c): dy (the pooled gradient) at the first maximum (row-major window order, as
// PyTorch) of each window of x; 0 elsewhere, also where floor pooling drops. One thread per
// window of the pooling grid extended over the whole input (⌈h/pool⌉ × ⌈w/pool⌉ per image),
// writing every position of its window, so x and dx are each touched once.
extern "C" __global__ void max_pool_bwd(const float* x, const float* dy, float* dx, Pool s) {
    unsigned wh = (s.h + s.pool - 1) / s.pool, ww = (s.w + s.pool - 1) / s.pool;
    FOR_EACH(e, s.n * wh * ww * s.c) {
        unsigned ch = e % s.c, px = e / s.c;
        unsigned ox = px % ww, oy = (px / ww) % wh, b = px / (ww * wh);
        bool pooled = oy < s.oh && ox < s.ow; // a whole window, inside the input
        unsigned arg = 0;
        float g = 0.0f;
        if (pooled) {
            float best = -3.4e38f;
            for (unsigned i = 0; i < s.pool * s.pool; i++) {
                float v = x[window_index(s, b, oy, ox, i, ch)];
                if (v > best) {
                    best = v;
                    arg = i;
                }
            }
            g = dy[((b * s.oh + oy) * s.ow + ox) * s.c + ch];
        }
        for (unsigned i = 0; i < s.pool * s.pool; i++) {
            unsigned y = oy * s.pool + i / s.pool, xx = ox * s.pool + i % s.pool;
            if (y < s.h && xx < s.w) dx[((b * s.h + y) * s.w + xx) * s.c + ch] = pooled && i == arg ? g : 0.0f;
        }
    }
}

// The channel of this thread of a `partials_*` kernel (threads past the last channel return),
// its chunk's rows [first, end), and where its pair of sums goes.
#define PARTIAL_SETUP                                             \
    unsigned ch = blockIdx.y * 64u + threadIdx.x;                 \
    if (ch >= c) return;                                          \
    unsigned first = blockIdx.x * chunk_rows;                     \
    unsigned end = min(first + chunk_rows, rows);                 \
    float* out = part + (blockIdx.x * c + ch) * 2u;

// part = (Σ x, 0) per chunk and channel.
extern "C" __global__ void partials_sum(const float* x, float* part, unsigned rows, unsigned c, unsigned chunk_rows) {
    PARTIAL_SETUP
    float s = 0.0f;
    for (unsigned row = first; row < end; row++) s += x[row * c + ch];
    out[0] = s;
    out[1] = 0.0f;
}

// part = (Σ (x − mean)², 0), with the mean in saved[0..c).
extern "C" __global__ void partials_sqdev(const float* x, const float* saved, float* part, unsigned rows, unsigned c, unsigned chunk_rows) {
    PARTIAL_SETUP
    float mean = saved[ch], s = 0.0f;
    for (unsigned row = first; row < end; row++) {
        float d = x[row * c + ch] - mean;
        s += d * d;
    }
    out[0] = s;
    out[1] = 0.0f;
}

// part = (Σ da · gelu'(z), 0): the gradient of a bias before a GELU.
extern "C" __global__ void partials_gelu_grad(const float* z, const float* da, float* part, unsigned rows, unsigned c, unsigned chunk_rows) {
    PARTIAL_SETUP
    float s = 0.0f;
    for (unsigned row = first; row < end; row++) s += da[row * c + ch] * gelu_grad(z[row * c + ch]);
    out[0] = s;
    out[1] = 0.0f;
}

// BN backward, first pass: da (rows, c) becomes dz = da · act'(z) in place; part (chunks, c, 2)
// = (Σ dz, Σ dz · x̂) with x̂ = z − β; z (rows, c), beta (c).
extern "C" __global__ void partials_bn_bwd(const float* z, const float* beta, float* da, float* part, unsigned rows, unsigned c, unsigned chunk_rows,
                                           unsigned act) {
    PARTIAL_SETUP
    float b = beta[ch], s = 0.0f, sx = 0.0f;
    for (unsigned row = first; row < end; row++) {
        float zv = z[row * c + ch];
        float dz = da[row * c + ch] * activate_grad(act, zv);
        da[row * c + ch] = dz;
        s += dz;
        sx += dz * (zv - b);
    }
    out[0] = s;
    out[1] = sx;
}

// Σ over the chunks of part for channel blockIdx.x, in a fixed order, valid in thread 0. The
// `finalize_*` kernels run one block of REDUCE_THREADS per channel.
__device__ float2 channel_total(const float* part, unsigned c, unsigned chunks) {
    float2 s = make_float2(0.0f, 0.0f);
    for (unsigned k = threadIdx.x; k < chunks; k += REDUCE_THREADS) {
        s.x += part[(k * c + blockIdx.x) * 2u];
        s.y += part[(k * c + blockIdx.x) * 2u + 1u];
    }
    return block_sum(s);
}

// out (c) = Σ (a bias gradient).
extern "C" __global__ void finalize_sum(const float* part, float* out, unsigned c, unsigned chunks) {
    float2 s = channel_total(part, c, chunks);
    if (threadIdx.x == 0) out[blockIdx.x] = s.x;
}

// saved[0..c) = the batch mean.
extern "C" __global__ void finalize_mean(const float* part, float* saved, unsigned rows, unsigned c, unsigned chunks) {
    float2 s = channel_total(part, c, chunks);
    if (threadIdx.x == 0) saved[blockIdx.x] = s.x / float(rows);
}

// saved[c..2c) = 1/std from the biased variance; running (mean, var) = momentum·running +
// (1 − momentum)·batch, with the unbiased variance.
extern "C" __global__ void finalize_var(const float* part, float* saved, float* running, unsigned rows, unsigned c, unsigned chunks,
                                        float momentum, float eps) {
    float2 s = channel_total(part, c, chunks);
    unsigned ch = blockIdx.x;
    if (threadIdx.x == 0) {
        float n = float(rows);
        float var_b = s.x / n;
        saved[c + ch] = 1.0f / sqrtf(var_b + eps);
        float unbiased = var_b * n / fmaxf(n - 1.0f, 1.0f);
        running[ch] = momentum * running[ch] + (1.0f - momentum) * saved[ch];
        running[c + ch] = momentum * running[c + ch] + (1.0f - momentum) * unbiased;
    }
}

// saved = (mean, 1/std) from the running statistics (mean, var).
extern "C" __global__ void eval_stats(const float* running, float* saved, unsigned c, float eps) {
    FOR_EACH(ch, c) {
        saved[ch] = running[ch];
        saved[c + ch] = 1.0f / sqrtf(running[c + ch] + eps);
    }
}

// dbeta (c) = Σ dz; means = (mean dz, mean dz·x̂) for `bn_bwd_apply`.
extern "C" __global__ void finalize_bn_bwd(const float* part, float* dbeta, float* means, unsigned rows, unsigned c, unsigned chunks) {
    float2 s = channel_total(part, c, chunks);
    unsigned ch = blockIdx.x;
    if (threadIdx.x == 0) {
        dbeta[ch] = s.x;
        means[ch] = s.x / float(rows);
        means[c + ch] = s.y / float(rows);
    }
}

// z (rows, c) = (pooled (rows, c) − mean)·(1/std) + β, with saved (2c) = (mean, 1/std) and
// beta (c); a (rows, c) = act(z).
extern "C" __global__ void bn_act_apply(const float* pooled, const float* saved, const float* beta, float* z, float* a, unsigned rows,
                                        unsigned c, unsigned act) {
    FOR_EACH(e, rows * c) {
        unsigned ch = e % c;
        float v = (pooled[e] - saved[ch]) * saved[c + ch] + beta[ch];
        z[e] = v;
        a[e] = activate(act, v);
    }
}

// d(pooled) = (1/std)·(dz − mean dz − x̂·mean dz·x̂).
extern "C" __global__ void bn_bwd_apply(const float* dz, const float* z, const float* beta, const float* saved, const float* means,
                                        float* dpooled, unsigned rows, unsigned c) {
    FOR_EACH(e, rows * c) {
        unsigned ch = e % c;
        float xhat = z[e] - beta[ch];
        dpooled[e] = saved[c + ch] * (dz[e] - means[ch] - xhat * means[c + ch]);
    }
}
