// Per-channel partial statistics: every invocation reduces one tile of
// `elems_per_thread` values (or vec4s, or rows) of one channel on its own
// and writes one partial; the finalize kernel merges a channel's partials.
// There is no workgroup reduction: on lavapipe a workgroup barrier costs
// about as much as streaming thousands of values, and a SIMD group runs its
// whole loop before the next starts, so each invocation walks its own
// contiguous run. Invocation g takes tile g / C of channel g % C, so
// neighbouring invocations read neighbouring channels of the same rows.
//
// Five layouts (see plan.rs): `partial_stats` (any shape, masks),
// `partial_stats_inner4` (inner % 4 == 0: vec4s of one channel),
// `partial_stats_channels4` (channels last, channels % 4 == 0: one channel
// quad down a band of rows) and `partial_stats_channels8` (channels % 8 ==
// 0: two neighbouring quads down a band of rows); `partial_stats_runs16`
// (inner >= 16, not a multiple of 4: each run of a channel read in the
// vec4s that cover it, lanes outside the run masked).
//
// Sums are shifted by the tile's first value so that a channel whose mean is
// far from zero keeps its precision. Every loop is bounded by
// `elems_per_thread` (<= 4096 on the host side): llvmpipe silently ends any
// loop after 65535 iterations.

override IS_F16: bool = false;
override MASKED: bool = false;

const WG: u32 = 256u;

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> x: array<u32>;
// the same binding in groups of four values, by the vec4 entry points
@group(0) @binding(1) var<storage, read> x4: array<Quad>;

fn load_x4(i: u32) -> vec4<f32> {
    return unpack_quad(x4[i]);
}
@group(0) @binding(2) var<storage, read> mask: array<u32>;
// (count, tile shift, mean - shift, M2) per channel and tile
@group(0) @binding(3) var<storage, read_write> partials: array<vec4<f32>>;

// A shift must be finite: an Inf or NaN shift would turn every value of
// the tile into NaN, where the float64 reference keeps an infinite mean.
fn finite_shift(v: f32) -> f32 {
    return select(0.0, v, is_finite_f32(v));
}

fn finite_shift4(v: vec4<f32>) -> vec4<f32> {
    let bits = bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu);
    return select(vec4<f32>(0.0), v, bits < vec4<u32>(0x7f800000u));
}

fn write_partial(c: u32, tile: u32, count: f32, s1: f32, s2: f32, shift: f32) {
    var mean = 0.0;
    var m2 = 0.0;
    if count > 0.0 {
        // s1 and s2 are scaled by shift_scale(shift): so is M2, the
        // mean's correction is stored as it is
        mean = s1 / count;
        // rounding can make it slightly negative; a NaN (from a NaN or Inf
        // value) must stay NaN, as in the reference: no max(.., 0)
        m2 = s2 - s1 * mean;
        if m2 < 0.0 && !is_nan_f32(m2) {
            m2 = 0.0;
        }
    }
    partials[c * p().total_tiles + p().tile_offset + tile] = vec4<f32>(count, shift, mean / shift_scale(shift), m2);
}

@compute @workgroup_size(256)
fn partial_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * p().channels {
        return;
    }
    let c = g % p().channels;
    let tile = g / p().channels;
    let span_j = tile_span(c, tile, p().elems_per_thread);
    let j0 = span_j.x;
    let j1 = span_j.y;
    var shift = 0.0;
    if j0 < j1 {
        shift = finite_shift(load_x(p().x_base + element_of(j0, c) - p().chunk_start));
    }
    var k = shift_scale(shift);
    var o = j0 / p().inner;
    var i = j0 % p().inner;
    var s1 = 0.0;
    var s2 = 0.0;
    var count = 0.0;
    for (var j = j0; j < j1; j++) {
        let a = (o * p().channels + c) * p().inner + i;
        let value = load_x(p().x_base + a - p().chunk_start);
        if !MASKED || masked_in(a) {
            // the shift must be one of the values summed: a masked-out
            // value far from the others would cost the variance its precision
            if MASKED && count == 0.0 {
                shift = finite_shift(value);
                k = shift_scale(shift);
            }
            let v = (value - shift) * k;
            s1 += v;
            s2 += v * v;
            count += 1.0;
        }
        i += 1u;
        if i == p().inner {
            i = 0u;
            o += 1u;
        }
    }
    write_partial(c, tile, count, s1, s2, shift);
}

// inner % 4 == 0: a channel's values come in whole vec4s.
@compute @workgroup_size(256)
fn partial_stats_inner4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * p().channels {
        return;
    }
    let c = g % p().channels;
    let tile = g / p().channels;
    let span = 4u * p().elems_per_thread;
    let span_j = tile_span(c, tile, span);
    let j0 = span_j.x;
    let j1 = span_j.y;
    let base = p().x_base - p().chunk_start;
    var shift = 0.0;
    if j0 < j1 {
        shift = finite_shift(load_x4((base + element_of(j0, c)) / 4u).x);
    }
    let k = shift_scale(shift);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    // run by run: the inner loop walks contiguous vec4s with no tracking;
    // both loops together take at most elems_per_thread steps
    var j = j0;
    for (var runs = 0u; runs < p().elems_per_thread && j < j1; runs++) {
        let run_end = min(j - j % p().inner + p().inner, j1);
        let first = (base + element_of(j, c)) / 4u;
        let last = first + (run_end - j) / 4u;
        for (var a = first; a < last; a++) {
            let v = (load_x4(a) - shift) * k;
            s1 += v;
            s2 = fma(v, v, s2);
        }
        j = run_end;
    }
    let ones = vec4<f32>(1.0);
    write_partial(c, tile, f32(j1 - j0), dot(s1, ones), dot(s2, ones), shift);
}

