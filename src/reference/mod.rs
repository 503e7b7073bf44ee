//! The float64 CPU reference: Keras's semantics computed in double
//! precision, written step by step like the GPU path (statistics, finalize,
//! normalise) so that the two can be compared kernel by kernel.

use crate::config::{BatchNormConfig, ChannelView, StatePrecision, StateSlot};
use crate::error::{ConfigError, Error, Result};
use crate::sync::{
    CallHeader, Exchange, KIND_BACKWARD, KIND_FAILED, fingerprint, forward_kind, gather_checked, gather_sums,
    reduce_checked,
};

mod kernels;
#[cfg(feature = "conformance")]
pub use kernels::{
    ChannelAffine, DxCoefficients, GradSums, backward_dx, backward_finalize, backward_sums, channel_moments, finalize,
    normalize,
};
#[cfg(not(feature = "conformance"))]
use kernels::{
    ChannelAffine, GradSums, backward_dx, backward_finalize, backward_sums, channel_moments, finalize, normalize,
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

/// The per-channel state of the layer in float64, Keras's weight names.
#[derive(Debug, Clone, Default, PartialEq)]
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

impl ReferenceLayer {
    /// The reference layer with every weight at its initializer's values.
    pub fn new(config: BatchNormConfig, channels: usize) -> Result<Self> {
        config.validate()?;
        if channels == 0 {
            return Err(ConfigError::NoChannels.into());
        }
        let mut state = ReferenceState::default();
        for (slot, values) in StateSlot::ALL.into_iter().zip(initial_state(&config, channels)) {
            *state.slot_mut(slot) = values;
        }
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
