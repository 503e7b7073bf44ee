// Backward, pass 2: one invocation per channel merges the tile sums into
// dgamma and dbeta and the coefficients of dx:
//   dx = c1 * dy - m * (c2 + c3 * (x - shift))
// where m is the mask (1 without one). With batch statistics (training)
// the mean and variance depend on x; in inference they are constants and
// c2 = c3 = 0. Renorm's r and d are constants (stop_gradient), as in Keras.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> state: array<f32>;
@group(0) @binding(3) var<storage, read> saved: array<vec4<f32>>;
// [dgamma | dbeta]
@group(0) @binding(4) var<storage, read_write> grads: array<f32>;
// (shift, c1, c2, c3)
@group(0) @binding(5) var<storage, read_write> coeffs: array<vec4<f32>>;

@compute @workgroup_size(64)
fn backward_finalize(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x + gid.y * p.finalize_groups_x * 64u;
    let nc = p.channels;
    if c >= nc {
        return;
    }
    var sum_dy = 0.0;
    var sum_dyx = 0.0;
    var sum_xc = 0.0;
    for (var t = 0u; t < p.total_tiles; t++) {
        let q = partials[c * p.total_tiles + t];
        sum_dy += q.x;
        sum_dyx += q.y;
        sum_xc += q.z;
    }
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
            dgamma += p.gamma_l1 * sign(gamma);
        }
        if has_flag(FLAG_GAMMA_L2) {
            dgamma += 2.0 * p.gamma_l2 * gamma;
        }
        grads[c] = dgamma;
    }
    if has_flag(FLAG_CENTER) {
        var dbeta = sum_dy;
        let beta = state[nc + c];
        if has_flag(FLAG_BETA_L1) {
            dbeta += p.beta_l1 * sign(beta);
        }
        if has_flag(FLAG_BETA_L2) {
            dbeta += 2.0 * p.beta_l2 * beta;
        }
        grads[nc + c] = dbeta;
    }
    let gamma_eff = gamma * r;
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
        c3 = inv * inv * b;
        c2 = inv * a - c3 * delta;
    }
    coeffs[c] = vec4<f32>(shift, c1, c2, c3);
}