// Channels last (inner == 1, channels % 4 == 0, a mask per row if any): invocation g reduces
// channels 4q..4q+3 (q = g % quads) over the rows of tile g / quads.
@compute @workgroup_size(256)
fn partial_stats_channels4(
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
    let band = tile_rows(tile);
    let r0 = band.x;
    let r1 = band.y;
    let base = p().x_base / 4u;
    var shift = vec4<f32>(0.0);
    if r0 < r1 {
        shift = finite_shift4(load_x4(base + r0 * quads + q));
    }
    var scale = shift_scale4(shift);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var kept = 0.0;
    var addr = base + r0 * quads + q;
    for (var r = r0; r < r1; r++) {
        let value = load_x4(addr);
        var keep = true;
        if MASKED {
            // a mask per row; the shift is the first masked-in row
            keep = row_masked_in(r);
            if keep && kept == 0.0 {
                shift = finite_shift4(value);
                scale = shift_scale4(shift);
            }
            kept += select(0.0, 1.0, keep);
        }
        let v = select(vec4<f32>(0.0), (value - shift) * scale, keep);
        s1 += v;
        s2 = fma(v, v, s2);
        addr += quads;
    }
    let count = select(f32(r1 - r0), kept, MASKED);
    for (var k = 0u; k < 4u; k++) {
        write_partial(4u * q + k, tile, count, s1[k], s2[k], shift[k]);
    }
}

// Channels last, channels % 8 == 0: invocation g reduces quads 2h and
// 2h + 1 (h = g % (quads / 2)) over the rows of tile g / (quads / 2).
@compute @workgroup_size(256)
fn partial_stats_channels8(
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
    let band = tile_rows(tile);
    let r0 = band.x;
    let r1 = band.y;
    let base = p().x_base / 4u;
    var shift_a = vec4<f32>(0.0);
    var shift_b = vec4<f32>(0.0);
    if r0 < r1 {
        shift_a = finite_shift4(load_x4(base + r0 * quads + q));
        shift_b = finite_shift4(load_x4(base + r0 * quads + q + 1u));
    }
    var scale_a = shift_scale4(shift_a);
    var scale_b = shift_scale4(shift_b);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var kept = 0.0;
    var addr = base + r0 * quads + q;
    for (var r = r0; r < r1; r++) {
        let xa = load_x4(addr);
        let xb = load_x4(addr + 1u);
        var keep = true;
        if MASKED {
            // a mask per row; the shift is the first masked-in row
            keep = row_masked_in(r);
            if keep && kept == 0.0 {
                shift_a = finite_shift4(xa);
                shift_b = finite_shift4(xb);
                scale_a = shift_scale4(shift_a);
                scale_b = shift_scale4(shift_b);
            }
            kept += select(0.0, 1.0, keep);
        }
        let va = select(vec4<f32>(0.0), (xa - shift_a) * scale_a, keep);
        let vb = select(vec4<f32>(0.0), (xb - shift_b) * scale_b, keep);
        a1 += va;
        a2 = fma(va, va, a2);
        b1 += vb;
        b2 = fma(vb, vb, b2);
        addr += quads;
    }
    let count = select(f32(r1 - r0), kept, MASKED);
    for (var k = 0u; k < 4u; k++) {
        write_partial(4u * q + k, tile, count, a1[k], a2[k], shift_a[k]);
        write_partial(4u * q + 4u + k, tile, count, b1[k], b2[k], shift_b[k]);
    }
}

// inner >= 16, not a multiple of 4, length % 4 == 0: the tile's values of
// channel c, run by run, in the vec4s that cover each run; lanes outside
// the run (other channels, other tiles) count for nothing. Both loops
// together take at most elems_per_thread / 4 + 2 steps per run.
@compute @workgroup_size(256)
fn partial_stats_runs16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wid.x + wid.y * p().stats_groups_x) * WG + lid;
    if g >= p().tiles * p().channels {
        return;
    }
    let c = g % p().channels;
    let tile = g / p().channels;
    let span_j = tile_span(c, tile, p().elems_per_thread);
    let j0 = span_j.x;
    let j1 = span_j.y;
    // element positions inside the binding
    let base = p().x_base - p().chunk_start;
    var shift = 0.0;
    if j0 < j1 {
        let first = base + element_of(j0, c);
        shift = finite_shift(load_x4(first / 4u)[first % 4u]);
    }
    let k = shift_scale(shift);
    let lane = vec4<u32>(0u, 1u, 2u, 3u);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var j = j0;
    for (var runs = 0u; runs < p().elems_per_thread && j < j1; runs++) {
        let run_end = min(j - j % p().inner + p().inner, j1);
        let a0 = base + element_of(j, c);
        let a1 = a0 + (run_end - j);
        for (var q = a0 / 4u; q * 4u < a1; q++) {
            let at = vec4<u32>(4u * q) + lane;
            let inside = (at >= vec4<u32>(a0)) & (at < vec4<u32>(a1));
            let v = select(vec4<f32>(0.0), (load_x4(q) - shift) * k, inside);
            s1 += v;
            s2 = fma(v, v, s2);
        }
        j = run_end;
    }
    let ones = vec4<f32>(1.0);
    write_partial(c, tile, f32(j1 - j0), dot(s1, ones), dot(s2, ones), shift);
}
