// Shared by the elementwise kernels (normalise, dx): which channel the
// elements of a chunk belong to, without a division per element (a vector
// integer division is eight scalar ones on llvmpipe).

// The channel `c` of an element and its position `i` in the channel's run,
// found once by division and then followed by counting.
struct ChannelWalk {
    c: u32,
    i: u32,
}

// the walk at element `e` of the chunk
fn walk_at(e: u32) -> ChannelWalk {
    let a = p().chunk_start + e;
    return ChannelWalk((a / p().inner) % p().channels, a % p().inner);
}

fn walk_next(w: ChannelWalk) -> ChannelWalk {
    if w.i + 1u < p().inner {
        return ChannelWalk(w.c, w.i + 1u);
    }
    return ChannelWalk(select(w.c + 1u, 0u, w.c + 1u == p().channels), 0u);
}

// The channels of elements e .. e + 15 of the chunk when inner >= 16: the
// first one's channel `c0`, the next channel `c1`, and how many of the
// sixteen still lie in c0.
struct TwoChannels {
    c0: u32,
    c1: u32,
    in_c0: u32,
}

fn two_channels(e: u32) -> TwoChannels {
    let a = p().chunk_start + e;
    let c0 = (a / p().inner) % p().channels;
    return TwoChannels(c0, select(c0 + 1u, 0u, c0 + 1u == p().channels), p().inner - a % p().inner);
}

// which lanes of the k-th vec4 from e lie in c1
fn in_next_channel(two: TwoChannels, k: u32) -> vec4<bool> {
    return vec4<u32>(4u * k) + vec4<u32>(0u, 1u, 2u, 3u) >= vec4<u32>(two.in_c0);
}

// Values (float32), words (float16) or vec4s one serial invocation maps:
// lavapipe streams fastest with four consecutive vec4s per invocation (the
// host sets it: PlanTuning::values_per_thread).
override PER_THREAD: u32 = 4u;

// Rows one channels-last invocation walks: set by the host
// (PlanTuning::rows_per_thread), which sizes the grid.
override ROWS_PER_THREAD: u32;

// Channels last, `lanes` invocations across a row: invocation `thread` walks
// rows [x, y) of the chunk (empty past the end).
fn row_band(thread: u32, lanes: u32) -> vec2<u32> {
    let rows = p().chunk_elems / p().channels;
    let r0 = (thread / lanes) * ROWS_PER_THREAD;
    return vec2<u32>(r0, min(r0 + ROWS_PER_THREAD, rows));
}

// Coalesced elementwise kernels: this lane's index in the grid, and the
// grid's lanes (the stride between a lane's units).
fn lane_of(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> vec2<u32> {
    return vec2<u32>((wid.x + wid.y * nwg.x) * WG + lid, nwg.x * nwg.y * WG);
}

// A walk's stride of `s` elements: whole runs (mod channels) and the rest.
fn stride_of(s: u32) -> ChannelWalk {
    return ChannelWalk((s / p().inner) % p().channels, s % p().inner);
}

// The walk `step` elements on (step from stride_of), with no division.
fn walk_by(w: ChannelWalk, step: ChannelWalk) -> ChannelWalk {
    var i = w.i + step.i;
    var c = w.c + step.c;
    // each part below its bound: one carry, one wrap at most
    if i >= p().inner {
        i -= p().inner;
        c += 1u;
    }
    if c >= p().channels {
        c -= p().channels;
    }
    return ChannelWalk(c, i);
}

// The two channels of the vec4 at the walk (inner >= 16: at most two).
fn two_channels_at(w: ChannelWalk) -> TwoChannels {
    return TwoChannels(w.c, select(w.c + 1u, 0u, w.c + 1u == p().channels), p().inner - w.i);
}

// A channel's parameters k as the lanes of a vec4 take them: one column a
// parameter, the same in every lane.
fn splat_coef(k: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(vec4<f32>(k.x), vec4<f32>(k.y), vec4<f32>(k.z), vec4<f32>(k.w));
}

// The lanes in `next` take channel parameters k1, the others k0.
fn select_coef(k0: vec4<f32>, k1: vec4<f32>, next: vec4<bool>) -> mat4x4<f32> {
    return mat4x4<f32>(
        select(vec4<f32>(k0.x), vec4<f32>(k1.x), next),
        select(vec4<f32>(k0.y), vec4<f32>(k1.y), next),
        select(vec4<f32>(k0.z), vec4<f32>(k1.z), next),
        select(vec4<f32>(k0.w), vec4<f32>(k1.w), next),
    );
}
