// Updates of the layer's trainable weights (gamma, beta) on the GPU: an SGD
// step, then Keras's constraints, applied after every update as Keras does.
// Sections of `state` as in finalize.wgsl: [gamma | beta | ...], each
// state_stride floats apart.

// `struct OptimizerParams` and the OPT_* flags come from src/params.rs,
// generated and prepended by the host (as params.wgsl's Params).

fn stored(v: f32) -> f32 {
    if (q().flags & OPT_F16_STATE) != 0u {
        return round_f16(v);
    }
    return v;
}

const CONSTRAINT_NONE: f32 = 0.0;
const CONSTRAINT_NON_NEG: f32 = 1.0;
const CONSTRAINT_MAX_NORM: f32 = 2.0;
const CONSTRAINT_MIN_MAX_NORM: f32 = 3.0;
const CONSTRAINT_UNIT_NORM: f32 = 4.0;
// Keras's backend epsilon in the norm denominators
const NORM_EPS: f32 = 1e-7;
const WG: u32 = 256u;

// Two blocks in the uniform binding, the first holding the parameters.
@group(0) @binding(0) var<uniform> optimizer_slot: array<OptimizerParams, 2>;
// The optimiser's parameters, read as params.wgsl's p() reads a layer
// kernel's (never at a constant offset: lavapipe's uniform inlining).
fn q() -> OptimizerParams {
    return optimizer_slot[min(optimizer_slot[0].zero, 1u)];
}

@group(0) @binding(1) var<storage, read_write> state: array<f32>;
@group(0) @binding(2) var<storage, read> dgamma: array<f32>;
@group(0) @binding(3) var<storage, read> dbeta: array<f32>;
// [gamma velocity | beta velocity]
@group(0) @binding(4) var<storage, read_write> velocity: array<f32>;

// weight `which` (0 gamma, 1 beta) of channel c
fn sgd(which: u32, c: u32, grad: f32) {
    let index = which * q().state_stride + c;
    let v = which * q().channels + c;
    // Keras SGD: m = m * momentum - lr * g; w += m (or, Nesterov,
    // w += m * momentum - lr * g); without momentum w -= lr * g
    if (q().flags & OPT_USE_MOMENTUM) != 0u {
        let m = velocity[v] * q().momentum - q().learning_rate * grad;
        velocity[v] = m;
        if (q().flags & OPT_NESTEROV) != 0u {
            state[index] = stored(state[index] + (m * q().momentum - q().learning_rate * grad));
        } else {
            state[index] = stored(state[index] + m);
        }
    } else {
        state[index] = stored(state[index] - q().learning_rate * grad);
    }
}

@compute @workgroup_size(64)
fn sgd_step(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    // a 2-D grid past 65535 workgroups: rows of groups.x * 64 channels
    let c = gid.x + gid.y * groups.x * 64u;
    if c >= q().channels {
        return;
    }
    if (q().flags & OPT_HAS_GAMMA) != 0u {
        sgd(0u, c, dgamma[c]);
    }
    if (q().flags & OPT_HAS_BETA) != 0u {
        sgd(1u, c, dbeta[c]);
    }
}

var<workgroup> wg_sum: array<f32, WG>;

// Workgroup 0 constrains gamma, workgroup 1 beta. Keras's norm constraints
// on a one-axis weight take the norm over every channel.
@compute @workgroup_size(256)
fn constrain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let which = wid.x;
    var constraint = q().gamma_constraint;
    var present = (q().flags & OPT_HAS_GAMMA) != 0u;
    if which == 1u {
        constraint = q().beta_constraint;
        present = (q().flags & OPT_HAS_BETA) != 0u;
    }
    // uniform across the workgroup
    if !present || constraint.x == CONSTRAINT_NONE {
        return;
    }
    let base = which * q().state_stride;
    // each invocation owns a contiguous block: ceil(channels / 256) values
    let per = (q().channels + WG - 1u) / WG;
    let begin = min(lid * per, q().channels);
    let end = min(begin + per, q().channels);
    if constraint.x == CONSTRAINT_NON_NEG {
        for (var c = begin; c < end; c++) {
            state[base + c] = stored(max(state[base + c], 0.0));
        }
        return;
    }
    var sum = 0.0;
    for (var c = begin; c < end; c++) {
        sum += state[base + c] * state[base + c];
    }
    wg_sum[lid] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            wg_sum[lid] += wg_sum[lid + stride];
        }
        workgroupBarrier();
    }
    let norm = sqrt(wg_sum[0]);
    var desired = 1.0;
    if constraint.x == CONSTRAINT_MAX_NORM {
        desired = clamp(norm, 0.0, constraint.y);
    } else if constraint.x == CONSTRAINT_MIN_MAX_NORM {
        let rate = constraint.w;
        desired = rate * clamp(norm, constraint.y, constraint.z) + (1.0 - rate) * norm;
    }
    let factor = desired / (NORM_EPS + norm);
    for (var c = begin; c < end; c++) {
        state[base + c] = stored(state[base + c] * factor);
    }
}
