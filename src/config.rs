//! Keras 3 `BatchNormalization` constructor arguments and their validation.

use crate::error::ConfigError;

use rand::{Rng, SeedableRng};

/// How a weight is initialised when the layer is built. The random ones
/// follow Keras's distributions and arguments, seeded for repeatability,
/// but are not bit-identical to Keras's random streams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Initializer {
    /// Keras `Zeros`.
    Zeros,
    /// Keras `Ones`.
    Ones,
    /// Keras `Constant(value)`.
    Constant(f32),
    /// Keras `RandomNormal(mean=0.0, stddev=0.05, seed=None)`.
    RandomNormal {
        /// Mean of the distribution.
        mean: f32,
        /// Standard deviation.
        stddev: f32,
        /// Seed (`None`: a different draw each time).
        seed: Option<u64>,
    },
    /// Keras `RandomUniform(minval=-0.05, maxval=0.05, seed=None)`.
    RandomUniform {
        /// Lower bound.
        minval: f32,
        /// Upper bound.
        maxval: f32,
        /// Seed (`None`: a different draw each time).
        seed: Option<u64>,
    },
    /// Keras `TruncatedNormal(mean=0.0, stddev=0.05, seed=None)`: values
    /// beyond two standard deviations are drawn again.
    TruncatedNormal {
        /// Mean before truncation.
        mean: f32,
        /// Standard deviation before truncation.
        stddev: f32,
        /// Seed (`None`: a different draw each time).
        seed: Option<u64>,
    },
}

