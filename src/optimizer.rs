//! Updating the layer's trainable weights on the GPU: a small SGD (with
//! momentum) and Keras's constraints, applied after every update. The
//! optimiser is the application's business; this one is here so that a
//! training loop can stay on the GPU.

use crate::config::Constraint;
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{ConfigError, Error, Result};
use crate::layer::{BatchNorm, Gradients};
use crate::params::{self, OptimizerParams};
use crate::tensor::Tensor;
use crate::variants::{Kernel, KernelKey};

/// Keras's `SGD(learning_rate, momentum, nesterov)` for one layer's gamma
/// and beta. Keeps its velocity on the GPU; use one per layer.
#[derive(Debug)]
pub struct Sgd {
    /// Keras's `learning_rate`.
    pub learning_rate: f32,
    /// Keras's `momentum` (0: plain SGD).
    pub momentum: f32,
    /// Keras's `nesterov`.
    pub nesterov: bool,
    channels: usize,
    velocity: wgpu::Buffer,
    /// This optimiser's uniform block, rewritten before each step.
    uniform: wgpu::Buffer,
    /// The bind group of the last step, and what it binds.
    group: Option<(GroupKey, wgpu::BindGroup)>,
    /// The context the velocity lives in (see `GpuContext`'s id).
    context: u64,
}

impl Sgd {
    /// An optimiser for `layer`'s gamma and beta, velocities at zero.
    pub fn new(layer: &BatchNorm, learning_rate: f32, momentum: f32, nesterov: bool) -> Result<Self> {
        if !(learning_rate >= 0.0 && learning_rate.is_finite()) {
            return Err(ConfigError::Unsupported(format!("learning rate must be >= 0, got {learning_rate}")).into());
        }
        if !(0.0..=1.0).contains(&momentum) {
            return Err(ConfigError::Momentum(momentum as f64).into());
        }
        let gpu = layer.context().gpu();
        let velocity = gpu.create_buffer(
            "sgd velocity",
            (2 * layer.channels() * 4) as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        let uniform = gpu.create_buffer(
            "optimizer params",
            Kernel::SgdStep.uniform_size(),
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        Ok(Sgd {
            learning_rate,
            momentum,
            nesterov,
            channels: layer.channels(),
            velocity,
            uniform,
            group: None,
            context: layer.context().gpu().id,
        })
    }

    /// One update of gamma and beta from `grads`, then the layer's
    /// constraints, in one submission.
    pub fn step(&mut self, layer: &BatchNorm, grads: &Gradients) -> Result<()> {
        if layer.context().gpu().id != self.context {
            return Err(Error::Device {
                what: "the optimiser (its velocity)",
            });
        }
        if layer.channels() != self.channels {
            return Err(Error::weights(
                None,
                format!(
                    "this optimiser was made for a layer of {} channels, not {}",
                    self.channels,
                    layer.channels()
                ),
            ));
        }
        let cfg = layer.config();
        if !cfg.trainable || !(cfg.scale || cfg.center) {
            return Err(Error::weights(None, "the layer has no trainable weights to update"));
        }
        let check = |g: &Option<Tensor>, present: bool, name: &'static str| -> Result<()> {
            match g {
                Some(t) => t.check_per_channel(name, self.channels),
                None if present => Err(Error::weights(Some(name), format!("the gradients have no {name}"))),
                None => Ok(()),
            }
        };
        check(&grads.dgamma, cfg.scale, "dgamma")?;
        check(&grads.dbeta, cfg.center, "dbeta")?;
        let ctx = layer.context();
        for (g, name) in [(&grads.dgamma, "dgamma"), (&grads.dbeta, "dbeta")] {
            if let Some(t) = g {
                t.check_role(name, ctx, wgpu::BufferUsages::STORAGE)?;
            }
        }
        let mut flags =
            if cfg.scale { params::OPT_HAS_GAMMA } else { 0 } | if cfg.center { params::OPT_HAS_BETA } else { 0 };
        if self.momentum != 0.0 {
            flags |= params::OPT_USE_MOMENTUM;
        }
        if self.nesterov {
            flags |= params::OPT_NESTEROV;
        }
        let params = optimizer_params(layer, flags, self.learning_rate, self.momentum);
        // written on the queue before this step's submission
        ctx.queue().write_buffer(&self.uniform, 0, &uniform_block(&params));
        let range = |t: &Option<Tensor>| {
            t.as_ref()
                .map(|t| (t.buffer().clone(), t.offset(), t.byte_len()))
                .unwrap_or_else(|| (ctx.gpu().placeholder.clone(), 0, 4))
        };
        let key = GroupKey {
            state: layer.state_buffer().clone(),
            dgamma: range(&grads.dgamma),
            dbeta: range(&grads.dbeta),
        };
        let group = match &self.group {
            Some((cached, group)) if *cached == key => group.clone(),
            _ => {
                let group = bind(ctx, layer, &self.uniform, [&key.dgamma, &key.dbeta], &self.velocity)?;
                self.group = Some((key, group.clone()));
                group
            }
        };
        record(ctx, layer, &group, true)?;
        layer.weights_replaced();
        Ok(())
    }
}

fn constraint_vector(c: Option<Constraint>) -> [f32; 4] {
    match c {
        None => [0.0; 4],
        Some(Constraint::NonNeg) => [1.0, 0.0, 0.0, 0.0],
        Some(Constraint::MaxNorm { max_value }) => [2.0, max_value, 0.0, 0.0],
        Some(Constraint::MinMaxNorm {
            min_value,
            max_value,
            rate,
        }) => [3.0, min_value, max_value, rate],
        Some(Constraint::UnitNorm) => [4.0, 0.0, 0.0, 0.0],
    }
}

fn optimizer_params(layer: &BatchNorm, flags: u32, learning_rate: f32, momentum: f32) -> OptimizerParams {
    let cfg = layer.config();
    let f16_state = if cfg.state_precision == crate::config::StatePrecision::Float16 {
        params::OPT_F16_STATE
    } else {
        0
    };
    OptimizerParams {
        channels: layer.channels() as u32,
        flags: flags | f16_state,
        learning_rate,
        momentum,
        gamma_constraint: constraint_vector(cfg.gamma_constraint),
        beta_constraint: constraint_vector(cfg.beta_constraint),
        state_stride: layer.state_stride() as u32,
        zero: 0,
        _pad: [0; 2],
    }
}

/// What an optimiser's bind group binds besides its own buffers.
#[derive(Debug, PartialEq)]
struct GroupKey {
    state: wgpu::Buffer,
    dgamma: (wgpu::Buffer, u64, u64),
    dbeta: (wgpu::Buffer, u64, u64),
}

/// The binding's two blocks, the kernels reading the first.
fn uniform_block(params: &OptimizerParams) -> Vec<u8> {
    let mut contents = vec![0u8; Kernel::SgdStep.uniform_size() as usize];
    contents[..std::mem::size_of::<OptimizerParams>()].copy_from_slice(bytemuck::bytes_of(params));
    contents
}

fn bind(
    ctx: &GpuContext,
    layer: &BatchNorm,
    uniform: &wgpu::Buffer,
    grads: [&(wgpu::Buffer, u64, u64); 2],
    velocity: &wgpu::Buffer,
) -> Result<wgpu::BindGroup> {
    fn range((buffer, offset, size): &(wgpu::Buffer, u64, u64)) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset: *offset,
            size: wgpu::BufferSize::new(*size),
        })
    }
    let resources = [
        uniform.as_entire_binding(),
        layer.state_buffer().as_entire_binding(),
        range(grads[0]),
        range(grads[1]),
        velocity.as_entire_binding(),
    ];
    let entries: Vec<_> = resources
        .into_iter()
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    Ok(ctx.gpu().create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("optimizer"),
        layout: ctx.inner.kernels.bind_group_layout(Kernel::SgdStep)?,
        entries: &entries,
    }))
}

