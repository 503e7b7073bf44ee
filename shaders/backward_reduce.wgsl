// Backward, pass 1: per channel tile, sum(dy) and sum(dy * (x - mean)),
// fused in one read of x and dy. Tiles and loops as in statistics.wgsl.
// The sums run over every position, masked out or not: every output
// depends on the batch statistics.
//
// sum(dy * (x - mean)) is as sensitive to the float32 error of a batch mean
// as sum(dy) is large. In training a third sum, of (x - mean) over the
// masked-in positions, measures that error (it should be Keras's
// 1e-7 * mean, or 0) so that finalize can take it out.

override IS_F16: bool = false;
override MASKED: bool = false;

const WG: u32 = 256u;

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<u32>;
// per channel: (shift, mean - shift, inverse std, r), (d, denominator, mask eps, 0)
@group(0) @binding(3) var<storage, read> saved: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;
// (sum dy, sum dy * (x - mean), sum of masked-in (x - mean), 0) per channel and tile
@group(0) @binding(5) var<storage, read_write> partials: array<vec4<f32>>;

fn load_dy(e: u32) -> f32 {
    if IS_F16 {
        return half_at(dy[e >> 1u], e);
    }
    return bitcast<f32>(dy[e]);
}

// One invocation per tile and channel, as in statistics.wgsl.
@compute @workgroup_size(256)
fn backward_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * p().channels {
        return;
    }
    let c = g % p().channels;
    let tile = g / p().channels;
    let stats = saved[2u * c];
    let shift = stats.x;
    let delta = stats.y;
    let span_j = tile_span(c, tile, p().elems_per_thread);
    let j0 = span_j.x;
    let j1 = span_j.y;
    var o = j0 / p().inner;
    var i = j0 % p().inner;
    var s_dy = 0.0;
    var s_dyx = 0.0;
    var s_xc = 0.0;
    for (var j = j0; j < j1; j++) {
        let a = (o * p().channels + c) * p().inner + i;
        let e = p().x_base + a - p().chunk_start;
        let g = load_dy(e);
        let centered = (load_x(e) - shift) - delta;
        s_dy += g;
        s_dyx += g * centered;
        if !MASKED || masked_in(a) {
            s_xc += centered;
        }
        i += 1u;
        if i == p().inner {
            i = 0u;
            o += 1u;
        }
    }
    partials[c * p().total_tiles + p().tile_offset + tile] = vec4<f32>(s_dy, s_dyx, s_xc, 0.0);
}

// the same bindings in groups of four values, by the vec4 entry points
@group(0) @binding(1) var<storage, read> x4: array<Quad>;
@group(0) @binding(2) var<storage, read> dy4: array<Quad>;

fn load_x4(i: u32) -> vec4<f32> {
    return unpack_quad(x4[i]);
}

fn load_dy4(i: u32) -> vec4<f32> {
    return unpack_quad(dy4[i]);
}

// inner % 4 == 0, no mask: vec4s of one channel, run by run.
@compute @workgroup_size(256)
fn backward_reduce_inner4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * p().channels {
        return;
    }
    let c = g % p().channels;
    let tile = g / p().channels;
    let stats = saved[2u * c];
    let center = stats.x + stats.y;
    let span = 4u * p().elems_per_thread;
    let span_j = tile_span(c, tile, span);
    let j0 = span_j.x;
    let j1 = span_j.y;
    let base = p().x_base - p().chunk_start;
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    var s_xc = vec4<f32>(0.0);
    var j = j0;
    for (var runs = 0u; runs < p().elems_per_thread && j < j1; runs++) {
        let run_end = min(j - j % p().inner + p().inner, j1);
        let first = (base + element_of(j, c)) / 4u;
        let last = first + (run_end - j) / 4u;
        for (var a = first; a < last; a++) {
            let g4 = load_dy4(a);
            let centered = (load_x4(a) - stats.x) - stats.y;
            s_dy += g4;
            s_dyx = fma(g4, centered, s_dyx);
            s_xc += centered;
        }
        j = run_end;
    }
    let ones = vec4<f32>(1.0);
    partials[c * p().total_tiles + p().tile_offset + tile] = vec4<f32>(dot(s_dy, ones), dot(s_dyx, ones), dot(s_xc, ones), 0.0);
}

// The shifts and mean - shift of channels 4q..4q+3.
fn quad_shift(q: u32) -> vec4<f32> {
    return vec4<f32>(saved[8u * q].x, saved[8u * q + 2u].x, saved[8u * q + 4u].x, saved[8u * q + 6u].x);
}

fn quad_delta(q: u32) -> vec4<f32> {
    return vec4<f32>(saved[8u * q].y, saved[8u * q + 2u].y, saved[8u * q + 4u].y, saved[8u * q + 6u].y);
}

