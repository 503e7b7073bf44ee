//! The cross-vendor benchmark: the layer's passes against two baselines on
//! the same element count, a buffer copy and the best streaming kernel
//! (y = a * x + b), measured in the same run. Every configuration is checked
//! against the float64 reference before it is timed.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::{BatchNormConfig, ChannelView};
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::keras::error_measure;
use crate::kernels::{self, Kernel, KernelKey, PARAMS_SLOT, Params};
use crate::layer::{BatchNorm, Gradients, SavedForward};
use crate::reference::{ReferenceGradients, ReferenceLayer};
use crate::tensor::{DType, Tensor};
use crate::tuning::{self, Strategy};

/// One benchmarked input: a shape and its feature axis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BenchShape {
    /// The input shape.
    pub shape: Vec<usize>,
    /// The feature axis (negative counts from the end).
    pub axis: i64,
}

/// The default shapes: NHWC and NCHW activations, a dense layer, a late
/// small feature map, and one large image.
pub fn default_shapes() -> Vec<BenchShape> {
    [
        (vec![32, 56, 56, 64], -1),
        (vec![32, 64, 56, 56], 1),
        (vec![4096, 1024], -1),
        (vec![8, 512, 7, 7], 1),
        (vec![1, 3, 1024, 1024], 1),
    ]
    .into_iter()
    .map(|(shape, axis)| BenchShape { shape, axis })
    .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
/// What one figure measures.
pub enum Op {
    /// A training forward call (statistics, moving update, normalise).
    TrainForward,
    /// An inference forward call.
    InferenceForward,
    /// A backward call (dx, dgamma, dbeta) after an untimed training forward.
    Backward,
    /// The copy baseline: `copy_buffer_to_buffer` of the tensor.
    Copy,
    /// The streaming baseline: y = a * x + b over the tensor.
    Stream,
}

impl Op {
    /// Every operation, baselines first.
    pub const ALL: [Op; 5] = [
        Op::Copy,
        Op::Stream,
        Op::TrainForward,
        Op::InferenceForward,
        Op::Backward,
    ];

    /// Passes over the tensor a perfect implementation makes.
    pub fn passes(self) -> u64 {
        match self {
            Op::TrainForward => 3,
            Op::InferenceForward | Op::Copy | Op::Stream => 2,
            Op::Backward => 5,
        }
    }

    /// The layer call a tuned plan is for; `None` for the baselines.
    pub fn tuning_op(self) -> Option<tuning::Op> {
        match self {
            Op::TrainForward => Some(tuning::Op::Training),
            Op::InferenceForward => Some(tuning::Op::Inference),
            Op::Backward => Some(tuning::Op::Backward),
            Op::Copy | Op::Stream => None,
        }
    }

    /// The name used in the JSON and the table.
    pub fn name(self) -> &'static str {
        match self {
            Op::TrainForward => "train_forward",
            Op::InferenceForward => "inference_forward",
            Op::Backward => "backward",
            Op::Copy => "copy",
            Op::Stream => "stream",
        }
    }
}

/// One measured figure, in the JSON schema other tools read.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// The input shape.
    pub shape: Vec<usize>,
    /// The feature axis.
    pub axis: i64,
    /// `f32` or `f16`.
    pub dtype: &'static str,
    /// The operation.
    pub op: Op,
    /// Median milliseconds per run.
    pub median_ms: f64,
    /// Fastest run, in milliseconds.
    pub min_ms: f64,
    /// Slowest run, in milliseconds.
    pub max_ms: f64,
    /// Timed runs.
    pub runs: usize,
    /// Bytes a perfect implementation moves (see [`Op::passes`]).
    pub bytes: u64,
    /// `bytes` / median time, in GB/s.
    pub gbps: f64,
    /// Median time over the streaming baseline's of the same shape and dtype.
    pub ratio_to_stream: f64,
    /// Conformance error against the float64 reference (None for baselines).
    pub max_error: Option<f64>,
    /// The layer's kernels that ran (None for baselines).
    pub kernels: Option<KernelsUsed>,
}

