//! The layer: its state on the GPU and the forward pass.

use std::sync::Mutex;

use crate::config::{BatchNormConfig, ChannelView};
use crate::context::GpuContext;
use crate::error::{ConfigError, Error, Result};
use crate::kernels::{self, Kernel, KernelKey, PARAMS_SLOT, Params};
use crate::plan::DispatchPlan;
use crate::tensor::{Mask, Tensor, read_buffer};

/// One per-channel state tensor, in Keras's build order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSlot {
    Gamma,
    Beta,
    MovingMean,
    MovingVariance,
    MovingStddev,
    RenormMean,
    RenormStddev,
}

impl StateSlot {
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

    pub fn from_keras_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.keras_name() == name)
    }

    /// Section of the layer's state buffer (matches `shaders/finalize.wgsl`).
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Whether a layer with `config` has this weight.
    pub fn present(self, config: &BatchNormConfig) -> bool {
        match self {
            StateSlot::Gamma => config.scale,
            StateSlot::Beta => config.center,
            StateSlot::MovingMean | StateSlot::MovingVariance => true,
            StateSlot::MovingStddev | StateSlot::RenormMean | StateSlot::RenormStddev => {
                config.renorm
            }
        }
    }
}

/// Keras's `BatchNormalization` on the GPU.
///
/// The layer owns its weights (gamma, beta, the moving statistics and the
/// renorm state) in one GPU buffer; training calls update them on the GPU
/// without any readback. Calls on one layer are serialised internally, so
/// `&self` suffices and the layer can be shared between threads.
pub struct BatchNorm {
    ctx: GpuContext,
    config: BatchNormConfig,
    channels: usize,
    /// [gamma | beta | moving_mean | moving_variance | moving_stddev | renorm_mean | renorm_stddev]
    state: wgpu::Buffer,
    /// Per channel (shift, scale, offset, 0) for the normalise pass.
    affine: wgpu::Buffer,
    /// Per channel (shift, mean - shift, inverse std, r) kept for backward.
    saved: wgpu::Buffer,
    scratch: Mutex<Scratch>,
}

/// Buffers that grow with the input and are reused across calls.
struct Scratch {
    params: wgpu::Buffer,
    partials: wgpu::Buffer,
}

fn storage_buffer(
    ctx: &GpuContext,
    label: &str,
    size: u64,
    extra: wgpu::BufferUsages,
) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.max(16),
        usage: wgpu::BufferUsages::STORAGE | extra,
        mapped_at_creation: false,
    })
}

impl BatchNorm {
    /// Builds the layer for inputs with `channels` features on the config's
    /// axis, initialising every weight with its initializer.
    pub fn new(ctx: &GpuContext, config: BatchNormConfig, channels: usize) -> Result<Self> {
        config.validate()?;
        if channels == 0 {
            return Err(ConfigError::NoChannels.into());
        }
        let c = channels as u64;
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let layer = BatchNorm {
            ctx: ctx.clone(),
            channels,
            state: storage_buffer(ctx, "state", 7 * c * 4, copy),
            affine: storage_buffer(ctx, "affine", c * 16, copy),
            saved: storage_buffer(ctx, "saved statistics", c * 16, copy),
            scratch: Mutex::new(Scratch {
                params: ctx.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: PARAMS_SLOT,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                partials: storage_buffer(ctx, "partials", c * 16, wgpu::BufferUsages::empty()),
            }),
            config,
        };
        let mut initial = vec![0f32; 7 * channels];
        let init = &layer.config;
        let std_init = init.moving_variance_initializer.value().sqrt();
        for slot in StateSlot::ALL {
            let value = match slot {
                StateSlot::Gamma => init.gamma_initializer.value(),
                StateSlot::Beta => init.beta_initializer.value(),
                StateSlot::MovingMean | StateSlot::RenormMean => {
                    init.moving_mean_initializer.value()
                }
                StateSlot::MovingVariance => init.moving_variance_initializer.value(),
                StateSlot::MovingStddev | StateSlot::RenormStddev => std_init,
            };
            initial[slot.index() * channels..][..channels].fill(value);
        }
        ctx.queue()
            .write_buffer(&layer.state, 0, bytemuck::cast_slice(&initial));
        Ok(layer)
    }

    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The weights this layer has, in Keras's `get_weights()` order.
    pub fn weight_slots(&self) -> Vec<StateSlot> {
        StateSlot::ALL
            .into_iter()
            .filter(|s| s.present(&self.config))
            .collect()
    }

