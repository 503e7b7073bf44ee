//! The layer: its state on the GPU and its calls, in rooms: the weights
//! (`state`), forward and backward calls (`forward`, `backward`),
//! synchronized calls (`synchronized`), and the recorder that turns a
//! planned call into dispatches (`recorder`).

mod backward;
mod forward;
mod recorder;
mod state;
mod synchronized;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

pub use crate::config::StateSlot;
use crate::config::{BatchNormConfig, ChannelView, RunningStatistics, StatePrecision};
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{ConfigError, Error, Result};
use crate::params;
use crate::plan::CallPlan;
use crate::sync::Exchange;
use crate::tensor::{Mask, Tensor};
use crate::tuning::PlanTuning;
use crate::variants::Variant;
use forward::Statistics;
use recorder::{Scratch, storage_buffer};

/// Keras's `BatchNormalization` on the GPU.
///
/// The layer owns its weights (gamma, beta, the moving statistics and the
/// renorm state) in one GPU buffer; training calls update them on the GPU
/// without any readback. Each call records a self-contained sequence of
/// dispatches, so `&self` suffices and the layer can be shared between
/// threads; a backward is paired with its forward call by the
/// [`SavedForward`] that call returned.
pub struct BatchNorm {
    ctx: GpuContext,
    config: BatchNormConfig,
    channels: usize,
    /// [gamma | beta | moving_mean | moving_variance | moving_stddev | renorm_mean | renorm_stddev]
    state: wgpu::Buffer,
    /// [shift | scale | offset] per channel for the normalise pass.
    affine: wgpu::Buffer,
    /// Where a forward call that keeps no [`SavedForward`] writes its
    /// per-channel statistics (nothing reads them).
    discarded_statistics: wgpu::Buffer,
    /// Statistics buffers of dropped [`SavedForward`]s, for later calls.
    statistics_pool: Arc<Mutex<Vec<wgpu::Buffer>>>,
    /// Tells this layer's [`SavedForward`]s from other layers'.
    id: u64,
    /// Backward: [dgamma | dbeta], and per channel the dx coefficients.
    grads: wgpu::Buffer,
    coeffs: wgpu::Buffer,
    /// Bumped whenever the weights are replaced from outside a forward call.
    weights_version: AtomicU64,
    scratch: Mutex<Scratch>,
    /// Where a synchronized layer's ranks meet (see `set_exchange`).
    exchange: Option<Arc<dyn Exchange>>,
    /// The synchronized calls made so far; held through each one, so a
    /// layer's synchronized calls run one at a time.
    synchronized_calls: Mutex<u64>,
    /// `apply_constraints`'s bind group (crate::optimizer), made on its
    /// first call: what it binds is fixed with the config.
    pub(crate) constraints_group: std::sync::OnceLock<wgpu::BindGroup>,
}

/// One forward call's tensors and mode, as the public calls take them.
#[derive(Clone, Copy)]
pub(super) struct ForwardArgs<'a> {
    pub x: &'a Tensor,
    pub training: Option<bool>,
    pub mask: Option<&'a Mask>,
    pub y: &'a Tensor,
}

/// One backward call's inputs and outputs, as the public calls take them.
#[derive(Clone, Copy)]
pub(super) struct BackwardArgs<'a> {
    pub saved: &'a SavedForward,
    pub dy: &'a Tensor,
    pub regularization: bool,
    pub grads: &'a Gradients,
}

/// A checked call, planned as data, with the uniform flags it runs with.
pub(crate) struct Call {
    plan: CallPlan,
    flags: u32,
    /// The forward normalises with batch statistics (backward: its forward did).
    batch_statistics: bool,
    /// Its reductions read a mask.
    masked: bool,
    /// A synchronized rank without values: per-channel kernels only.
    empty: bool,
}

/// What one forward call leaves for its backward: the input it saw (a
/// handle, not a copy), its mask, and its own per-channel statistics on the
/// GPU (32 bytes a channel, written when the GPU runs the call).
///
/// Returned by [`BatchNorm::forward_saved`], [`BatchNorm::forward_into`]
/// and [`BatchNorm::record_forward`]; [`BatchNorm::backward`] takes it. A
/// backward is thus paired with exactly one forward call: several calls in
/// flight (threads sharing a layer, a siamese network, micro-batches) each
/// keep their own. Cloning shares the statistics, which no later call
/// changes.
#[derive(Clone)]
pub struct SavedForward {
    layer: u64,
    x: Tensor,
    mask: Option<Mask>,
    batch_statistics: bool,
    /// Made by a synchronized layer (its backward exchanges too).
    synchronized: bool,
    weights_version: u64,
    /// Per channel, two vec4: (shift, mean - shift, 1 / sqrt(var + eps), r),
    /// (d, denominator, mask eps, count); see `shaders/finalize.wgsl`.
    statistics: Arc<SavedStatistics>,
}

impl SavedForward {
    /// The input of the forward call.
    pub fn input(&self) -> &Tensor {
        &self.x
    }

    /// Whether the call normalised with batch statistics (training).
    pub fn batch_statistics(&self) -> bool {
        self.batch_statistics
    }
}

