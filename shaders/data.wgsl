// Batches from the u8 dataset resident on the GPU (packed four bytes to a u32, NHWC, split
// into two bindings so each stays under the storage-binding limit), and the per-image patch
// moments for the whitening layer.

struct Params {
    n: u32, index_off: u32,
    aux_off: u32, // load_batch: first crop; patch_moments: first output image
    split: u32,
    jitter_off: u32, // load_batch: the first value of jitter
    use_jitter: u32, // load_batch: 1 to apply the jitter, 0 when there is none
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> images0: array<u32>; // images [0, split)
@group(0) @binding(2) var<storage, read> images1: array<u32>; // images [split, ...)
@group(0) @binding(3) var<storage, read> all_labels: array<u32>;
@group(0) @binding(4) var<storage, read> index: array<u32>;
@group(0) @binding(5) var<storage, read> crops: array<u32>;
@group(0) @binding(6) var<storage, read_write> x: array<H>;        // (n, 32, 32, 3)
@group(0) @binding(7) var<storage, read_write> labels: array<u32>; // (n)
@group(0) @binding(8) var<storage, read_write> moments: array<f32>; // (n, 156)
@group(0) @binding(9) var<storage, read> jitter: array<f32>;         // (n, 2) at jitter_off


fn reflect(i: i32) -> u32 {
    var r = abs(i);
    if (r > 31) {
        r = 62 - r;
    }
    return u32(r);
}

fn pixel_byte(image: u32, at: u32) -> u32 {
    var word: u32;
    if (image < p.split) {
        word = images0[(image * 3072u + at) / 4u];
    } else {
        word = images1[((image - p.split) * 3072u + at) / 4u];
    }
    return (word >> (8u * (at % 4u))) & 255u;
}

// x[b] = normalise(view crops[crop_off + b] of image index[index_off + b]): the source pixel
// of (y, x) is (reflect(y + dy), reflect(x + dx)) of the image, mirrored first when flip.
// With use_jitter, every value of image b then becomes (x + brightness) · contrast, from
// row b of jitter.
@compute @workgroup_size(256)
fn load_batch(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_id(wg, nwg, lid);
    if (e >= p.n * 3072u) {
        return;
    }
    let b = e / 3072u;
    let c = e % 3u;
    let xx = (e / 3u) % 32u;
    let y = (e / 96u) % 32u;
    let image = index[p.index_off + b];
    let crop = crops[p.aux_off + b];
    let dy = i32(crop & 7u) - 3;
    let dx = i32((crop >> 3u) & 7u) - 3;
    let sy = reflect(i32(y) + dy);
    var sx = reflect(i32(xx) + dx);
    if (((crop >> 6u) & 1u) == 1u) {
        sx = 31u - sx;
    }
    var channel_mean = array<f32, 3>(0.4914, 0.4822, 0.4465);
    var channel_std = array<f32, 3>(0.2470, 0.2435, 0.2616);
    let v = f32(pixel_byte(image, (sy * 32u + sx) * 3u + c)) / 255.0;
    var value = (v - channel_mean[c]) / channel_std[c];
    if (p.use_jitter == 1u) {
        let row = p.jitter_off + 2u * b;
        value = (value + jitter[row]) * jitter[row + 1u];
    }
    x[e] = H(value);
    if (e % 3072u == 0u) {
        labels[b] = all_labels[image];
    }
}

// For image index[index_off + b], over its 31×31 2×2 patches q of pixel values − 128 (in
// PyTorch's (c, ky, kx) order): Σ q qᵀ (144 values) then Σ q (12), integers below 2^24 in
// magnitude, so exact as f32, to moments[aux_off + b]. One workgroup per image, one
// invocation per value.
@compute @workgroup_size(156)
fn patch_moments(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = wg.y * nwg.x + wg.x;
    if (b >= p.n) {
        return;
    }
    let image = index[p.index_off + b];
    let t = lid.x;
    let product = t < 144u;
    let i = select(t - 144u, t / 12u, product);
    let j = select(t - 144u, t % 12u, product);
    let at_i = ((i / 2u) % 2u * 32u + i % 2u) * 3u + i / 4u;
    let at_j = ((j / 2u) % 2u * 32u + j % 2u) * 3u + j / 4u;
    var s = 0i;
    for (var y = 0u; y < 31u; y++) {
        for (var x = 0u; x < 31u; x++) {
            let corner = (y * 32u + x) * 3u;
            let qi = i32(pixel_byte(image, corner + at_i)) - 128;
            s += select(qi, qi * (i32(pixel_byte(image, corner + at_j)) - 128), product);
        }
    }
    moments[(p.aux_off + b) * 156u + t] = f32(s);
}
