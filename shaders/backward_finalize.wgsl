// Backward, pass 2: eight invocations per channel (as finalize.wgsl) add up
// the tile sums, then the first of them turns them into dgamma and dbeta
// and the coefficients of dx:
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

const LANES: u32 = 8u;
var<workgroup> sums: array<vec4<f32>, 64>;

@compute @workgroup_size(64)
fn backward_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = (wid.x + wid.y * p().finalize_groups_x) * (64u / LANES) + lid / LANES;
    let lane = lid % LANES;
    let nc = p().channels;
    // barriers below: no invocation leaves before them
    let tiles = select(0u, p().total_tiles, c < nc);
    // a strided share of the tiles each (at most 65535 / 8 steps)
    var acc = vec4<f32>(0.0);
    for (var t = lane; t < tiles; t += LANES) {
        acc += partials[c * p().total_tiles + t];
    }
    sums[lid] = acc;
    workgroupBarrier();
    for (var half = LANES / 2u; half > 0u; half /= 2u) {
        if lane < half {
            sums[lid] += sums[lid + half];
        }
        workgroupBarrier();
    }
    if lane != 0u || c >= nc {
        return;
    }
    if has_flag(FLAG_MERGE_ONLY) {
        // a synchronized call's local sums, added across ranks on the host
        coeffs[c] = sums[lid];
        return;
    }
    let sum_dy = sums[lid].x;
    var sum_dyx = sums[lid].y;
    let sum_xc = sums[lid].z;
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