impl std::fmt::Debug for SavedForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedForward")
            .field("shape", &self.x.shape())
            .field("masked", &self.mask.is_some())
            .field("batch_statistics", &self.batch_statistics)
            .finish()
    }
}

/// A forward call's statistics buffer; one from the layer's pool goes back
/// to it when the last clone of its [`SavedForward`] is dropped.
pub(crate) struct SavedStatistics {
    buffer: wgpu::Buffer,
    pool: Option<Weak<Mutex<Vec<wgpu::Buffer>>>>,
}

impl SavedStatistics {
    fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for SavedStatistics {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.as_ref().and_then(Weak::upgrade) {
            pool.lock().unwrap_or_else(|e| e.into_inner()).push(self.buffer.clone());
        }
    }
}

/// Numbers the layers, so that a [`SavedForward`] names its own.
static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

/// Whether a mask (the input shape without its last axis) holds one value
/// per row of channels: the channels are the last axis.
fn mask_by_row(view: ChannelView, shape: &[usize]) -> bool {
    view.inner == 1 && shape.last() == Some(&view.channels)
}

/// Floats from one state slot to the next: `channels` rounded up to the
/// device's storage offset alignment.
fn state_stride(ctx: &GpuContext, channels: usize) -> usize {
    let align = (ctx.storage_alignment() as usize / 4).max(1);
    channels.div_ceil(align) * align
}

/// A per-channel parameter buffer: padded to the uniform view where the
/// context reads parameters through it when the layer is made (a CPU
/// adapter), else only as large as its values.
fn params_buffer_size(ctx: &GpuContext, bytes: u64) -> u64 {
    let view = if ctx.uniform_parameters() {
        ctx.inner.kernels.uniform_view
    } else {
        0
    };
    bytes.max(view).div_ceil(16) * 16
}

