//! The float64 CPU reference: Keras's semantics computed in double
//! precision, written step by step like the GPU path (statistics, finalize,
//! normalise) so that the two can be compared kernel by kernel.

use crate::config::{BatchNormConfig, ChannelView};
use crate::error::{ConfigError, Error, Result};
use crate::layer::StateSlot;

/// Keras's `backend.epsilon()`, added to masked counts.
pub const MASK_COUNT_EPS: f64 = 1e-7;

/// Count, mean and sum of squared deviations of one channel's values.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ChannelMoments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

/// Mirror of the statistics kernel: per-channel moments over the values the
/// mask lets in (the mask has the input shape without its last axis).
pub fn channel_moments(
    x: &[f64],
    view: ChannelView,
    mask: Option<&[u8]>,
    last_dim: usize,
) -> Vec<ChannelMoments> {
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
    pub gamma: Vec<f64>,
    pub beta: Vec<f64>,
    pub moving_mean: Vec<f64>,
    pub moving_variance: Vec<f64>,
    pub moving_stddev: Vec<f64>,
    pub renorm_mean: Vec<f64>,
    pub renorm_stddev: Vec<f64>,
}

impl ReferenceState {
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

/// Per channel: y = (x - mean) * scale + offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelAffine {
    pub mean: f64,
    pub scale: f64,
    pub offset: f64,
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
    (0..channels)
        .map(|c| {
            let gamma = if config.scale { state.gamma[c] } else { 1.0 };
            let beta = if config.center { state.beta[c] } else { 0.0 };
            let Some(moments) = moments else {
                return ChannelAffine {
                    mean: state.moving_mean[c],
                    scale: gamma / (state.moving_variance[c] + eps).sqrt(),
                    offset: beta,
                };
            };
            let ChannelMoments { count, mean, m2 } = moments[c];
            let (mean, variance) = if masked {
                let denom = count + MASK_COUNT_EPS;
                let keras_mean = mean * count / denom;
                // sum((x - keras_mean)^2) = m2 + count * (mean - keras_mean)^2
                let d = mean - keras_mean;
                (keras_mean, (m2 + count * d * d) / denom)
            } else {
                (mean, m2 / count)
            };
            let inv = 1.0 / (variance + eps).sqrt();
            let mut affine = ChannelAffine {
                mean,
                scale: inv * gamma,
                offset: beta,
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
                let rm = config.renorm_momentum as f64;
                state.renorm_mean[c] = state.renorm_mean[c] * rm + mean * (1.0 - rm);
                state.renorm_stddev[c] = state.renorm_stddev[c] * rm + stddev * (1.0 - rm);
                state.moving_mean[c] = state.moving_mean[c] * momentum + mean * (1.0 - momentum);
                let moving_stddev = state.moving_stddev[c] * momentum + stddev * (1.0 - momentum);
                state.moving_stddev[c] = moving_stddev;
                state.moving_variance[c] = (moving_stddev * moving_stddev - eps).max(0.0);
            } else {
                state.moving_mean[c] = state.moving_mean[c] * momentum + mean * (1.0 - momentum);
                state.moving_variance[c] =
                    state.moving_variance[c] * momentum + variance * (1.0 - momentum);
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

/// The whole layer on the CPU in float64.
#[derive(Debug, Clone)]
pub struct ReferenceLayer {
    pub config: BatchNormConfig,
    pub state: ReferenceState,
}

impl ReferenceLayer {
    pub fn new(config: BatchNormConfig, channels: usize) -> Result<Self> {
        config.validate()?;
        if channels == 0 {
            return Err(ConfigError::NoChannels.into());
        }
        let fill = |v: f32| vec![v as f64; channels];
        let std_init = (config.moving_variance_initializer.value() as f64).sqrt();
        let state = ReferenceState {
            gamma: fill(config.gamma_initializer.value()),
            beta: fill(config.beta_initializer.value()),
            moving_mean: fill(config.moving_mean_initializer.value()),
            moving_variance: fill(config.moving_variance_initializer.value()),
            moving_stddev: vec![std_init; channels],
            renorm_mean: fill(config.moving_mean_initializer.value()),
            renorm_stddev: vec![std_init; channels],
        };
        Ok(ReferenceLayer { config, state })
    }

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
        let axis = self.config.resolve_axis(shape.len())?;
        let view = ChannelView::new(shape, axis);
        if view.len() != x.len() || shape.contains(&0) {
            return Err(Error::Shape(format!(
                "shape {shape:?} does not hold {} values",
                x.len()
            )));
        }
        if view.channels != self.channels() {
            return Err(Error::Shape(format!(
                "input shape {shape:?} has {} features on axis {}, the layer was built for {}",
                view.channels,
                self.config.axis,
                self.channels()
            )));
        }
        let last_dim = *shape.last().unwrap_or(&1);
        if let Some(m) = mask
            && m.len() * last_dim != x.len()
        {
            return Err(Error::Shape(format!(
                "the mask should be the input shape without its last axis ({} flags), got {}",
                x.len() / last_dim,
                m.len()
            )));
        }
        let training = training == Some(true) && self.config.trainable;
        let affine = if training {
            let moments = channel_moments(x, view, mask, last_dim);
            finalize(
                &self.config,
                &mut self.state,
                Some(&moments),
                mask.is_some(),
            )
        } else {
            finalize(&self.config, &mut self.state, None, false)
        };
        Ok(normalize(x, view, &affine))
    }
}
