//! The float64 CPU reference: Keras's semantics computed in double
//! precision, written step by step like the GPU path (statistics, finalize,
//! normalise) so that the two can be compared kernel by kernel.

use crate::config::{BatchNormConfig, ChannelView, RunningStatistics, StatePrecision, StateSlot};
use crate::error::{ConfigError, Error, Result};
use crate::sync::{
    CallHeader, Exchange, KIND_BACKWARD, KIND_FAILED, fingerprint, forward_kind, gather_checked, gather_sums,
    reduce_checked,
};

/// Keras's `backend.epsilon()`, added to masked counts.
pub const MASK_COUNT_EPS: f64 = 1e-7;

/// Count, mean and sum of squared deviations of one channel's values.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ChannelMoments {
    /// Values in the statistics.
    pub count: f64,
    /// Their mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl ChannelMoments {
    /// Chan's merge of the moments of two disjoint sets of values.
    pub fn merge(self, other: ChannelMoments) -> ChannelMoments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        ChannelMoments {
            count,
            mean: self.mean + delta * (other.count / count),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / count),
        }
    }
}

/// Every rank's per-channel moments merged channel by channel in rank
/// order: every rank that merges the same lists gets the same bits.
pub fn merge_in_rank_order(ranks: &[Vec<ChannelMoments>]) -> Vec<ChannelMoments> {
    let channels = ranks.first().map_or(0, Vec::len);
    (0..channels)
        .map(|c| ranks.iter().fold(ChannelMoments::default(), |acc, r| acc.merge(r[c])))
        .collect()
}

/// This rank's per-channel moments merged with every rank's under
/// `header` (the synchronized forward of the reference and the GPU layer
/// alike): Chan's merge of each channel, from the first rank to the last
/// (or, under [`crate::sync::Scheme::Tree`], of contiguous ranges of ranks
/// left to right), the same bits on every rank.
pub(crate) fn gather_moments(
    exchange: &dyn Exchange,
    header: CallHeader,
    local: &[ChannelMoments],
) -> Result<Vec<ChannelMoments>> {
    let payload: Vec<f64> = local.iter().flat_map(|m| [m.count, m.mean, m.m2]).collect();
    let merged = reduce_checked(exchange, header, &payload, 3, |acc, x| {
        let moments = |v: &[f64]| ChannelMoments {
            count: v[0],
            mean: v[1],
            m2: v[2],
        };
        let m = moments(acc).merge(moments(x));
        acc.copy_from_slice(&[m.count, m.mean, m.m2]);
    })?;
    Ok(merged
        .chunks_exact(3)
        .map(|m| ChannelMoments {
            count: m[0],
            mean: m[1],
            m2: m[2],
        })
        .collect())
}

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

/// The per-channel state of the layer in float64, Keras's weight names.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceState {
    /// Scale per channel.
    pub gamma: Vec<f64>,
    /// Offset per channel.
    pub beta: Vec<f64>,
    /// Moving mean.
    pub moving_mean: Vec<f64>,
    /// Moving variance.
    pub moving_variance: Vec<f64>,
    /// Renorm's moving standard deviation.
    pub moving_stddev: Vec<f64>,
    /// Renorm's mean.
    pub renorm_mean: Vec<f64>,
    /// Renorm's standard deviation.
    pub renorm_stddev: Vec<f64>,
}

impl ReferenceState {
    /// One state tensor.
    pub fn slot(&self, slot: StateSlot) -> &Vec<f64> {
        match slot {
            StateSlot::Gamma => &self.gamma,
            StateSlot::Beta => &self.beta,
            StateSlot::MovingMean => &self.moving_mean,
            StateSlot::MovingVariance => &self.moving_variance,
            StateSlot::MovingStddev => &self.moving_stddev,
            StateSlot::RenormMean => &self.renorm_mean,
            StateSlot::RenormStddev => &self.renorm_stddev,
        }
    }

