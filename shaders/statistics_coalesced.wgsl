// Per-channel partial statistics, coalesced family (follows
// statistics.wgsl in one module and shares its bindings and helpers; lane
// layout in coalesced_lanes.wgsl). A workgroup reduces one tile: every lane
// sums its values shifted by one shift common to the tile, two independent
// accumulators each, and the workgroup adds the lanes' sums (workgroup
// memory, or subgroups: reduce_*.wgsl). One partial per channel and tile,
// in the format finalize.wgsl merges, as the serial kernels write it.
//
// The common shift is the tile's first value of the channel; under a mask,
// the first masked-in one (an atomicMin over the lanes' first kept
// positions): the shift must be one of the values summed.
//
// Four entry points: `_rows4` (channels last, channels % 4 == 0, a mask per
// row if any), `_rows1` (channels last, any width, any mask), `_runs4`
// (inner % 4 == 0, no mask), `_runs1` (anything else).

const NONE: u32 = 0xffffffffu;

fn load_row_quad(lane: RowLane, r: u32) -> vec4<f32> {
    return load_x4(row_quad_index(lane, r));
}

fn load_row_element(lane: RowLane, r: u32) -> f32 {
    return load_x(row_element_index(lane, r));
}
// per column (rows) or for the tile (runs): the first kept position
var<workgroup> first_kept: array<atomic<u32>, 256>;

fn clear_first_kept(lid: u32) {
    atomicStore(&first_kept[lid], NONE);
    workgroupBarrier();
}

// after every lane's atomicMin: the tile's first kept position for `slot`
fn take_first_kept(slot: u32) -> u32 {
    workgroupBarrier();
    return atomicLoad(&first_kept[slot]);
}

@compute @workgroup_size(256)
fn partial_stats_coalesced_rows4(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p.stats_groups_x;
    if group >= p.tiles * p.column_blocks {
        return;
    }
    let lid = lanes.lid;
    let lane = row_lane(group, lid);
    let steps = lane_steps(lane.r1 - lane.r0, lane.stride);
    var shift = vec4<f32>(0.0);
    if MASKED {
        clear_first_kept(lid);
        for (var k = 0u; k < steps; k++) {
            let r = lane.r0 + lane.first + k * lane.stride;
            if row_quad_valid(lane, r) && row_masked_in(r) {
                atomicMin(&first_kept[lid % p.lane_width], r);
                break;
            }
        }
        let r = take_first_kept(lid % p.lane_width);
        if r != NONE {
            shift = finite_shift4(load_row_quad(lane, r));
        }
    } else {
        // the chunk may start inside the tile's first row: then the next row
        let r = select(lane.r0 + 1u, lane.r0, row_quad_valid(lane, lane.r0));
        if row_quad_valid(lane, r) {
            shift = finite_shift4(load_row_quad(lane, r));
        }
    }
    let scale = shift_scale4(shift);
    var s1a = vec4<f32>(0.0);
    var s2a = vec4<f32>(0.0);
    var s1b = vec4<f32>(0.0);
    var s2b = vec4<f32>(0.0);
    var count = 0.0;
    for (var k = 0u; k < steps; k += 2u) {
        let ra = lane.r0 + lane.first + k * lane.stride;
        let rb = ra + lane.stride;
        let ka = row_quad_valid(lane, ra) && (!MASKED || row_masked_in(ra));
        let kb = row_quad_valid(lane, rb) && (!MASKED || row_masked_in(rb));
        let va = select(vec4<f32>(0.0), (load_row_quad(lane, ra) - shift) * scale, ka);
        let vb = select(vec4<f32>(0.0), (load_row_quad(lane, rb) - shift) * scale, kb);
        s1a += va;
        s2a = fma(va, va, s2a);
        s1b += vb;
        s2b = fma(vb, vb, s2b);
        count += select(0.0, 1.0, ka) + select(0.0, 1.0, kb);
    }
    let s1 = reduce_strided(s1a + s1b, lid, p.lane_width);
    let s2 = reduce_strided(s2a + s2b, lid, p.lane_width);
    let n = reduce_strided(vec4<f32>(count), lid, p.lane_width).x;
    if lid < p.lane_width && lane.col < p.channels / 4u {
        for (var k = 0u; k < 4u; k++) {
            write_partial(4u * lane.col + k, lane.tile, n, s1[k], s2[k], shift[k]);
        }
    }
}

