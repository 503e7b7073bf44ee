// Eight invocations per channel (eight channels per workgroup): they merge
// the channel's partial statistics (finalize_lanes.wgsl, shared with the
// backward finalize); the first of the eight then updates the moving statistics in place (training only) and writes the
// per-channel affine map that the normalise pass applies:
//   y = (x - shift) * scale + offset
// Keeping the shift (a sample of the channel) apart from the small
// correction `mean - shift` is what keeps y exact when |mean| >> std.

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
// [gamma | beta | moving_mean | moving_variance | moving_stddev | renorm_mean | renorm_stddev],
// p().state_stride floats apart
@group(0) @binding(2) var<storage, read_write> state: array<f32>;
// [shift | scale | offset], `channels` values each (vec4-readable by channel quads)
@group(0) @binding(3) var<storage, read_write> affine: array<f32>;
// What backward needs, two per channel:
// (shift, mean - shift, 1 / sqrt(var + eps), r), (d, denominator, mask eps, count)
@group(0) @binding(4) var<storage, read_write> saved: array<vec4<f32>>;

// Keras's backend.epsilon(): added to the masked count before dividing
const MASK_COUNT_EPS: f32 = 1e-7;

fn write_affine(c: u32, shift: f32, scale: f32, offset: f32) {
    affine[c] = shift;
    affine[p().channels + c] = scale;
    affine[2u * p().channels + c] = offset;
}

// Chan's merge of two (count, shift, mean - shift, M2) partials, relative
// to the first non-empty one's shift (finalize_lanes.wgsl's `combine`)
fn combine(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if b.x == 0.0 {
        return a;
    }
    if a.x == 0.0 {
        return b;
    }
    let n = a.x + b.x;
    let wb = b.x / n;
    if !is_finite_f32(a.z) || !is_finite_f32(b.z) {
        // an infinite mean (an Inf value) stays infinite, +Inf and -Inf
        // make NaN, as in the reference; a NaN propagates
        return vec4<f32>(n, a.y, a.z + b.z, a.w + b.w);
    }
    // M2 is scaled by shift_scale of its shift: b's into a's scale
    let ka = shift_scale(a.y);
    let r = ka / shift_scale(b.y);
    let d = ((b.y - a.y) + b.z) - a.z;
    let dk = d * ka;
    return vec4<f32>(n, a.y, a.z + d * wb, a.w + b.w * r * r + dk * dk * a.x * wb);
}

@compute @workgroup_size(64)
fn finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = finalize_channel(wid, lid);
    let nc = p().channels;
    // the channel's merged tiles, in its first lane (barriers: no
    // invocation leaves before them)
    var total = vec4<f32>(0.0);
    if has_flag(FLAG_TRAINING) {
        total = combine_tiles(c, lid);
    }
    if lid % LANES != 0u || c >= nc {
        return;
    }
    if has_flag(FLAG_MERGE_ONLY) {
        // a synchronized call's local moments, merged across ranks on the host
        saved[c] = total;
        return;
    }
    let gamma = select(1.0, state[c], has_flag(FLAG_SCALE));
    let beta = select(0.0, state[p().state_stride + c], has_flag(FLAG_CENTER));
    let moving_mean = state[2u * p().state_stride + c];
    let moving_variance = state[3u * p().state_stride + c];
    let eps = p().epsilon;

    if !has_flag(FLAG_TRAINING) {
        let inv = inverseSqrt(moving_variance + eps);
        write_affine(c, moving_mean, inv * gamma, beta);
        saved[2u * c] = vec4<f32>(moving_mean, 0.0, inv, 1.0);
        saved[2u * c + 1u] = vec4<f32>(0.0, 1.0, 0.0, 0.0);
        return;
    }

    let count = total.x;
    let shift = total.y;
    var delta = total.z;
    var m2 = total.w;

    // m2 is scaled by k (see shift_scale): the variance is kept scaled
    // until the end, so that one whose sum of squares overflows float32
    // still comes out right
    let k = shift_scale(shift);
    var denom = count;
    var mask_eps = 0.0;
    if has_flag(FLAG_MASKED) {
        mask_eps = MASK_COUNT_EPS;
        // Keras: mean = sum / (count + 1e-7), var = sum((x - mean)^2) / (count + 1e-7)
        denom = count + MASK_COUNT_EPS;
        let correction = (shift + delta) * (MASK_COUNT_EPS / denom);
        delta -= correction;
        let ck = correction * k;
        m2 += count * ck * ck;
    }
    let scaled_variance = m2 / denom;
    // unscaled in two steps (see shift_unscale): k * k underflows past 2^64
    let u = shift_unscale(shift);
    let variance = (scaled_variance * u) * u;
    let mean = shift + delta;
    var inv = inverseSqrt(variance + eps);
    // a variance past float32 whose normalisation is not (epsilon is
    // negligible there)
    let beyond = !is_finite_f32(variance) && is_finite_f32(scaled_variance);
    if beyond {
        inv = k * inverseSqrt(scaled_variance);
    }
    let m = p().momentum;

    var scale = inv * gamma;
    var offset = beta - delta * scale;
    var r = 1.0;
    var d = 0.0;
    if has_flag(FLAG_RENORM) {
        let stddev = select(sqrt(variance + eps), sqrt(scaled_variance) / k, beyond);
        let renorm_mean = state[5u * p().state_stride + c];
        let renorm_stddev = state[6u * p().state_stride + c];
        let reference_stddev = max(renorm_stddev, sqrt(eps));
        r = stddev / reference_stddev;
        if has_flag(FLAG_RMIN) {
            r = max(r, p().rmin);
        }
        if has_flag(FLAG_RMAX) {
            r = min(r, p().rmax);
        }
        d = ((shift - renorm_mean) + delta) / reference_stddev;
        if has_flag(FLAG_DMAX) {
            d = clamp(d, -p().dmax, p().dmax);
        }
        scale = inv * r * gamma;
        offset = d * gamma + beta - delta * scale;

        let rm = p().renorm_momentum;
        state[5u * p().state_stride + c] = stored(renorm_mean * rm + mean * (1.0 - rm));
        state[6u * p().state_stride + c] = stored(renorm_stddev * rm + stddev * (1.0 - rm));
        state[2u * p().state_stride + c] = stored(moving_mean * m + mean * (1.0 - m));
        let moving_stddev = stored(state[4u * p().state_stride + c] * m + stddev * (1.0 - m));
        state[4u * p().state_stride + c] = moving_stddev;
        state[3u * p().state_stride + c] = stored(max(moving_stddev * moving_stddev - eps, 0.0));
    } else if has_flag(FLAG_PYTORCH) {
        // PyTorch: momentum weighs the new value; the running variance
        // takes the unbiased batch variance (the biased one with one value)
        let unbiased = select(variance, ((m2 / (count - 1.0)) * u) * u, count > 1.0);
        state[2u * p().state_stride + c] = stored(moving_mean * (1.0 - m) + mean * m);
        state[3u * p().state_stride + c] = stored(moving_variance * (1.0 - m) + unbiased * m);
    } else {
        state[2u * p().state_stride + c] = stored(moving_mean * m + mean * (1.0 - m));
        state[3u * p().state_stride + c] = stored(moving_variance * m + variance * (1.0 - m));
    }
    write_affine(c, shift, scale, offset);
    saved[2u * c] = vec4<f32>(shift, delta, inv, r);
    saved[2u * c + 1u] = vec4<f32>(d, denom, mask_eps, count);
}
