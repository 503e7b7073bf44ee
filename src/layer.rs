//! The layer: its state on the GPU and the forward pass.

mod synchronized;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::config::StateSlot;
use crate::config::{BatchNormConfig, ChannelView, Regularizer, RunningStatistics, StatePrecision};
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{ConfigError, Error, Result};
use crate::params::{self, PARAMS_SLOT, Params};
use crate::plan::{Chunk, DispatchPlan, MaskUse};
use crate::sync::Exchange;
use crate::tensor::{Mask, Tensor, read_buffer};
use crate::tuning::{Op, PlanTuning};
use crate::variants::{Kernel, KernelKey};

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
}

/// Buffers that grow with the input and are reused across calls: calls
/// run on the queue one after another, each using them only between its
/// own dispatches.
struct Scratch {
    partials: wgpu::Buffer,
}

/// The kernel keys of one call: its dtype, mask use and plan knobs.
struct CallKeys {
    dtype: DType,
    masked: bool,
    tuning: PlanTuning,
    subgroups: bool,
}

impl CallKeys {
    fn new(layer: &BatchNorm, dtype: DType, masked: bool, tuning: PlanTuning) -> Self {
        CallKeys {
            dtype,
            masked,
            tuning,
            subgroups: layer.ctx.inner.kernels.subgroups,
        }
    }

    fn key(&self, kernel: Kernel) -> KernelKey {
        KernelKey::new(kernel, self.dtype, self.masked).with_tuning(&self.tuning, self.subgroups)
    }
}

/// A checked, planned forward call.
struct ForwardCall {
    keys: CallKeys,
    plan: DispatchPlan,
    batch_statistics: bool,
    flags: u32,
    /// A synchronized rank without values: per-channel kernels only.
    empty: bool,
}

/// A checked, planned backward call.
struct BackwardCall {
    keys: CallKeys,
    plan: DispatchPlan,
    flags: u32,
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
    statistics: wgpu::Buffer,
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

/// A per-channel parameter buffer is at least as large as its uniform view.
fn params_buffer_size(ctx: &GpuContext, bytes: u64) -> u64 {
    bytes.max(ctx.inner.kernels.uniform_view).div_ceil(16) * 16
}

/// The start of a per-channel parameter buffer (64 KiB where the device
/// allows), as the uniform binding of the normalise and dx kernels sees it.
fn uniform_view<'a>(ctx: &GpuContext, buffer: &'a wgpu::Buffer) -> wgpu::BindingResource<'a> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: wgpu::BufferSize::new(ctx.inner.kernels.uniform_view),
    })
}

