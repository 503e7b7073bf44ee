// Shared by every layer kernel: one 256-byte uniform slot per dispatch
// chunk, bound as two Params blocks (see p()). `struct Params` and the
// FLAG_* constants are not declared here: the host generates them from
// their one declaration in Rust (src/params.rs) and prepends them to every
// module, with UNIFORM_VIEW_VEC4S.

// Binding 0 of every kernel: the chunk's slot. Only its first block holds
// parameters; the second is the rest of the slot (never read).
@group(0) @binding(0) var<uniform> params_slot: array<Params, 2>;

// The parameters of this dispatch: every kernel and helper reads them
// through here, at the block `zero` names (always 0, but no compiler can
// know it), so no uniform load of any kernel has a constant offset
// (kernels::tests::uniforms_are_never_read_at_constant_offsets). That is
// what keeps Mesa 22.3's lavapipe from "inlining" uniform values: it picks
// up to four values that a kernel's branches read at constant offsets of a
// uniform buffer (after its own optimisations, whatever the WGSL says) and,
// unless its first dispatch finds the variant not worth it, compiles a new
// one at every dispatch and never frees it (about 200 KiB a backward call
// on lavapipe; tests/memory.rs). A value read from the uniform buffer,
// unlike a private copy, stays uniform for WGSL's uniformity analysis
// (Tint refuses barriers under branches on private variables).
fn p() -> Params {
    return params_slot[min(params_slot[0].zero, 1u)];
}

fn has_flag(flag: u32) -> bool {
    return (p().flags & flag) != 0u;
}

// A weight as the state stores it (float16-rounded under FLAG_F16_STATE).
fn stored(v: f32) -> f32 {
    if has_flag(FLAG_F16_STATE) {
        return round_f16(v);
    }
    return v;
}

// The dx coefficients c2 and c3 (backward_finalize.wgsl) are stored times
// DX_UPSCALE, and their term of dx is scaled back by DX_DOWNSCALE in the
// fma that adds it to c1 * dy: c3 = inv^2 * b falls below float32's normal
// range once the variance passes about 1e37, where GPUs that flush
// subnormals (SwiftShader, most real ones) would drop it; stored 2^24
// larger it stays normal. Terms up to 2e31 still fit. Powers of two:
// scaling loses nothing.
const DX_UPSCALE: f32 = 16777216.0;
const DX_DOWNSCALE: f32 = 1.0 / DX_UPSCALE;

// NaN and Inf tests on the bits: GL drivers may fold float comparisons
// as if no NaN existed (GLSL does not require NaNs), integer ones they keep.
fn is_finite_f32(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) < 0x7f800000u;
}

fn is_nan_f32(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Statistics partials are scaled by the power of two that brings their
// shift (a sample of the channel) near 1: deviations from a shift of 1e18
// squared overflow float32, scaled they stay near 1. 2^-e for a shift of
// 2^e or more with e >= 20; 1 below that, where sums are exact as they
// were. A power of two: scaling loses nothing.
fn shift_scale(shift: f32) -> f32 {
    let e = (bitcast<u32>(shift) >> 23u) & 0xffu;
    if e < 147u {
        return 1.0;
    }
    // biased exponent 254 - e, at least 1 (a normal number)
    return bitcast<f32>((254u - min(e, 253u)) << 23u);
}

// 1 / shift_scale(shift), exactly: a power of two built from the bits.
// Scaled sums come back as (s * u) * u, never s / (k * k): k * k underflows
// float32 (to a subnormal, then 0) for shifts of 2^64 or more, so a
// constant channel of 1e30 got a variance of 0 / 0 and one of -1e25 with a
// variance of 2e37 one of x / 0.
fn shift_unscale(shift: f32) -> f32 {
    let e = (bitcast<u32>(shift) >> 23u) & 0xffu;
    if e < 147u {
        return 1.0;
    }
    return bitcast<f32>(min(e, 253u) << 23u);
}

fn shift_scale4(shift: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(shift_scale(shift.x), shift_scale(shift.y), shift_scale(shift.z), shift_scale(shift.w));
}
