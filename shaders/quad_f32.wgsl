// Four values of a float32 tensor in the vec4 layouts: one vec4<f32>; the
// two-quad kernels (Channels8) read eight as an Octet, one column per quad.
// (quad_f16.wgsl is the float16 form; the host picks one per dtype.)
alias Quad = vec4<f32>;

fn unpack_quad(q: Quad) -> vec4<f32> {
    return q;
}

fn pack_quad(v: vec4<f32>) -> Quad {
    return v;
}

alias Octet = mat2x4<f32>;

fn unpack_octet(o: Octet) -> mat2x4<f32> {
    return o;
}

fn pack_octet(m: mat2x4<f32>) -> Octet {
    return m;
}
