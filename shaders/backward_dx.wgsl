// Backward, pass 3: dx = c1 * dy - m * (c2 + c3 * (x - shift)) *
// DX_DOWNSCALE (c2 and c3 are stored DX_UPSCALE larger, see params.wgsl),
// elementwise over one chunk, laid out like normalize.wgsl.

override IS_F16: bool = false;
override MASKED: bool = false;

const WG: u32 = 256u;
// (the host sets it: PlanTuning::values_per_thread)
override PER_THREAD: u32 = 4u;

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<u32>;
@group(0) @binding(3) var<storage, read> mask: array<u32>;
@group(0) @binding(4) var<storage, read> coeffs: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dx: array<u32>;
// The start of `coeffs` again (64 KiB where the device allows; the host
// prepends UNIFORM_VIEW_VEC4S), as a uniform: with UNIFORM_PARAMS the
// coefficients are read here (see kernels::KernelKey::uniform_params).
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

@compute @workgroup_size(256)
fn backward_dx(
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
            let xs = unpack2x16float(x[x_word + w]);
            let gs = unpack2x16float(dy[x_word + w]);
            var out = vec2<f32>(grad(e, walk.c, xs.x, gs.x), 0.0);
            walk = walk_next(walk);
            if e + 1u < p().chunk_elems {
                out.y = grad(e + 1u, walk.c, xs.y, gs.y);
            }
            walk = walk_next(walk);
            dx[y_word + w] = pack_f16x2(out);
        }
    } else {
        var walk = walk_at(thread * PER_THREAD);
        for (var k = 0u; k < PER_THREAD; k++) {
            let e = thread * PER_THREAD + k;
            if e >= p().chunk_elems {
                break;
            }
            let xv = bitcast<f32>(x[p().x_base + e]);
            let g = bitcast<f32>(dy[p().x_base + e]);
            dx[p().y_base + e] = bitcast<u32>(grad(e, walk.c, xv, g));
            walk = walk_next(walk);
        }
    }
}

@group(0) @binding(1) var<storage, read> x4: array<Quad>;
@group(0) @binding(2) var<storage, read> dy4: array<Quad>;
@group(0) @binding(5) var<storage, read_write> dx4: array<Quad>;

// dx = c1 * dy - (c2 + c3 * (x - shift)) * DX_DOWNSCALE for the v-th
// group of four values (masked out: dx = c1 * dy)
fn grad4_kept(v: u32, shift: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>, keep: bool) {
    let a = p().x_base / 4u + v;
    let through_stats = select(vec4<f32>(0.0), fma(unpack_quad(x4[a]) - shift, c3, c2), keep);
    dx4[p().y_base / 4u + v] = pack_quad(fma(vec4<f32>(-DX_DOWNSCALE), through_stats, c1 * unpack_quad(dy4[a])));
}

fn grad4(v: u32, shift: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>) {
    grad4_kept(v, shift, c1, c2, c3, true);
}

// inner % 16 == 0, no mask: an invocation's four vec4s share one channel.
@compute @workgroup_size(256)
fn backward_dx_inner16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let thread = (wid.x + wid.y * p().norm_groups_x) * WG + lid;
    let vecs = p().chunk_elems / 4u;
    let first = thread * PER_THREAD;
    if first >= vecs {
        return;
    }
    let k = coeffs_of(((p().chunk_start + 4u * first) / p().inner) % p().channels);
    let last = min(first + PER_THREAD, vecs);
    for (var v = first; v < last; v++) {
        grad4(v, vec4<f32>(k.x), vec4<f32>(k.y), vec4<f32>(k.z), vec4<f32>(k.w));
    }
}

// inner % 4 == 0, no mask: vec4s that share a channel, tracked.
@compute @workgroup_size(256)
fn backward_dx_inner4(
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
    var k = coeffs_of(c);
    let last = min(first + PER_THREAD, vecs);
    for (var v = first; v < last; v++) {
        grad4(v, vec4<f32>(k.x), vec4<f32>(k.y), vec4<f32>(k.z), vec4<f32>(k.w));
        i += 4u;
        if i == p().inner {
            i = 0u;
            c = select(c + 1u, 0u, c + 1u == p().channels);
            k = coeffs_of(c);
        }
    }
}

// The coefficients (shift, c1, c2, c3) of channels 4q..4q+3, one vec4 each.
fn quad_coeffs(q: u32) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(coeffs_of(4u * q), coeffs_of(4u * q + 1u), coeffs_of(4u * q + 2u), coeffs_of(4u * q + 3u)));
}

// Channels last (a mask per row if any): a channel quad down ROWS_PER_THREAD rows.
@compute @workgroup_size(256)
fn backward_dx_channels4(
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
    let k = quad_coeffs(q);
    for (var r = band.x; r < band.y; r++) {
        let v = r * quads + q;
        grad4_kept(v, k[0], k[1], k[2], k[3], !MASKED || row_masked_in(r));
    }
}

// Channels last, channels % 8 == 0 (a mask per row if any): two neighbouring quads down
// ROWS_PER_THREAD rows (as normalize_channels8).
@compute @workgroup_size(256)
fn backward_dx_channels8(
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
    let ka = quad_coeffs(q);
    let kb = quad_coeffs(q + 1u);
    for (var r = band.x; r < band.y; r++) {
        let v = r * quads + q;
        let keep = !MASKED || row_masked_in(r);
        grad4_kept(v, ka[0], ka[1], ka[2], ka[3], keep);
        grad4_kept(v + 1u, kb[0], kb[1], kb[2], kb[3], keep);
    }
}

// inner >= 16, not a multiple of 4, no mask, whole vec4s: as
// normalize_runs16, an invocation's sixteen values meet at most two
// channels.
@compute @workgroup_size(256)
fn backward_dx_runs16(
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
    let k0 = coeffs_of(two.c0);
    let k1 = coeffs_of(two.c1);
    let last = min(first + PER_THREAD, vecs);
    for (var v = first; v < last; v++) {
        let next = in_next_channel(two, v - first);
        grad4(
            v,
            select(vec4<f32>(k0.x), vec4<f32>(k1.x), next),
            select(vec4<f32>(k0.y), vec4<f32>(k1.y), next),
            select(vec4<f32>(k0.z), vec4<f32>(k1.z), next),
            select(vec4<f32>(k0.w), vec4<f32>(k1.w), next),
        );
    }
}