    /// Reads every weight back, in Keras order, with its name.
    pub fn named_weights(&self) -> Result<Vec<(StateSlot, Vec<f32>)>> {
        let bytes = pollster::block_on(read_buffer(
            &self.ctx,
            &self.state,
            7 * self.channels as u64 * 4,
        ))?;
        let all: &[f32] = bytemuck::cast_slice(&bytes);
        Ok(self
            .weight_slots()
            .into_iter()
            .map(|s| {
                (
                    s,
                    all[s.index() * self.channels..][..self.channels].to_vec(),
                )
            })
            .collect())
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
                slots
                    .iter()
                    .map(|s| s.keras_name())
                    .collect::<Vec<_>>()
                    .join(", "),
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

    fn write_weight(&self, slot: StateSlot, values: &[f32]) {
        let offset = (slot.index() * self.channels * 4) as u64;
        self.ctx
            .queue()
            .write_buffer(&self.state, offset, bytemuck::cast_slice(values));
    }

    /// The forward pass, as Keras's `layer(x, training=..., mask=...)`.
    ///
    /// `training: None` is inference, as in Keras; with `trainable = false`
    /// every call is inference and changes nothing. In training the batch
    /// statistics normalise `x` and update the moving statistics on the GPU.
    /// The mask (input shape without its last axis) selects the positions
    /// that enter the batch statistics; every position is normalised.
    /// Everything is recorded into one command buffer and submitted once.
    pub fn forward(
        &self,
        x: &Tensor,
        training: Option<bool>,
        mask: Option<&Mask>,
    ) -> Result<Tensor> {
        let axis = self.config.resolve_axis(x.shape().len())?;
        let view = ChannelView::new(x.shape(), axis);
        if view.channels != self.channels {
            return Err(Error::Shape(format!(
                "input shape {:?} has {} features on axis {}, the layer was built for {}",
                x.shape(),
                view.channels,
                self.config.axis,
                self.channels
            )));
        }
        if let Some(mask) = mask {
            let expected = &x.shape()[..x.shape().len() - 1];
            if mask.shape() != expected {
                return Err(Error::Shape(format!(
                    "the mask should be the input shape without its last axis: expected {expected:?}, got {:?}",
                    mask.shape()
                )));
            }
        }
        let batch_statistics = training == Some(true) && self.config.trainable;
        let plan = DispatchPlan::new(
            view,
            x.dtype(),
            self.ctx.max_binding_size(),
            self.ctx.storage_alignment(),
        )?;
        let masked = batch_statistics && mask.is_some();
        let y = Tensor::uninit(&self.ctx, x.shape(), x.dtype())?;

        let device = self.ctx.device();
        let kernels = &self.ctx.inner.kernels;
        let key = |kernel| KernelKey {
            kernel,
            dtype: x.dtype(),
            masked,
        };
        let stats_pipeline =
            batch_statistics.then(|| kernels.pipeline(device, key(Kernel::PartialStats)));
        let finalize_pipeline = kernels.pipeline(device, key(Kernel::Finalize));
        let normalize_pipeline = kernels.pipeline(device, key(Kernel::Normalize));

        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let params = self.params_for(&plan, x.shape(), masked, batch_statistics);
        scratch.reserve(
            &self.ctx,
            params.len(),
            (self.channels * plan.total_tiles * 16) as u64,
        );
        let mut slots = vec![0u8; params.len() * PARAMS_SLOT as usize];
        for (i, p) in params.iter().enumerate() {
            slots[i * PARAMS_SLOT as usize..][..std::mem::size_of::<Params>()]
                .copy_from_slice(bytemuck::bytes_of(p));
        }
        self.ctx.queue().write_buffer(&scratch.params, 0, &slots);

        let uniform = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &scratch.params,
            offset: 0,
            size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
        });
        fn chunk_of<'a>(
            buffer: &'a wgpu::Buffer,
            c: &crate::plan::Chunk,
        ) -> wgpu::BindingResource<'a> {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: c.bind_offset,
                size: wgpu::BufferSize::new(c.bind_size),
            })
        }
        let bind = |kernel: Kernel, resources: Vec<wgpu::BindingResource>| {
            let entries: Vec<_> = std::iter::once(uniform.clone())
                .chain(resources)
                .enumerate()
                .map(|(i, resource)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource,
                })
                .collect();
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.entry_point()),
                layout: kernels.bind_group_layout(kernel),
                entries: &entries,
            })
        };
        let mask_buffer = mask
            .map(|m| &m.buffer)
            .unwrap_or(&self.ctx.inner.placeholder);

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("batchnorm forward"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("batchnorm forward"),
                timestamp_writes: None,
            });
            if let Some(pipeline) = &stats_pipeline {
                pass.set_pipeline(pipeline);
                for (i, chunk) in plan.chunks.iter().enumerate() {
                    let group = bind(
                        Kernel::PartialStats,
                        vec![
                            chunk_of(x.buffer(), chunk),
                            mask_buffer.as_entire_binding(),
                            scratch.partials.as_entire_binding(),
                        ],
                    );
                    pass.set_bind_group(0, &group, &[(i as u64 * PARAMS_SLOT) as u32]);
                    let (gx, gy) = plan.stats_grid(chunk);
                    pass.dispatch_workgroups(gx, gy, 1);
                }
            }
            pass.set_pipeline(&finalize_pipeline);
            let group = bind(
                Kernel::Finalize,
                vec![
                    scratch.partials.as_entire_binding(),
                    self.state.as_entire_binding(),
                    self.affine.as_entire_binding(),
                    self.saved.as_entire_binding(),
                ],
            );
            pass.set_bind_group(0, &group, &[0]);
            let (gx, gy) =
                kernels::grid((self.channels as u32).div_ceil(kernels::FINALIZE_WORKGROUP));
            pass.dispatch_workgroups(gx, gy, 1);

            pass.set_pipeline(&normalize_pipeline);
            for (i, chunk) in plan.chunks.iter().enumerate() {
                let group = bind(
                    Kernel::Normalize,
                    vec![
                        chunk_of(x.buffer(), chunk),
                        self.affine.as_entire_binding(),
                        chunk_of(y.buffer(), chunk),
                    ],
                );
                pass.set_bind_group(0, &group, &[(i as u64 * PARAMS_SLOT) as u32]);
                let (gx, gy) = plan.normalize_grid(chunk);
                pass.dispatch_workgroups(gx, gy, 1);
            }
        }
        self.ctx.queue().submit([encoder.finish()]);
        Ok(y)
    }

    /// One uniform slot per chunk; slot 0 also drives finalize.
    fn params_for(
        &self,
        plan: &DispatchPlan,
        shape: &[usize],
        masked: bool,
        training: bool,
    ) -> Vec<Params> {
        let cfg = &self.config;
        let clip = cfg.renorm_clipping;
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        let flags = flag(masked, kernels::FLAG_MASKED)
            | flag(training, kernels::FLAG_TRAINING)
            | flag(cfg.renorm, kernels::FLAG_RENORM)
            | flag(cfg.center, kernels::FLAG_CENTER)
            | flag(cfg.scale, kernels::FLAG_SCALE)
            | flag(clip.rmin.is_some(), kernels::FLAG_RMIN)
            | flag(clip.rmax.is_some(), kernels::FLAG_RMAX)
            | flag(clip.dmax.is_some(), kernels::FLAG_DMAX);
        let last_dim = *shape.last().unwrap_or(&1);
        let view = plan.view;
        let (finalize_x, _) =
            kernels::grid((self.channels as u32).div_ceil(kernels::FINALIZE_WORKGROUP));
        plan.chunks
            .iter()
            .map(|chunk| Params {
                channels: view.channels as u32,
                inner: view.inner as u32,
                chunk_start: chunk.start as u32,
                x_base: chunk.base,
                y_base: chunk.base,
                last_dim: last_dim as u32,
                _pad2: 0,
                elems_per_thread: plan.elems_per_thread as u32,
                tiles: chunk.tiles as u32,
                tile_offset: chunk.tile_offset as u32,
                total_tiles: plan.total_tiles as u32,
                stats_groups_x: plan.stats_grid(chunk).0,
                norm_groups_x: plan.normalize_grid(chunk).0,
                finalize_groups_x: finalize_x,
                chunk_elems: chunk.elems as u32,
                flags,
                momentum: cfg.momentum,
                epsilon: cfg.epsilon,
                renorm_momentum: cfg.renorm_momentum,
                rmin: clip.rmin.unwrap_or(0.0),
                rmax: clip.rmax.unwrap_or(0.0),
                dmax: clip.dmax.unwrap_or(0.0),
                _pad0: 0,
                _pad1: 0,
            })
            .collect()
    }
}

impl Scratch {
    fn reserve(&mut self, ctx: &GpuContext, slots: usize, partial_bytes: u64) {
        let params_bytes = slots as u64 * PARAMS_SLOT;
        if self.params.size() < params_bytes {
            self.params = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: params_bytes,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
        }
        if self.partials.size() < partial_bytes {
            self.partials =
                storage_buffer(ctx, "partials", partial_bytes, wgpu::BufferUsages::empty());
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
