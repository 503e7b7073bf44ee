//! Keras 3 `BatchNormalization` constructor arguments and their validation.

use crate::error::ConfigError;

/// How a weight is initialised when the layer is built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Initializer {
    Zeros,
    Ones,
    Constant(f32),
}

impl Initializer {
    pub(crate) fn value(self) -> f32 {
        match self {
            Initializer::Zeros => 0.0,
            Initializer::Ones => 1.0,
            Initializer::Constant(v) => v,
        }
    }
}

/// Batch renormalisation clipping bounds (Keras `renorm_clipping`); absent
/// bounds do not clip.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RenormClipping {
    pub rmax: Option<f32>,
    pub rmin: Option<f32>,
    pub dmax: Option<f32>,
}

/// The fields of Keras's `BatchNormalization(...)` that shape the forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormConfig {
    /// The feature axis; negative values count from the end, as in Keras.
    pub axis: i64,
    pub momentum: f32,
    pub epsilon: f32,
    pub center: bool,
    pub scale: bool,
    pub beta_initializer: Initializer,
    pub gamma_initializer: Initializer,
    pub moving_mean_initializer: Initializer,
    pub moving_variance_initializer: Initializer,
    pub renorm: bool,
    pub renorm_clipping: RenormClipping,
    pub renorm_momentum: f32,
    /// `trainable = false` makes every call an inference call that changes nothing.
    pub trainable: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            axis: -1,
            momentum: 0.99,
            epsilon: 1e-3,
            center: true,
            scale: true,
            beta_initializer: Initializer::Zeros,
            gamma_initializer: Initializer::Ones,
            moving_mean_initializer: Initializer::Zeros,
            moving_variance_initializer: Initializer::Ones,
            renorm: false,
            renorm_clipping: RenormClipping::default(),
            renorm_momentum: 0.99,
            trainable: true,
        }
    }
}

impl BatchNormConfig {
    /// Checks every field the way Keras's constructor does (and a little
    /// more: momentum and epsilon ranges that would silently give NaN).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(ConfigError::Momentum(self.momentum as f64));
        }
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return Err(ConfigError::Epsilon(self.epsilon as f64));
        }
        if self.renorm {
            if !(0.0..=1.0).contains(&self.renorm_momentum) {
                return Err(ConfigError::RenormMomentum(self.renorm_momentum as f64));
            }
            let RenormClipping { rmax, rmin, dmax } = self.renorm_clipping;
            for (key, value) in [("rmax", rmax), ("rmin", rmin), ("dmax", dmax)] {
                if let Some(v) = value
                    && !v.is_finite()
                {
                    return Err(ConfigError::RenormClippingValue {
                        key,
                        value: v as f64,
                    });
                }
            }
            if let (Some(rmax), Some(rmin)) = (rmax, rmin)
                && rmax < rmin
            {
                return Err(ConfigError::RenormClippingOrder {
                    rmin: rmin as f64,
                    rmax: rmax as f64,
                });
            }
            if let Some(d) = dmax
                && d < 0.0
            {
                return Err(ConfigError::NegativeDmax(d as f64));
            }
        }
        Ok(())
    }

    /// The non-negative feature axis for an input of `rank` dimensions.
    pub fn resolve_axis(&self, rank: usize) -> Result<usize, ConfigError> {
        if !(1..=8).contains(&rank) {
            return Err(ConfigError::Rank(rank));
        }
        let r = rank as i64;
        if self.axis >= r || self.axis < -r {
            return Err(ConfigError::AxisOutOfRange {
                axis: self.axis,
                rank,
            });
        }
        Ok(self.axis.rem_euclid(r) as usize)
    }
}

/// An input shape seen as `[outer, channels, inner]` around the feature axis:
/// one set of kernels then serves NHWC (inner = 1), NCHW (outer = N) and any
/// middle axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelView {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
}

impl ChannelView {
    pub fn new(shape: &[usize], axis: usize) -> Self {
        ChannelView {
            outer: shape[..axis].iter().product(),
            channels: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        }
    }

    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per channel.
    pub fn per_channel(&self) -> usize {
        self.outer * self.inner
    }

    /// The channel of flat element `e`.
    pub fn channel_of(&self, e: usize) -> usize {
        (e / self.inner) % self.channels
    }
}