    /// One state tensor, to change.
    pub fn slot_mut(&mut self, slot: StateSlot) -> &mut Vec<f64> {
        match slot {
            StateSlot::Gamma => &mut self.gamma,
            StateSlot::Beta => &mut self.beta,
            StateSlot::MovingMean => &mut self.moving_mean,
            StateSlot::MovingVariance => &mut self.moving_variance,
            StateSlot::MovingStddev => &mut self.moving_stddev,
            StateSlot::RenormMean => &mut self.renorm_mean,
            StateSlot::RenormStddev => &mut self.renorm_stddev,
        }
    }
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

/// A weight as a layer of `config` stores it: float16-rounded under
/// [`StatePrecision::Float16`] (Keras's float16 variables), else as is.
pub fn stored(config: &BatchNormConfig, v: f64) -> f64 {
    match config.state_precision {
        StatePrecision::Float32 => v,
        StatePrecision::Float16 => half::f16::from_f64(v).to_f64(),
    }
}

/// Every state tensor's initial values, in [`StateSlot`] order. As in
/// Keras, the renorm statistics start from clones of the moving-statistics
/// initializers (the stddevs as square roots of the variance's values).
pub fn initial_state(config: &BatchNormConfig, channels: usize) -> [Vec<f64>; 7] {
    let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let mean = widen(config.moving_mean_initializer.values(channels));
    let variance = widen(config.moving_variance_initializer.values(channels));
    let stddev: Vec<f64> = variance.iter().map(|v| (*v as f32).sqrt() as f64).collect();
    [
        widen(config.gamma_initializer.values(channels)),
        widen(config.beta_initializer.values(channels)),
        mean.clone(),
        variance,
        stddev.clone(),
        mean,
        stddev,
    ]
    .map(|slot| slot.into_iter().map(|v| stored(config, v)).collect())
}

/// The whole layer on the CPU in float64.
#[derive(Debug, Clone)]
pub struct ReferenceLayer {
    /// The layer's configuration.
    pub config: BatchNormConfig,
    /// The layer's weights in float64.
    pub state: ReferenceState,
    /// What the last forward call leaves for backward.
    pub saved: Option<ReferenceSaved>,
    /// Synchronized calls so far: every rank's count must agree.
    pub synchronized_calls: u64,
}

/// The last forward call's input and per-channel transform.
#[derive(Debug, Clone)]
pub struct ReferenceSaved {
    /// The input.
    pub x: Vec<f64>,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The mask the statistics used, if any.
    pub mask: Option<Vec<u8>>,
    /// Whether the call used batch statistics.
    pub batch_statistics: bool,
    /// The per-channel transform it applied.
    pub affine: Vec<ChannelAffine>,
}

/// Gradients from [`ReferenceLayer::backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceGradients {
    /// Gradient of the input.
    pub dx: Vec<f64>,
    /// Gradient of gamma, where the layer has a trainable one.
    pub dgamma: Option<Vec<f64>>,
    /// Gradient of beta, where the layer has a trainable one.
    pub dbeta: Option<Vec<f64>>,
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

impl ReferenceLayer {
    /// The reference layer with every weight at its initializer's values.
    pub fn new(config: BatchNormConfig, channels: usize) -> Result<Self> {
        config.validate()?;
        if channels == 0 {
            return Err(ConfigError::NoChannels.into());
        }
        let [
            gamma,
            beta,
            moving_mean,
            moving_variance,
            moving_stddev,
            renorm_mean,
            renorm_stddev,
        ] = initial_state(&config, channels);
        let state = ReferenceState {
            gamma,
            beta,
            moving_mean,
            moving_variance,
            moving_stddev,
            renorm_mean,
            renorm_stddev,
        };
        Ok(ReferenceLayer {
            config,
            state,
            saved: None,
            synchronized_calls: 0,
        })
    }

    /// Features on the layer's axis.
    pub fn channels(&self) -> usize {
        self.state.moving_mean.len()
    }

