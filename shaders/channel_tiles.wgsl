// Shared by the kernels that walk one channel's values tile by tile
// (statistics, backward reduce) and the elementwise ones. Expects an `x`
// binding and an IS_F16 override in the including kernel.

fn half_at(word: u32, e: u32) -> f32 {
    let pair = unpack2x16float(word);
    return select(pair.x, pair.y, (e & 1u) == 1u);
}

fn load_x(e: u32) -> f32 {
    if IS_F16 {
        return half_at(x[e >> 1u], e);
    }
    return bitcast<f32>(x[e]);
}

// The first position j (of channel c's values, j = o * inner + i) whose
// element index is at or after absolute element `a`. Element indices grow
// with j, so a chunk's values of channel c are one interval of j.
fn first_j_at(a: u32, c: u32) -> u32 {
    let run = a / p().inner;
    let o = run / p().channels;
    let ca = run % p().channels;
    if c == ca {
        return o * p().inner + a % p().inner;
    }
    if c > ca {
        return o * p().inner;
    }
    return (o + 1u) * p().inner;
}

// Tile `tile` of channel c in this chunk, `per_tile` positions long: the
// positions [x, y) of j-space (empty past the channel's end).
fn tile_span(c: u32, tile: u32, per_tile: u32) -> vec2<u32> {
    let j_end = first_j_at(p().chunk_start + p().chunk_elems, c);
    let j0 = min(first_j_at(p().chunk_start, c) + tile * per_tile, j_end);
    // j0 + per_tile may pass 2^32 near the end of a long channel
    return vec2<u32>(j0, j0 + min(per_tile, j_end - j0));
}

// Channels last: tile `tile` of the chunk's rows, elems_per_thread rows
// long, as rows [x, y) (empty past the end).
fn tile_rows(tile: u32) -> vec2<u32> {
    let rows = p().chunk_elems / p().channels;
    let r0 = min(tile * p().elems_per_thread, rows);
    return vec2<u32>(r0, min(r0 + p().elems_per_thread, rows));
}

// The workgroup's index in the reductions' 2-D grid (over 65535
// workgroups need a second dimension).
fn tile_group(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * p().stats_groups_x;
}

fn element_of(j: u32, c: u32) -> u32 {
    return ((j / p().inner) * p().channels + c) * p().inner + j % p().inner;
}

// What a walk over vec4s of a tile accumulates: three sums a lane (the
// kernel's own, e.g. sum and sum of squares), each a vec4. Walks over
// scalars keep the same three sums in a vec3<f32>.
struct Sums3 {
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
}
