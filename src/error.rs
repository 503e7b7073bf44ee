//! The crate's one error type.

use std::path::PathBuf;

/// Everything a caller can get wrong, and everything the GPU can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter matched the request (or the machine has no GPU driver).
    #[error(
        "no GPU adapter found ({0}). Install a Vulkan, Metal, DX12 or GL driver; on Debian/Ubuntu \
         without a GPU, `apt-get install -y mesa-vulkan-drivers` provides the software adapter lavapipe"
    )]
    NoAdapter(String),
    /// The adapter was found but refused a device.
    #[error("adapter {adapter} refused a device: {source}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// What wgpu said.
        #[source]
        source: wgpu::RequestDeviceError,
    },
    /// An invalid layer configuration, as Keras would reject it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tensor, mask or weight whose shape does not fit.
    #[error("shape mismatch ({argument}): {message}")]
    Shape {
        /// The argument: `x`, `y`, `dy`, `dx`, `dgamma`, `dbeta`, `mask`,
        /// `shape` (of a tensor being made), `buffer` (of a view).
        argument: &'static str,
        /// What does not fit.
        message: String,
    },
    /// A tensor of the wrong dtype for the operation.
    #[error("dtype mismatch: expected {expected}, got {got}")]
    DType {
        /// The dtype the operation needs.
        expected: String,
        /// The dtype it was given.
        got: String,
    },
    /// A tensor, mask or gradient made on another device than the layer's
    /// (or the context's, for a readback).
    #[error("{what} was made on another device than the one it is used with")]
    Device {
        /// Which argument.
        what: &'static str,
    },
    /// A buffer without a usage its role needs (see the roles table on
    /// [`crate::Tensor`]).
    #[error("{role} needs buffer usages {needs:?}, the buffer has {has:?}")]
    Usage {
        /// Which argument.
        role: &'static str,
        /// The usages the role needs.
        needs: wgpu::BufferUsages,
        /// The buffer's usages.
        has: wgpu::BufferUsages,
    },
    /// A view offset that the device cannot bind.
    #[error("offset {offset} is not a multiple of the device's storage offset alignment {alignment}")]
    Alignment {
        /// The offset given.
        offset: u64,
        /// `min_storage_buffer_offset_alignment` (or 4 for copies).
        alignment: u64,
    },
    /// An output sharing a buffer with an input of the same dispatch.
    #[error(
        "{output} must live in another buffer than {input}: WebGPU forbids binding one buffer read-only and \
         read-write in the same dispatch"
    )]
    Aliasing {
        /// The output (`y`, `dx`).
        output: &'static str,
        /// The input it shares a buffer with (`x`, `dy`).
        input: &'static str,
    },
    /// A tensor that the adapter's (or the kernels') limits cannot bind.
    #[error("too large ({limit}): {message}")]
    TooLarge {
        /// What it exceeds: a `wgpu::Limits` field (`max_buffer_size`,
        /// `max_storage_buffer_binding_size`,
        /// `max_compute_workgroups_per_dimension`), `kernel indices` (2^32
        /// elements), `statistics tiles`, `loop bound`, `addressable
        /// elements` or `host memory`.
        limit: &'static str,
        /// By how much.
        message: String,
    },
    /// Reading a buffer back from the GPU failed.
    #[error("GPU readback failed: {message}")]
    Readback {
        /// What wgpu said.
        message: String,
    },
    /// Waiting on the GPU failed (device lost or timeout).
    #[error("GPU poll failed: {0}")]
    Poll(#[from] wgpu::PollError),
    /// The GPU refused something this crate asked of it: a shader module or
    /// pipeline the device rejects, a validation error in a call's
    /// commands (a destroyed buffer, say), an allocation the device cannot
    /// make, or a lost device. Caught by error scopes around the crate's
    /// own work, so it is an error of the call that caused it (an
    /// application's uncaptured-error handler never sees it).
    #[error("GPU error in {what}: {message}")]
    Gpu {
        /// What the crate was doing: the call, or the pipeline it compiled.
        what: String,
        /// What wgpu (or the device-lost callback) said.
        message: String,
    },
    /// A kernel that needs more of the device than its limits give.
    #[error(
        "kernel {kernel} needs {needs} for {limit}, the device allows {allows}: this call cannot run on this device"
    )]
    DeviceLimit {
        /// The kernel's entry point.
        kernel: &'static str,
        /// The `wgpu::Limits` field.
        limit: &'static str,
        /// What the kernel needs.
        needs: u64,
        /// What the device allows.
        allows: u64,
    },
    /// The reference layer's `backward` before any forward call.
    #[error("backward needs a forward call first: it differentiates the layer's last forward call")]
    NoForward,
    /// `backward` after the weights were replaced since the forward call.
    #[error("the layer's weights were replaced since the forward call; run forward again before backward")]
    WeightsChanged,
    /// `backward` given the [`crate::SavedForward`] of another layer.
    #[error("this SavedForward comes from another layer's forward call")]
    ForeignSaved,
    /// A synchronized layer's exchange failed: a rank timed out or stopped,
    /// or the ranks made different calls.
    #[error("exchange: {message}")]
    Exchange {
        /// Why, in a word.
        failure: ExchangeFailure,
        /// In words.
        message: String,
    },
    /// A kernel choice, plan knobs or a tuning cache that cannot be used
    /// (see [`crate::tuning::PlanTuning`]).
    #[error("kernels ({setting}): {message}")]
    Kernels {
        /// The setting: a knob's name, `WGPU_BATCHNORM_KERNELS`, `kernel
        /// choice` or `tuning cache`.
        setting: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Keras `get_config()` JSON this crate cannot build a layer from: not
    /// JSON, another layer, an unknown key, or a feature the crate lacks.
    #[error("Keras config: {message}")]
    KerasConfig {
        /// What is wrong with it.
        message: String,
    },
    /// Weights that do not fit the layer (`set_weights`, a weight file).
    #[error("weights: {message}")]
    Weights {
        /// The weight (its Keras name) where one is at fault.
        weight: Option<&'static str>,
        /// What is wrong.
        message: String,
    },
    /// A Keras case or weight file that cannot be used.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// Why a synchronized call's exchange failed ([`Error::Exchange`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeFailure {
    /// The layer is synchronized but has no exchange.
    NoExchange,
    /// The call cannot run synchronized as asked: recorded into an
    /// encoder, or the backward of a forward from before the layer was
    /// synchronized.
    Unsupported,
    /// The ranks made different calls (kind, order, channels, config,
    /// dtype or scheme).
    Mismatch,
    /// Another rank's call failed, or a rank stopped answering (timeout).
    RankFailed,
    /// The transport failed or returned what was not agreed.
    Transport,
}