/// Records the SGD step (when `step`) and the constraints over `group`,
/// and submits.
fn record(ctx: &GpuContext, layer: &BatchNorm, group: &wgpu::BindGroup, step: bool) -> Result<()> {
    ctx.scoped(if step { "an SGD step" } else { "applying constraints" }, || {
        let device = ctx.device();
        let kernels = &ctx.inner.kernels;
        let key = |kernel| KernelKey::new(kernel, DType::F32, false);
        let groups = (layer.channels() as u64).div_ceil(u64::from(Kernel::SgdStep.workgroup_size()));
        let grid = crate::plan::grid(groups, ctx.max_workgroups_per_dimension())?;
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("optimizer"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, group, &[0]);
            if step {
                pass.set_pipeline(&kernels.pipeline(ctx.gpu(), key(Kernel::SgdStep))?);
                pass.dispatch_workgroups(grid.0, grid.1, 1);
            }
            pass.set_pipeline(&kernels.pipeline(ctx.gpu(), key(Kernel::Constrain))?);
            pass.dispatch_workgroups(2, 1, 1);
        }
        ctx.queue().submit([encoder.finish()]);
        Ok(())
    })
}

impl BatchNorm {
    /// Applies the config's gamma/beta constraints on the GPU, for
    /// applications that update the weights with their own optimiser.
    pub fn apply_constraints(&self) -> Result<()> {
        let ctx = self.context();
        let group = match self.constraints_group.get() {
            Some(group) => group.clone(),
            None => {
                let cfg = self.config();
                let flags = if cfg.scale { params::OPT_HAS_GAMMA } else { 0 }
                    | if cfg.center { params::OPT_HAS_BETA } else { 0 };
                let params = optimizer_params(self, flags, 0.0, 0.0);
                let group = ctx.scoped("applying constraints", || {
                    let gpu = ctx.gpu();
                    let uniform = gpu.create_buffer_init(
                        "optimizer params",
                        &uniform_block(&params),
                        wgpu::BufferUsages::UNIFORM,
                    );
                    let no_velocity = gpu.create_buffer("no velocity", 16, wgpu::BufferUsages::STORAGE);
                    let placeholder = (gpu.placeholder.clone(), 0, 4);
                    bind(ctx, self, &uniform, [&placeholder, &placeholder], &no_velocity)
                })?;
                self.constraints_group.get_or_init(|| group).clone()
            }
        };
        record(ctx, self, &group, false)?;
        self.weights_replaced();
        Ok(())
    }

    /// The regularizers' penalty on the current gamma and beta (Keras's
    /// `layer.losses`), read back from the GPU (never blocks; see
    /// [`crate::Tensor::read_f32_async`]).
    pub async fn regularization_loss_async(&self) -> Result<f32> {
        Ok(self.penalty(&self.named_weights_async().await?))
    }

    /// Blocking form of [`BatchNorm::regularization_loss_async`] (not on the web).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn regularization_loss(&self) -> Result<f32> {
        Ok(self.penalty(&self.named_weights()?))
    }

    fn penalty(&self, weights: &[(crate::StateSlot, Vec<f32>)]) -> f32 {
        let cfg = self.config();
        let mut loss = 0.0f64;
        for (slot, values) in weights {
            let regularizer = match slot {
                crate::StateSlot::Gamma => cfg.gamma_regularizer,
                crate::StateSlot::Beta => cfg.beta_regularizer,
                _ => None,
            };
            if let Some(r) = regularizer {
                loss += r.loss(values);
            }
        }
        loss as f32
    }
}
