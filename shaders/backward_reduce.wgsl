// Backward, pass 1: per channel tile, sum(dy) and sum(dy * (x - mean)),
// fused in one read of x and dy. Tiles and loops as in statistics.wgsl.
// The sums run over every position, masked out or not: every output
// depends on the batch statistics.
//
// sum(dy * (x - mean)) is as sensitive to the float32 error of a batch mean
// as sum(dy) is large. In training a third sum, of (x - mean) over the
// masked-in positions, measures that error (it should be Keras's
// 1e-7 * mean, or 0) so that finalize can take it out.

override IS_F16: bool = false;
override MASKED: bool = false;

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<u32>;
// per channel: (shift, mean - shift, inverse std, r), (d, denominator, mask eps, 0)
@group(0) @binding(3) var<storage, read> saved: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;
// (sum dy, sum dy * (x - mean), sum of masked-in (x - mean), 0) per channel and tile
@group(0) @binding(5) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> wg_dy: array<f32, WG>;
var<workgroup> wg_dyx: array<f32, WG>;
var<workgroup> wg_xc: array<f32, WG>;

fn load_dy(e: u32) -> f32 {
    if IS_F16 {
        return half_at(dy[e >> 1u], e);
    }
    return bitcast<f32>(dy[e]);
}

@compute @workgroup_size(256)
fn backward_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * p.stats_groups_x;
    if group >= p.tiles * p.channels {
        return;
    }
    let c = group / p.tiles;
    let tile = group % p.tiles;
    let stats = saved[2u * c];
    let shift = stats.x;
    let delta = stats.y;
    let j_begin = first_j_at(p.chunk_start, c);
    let j_end = first_j_at(p.chunk_start + p.chunk_elems, c);
    let tile_start = j_begin + tile * WG * p.elems_per_thread;
    let j0 = min(tile_start + lid * p.elems_per_thread, j_end);
    let j1 = min(j0 + p.elems_per_thread, j_end);
    var o = j0 / p.inner;
    var i = j0 % p.inner;
    var s_dy = 0.0;
    var s_dyx = 0.0;
    var s_xc = 0.0;
    for (var j = j0; j < j1; j++) {
        let a = (o * p.channels + c) * p.inner + i;
        let e = p.x_base + a - p.chunk_start;
        let g = load_dy(e);
        let centered = (load_x(e) - shift) - delta;
        s_dy += g;
        s_dyx += g * centered;
        if !MASKED || masked_in(a) {
            s_xc += centered;
        }
        i += 1u;
        if i == p.inner {
            i = 0u;
            o += 1u;
        }
    }
    wg_dy[lid] = s_dy;
    wg_dyx[lid] = s_dyx;
    wg_xc[lid] = s_xc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            wg_dy[lid] += wg_dy[lid + stride];
            wg_dyx[lid] += wg_dyx[lid + stride];
            wg_xc[lid] += wg_xc[lid + stride];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        partials[c * p.total_tiles + p.tile_offset + tile] = vec4<f32>(wg_dy[0], wg_dyx[0], wg_xc[0], 0.0);
    }
}
