// Four values of a float16 tensor in the vec4 layouts: four halves in one
// vec2<u32>, one 8-byte load or store, computed in float32.
// (quad_f32.wgsl is the float32 form; the host picks one per dtype.)
alias Quad = vec2<u32>;

fn unpack_quad(q: Quad) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
}

fn pack_quad(v: vec4<f32>) -> Quad {
    return Quad(pack_f16x2(v.xy), pack_f16x2(v.zw));
}
