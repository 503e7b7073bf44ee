// y = (x - shift[c]) * scale[c] + offset[c], elementwise over one chunk.
// `affine` holds [shift | scale | offset], `channels` values each.
//
// `normalize`: any layout; float16 tensors are stored as packed pairs in u32
// words (WGSL's core pack2x16float/unpack2x16float, so no SHADER_F16 is
// needed) and each invocation owns whole words so no two write one word.
// The vec4 entry points (`_inner4`, `_inner16`, `_channels4`, `_channels8`,
// `_runs16`, see plan::Layout) read four values at a time as a `Quad`
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

const WG: u32 = 256u;
// elements (f32), words (f16) or vec4s per invocation: lavapipe streams
// fastest with four consecutive vec4s per invocation
// (the host sets it: PlanTuning::values_per_thread)
override PER_THREAD: u32 = 4u;

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read> x4: array<Quad>;
@group(0) @binding(2) var<storage, read> affine: array<f32>;
@group(0) @binding(2) var<storage, read> affine4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<u32>;
@group(0) @binding(3) var<storage, read_write> y4: array<Quad>;

// the i-th group of four values of the chunk
fn map4(i: u32, shift: vec4<f32>, scale: vec4<f32>, offset: vec4<f32>) {
    let v = unpack_quad(x4[p().x_base / 4u + i]);
    y4[p().y_base / 4u + i] = pack_quad(epilogue4(fma(v - shift, scale, offset)));
}
// The start of `affine` again (64 KiB where the device allows; the host
// prepends UNIFORM_VIEW_VEC4S), as a uniform: with UNIFORM_PARAMS the
// parameters are read here (see kernels::KernelKey::uniform_params).
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

fn apply(c: u32, v: f32) -> f32 {
    return epilogue((v - affine_at(c)) * affine_at(p().channels + c) + affine_at(2u * p().channels + c));
}

@compute @workgroup_size(256)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    if IS_F16 {
        let x_word = p().x_base / 2u;
        let y_word = p().y_base / 2u;
        var walk = walk_at(2u * thread * PER_THREAD);
        for (var k = 0u; k < PER_THREAD; k++) {
            let w = thread * PER_THREAD + k;
            let e = 2u * w;
            if e >= p().chunk_elems {
                break;
            }
            let pair = unpack2x16float(x[x_word + w]);
            var out = vec2<f32>(apply(walk.c, pair.x), 0.0);
            walk = walk_next(walk);
            if e + 1u < p().chunk_elems {
                out.y = apply(walk.c, pair.y);
            }
            walk = walk_next(walk);
            y[y_word + w] = pack_f16x2(out);
        }
    } else {
        var walk = walk_at(thread * PER_THREAD);
        for (var k = 0u; k < PER_THREAD; k++) {
            let e = thread * PER_THREAD + k;
            if e >= p().chunk_elems {
                break;
            }
            y[p().y_base + e] = bitcast<u32>(apply(walk.c, bitcast<f32>(x[p().x_base + e])));
            walk = walk_next(walk);
        }
    }
}

// inner % 4 == 0: the four lanes of a vec4 share one channel. Each
// invocation walks four consecutive vec4s and finds the channel once.
@compute @workgroup_size(256)
fn normalize_inner4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    let vecs = p().chunk_elems / 4u;
    let first = thread * PER_THREAD;
    if first >= vecs {
        return;
    }
    let e = p().chunk_start + 4u * first;
    var c = (e / p().inner) % p().channels;
    var i = e % p().inner;
    // parameters are loaded once per channel the invocation meets, not per vec4
    var shift = affine_at(c);
    var scale = affine_at(p().channels + c);
    var offset = affine_at(2u * p().channels + c);
    let last = min(first + PER_THREAD, vecs);
    for (var v = first; v < last; v++) {
        map4(v, vec4<f32>(shift), vec4<f32>(scale), vec4<f32>(offset));
        i += 4u;
        if i == p().inner {
            i = 0u;
            c = select(c + 1u, 0u, c + 1u == p().channels);
            shift = affine_at(c);
            scale = affine_at(p().channels + c);
            offset = affine_at(2u * p().channels + c);
        }
    }
}

