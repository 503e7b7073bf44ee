// Backward, pass 3: dx = c1 * dy - m * (c2 + c3 * (x - shift)) *
// DX_DOWNSCALE (c2 and c3 are stored DX_UPSCALE larger, see params.wgsl),
// elementwise over one chunk, with the normalise pass's walks and entry
// points (walk_values.wgsl, walk_values_coalesced.wgsl; normalize.wgsl):
// this file is what dx does with a value and its mask, and where it reads
// its coefficients.

override IS_F16: bool = false;
override MASKED: bool = false;

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<u32>;
@group(0) @binding(3) var<storage, read> mask: array<u32>;
@group(0) @binding(4) var<storage, read> coeffs: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dx: array<u32>;
// The start of `coeffs` again (64 KiB where the device allows; the host
// prepends UNIFORM_VIEW_VEC4S), as a uniform: with UNIFORM_PARAMS the
// coefficients are read here (see variants::KernelKey::uniform_params).
@group(0) @binding(6) var<uniform> coeffs_u: array<vec4<f32>, UNIFORM_VIEW_VEC4S>;
override UNIFORM_PARAMS: bool = false;

fn coeffs_of(c: u32) -> vec4<f32> {
    if UNIFORM_PARAMS {
        return coeffs_u[c];
    }
    return coeffs[c];
}

// `e` is the element's index within the chunk, `c` its channel
fn grad(e: u32, c: u32, xv: f32, g: f32) -> f32 {
    let k = coeffs_of(c);
    var out = k.y * g;
    if !MASKED || masked_in(p().chunk_start + e) {
        out = fma(-DX_DOWNSCALE, fma(xv - k.x, k.w, k.z), out);
    }
    return out;
}

@group(0) @binding(1) var<storage, read> x4: array<Quad>;
@group(0) @binding(2) var<storage, read> dy4: array<Quad>;
@group(0) @binding(5) var<storage, read_write> dx4: array<Quad>;

// The walks' functions (walk_values.wgsl): the parameters are the
// coefficients (shift, c1, c2, c3); masks per value, or per row in the
// channels-last layouts.

fn channel_coef(c: u32) -> vec4<f32> {
    return coeffs_of(c);
}

fn quad_coef(q: u32, quads: u32) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(coeffs_of(4u * q), coeffs_of(4u * q + 1u), coeffs_of(4u * q + 2u), coeffs_of(4u * q + 3u)));
}

fn row_kept(r: u32) -> bool {
    return !MASKED || row_masked_in(r);
}

// dx = c1 * dy - (c2 + c3 * (x - shift)) * DX_DOWNSCALE for the v-th
// group of four values (masked out: dx = c1 * dy)
fn map4(v: u32, k: mat4x4<f32>, keep: bool) {
    let a = p().x_base / 4u + v;
    let through_stats = select(vec4<f32>(0.0), fma(unpack_quad(x4[a]) - k[0], k[3], k[2]), keep);
    dx4[p().y_base / 4u + v] = pack_quad(fma(vec4<f32>(-DX_DOWNSCALE), through_stats, k[1] * unpack_quad(dy4[a])));
}

fn map_value(at: vec2<u32>, e: u32, c: u32) {
    dx[at.y] = bitcast<u32>(grad(e, c, bitcast<f32>(x[at.x]), bitcast<f32>(dy[at.x])));
}

fn map_pair(at: vec2<u32>, e: u32, c0: u32, c1: u32) {
    let xs = unpack2x16float(x[at.x]);
    let gs = unpack2x16float(dy[at.x]);
    var out = vec2<f32>(grad(e, c0, xs.x, gs.x), 0.0);
    if e + 1u < p().chunk_elems {
        out.y = grad(e + 1u, c1, xs.y, gs.y);
    }
    dx[at.y] = pack_f16x2(out);
}
