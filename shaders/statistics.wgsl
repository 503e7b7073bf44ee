// Per-channel partial statistics over tiles of one channel's values.
//
// A workgroup reduces one tile of one channel: each invocation walks
// `elems_per_thread` consecutive values of that channel (contiguous memory
// when inner > 1; lavapipe rewards per-invocation contiguity) and
// accumulates sums shifted by the tile's first value, so that a channel
// whose mean is far from zero keeps its precision. The workgroup then
// merges (count, mean, M2) triples with Chan's formula.
//
// The per-invocation loop is bounded by `elems_per_thread` (<= 4096 on the
// host side): llvmpipe silently ends any loop after 65535 iterations.

override IS_F16: bool = false;
override MASKED: bool = false;

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
// (count, tile shift, mean - shift, M2) per channel and tile
@group(0) @binding(3) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> wg_count: array<f32, WG>;
var<workgroup> wg_mean: array<f32, WG>;
var<workgroup> wg_m2: array<f32, WG>;

@compute @workgroup_size(256)
fn partial_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * p.stats_groups_x;
    // uniform across the workgroup, so returning keeps barriers uniform
    if group >= p.tiles * p.channels {
        return;
    }
    let c = group / p.tiles;
    let tile = group % p.tiles;
    let j_begin = first_j_at(p.chunk_start, c);
    let j_end = first_j_at(p.chunk_start + p.chunk_elems, c);
    let tile_start = j_begin + tile * WG * p.elems_per_thread;
    // a tile past this channel's values in the chunk still writes its (empty) partial
    var shift = 0.0;
    if tile_start < j_end {
        shift = load_x(p.x_base + element_of(tile_start, c) - p.chunk_start);
    }

    let j0 = min(tile_start + lid * p.elems_per_thread, j_end);
    let j1 = min(j0 + p.elems_per_thread, j_end);
    var o = j0 / p.inner;
    var i = j0 % p.inner;
    var s1 = 0.0;
    var s2 = 0.0;
    var count = 0.0;
    for (var j = j0; j < j1; j++) {
        let a = (o * p.channels + c) * p.inner + i;
        let v = load_x(p.x_base + a - p.chunk_start) - shift;
        if !MASKED || masked_in(a) {
            s1 += v;
            s2 += v * v;
            count += 1.0;
        }
        i += 1u;
        if i == p.inner {
            i = 0u;
            o += 1u;
        }
    }
    var mean = 0.0;
    var m2 = 0.0;
    if count > 0.0 {
        mean = s1 / count;
        m2 = max(s2 - s1 * mean, 0.0);
    }
    wg_count[lid] = count;
    wg_mean[lid] = mean;
    wg_m2[lid] = m2;
    workgroupBarrier();

    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            let na = wg_count[lid];
            let nb = wg_count[lid + stride];
            let n = na + nb;
            if nb > 0.0 {
                let delta = wg_mean[lid + stride] - wg_mean[lid];
                let wb = nb / n;
                wg_mean[lid] += delta * wb;
                wg_m2[lid] += wg_m2[lid + stride] + delta * delta * na * wb;
                wg_count[lid] = n;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        partials[c * p.total_tiles + p.tile_offset + tile] = vec4<f32>(wg_count[0], shift, wg_mean[0], wg_m2[0]);
    }
}