/// Which kernels a layer figure measured (the JSON's `kernels`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelsUsed {
    /// The kernel family.
    pub strategy: Strategy,
    /// The plan's knobs ([`PlanTuning::describe`]).
    pub plan: String,
    /// Whether the plan came from the tuning cache (`bench --tune`).
    pub tuned: bool,
}

#[derive(Debug, Clone, Serialize)]
/// The adapter a report was measured on.
pub struct AdapterDescription {
    /// Adapter name.
    pub name: String,
    /// Backend (vulkan, gl, metal, dx12).
    pub backend: String,
    /// Device type (DiscreteGpu, Cpu, ...).
    pub device_type: String,
    /// Driver name.
    pub driver: String,
    /// Driver version information.
    pub driver_info: String,
}

#[derive(Debug, Clone, Serialize)]
/// Everything one `bench` run measured, as written by `--json`.
pub struct BenchReport {
    /// The adapter.
    pub adapter: AdapterDescription,
    /// This crate's version.
    pub crate_version: &'static str,
    /// How times were taken: "gpu-timestamps" (timestamp queries written
    /// before and after the operation's commands) where the device has
    /// them, else "host-clock" (submit, then a blocking wait).
    pub timing: &'static str,
    /// One entry per shape, dtype and operation.
    pub results: Vec<BenchResult>,
}

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Shapes to measure.
    pub shapes: Vec<BenchShape>,
    /// Element types to measure.
    pub dtypes: Vec<DType>,
    /// Untimed runs before timing.
    pub warmup: usize,
    /// Timed runs (the median is reported).
    pub runs: usize,
}

/// `f32` or `f16`, as the JSON writes dtypes.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
    }
}

/// The adapter of a context, for reports.
pub fn describe_adapter(ctx: &GpuContext) -> AdapterDescription {
    match ctx.adapter_info() {
        Some(i) => AdapterDescription {
            name: i.name.clone(),
            backend: i.backend.to_string(),
            device_type: format!("{:?}", i.device_type),
            driver: i.driver.clone(),
            driver_info: i.driver_info.clone(),
        },
        None => AdapterDescription {
            name: ctx.describe(),
            backend: String::new(),
            device_type: String::new(),
            driver: String::new(),
            driver_info: String::new(),
        },
    }
}

/// Host bytes per element a measurement holds at its peak: float32 and
/// float64 copies of x and dy, the reference's outputs and readbacks (about
/// 88 measured on lavapipe, whose GPU buffers are host memory too).
const HOST_BYTES_PER_ELEMENT: u64 = 96;