impl BatchNorm {
    /// Builds the layer for inputs with `channels` features on the config's
    /// axis, initialising every weight with its initializer. The first layer
    /// of a context compiles every kernel variant (shared by all layers of
    /// that context), so forward and backward never compile a pipeline.
    pub fn new(ctx: &GpuContext, config: BatchNormConfig, channels: usize) -> Result<Self> {
        config.validate()?;
        if channels == 0 {
            return Err(ConfigError::NoChannels.into());
        }
        // the largest per-channel buffer (the saved statistics, 8 float32
        // a channel) is bound whole: check before allocating anything
        (channels as u64)
            .checked_mul(32)
            .filter(|&b| b <= ctx.device_binding_size())
            .ok_or_else(|| {
                Error::too_large(
                    "max_storage_buffer_binding_size",
                    format!(
                        "{channels} channels need {} bytes of per-channel statistics (8 float32 a channel), \
                     more than one binding of {} bytes on this device",
                        (channels as u128) * 32,
                        ctx.device_binding_size()
                    ),
                )
            })?;
        ctx.precompile();
        ctx.scoped("building a layer", || {
            let c = channels as u64;
            let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let layer = BatchNorm {
                ctx: ctx.clone(),
                channels,
                state: storage_buffer(ctx, "state", 7 * state_stride(ctx, channels) as u64 * 4, copy),
                // also bound as a uniform view (see `uniform_params`)
                affine: storage_buffer(
                    ctx,
                    "affine",
                    params_buffer_size(ctx, c * 12),
                    copy | wgpu::BufferUsages::UNIFORM,
                ),
                discarded_statistics: storage_buffer(ctx, "discarded statistics", c * 32, wgpu::BufferUsages::empty()),
                constraints_group: std::sync::OnceLock::new(),
                statistics_pool: Arc::new(Mutex::new(Vec::new())),
                id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
                grads: storage_buffer(ctx, "grads", c * 8, copy),
                coeffs: storage_buffer(
                    ctx,
                    "dx coefficients",
                    params_buffer_size(ctx, c * 16),
                    copy | wgpu::BufferUsages::UNIFORM,
                ),
                weights_version: AtomicU64::new(0),
                scratch: Mutex::new(Scratch::new(ctx, channels)),
                exchange: None,
                synchronized_calls: Mutex::new(0),
                config,
            };
            let stride = layer.state_stride();
            let mut initial = vec![0.0f32; 7 * stride];
            for (slot, values) in crate::reference::initial_state(&layer.config, channels)
                .iter()
                .enumerate()
            {
                for (to, &v) in initial[slot * stride..].iter_mut().zip(values) {
                    *to = layer.stored(v as f32);
                }
            }
            ctx.queue()
                .write_buffer(&layer.state, 0, bytemuck::cast_slice(&initial));
            Ok(layer)
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The number of features on the layer's axis.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The context the layer's buffers live in.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// A buffer for one forward call's statistics, of the kind asked.
    fn statistics_buffer(&self, kind: Statistics) -> SavedStatistics {
        let fresh = || {
            storage_buffer(
                &self.ctx,
                "saved statistics",
                self.channels as u64 * 32,
                wgpu::BufferUsages::empty(),
            )
        };
        match kind {
            Statistics::Discarded => SavedStatistics {
                buffer: self.discarded_statistics.clone(),
                pool: None,
            },
            Statistics::Own => SavedStatistics {
                buffer: fresh(),
                pool: None,
            },
            Statistics::Pooled => {
                let pooled = self.statistics_pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
                SavedStatistics {
                    buffer: pooled.unwrap_or_else(fresh),
                    pool: Some(Arc::downgrade(&self.statistics_pool)),
                }
            }
        }
    }

    /// The variant of a call's kernels: its dtype and mask use, its plan's
    /// knobs, the device's subgroups, how the elementwise kernels read
    /// their parameters, and the fused ReLU.
    fn variant(&self, dtype: DType, masked: bool, tuning: PlanTuning) -> Variant {
        Variant {
            dtype,
            masked,
            tuning,
            subgroups: self.ctx.inner.kernels.subgroups,
            uniform_affine: self.uniform_params(3, &tuning),
            uniform_coeffs: self.uniform_params(4, &tuning),
            relu: self.config.fused_relu,
        }
    }

    /// Whether a forward call normalises with its batch's statistics
    /// (Keras: training, and a trainable layer).
    fn batch_statistics(&self, training: Option<bool>) -> bool {
        training == Some(true) && self.config.trainable
    }

    /// The view a call is planned over: an empty batch's plan is one of a
    /// single value a channel (only its per-channel kernels run).
    fn planned_view(&self, view: ChannelView) -> ChannelView {
        if view.is_empty() {
            ChannelView {
                outer: 1,
                channels: self.channels,
                inner: 1,
            }
        } else {
            view
        }
    }

    fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.ctx
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// The input's channel view; an empty one only where `empty_ok` (a
    /// synchronized rank with no values takes part in the exchange).
    fn view_of(&self, x: &Tensor, empty_ok: bool) -> Result<ChannelView> {
        let axis = self.config.resolve_axis(x.shape().len())?;
        let view = ChannelView::new(x.shape(), axis);
        if x.is_empty() && !empty_ok {
            return Err(Error::shape(
                "x",
                format!(
                    "input shape {:?} has an empty dimension: only a synchronized layer takes an empty batch",
                    x.shape()
                ),
            ));
        }
        if view.channels != self.channels {
            return Err(Error::shape(
                "x",
                format!(
                    "input shape {:?} has {} features on axis {}, the layer was built for {}",
                    x.shape(),
                    view.channels,
                    self.config.axis,
                    self.channels
                ),
            ));
        }
        Ok(view)
    }

    /// Whether the elementwise kernels read this layer's parameters (`floats`
    /// per channel) through the uniform view: the context asks for it and
    /// they fit in it.
    /// (The layer's buffers must also cover the view: a layer made while
    /// the context read parameters from storage keeps doing so.)
    fn uniform_params(&self, floats: u64, tuning: &PlanTuning) -> bool {
        let view = self.ctx.inner.kernels.uniform_view;
        tuning.uniform_parameters.unwrap_or(self.ctx.uniform_parameters())
            && self.channels as u64 * floats * 4 <= view
            && self.affine.size().min(self.coeffs.size()) >= view
    }

    fn lock_scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flags that follow from the config alone.
    fn config_flags(&self) -> u32 {
        let cfg = &self.config;
        let clip = cfg.renorm_clipping;
        flag(cfg.renorm, params::FLAG_RENORM)
            | flag(
                cfg.running_statistics == RunningStatistics::PyTorch,
                params::FLAG_PYTORCH,
            )
            | flag(cfg.center, params::FLAG_CENTER)
            | flag(cfg.scale, params::FLAG_SCALE)
            | flag(clip.rmin.is_some(), params::FLAG_RMIN)
            | flag(clip.rmax.is_some(), params::FLAG_RMAX)
            | flag(clip.dmax.is_some(), params::FLAG_DMAX)
            | flag(cfg.state_precision == StatePrecision::Float16, params::FLAG_F16_STATE)
    }
}

/// What [`BatchNorm::backward`] returns.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// Same shape and dtype as the forward input.
    pub dx: Tensor,
    /// float32 per channel; `None` without `scale` or with `trainable = false`.
    pub dgamma: Option<Tensor>,
    /// float32 per channel; `None` without `center` or with `trainable = false`.
    pub dbeta: Option<Tensor>,
}

/// An output tensor must match its input and not alias it.
fn check_output(name: &'static str, x: &Tensor, out: &Tensor) -> Result<()> {
    if out.shape() != x.shape() || out.dtype() != x.dtype() {
        return Err(Error::shape(
            name,
            format!(
                "{name} must be {} of shape {:?}, got {} {:?}",
                x.dtype(),
                x.shape(),
                out.dtype(),
                out.shape()
            ),
        ));
    }
    if out.buffer() == x.buffer() {
        return Err(Error::Aliasing {
            output: name,
            input: "x",
        });
    }
    Ok(())
}

fn flag(on: bool, bit: u32) -> u32 {
    if on { bit } else { 0 }
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNorm")
            .field("channels", &self.channels)
            .field("config", &self.config)
            .finish()
    }
}
