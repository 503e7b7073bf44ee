// Backward, pass 2: eight invocations per channel (finalize_lanes.wgsl,
// as finalize.wgsl) add up the tile sums, then the first of them turns
// them into dgamma and dbeta and the coefficients of dx:
//   dx = c1 * dy - m * (c2 + c3 * (x - shift))
// where m is the mask (1 without one). With batch statistics (training)
// the mean and variance depend on x; in inference they are constants and
// c2 = c3 = 0. Renorm's r and d are constants (stop_gradient), as in Keras.

// binding 0: the call's parameters, read through p() (params.wgsl)
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> state: array<f32>;
@group(0) @binding(3) var<storage, read> saved: array<vec4<f32>>;
// [dgamma | dbeta]
@group(0) @binding(4) var<storage, read_write> grads: array<f32>;
// (shift, c1, c2, c3)
@group(0) @binding(5) var<storage, read_write> coeffs: array<vec4<f32>>;

// the tile sums add up (finalize_lanes.wgsl's `combine`)
fn combine(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    return a + b;
}

@compute @workgroup_size(64)
fn backward_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = finalize_channel(wid, lid);
    let nc = p().channels;
    // barriers inside: no invocation leaves before them
    let sums = combine_tiles(c, lid);
    if lid % LANES != 0u || c >= nc {
        return;
    }
    if has_flag(FLAG_MERGE_ONLY) {
        // a synchronized call's local sums, added across ranks on the host
        coeffs[c] = sums;
        return;
    }
    let sum_dy = sums.x;
    var sum_dyx = sums.y;
    let sum_xc = sums.z;
    let stats = saved[2u * c];
    let extra = saved[2u * c + 1u];
    let shift = stats.x;
    let delta = stats.y;
    let inv = stats.z;
    let r = stats.w;
    let d = extra.x;
    let denom = extra.y;
    let mask_eps = extra.z;
    let count = extra.w;
    if has_flag(FLAG_TRAINING) && count > 0.0 {
        // sum over masked-in (x - mean) is exactly mask_eps * mean; what is
        // left over is count times the float32 error of the mean
        let mean_error = (sum_xc - mask_eps * (shift + delta)) / count;
        sum_dyx -= mean_error * sum_dy;
    }
    let sum_dy_xhat = sum_dyx * inv;

    var gamma = 1.0;
    if has_flag(FLAG_SCALE) {
        gamma = state[c];
        var dgamma = sum_dy_xhat * r + d * sum_dy;
        if has_flag(FLAG_GAMMA_L1) {
            dgamma += p().gamma_l1 * sign(gamma);
        }
        if has_flag(FLAG_GAMMA_L2) {
            dgamma += 2.0 * p().gamma_l2 * gamma;
        }
        grads[c] = dgamma;
    }
    if has_flag(FLAG_CENTER) {
        var dbeta = sum_dy;
        let beta = state[p().state_stride + c];
        if has_flag(FLAG_BETA_L1) {
            dbeta += p().beta_l1 * sign(beta);
        }
        if has_flag(FLAG_BETA_L2) {
            dbeta += 2.0 * p().beta_l2 * beta;
        }
        grads[nc + c] = dbeta;
    }
    let gamma_eff = gamma * r;
    // c2 and c3 DX_UPSCALE times larger (see params.wgsl), the factor
    // applied first so that no product passes through a subnormal
    let inv_up = inv * DX_UPSCALE;
    let c1 = inv * gamma_eff;
    var c2 = 0.0;
    var c3 = 0.0;
    if has_flag(FLAG_TRAINING) {
        // g = gamma_eff * dy; a = sum(g) / D (+ Keras's masked-mean epsilon
        // term), b = sum(g * xhat) / D
        let sg = gamma_eff * sum_dy;
        let sgx = gamma_eff * sum_dy_xhat;
        let mean = shift + delta;
        let a = sg / denom - inv * mask_eps * mean * sgx / (denom * denom);
        let b = sgx / denom;
        c3 = inv_up * inv * b;
        c2 = inv_up * a - c3 * delta;
    }
    coeffs[c] = vec4<f32>(shift, c1, c2, c3);
}