/// Checks that `shape` can be measured as `dtype` on this device before
/// anything is allocated for it: a valid axis, an element count and byte
/// size that do not overflow, one tensor within the device's
/// `max_buffer_size`, and the host memory the measurement needs within what
/// the machine has available (where the OS says: Linux's `MemAvailable`).
pub fn check_shape(ctx: &GpuContext, shape: &BenchShape, dtype: DType) -> Result<()> {
    let config = BatchNormConfig {
        axis: shape.axis,
        ..Default::default()
    };
    config.resolve_axis(shape.shape.len())?;
    let dims = &shape.shape;
    let too_large = |why: String| Error::TooLarge(format!("shape {dims:?}: {why}"));
    let overflows = || too_large("its size in bytes overflows".into());
    let len = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(overflows)?;
    let bytes = len
        .checked_mul(dtype.size())
        .and_then(|b| u64::try_from(b).ok())
        .and_then(|b| b.checked_next_multiple_of(4))
        .ok_or_else(overflows)?;
    let max = ctx.device().limits().max_buffer_size;
    if bytes > max {
        return Err(too_large(format!(
            "one {} tensor is {bytes} bytes, above the device's max_buffer_size of {max}",
            dtype_name(dtype)
        )));
    }
    let host = (len as u64).checked_mul(HOST_BYTES_PER_ELEMENT).ok_or_else(overflows)?;
    if let Some(available) = available_host_memory()
        && host > available
    {
        return Err(too_large(format!(
            "measuring it needs about {:.1} GiB of host memory and {:.1} GiB is available",
            host as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo` in bytes; `None` where there is none.
fn available_host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Runs every (shape, dtype, op) of `options`; `progress` is called after
/// each configuration with a short label. Every shape is checked with
/// [`check_shape`] before anything is measured.
pub fn run(ctx: &GpuContext, options: &BenchOptions, mut progress: impl FnMut(&str)) -> Result<BenchReport> {
    for shape in &options.shapes {
        for &dtype in &options.dtypes {
            check_shape(ctx, shape, dtype)?;
        }
    }
    let clock = Clock::new(ctx);
    let mut results = Vec::new();
    for shape in &options.shapes {
        for &dtype in &options.dtypes {
            let mut figures = measure_shape(ctx, &clock, shape, dtype, options, &mut progress)?;
            let stream = figures
                .iter()
                .find(|r| r.op == Op::Stream)
                .map(|r| r.median_ms)
                .unwrap_or(f64::NAN);
            for f in &mut figures {
                f.ratio_to_stream = f.median_ms / stream;
            }
            results.extend(figures);
        }
    }
    Ok(BenchReport {
        adapter: describe_adapter(ctx),
        crate_version: env!("CARGO_PKG_VERSION"),
        timing: clock.name(),
        results,
    })
}

/// One shape and dtype: its inputs on the GPU and the float64 reference's
/// answers to the calls [`Setup::check`] makes.
struct Setup {
    config: BatchNormConfig,
    channels: usize,
    view: ChannelView,
    dtype: DType,
    len: usize,
    label: String,
    x: Tensor,
    dy: Tensor,
    y: Tensor,
    /// A training forward, its backward, then an inference call.
    train_y: Vec<f64>,
    grads: ReferenceGradients,
    inference_y: Vec<f64>,
}

/// The errors of one layer's check, by call.
struct Errors {
    train: f64,
    inference: f64,
    backward: f64,
}

impl Setup {
    fn new(ctx: &GpuContext, bench: &BenchShape, dtype: DType) -> Result<Self> {
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
            label: format!("{:?} axis {} {}", bench.shape, bench.axis, dtype_name(dtype)),
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
    /// errors against the reference.
    fn check(&self, ctx: &GpuContext) -> Result<Checked> {
        let layer = BatchNorm::new(ctx, self.config.clone(), self.channels)?;
        let grads = layer.gradient_tensors(&self.dy)?;
        let read = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.read_f32(ctx)?.into_iter().map(f64::from).collect()) };
        let saved = layer.forward_into(&self.x, Some(true), None, &self.y)?;
        let train = error_measure(&read(&self.y)?, &self.train_y);
        layer.backward_into(&saved, &self.dy, false, &grads)?;
        let want = &self.grads;
        let mut backward = error_measure(&read(&grads.dx)?, &want.dx);
        if let (Some(g), Some(w)) = (&grads.dgamma, &want.dgamma) {
            backward = backward.max(error_measure(&read(g)?, w));
        }
        if let (Some(g), Some(w)) = (&grads.dbeta, &want.dbeta) {
            backward = backward.max(error_measure(&read(g)?, w));
        }
        layer.forward_into(&self.x, None, None, &self.y)?;
        let inference = error_measure(&read(&self.y)?, &self.inference_y);
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

    /// Milliseconds per run of `op` on a checked layer.
    fn time(
        &self,
        ctx: &GpuContext,
        clock: &Clock,
        options: &BenchOptions,
        checked: &Checked,
        stream: Option<&StreamBaseline>,
        op: Op,
    ) -> Result<Vec<f64>> {
        let (x, y, dy) = (&self.x, &self.y, &self.dy);
        let Checked {
            layer, grads, saved, ..
        } = checked;
        match op {
            // after an untimed training forward each time (backward uses its statistics)
            Op::Backward => {
                let saved = std::cell::RefCell::new(saved.clone());
                clock.time(
                    ctx,
                    options,
                    || {
                        *saved.borrow_mut() = layer.forward_into(x, Some(true), None, y)?;
                        Ok(())
                    },
                    |encoder| layer.record_backward(encoder, &saved.borrow(), dy, false, grads),
                )
            }
            _ => clock.time(
                ctx,
                options,
                || Ok(()),
                |encoder| match op {
                    Op::Copy => {
                        let size = crate::tensor::padded_bytes(self.len, self.dtype);
                        encoder.copy_buffer_to_buffer(x.buffer(), 0, y.buffer(), 0, size);
                        Ok(())
                    }
                    Op::Stream => {
                        let stream = stream.ok_or_else(|| Error::Readback("no streaming baseline".into()))?;
                        stream.record(encoder);
                        Ok(())
                    }
                    Op::InferenceForward => layer.record_forward(encoder, x, None, None, y).map(drop),
                    _ => layer.record_forward(encoder, x, Some(true), None, y).map(drop),
                },
            ),
        }
    }
}

/// A layer that ran [`Setup::check`]: what timing it needs, and its errors.
struct Checked {
    layer: BatchNorm,
    grads: Gradients,
    /// The checked training call's statistics (what backward reads).
    saved: SavedForward,
    errors: Errors,
}

fn measure_shape(
    ctx: &GpuContext,
    clock: &Clock,
    bench: &BenchShape,
    dtype: DType,
    options: &BenchOptions,
    progress: &mut impl FnMut(&str),
) -> Result<Vec<BenchResult>> {
    let setup = Setup::new(ctx, bench, dtype)?;
    let label = &setup.label;
    // correctness first: one training call and its backward, one inference call
    let checked = setup.check(ctx)?;
    let errors = &checked.errors;
    let tol = crate::keras::tolerance(dtype, false);
    let grad_tol = crate::keras::tolerance(dtype, true);
    if !(errors.train <= tol && errors.inference <= tol && errors.backward <= grad_tol) {
        return Err(Error::Readback(format!(
            "{label}: the GPU disagrees with the float64 reference (train {:.2e}, \
             inference {:.2e}, backward {:.2e}); not timing it",
            errors.train, errors.inference, errors.backward
        )));
    }

    let stream = StreamBaseline::new(ctx, &setup.x, &setup.y)?;
    let bytes = (setup.len * dtype.size()) as u64;
    let mut figures = Vec::new();
    for op in Op::ALL {
        let times = setup.time(ctx, clock, options, &checked, Some(&stream), op)?;
        let (median, min, max) = summarize(&times);
        let total = bytes * op.passes();
        let kernels = op.tuning_op().map(|t| {
            let plan = ctx.plan_tuning(setup.view, dtype, t);
            KernelsUsed {
                strategy: plan.strategy,
                plan: plan.describe(),
                tuned: ctx.tuned_plan(setup.view, dtype, t).is_some(),
            }
        });
        figures.push(BenchResult {
            shape: bench.shape.clone(),
            axis: bench.axis,
            dtype: dtype_name(dtype),
            op,
            median_ms: median,
            min_ms: min,
            max_ms: max,
            runs: times.len(),
            bytes: total,
            gbps: total as f64 / (median * 1e-3) / 1e9,
            ratio_to_stream: f64::NAN,
            max_error: match op {
                Op::TrainForward => Some(errors.train),
                Op::InferenceForward => Some(errors.inference),
                Op::Backward => Some(errors.backward),
                Op::Copy | Op::Stream => None,
            },
            kernels,
        });
        progress(&format!("{label} {}", op.name()));
    }
    Ok(figures)
}

/// How one run is timed: GPU timestamp queries around the operation's
/// commands where the device has them (no submission or wait overhead),
/// else the host clock from submission to the end of a blocking wait.
enum Clock {
    Gpu {
        queries: wgpu::QuerySet,
        resolved: wgpu::Buffer,
        readback: wgpu::Buffer,
        /// Nanoseconds per timestamp tick.
        period: f64,
    },
    Host,
}

impl Clock {
    fn new(ctx: &GpuContext) -> Self {
        let device = ctx.device();
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Clock::Host;
        }
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Clock::Gpu {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolved: buffer(
                "resolved timestamps",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            readback: buffer(
                "timestamp readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
            period: ctx.queue().get_timestamp_period() as f64,
        }
    }

    /// The JSON's `timing` value.
    fn name(&self) -> &'static str {
        match self {
            Clock::Gpu { .. } => "gpu-timestamps",
            Clock::Host => "host-clock",
        }
    }

    /// Milliseconds per run of `record` (one submission each), after
    /// `setup` (untimed) before every run.
    fn time(
        &self,
        ctx: &GpuContext,
        options: &BenchOptions,
        mut setup: impl FnMut() -> Result<()>,
        mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(options.runs);
        for i in 0..options.warmup + options.runs {
            setup()?;
            ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
            let start = Instant::now();
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            self.mark(&mut encoder, 0);
            record(&mut encoder)?;
            self.mark(&mut encoder, 1);
            if let Clock::Gpu {
                queries,
                resolved,
                readback,
                ..
            } = self
            {
                encoder.resolve_query_set(queries, 0..2, resolved, 0);
                encoder.copy_buffer_to_buffer(resolved, 0, readback, 0, 16);
            }
            ctx.queue().submit([encoder.finish()]);
            ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
            let ms = match self {
                Clock::Host => start.elapsed().as_secs_f64() * 1e3,
                Clock::Gpu { readback, period, .. } => {
                    let ticks = read_timestamps(ctx, readback)?;
                    ticks[1].saturating_sub(ticks[0]) as f64 * period / 1e6
                }
            };
            if i >= options.warmup {
                times.push(ms);
            }
        }
        Ok(times)
    }

    /// An empty compute pass that writes timestamp `index` (0 at its start,
    /// 1 at its end), bracketing the commands recorded between the two.
    fn mark(&self, encoder: &mut wgpu::CommandEncoder, index: u32) {
        if let Clock::Gpu { queries, .. } = self {
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench timestamp"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: queries,
                    beginning_of_pass_write_index: (index == 0).then_some(0),
                    end_of_pass_write_index: (index == 1).then_some(1),
                }),
            });
        }
    }
}

fn read_timestamps(ctx: &GpuContext, readback: &wgpu::Buffer) -> Result<[u64; 2]> {
    let slice = readback.slice(..);
    let (sender, receiver) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |result| {
        let _ = sender.send(result);
    });
    ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
    receiver
        .recv()
        .map_err(|_| Error::Readback("the timestamp readback was dropped".into()))?
        .map_err(|e| Error::Readback(format!("timestamp readback: {e}")))?;
    let ticks = {
        let mapped = slice
            .get_mapped_range()
            .map_err(|e| Error::Readback(format!("timestamp readback: {e}")))?;
        let words: &[u64] = bytemuck::cast_slice(&mapped);
        [words[0], words[1]]
    };
    readback.unmap();
    Ok(ticks)
}

fn summarize(times: &[f64]) -> (f64, f64, f64) {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

/// The streaming kernel y = a * x + b on buffers of the tensor's size,
/// bound in chunks like the layer's own inputs.
struct StreamBaseline {
    pipeline: wgpu::ComputePipeline,
    groups: Vec<(wgpu::BindGroup, (u32, u32))>,
}

impl StreamBaseline {
    /// Streams the benchmarked tensor's own buffers (same memory, same
    /// size): whole 16-byte vectors, the odd tail left out.
    fn new(ctx: &GpuContext, x_tensor: &Tensor, y_tensor: &Tensor) -> Result<Self> {
        let device = ctx.device();
        let dtype = x_tensor.dtype();
        let (x, y) = (x_tensor.buffer(), y_tensor.buffer());
        let vecs = (x_tensor.len() * dtype.size()) as u64 / 16;
        // whole 256-byte blocks per chunk keep every binding offset aligned
        let chunk_vecs = ((ctx.max_binding_size() - 256) / 256 * 16).max(16);
        let kernels = &ctx.inner.kernels;
        let pipeline = kernels.pipeline(device, KernelKey::new(Kernel::Stream, dtype, false));
        let mut groups = Vec::new();
        let mut start = 0;
        while start < vecs {
            let count = chunk_vecs.min(vecs - start);
            let threads = count.div_ceil(4);
            let grid = kernels::grid(
                threads.div_ceil(u64::from(kernels::WORKGROUP)),
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
                layout: kernels.bind_group_layout(Kernel::Stream),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &uniform,
                            offset: 0,
                            size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
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
