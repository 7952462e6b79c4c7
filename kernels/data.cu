// Batches from the u8 dataset resident on the GPU (NHWC), and the per-image patch moments
// for the whitening layer.

__device__ unsigned reflect32(int i) {
    int r = abs(i);
    return r > 31 ? 62 - r : r;
}

// x (n, 32, 32, 3) = normalise(view crops[b] of image index[b]), labels (n) = its label:
// the source pixel of (y, x) is (reflect(y + dy), reflect(x + dx)), mirrored first when flip.
// images (N, 32, 32, 3) u8 and all_labels (N) u8 are the dataset; index (n), crops (n) packed
// `Crop`s. jitter (n, 2) = (brightness, contrast) per image, or null: every value of image b
// becomes (normalised + brightness) · contrast.
extern "C" __global__ void load_batch(const unsigned char* images, const unsigned char* all_labels, const unsigned* index,
                                      const unsigned* crops, const float* jitter, float* x, unsigned* labels, unsigned n) {
    const float channel_mean[3] = {0.4914f, 0.4822f, 0.4465f};
    const float channel_std[3] = {0.2470f, 0.2435f, 0.2616f};
    FOR_EACH(e, n * 3072u) {
        unsigned b = e / 3072u, c = e % 3u, xx = (e / 3u) % 32u, y = (e / 96u) % 32u;
        unsigned image = index[b], crop = crops[b];
        int dy = int(crop & 7u) - 3, dx = int((crop >> 3) & 7u) - 3;
        unsigned sy = reflect32(int(y) + dy), sx = reflect32(int(xx) + dx);
        if ((crop >> 6) & 1u) sx = 31u - sx;
        float v = float(images[(size_t)image * 3072u + (sy * 32u + sx) * 3u + c]) / 255.0f;
        float normalised = (v - channel_mean[c]) / channel_std[c];
        x[e] = jitter ? (normalised + jitter[2u * b]) * jitter[2u * b + 1u] : normalised;
        if (e % 3072u == 0u) labels[b] = all_labels[image];
    }
}

// moments (n, 156): for image index[b], over its 31×31 2×2 patches q of pixel values − 128
// (in PyTorch's (c, ky, kx) order): Σ q qᵀ (144 values) then Σ q (12). Integers below 2^24
// in magnitude, so exact as f32. One block of 156 threads per image, one thread per value.
extern "C" __global__ void patch_moments(const unsigned char* images, const unsigned* index, float* moments, unsigned n) {
    unsigned b = blockIdx.x, t = threadIdx.x;
    if (b >= n || t >= 156u) return;
    const unsigned char* image = images + (size_t)index[b] * 3072u;
    bool product = t < 144u;
    unsigned i = product ? t / 12u : t - 144u;
    unsigned j = product ? t % 12u : t - 144u;
    unsigned at_i = ((i / 2u) % 2u * 32u + i % 2u) * 3u + i / 4u;
    unsigned at_j = ((j / 2u) % 2u * 32u + j % 2u) * 3u + j / 4u;
    int s = 0;
    for (unsigned y = 0; y < 31u; y++) {
        for (unsigned x = 0; x < 31u; x++) {
            unsigned corner = (y * 32u + x) * 3u;
            int qi = int(image[corner + at_i]) - 128;
            s += product ? qi * (int(image[corner + at_j]) - 128) : qi;
        }
    }
    moments[b * 156u + t] = float(s);
}
