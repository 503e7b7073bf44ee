//! The float64 mirror of each GPU kernel, one function a kernel (as
//! vello's CPU shaders): statistics, finalize, normalise, backward reduce,
//! backward finalize, dx. `ReferenceLayer` runs them in the GPU layer's
//! order; the tools compare kernel by kernel (feature `conformance`).

use super::{ChannelMoments, MASK_COUNT_EPS, ReferenceState, stored};
use crate::config::{BatchNormConfig, ChannelView, RunningStatistics};

/// Mirror of the statistics kernel: per-channel moments over the values the
/// mask lets in (the mask has the input shape without its last axis).
pub fn channel_moments(x: &[f64], view: ChannelView, mask: Option<&[u8]>, last_dim: usize) -> Vec<ChannelMoments> {
    let included = |e: usize| mask.is_none_or(|m| m[e / last_dim] != 0);
    let mut sums = vec![(0.0f64, 0.0f64); view.channels];
    for (e, &v) in x.iter().enumerate() {
        if included(e) {
            let s = &mut sums[view.channel_of(e)];
            s.0 += 1.0;
            s.1 += v;
        }
    }
    let mut moments: Vec<ChannelMoments> = sums
        .iter()
        .map(|&(count, sum)| ChannelMoments {
            count,
            mean: if count > 0.0 { sum / count } else { 0.0 },
            m2: 0.0,
        })
        .collect();
    // two passes: exact enough in float64 for any input this crate handles
    for (e, &v) in x.iter().enumerate() {
        if included(e) {
            let m = &mut moments[view.channel_of(e)];
            m.m2 += (v - m.mean) * (v - m.mean);
        }
    }
    moments
}

/// Per channel: y = (x - mean) * scale + offset, and what backward needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelAffine {
    /// The mean subtracted.
    pub mean: f64,
    /// The scale applied after.
    pub scale: f64,
    /// The offset added last.
    pub offset: f64,
    /// 1 / sqrt(variance + epsilon)
    pub inv: f64,
    /// Renorm's corrections (1 and 0 without renorm or in inference).
    pub r: f64,
    /// Renorm's d correction (0 without renorm).
    pub d: f64,
    /// The statistics' denominator (count, or count + 1e-7 with a mask).
    pub denom: f64,
    /// 1e-7 with a mask, else 0.
    pub mask_eps: f64,
    /// Values in the batch statistics (0 in inference).
    pub count: f64,
}

/// Mirror of the finalize kernel. With batch moments (training) it applies
/// Keras's mask denominators and renorm corrections and updates `state`;
/// without (inference) it reads the moving statistics.
pub fn finalize(
    config: &BatchNormConfig,
    state: &mut ReferenceState,
    moments: Option<&[ChannelMoments]>,
    masked: bool,
) -> Vec<ChannelAffine> {
    let eps = config.epsilon as f64;
    let momentum = config.momentum as f64;
    let channels = state.moving_mean.len();
    let q = |v: f64| stored(config, v);
    (0..channels)
        .map(|c| {
            let gamma = if config.scale { state.gamma[c] } else { 1.0 };
            let beta = if config.center { state.beta[c] } else { 0.0 };
            let Some(moments) = moments else {
                let inv = 1.0 / (state.moving_variance[c] + eps).sqrt();
                return ChannelAffine {
                    mean: state.moving_mean[c],
                    scale: gamma * inv,
                    offset: beta,
                    inv,
                    r: 1.0,
                    d: 0.0,
                    denom: 1.0,
                    mask_eps: 0.0,
                    count: 0.0,
                };
            };
            let ChannelMoments { count, mean, m2 } = moments[c];
            // `deviations`: sum of squared deviations from the statistics' mean
            let (mean, deviations, denom) = if masked {
                let denom = count + MASK_COUNT_EPS;
                let keras_mean = mean * count / denom;
                // sum((x - keras_mean)^2) = m2 + count * (mean - keras_mean)^2
                let d = mean - keras_mean;
                (keras_mean, m2 + count * d * d, denom)
            } else {
                (mean, m2, count)
            };
            let variance = deviations / denom;
            let inv = 1.0 / (variance + eps).sqrt();
            let mut affine = ChannelAffine {
                mean,
                scale: inv * gamma,
                offset: beta,
                inv,
                r: 1.0,
                d: 0.0,
                denom,
                mask_eps: if masked { MASK_COUNT_EPS } else { 0.0 },
                count,
            };
            if config.renorm {
                let clip = config.renorm_clipping;
                let stddev = (variance + eps).sqrt();
                let reference_stddev = state.renorm_stddev[c].max(eps.sqrt());
                let mut r = stddev / reference_stddev;
                let mut d = (mean - state.renorm_mean[c]) / reference_stddev;
                if let Some(rmin) = clip.rmin {
                    r = r.max(rmin as f64);
                }
                if let Some(rmax) = clip.rmax {
                    r = r.min(rmax as f64);
                }
                if let Some(dmax) = clip.dmax {
                    d = d.clamp(-dmax as f64, dmax as f64);
                }
                affine.scale = inv * r * gamma;
                affine.offset = d * gamma + beta;
                affine.r = r;
                affine.d = d;
                let rm = config.renorm_momentum as f64;
                state.renorm_mean[c] = q(state.renorm_mean[c] * rm + mean * (1.0 - rm));
                state.renorm_stddev[c] = q(state.renorm_stddev[c] * rm + stddev * (1.0 - rm));
                state.moving_mean[c] = q(state.moving_mean[c] * momentum + mean * (1.0 - momentum));
                let moving_stddev = q(state.moving_stddev[c] * momentum + stddev * (1.0 - momentum));
                state.moving_stddev[c] = moving_stddev;
                state.moving_variance[c] = q((moving_stddev * moving_stddev - eps).max(0.0));
            } else if config.running_statistics == RunningStatistics::PyTorch {
                let unbiased = if count > 1.0 {
                    deviations / (count - 1.0)
                } else {
                    variance
                };
                state.moving_mean[c] = q(state.moving_mean[c] * (1.0 - momentum) + mean * momentum);
                state.moving_variance[c] = q(state.moving_variance[c] * (1.0 - momentum) + unbiased * momentum);
            } else {
                state.moving_mean[c] = q(state.moving_mean[c] * momentum + mean * (1.0 - momentum));
                state.moving_variance[c] = q(state.moving_variance[c] * momentum + variance * (1.0 - momentum));
            }
            affine
        })
        .collect()
}

