// Float32 to float16 with the cases WGSL leaves open made exact: a value
// outside float16's finite range, or a NaN, converts to an indeterminate
// value in pack2x16float (WGSL § floating point conversion), not to
// +-Inf or NaN. Shared by every module that stores float16.

// 65504, float16's largest finite value, and 65520: from there on a value
// rounds to infinity (round to nearest even)
const F16_MAX_BITS: u32 = 0x477fe000u;
const F16_INF_FROM_BITS: u32 = 0x477ff000u;

fn f16_bits(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    let sign = (bits >> 16u) & 0x8000u;
    let magnitude = bits & 0x7fffffffu;
    if magnitude > 0x7f800000u {
        return sign | 0x7e00u;
    }
    if magnitude >= F16_INF_FROM_BITS {
        return sign | 0x7c00u;
    }
    if magnitude > F16_MAX_BITS {
        return sign | 0x7bffu;
    }
    return pack2x16float(vec2<f32>(v, 0.0)) & 0xffffu;
}

// pack2x16float for every input: in range (the common case) as it is
fn pack_f16x2(v: vec2<f32>) -> u32 {
    let magnitude = bitcast<vec2<u32>>(v) & vec2<u32>(0x7fffffffu);
    if all(magnitude <= vec2<u32>(F16_MAX_BITS)) {
        return pack2x16float(v);
    }
    return f16_bits(v.x) | (f16_bits(v.y) << 16u);
}

// v rounded to float16 and back
fn round_f16(v: f32) -> f32 {
    return unpack2x16float(f16_bits(v)).x;
}