@compute @workgroup_size(256)
fn partial_stats_coalesced_rows1(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p.stats_groups_x;
    if group >= p.tiles * p.column_blocks {
        return;
    }
    let lid = lanes.lid;
    let lane = row_lane(group, lid);
    let steps = lane_steps(lane.r1 - lane.r0, lane.stride);
    var shift = 0.0;
    if MASKED {
        clear_first_kept(lid);
        for (var k = 0u; k < steps; k++) {
            let r = lane.r0 + lane.first + k * lane.stride;
            if row_element_valid(lane, r) && masked_in(row_element(lane, r)) {
                atomicMin(&first_kept[lid % p.lane_width], r);
                break;
            }
        }
        let r = take_first_kept(lid % p.lane_width);
        if r != NONE {
            shift = finite_shift(load_row_element(lane, r));
        }
    } else {
        let r = select(lane.r0 + 1u, lane.r0, row_element_valid(lane, lane.r0));
        if row_element_valid(lane, r) {
            shift = finite_shift(load_row_element(lane, r));
        }
    }
    let scale = shift_scale(shift);
    // (sum, sum of squares, count) in two independent accumulators
    var a = vec3<f32>(0.0);
    var b = vec3<f32>(0.0);
    for (var k = 0u; k < steps; k += 2u) {
        let ra = lane.r0 + lane.first + k * lane.stride;
        let rb = ra + lane.stride;
        let ka = row_element_valid(lane, ra) && (!MASKED || masked_in(row_element(lane, ra)));
        let kb = row_element_valid(lane, rb) && (!MASKED || masked_in(row_element(lane, rb)));
        let va = select(0.0, (load_row_element(lane, ra) - shift) * scale, ka);
        let vb = select(0.0, (load_row_element(lane, rb) - shift) * scale, kb);
        a += vec3<f32>(va, va * va, select(0.0, 1.0, ka));
        b += vec3<f32>(vb, vb * vb, select(0.0, 1.0, kb));
    }
    let t = reduce_strided(vec4<f32>(a + b, 0.0), lid, p.lane_width);
    if lid < p.lane_width && lane.col < p.channels {
        write_partial(lane.col, lane.tile, t.z, t.x, t.y, shift);
    }
}

@compute @workgroup_size(256)
fn partial_stats_coalesced_runs1(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p.stats_groups_x;
    if group >= p.tiles * p.channels {
        return;
    }
    let lid = lanes.lid;
    let t = run_tile(group);
    let base = p.x_base - p.chunk_start;
    let steps = lane_steps(t.j1 - t.j0, WG);
    var shift = 0.0;
    if MASKED {
        clear_first_kept(lid);
        for (var k = 0u; k < steps; k++) {
            let j = t.j0 + lid + k * WG;
            if j < t.j1 && masked_in(element_of(j, t.c)) {
                atomicMin(&first_kept[0], j);
                break;
            }
        }
        let j = take_first_kept(0u);
        if j != NONE {
            shift = finite_shift(load_x(base + element_of(j, t.c)));
        }
    } else if t.j0 < t.j1 {
        shift = finite_shift(load_x(base + element_of(t.j0, t.c)));
    }
    let scale = shift_scale(shift);
    var a = vec3<f32>(0.0);
    var b = vec3<f32>(0.0);
    for (var k = 0u; k < steps; k += 2u) {
        let ja = t.j0 + lid + k * WG;
        let jb = ja + WG;
        let ea = element_of(ja, t.c);
        let eb = element_of(jb, t.c);
        let ka = ja < t.j1 && (!MASKED || masked_in(ea));
        let kb = jb < t.j1 && (!MASKED || masked_in(eb));
        let va = select(0.0, (load_x(base + ea) - shift) * scale, ka);
        let vb = select(0.0, (load_x(base + eb) - shift) * scale, kb);
        a += vec3<f32>(va, va * va, select(0.0, 1.0, ka));
        b += vec3<f32>(vb, vb * vb, select(0.0, 1.0, kb));
    }
    let s = reduce_all(vec4<f32>(a + b, 0.0), lanes);
    if lid == 0u {
        write_partial(t.c, t.tile, s.z, s.x, s.y, shift);
    }
}

@compute @workgroup_size(256)
fn partial_stats_coalesced_runs4(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p.stats_groups_x;
    if group >= p.tiles * p.channels {
        return;
    }
    let lid = lanes.lid;
    let t = run_tile(group);
    let base = p.x_base - p.chunk_start;
    var shift = 0.0;
    if t.j0 < t.j1 {
        shift = finite_shift(load_x4((base + element_of(t.j0, t.c)) / 4u).x);
    }
    let scale = shift_scale(shift);
    let steps = lane_steps(t.j1 - t.j0, 4u * WG);
    var s1a = vec4<f32>(0.0);
    var s2a = vec4<f32>(0.0);
    var s1b = vec4<f32>(0.0);
    var s2b = vec4<f32>(0.0);
    for (var k = 0u; k < steps; k += 2u) {
        let ja = t.j0 + 4u * (lid + k * WG);
        let jb = ja + 4u * WG;
        let va = select(vec4<f32>(0.0), (load_x4((base + element_of(ja, t.c)) / 4u) - shift) * scale, ja < t.j1);
        let vb = select(vec4<f32>(0.0), (load_x4((base + element_of(jb, t.c)) / 4u) - shift) * scale, jb < t.j1);
        s1a += va;
        s2a = fma(va, va, s2a);
        s1b += vb;
        s2b = fma(vb, vb, s2b);
    }
    let ones = vec4<f32>(1.0);
    let s = reduce_all(vec4<f32>(dot(s1a + s1b, ones), dot(s2a + s2b, ones), 0.0, 0.0), lanes);
    if lid == 0u {
        write_partial(t.c, t.tile, f32(t.j1 - t.j0), s.x, s.y, shift);
    }
}
