// One invocation per channel: merges the channel's partial statistics,
// updates the moving statistics in place (training only) and writes the
// per-channel affine map that the normalise pass applies:
//   y = (x - shift) * scale + offset
// Keeping the shift (a sample of the channel) apart from the small
// correction `mean - shift` is what keeps y exact when |mean| >> std.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
// [gamma | beta | moving_mean | moving_variance | moving_stddev | renorm_mean | renorm_stddev]
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
    affine[p.channels + c] = scale;
    affine[2u * p.channels + c] = offset;
}

@compute @workgroup_size(64)
fn finalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x + gid.y * p.finalize_groups_x * 64u;
    let nc = p.channels;
    if c >= nc {
        return;
    }
    let gamma = select(1.0, state[c], has_flag(FLAG_SCALE));
    let beta = select(0.0, state[nc + c], has_flag(FLAG_CENTER));
    let moving_mean = state[2u * nc + c];
    let moving_variance = state[3u * nc + c];
    let eps = p.epsilon;

    if !has_flag(FLAG_TRAINING) {
        let inv = inverseSqrt(moving_variance + eps);
        write_affine(c, moving_mean, inv * gamma, beta);
        saved[2u * c] = vec4<f32>(moving_mean, 0.0, inv, 1.0);
        saved[2u * c + 1u] = vec4<f32>(0.0, 1.0, 0.0, 0.0);
        return;
    }

    // Chan merge of the tiles, relative to the first non-empty tile's shift.
    var count = 0.0;
    var shift = 0.0;
    var delta = 0.0;
    var m2 = 0.0;
    for (var t = 0u; t < p.total_tiles; t++) {
        let q = partials[c * p.total_tiles + t];
        if q.x == 0.0 {
            continue;
        }
        if count == 0.0 {
            count = q.x;
            shift = q.y;
            delta = q.z;
            m2 = q.w;
            continue;
        }
        let n = count + q.x;
        let d = ((q.y - shift) + q.z) - delta;
        let wb = q.x / n;
        delta += d * wb;
        m2 += q.w + d * d * count * wb;
        count = n;
    }

    var denom = count;
    var mask_eps = 0.0;
    if has_flag(FLAG_MASKED) {
        mask_eps = MASK_COUNT_EPS;
        // Keras: mean = sum / (count + 1e-7), var = sum((x - mean)^2) / (count + 1e-7)
        denom = count + MASK_COUNT_EPS;
        let correction = (shift + delta) * (MASK_COUNT_EPS / denom);
        delta -= correction;
        m2 += count * correction * correction;
    }
    let variance = m2 / denom;
    let mean = shift + delta;
    let inv = inverseSqrt(variance + eps);
    let m = p.momentum;

    var scale = inv * gamma;
    var offset = beta - delta * scale;
    var r = 1.0;
    var d = 0.0;
    if has_flag(FLAG_RENORM) {
        let stddev = sqrt(variance + eps);
        let renorm_mean = state[5u * nc + c];
        let renorm_stddev = state[6u * nc + c];
        let reference_stddev = max(renorm_stddev, sqrt(eps));
        r = stddev / reference_stddev;
        if has_flag(FLAG_RMIN) {
            r = max(r, p.rmin);
        }
        if has_flag(FLAG_RMAX) {
            r = min(r, p.rmax);
        }
        d = ((shift - renorm_mean) + delta) / reference_stddev;
        if has_flag(FLAG_DMAX) {
            d = clamp(d, -p.dmax, p.dmax);
        }
        scale = inv * r * gamma;
        offset = d * gamma + beta - delta * scale;

        let rm = p.renorm_momentum;
        state[5u * nc + c] = renorm_mean * rm + mean * (1.0 - rm);
        state[6u * nc + c] = renorm_stddev * rm + stddev * (1.0 - rm);
        state[2u * nc + c] = moving_mean * m + mean * (1.0 - m);
        let moving_stddev = state[4u * nc + c] * m + stddev * (1.0 - m);
        state[4u * nc + c] = moving_stddev;
        state[3u * nc + c] = max(moving_stddev * moving_stddev - eps, 0.0);
    } else if has_flag(FLAG_PYTORCH) {
        // PyTorch: momentum weighs the new value; the running variance
        // takes the unbiased batch variance (the biased one with one value)
        let unbiased = select(variance, m2 / (count - 1.0), count > 1.0);
        state[2u * nc + c] = moving_mean * (1.0 - m) + mean * m;
        state[3u * nc + c] = moving_variance * (1.0 - m) + unbiased * m;
    } else {
        state[2u * nc + c] = moving_mean * m + mean * (1.0 - m);
        state[3u * nc + c] = moving_variance * m + variance * (1.0 - m);
    }
    write_affine(c, shift, scale, offset);
    saved[2u * c] = vec4<f32>(shift, delta, inv, r);
    saved[2u * c + 1u] = vec4<f32>(d, denom, mask_eps, count);
}