// inner % 16 == 0: an invocation's four vec4s lie in one run of one
// channel, so it needs no tracking at all (lavapipe is bound by instruction
// count here, not memory).
@compute @workgroup_size(256)
fn normalize_inner16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    let vecs = p().chunk_elems / 4u;
    let first = thread * PER_THREAD;
    if first >= vecs {
        return;
    }
    let c = ((p().chunk_start + 4u * first) / p().inner) % p().channels;
    let shift = affine_at(c);
    let scale = affine_at(p().channels + c);
    let offset = affine_at(2u * p().channels + c);
    let last = min(first + PER_THREAD, vecs);
    for (var v = first; v < last; v++) {
        map4(v, vec4<f32>(shift), vec4<f32>(scale), vec4<f32>(offset));
    }
}

// Channels last: the four lanes are four consecutive channels. Invocation
// (quad q, band b) loads its quad's parameters once and walks ROWS_PER_THREAD
// rows; neighbouring invocations read neighbouring vec4s of each row.
@compute @workgroup_size(256)
fn normalize_channels4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    let quads = p().channels / 4u;
    let q = thread % quads;
    let band = row_band(thread, quads);
    if band.x >= band.y {
        return;
    }
    let shift = affine_quad(q);
    let scale = affine_quad(quads + q);
    let offset = affine_quad(2u * quads + q);
    for (var r = band.x; r < band.y; r++) {
        let v = r * quads + q;
        map4(v, shift, scale, offset);
    }
}

// Channels last, channels % 8 == 0: as normalize_channels4 with two
// neighbouring quads per invocation, so a SIMD group of eight writes 256
// contiguous bytes of a row per step.
@compute @workgroup_size(256)
fn normalize_channels8(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    let quads = p().channels / 4u;
    let pairs = quads / 2u;
    let q = 2u * (thread % pairs);
    let band = row_band(thread, pairs);
    if band.x >= band.y {
        return;
    }
    let shift_a = affine_quad(q);
    let scale_a = affine_quad(quads + q);
    let offset_a = affine_quad(2u * quads + q);
    let shift_b = affine_quad(q + 1u);
    let scale_b = affine_quad(quads + q + 1u);
    let offset_b = affine_quad(2u * quads + q + 1u);
    for (var r = band.x; r < band.y; r++) {
        let v = r * quads + q;
        map4(v, shift_a, scale_a, offset_a);
        map4(v + 1u, shift_b, scale_b, offset_b);
    }
}

// inner >= 16, not a multiple of 4 (e.g. 7x7), whole vec4s: an invocation's
// four vec4s meet at most two channels; each lane takes its channel's
// parameters by select.
@compute @workgroup_size(256)
fn normalize_runs16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    let vecs = p().chunk_elems / 4u;
    let first = thread * PER_THREAD;
    if first >= vecs {
        return;
    }
    let two = two_channels(4u * first);
    let c = p().channels;
    let shift = vec2<f32>(affine_at(two.c0), affine_at(two.c1));
    let scale = vec2<f32>(affine_at(c + two.c0), affine_at(c + two.c1));
    let offset = vec2<f32>(affine_at(2u * c + two.c0), affine_at(2u * c + two.c1));
    let last = min(first + PER_THREAD, vecs);
    for (var v = first; v < last; v++) {
        let next = in_next_channel(two, v - first);
        map4(
            v,
            select(vec4<f32>(shift.x), vec4<f32>(shift.y), next),
            select(vec4<f32>(scale.x), vec4<f32>(scale.y), next),
            select(vec4<f32>(offset.x), vec4<f32>(offset.y), next),
        );
    }
}
