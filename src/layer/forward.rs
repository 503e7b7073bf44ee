//! Forward calls: checked, planned as data, then recorded (one submission,
//! or into the caller's encoder).

use std::sync::atomic::Ordering;

use super::recorder::CallBuffers;
use super::{BatchNorm, Call, ForwardArgs, SavedForward, check_output, flag, mask_by_row};
use crate::error::{Error, ExchangeFailure, Result};
use crate::params;
use crate::plan::{CallPlan, DispatchPlan, MaskUse, Phase};
use crate::tensor::{Mask, Tensor};
use crate::tuning::Op;

impl BatchNorm {
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
        self.submit_forward(
            ForwardArgs {
                x,
                training,
                mask,
                y: &y,
            },
            Statistics::Discarded,
        )?;
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
        self.submit_forward(ForwardArgs { x, training, mask, y }, Statistics::Pooled)
    }

    /// Runs one forward call: a synchronized layer's through its exchange,
    /// any other's as one submission.
    fn submit_forward(&self, args: ForwardArgs, statistics: Statistics) -> Result<SavedForward> {
        if self.config.synchronized {
            let statistics = self.statistics_buffer(statistics);
            return self.forward_synchronized(args, statistics);
        }
        self.ctx.scoped(self.forward_name(args.training), || {
            let mut encoder = self.encoder("batchnorm forward");
            let saved = self.record_forward_call(&mut encoder, args, statistics)?;
            self.ctx.queue().submit([encoder.finish()]);
            Ok(saved)
        })
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
            return Err(Error::exchange(
                ExchangeFailure::Unsupported,
                "a synchronized layer's training call all-gathers its moments between its dispatches and \
                 cannot be recorded into an encoder: call forward, forward_saved or forward_into",
            ));
        }
        self.ctx.scoped(self.forward_name(training), || {
            // its own buffer, never a pooled one: the caller submits when it
            // likes, perhaps after a later call reused a returned buffer
            self.record_forward_call(encoder, ForwardArgs { x, training, mask, y }, Statistics::Own)
        })
    }

    /// [`BatchNorm::record_forward`] with the statistics buffer
    /// [`BatchNorm::forward_into`] uses (the layer's pool): for the
    /// benchmark, which submits each recorded call at once, so that its
    /// timed calls allocate nothing, as an application's loop does not.
    #[cfg(feature = "bench")]
    pub(crate) fn record_forward_pooled(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &Tensor,
        training: Option<bool>,
        y: &Tensor,
    ) -> Result<SavedForward> {
        let args = ForwardArgs {
            x,
            training,
            mask: None,
            y,
        };
        self.record_forward_call(encoder, args, Statistics::Pooled)
    }

    /// The call's name in a GPU error.
    fn forward_name(&self, training: Option<bool>) -> &'static str {
        if self.batch_statistics(training) {
            "a training forward"
        } else {
            "an inference forward"
        }
    }

    /// Checks and plans one forward call. A synchronized rank's batch may be
    /// empty (`empty_ok`): its plan then covers one value a channel, for
    /// the per-channel kernels alone.
    pub(super) fn plan_forward(&self, args: ForwardArgs, empty_ok: bool, phase: Phase) -> Result<Call> {
        let ForwardArgs { x, training, mask, y } = args;
        let ctx = &self.ctx;
        x.check_role("the input x", ctx, wgpu::BufferUsages::STORAGE)?;
        y.check_role("the output y", ctx, wgpu::BufferUsages::STORAGE)?;
        let view = self.view_of(x, empty_ok)?;
        check_output("y", x, y)?;
        if let Some(mask) = mask {
            mask.check_device(ctx)?;
            let expected = &x.shape()[..x.shape().len() - 1];
            if mask.shape() != expected {
                return Err(Error::shape(
                    "mask",
                    format!(
                        "the mask should be the input shape without its last axis: expected {expected:?}, got {:?} \
                     (Mask::from_u8_broadcast spreads a broadcastable one)",
                        mask.shape()
                    ),
                ));
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
        let tuning = ctx.plan_tuning(planned, x.dtype(), op);
        let cut = DispatchPlan::new(planned, x.dtype(), mask_use, ctx.plan_limits(), &tuning)?;
        let variant = self.variant(x.dtype(), masked, tuning);
        let flags =
            self.config_flags() | flag(masked, params::FLAG_MASKED) | flag(batch_statistics, params::FLAG_TRAINING);
        Ok(Call {
            plan: CallPlan::forward(cut, &variant, batch_statistics, view.is_empty(), phase),
            flags,
            batch_statistics,
            masked,
            empty: view.is_empty(),
        })
    }

    /// Records one forward call, its per-channel statistics into a buffer
    /// of `statistics`' kind.
    fn record_forward_call(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: ForwardArgs,
        statistics: Statistics,
    ) -> Result<SavedForward> {
        let ForwardArgs { x, mask, y, .. } = args;
        let call = self.plan_forward(args, false, Phase::Whole)?;
        let statistics = self.statistics_buffer(statistics);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("batchnorm forward"),
                timestamp_writes: None,
            });
            let buffers = CallBuffers::forward(self, x, Some(y), mask.filter(|_| call.masked), statistics.buffer());
            self.record_plan(&mut pass, &call.plan, call.flags, x.shape(), &buffers)?;
        }
        Ok(self.saved_forward(&call, x, mask, statistics, self.config.synchronized))
    }

    pub(super) fn saved_forward(
        &self,
        call: &Call,
        x: &Tensor,
        mask: Option<&Mask>,
        statistics: super::SavedStatistics,
        synchronized: bool,
    ) -> SavedForward {
        SavedForward {
            layer: self.id,
            x: x.clone(),
            mask: mask.filter(|_| call.masked).cloned(),
            batch_statistics: call.batch_statistics,
            synchronized,
            weights_version: self.weights_version.load(Ordering::Acquire),
            statistics: std::sync::Arc::new(statistics),
        }
    }
}

/// Where a forward call writes its per-channel statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Statistics {
    /// The layer's discard buffer: nothing will read them.
    Discarded,
    /// A buffer from the layer's pool, back in it once the call's
    /// `SavedForward` is dropped (the call is submitted at once).
    Pooled,
    /// A buffer of the call's own.
    Own,
}
