// Backward, pass 3: dx = c1 * dy - m * (c2 + c3 * (x - shift)), elementwise
// over one chunk, laid out like normalize.wgsl.

override IS_F16: bool = false;
override MASKED: bool = false;

const WG: u32 = 256u;
const PER_THREAD: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<u32>;
@group(0) @binding(3) var<storage, read> mask: array<u32>;
@group(0) @binding(4) var<storage, read> coeffs: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dx: array<u32>;

// `e` is the element's index within the chunk
fn grad(e: u32, xv: f32, g: f32) -> f32 {
    let a = p.chunk_start + e;
    let k = coeffs[(a / p.inner) % p.channels];
    var out = k.y * g;
    if !MASKED || masked_in(a) {
        out -= k.z + k.w * (xv - k.x);
    }
    return out;
}

@compute @workgroup_size(256)
fn backward_dx(
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
            let xs = unpack2x16float(x[x_word + w]);
            let gs = unpack2x16float(dy[x_word + w]);
            var out = vec2<f32>(grad(e, xs.x, gs.x), 0.0);
            if e + 1u < p.chunk_elems {
                out.y = grad(e + 1u, xs.y, gs.y);
            }
            dx[y_word + w] = pack2x16float(out);
        }
    } else {
        for (var k = 0u; k < PER_THREAD; k++) {
            let e = thread * PER_THREAD + k;
            if e >= p.chunk_elems {
                break;
            }
            let xv = bitcast<f32>(x[p.x_base + e]);
            let g = bitcast<f32>(dy[p.x_base + e]);
            dx[p.y_base + e] = bitcast<u32>(grad(e, xv, g));
        }
    }
}
