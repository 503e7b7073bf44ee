// The benchmark's streaming baseline: y = a * x + b over a flat buffer,
// one read and one write of every element, written the way lavapipe
// streams fastest (four consecutive vec4s per invocation, 256 invocations
// per workgroup). float16 buffers are streamed as packed words.

const WG: u32 = 256u;
const PER_THREAD: u32 = 4u;
const A: f32 = 1.5;
const B: f32 = -0.25;

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> x4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> y4: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> xf: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> yf: array<vec4<f32>>;

@compute @workgroup_size(256)
fn stream_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    let vecs = p().chunk_elems;
    for (var k = 0u; k < PER_THREAD; k++) {
        let v = thread * PER_THREAD + k;
        if v >= vecs {
            break;
        }
        yf[p().y_base + v] = xf[p().x_base + v] * A + B;
    }
}

// float16: a vec4<u32> word quad holds eight halves
@compute @workgroup_size(256)
fn stream_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    // whole 16-byte vectors: the host leaves an odd tail out
    let vecs = p().chunk_elems;
    for (var k = 0u; k < PER_THREAD; k++) {
        let v = thread * PER_THREAD + k;
        if v >= vecs {
            break;
        }
        let w = x4[p().x_base + v];
        let lo = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)) * A + B;
        let hi = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)) * A + B;
        y4[p().y_base + v] = vec4<u32>(pack2x16float(lo.xy), pack2x16float(lo.zw), pack2x16float(hi.xy), pack2x16float(hi.zw));
    }
}
