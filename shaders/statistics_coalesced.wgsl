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
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().column_blocks {
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
                atomicMin(&first_kept[lid % p().lane_width], r);
                break;
            }
        }
        let r = take_first_kept(lid % p().lane_width);
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
        // loads only where kept: no bytes read for nothing
        if row_quad_valid(lane, ra) && (!MASKED || row_masked_in(ra)) {
            let va = (load_row_quad(lane, ra) - shift) * scale;
            s1a += va;
            s2a = fma(va, va, s2a);
            count += 1.0;
        }
        if row_quad_valid(lane, rb) && (!MASKED || row_masked_in(rb)) {
            let vb = (load_row_quad(lane, rb) - shift) * scale;
            s1b += vb;
            s2b = fma(vb, vb, s2b);
            count += 1.0;
        }
    }
    let sums = reduce_strided3(Sums3(s1a + s1b, s2a + s2b, vec4<f32>(count)), lid, p().lane_width);
    if lid < p().lane_width && lane.col < p().channels / 4u {
        for (var k = 0u; k < 4u; k++) {
            write_partial(4u * lane.col + k, lane.tile, sums.c.x, sums.a[k], sums.b[k], shift[k]);
        }
    }
}

@compute @workgroup_size(256)
fn partial_stats_coalesced_rows1(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().column_blocks {
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
                atomicMin(&first_kept[lid % p().lane_width], r);
                break;
            }
        }
        let r = take_first_kept(lid % p().lane_width);
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
        if row_element_valid(lane, ra) && (!MASKED || masked_in(row_element(lane, ra))) {
            let va = (load_row_element(lane, ra) - shift) * scale;
            a += vec3<f32>(va, va * va, 1.0);
        }
        if row_element_valid(lane, rb) && (!MASKED || masked_in(row_element(lane, rb))) {
            let vb = (load_row_element(lane, rb) - shift) * scale;
            b += vec3<f32>(vb, vb * vb, 1.0);
        }
    }
    let t = reduce_strided(vec4<f32>(a + b, 0.0), lid, p().lane_width);
    if lid < p().lane_width && lane.col < p().channels {
        write_partial(lane.col, lane.tile, t.z, t.x, t.y, shift);
    }
}

@compute @workgroup_size(256)
fn partial_stats_coalesced_runs1(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().channels {
        return;
    }
    let lid = lanes.lid;
    let t = run_tile(group);
    let base = p().x_base - p().chunk_start;
    let steps = lane_steps(t.j1 - t.j0, WG);
    var shift = 0.0;
    if MASKED {
        clear_first_kept(lid);
        for (var k = 0u; k < steps; k++) {
            let at = lid + k * WG;
            if at < t.j1 - t.j0 && masked_in(element_of(t.j0 + at, t.c)) {
                atomicMin(&first_kept[0], t.j0 + at);
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
    // offsets from j0 (positions near 2^32 would wrap)
    let span = t.j1 - t.j0;
    var wa = run_walk(t.j0 + lid, 2u * WG);
    var wb = run_walk(t.j0 + lid + WG, 2u * WG);
    for (var k = 0u; k < steps; k += 2u) {
        let at = lid + k * WG;
        if at < span {
            let e = walk_element(wa, t.c);
            if !MASKED || masked_in(e) {
                let v = (load_x(base + e) - shift) * scale;
                a += vec3<f32>(v, v * v, 1.0);
            }
        }
        if at + WG < span {
            let e = walk_element(wb, t.c);
            if !MASKED || masked_in(e) {
                let v = (load_x(base + e) - shift) * scale;
                b += vec3<f32>(v, v * v, 1.0);
            }
        }
        wa = walk_advance(wa);
        wb = walk_advance(wb);
    }
    let s = reduce_all(vec4<f32>(a + b, 0.0), lanes);
    if lid == 0u {
        write_partial(t.c, t.tile, s.z, s.x, s.y, shift);
    }
}

@compute @workgroup_size(256)
fn partial_stats_coalesced_runs4(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().channels {
        return;
    }
    let lid = lanes.lid;
    let t = run_tile(group);
    let base = p().x_base - p().chunk_start;
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
    let span = t.j1 - t.j0;
    var wa = run_walk(t.j0 + 4u * lid, 8u * WG);
    var wb = run_walk(t.j0 + 4u * (lid + WG), 8u * WG);
    for (var k = 0u; k < steps; k += 2u) {
        let at = 4u * (lid + k * WG);
        if at < span {
            let va = (load_x4((base + walk_element(wa, t.c)) / 4u) - shift) * scale;
            s1a += va;
            s2a = fma(va, va, s2a);
        }
        if at + 4u * WG < span {
            let vb = (load_x4((base + walk_element(wb, t.c)) / 4u) - shift) * scale;
            s1b += vb;
            s2b = fma(vb, vb, s2b);
        }
        wa = walk_advance(wa);
        wb = walk_advance(wb);
    }
    let ones = vec4<f32>(1.0);
    let s = reduce_all(vec4<f32>(dot(s1a + s1b, ones), dot(s2a + s2b, ones), 0.0, 0.0), lanes);
    if lid == 0u {
        write_partial(t.c, t.tile, f32(t.j1 - t.j0), s.x, s.y, shift);
    }
}