fn storage_buffer(ctx: &GpuContext, label: &str, size: u64, extra: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.max(16),
        usage: wgpu::BufferUsages::STORAGE | extra,
        mapped_at_creation: false,
    })
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
                Error::TooLarge(format!(
                    "{channels} channels need {} bytes of per-channel statistics (8 float32 a channel), \
                     more than one binding of {} bytes on this device",
                    (channels as u128) * 32,
                    ctx.device_binding_size()
                ))
            })?;
        ctx.precompile();
        ctx.scoped("building a layer", || {
            let c = channels as u64;
            let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let layer = BatchNorm {
                ctx: ctx.clone(),
                channels,
                state: storage_buffer(ctx, "state", 7 * state_stride(ctx, channels) as u64 * 4, copy),
                // both also bound as a uniform view, 64 KiB where the device allows
                // (see `uniform_params`): every layer pads them to it
                affine: storage_buffer(
                    ctx,
                    "affine",
                    params_buffer_size(ctx, c * 12),
                    copy | wgpu::BufferUsages::UNIFORM,
                ),
                discarded_statistics: storage_buffer(ctx, "discarded statistics", c * 32, wgpu::BufferUsages::empty()),
                id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
                grads: storage_buffer(ctx, "grads", c * 8, copy),
                coeffs: storage_buffer(
                    ctx,
                    "dx coefficients",
                    params_buffer_size(ctx, c * 16),
                    copy | wgpu::BufferUsages::UNIFORM,
                ),
                weights_version: AtomicU64::new(0),
                scratch: Mutex::new(Scratch {
                    partials: storage_buffer(ctx, "partials", c * 16, wgpu::BufferUsages::empty()),
                }),
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

    /// The buffer holding every weight: per [`StateSlot`], in its order,
    /// `channels` float32 values starting at [`BatchNorm::weight_range`],
    /// `4 * state_stride()` bytes after the previous slot. Every slot
    /// starts at a multiple of the device's storage offset alignment
    /// ([`GpuContext::storage_offset_alignment`]), so an application's own
    /// kernels (an optimiser, say) can bind one slot as a storage buffer
    /// at its range; the padding between slots is never read. Call
    /// [`BatchNorm::mark_weights_changed`] after writing.
    pub fn state_buffer(&self) -> &wgpu::Buffer {
        &self.state
    }

    /// Byte range of one weight inside [`BatchNorm::state_buffer`]: its
    /// start is aligned for a storage binding.
    pub fn weight_range(&self, slot: StateSlot) -> std::ops::Range<u64> {
        let start = (slot.index() * self.state_stride() * 4) as u64;
        start..start + (self.channels * 4) as u64
    }

    /// Floats from one state slot to the next in
    /// [`BatchNorm::state_buffer`]: `channels` rounded up to the storage
    /// offset alignment.
    pub fn state_stride(&self) -> usize {
        state_stride(&self.ctx, self.channels)
    }

    /// Tells the layer its weights were written from outside: a later
    /// `backward` then refuses to differentiate an earlier forward call.
    pub fn mark_weights_changed(&self) {
        self.weights_replaced();
    }

    /// The weights this layer has, in Keras's `get_weights()` order.
    pub fn weight_slots(&self) -> Vec<StateSlot> {
        StateSlot::ALL.into_iter().filter(|s| s.present(&self.config)).collect()
    }

    /// Reads every weight back, in Keras order, with its name.
    pub fn named_weights(&self) -> Result<Vec<(StateSlot, Vec<f32>)>> {
        let stride = self.state_stride();
        let bytes = pollster::block_on(read_buffer(&self.ctx, &self.state, 0, 7 * stride as u64 * 4))?;
        let all: &[f32] = bytemuck::cast_slice(&bytes);
        Ok(self
            .weight_slots()
            .into_iter()
            .map(|s| (s, all[s.index() * stride..][..self.channels].to_vec()))
            .collect())
    }

    /// The inference transform per channel, `y = x * scale + shift`, for
    /// folding the layer into a preceding convolution or dense layer:
    /// `scale = gamma / sqrt(moving_variance + epsilon)`,
    /// `shift = beta - moving_mean * scale` (computed in float64).
    pub fn inference_affine(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let weights = self.named_weights()?;
        let get = |slot: StateSlot, default: f64| -> Vec<f64> {
            weights
                .iter()
                .find(|(s, _)| *s == slot)
                .map(|(_, v)| v.iter().map(|&x| x as f64).collect())
                .unwrap_or_else(|| vec![default; self.channels])
        };
        let (gamma, beta) = (get(StateSlot::Gamma, 1.0), get(StateSlot::Beta, 0.0));
        let (mean, variance) = (get(StateSlot::MovingMean, 0.0), get(StateSlot::MovingVariance, 1.0));
        let eps = self.config.epsilon as f64;
        let scale: Vec<f64> = (0..self.channels)
            .map(|c| gamma[c] / (variance[c] + eps).sqrt())
            .collect();
        let shift = (0..self.channels)
            .map(|c| (beta[c] - mean[c] * scale[c]) as f32)
            .collect();
        Ok((scale.into_iter().map(|v| v as f32).collect(), shift))
    }

    /// Keras's `get_weights()`: gamma, beta, moving_mean, moving_variance
    /// (then the renorm state), skipping the weights the config leaves out.
    pub fn get_weights(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.named_weights()?.into_iter().map(|(_, v)| v).collect())
    }

    /// Keras's `set_weights()`, in the order of [`BatchNorm::get_weights`].
    pub fn set_weights(&self, weights: &[Vec<f32>]) -> Result<()> {
        let slots = self.weight_slots();
        if weights.len() != slots.len() {
            return Err(Error::Weights(format!(
                "expected {} weights ({}), got {}",
                slots.len(),
                slots.iter().map(|s| s.keras_name()).collect::<Vec<_>>().join(", "),
                weights.len()
            )));
        }
        for (slot, w) in slots.iter().zip(weights) {
            self.check_weight(*slot, w)?;
        }
        for (slot, w) in slots.into_iter().zip(weights) {
            self.write_weight(slot, w);
        }
        Ok(())
    }

    /// Sets one weight by slot.
    pub fn set_weight(&self, slot: StateSlot, values: &[f32]) -> Result<()> {
        self.check_weight(slot, values)?;
        self.write_weight(slot, values);
        Ok(())
    }

    fn check_weight(&self, slot: StateSlot, values: &[f32]) -> Result<()> {
        if !slot.present(&self.config) {
            return Err(Error::Weights(format!(
                "this layer has no {} (center={}, scale={}, renorm={})",
                slot.keras_name(),
                self.config.center,
                self.config.scale,
                self.config.renorm
            )));
        }
        if values.len() != self.channels {
            return Err(Error::Weights(format!(
                "{} needs {} values, got {}",
                slot.keras_name(),
                self.channels,
                values.len()
            )));
        }
        Ok(())
    }

    /// A weight as the state stores it (float16-rounded under
    /// `StatePrecision::Float16`).
    fn stored(&self, v: f32) -> f32 {
        match self.config.state_precision {
            StatePrecision::Float32 => v,
            StatePrecision::Float16 => half::f16::from_f32(v).to_f32(),
        }
    }

    fn write_weight(&self, slot: StateSlot, values: &[f32]) {
        let offset = self.weight_range(slot).start;
        let values: Vec<f32> = values.iter().map(|&v| self.stored(v)).collect();
        self.ctx
            .queue()
            .write_buffer(&self.state, offset, bytemuck::cast_slice(&values));
        self.weights_replaced();
    }

    /// The forward pass, as Keras's `layer(x, training=..., mask=...)`,
    /// into a new output tensor.
    ///
    /// `training: None` is inference, as in Keras; with `trainable = false`
    /// every call is inference and changes nothing. In training the batch
    /// statistics normalise `x` and update the moving statistics on the GPU.
    /// The mask (input shape without its last axis: `[]`, one flag, for a
    /// rank-1 input) selects the positions that enter the batch statistics,
    /// any non-zero flag as Keras's cast to bool; every position is
    /// normalised.
    /// Everything is recorded into one command buffer and submitted once.
    ///
    /// Keeps nothing for a backward pass: use [`BatchNorm::forward_saved`]
    /// for that.
    pub fn forward(&self, x: &Tensor, training: Option<bool>, mask: Option<&Mask>) -> Result<Tensor> {
        let y = Tensor::uninit(&self.ctx, x.shape(), x.dtype())?;
        // nothing reads these statistics: the layer's discard buffer
        self.submit_forward(x, training, mask, &y, self.discarded_statistics.clone())?;
        Ok(y)
    }

    /// [`BatchNorm::forward`], also returning what
    /// [`BatchNorm::backward`] needs to differentiate this call:
    ///
    /// ```no_run
    /// # use wgpu_batchnorm::*;
    /// # fn f(layer: &BatchNorm, x: &Tensor, dy: &Tensor) -> Result<()> {
    /// let (y, saved) = layer.forward_saved(x, Some(true), None)?;
    /// let grads = layer.backward(&saved, dy, true)?;
    /// # Ok(()) }
    /// ```
    pub fn forward_saved(
        &self,
        x: &Tensor,
        training: Option<bool>,
        mask: Option<&Mask>,
    ) -> Result<(Tensor, SavedForward)> {
        let y = Tensor::uninit(&self.ctx, x.shape(), x.dtype())?;
        let saved = self.forward_into(x, training, mask, &y)?;
        Ok((y, saved))
    }

    /// [`BatchNorm::forward_saved`] into an existing tensor of x's shape
    /// and dtype: no allocation proportional to the input (the returned
    /// [`SavedForward`] holds 32 bytes a channel).
    pub fn forward_into(
        &self,
        x: &Tensor,
        training: Option<bool>,
        mask: Option<&Mask>,
        y: &Tensor,
    ) -> Result<SavedForward> {
        self.submit_forward(x, training, mask, y, self.saved_statistics())
    }

    /// Runs one forward call: a synchronized layer's through its exchange,
    /// any other's as one submission.
    fn submit_forward(
        &self,
        x: &Tensor,
        training: Option<bool>,
        mask: Option<&Mask>,
        y: &Tensor,
        statistics: wgpu::Buffer,
    ) -> Result<SavedForward> {
        if self.config.synchronized {
            return self.forward_synchronized(x, training, mask, y, statistics);
        }
        self.ctx.scoped(self.forward_name(training), || {
            let mut encoder = self.encoder("batchnorm forward");
            let saved = self.record(&mut encoder, x, training, mask, y, statistics)?;
            self.ctx.queue().submit([encoder.finish()]);
            Ok(saved)
        })
    }

    /// A forward call's own per-channel statistics, for its backward.
    fn saved_statistics(&self) -> wgpu::Buffer {
        storage_buffer(
            &self.ctx,
            "saved statistics",
            self.channels as u64 * 32,
            wgpu::BufferUsages::empty(),
        )
    }

    /// Records the forward pass into the caller's encoder (nothing runs
    /// until the caller submits it). Calls recorded in one encoder run in
    /// order; the state they update is the layer's. The returned
    /// [`SavedForward`] belongs to this call alone: its statistics are
    /// written when the GPU runs it, and a backward recorded after it (in
    /// the same encoder or a later submission) reads them.
    ///
    /// Submit the encoder before (or with) any backward of the returned
    /// [`SavedForward`]: its statistics exist only once the GPU has run
    /// this call. A backward of a forward whose encoder was never submitted
    /// reads statistics never written (NaN dx, zero dgamma and dbeta) and
    /// the crate cannot tell: wgpu does not say whether a command buffer
    /// was submitted.
    ///
    /// Errors the device reports while this call records (a rejected
    /// pipeline, a destroyed buffer in a bind group) are this call's
    /// [`Error::Gpu`]; errors wgpu defers to `CommandEncoder::finish` reach
    /// the application's own error scope or handler there.
    ///
    /// A synchronized layer's training call exchanges its moments in the
    /// middle and cannot be recorded: it returns [`Error::Exchange`].
    pub fn record_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &Tensor,
        training: Option<bool>,
        mask: Option<&Mask>,
        y: &Tensor,
    ) -> Result<SavedForward> {
        if self.config.synchronized && self.batch_statistics(training) {
            return Err(Error::Exchange(
                "a synchronized layer's training call all-gathers its moments between its dispatches and \
                 cannot be recorded into an encoder: call forward, forward_saved or forward_into"
                    .into(),
            ));
        }
        self.ctx.scoped(self.forward_name(training), || {
            self.record(encoder, x, training, mask, y, self.saved_statistics())
        })
    }

    /// The call's name in a GPU error.
    fn forward_name(&self, training: Option<bool>) -> &'static str {
        if self.batch_statistics(training) {
            "a training forward"
        } else {
            "an inference forward"
        }
    }

    fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.ctx
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Checks and plans one forward call. A synchronized rank's batch may be
    /// empty (`empty_ok`): its plan then covers one value a channel, for
    /// the per-channel kernels alone.
    fn plan_forward(
        &self,
        x: &Tensor,
        training: Option<bool>,
        mask: Option<&Mask>,
        y: &Tensor,
        empty_ok: bool,
    ) -> Result<ForwardCall> {
        let ctx = &self.ctx;
        x.check_role("the input x", ctx, wgpu::BufferUsages::STORAGE)?;
        y.check_role("the output y", ctx, wgpu::BufferUsages::STORAGE)?;
        let view = self.view_of(x, empty_ok)?;
        check_output("y", x, y)?;
        if let Some(mask) = mask {
            mask.check_device(ctx)?;
            let expected = &x.shape()[..x.shape().len() - 1];
            if mask.shape() != expected {
                return Err(Error::Shape(format!(
                    "the mask should be the input shape without its last axis: expected {expected:?}, got {:?} \
                     (Mask::from_u8_broadcast spreads a broadcastable one)",
                    mask.shape()
                )));
            }
        }
        let batch_statistics = self.batch_statistics(training);
        let masked = batch_statistics && mask.is_some();
        let mask_use = MaskUse {
            statistics: masked,
            elementwise: false,
            by_row: mask_by_row(view, x.shape()),
        };
        let op = if batch_statistics { Op::Training } else { Op::Inference };
        let planned = self.planned_view(view);
        let tuning = self.ctx.plan_tuning(planned, x.dtype(), op);
        let plan = DispatchPlan::new(planned, x.dtype(), mask_use, self.ctx.plan_limits(), &tuning)?;
        let flags =
            self.config_flags() | flag(masked, params::FLAG_MASKED) | flag(batch_statistics, params::FLAG_TRAINING);
        Ok(ForwardCall {
            keys: CallKeys::new(self, x.dtype(), masked, tuning),
            plan,
            batch_statistics,
            flags,
            empty: view.is_empty(),
        })
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

    /// Records one forward call, its per-channel statistics into `statistics`.
    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &Tensor,
        training: Option<bool>,
        mask: Option<&Mask>,
        y: &Tensor,
        statistics: wgpu::Buffer,
    ) -> Result<SavedForward> {
        let call = self.plan_forward(x, training, mask, y, false)?;
        let mut scratch = self.lock_scratch();
        let rec = Recorder::new(self, &mut scratch, &call.plan, x.shape(), call.flags);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("batchnorm forward"),
                timestamp_writes: None,
            });
            if call.batch_statistics {
                self.dispatch_statistics(&mut pass, &rec, &call, x, mask)?;
            }
            self.dispatch_finalize(&mut pass, &rec, &call, &statistics)?;
            self.dispatch_normalize(&mut pass, &rec, &call, x, y)?;
        }
        Ok(self.saved_forward(&call, x, mask, statistics, self.config.synchronized))
    }

    /// The statistics kernel over every chunk, into the recorder's partials.
    fn dispatch_statistics(
        &self,
        pass: &mut wgpu::ComputePass,
        rec: &Recorder,
        call: &ForwardCall,
        x: &Tensor,
        mask: Option<&Mask>,
    ) -> Result<()> {
        let mask_buffer = mask.map(|m| &m.buffer).unwrap_or(&self.ctx.gpu().placeholder);
        rec.per_chunk(
            pass,
            call.keys.key(Kernel::PartialStats).with_layout(call.plan.stats),
            |chunk| vec![chunk_binding(x, chunk), mask_buffer.as_entire_binding(), rec.partials()],
        )
    }

    /// The forward finalize kernel: the recorder's partials into the
    /// moving statistics, the affine map and `statistics` (or, under
    /// `FLAG_MERGE_ONLY`, into one merged partial a channel in `statistics`).
    fn dispatch_finalize(
        &self,
        pass: &mut wgpu::ComputePass,
        rec: &Recorder,
        call: &ForwardCall,
        statistics: &wgpu::Buffer,
    ) -> Result<()> {
        rec.per_channel(
            pass,
            call.keys.key(Kernel::Finalize),
            vec![
                rec.partials(),
                self.state.as_entire_binding(),
                self.affine.as_entire_binding(),
                statistics.as_entire_binding(),
            ],
        )
    }

    fn dispatch_normalize(
        &self,
        pass: &mut wgpu::ComputePass,
        rec: &Recorder,
        call: &ForwardCall,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<()> {
        if call.empty {
            return Ok(());
        }
        let key = call
            .keys
            .key(Kernel::Normalize)
            .with_layout(call.plan.elementwise)
            .with_relu(self.config.fused_relu)
            .with_uniform_params(self.uniform_params(3, &call.keys.tuning));
        rec.per_chunk(pass, key, |chunk| {
            vec![
                chunk_binding(x, chunk),
                self.affine.as_entire_binding(),
                chunk_binding(y, chunk),
                uniform_view(&self.ctx, &self.affine),
            ]
        })
    }

    fn saved_forward(
        &self,
        call: &ForwardCall,
        x: &Tensor,
        mask: Option<&Mask>,
        statistics: wgpu::Buffer,
        synchronized: bool,
    ) -> SavedForward {
        SavedForward {
            layer: self.id,
            x: x.clone(),
            mask: mask.filter(|_| call.keys.masked).cloned(),
            batch_statistics: call.batch_statistics,
            synchronized,
            weights_version: self.weights_version.load(Ordering::Acquire),
            statistics,
        }
    }

    /// Gradients of the forward call that returned `saved`: given `dy`
    /// (same shape and dtype as that call's input), returns dx, and dgamma /
    /// dbeta where the layer has those weights and is trainable, all
    /// computed on the GPU in one submission. With `regularization`, the
    /// regularizers' gradients are added to dgamma and dbeta.
    ///
    /// Keras's gradients: in training the batch mean and variance depend on
    /// x (over the masked-in positions only, every position receiving the
    /// direct term); in inference they are constants; renorm's r and d are
    /// constants. gamma and beta are read when the backward runs:
    /// replacing the weights in between (`set_weights`, an [`crate::Sgd`]
    /// step, [`BatchNorm::mark_weights_changed`]) makes this an
    /// [`Error::WeightsChanged`].
    pub fn backward(&self, saved: &SavedForward, dy: &Tensor, regularization: bool) -> Result<Gradients> {
        let grads = self.gradient_tensors(dy)?;
        self.backward_into(saved, dy, regularization, &grads)?;
        Ok(grads)
    }

    /// Tensors shaped for the gradients of this layer (for `backward_into`).
    pub fn gradient_tensors(&self, dy: &Tensor) -> Result<Gradients> {
        let cfg = &self.config;
        let per_channel = |present: bool| {
            present
                .then(|| Tensor::uninit(&self.ctx, &[self.channels], DType::F32))
                .transpose()
        };
        Ok(Gradients {
            dx: Tensor::uninit(&self.ctx, dy.shape(), dy.dtype())?,
            dgamma: per_channel(cfg.scale && cfg.trainable)?,
            dbeta: per_channel(cfg.center && cfg.trainable)?,
        })
    }

    /// [`BatchNorm::backward`] into existing tensors.
    pub fn backward_into(
        &self,
        saved: &SavedForward,
        dy: &Tensor,
        regularization: bool,
        grads: &Gradients,
    ) -> Result<()> {
        if self.config.synchronized {
            return self.backward_synchronized(saved, dy, regularization, grads);
        }
        self.ctx.scoped("a backward", || {
            let mut encoder = self.encoder("batchnorm backward");
            self.record_backward_unscoped(&mut encoder, saved, dy, regularization, grads)?;
            self.ctx.queue().submit([encoder.finish()]);
            Ok(())
        })
    }

    /// Records the backward pass of the forward call that returned `saved`
    /// into the caller's encoder, after that call (in the same encoder or an
    /// earlier submission).
    ///
    /// A synchronized layer's backward exchanges its sums in the middle
    /// (see [`BatchNorm::set_exchange`]) and cannot be recorded: it returns
    /// [`Error::Exchange`]; use [`BatchNorm::backward_into`].
    pub fn record_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        saved: &SavedForward,
        dy: &Tensor,
        regularization: bool,
        grads: &Gradients,
    ) -> Result<()> {
        if self.config.synchronized {
            return Err(Error::Exchange(
                "a synchronized layer's backward all-gathers its sums between its dispatches and cannot be \
                 recorded into an encoder: call backward or backward_into"
                    .into(),
            ));
        }
        self.ctx.scoped("a backward", || {
            self.record_backward_unscoped(encoder, saved, dy, regularization, grads)
        })
    }

    fn record_backward_unscoped(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        saved: &SavedForward,
        dy: &Tensor,
        regularization: bool,
        grads: &Gradients,
    ) -> Result<()> {
        let call = self.plan_backward(saved, dy, regularization, grads, false)?;
        let mut scratch = self.lock_scratch();
        let rec = Recorder::new(self, &mut scratch, &call.plan, saved.x.shape(), call.flags);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("batchnorm backward"),
                timestamp_writes: None,
            });
            self.dispatch_backward_reduce(&mut pass, &rec, &call, saved, dy)?;
            self.dispatch_backward_finalize(&mut pass, &rec, &call, saved, &self.coeffs)?;
            self.dispatch_dx(&mut pass, &rec, &call, saved, dy, grads)?;
        }
        self.copy_parameter_gradients(encoder, grads);
        Ok(())
    }

    /// Checks and plans one backward call (`empty_ok` as in `plan_forward`).
    fn plan_backward(
        &self,
        saved: &SavedForward,
        dy: &Tensor,
        regularization: bool,
        grads: &Gradients,
        empty_ok: bool,
    ) -> Result<BackwardCall> {
        if saved.layer != self.id {
            return Err(Error::ForeignSaved);
        }
        if self.config.fused_relu {
            return Err(ConfigError::Unsupported(
                "backward through the fused ReLU epilogue is not supported: use fused_relu for inference".into(),
            )
            .into());
        }
        if saved.weights_version != self.weights_version.load(Ordering::Acquire) {
            return Err(Error::WeightsChanged);
        }
        let x = &saved.x;
        if dy.shape() != x.shape() {
            return Err(Error::Shape(format!(
                "dy has shape {:?}, the forward input had {:?}",
                dy.shape(),
                x.shape()
            )));
        }
        if dy.dtype() != x.dtype() {
            return Err(Error::DType {
                expected: x.dtype().to_string(),
                got: dy.dtype().to_string(),
            });
        }
        let ctx = &self.ctx;
        dy.check_role("dy", ctx, wgpu::BufferUsages::STORAGE)?;
        grads.dx.check_role("dx", ctx, wgpu::BufferUsages::STORAGE)?;
        check_output("dx", x, &grads.dx)?;
        if grads.dx.buffer() == dy.buffer() {
            return Err(Error::Aliasing(
                "dx must live in another buffer than dy: WebGPU forbids binding one buffer read-only and \
                 read-write in the same dispatch"
                    .into(),
            ));
        }
        let cfg = &self.config;
        for (name, t, present) in [
            ("dgamma", &grads.dgamma, cfg.scale && cfg.trainable),
            ("dbeta", &grads.dbeta, cfg.center && cfg.trainable),
        ] {
            match t {
                Some(t) if t.shape() != [self.channels] || t.dtype() != DType::F32 => {
                    return Err(Error::Shape(format!(
                        "{name} must be float32 of shape [{}], got {} {:?}",
                        self.channels,
                        t.dtype(),
                        t.shape()
                    )));
                }
                None if present => return Err(Error::Shape(format!("no {name} tensor to write"))),
                // written by a buffer copy
                Some(t) => t.check_role(name, ctx, wgpu::BufferUsages::COPY_DST)?,
                None => {}
            }
        }
        let view = self.view_of(x, empty_ok)?;
        let masked = saved.mask.is_some();
        // backward reduce and dx both read the forward call's mask
        let mask_use = MaskUse {
            statistics: masked,
            elementwise: masked,
            by_row: mask_by_row(view, x.shape()),
        };
        let planned = self.planned_view(view);
        let tuning = self.ctx.plan_tuning(planned, x.dtype(), Op::Backward);
        let plan = DispatchPlan::new(planned, x.dtype(), mask_use, self.ctx.plan_limits(), &tuning)?;
        let reg = |r: Option<Regularizer>, l1_flag, l2_flag| match r {
            Some(r) if regularization => flag(r.l1 != 0.0, l1_flag) | flag(r.l2 != 0.0, l2_flag),
            _ => 0,
        };
        let flags = self.config_flags()
            | flag(masked, params::FLAG_MASKED)
            | flag(saved.batch_statistics, params::FLAG_TRAINING)
            | reg(cfg.gamma_regularizer, params::FLAG_GAMMA_L1, params::FLAG_GAMMA_L2)
            | reg(cfg.beta_regularizer, params::FLAG_BETA_L1, params::FLAG_BETA_L2);
        Ok(BackwardCall {
            keys: CallKeys::new(self, x.dtype(), masked, tuning),
            plan,
            flags,
            empty: view.is_empty(),
        })
    }

    fn saved_mask<'s>(&'s self, saved: &'s SavedForward) -> &'s wgpu::Buffer {
        saved
            .mask
            .as_ref()
            .map(|m| &m.buffer)
            .unwrap_or(&self.ctx.gpu().placeholder)
    }

    /// Backward, pass 1 over every chunk: the tile sums into the recorder's partials.
    fn dispatch_backward_reduce(
        &self,
        pass: &mut wgpu::ComputePass,
        rec: &Recorder,
        call: &BackwardCall,
        saved: &SavedForward,
        dy: &Tensor,
    ) -> Result<()> {
        let key = call.keys.key(Kernel::BackwardReduce).with_layout(call.plan.stats);
        rec.per_chunk(pass, key, |chunk| {
            vec![
                chunk_binding(&saved.x, chunk),
                chunk_binding(dy, chunk),
                saved.statistics.as_entire_binding(),
                self.saved_mask(saved).as_entire_binding(),
                rec.partials(),
            ]
        })
    }

    /// Backward, pass 2: the recorder's partials into the parameter
    /// gradients and the dx coefficients in `coeffs` (or, under
    /// `FLAG_MERGE_ONLY`, into one summed partial a channel in `coeffs`).
    fn dispatch_backward_finalize(
        &self,
        pass: &mut wgpu::ComputePass,
        rec: &Recorder,
        call: &BackwardCall,
        saved: &SavedForward,
        coeffs: &wgpu::Buffer,
    ) -> Result<()> {
        rec.per_channel(
            pass,
            call.keys.key(Kernel::BackwardFinalize),
            vec![
                rec.partials(),
                self.state.as_entire_binding(),
                saved.statistics.as_entire_binding(),
                self.grads.as_entire_binding(),
                coeffs.as_entire_binding(),
            ],
        )
    }

    fn dispatch_dx(
        &self,
        pass: &mut wgpu::ComputePass,
        rec: &Recorder,
        call: &BackwardCall,
        saved: &SavedForward,
        dy: &Tensor,
        grads: &Gradients,
    ) -> Result<()> {
        if call.empty {
            return Ok(());
        }
        let key = call
            .keys
            .key(Kernel::BackwardDx)
            .with_layout(call.plan.elementwise)
            .with_uniform_params(self.uniform_params(4, &call.keys.tuning));
        rec.per_chunk(pass, key, |chunk| {
            vec![
                chunk_binding(&saved.x, chunk),
                chunk_binding(dy, chunk),
                self.saved_mask(saved).as_entire_binding(),
                self.coeffs.as_entire_binding(),
                chunk_binding(&grads.dx, chunk),
                uniform_view(&self.ctx, &self.coeffs),
            ]
        })
    }

    fn copy_parameter_gradients(&self, encoder: &mut wgpu::CommandEncoder, grads: &Gradients) {
        let channel_bytes = self.channels as u64 * 4;
        if let Some(g) = &grads.dgamma {
            encoder.copy_buffer_to_buffer(&self.grads, 0, g.buffer(), g.offset(), channel_bytes);
        }
        if let Some(b) = &grads.dbeta {
            encoder.copy_buffer_to_buffer(&self.grads, channel_bytes, b.buffer(), b.offset(), channel_bytes);
        }
    }

    /// The input's channel view; an empty one only where `empty_ok` (a
    /// synchronized rank with no values takes part in the exchange).
    fn view_of(&self, x: &Tensor, empty_ok: bool) -> Result<ChannelView> {
        let axis = self.config.resolve_axis(x.shape().len())?;
        let view = ChannelView::new(x.shape(), axis);
        if x.is_empty() && !empty_ok {
            return Err(Error::Shape(format!(
                "input shape {:?} has an empty dimension: only a synchronized layer takes an empty batch",
                x.shape()
            )));
        }
        if view.channels != self.channels {
            return Err(Error::Shape(format!(
                "input shape {:?} has {} features on axis {}, the layer was built for {}",
                x.shape(),
                view.channels,
                self.config.axis,
                self.channels
            )));
        }
        Ok(view)
    }

    /// Whether the elementwise kernels read this layer's parameters (`floats`
    /// per channel) through the uniform view: the context asks for it and
    /// they fit in it.
    fn uniform_params(&self, floats: u64, tuning: &PlanTuning) -> bool {
        tuning.uniform_parameters.unwrap_or(self.ctx.uniform_parameters())
            && self.channels as u64 * floats * 4 <= self.ctx.inner.kernels.uniform_view
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

    /// Marks the weights as replaced: the saved forward no longer matches.
    pub(crate) fn weights_replaced(&self) {
        self.weights_version.fetch_add(1, Ordering::AcqRel);
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
fn check_output(name: &str, x: &Tensor, out: &Tensor) -> Result<()> {
    if out.shape() != x.shape() || out.dtype() != x.dtype() {
        return Err(Error::Shape(format!(
            "{name} must be {} of shape {:?}, got {} {:?}",
            x.dtype(),
            x.shape(),
            out.dtype(),
            out.shape()
        )));
    }
    if out.buffer() == x.buffer() {
        return Err(Error::Aliasing(format!(
            "{name} must live in another buffer than the input: WebGPU forbids binding one buffer \
             read-only and read-write in the same dispatch"
        )));
    }
    Ok(())
}

fn flag(on: bool, bit: u32) -> u32 {
    if on { bit } else { 0 }
}

/// One chunk of a tensor (which may start inside its buffer).
fn chunk_binding<'a>(tensor: &'a Tensor, chunk: &Chunk) -> wgpu::BindingResource<'a> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: tensor.buffer(),
        offset: tensor.offset() + chunk.bind_offset,
        size: wgpu::BufferSize::new(chunk.bind_size),
    })
}

