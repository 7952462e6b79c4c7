// Elementwise updates over windows of the flat buffers: the SGD step, lookahead, and the
// small vector ops (axpy, fill). Every pointer is already offset to its window of `len`.

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

// y += a · x
extern "C" __global__ void axpy(float* y, const float* x, unsigned len, float a) {
    FOR_EACH(e, len) y[e] = fmaf(a, x[e], y[e]);
}

// y = a
extern "C" __global__ void fill(float* y, unsigned len, float a) {
    FOR_EACH(e, len) y[e] = a;
}
