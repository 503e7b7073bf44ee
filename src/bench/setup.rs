//! One shape and dtype of a run: its inputs, the float64 reference's
//! answers, a layer checked against them, and one timed round of the
//! layer's calls and the baselines (the streaming kernel is here).

use rand::{Rng, SeedableRng};

use super::clock::{Clock, work_done};
use super::{BenchShape, Op, dtype_name};
use crate::config::{BatchNormConfig, ChannelView};
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::keras::error_measure;
use crate::layer::{BatchNorm, Gradients, SavedForward};
use crate::params::{PARAMS_SLOT, Params};
use crate::reference::{ReferenceGradients, ReferenceLayer};
use crate::tensor::Tensor;
use crate::variants::{Kernel, KernelKey};

/// `[32, 56, 56, 64] axis -1 f32`: one shape and dtype of a run.
pub(super) fn case_label(bench: &BenchShape, dtype: DType) -> String {
    format!("{:?} axis {} {}", bench.shape, bench.axis, dtype_name(dtype))
}

/// One shape and dtype: its inputs on the GPU and the float64 reference's
/// answers to the calls [`Setup::check`] makes.
pub(super) struct Setup {
    config: BatchNormConfig,
    channels: usize,
    pub(super) view: ChannelView,
    pub(super) dtype: DType,
    pub(super) len: usize,
    pub(super) label: String,
    pub(super) x: Tensor,
    dy: Tensor,
    pub(super) y: Tensor,
    /// A training forward, its backward, then an inference call.
    train_y: Vec<f64>,
    grads: ReferenceGradients,
    inference_y: Vec<f64>,
}

/// The errors of one layer's check, by call.
pub(super) struct Errors {
    pub(super) train: f64,
    pub(super) inference: f64,
    pub(super) backward: f64,
}

/// A tensor's values as float64, read back without blocking.
async fn read64(ctx: &GpuContext, t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.read_f32_async(ctx).await?.into_iter().map(f64::from).collect())
}

impl Setup {
    pub(super) fn new(ctx: &GpuContext, bench: &BenchShape, dtype: DType) -> Result<Self> {
        let config = BatchNormConfig {
            axis: bench.axis,
            ..Default::default()
        };
        let axis = config.resolve_axis(bench.shape.len())?;
        let channels = bench.shape[axis];
        let len: usize = bench.shape.iter().product();
        let mut rng = rand::rngs::StdRng::seed_from_u64(len as u64);
        let round = |v: f32| match dtype {
            DType::F32 => v,
            DType::F16 => half::f16::from_f32(v).to_f32(),
        };
        let x32: Vec<f32> = (0..len).map(|_| round(3.0 + rng.random::<f32>() * 4.0)).collect();
        let dy32: Vec<f32> = (0..len).map(|_| round(rng.random::<f32>() - 0.25)).collect();
        let x = Tensor::from_f32_as(ctx, &bench.shape, &x32, dtype)?;
        let dy = Tensor::from_f32_as(ctx, &bench.shape, &dy32, dtype)?;
        let y = Tensor::uninit(ctx, &bench.shape, dtype)?;
        let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let dy64: Vec<f64> = dy32.iter().map(|&v| v as f64).collect();
        drop((x32, dy32));
        let mut reference = ReferenceLayer::new(config.clone(), channels)?;
        let train_y = reference.forward(&x64, &bench.shape, Some(true), None)?;
        let grads = reference.backward(&dy64, false)?;
        let inference_y = reference.forward(&x64, &bench.shape, None, None)?;
        Ok(Setup {
            label: case_label(bench, dtype),
            config,
            channels,
            view: ChannelView::new(&bench.shape, axis),
            dtype,
            len,
            x,
            dy,
            y,
            train_y,
            grads,
            inference_y,
        })
    }

    /// A fresh layer run as the reference ran (training forward, its
    /// backward, inference) with the context's current plans, and its
    /// errors against the reference (read back without blocking).
    pub(super) async fn check(&self, ctx: &GpuContext) -> Result<Checked> {
        let layer = BatchNorm::new(ctx, self.config.clone(), self.channels)?;
        let grads = layer.gradient_tensors(&self.dy)?;
        let saved = layer.forward_into(&self.x, Some(true), None, &self.y)?;
        let train = error_measure(&read64(ctx, &self.y).await?, &self.train_y);
        layer.backward_into(&saved, &self.dy, false, &grads)?;
        let want = &self.grads;
        let mut backward = error_measure(&read64(ctx, &grads.dx).await?, &want.dx);
        if let (Some(g), Some(w)) = (&grads.dgamma, &want.dgamma) {
            backward = backward.max(error_measure(&read64(ctx, g).await?, w));
        }
        if let (Some(g), Some(w)) = (&grads.dbeta, &want.dbeta) {
            backward = backward.max(error_measure(&read64(ctx, g).await?, w));
        }
        layer.forward_into(&self.x, None, None, &self.y)?;
        let inference = error_measure(&read64(ctx, &self.y).await?, &self.inference_y);
        Ok(Checked {
            layer,
            grads,
            saved,
            errors: Errors {
                train,
                inference,
                backward,
            },
        })
    }

