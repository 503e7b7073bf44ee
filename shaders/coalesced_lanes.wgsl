// Shared by the coalesced reducing kernels (statistics, backward reduce):
// how a workgroup's lanes cover one tile, and the strided workgroup sum.
// Mirrors `DispatchPlan::coalesced_element` in plan.rs.
//
// Channels last (`rows` entry points): workgroup g takes block g %
// column_blocks of a row's columns (channels, or channel quads) and tile g
// / column_blocks of the chunk's rows. Lane l reads column block *
// lane_width + l % lane_width of rows r0 + l / lane_width, then every
// WG / lane_width rows: neighbouring lanes read neighbouring words, and
// when the row is narrower than the workgroup, the next row's.
//
// Runs (`runs` entry points): workgroup g takes channel g % channels and
// tile g / channels of its positions; lane l reads positions j0 + l, then
// every WG (four at a time for inner % 4 == 0).

var<workgroup> reduce_scratch: array<vec4<f32>, WG>;
var<workgroup> reduce_scratch_b: array<vec4<f32>, WG>;
var<workgroup> reduce_scratch_c: array<vec4<f32>, WG>;

// The sum of v over lanes lid, lid + width, lid + 2 width, ..., in lanes
// [0, width). `width` is a power of two, the same in every lane: call in
// uniform control flow.
fn reduce_strided(v: vec4<f32>, lid: u32, width: u32) -> vec4<f32> {
    reduce_scratch[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s >= width; s = s / 2u) {
        if lid < s {
            reduce_scratch[lid] += reduce_scratch[lid + s];
        }
        workgroupBarrier();
    }
    let out = reduce_scratch[lid];
    workgroupBarrier();
    return out;
}

// reduce_strided of three values at once: one set of barriers.
fn reduce_strided3(v: Sums3, lid: u32, width: u32) -> Sums3 {
    reduce_scratch[lid] = v.a;
    reduce_scratch_b[lid] = v.b;
    reduce_scratch_c[lid] = v.c;
    workgroupBarrier();
    for (var s = WG / 2u; s >= width; s = s / 2u) {
        if lid < s {
            reduce_scratch[lid] += reduce_scratch[lid + s];
            reduce_scratch_b[lid] += reduce_scratch_b[lid + s];
            reduce_scratch_c[lid] += reduce_scratch_c[lid + s];
        }
        workgroupBarrier();
    }
    let out = Sums3(reduce_scratch[lid], reduce_scratch_b[lid], reduce_scratch_c[lid]);
    workgroupBarrier();
    return out;
}

// Channels last: which column and tile rows a lane walks.
struct RowLane {
    // column (channel or quad) of the lane; may be past the row's end
    col: u32,
    tile: u32,
    // chunk rows [r0, r1) of the tile; the lane starts at r0 + first
    r0: u32,
    r1: u32,
    first: u32,
    // rows between the lane's steps
    stride: u32,
    // absolute row of the chunk's row 0
    row0: u32,
}

fn row_lane(group: u32, lid: u32) -> RowLane {
    let block = group % p().column_blocks;
    let tile = group / p().column_blocks;
    let rows = (p().chunk_start + p().chunk_elems - 1u) / p().channels - p().chunk_start / p().channels + 1u;
    let r0 = min(tile * p().elems_per_thread, rows);
    return RowLane(
        block * p().lane_width + lid % p().lane_width,
        tile,
        r0,
        min(r0 + p().elems_per_thread, rows),
        lid / p().lane_width,
        WG / p().lane_width,
        p().chunk_start / p().channels,
    );
}

// Steps a lane of a tile takes: every lane the same count (out-of-range
// rows or positions are masked), so reductions stay in uniform control flow.
fn lane_steps(span: u32, stride: u32) -> u32 {
    return (span + stride - 1u) / stride;
}

// Whether absolute element `a` (the first of a column's values) is in the chunk.
fn in_chunk(a: u32) -> bool {
    return a >= p().chunk_start && a < p().chunk_start + p().chunk_elems;
}

// Channels last, quads: the vec4 of column `col` in chunk row r, where it lies in the chunk.
fn row_quad(lane: RowLane, r: u32) -> u32 {
    return (lane.row0 + r) * (p().channels / 4u) + lane.col;
}

fn row_quad_valid(lane: RowLane, r: u32) -> bool {
    return r < lane.r1 && lane.col < p().channels / 4u && in_chunk(4u * row_quad(lane, r));
}

// its index in the x (and dy) binding
fn row_quad_index(lane: RowLane, r: u32) -> u32 {
    return p().x_base / 4u + row_quad(lane, r) - p().chunk_start / 4u;
}

// Channels last, one channel per column: absolute element of column `col` in chunk row r.
fn row_element(lane: RowLane, r: u32) -> u32 {
    return (lane.row0 + r) * p().channels + lane.col;
}

fn row_element_valid(lane: RowLane, r: u32) -> bool {
    return r < lane.r1 && lane.col < p().channels && in_chunk(row_element(lane, r));
}

fn row_element_index(lane: RowLane, r: u32) -> u32 {
    return p().x_base + row_element(lane, r) - p().chunk_start;
}

// Runs: the tile's positions [x, y) of channel c, and the channel.
struct RunTile {
    c: u32,
    tile: u32,
    j0: u32,
    j1: u32,
}

fn run_tile(group: u32) -> RunTile {
    let c = group % p().channels;
    let tile = group / p().channels;
    let span = tile_span(c, tile, p().elems_per_thread);
    return RunTile(c, tile, span.x, span.y);
}

// A lane's walk along one channel's positions j = o * inner + i by a fixed
// step, with no division per step (two per lane, at the start).
struct RunWalk {
    o: u32,
    i: u32,
    step_o: u32,
    step_i: u32,
}

fn run_walk(j: u32, step: u32) -> RunWalk {
    return RunWalk(j / p().inner, j % p().inner, step / p().inner, step % p().inner);
}

// the absolute element at the walk's position, of channel c
fn walk_element(w: RunWalk, c: u32) -> u32 {
    return (w.o * p().channels + c) * p().inner + w.i;
}

fn walk_advance(w: RunWalk) -> RunWalk {
    // step_i < inner: one carry at most
    var i = w.i + w.step_i;
    var o = w.o + w.step_o;
    if i >= p().inner {
        i -= p().inner;
        o += 1u;
    }
    return RunWalk(o, i, w.step_o, w.step_i);
}