/// Mirror of the normalise kernel.
pub fn normalize(x: &[f64], view: ChannelView, affine: &[ChannelAffine]) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(e, &v)| {
            let a = affine[view.channel_of(e)];
            (v - a.mean) * a.scale + a.offset
        })
        .collect()
}

/// Per channel: sum(dy) and sum(dy * (x - mean)) over every position, and
/// sum(x - mean) over the masked-in ones.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GradSums {
    /// sum(dy).
    pub sum_dy: f64,
    /// sum(dy * (x - mean)).
    pub sum_dy_centered: f64,
    /// sum(x - mean) over the masked-in values.
    pub sum_centered: f64,
}

/// Mirror of the backward reduce kernel.
pub fn backward_sums(
    x: &[f64],
    dy: &[f64],
    view: ChannelView,
    mask: Option<&[u8]>,
    last_dim: usize,
    affine: &[ChannelAffine],
) -> Vec<GradSums> {
    let mut sums = vec![GradSums::default(); view.channels];
    for (e, (&xv, &g)) in x.iter().zip(dy).enumerate() {
        let c = view.channel_of(e);
        let centered = xv - affine[c].mean;
        sums[c].sum_dy += g;
        sums[c].sum_dy_centered += g * centered;
        if mask.is_none_or(|m| m[e / last_dim] != 0) {
            sums[c].sum_centered += centered;
        }
    }
    sums
}

/// dx = c1 * dy - m * (c2 + c3 * (x - mean)) per channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DxCoefficients {
    /// The mean dx is centred on.
    pub mean: f64,
    /// Factor of dy.
    pub c1: f64,
    /// Constant term (masked-in positions).
    pub c2: f64,
    /// Factor of (x - mean) (masked-in positions).
    pub c3: f64,
}

/// Mirror of the backward finalize kernel: dgamma, dbeta (`None` where the
/// layer has no such trainable weight) and the dx coefficients.
pub fn backward_finalize(
    config: &BatchNormConfig,
    state: &ReferenceState,
    affine: &[ChannelAffine],
    sums: &[GradSums],
    batch_statistics: bool,
    regularization: bool,
) -> (Option<Vec<f64>>, Option<Vec<f64>>, Vec<DxCoefficients>) {
    let channels = affine.len();
    let mut dgamma = vec![0.0; channels];
    let mut dbeta = vec![0.0; channels];
    let mut coeffs = Vec::with_capacity(channels);
    for c in 0..channels {
        let a = affine[c];
        let s = sums[c];
        let mut sum_dy_centered = s.sum_dy_centered;
        if batch_statistics && a.count > 0.0 {
            // as the GPU does: sum(x - mean) over the masked-in values is
            // mask_eps * mean exactly; the rest is the mean's rounding error
            let mean_error = (s.sum_centered - a.mask_eps * a.mean) / a.count;
            sum_dy_centered -= mean_error * s.sum_dy;
        }
        let sum_dy_xhat = sum_dy_centered * a.inv;
        let gamma = if config.scale { state.gamma[c] } else { 1.0 };
        dgamma[c] = sum_dy_xhat * a.r + a.d * s.sum_dy;
        dbeta[c] = s.sum_dy;
        if regularization {
            if let Some(r) = config.gamma_regularizer {
                dgamma[c] += r.gradient(state.gamma[c]);
            }
            if let Some(r) = config.beta_regularizer {
                dbeta[c] += r.gradient(state.beta[c]);
            }
        }
        let gamma_eff = gamma * a.r;
        let c1 = a.inv * gamma_eff;
        let (mut c2, mut c3) = (0.0, 0.0);
        if batch_statistics {
            let sg = gamma_eff * s.sum_dy;
            let sgx = gamma_eff * sum_dy_xhat;
            // the mean's own dependence through Keras's count + 1e-7
            let mean_term = a.inv * a.mask_eps * a.mean * sgx / (a.denom * a.denom);
            c2 = a.inv * (sg / a.denom - mean_term);
            c3 = a.inv * a.inv * sgx / a.denom;
        }
        coeffs.push(DxCoefficients {
            mean: a.mean,
            c1,
            c2,
            c3,
        });
    }
    let trainable = config.trainable;
    (
        (config.scale && trainable).then_some(dgamma),
        (config.center && trainable).then_some(dbeta),
        coeffs,
    )
}

/// Mirror of the backward dx kernel.
pub fn backward_dx(
    x: &[f64],
    dy: &[f64],
    view: ChannelView,
    mask: Option<&[u8]>,
    last_dim: usize,
    coeffs: &[DxCoefficients],
) -> Vec<f64> {
    x.iter()
        .zip(dy)
        .enumerate()
        .map(|(e, (&xv, &g))| {
            let k = coeffs[view.channel_of(e)];
            let included = mask.is_none_or(|m| m[e / last_dim] != 0);
            k.c1 * g - if included { k.c2 + k.c3 * (xv - k.mean) } else { 0.0 }
        })
        .collect()
}
