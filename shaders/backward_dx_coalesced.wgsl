// Backward pass 3, coalesced family (follows backward_dx.wgsl in one
// module and shares its bindings and helpers): dx as there, lanes over the
// chunk's units and channels walked as in normalize_coalesced.wgsl.

@compute @workgroup_size(256)
fn backward_dx_coalesced(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lane = lane_of(wid, nwg, lid);
    if IS_F16 {
        let words = (p().chunk_elems + 1u) / 2u;
        var walk = walk_at(2u * lane.x);
        let step = stride_of(2u * lane.y);
        for (var k = 0u; k < p().elementwise_steps; k++) {
            let w = lane.x + k * lane.y;
            if w >= words {
                break;
            }
            let e = 2u * w;
            let xs = unpack2x16float(x[p().x_base / 2u + w]);
            let gs = unpack2x16float(dy[p().x_base / 2u + w]);
            var out = vec2<f32>(grad(e, walk.c, xs.x, gs.x), 0.0);
            if e + 1u < p().chunk_elems {
                out.y = grad(e + 1u, walk_next(walk).c, xs.y, gs.y);
            }
            dx[p().y_base / 2u + w] = pack_f16x2(out);
            walk = walk_by(walk, step);
        }
    } else {
        var walk = walk_at(lane.x);
        let step = stride_of(lane.y);
        for (var k = 0u; k < p().elementwise_steps; k++) {
            let e = lane.x + k * lane.y;
            if e >= p().chunk_elems {
                break;
            }
            let xv = bitcast<f32>(x[p().x_base + e]);
            let g = bitcast<f32>(dy[p().x_base + e]);
            dx[p().y_base + e] = bitcast<u32>(grad(e, walk.c, xv, g));
            walk = walk_by(walk, step);
        }
    }
}

// inner % 4 == 0, no mask: a vec4's values share a channel.
@compute @workgroup_size(256)
fn backward_dx_coalesced_inner4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lane = lane_of(wid, nwg, lid);
    let vecs = p().chunk_elems / 4u;
    var walk = walk_at(4u * lane.x);
    let step = stride_of(4u * lane.y);
    for (var k = 0u; k < p().elementwise_steps; k++) {
        let v = lane.x + k * lane.y;
        if v >= vecs {
            break;
        }
        let c = coeffs_of(walk.c);
        grad4(v, vec4<f32>(c.x), vec4<f32>(c.y), vec4<f32>(c.z), vec4<f32>(c.w));
        walk = walk_by(walk, step);
    }
}

// Channels last (a mask per row if any): a vec4 is four consecutive channels.
@compute @workgroup_size(256)
fn backward_dx_coalesced_channels4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lane = lane_of(wid, nwg, lid);
    let vecs = p().chunk_elems / 4u;
    let quads = p().channels / 4u;
    // chunks of channels-last vec4 layouts start on a row
    var q = lane.x % quads;
    let step = lane.y % quads;
    for (var k = 0u; k < p().elementwise_steps; k++) {
        let v = lane.x + k * lane.y;
        if v >= vecs {
            break;
        }
        let c = quad_coeffs(q);
        grad4_kept(v, c[0], c[1], c[2], c[3], !MASKED || row_masked_in(v / quads));
        q = select(q + step, q + step - quads, q + step >= quads);
    }
}

// inner >= 16, not a multiple of 4, no mask: a vec4 meets at most two channels.
@compute @workgroup_size(256)
fn backward_dx_coalesced_runs16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lane = lane_of(wid, nwg, lid);
    let vecs = p().chunk_elems / 4u;
    var walk = walk_at(4u * lane.x);
    let step = stride_of(4u * lane.y);
    for (var k = 0u; k < p().elementwise_steps; k++) {
        let v = lane.x + k * lane.y;
        if v >= vecs {
            break;
        }
        let two = two_channels_at(walk);
        let next = in_next_channel(two, 0u);
        let k0 = coeffs_of(two.c0);
        let k1 = coeffs_of(two.c1);
        grad4(
            v,
            select(vec4<f32>(k0.x), vec4<f32>(k1.x), next),
            select(vec4<f32>(k0.y), vec4<f32>(k1.y), next),
            select(vec4<f32>(k0.z), vec4<f32>(k1.z), next),
            select(vec4<f32>(k0.w), vec4<f32>(k1.w), next),
        );
        walk = walk_by(walk, step);
    }
}
