// y = (x - shift[c]) * scale[c] + offset[c], coalesced family (follows
// normalize.wgsl in one module and shares its bindings and helpers): lane
// l of a grid of n lanes takes units l, l + n, l + 2n, ... of the chunk
// (vec4s, or values / float16 words for the generic form), so
// neighbouring lanes read and write neighbouring words. Each lane finds
// its channel once and walks it by the grid's stride (channel_walk.wgsl).
// `elementwise_steps` (set by the host, <= 4096) bounds the stride loop.

@compute @workgroup_size(256)
fn normalize_coalesced(
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
            let pair = unpack2x16float(x[p().x_base / 2u + w]);
            var out = vec2<f32>(apply(walk.c, pair.x), 0.0);
            if 2u * w + 1u < p().chunk_elems {
                out.y = apply(walk_next(walk).c, pair.y);
            }
            y[p().y_base / 2u + w] = pack_f16x2(out);
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
            y[p().y_base + e] = bitcast<u32>(apply(walk.c, bitcast<f32>(x[p().x_base + e])));
            walk = walk_by(walk, step);
        }
    }
}

// inner % 4 == 0: a vec4's values share a channel.
@compute @workgroup_size(256)
fn normalize_coalesced_inner4(
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
        let c = walk.c;
        map4(v, vec4<f32>(affine_at(c)), vec4<f32>(affine_at(p().channels + c)), vec4<f32>(affine_at(2u * p().channels + c)));
        walk = walk_by(walk, step);
    }
}

// Channels last, channels % 4 == 0: a vec4 is four consecutive channels.
@compute @workgroup_size(256)
fn normalize_coalesced_channels4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lane = lane_of(wid, nwg, lid);
    let vecs = p().chunk_elems / 4u;
    let quads = p().channels / 4u;
    var q = (p().chunk_start / 4u + lane.x) % quads;
    let step = lane.y % quads;
    for (var k = 0u; k < p().elementwise_steps; k++) {
        let v = lane.x + k * lane.y;
        if v >= vecs {
            break;
        }
        map4(v, affine_quad(q), affine_quad(quads + q), affine_quad(2u * quads + q));
        q = select(q + step, q + step - quads, q + step >= quads);
    }
}

// inner >= 16, not a multiple of 4: a vec4 meets at most two channels.
@compute @workgroup_size(256)
fn normalize_coalesced_runs16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lane = lane_of(wid, nwg, lid);
    let vecs = p().chunk_elems / 4u;
    let n = p().channels;
    var walk = walk_at(4u * lane.x);
    let step = stride_of(4u * lane.y);
    for (var k = 0u; k < p().elementwise_steps; k++) {
        let v = lane.x + k * lane.y;
        if v >= vecs {
            break;
        }
        let two = two_channels_at(walk);
        let next = in_next_channel(two, 0u);
        map4(
            v,
            select(vec4<f32>(affine_at(two.c0)), vec4<f32>(affine_at(two.c1)), next),
            select(vec4<f32>(affine_at(n + two.c0)), vec4<f32>(affine_at(n + two.c1)), next),
            select(vec4<f32>(affine_at(2u * n + two.c0)), vec4<f32>(affine_at(2u * n + two.c1)), next),
        );
        walk = walk_by(walk, step);
    }
}