    /// One round: each of `ops` timed once, in turn, on a checked layer,
    /// each submission waited for before the next; milliseconds in the
    /// order of `ops` (at most [`Op::ALL`]'s length). A backward runs
    /// after an untimed training forward (it reads its statistics).
    pub(super) async fn time_round(
        &self,
        ctx: &GpuContext,
        clock: &Clock,
        checked: &mut Checked,
        stream: Option<&StreamBaseline>,
        ops: &[Op],
    ) -> Result<Vec<f64>> {
        let (x, y, dy) = (&self.x, &self.y, &self.dy);
        let mut host = Vec::with_capacity(ops.len());
        for (slot, &op) in ops.iter().enumerate() {
            if op == Op::Backward {
                checked.saved = checked.layer.forward_into(x, Some(true), None, y)?;
                work_done(ctx).await?;
            }
            let Checked {
                layer, grads, saved, ..
            } = &*checked;
            let ms = clock
                .submit(ctx, slot as u32, |encoder| match op {
                    Op::Copy => {
                        let size = crate::dtype::padded_bytes(self.len, self.dtype);
                        encoder.copy_buffer_to_buffer(x.buffer(), 0, y.buffer(), 0, size);
                        Ok(())
                    }
                    Op::Stream => {
                        let stream = stream.ok_or_else(|| Error::readback("no streaming baseline"))?;
                        stream.record(encoder);
                        Ok(())
                    }
                    // as forward_into would: no statistics buffer of the call's own
                    Op::InferenceForward => layer.record_forward_pooled(encoder, x, None, y).map(drop),
                    Op::TrainForward => layer.record_forward_pooled(encoder, x, Some(true), y).map(drop),
                    Op::Backward => layer.record_backward(encoder, saved, dy, false, grads),
                })
                .await?;
            host.push(ms);
        }
        clock.read(ctx, host).await
    }
}

/// A layer that ran [`Setup::check`]: what timing it needs, and its errors.
pub(super) struct Checked {
    layer: BatchNorm,
    grads: Gradients,
    /// The last training call's statistics (what backward reads).
    saved: SavedForward,
    pub(super) errors: Errors,
}

/// The streaming kernel y = a * x + b on buffers of the tensor's size,
/// bound in chunks like the layer's own inputs.
pub(super) struct StreamBaseline {
    pipeline: wgpu::ComputePipeline,
    groups: Vec<(wgpu::BindGroup, (u32, u32))>,
}

impl StreamBaseline {
    /// Streams the benchmarked tensor's own buffers (same memory, same
    /// size): whole 16-byte vectors, the odd tail left out.
    pub(super) fn new(ctx: &GpuContext, x_tensor: &Tensor, y_tensor: &Tensor) -> Result<Self> {
        let device = ctx.device();
        let dtype = x_tensor.dtype();
        let (x, y) = (x_tensor.buffer(), y_tensor.buffer());
        let vecs = (x_tensor.len() * dtype.size()) as u64 / 16;
        // whole 256-byte blocks per chunk keep every binding offset aligned
        let chunk_vecs = ((ctx.max_binding_size() - 256) / 256 * 16).max(16);
        let kernels = &ctx.inner.kernels;
        let pipeline = kernels.pipeline(ctx.gpu(), KernelKey::new(Kernel::Stream, dtype, false))?;
        let mut groups = Vec::new();
        let mut start = 0;
        while start < vecs {
            let count = chunk_vecs.min(vecs - start);
            let threads = count.div_ceil(4);
            let grid = crate::plan::grid(
                threads.div_ceil(u64::from(crate::variants::WORKGROUP)),
                ctx.max_workgroups_per_dimension(),
            )?;
            let params = Params {
                chunk_elems: count as u32,
                norm_groups_x: grid.0,
                ..Default::default()
            };
            let mut slot = vec![0u8; PARAMS_SLOT as usize];
            slot[..std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&params));
            use wgpu::util::DeviceExt;
            let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("stream params"),
                contents: &slot,
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let range = |buffer| {
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: start * 16,
                    size: wgpu::BufferSize::new(count * 16),
                })
            };
            let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("stream"),
                layout: kernels.bind_group_layout(Kernel::Stream)?,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &uniform,
                            offset: 0,
                            size: wgpu::BufferSize::new(Kernel::Stream.uniform_size()),
                        }),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: range(x),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: range(y),
                    },
                ],
            });
            groups.push((group, grid));
            start += count;
        }
        Ok(StreamBaseline { pipeline, groups })
    }

    fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        for (group, (gx, gy)) in &self.groups {
            pass.set_bind_group(0, group, &[0]);
            pass.dispatch_workgroups(*gx, *gy, 1);
        }
    }
}
