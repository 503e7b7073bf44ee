// Shared by every kernel: one 256-byte uniform slot per dispatch chunk,
// bound as two Params blocks (see p()). The struct mirrors
// `kernels::Params` in Rust field for field.
struct Params {
    channels: u32,
    inner: u32,
    // absolute index of the chunk's first element; chunks are flat ranges
    // of the canonical [outer, channels, inner] view
    chunk_start: u32,
    // element offset of the chunk's first element inside the x binding
    x_base: u32,
    // element offset of the chunk's first element inside the y binding
    y_base: u32,
    // the mask broadcasts over the input's last axis, of this size
    last_dim: u32,
    // coalesced channels-last reductions: lanes across a row (a power of two)
    lane_width: u32,
    // statistics: values of one channel each invocation reduces
    elems_per_thread: u32,
    // statistics tiles per channel in this chunk, where they start in the
    // channel's row of partials, and how long that row is
    tiles: u32,
    tile_offset: u32,
    total_tiles: u32,
    // x extent of the 2-D grids (over 65535 workgroups need a second dimension)
    stats_groups_x: u32,
    norm_groups_x: u32,
    finalize_groups_x: u32,
    // elements in this chunk
    chunk_elems: u32,
    flags: u32,
    momentum: f32,
    epsilon: f32,
    renorm_momentum: f32,
    rmin: f32,
    rmax: f32,
    dmax: f32,
    // regularizer factors, added to dgamma / dbeta when asked
    gamma_l1: f32,
    gamma_l2: f32,
    beta_l1: f32,
    beta_l2: f32,
    // coalesced channels-last reductions: workgroups across a row's columns
    column_blocks: u32,
    // coalesced elementwise kernels: strides each invocation takes
    elementwise_steps: u32,
    // floats from one state slot to the next (channels, rounded up to the
    // storage offset alignment: each slot is bindable on its own)
    state_stride: u32,
    // to a multiple of 16 bytes
    // always 0: which block of the slot holds these (see p())
    zero: u32,
    _pad1: u32,
    _pad2: u32,
}

const FLAG_MASKED: u32 = 1u;
const FLAG_TRAINING: u32 = 2u;
const FLAG_RENORM: u32 = 4u;
const FLAG_CENTER: u32 = 8u;
const FLAG_SCALE: u32 = 16u;
const FLAG_RMIN: u32 = 32u;
const FLAG_RMAX: u32 = 64u;
const FLAG_DMAX: u32 = 128u;
const FLAG_GAMMA_L1: u32 = 256u;
const FLAG_GAMMA_L2: u32 = 512u;
const FLAG_BETA_L1: u32 = 1024u;
const FLAG_BETA_L2: u32 = 2048u;
const FLAG_PYTORCH: u32 = 4096u;
// synchronized calls, first phase: the finalize kernels merge the tiles
// into one partial a channel, write it out and stop
const FLAG_MERGE_ONLY: u32 = 8192u;
// StatePrecision::Float16: weights round to float16 when written
const FLAG_F16_STATE: u32 = 16384u;

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