impl Initializer {
    /// The `n` initial values of one weight.
    pub fn values(self, n: usize) -> Vec<f32> {
        let rng = |seed: Option<u64>| match seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        // Box-Muller: rand_distr is not worth a dependency for two lines
        let normal = |r: &mut rand::rngs::StdRng| {
            let u1: f64 = 1.0 - r.random::<f64>();
            let u2: f64 = r.random::<f64>();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        match self {
            Initializer::Zeros => vec![0.0; n],
            Initializer::Ones => vec![1.0; n],
            Initializer::Constant(v) => vec![v; n],
            Initializer::RandomNormal { mean, stddev, seed } => {
                let mut r = rng(seed);
                (0..n).map(|_| mean + stddev * normal(&mut r) as f32).collect()
            }
            Initializer::RandomUniform { minval, maxval, seed } => {
                let mut r = rng(seed);
                (0..n).map(|_| minval + (maxval - minval) * r.random::<f32>()).collect()
            }
            Initializer::TruncatedNormal { mean, stddev, seed } => {
                let mut r = rng(seed);
                (0..n)
                    .map(|_| {
                        loop {
                            let z = normal(&mut r);
                            if z.abs() <= 2.0 {
                                break mean + stddev * z as f32;
                            }
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Keras's L1/L2 weight penalty: `l1 * sum(|w|) + l2 * sum(w^2)`.
/// `Regularizer::l1()` / `l2()` / `l1_l2()` are Keras's string identifiers
/// (`"l1"`, `"l2"`, `"l1_l2"`, factors 0.01); `L1L2(...)` with explicit
/// factors is the struct itself.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Regularizer {
    /// Factor of the L1 penalty.
    pub l1: f32,
    /// Factor of the L2 penalty.
    pub l2: f32,
}

impl Regularizer {
    /// Keras's default factor for `L1()`, `L2()` and the `"l1_l2"` string.
    pub const DEFAULT_FACTOR: f32 = 0.01;

    /// Keras's `"l1"`: `L1(l1=0.01)`.
    pub fn l1() -> Self {
        Regularizer {
            l1: Self::DEFAULT_FACTOR,
            l2: 0.0,
        }
    }

    /// Keras's `"l2"`: `L2(l2=0.01)`.
    pub fn l2() -> Self {
        Regularizer {
            l1: 0.0,
            l2: Self::DEFAULT_FACTOR,
        }
    }

    /// Keras's `"l1_l2"`: both factors 0.01.
    pub fn l1_l2() -> Self {
        Regularizer {
            l1: Self::DEFAULT_FACTOR,
            l2: Self::DEFAULT_FACTOR,
        }
    }

    /// The penalty of one weight vector, in float64.
    pub fn loss(&self, weights: &[f32]) -> f64 {
        weights
            .iter()
            .map(|&w| self.l1 as f64 * (w as f64).abs() + self.l2 as f64 * (w as f64) * (w as f64))
            .sum()
    }

    /// The penalty's gradient for one weight.
    pub fn gradient(&self, w: f64) -> f64 {
        self.l1 as f64 * w.signum() * (w != 0.0) as u8 as f64 + 2.0 * self.l2 as f64 * w
    }
}

/// Keras's weight constraints, applied after each optimiser step. For the
/// layer's one-axis weights Keras's default `axis=0` takes the norm over
/// every channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Constraint {
    /// `w * (w >= 0)`.
    NonNeg,
    /// Keras `MaxNorm(max_value=2)`.
    MaxNorm {
        /// The largest norm allowed.
        max_value: f32,
    },
    /// Keras `MinMaxNorm(min_value=0.0, max_value=1.0, rate=1.0)`.
    MinMaxNorm {
        /// The smallest norm allowed.
        min_value: f32,
        /// The largest norm allowed.
        max_value: f32,
        /// How far towards the bounds one application moves (1: all the way).
        rate: f32,
    },
    /// Keras `UnitNorm()`.
    UnitNorm,
}

impl Constraint {
    /// The constrained weights, as Keras computes them (in float64).
    pub fn apply(&self, w: &[f64]) -> Vec<f64> {
        // Keras's backend epsilon in the norm denominators
        const EPS: f64 = 1e-7;
        let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
        let scale = match *self {
            Constraint::NonNeg => return w.iter().map(|&v| if v >= 0.0 { v } else { 0.0 }).collect(),
            Constraint::MaxNorm { max_value } => norm.clamp(0.0, max_value as f64) / (EPS + norm),
            Constraint::MinMaxNorm {
                min_value,
                max_value,
                rate,
            } => {
                let desired = rate as f64 * norm.clamp(min_value as f64, max_value as f64) + (1.0 - rate as f64) * norm;
                desired / (EPS + norm)
            }
            Constraint::UnitNorm => 1.0 / (EPS + norm),
        };
        w.iter().map(|v| v * scale).collect()
    }
}

/// Batch renormalisation clipping bounds (Keras `renorm_clipping`); absent
/// bounds do not clip.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RenormClipping {
    /// Upper bound of r.
    pub rmax: Option<f32>,
    /// Lower bound of r.
    pub rmin: Option<f32>,
    /// Bound of |d|.
    pub dmax: Option<f32>,
}

/// How training calls update the moving statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunningStatistics {
    /// Keras: `moving = moving * momentum + batch * (1 - momentum)`, with the
    /// biased batch variance.
    #[default]
    Keras,
    /// PyTorch, for ported models: `running = running * (1 - momentum) +
    /// batch * momentum` (momentum weighs the new value, 0.1 in PyTorch),
    /// with the unbiased batch variance. Normalisation itself still uses the
    /// biased variance, as PyTorch does. Not with renorm.
    PyTorch,
}

/// How the layer stores its weights (gamma, beta, the moving statistics,
/// the renorm state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatePrecision {
    /// float32: closer to the float64 truth (the default).
    #[default]
    Float32,
    /// Like a Keras layer of `dtype="float16"`: every weight is rounded to
    /// float16 whenever it is written (initialised, set, updated by a
    /// training call, an [`crate::Sgd`] step or a constraint), as Keras's
    /// float16 variables are, so that the moving statistics drift as a
    /// Keras model's do. Not bit-for-bit: the updates are computed in
    /// float32 (Keras computes `moving * momentum` in float16), WGSL's
    /// float16 packing need not round to nearest (past 65504 the kernels
    /// store Inf, as Keras does), and the SGD velocity stays float32 (Keras's takes the weight's
    /// dtype). Expect agreement within a float16 step or so.
    Float16,
}

/// The fields of Keras's `BatchNormalization(...)` that shape the forward pass.
///
/// Start from the defaults (Keras's) and set what differs, so that a field
/// added later is not a breaking change:
///
/// ```
/// use wgpu_batchnorm::BatchNormConfig;
/// let config = BatchNormConfig::default().with_axis(1).with_momentum(0.9);
/// assert_eq!(config.axis, 1);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BatchNormConfig {
    /// The feature axis; negative values count from the end, as in Keras.
    pub axis: i64,
    /// Weight of the old moving statistics in each update (Keras: 0.99).
    pub momentum: f32,
    /// Added to the variance before the square root (Keras: 1e-3).
    pub epsilon: f32,
    /// Whether the layer has beta (an offset).
    pub center: bool,
    /// Whether the layer has gamma (a scale).
    pub scale: bool,
    /// Initial beta.
    pub beta_initializer: Initializer,
    /// Initial gamma.
    pub gamma_initializer: Initializer,
    /// Initial moving mean (and renorm mean).
    pub moving_mean_initializer: Initializer,
    /// Initial moving variance (its square root starts the renorm stddevs).
    pub moving_variance_initializer: Initializer,
    /// Batch renormalisation.
    pub renorm: bool,
    /// Bounds of renorm's r and d.
    pub renorm_clipping: RenormClipping,
    /// Momentum of the renorm statistics.
    pub renorm_momentum: f32,
    /// `trainable = false` makes every call an inference call that changes nothing.
    pub trainable: bool,
    /// Penalty on gamma.
    pub gamma_regularizer: Option<Regularizer>,
    /// Penalty on beta.
    pub beta_regularizer: Option<Regularizer>,
    /// Constraint applied to gamma after each optimiser step.
    pub gamma_constraint: Option<Constraint>,
    /// Constraint applied to beta after each optimiser step.
    pub beta_constraint: Option<Constraint>,
    /// Keras's moving-statistics update (the default) or PyTorch's.
    pub running_statistics: RunningStatistics,
    /// Applies ReLU to the output inside the normalise kernel (for
    /// inference after folding; `backward` refuses such calls). Not a
    /// Keras argument: Keras would use a separate activation layer.
    pub fused_relu: bool,
    /// Keras's `synchronized`: training calls use the statistics of the
    /// global batch of every rank of the layer's [`crate::sync::Exchange`]
    /// (see [`crate::BatchNorm::set_exchange`]); such a layer refuses a
    /// training call while it has no exchange.
    pub synchronized: bool,
    /// How the weights are stored: float32, or rounded to float16 as a
    /// Keras layer of `dtype="float16"` keeps them. Not a Keras argument
    /// (Keras takes it from the dtype policy).
    pub state_precision: StatePrecision,
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
            gamma_regularizer: None,
            beta_regularizer: None,
            gamma_constraint: None,
            beta_constraint: None,
            running_statistics: RunningStatistics::Keras,
            fused_relu: false,
            synchronized: false,
            state_precision: StatePrecision::Float32,
        }
    }
}

