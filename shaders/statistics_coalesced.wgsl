// Per-channel partial statistics, coalesced family (follows
// statistics.wgsl in one module and shares its bindings and helpers; the
// walks are walk_tiles_coalesced.wgsl's). Every lane of a tile sums its
// values shifted by one shift common to the tile, so that the workgroup
// can add the lanes' sums: the tile's first value of the channel; under a
// mask, the first masked-in one (an atomicMin over the lanes' first kept
// positions): the shift must be one of the values summed. The lanes count
// the values they sum (a mask, or the chunk's edges, leave some out).

const NONE: u32 = 0xffffffffu;

// per column (rows) or for the tile (runs): the first kept position
var<workgroup> first_kept: array<atomic<u32>, WG>;

fn clear_first_kept(lid: u32) {
    atomicStore(&first_kept[lid], NONE);
    workgroupBarrier();
}

// after every lane's atomicMin: the tile's first kept position for `slot`
fn take_first_kept(slot: u32) -> u32 {
    workgroupBarrier();
    return atomicLoad(&first_kept[slot]);
}

// Channels last: whether chunk row r of the lane's column is in range,
// by quads (`quads`) or channels.
fn row_valid(lane: RowLane, r: u32, quads: bool) -> bool {
    if quads {
        return row_quad_valid(lane, r);
    }
    return row_element_valid(lane, r);
}

// whether that row's value is masked in: a mask per row (quads) or per value
fn row_in_mask(lane: RowLane, r: u32, quads: bool) -> bool {
    if quads {
        return row_masked_in(r);
    }
    return masked_in(row_element(lane, r));
}

// The row of the lane's column whose value is the tile's shift, or NONE:
// under a mask the first masked-in row of the whole tile (over the
// workgroup's lanes: call in uniform control flow), else the tile's first
// row in the chunk.
fn shift_row(lane: RowLane, lid: u32, steps: u32, quads: bool) -> u32 {
    if MASKED {
        clear_first_kept(lid);
        for (var k = 0u; k < steps; k++) {
            let r = lane.r0 + lane.first + k * lane.stride;
            if row_valid(lane, r, quads) && row_in_mask(lane, r, quads) {
                atomicMin(&first_kept[lid % p().lane_width], r);
                break;
            }
        }
        return take_first_kept(lid % p().lane_width);
    }
    // the chunk may start inside the tile's first row: then the next row
    let r = select(lane.r0 + 1u, lane.r0, row_valid(lane, lane.r0, quads));
    return select(NONE, r, row_valid(lane, r, quads));
}

fn lane_center_rows4(lane: RowLane, lid: u32, steps: u32) -> Center {
    let r = shift_row(lane, lid, steps, true);
    var shift = vec4<f32>(0.0);
    if r != NONE {
        shift = finite_shift4(load_x4(row_quad_index(lane, r)));
    }
    return center_of(shift);
}

fn lane_center_rows1(lane: RowLane, lid: u32, steps: u32) -> Center {
    let r = shift_row(lane, lid, steps, false);
    var shift = 0.0;
    if r != NONE {
        shift = finite_shift(load_x(row_element_index(lane, r)));
    }
    return center_of1(shift);
}

fn lane_center_runs1(t: RunTile, lid: u32, steps: u32) -> Center {
    let base = p().x_base - p().chunk_start;
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
    return center_of1(shift);
}

// sums: (shifted sum, sum of squares) a channel of the quad, the count in
// c.x; loads only where kept: no bytes read for nothing
fn lane_add_row(sums: ptr<function, Sums3>, center: Center, i: u32, keep: bool) {
    if keep {
        let v = (load_x4(i) - center.shift) * center.scale;
        (*sums).a += v;
        (*sums).b = fma(v, v, (*sums).b);
        (*sums).c.x += 1.0;
    }
}

fn lane_add1(sums: ptr<function, vec3<f32>>, center: Center, e: u32, a: u32, inside: bool) {
    if inside && (!MASKED || masked_in(a)) {
        add_value(sums, center, load_x(e));
    }
}
