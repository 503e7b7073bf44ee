// Backward pass 1, coalesced family (follows backward_reduce.wgsl in one
// module and shares its bindings and sums; the walks are
// walk_tiles_coalesced.wgsl's): per channel tile, sum(dy), sum(dy * (x -
// mean)) and the masked-in sum of (x - mean), each lane with two
// accumulators, then a workgroup sum. The centre is the channel's batch
// statistics, the same for every lane. The partials are the serial
// kernels' (backward_finalize.wgsl adds them).

// lanes past the row's quads read the last quad's (and sum nothing)
fn lane_center_rows4(lane: RowLane, lid: u32, steps: u32) -> Center {
    return quad_center(min(lane.col, p().channels / 4u - 1u));
}

fn lane_center_rows1(lane: RowLane, lid: u32, steps: u32) -> Center {
    return channel_center(min(lane.col, p().channels - 1u));
}

fn lane_center_runs1(t: RunTile, lid: u32, steps: u32) -> Center {
    return channel_center(t.c);
}

fn lane_add_row(sums: ptr<function, Sums3>, center: Center, i: u32, keep: bool) {
    add_row(sums, center, i, keep);
}

fn lane_add1(sums: ptr<function, vec3<f32>>, center: Center, e: u32, a: u32, inside: bool) {
    if inside {
        add_value(sums, center, e, a);
    }
}
