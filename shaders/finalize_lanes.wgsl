// Shared by the finalize kernels (finalize.wgsl, backward_finalize.wgsl):
// eight invocations per channel (eight channels per workgroup) combine the
// channel's partials, each a strided share of the tiles (at most
// plan::MAX_TILES / 8 steps), then a three-level tree in workgroup memory. How two partials
// combine is the kernel's `combine(a, b)`: Chan's merge of the statistics,
// a sum of the backward reduce's sums.

// invocations per channel: one SIMD group on lavapipe (contiguous loads,
// few barriers), eight-fold parallel on a GPU
const LANES: u32 = 8u;
var<workgroup> lane_partials: array<vec4<f32>, 64>;

// The channel of invocation `lid` of workgroup `wid` (its lane: lid % LANES).
fn finalize_channel(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * p().finalize_groups_x) * (64u / LANES) + lid / LANES;
}

// Channel c's partials combined, in the channel's first lane. Workgroup
// memory is read only where this invocation's workgroup wrote it (it
// starts undefined). Barriers inside: every invocation calls it, in
// uniform control flow (those past the last channel take no tiles).
fn combine_tiles(c: u32, lid: u32) -> vec4<f32> {
    let lane = lid % LANES;
    let tiles = select(0u, p().total_tiles, c < p().channels);
    var acc = vec4<f32>(0.0);
    for (var t = lane; t < tiles; t += LANES) {
        acc = combine(acc, partials[c * p().total_tiles + t]);
    }
    lane_partials[lid] = acc;
    workgroupBarrier();
    for (var half = LANES / 2u; half > 0u; half /= 2u) {
        if lane < half {
            lane_partials[lid] = combine(lane_partials[lid], lane_partials[lid + half]);
        }
        workgroupBarrier();
    }
    return lane_partials[lid];
}