    /// Same contract as [`crate::BatchNorm::forward`], on host values.
    pub fn forward(
        &mut self,
        x: &[f64],
        shape: &[usize],
        training: Option<bool>,
        mask: Option<&[u8]>,
    ) -> Result<Vec<f64>> {
        self.forward_with(x, shape, training, mask, None)
    }

    /// [`ReferenceLayer::forward`] on this rank's slice of a global batch:
    /// in training the per-channel moments of every rank's slice are
    /// reduced through `exchange` and merged in a fixed order (rank order,
    /// or a fixed tree of rank ranges: [`crate::sync::Scheme`]), so the
    /// output, the moving statistics and renorm's corrections are those of
    /// the global batch (Keras's `synchronized=True`), bitwise the same on
    /// every rank. A rank's slice may be empty or fully masked out; under a
    /// mask every rank must pass one (the 1e-7 of Keras's masked count is
    /// added to the global count). Inference and `trainable=False` exchange
    /// nothing. Every rank must make the same calls in the same order: a
    /// mismatch is an [`Error::Exchange`] on every rank.
    pub fn forward_synchronized(
        &mut self,
        x: &[f64],
        shape: &[usize],
        training: Option<bool>,
        mask: Option<&[u8]>,
        exchange: &dyn Exchange,
    ) -> Result<Vec<f64>> {
        self.forward_with(x, shape, training, mask, Some(exchange))
    }

    /// The header of this layer's next synchronized call of `kind`.
    fn next_call(&mut self, kind: u32) -> CallHeader {
        let header = CallHeader {
            kind,
            sequence: self.synchronized_calls,
            channels: self.channels() as u32,
            fingerprint: fingerprint(&format!("reference float64 {:?}", self.config)),
        };
        self.synchronized_calls += 1;
        header
    }

    /// The input's view and last axis, or why the call cannot run. A
    /// synchronized rank's slice may be empty (`empty_ok`).
    fn checked_view(
        &self,
        x: &[f64],
        shape: &[usize],
        mask: Option<&[u8]>,
        empty_ok: bool,
    ) -> Result<(ChannelView, usize)> {
        let axis = self.config.resolve_axis(shape.len())?;
        let view = ChannelView::new(shape, axis);
        if view.len() != x.len() || (shape.contains(&0) && !empty_ok) {
            return Err(Error::shape(
                "x",
                format!("shape {shape:?} does not hold {} values", x.len()),
            ));
        }
        if view.channels != self.channels() {
            return Err(Error::shape(
                "x",
                format!(
                    "input shape {shape:?} has {} features on axis {}, the layer was built for {}",
                    view.channels,
                    self.config.axis,
                    self.channels()
                ),
            ));
        }
        let last_dim = *shape.last().unwrap_or(&1);
        if let Some(m) = mask
            && m.len() * last_dim != x.len()
        {
            return Err(Error::shape(
                "mask",
                format!(
                    "the mask should be the input shape without its last axis ({} flags), got {}",
                    x.len() / last_dim,
                    m.len()
                ),
            ));
        }
        Ok((view, last_dim))
    }

    fn forward_with(
        &mut self,
        x: &[f64],
        shape: &[usize],
        training: Option<bool>,
        mask: Option<&[u8]>,
        exchange: Option<&dyn Exchange>,
    ) -> Result<Vec<f64>> {
        let (view, last_dim) = match self.checked_view(x, shape, mask, exchange.is_some()) {
            Ok(v) => v,
            Err(e) => {
                // the other ranks must not wait for this one (an inference
                // call exchanges nothing: they do not)
                if let Some(exchange) = exchange
                    && training == Some(true)
                    && self.config.trainable
                {
                    let header = self.next_call(KIND_FAILED);
                    let _ = gather_checked(exchange, header, &[]);
                }
                return Err(e);
            }
        };
        let training = training == Some(true) && self.config.trainable;
        let affine = if training {
            let mut moments = channel_moments(x, view, mask, last_dim);
            if let Some(exchange) = exchange {
                let header = self.next_call(forward_kind(mask.is_some()));
                moments = gather_moments(exchange, header, &moments)?;
            }
            finalize(&self.config, &mut self.state, Some(&moments), mask.is_some())
        } else {
            finalize(&self.config, &mut self.state, None, false)
        };
        let mut y = normalize(x, view, &affine);
        if self.config.fused_relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        self.saved = Some(ReferenceSaved {
            x: x.to_vec(),
            shape: shape.to_vec(),
            mask: mask.filter(|_| training).map(<[u8]>::to_vec),
            batch_statistics: training,
            affine,
        });
        Ok(y)
    }