/// `with_field(value)` for each field: the value with that field replaced.
macro_rules! with_fields {
    ($ty:ident { $($with:ident => $field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("This with `", stringify!($field), "` set to `value`.")]
                #[must_use]
                pub fn $with(mut self, value: $t) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}
pub(crate) use with_fields;

with_fields!(BatchNormConfig {
    with_axis => axis: i64,
    with_momentum => momentum: f32,
    with_epsilon => epsilon: f32,
    with_center => center: bool,
    with_scale => scale: bool,
    with_beta_initializer => beta_initializer: Initializer,
    with_gamma_initializer => gamma_initializer: Initializer,
    with_moving_mean_initializer => moving_mean_initializer: Initializer,
    with_moving_variance_initializer => moving_variance_initializer: Initializer,
    with_renorm => renorm: bool,
    with_renorm_clipping => renorm_clipping: RenormClipping,
    with_renorm_momentum => renorm_momentum: f32,
    with_trainable => trainable: bool,
    with_gamma_regularizer => gamma_regularizer: Option<Regularizer>,
    with_beta_regularizer => beta_regularizer: Option<Regularizer>,
    with_gamma_constraint => gamma_constraint: Option<Constraint>,
    with_beta_constraint => beta_constraint: Option<Constraint>,
    with_running_statistics => running_statistics: RunningStatistics,
    with_fused_relu => fused_relu: bool,
    with_synchronized => synchronized: bool,
    with_state_precision => state_precision: StatePrecision,
});

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
        for (name, r) in [
            ("gamma_regularizer", self.gamma_regularizer),
            ("beta_regularizer", self.beta_regularizer),
        ] {
            if let Some(r) = r
                && !(r.l1 >= 0.0 && r.l2 >= 0.0 && r.l1.is_finite() && r.l2.is_finite())
            {
                return Err(ConfigError::Regularizer {
                    name,
                    l1: r.l1 as f64,
                    l2: r.l2 as f64,
                });
            }
        }
        for (name, c) in [
            ("gamma_constraint", self.gamma_constraint),
            ("beta_constraint", self.beta_constraint),
        ] {
            let bad = match c {
                Some(Constraint::MaxNorm { max_value }) => !(max_value >= 0.0 && max_value.is_finite()),
                Some(Constraint::MinMaxNorm {
                    min_value,
                    max_value,
                    rate,
                }) => !(min_value.is_finite() && max_value.is_finite() && rate.is_finite() && min_value <= max_value),
                _ => false,
            };
            if bad {
                return Err(ConfigError::Constraint {
                    name,
                    constraint: format!("{c:?}"),
                });
            }
        }
        if self.renorm && self.running_statistics == RunningStatistics::PyTorch {
            return Err(ConfigError::Unsupported(
                "PyTorch running statistics do not combine with renorm".into(),
            ));
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
                    return Err(ConfigError::RenormClippingValue { key, value: v as f64 });
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
            return Err(ConfigError::AxisOutOfRange { axis: self.axis, rank });
        }
        Ok(self.axis.rem_euclid(r) as usize)
    }
}

