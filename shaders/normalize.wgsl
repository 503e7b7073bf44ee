// y = (x - shift[c]) * scale[c] + offset[c], elementwise over one chunk.
// float16 tensors are stored as packed pairs in u32 words (WGSL's core
// pack2x16float/unpack2x16float, so no SHADER_F16 is needed); each
// invocation then owns whole words so no two invocations write one word.

override IS_F16: bool = false;

const WG: u32 = 256u;
// elements (f32) or words (f16) per invocation
const PER_THREAD: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> affine: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<u32>;

// `e` is the element's index within the chunk
fn apply(e: u32, v: f32) -> f32 {
    let a = affine[((p.chunk_start + e) / p.inner) % p.channels];
    return (v - a.x) * a.y + a.z;
}

@compute @workgroup_size(256)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p.norm_groups_x) * WG + lid;
    if IS_F16 {
        let x_word = p.x_base / 2u;
        let y_word = p.y_base / 2u;
        for (var k = 0u; k < PER_THREAD; k++) {
            let w = thread * PER_THREAD + k;
            let e = 2u * w;
            if e >= p.chunk_elems {
                break;
            }
            let pair = unpack2x16float(x[x_word + w]);
            var out = vec2<f32>(apply(e, pair.x), 0.0);
            if e + 1u < p.chunk_elems {
                out.y = apply(e + 1u, pair.y);
            }
            y[y_word + w] = pack2x16float(out);
        }
    } else {
        for (var k = 0u; k < PER_THREAD; k++) {
            let e = thread * PER_THREAD + k;
            if e >= p.chunk_elems {
                break;
            }
            y[p.y_base + e] = bitcast<u32>(apply(e, bitcast<f32>(x[p.x_base + e])));
        }
    }
}