    /// Same contract as [`crate::BatchNorm::backward`]: the gradients of the
    /// last forward call for the upstream gradient `dy`.
    pub fn backward(&self, dy: &[f64], regularization: bool) -> Result<ReferenceGradients> {
        self.backward_with(dy, regularization, None)
    }

    /// [`ReferenceLayer::backward`] of a synchronized forward call: the
    /// per-channel sum(dy), sum(dy * (x - mean)) and masked-in sum(x -
    /// mean) of every rank are reduced through `exchange` and added in the
    /// same fixed order, so dx
    /// uses the global batch's statistics and count, and dgamma / dbeta are
    /// the global batch's sums, the same on every rank (PyTorch's
    /// SyncBatchNorm leaves those to its data-parallel wrapper instead).
    pub fn backward_synchronized(
        &mut self,
        dy: &[f64],
        regularization: bool,
        exchange: &dyn Exchange,
    ) -> Result<ReferenceGradients> {
        if self.saved.is_none() {
            let _ = gather_checked(exchange, self.next_call(KIND_FAILED), &[]);
            return Err(Error::NoForward);
        }
        let header = self.next_call(KIND_BACKWARD);
        self.backward_with(dy, regularization, Some((exchange, header)))
    }

    fn backward_with(
        &self,
        dy: &[f64],
        regularization: bool,
        exchange: Option<(&dyn Exchange, CallHeader)>,
    ) -> Result<ReferenceGradients> {
        let saved = self.saved.as_ref().ok_or(Error::NoForward)?;
        let refuse = |e: Error| {
            // the other ranks must not wait for this one
            if let Some((exchange, header)) = exchange {
                let failed = CallHeader {
                    kind: KIND_FAILED,
                    ..header
                };
                let _ = gather_checked(exchange, failed, &[]);
            }
            Err(e)
        };
        if self.config.fused_relu {
            return refuse(ConfigError::Unsupported("backward through the fused ReLU epilogue".into()).into());
        }
        if dy.len() != saved.x.len() {
            return refuse(Error::shape(
                "dy",
                format!(
                    "dy has {} values, the forward input had shape {:?}",
                    dy.len(),
                    saved.shape
                ),
            ));
        }
        let axis = self.config.resolve_axis(saved.shape.len())?;
        let view = ChannelView::new(&saved.shape, axis);
        let last_dim = *saved.shape.last().unwrap_or(&1);
        let mut sums = backward_sums(&saved.x, dy, view, saved.mask.as_deref(), last_dim, &saved.affine);
        if let Some((exchange, header)) = exchange {
            let local: Vec<f64> = sums
                .iter()
                .flat_map(|s| [s.sum_dy, s.sum_dy_centered, s.sum_centered])
                .collect();
            let global = gather_sums(exchange, header, &local)?;
            for (s, g) in sums.iter_mut().zip(global.chunks_exact(3)) {
                *s = GradSums {
                    sum_dy: g[0],
                    sum_dy_centered: g[1],
                    sum_centered: g[2],
                };
            }
        }
        let (dgamma, dbeta, coeffs) = backward_finalize(
            &self.config,
            &self.state,
            &saved.affine,
            &sums,
            saved.batch_statistics,
            regularization,
        );
        let dx = backward_dx(&saved.x, dy, view, saved.mask.as_deref(), last_dim, &coeffs);
        Ok(ReferenceGradients { dx, dgamma, dbeta })
    }
}