/// An input shape seen as `[outer, channels, inner]` around the feature axis:
/// one set of kernels then serves NHWC (inner = 1), NCHW (outer = N) and any
/// middle axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelView {
    /// Product of the dimensions before the feature axis.
    pub outer: usize,
    /// Size of the feature axis.
    pub channels: usize,
    /// Product of the dimensions after the feature axis.
    pub inner: usize,
}

impl ChannelView {
    /// The view of `shape` around `axis` (non-negative, in range).
    pub fn new(shape: &[usize], axis: usize) -> Self {
        ChannelView {
            outer: shape[..axis].iter().product(),
            channels: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        }
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    /// Whether the view holds no element.
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

/// One per-channel state tensor, in Keras's build order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSlot {
    /// The scale (`scale=True`).
    Gamma,
    /// The offset (`center=True`).
    Beta,
    /// The moving mean.
    MovingMean,
    /// The moving variance.
    MovingVariance,
    /// Renorm's moving standard deviation.
    MovingStddev,
    /// Renorm's mean.
    RenormMean,
    /// Renorm's standard deviation.
    RenormStddev,
}

impl StateSlot {
    /// Every slot, in Keras's order.
    pub const ALL: [StateSlot; 7] = [
        StateSlot::Gamma,
        StateSlot::Beta,
        StateSlot::MovingMean,
        StateSlot::MovingVariance,
        StateSlot::MovingStddev,
        StateSlot::RenormMean,
        StateSlot::RenormStddev,
    ];

    /// Keras's weight name.
    pub fn keras_name(self) -> &'static str {
        match self {
            StateSlot::Gamma => "gamma",
            StateSlot::Beta => "beta",
            StateSlot::MovingMean => "moving_mean",
            StateSlot::MovingVariance => "moving_variance",
            StateSlot::MovingStddev => "moving_stddev",
            StateSlot::RenormMean => "renorm_mean",
            StateSlot::RenormStddev => "renorm_stddev",
        }
    }

    /// The slot of a Keras weight name.
    pub fn from_keras_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.keras_name() == name)
    }

    /// Section of the layer's state buffer (matches `shaders/finalize.wgsl`)
    /// and of the reference's state.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Whether a layer with `config` has this weight.
    pub fn present(self, config: &BatchNormConfig) -> bool {
        match self {
            StateSlot::Gamma => config.scale,
            StateSlot::Beta => config.center,
            StateSlot::MovingMean | StateSlot::MovingVariance => true,
            StateSlot::MovingStddev | StateSlot::RenormMean | StateSlot::RenormStddev => config.renorm,
        }
    }
}
