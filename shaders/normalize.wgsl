// y = (x - shift[c]) * scale[c] + offset[c], elementwise over one chunk.
// `affine` holds [shift | scale | offset], `channels` values each. How the
// chunk is walked is shared with dx: walk_values.wgsl (serial family) and
// walk_values_coalesced.wgsl (coalesced family); this file is what the
// normalise does with a value, and where it reads its parameters.
//
// Entry points, one per layout (the host generates them, each calling its
// walk): `normalize` (`normalize_coalesced`): any layout; float16 tensors
// are stored as packed pairs in u32 words (WGSL's core
// pack2x16float/unpack2x16float, so no SHADER_F16 is needed). The vec4
// entry points (`_inner4`, `_inner16`, `_channels4`, `_channels8`,
// `_runs16` in the serial family, see variants::Layout) read four values at a time as a `Quad`
// (float32 or float16, quad_f32.wgsl / quad_f16.wgsl).

override IS_F16: bool = false;
// the optional fused ReLU epilogue
override RELU: bool = false;

fn epilogue(v: f32) -> f32 {
    return select(v, max(v, 0.0), RELU);
}

fn epilogue4(v: vec4<f32>) -> vec4<f32> {
    return select(v, max(v, vec4<f32>(0.0)), RELU);
}

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read> x4: array<Quad>;
@group(0) @binding(2) var<storage, read> affine: array<f32>;
@group(0) @binding(2) var<storage, read> affine4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<u32>;
@group(0) @binding(3) var<storage, read_write> y4: array<Quad>;

// The start of `affine` again (64 KiB where the device allows; the host
// prepends UNIFORM_VIEW_VEC4S), as a uniform: with UNIFORM_PARAMS the
// parameters are read here (see variants::KernelKey::uniform_params).
@group(0) @binding(4) var<uniform> affine_u: array<vec4<f32>, UNIFORM_VIEW_VEC4S>;
override UNIFORM_PARAMS: bool = false;

// affine[i], through whichever binding the variant reads
fn affine_at(i: u32) -> f32 {
    if UNIFORM_PARAMS {
        return affine_u[i / 4u][i % 4u];
    }
    return affine[i];
}

// the i-th vec4 of affine
fn affine_quad(i: u32) -> vec4<f32> {
    if UNIFORM_PARAMS {
        return affine_u[i];
    }
    return affine4[i];
}

// The walks' functions (walk_values.wgsl): the parameters are (shift,
// scale, offset, unused); normalise has no mask.

fn channel_coef(c: u32) -> vec4<f32> {
    return vec4<f32>(affine_at(c), affine_at(p().channels + c), affine_at(2u * p().channels + c), 0.0);
}

// one value v of channel c
fn apply(c: u32, v: f32) -> f32 {
    let k = channel_coef(c);
    return epilogue((v - k.x) * k.y + k.z);
}

fn quad_coef(q: u32, quads: u32) -> mat4x4<f32> {
    return mat4x4<f32>(affine_quad(q), affine_quad(quads + q), affine_quad(2u * quads + q), vec4<f32>(0.0));
}

fn row_kept(r: u32) -> bool {
    return true;
}

fn map4(v: u32, k: mat4x4<f32>, keep: bool) {
    let value = unpack_quad(x4[p().x_base / 4u + v]);
    y4[p().y_base / 4u + v] = pack_quad(epilogue4(fma(value - k[0], k[1], k[2])));
}

fn map_value(at: vec2<u32>, e: u32, c: u32) {
    y[at.y] = bitcast<u32>(apply(c, bitcast<f32>(x[at.x])));
}

fn map_pair(at: vec2<u32>, e: u32, c0: u32, c1: u32) {
    let pair = unpack2x16float(x[at.x]);
    var out = vec2<f32>(apply(c0, pair.x), 0.0);
    if e + 1u < p().chunk_elems {
        out.y = apply(c1, pair.y);
    }
    y[at.y] = pack_f16x2(out);
}
