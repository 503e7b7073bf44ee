//! Backward calls: the gradients of one forward call, checked, planned as
//! data, then recorded (one submission, or into the caller's encoder).

use std::sync::atomic::Ordering;

use super::recorder::CallBuffers;
use super::{BackwardArgs, BatchNorm, Call, Gradients, SavedForward, check_output, flag, mask_by_row};
use crate::config::Regularizer;
use crate::dtype::DType;
use crate::error::{ConfigError, Error, ExchangeFailure, Result};
use crate::params;
use crate::plan::{CallPlan, DispatchPlan, MaskUse, Phase};
use crate::tensor::Tensor;
use crate::tuning::Op;

impl BatchNorm {
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
        let args = BackwardArgs {
            saved,
            dy,
            regularization,
            grads,
        };
        if self.config.synchronized {
            return self.backward_synchronized(args);
        }
        self.ctx.scoped("a backward", || {
            let mut encoder = self.encoder("batchnorm backward");
            self.record_backward_call(&mut encoder, args)?;
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
            return Err(Error::exchange(
                ExchangeFailure::Unsupported,
                "a synchronized layer's backward all-gathers its sums between its dispatches and cannot be \
                 recorded into an encoder: call backward or backward_into",
            ));
        }
        self.ctx.scoped("a backward", || {
            let args = BackwardArgs {
                saved,
                dy,
                regularization,
                grads,
            };
            self.record_backward_call(encoder, args)
        })
    }

    fn record_backward_call(&self, encoder: &mut wgpu::CommandEncoder, args: BackwardArgs) -> Result<()> {
        let BackwardArgs { saved, dy, grads, .. } = args;
        let call = self.plan_backward(args, false, Phase::Whole)?;
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("batchnorm backward"),
                timestamp_writes: None,
            });
            let buffers = CallBuffers::backward(saved, dy, Some(&grads.dx), &self.coeffs);
            self.record_plan(&mut pass, &call.plan, call.flags, saved.x.shape(), &buffers)?;
        }
        self.copy_parameter_gradients(encoder, grads);
        Ok(())
    }

    /// Checks and plans one backward call (`empty_ok` as in `plan_forward`).
    pub(super) fn plan_backward(&self, args: BackwardArgs, empty_ok: bool, phase: Phase) -> Result<Call> {
        let BackwardArgs {
            saved,
            dy,
            regularization,
            grads,
        } = args;
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
            return Err(Error::shape(
                "dy",
                format!("dy has shape {:?}, the forward input had {:?}", dy.shape(), x.shape()),
            ));
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
            return Err(Error::Aliasing {
                output: "dx",
                input: "dy",
            });
        }
        let cfg = &self.config;
        for (name, t, present) in [
            ("dgamma", &grads.dgamma, cfg.scale && cfg.trainable),
            ("dbeta", &grads.dbeta, cfg.center && cfg.trainable),
        ] {
            match t {
                Some(t) => {
                    t.check_per_channel(name, self.channels)?;
                    // written by a buffer copy
                    t.check_role(name, ctx, wgpu::BufferUsages::COPY_DST)?
                }
                None if present => return Err(Error::shape(name, format!("no {name} tensor to write"))),
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
        let cut = DispatchPlan::new(planned, x.dtype(), mask_use, self.ctx.plan_limits(), &tuning)?;
        let variant = self.variant(x.dtype(), masked, tuning);
        let reg = |r: Option<Regularizer>, l1_flag, l2_flag| match r {
            Some(r) if regularization => flag(r.l1 != 0.0, l1_flag) | flag(r.l2 != 0.0, l2_flag),
            _ => 0,
        };
        let flags = self.config_flags()
            | flag(masked, params::FLAG_MASKED)
            | flag(saved.batch_statistics, params::FLAG_TRAINING)
            | reg(cfg.gamma_regularizer, params::FLAG_GAMMA_L1, params::FLAG_GAMMA_L2)
            | reg(cfg.beta_regularizer, params::FLAG_BETA_L1, params::FLAG_BETA_L2);
        Ok(Call {
            plan: CallPlan::backward(cut, &variant, view.is_empty(), phase),
            flags,
            batch_statistics: saved.batch_statistics,
            masked,
            empty: view.is_empty(),
        })
    }

    pub(super) fn copy_parameter_gradients(&self, encoder: &mut wgpu::CommandEncoder, grads: &Gradients) {
        let channel_bytes = self.channels as u64 * 4;
        if let Some(g) = &grads.dgamma {
            encoder.copy_buffer_to_buffer(&self.grads, 0, g.buffer(), g.offset(), channel_bytes);
        }
        if let Some(b) = &grads.dbeta {
            encoder.copy_buffer_to_buffer(&self.grads, channel_bytes, b.buffer(), b.offset(), channel_bytes);
        }
    }
}
