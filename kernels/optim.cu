// Updates over windows of the flat buffers: the SGD step, lookahead, Nesterov momentum
// (Muon), scaling to a norm, and the small vector ops (axpby, fill). Every pointer is already
// offset to its window of `len` values.

// PyTorch SGD, Nesterov, dampening 0: g += wd·p; m = momentum·m + g; p -= lr·(g + momentum·m).
extern "C" __global__ void sgd(float* p, const float* g, float* m, unsigned len, float lr, float wd, float momentum) {
    FOR_EACH(e, len) {
        float grad = g[e] + wd * p[e];
        float mom = momentum * m[e] + grad;
        m[e] = mom;
        p[e] -= lr * (grad + momentum * mom);
    }
}

// Lookahead with decay a: ema += (1 − a)(net − ema); net = ema.
extern "C" __global__ void lookahead(float* ema, float* net, unsigned len, float a) {
    FOR_EACH(e, len) {
        float v = ema[e] + (1.0f - a) * (net[e] - ema[e]);
        ema[e] = v;
        net[e] = v;
    }
}

// Nesterov momentum without the step: m = momentum·m + g; out = g + momentum·m.
// g, m, out (len).
extern "C" __global__ void nesterov(const float* g, float* m, float* out, unsigned len, float momentum) {
    FOR_EACH(e, len) {
        float mom = momentum * m[e] + g[e];
        m[e] = mom;
        out[e] = g[e] + momentum * mom;
    }
}

// First pass of scale_to_norm: part (gridDim.x) = Σ x² over the values of x (len) this block
// visits (grid-stride), as a fixed tree. Blocks of REDUCE_THREADS threads.
extern "C" __global__ void sum_squares(const float* x, float* part, unsigned len) {
    float s = 0.0f;
    FOR_EACH(e, len) s = fmaf(x[e], x[e], s);
    float2 total = block_sum(make_float2(s, 0.0f));
    if (threadIdx.x == 0) part[blockIdx.x] = total.x;
}

// Second pass: x (len) *= target / (‖x‖ + eps), ‖x‖² = Σ part (parts), the partials of
// `sum_squares`. Every block adds them in the same fixed order, so all scale by the same
// value. Blocks of REDUCE_THREADS threads.
extern "C" __global__ void scale_by_norm(float* x, const float* part, unsigned len, unsigned parts, float target, float eps) {
    float s = 0.0f;
    for (unsigned k = threadIdx.x; k < parts; k += REDUCE_THREADS) s += part[k];
    __shared__ float scale;
    float2 total = block_sum(make_float2(s, 0.0f));
    if (threadIdx.x == 0) scale = target / (sqrtf(total.x) + eps);
    __syncthreads();
    float k = scale;
    FOR_EACH(e, len) x[e] *= k;
}

// y = a · x + b · y; x, y (len).
extern "C" __global__ void axpby(float* y, const float* x, unsigned len, float a, float b) {
    FOR_EACH(e, len) y[e] = fmaf(a, x[e], b * y[e]);
}

// y = a
extern "C" __global__ void fill(float* y, unsigned len, float a) {
    FOR_EACH(e, len) y[e] = a;
}