/// Records one call's dispatches: writes the per-chunk uniform slots, then
/// binds and dispatches kernels over the plan's chunks or channels.
struct Recorder<'a> {
    layer: &'a BatchNorm,
    plan: &'a DispatchPlan,
    params: wgpu::Buffer,
    partials: wgpu::Buffer,
}

impl<'a> Recorder<'a> {
    fn new(layer: &'a BatchNorm, scratch: &mut Scratch, plan: &'a DispatchPlan, shape: &[usize], flags: u32) -> Self {
        let ctx = &layer.ctx;
        let cfg = &layer.config;
        let clip = cfg.renorm_clipping;
        let view = plan.view;
        let regularizer = |r: Option<Regularizer>| r.unwrap_or_default();
        let params: Vec<Params> = plan
            .chunks
            .iter()
            .map(|chunk| Params {
                channels: view.channels as u32,
                inner: view.inner as u32,
                chunk_start: chunk.start as u32,
                x_base: chunk.base,
                y_base: chunk.base,
                last_dim: *shape.last().unwrap_or(&1) as u32,
                lane_width: plan.lane_width,
                elems_per_thread: plan.elems_per_thread as u32,
                tiles: chunk.tiles as u32,
                tile_offset: chunk.tile_offset as u32,
                total_tiles: plan.total_tiles as u32,
                stats_groups_x: chunk.stats_grid.0,
                norm_groups_x: chunk.normalize_grid.0,
                finalize_groups_x: plan.finalize_grid.0,
                chunk_elems: chunk.elems as u32,
                flags,
                momentum: cfg.momentum,
                epsilon: cfg.epsilon,
                renorm_momentum: cfg.renorm_momentum,
                rmin: clip.rmin.unwrap_or(0.0),
                rmax: clip.rmax.unwrap_or(0.0),
                dmax: clip.dmax.unwrap_or(0.0),
                gamma_l1: regularizer(cfg.gamma_regularizer).l1,
                gamma_l2: regularizer(cfg.gamma_regularizer).l2,
                beta_l1: regularizer(cfg.beta_regularizer).l1,
                beta_l2: regularizer(cfg.beta_regularizer).l2,
                column_blocks: plan.column_blocks,
                elementwise_steps: chunk.elementwise_steps,
                state_stride: layer.state_stride() as u32,
                zero: 0,
                _pad: [0; 2],
            })
            .collect();
        scratch.reserve(ctx, (layer.channels * plan.total_tiles * 16) as u64);
        let mut slots = vec![0u8; params.len() * PARAMS_SLOT as usize];
        for (i, p) in params.iter().enumerate() {
            slots[i * PARAMS_SLOT as usize..][..std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(p));
        }
        // a uniform buffer per recorded call (a few hundred bytes): calls
        // recorded into one encoder must not share parameters
        use wgpu::util::DeviceExt;
        let params = ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: &slots,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        Recorder {
            layer,
            plan,
            params,
            partials: scratch.partials.clone(),
        }
    }