impl Error {
    pub(crate) fn shape(argument: &'static str, message: impl Into<String>) -> Self {
        Error::Shape {
            argument,
            message: message.into(),
        }
    }

    pub(crate) fn too_large(limit: &'static str, message: impl Into<String>) -> Self {
        Error::TooLarge {
            limit,
            message: message.into(),
        }
    }

    pub(crate) fn exchange(failure: ExchangeFailure, message: impl Into<String>) -> Self {
        Error::Exchange {
            failure,
            message: message.into(),
        }
    }

    pub(crate) fn kernels(setting: &'static str, message: impl Into<String>) -> Self {
        Error::Kernels {
            setting,
            message: message.into(),
        }
    }

    pub(crate) fn weights(weight: Option<&'static str>, message: impl Into<String>) -> Self {
        Error::Weights {
            weight,
            message: message.into(),
        }
    }

    pub(crate) fn readback(message: impl Into<String>) -> Self {
        Error::Readback {
            message: message.into(),
        }
    }
}

/// Invalid `BatchNormalization` arguments, one variant per Keras check.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("axis {axis} is out of range for an input of rank {rank}")]
    /// The feature axis does not exist in the input.
    AxisOutOfRange {
        /// The configured axis.
        axis: i64,
        /// The input's rank.
        rank: usize,
    },
    #[error("input rank {0} is not supported (1 to 8)")]
    /// An input rank outside 1 to 8.
    Rank(usize),
    #[error("momentum must be in [0, 1], got {0}")]
    /// `momentum` outside [0, 1].
    Momentum(f64),
    #[error("renorm_momentum must be in [0, 1], got {0}")]
    /// `renorm_momentum` outside [0, 1].
    RenormMomentum(f64),
    #[error("epsilon must be a positive finite number, got {0}")]
    /// `epsilon` not positive and finite.
    Epsilon(f64),
    #[error("rmax should be greater than rmin in the `renorm_clipping` argument. Received: rmax={rmax}, rmin={rmin}")]
    /// `rmax < rmin`, as Keras refuses it.
    RenormClippingOrder {
        /// The lower bound given.
        rmin: f64,
        /// The upper bound given.
        rmax: f64,
    },
    #[error("dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={0}")]
    /// `dmax < 0`, as Keras refuses it.
    NegativeDmax(f64),
    #[error("invalid renorm_clipping value {key}={value}: must be finite")]
    /// A clipping bound that is not finite.
    RenormClippingValue {
        /// `rmax`, `rmin` or `dmax`.
        key: &'static str,
        /// The value given.
        value: f64,
    },
    #[error("invalid keys for `renorm_clipping`: {0:?}. Supported values: rmax, rmin, dmax")]
    /// `renorm_clipping` keys other than rmax, rmin, dmax.
    RenormClippingKeys(Vec<String>),
    #[error("{name}: l1 and l2 must be non-negative finite numbers, got l1={l1}, l2={l2}")]
    /// A regularizer factor that is negative or not finite.
    Regularizer {
        /// `gamma_regularizer` or `beta_regularizer`.
        name: &'static str,
        /// The L1 factor given.
        l1: f64,
        /// The L2 factor given.
        l2: f64,
    },
    #[error("{name}: invalid constraint {constraint}")]
    /// A constraint with invalid arguments.
    Constraint {
        /// `gamma_constraint` or `beta_constraint`.
        name: &'static str,
        /// The constraint given.
        constraint: String,
    },
    #[error("channels must be at least 1")]
    /// A layer built for zero channels.
    NoChannels,
    #[error("{0}")]
    /// A combination this crate does not support, with the reason.
    Unsupported(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
