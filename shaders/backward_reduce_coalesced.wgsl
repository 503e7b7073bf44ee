// Backward pass 1, coalesced family (follows backward_reduce.wgsl in one
// module and shares its bindings; lanes as in coalesced_lanes.wgsl): per
// channel tile, sum(dy), sum(dy * (x - mean)) and the masked-in sum of
// (x - mean), each lane with two accumulators, then a workgroup sum. The
// partials are the serial kernels' (backward_finalize.wgsl adds them).

fn write_sums(c: u32, tile: u32, s: vec4<f32>) {
    partials[c * p().total_tiles + p().tile_offset + tile] = vec4<f32>(s.xyz, 0.0);
}

@compute @workgroup_size(256)
fn backward_reduce_coalesced_rows4(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().column_blocks {
        return;
    }
    let lid = lanes.lid;
    let lane = row_lane(group, lid);
    let steps = lane_steps(lane.r1 - lane.r0, lane.stride);
    // lanes past the row's quads read the last quad's (and sum nothing)
    let quad = min(lane.col, p().channels / 4u - 1u);
    let shift = quad_shift(quad);
    let delta = quad_delta(quad);
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    var s_xc = vec4<f32>(0.0);
    var t_dy = vec4<f32>(0.0);
    var t_dyx = vec4<f32>(0.0);
    var t_xc = vec4<f32>(0.0);
    for (var k = 0u; k < steps; k += 2u) {
        let ra = lane.r0 + lane.first + k * lane.stride;
        let rb = ra + lane.stride;
        if row_quad_valid(lane, ra) {
            let i = row_quad_index(lane, ra);
            let g = load_dy4(i);
            let centered = (load_x4(i) - shift) - delta;
            s_dy += g;
            s_dyx = fma(g, centered, s_dyx);
            // a mask per row: only masked-in rows measure the mean's error
            if !MASKED || row_masked_in(ra) {
                s_xc += centered;
            }
        }
        if row_quad_valid(lane, rb) {
            let i = row_quad_index(lane, rb);
            let g = load_dy4(i);
            let centered = (load_x4(i) - shift) - delta;
            t_dy += g;
            t_dyx = fma(g, centered, t_dyx);
            if !MASKED || row_masked_in(rb) {
                t_xc += centered;
            }
        }
    }
    let sums = reduce_strided3(Sums3(s_dy + t_dy, s_dyx + t_dyx, s_xc + t_xc), lid, p().lane_width);
    if lid < p().lane_width && lane.col < p().channels / 4u {
        for (var k = 0u; k < 4u; k++) {
            write_sums(4u * lane.col + k, lane.tile, vec4<f32>(sums.a[k], sums.b[k], sums.c[k], 0.0));
        }
    }
}

// (dy, dy * (x - mean), masked-in x - mean) of one value, or zeros
// outside (read only inside)
fn backward_terms(e: u32, a: u32, c: u32, inside: bool) -> vec3<f32> {
    if !inside {
        return vec3<f32>(0.0);
    }
    let stats = saved[2u * c];
    let g = load_dy(e);
    let centered = (load_x(e) - stats.x) - stats.y;
    let kept = !MASKED || masked_in(a);
    return vec3<f32>(g, g * centered, select(0.0, centered, kept));
}

@compute @workgroup_size(256)
fn backward_reduce_coalesced_rows1(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().column_blocks {
        return;
    }
    let lid = lanes.lid;
    let lane = row_lane(group, lid);
    let steps = lane_steps(lane.r1 - lane.r0, lane.stride);
    var a = vec3<f32>(0.0);
    var b = vec3<f32>(0.0);
    for (var k = 0u; k < steps; k += 2u) {
        let ra = lane.r0 + lane.first + k * lane.stride;
        let rb = ra + lane.stride;
        a += backward_terms(row_element_index(lane, ra), row_element(lane, ra), lane.col, row_element_valid(lane, ra));
        b += backward_terms(row_element_index(lane, rb), row_element(lane, rb), lane.col, row_element_valid(lane, rb));
    }
    let s = reduce_strided(vec4<f32>(a + b, 0.0), lid, p().lane_width);
    if lid < p().lane_width && lane.col < p().channels {
        write_sums(lane.col, lane.tile, s);
    }
}

@compute @workgroup_size(256)
fn backward_reduce_coalesced_runs1(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().channels {
        return;
    }
    let t = run_tile(group);
    let base = p().x_base - p().chunk_start;
    let steps = lane_steps(t.j1 - t.j0, WG);
    var a = vec3<f32>(0.0);
    var b = vec3<f32>(0.0);
    // offsets from j0 (positions near 2^32 would wrap)
    let span = t.j1 - t.j0;
    var wa = run_walk(t.j0 + lanes.lid, 2u * WG);
    var wb = run_walk(t.j0 + lanes.lid + WG, 2u * WG);
    for (var k = 0u; k < steps; k += 2u) {
        let at = lanes.lid + k * WG;
        let ea = walk_element(wa, t.c);
        let eb = walk_element(wb, t.c);
        a += backward_terms(base + ea, ea, t.c, at < span);
        b += backward_terms(base + eb, eb, t.c, at + WG < span);
        wa = walk_advance(wa);
        wb = walk_advance(wb);
    }
    let s = reduce_all(vec4<f32>(a + b, 0.0), lanes);
    if lanes.lid == 0u {
        write_sums(t.c, t.tile, s);
    }
}

@compute @workgroup_size(256)
fn backward_reduce_coalesced_runs4(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let group = wid.x + wid.y * p().stats_groups_x;
    if group >= p().tiles * p().channels {
        return;
    }
    let t = run_tile(group);
    let stats = saved[2u * t.c];
    let base = p().x_base - p().chunk_start;
    let steps = lane_steps(t.j1 - t.j0, 4u * WG);
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    var s_xc = vec4<f32>(0.0);
    var t_dy = vec4<f32>(0.0);
    var t_dyx = vec4<f32>(0.0);
    var t_xc = vec4<f32>(0.0);
    let span = t.j1 - t.j0;
    var wa = run_walk(t.j0 + 4u * lanes.lid, 8u * WG);
    var wb = run_walk(t.j0 + 4u * (lanes.lid + WG), 8u * WG);
    for (var k = 0u; k < steps; k += 2u) {
        let at = 4u * (lanes.lid + k * WG);
        if at < span {
            let i = (base + walk_element(wa, t.c)) / 4u;
            let g = load_dy4(i);
            let centered = (load_x4(i) - stats.x) - stats.y;
            s_dy += g;
            s_dyx = fma(g, centered, s_dyx);
            s_xc += centered;
        }
        if at + 4u * WG < span {
            let i = (base + walk_element(wb, t.c)) / 4u;
            let g = load_dy4(i);
            let centered = (load_x4(i) - stats.x) - stats.y;
            t_dy += g;
            t_dyx = fma(g, centered, t_dyx);
            t_xc += centered;
        }
        wa = walk_advance(wa);
        wb = walk_advance(wb);
    }
    let ones = vec4<f32>(1.0);
    let s = reduce_all(vec4<f32>(dot(s_dy + t_dy, ones), dot(s_dyx + t_dyx, ones), dot(s_xc + t_xc, ones), 0.0), lanes);
    if lanes.lid == 0u {
        write_sums(t.c, t.tile, s);
    }
}