// Channels last (a mask per row if any): a channel quad down a band of rows.
@compute @workgroup_size(256)
fn backward_reduce_channels4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let quads = p().channels / 4u;
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * quads {
        return;
    }
    let q = g % quads;
    let tile = g / quads;
    let shift = quad_shift(q);
    let delta = quad_delta(q);
    let band = tile_rows(tile);
    let r0 = band.x;
    let r1 = band.y;
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    var s_xc = vec4<f32>(0.0);
    var a = p().x_base / 4u + r0 * quads + q;
    for (var r = r0; r < r1; r++) {
        let g4 = load_dy4(a);
        let centered = (load_x4(a) - shift) - delta;
        s_dy += g4;
        s_dyx = fma(g4, centered, s_dyx);
        // a mask per row: only masked-in rows measure the mean's error
        s_xc += select(vec4<f32>(0.0), centered, !MASKED || row_masked_in(r));
        a += quads;
    }
    for (var k = 0u; k < 4u; k++) {
        partials[(4u * q + k) * p().total_tiles + p().tile_offset + tile] = vec4<f32>(s_dy[k], s_dyx[k], s_xc[k], 0.0);
    }
}

// Channels last, channels % 8 == 0 (a mask per row if any): quads 2h and 2h + 1 down a
// band of rows (as partial_stats_channels8).
@compute @workgroup_size(256)
fn backward_reduce_channels8(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let quads = p().channels / 4u;
    let pairs = quads / 2u;
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * pairs {
        return;
    }
    let q = 2u * (g % pairs);
    let tile = g / pairs;
    let shift_a = quad_shift(q);
    let delta_a = quad_delta(q);
    let shift_b = quad_shift(q + 1u);
    let delta_b = quad_delta(q + 1u);
    let band = tile_rows(tile);
    let r0 = band.x;
    let r1 = band.y;
    var a_dy = vec4<f32>(0.0);
    var a_dyx = vec4<f32>(0.0);
    var a_xc = vec4<f32>(0.0);
    var b_dy = vec4<f32>(0.0);
    var b_dyx = vec4<f32>(0.0);
    var b_xc = vec4<f32>(0.0);
    var a = p().x_base / 4u + r0 * quads + q;
    for (var r = r0; r < r1; r++) {
        let ga = load_dy4(a);
        let gb = load_dy4(a + 1u);
        let ca = (load_x4(a) - shift_a) - delta_a;
        let cb = (load_x4(a + 1u) - shift_b) - delta_b;
        // a mask per row: only masked-in rows measure the mean's error
        let keep = !MASKED || row_masked_in(r);
        a_dy += ga;
        a_dyx = fma(ga, ca, a_dyx);
        a_xc += select(vec4<f32>(0.0), ca, keep);
        b_dy += gb;
        b_dyx = fma(gb, cb, b_dyx);
        b_xc += select(vec4<f32>(0.0), cb, keep);
        a += quads;
    }
    for (var k = 0u; k < 4u; k++) {
        partials[(4u * q + k) * p().total_tiles + p().tile_offset + tile] = vec4<f32>(a_dy[k], a_dyx[k], a_xc[k], 0.0);
        partials[(4u * q + 4u + k) * p().total_tiles + p().tile_offset + tile] = vec4<f32>(b_dy[k], b_dyx[k], b_xc[k], 0.0);
    }
}

// inner >= 16, not a multiple of 4, no mask: run by run in the vec4s that
// cover each run, lanes outside it masked (as partial_stats_runs16).
@compute @workgroup_size(256)
fn backward_reduce_runs16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * p().channels {
        return;
    }
    let c = g % p().channels;
    let tile = g / p().channels;
    let stats = saved[2u * c];
    let shift = stats.x;
    let delta = stats.y;
    let span_j = tile_span(c, tile, p().elems_per_thread);
    let j0 = span_j.x;
    let j1 = span_j.y;
    let base = p().x_base - p().chunk_start;
    let lane = vec4<u32>(0u, 1u, 2u, 3u);
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    var s_xc = vec4<f32>(0.0);
    var j = j0;
    for (var runs = 0u; runs < p().elems_per_thread && j < j1; runs++) {
        let run_end = min(j - j % p().inner + p().inner, j1);
        let a0 = base + element_of(j, c);
        let a1 = a0 + (run_end - j);
        for (var q = a0 / 4u; q * 4u < a1; q++) {
            let at = vec4<u32>(4u * q) + lane;
            let inside = (at >= vec4<u32>(a0)) & (at < vec4<u32>(a1));
            let g4 = select(vec4<f32>(0.0), load_dy4(q), inside);
            let centered = select(vec4<f32>(0.0), (load_x4(q) - shift) - delta, inside);
            s_dy += g4;
            s_dyx = fma(g4, centered, s_dyx);
            s_xc += centered;
        }
        j = run_end;
    }
    let ones = vec4<f32>(1.0);
    partials[c * p().total_tiles + p().tile_offset + tile] = vec4<f32>(dot(s_dy, ones), dot(s_dyx, ones), dot(s_xc, ones), 0.0);
}
