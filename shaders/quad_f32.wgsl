// Four values of a float32 tensor in the vec4 layouts: one vec4<f32>.
// (quad_f16.wgsl is the float16 form; the host picks one per dtype.)
alias Quad = vec4<f32>;

fn unpack_quad(q: Quad) -> vec4<f32> {
    return q;
}

fn pack_quad(v: vec4<f32>) -> Quad {
    return v;
}
