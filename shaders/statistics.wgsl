// Per-channel partial statistics: each tile of a channel's values in the
// chunk gives one partial (count, shift, mean - shift, M2), which the
// finalize kernel merges with Chan's formula. How a tile's values are
// walked is shared with the backward reduce: walk_tiles.wgsl (serial
// family: an invocation a tile, no workgroup reductions) and
// walk_tiles_coalesced.wgsl (coalesced family: a workgroup a tile); this
// file is what the statistics do with the values they are given.
//
// Entry points, one per layout (see variants::FAMILY_ENTRIES; the host generates them,
// each calling its walk): `partial_stats` (any shape, masks),
// `partial_stats_inner4` (inner % 4 == 0: vec4s of one channel),
// `partial_stats_channels4` (channels last, channels % 4 == 0: one
// channel quad down a band of rows) and `partial_stats_channels8`
// (channels % 8 == 0: two neighbouring quads down a band of rows);
// `partial_stats_runs16` (inner >= 16, not a multiple of 4: each run of a
// channel read in the vec4s that cover it, lanes outside the run masked).
//
// Sums are shifted by the tile's first value so that a channel whose mean
// is far from zero keeps its precision. Under a mask the shift is the first
// masked-in value: the shift must be one of the values summed (the first
// masked-out value as shift cost a masked variance 1e-3 of precision).

override IS_F16: bool = false;
override MASKED: bool = false;

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

// What a tile's values are shifted by, and the power of two their
// deviations are scaled by (shift_scale): a lane each (the walks over
// scalars use the first).
struct Center {
    shift: vec4<f32>,
    scale: vec4<f32>,
}

fn center_of(shift: vec4<f32>) -> Center {
    return Center(shift, shift_scale4(shift));
}

fn center_of1(shift: f32) -> Center {
    return Center(vec4<f32>(shift), vec4<f32>(shift_scale(shift)));
}

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

// The sums over scalars: (shifted sum, sum of squares, count).
fn add_value(sums: ptr<function, vec3<f32>>, center: Center, value: f32) {
    let v = (value - center.shift.x) * center.scale.x;
    *sums += vec3<f32>(v, v * v, 1.0);
}

// The walks' functions (walk_tiles.wgsl).

fn tile_center1(c: u32, e: u32, found: bool) -> Center {
    var shift = 0.0;
    if found {
        shift = finite_shift(load_x(e));
    }
    return center_of1(shift);
}

fn tile_center4(c: u32, e: u32, found: bool) -> Center {
    var shift = 0.0;
    if found {
        shift = finite_shift(load_x4(e / 4u)[e % 4u]);
    }
    return center_of1(shift);
}

fn tile_center_quad(q: u32, i: u32, found: bool) -> Center {
    var shift = vec4<f32>(0.0);
    if found {
        shift = finite_shift4(load_x4(i));
    }
    return center_of(shift);
}

fn tile_add1(sums: ptr<function, vec3<f32>>, center: ptr<function, Center>, e: u32, a: u32) {
    if !MASKED || masked_in(a) {
        let value = load_x(e);
        if MASKED && (*sums).z == 0.0 {
            *center = center_of1(finite_shift(value));
        }
        add_value(sums, *center, value);
    }
}

// sums: (shifted sum, sum of squares) a lane
fn tile_add4(sums: ptr<function, Sums3>, center: Center, i: u32, inside: vec4<bool>) {
    let v = select(vec4<f32>(0.0), (load_x4(i) - center.shift) * center.scale, inside);
    (*sums).a += v;
    (*sums).b = fma(v, v, (*sums).b);
}

// sums: (shifted sum, sum of squares) a channel of the quad, and under a
// mask the kept rows in c.x; the shift is the first masked-in row
fn tile_add_row(sums: ptr<function, Sums3>, center: ptr<function, Center>, i: u32, keep: bool) {
    let value = load_x4(i);
    if MASKED {
        if keep && (*sums).c.x == 0.0 {
            *center = center_of(finite_shift4(value));
        }
        (*sums).c.x += select(0.0, 1.0, keep);
    }
    let v = select(vec4<f32>(0.0), (value - (*center).shift) * (*center).scale, keep);
    (*sums).a += v;
    (*sums).b = fma(v, v, (*sums).b);
}

fn tile_end1(c: u32, tile: u32, sums: vec3<f32>, center: Center) {
    write_partial(c, tile, sums.z, sums.x, sums.y, center.shift.x);
}

fn tile_end4(c: u32, tile: u32, totals: vec3<f32>, center: Center, count: f32) {
    write_partial(c, tile, count, totals.x, totals.y, center.shift.x);
}

fn tile_end_quad(q: u32, tile: u32, sums: Sums3, center: Center, rows: f32) {
    let count = select(rows, sums.c.x, MASKED);
    for (var k = 0u; k < 4u; k++) {
        write_partial(4u * q + k, tile, count, sums.a[k], sums.b[k], center.shift[k]);
    }
}