    /// Reads another buffer's partials (a synchronized call's merged ones).
    fn with_partials(mut self, partials: wgpu::Buffer) -> Self {
        self.partials = partials;
        self
    }

    fn partials(&self) -> wgpu::BindingResource<'_> {
        self.partials.as_entire_binding()
    }

    fn bind(&self, kernel: Kernel, resources: Vec<wgpu::BindingResource>) -> Result<wgpu::BindGroup> {
        let uniform = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.params,
            offset: 0,
            size: wgpu::BufferSize::new(kernel.uniform_size()),
        });
        let entries: Vec<_> = std::iter::once(uniform)
            .chain(resources)
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource,
            })
            .collect();
        let ctx = &self.layer.ctx;
        Ok(ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry_point()),
            layout: ctx.inner.kernels.bind_group_layout(kernel)?,
            entries: &entries,
        }))
    }

    fn pipeline(&self, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        let ctx = &self.layer.ctx;
        ctx.inner.kernels.pipeline(ctx.device(), key)
    }

    /// One dispatch per chunk, bound to that chunk's uniform slot.
    fn per_chunk<'r>(
        &self,
        pass: &mut wgpu::ComputePass,
        key: KernelKey,
        resources: impl Fn(&Chunk) -> Vec<wgpu::BindingResource<'r>>,
    ) -> Result<()> {
        pass.set_pipeline(&self.pipeline(key)?);
        for (i, chunk) in self.plan.chunks.iter().enumerate() {
            let group = self.bind(key.kernel, resources(chunk))?;
            pass.set_bind_group(0, &group, &[(i as u64 * PARAMS_SLOT) as u32]);
            let (gx, gy) = match key.kernel {
                Kernel::PartialStats | Kernel::BackwardReduce => chunk.stats_grid,
                _ => chunk.normalize_grid,
            };
            pass.dispatch_workgroups(gx, gy, 1);
        }
        Ok(())
    }

    /// The finalize kernels over every channel, with the first uniform slot.
    fn per_channel(
        &self,
        pass: &mut wgpu::ComputePass,
        key: KernelKey,
        resources: Vec<wgpu::BindingResource>,
    ) -> Result<()> {
        pass.set_pipeline(&self.pipeline(key)?);
        let group = self.bind(key.kernel, resources)?;
        pass.set_bind_group(0, &group, &[0]);
        let (gx, gy) = self.plan.finalize_grid;
        pass.dispatch_workgroups(gx, gy, 1);
        Ok(())
    }
}

impl Scratch {
    fn reserve(&mut self, ctx: &GpuContext, partial_bytes: u64) {
        if self.partials.size() < partial_bytes {
            self.partials = storage_buffer(ctx, "partials", partial_bytes, wgpu::BufferUsages::empty());
        }
    }
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNorm")
            .field("channels", &self.channels)
            .field("config", &self.config)
            .finish()
    }
}
