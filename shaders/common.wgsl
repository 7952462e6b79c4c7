// Shared helpers, prepended to every shader family at load time.
// Storage types come from a preamble the launcher writes before this file (wgpu/mod.rs,
// `preamble`): `H`, how activations and their gradients are stored (f32, or f16 under half
// precision, with `enable f16;`), and `Tn`, the element type of binding n in the kernel being
// built, for bindings that hold activations in some kernels of a family and f32 values in
// others. Every read converts to f32 and all math is f32; every store converts back.
// Each kernel runs in workgroups of WG invocations over a 2-D grid of workgroups (a 1-D grid
// would stop at 65535 workgroups); `flat_id` numbers the invocations 0, 1, 2, ...

const WG: u32 = 256u;

fn flat_id(wg: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lid.x;
}

// erf to about 1e-7 (the rational approximation the CPU backend uses).
fn erf_approx(x_in: f32) -> f32 {
    let x = clamp(x_in, -4.0, 4.0);
    let x2 = x * x;
    var p = -2.7261423e-10;
    p = fma(p, x2, 2.7706814e-8);
    p = fma(p, x2, -2.101024e-6);
    p = fma(p, x2, -5.6925066e-5);
    p = fma(p, x2, -7.349906e-4);
    p = fma(p, x2, -2.9546002e-3);
    p = fma(p, x2, -1.6096034e-2);
    var q = -1.4566072e-5;
    q = fma(q, x2, -2.1337406e-4);
    q = fma(q, x2, -1.682827e-3);
    q = fma(q, x2, -7.373329e-3);
    q = fma(q, x2, -1.426474e-2);
    return x * p / q;
}

// GELU with the exact erf: z·Φ(z).
fn gelu(z: f32) -> f32 {
    return 0.5 * z * (1.0 + erf_approx(z * 0.70710678));
}

// d/dz GELU(z) = Φ(z) + z·φ(z).
fn gelu_grad(z: f32) -> f32 {
    return 0.5 * (1.0 + erf_approx(z * 0.70710678)) + z * 0.3989423 * exp(-0.5 * z * z);
}

// 1 + e^(−z), the exponent clamped to stay finite (as the CPU backend's exp).
fn one_plus_exp_neg(z: f32) -> f32 {
    return 1.0 + exp(clamp(-z, -87.0, 88.0));
}

// SiLU: z·σ(z).
fn silu(z: f32) -> f32 {
    return z / one_plus_exp_neg(z);
}

// d/dz SiLU(z) = σ(z)·(1 + z·(1 − σ(z))).
fn silu_grad(z: f32) -> f32 {
    let s = 1.0 / one_plus_exp_neg(z);
    return s * (1.0 + z * (1.0 - s));
}

// A conv weight as the convolutions multiply with it: rounded to the activations' storage
// type (under half precision, the f16 copy of the weight; in f32, the weight itself).
fn weight(v: f32) -> f32 {
    return f32(H(v));
}
