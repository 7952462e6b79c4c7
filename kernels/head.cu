// The classifier head: linear layer (no bias) forward and backward, and the label-smoothed
// cross-entropy summed over the batch.

// out (n, m) = scale · a (n, k) · M, with M[kk][j] = w[j · j_stride + kk · k_stride]: both
// products with the weight w (c_out, c_in) of a linear layer (no bias): the forward
// y = x · wᵀ (k = c_in, m = c_out, strides c_in and 1) and the backward-data dx = dy · w
// (k = c_out, m = c_in, strides 1 and c_in).
extern "C" __global__ void linear_product(const float* a, const float* w, float* out, unsigned n, unsigned k, unsigned m, unsigned j_stride,
                                          unsigned k_stride, float scale) {
    FOR_EACH(e, n * m) {
        unsigned b = e / m, j = e % m;
        float s = 0.0f;
        for (unsigned kk = 0; kk < k; kk++) s = fmaf(a[b * k + kk], w[j * j_stride + kk * k_stride], s);
        out[e] = scale * s;
    }
}

// dw (c_out, c_in) = scale · dyᵀ · x: one block of REDUCE_THREADS per weight, summing over
// the batch (a loop per weight would leave most of the GPU idle: only c_out · c_in threads).
extern "C" __global__ void linear_bwd_filter(const float* dy, const float* x, float* dw, unsigned n, unsigned c_in, unsigned c_out, float scale) {
    unsigned o = blockIdx.x / c_in, i = blockIdx.x % c_in;
    float s = 0.0f;
    for (unsigned b = threadIdx.x; b < n; b += REDUCE_THREADS) s = fmaf(dy[b * c_out + o], x[b * c_in + i], s);
    float2 total = block_sum(make_float2(s, 0.0f));
    if (threadIdx.x == 0) dw[blockIdx.x] = scale * total.x;
}

// Per row of logits (n, 10): the smoothed cross-entropy and whether the argmax (first
// maximum) is the label; dlogits = its gradient when not null. Block g's two sums go to
// part[2g], part[2g + 1]. Blocks of REDUCE_THREADS threads, one row per thread.
extern "C" __global__ void cross_entropy(const float* logits, const unsigned* labels, float* dlogits, float* part, unsigned n, float smoothing) {
    unsigned b = blockIdx.x * REDUCE_THREADS + threadIdx.x;
    float loss = 0.0f, correct = 0.0f;
    if (b < n) {
        const float* l = logits + b * 10u;
        unsigned label = labels[b], arg = 0;
        float best = l[0];
        for (unsigned j = 1; j < 10u; j++) {
            if (l[j] > best) {
                best = l[j];
                arg = j;
            }
        }
        float sum = 0.0f;
        for (unsigned j = 0; j < 10u; j++) sum += expf(l[j] - best);
        float lse = best + logf(sum);
        for (unsigned j = 0; j < 10u; j++) {
            float t = smoothing / 10.0f + (j == label ? 1.0f - smoothing : 0.0f);
            loss += t * (lse - l[j]);
            if (dlogits) dlogits[b * 10u + j] = expf(l[j] - lse) - t;
        }
        correct = arg == label ? 1.0f : 0.0f;
    }
    float2 total = block_sum(make_float2(loss, correct));
    if (threadIdx.x == 0) {
        part[2 * blockIdx.x] = total.x;
        part[2 * blockIdx.x + 1] = total.y;
    }
}

// stats[0..2] += Σ part over the `blocks` blocks of `cross_entropy`, in order.
extern "C" __global__ void cross_entropy_total(const float* part, float* stats, unsigned blocks) {
    float loss = 0.0f, correct = 0.0f;
    for (unsigned g = 0; g < blocks; g++) {
        loss += part[2 * g];
        correct += part[2 * g + 1];
    }
    stats[0] += loss;
    stats[1] += correct;
}
