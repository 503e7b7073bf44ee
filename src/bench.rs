//! The cross-vendor benchmark: the layer's passes against two baselines on
//! the same element count, a buffer copy and the best streaming kernel
//! (y = a * x + b), measured in the same run. Every configuration is checked
//! against the float64 reference before it is timed.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::{BatchNormConfig, ChannelView};
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::keras::error_measure;
use crate::layer::{BatchNorm, Gradients, SavedForward};
use crate::params::{PARAMS_SLOT, Params};
use crate::reference::{ReferenceGradients, ReferenceLayer};
use crate::tensor::Tensor;
use crate::tuning::{self, AdapterKey, PlanTuning, Strategy, TunedEntry, shape_class};
use crate::variants::{Kernel, KernelKey};

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
    let too_large = |limit: &'static str, why: String| Error::too_large(limit, format!("shape {dims:?}: {why}"));
    let overflows = || too_large("addressable elements", "its size in bytes overflows".into());
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
        return Err(too_large(
            "max_buffer_size",
            format!(
                "one {} tensor is {bytes} bytes, above the device's max_buffer_size of {max}",
                dtype_name(dtype)
            ),
        ));
    }
    let host = (len as u64).checked_mul(HOST_BYTES_PER_ELEMENT).ok_or_else(overflows)?;
    if let Some(available) = available_host_memory()
        && host > available
    {
        return Err(too_large(
            "host memory",
            format!(
                "measuring it needs about {:.1} GiB of host memory and {:.1} GiB is available",
                host as f64 / (1u64 << 30) as f64,
                available as f64 / (1u64 << 30) as f64
            ),
        ));
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
        crate_version: crate::VERSION,
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
                        let size = crate::dtype::padded_bytes(self.len, self.dtype);
                        encoder.copy_buffer_to_buffer(x.buffer(), 0, y.buffer(), 0, size);
                        Ok(())
                    }
                    Op::Stream => {
                        let stream = stream.ok_or_else(|| Error::readback("no streaming baseline"))?;
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
        return Err(Error::readback(format!(
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

/// The plans `bench --tune` times for `op` on inputs of `view`: the
/// default plan of [`GpuContext::default_strategy`] first, then the other
/// family's defaults, then the default family with one knob changed at a
/// time (only knobs that `op` and the layout use).
pub fn candidates(ctx: &GpuContext, view: ChannelView, op: tuning::Op) -> Vec<PlanTuning> {
    let strategy = ctx.default_strategy();
    let base = PlanTuning::default_for(strategy);
    let other = match strategy {
        Strategy::Serial => Strategy::Coalesced,
        Strategy::Coalesced => Strategy::Serial,
    };
    let mut plans = vec![base, PlanTuning::default_for(other)];
    let reduces = op != tuning::Op::Inference;
    let channels_last = view.inner == 1;
    let mut vary = |values: &[u32], set: fn(&mut PlanTuning, u32)| {
        for &v in values {
            let mut plan = base;
            set(&mut plan, v);
            if !plans.contains(&plan) {
                plans.push(plan);
            }
        }
    };
    match strategy {
        Strategy::Serial => {
            // channels last, the vec4 kernels (channels a multiple of 4)
            // walk rows_per_thread rows and the others values_per_thread
            // values; only the knob the shape uses is varied
            let quads = channels_last && view.channels.is_multiple_of(4);
            if quads {
                vary(&[4, 8, 16], |p, v| p.rows_per_thread = v);
            } else {
                // the plan keeps each invocation's values within the
                // channels its layout assumes, for any values_per_thread
                vary(&[2, 4, 8], |p, v| p.values_per_thread = v);
            }
            if reduces {
                vary(&[8192, 16384, 32768], |p, v| p.reduce_invocations = v);
            }
            let uniform = PlanTuning {
                uniform_parameters: Some(!ctx.uniform_parameters()),
                ..base
            };
            plans.push(uniform);
        }
        Strategy::Coalesced => {
            vary(&[65536, 262_144, 1_048_576], |p, v| p.elementwise_invocations = v);
            if reduces {
                if channels_last {
                    vary(&[16, 64], |p, v| p.lane_width = v);
                }
                vary(&[131_072, 262_144, 524_288], |p, v| p.reduce_invocations = v);
            }
        }
    }
    plans
}

/// What one candidate plan did in a tuning run.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateResult {
    /// The plan.
    pub tuning: PlanTuning,
    /// Its error against the float64 reference on the tuned call (None
    /// where it did not run).
    pub error: Option<f64>,
    /// Why it may not be chosen: an error above the tolerance, or what
    /// the layer refused. `None` when it passed.
    pub failure: Option<String>,
    /// Median milliseconds (None where it was not timed: a failed
    /// candidate other than the default). For the default and the winner,
    /// over both rounds.
    pub median_ms: Option<f64>,
    /// Every timed run, in milliseconds.
    pub runs_ms: Vec<f64>,
}

/// The tuning of one shape, dtype and call.
#[derive(Debug, Clone, Serialize)]
pub struct TuneResult {
    /// The shape.
    pub shape: BenchShape,
    /// `f32` or `f16`.
    pub dtype: &'static str,
    /// The call.
    pub op: tuning::Op,
    /// Its [`shape_class`].
    pub class: String,
    /// Every candidate, the default first.
    pub candidates: Vec<CandidateResult>,
    /// The fastest candidate that passed; `None` where none did.
    pub chosen: Option<usize>,
    /// The default plan's time over the chosen plan's; `None` where either
    /// was not timed.
    pub speedup: Option<f64>,
}

impl TuneResult {
    /// The chosen plan.
    pub fn chosen_plan(&self) -> Option<&CandidateResult> {
        self.chosen.map(|i| &self.candidates[i])
    }
}

/// Everything one `bench --tune` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    /// The adapter the entries are for.
    pub adapter: AdapterKey,
    /// One per shape, dtype and call, in the bench's order.
    pub results: Vec<TuneResult>,
}

impl TuneReport {
    /// The cache entries: one per tuned (shape class, call), where a
    /// candidate passed and the default was timed. A later result of the
    /// same class and call replaces an earlier one.
    pub fn entries(&self) -> Vec<TunedEntry> {
        let mut cache = tuning::TuningCache::default();
        for r in &self.results {
            if let (Some(c), Some(speedup)) = (r.chosen_plan(), r.speedup) {
                cache.insert(TunedEntry {
                    adapter: self.adapter.clone(),
                    class: r.class.clone(),
                    op: r.op,
                    tuning: c.tuning,
                    speedup,
                });
            }
        }
        cache.entries
    }

    /// Whether any candidate failed its check.
    pub fn any_failed(&self) -> bool {
        self.results
            .iter()
            .any(|r| r.candidates.iter().any(|c| c.failure.is_some()))
    }
}

/// Sets the forced plan back to none when dropped (also on an early return).
struct Unforce<'a>(&'a GpuContext);

impl Drop for Unforce<'_> {
    fn drop(&mut self) {
        let _ = self.0.set_plan_tuning(None);
    }
}

/// How many candidates [`tune`] times for `options` (for a progress bar).
pub fn tune_steps(ctx: &GpuContext, options: &BenchOptions) -> Result<usize> {
    let mut n = 0;
    for shape in &options.shapes {
        let config = BatchNormConfig {
            axis: shape.axis,
            ..Default::default()
        };
        let view = ChannelView::new(&shape.shape, config.resolve_axis(shape.shape.len())?);
        for op in tuning::Op::ALL {
            n += candidates(ctx, view, op).len() * options.dtypes.len();
        }
    }
    Ok(n)
}

/// Times the [`candidates`] of every shape, dtype and call of `options`
/// with [`GpuContext::set_plan_tuning`], after checking each against the
/// float64 reference (a candidate that fails is never chosen), and picks
/// the fastest. Writes nothing: [`TuneReport::entries`] are what the cache
/// takes. The context runs its own plans again afterwards. `progress` is
/// called after each candidate.
pub fn tune(ctx: &GpuContext, options: &BenchOptions, mut progress: impl FnMut(&str)) -> Result<TuneReport> {
    for shape in &options.shapes {
        for &dtype in &options.dtypes {
            check_shape(ctx, shape, dtype)?;
        }
    }
    let _unforce = Unforce(ctx);
    let clock = Clock::new(ctx);
    let mut results = Vec::new();
    for shape in &options.shapes {
        for &dtype in &options.dtypes {
            let setup = Setup::new(ctx, shape, dtype)?;
            for op in tuning::Op::ALL {
                let (bench_op, tol) = match op {
                    tuning::Op::Training => (Op::TrainForward, crate::keras::tolerance(dtype, false)),
                    tuning::Op::Inference => (Op::InferenceForward, crate::keras::tolerance(dtype, false)),
                    // gradients get the bench's (and conform's) gradient tolerance
                    tuning::Op::Backward => (Op::Backward, crate::keras::tolerance(dtype, true)),
                };
                let mut tried = Vec::new();
                for (i, plan) in candidates(ctx, setup.view, op).into_iter().enumerate() {
                    tried.push(try_candidate(
                        ctx,
                        &clock,
                        options,
                        &setup,
                        plan,
                        bench_op,
                        tol,
                        i == 0,
                    )?);
                    progress(&format!("{} {} {}", setup.label, op.name(), plan.describe()));
                }
                let fastest = |tried: &[CandidateResult]| {
                    tried
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.failure.is_none())
                        .filter_map(|(i, c)| c.median_ms.map(|ms| (i, ms)))
                        .min_by(|a, b| a.1.total_cmp(&b.1))
                        .map(|(i, _)| i)
                };
                let mut chosen = fastest(&tried);
                // a second round for the default and the winner, pooled with
                // the first: one noisy round should not pick a plan
                if let Some(best) = chosen.filter(|&i| i > 0 && tried[0].median_ms.is_some()) {
                    for i in [0, best] {
                        let again = try_candidate(ctx, &clock, options, &setup, tried[i].tuning, bench_op, tol, true)?;
                        let c = &mut tried[i];
                        c.runs_ms.extend(again.runs_ms);
                        c.median_ms = (!c.runs_ms.is_empty()).then(|| summarize(&c.runs_ms).0);
                        c.failure = c.failure.take().or(again.failure);
                    }
                    let pooled = |i: usize| tried[i].median_ms.filter(|_| tried[i].failure.is_none());
                    chosen = match (pooled(0), pooled(best)) {
                        (Some(default), Some(ms)) if default <= ms => Some(0),
                        (_, Some(_)) => Some(best),
                        (Some(_), None) => Some(0),
                        (None, None) => None,
                    };
                }
                let speedup = match (tried[0].median_ms, chosen.and_then(|i| tried[i].median_ms)) {
                    (Some(default), Some(best)) if best > 0.0 => Some(default / best),
                    _ => None,
                };
                results.push(TuneResult {
                    shape: shape.clone(),
                    dtype: dtype_name(dtype),
                    op,
                    class: shape_class(setup.view, dtype),
                    candidates: tried,
                    chosen,
                    speedup,
                });
            }
        }
    }
    Ok(TuneReport {
        adapter: AdapterKey::of(&ctx.device().adapter_info()),
        results,
    })
}

/// Checks one candidate on a fresh layer and times it if it passed (the
/// default always, where it ran: it is what the others are measured
/// against). What the layer refuses under this plan is its failure.
#[allow(clippy::too_many_arguments)]
fn try_candidate(
    ctx: &GpuContext,
    clock: &Clock,
    options: &BenchOptions,
    setup: &Setup,
    plan: PlanTuning,
    op: Op,
    tol: f64,
    is_default: bool,
) -> Result<CandidateResult> {
    ctx.set_plan_tuning(Some(plan))?;
    let mut result = CandidateResult {
        tuning: plan,
        error: None,
        failure: None,
        median_ms: None,
        runs_ms: Vec::new(),
    };
    let checked = match setup.check(ctx) {
        Ok(c) => c,
        Err(e) => {
            result.failure = Some(e.to_string());
            return Ok(result);
        }
    };
    let error = match op {
        Op::TrainForward => checked.errors.train,
        Op::InferenceForward => checked.errors.inference,
        _ => checked.errors.backward,
    };
    result.error = Some(error);
    let passed = error <= tol; // NaN fails too
    if !passed {
        result.failure = Some(format!("error {error:.2e} above the tolerance {tol:.0e}"));
        if !is_default {
            return Ok(result);
        }
    }
    match setup.time(ctx, clock, options, &checked, None, op) {
        Ok(times) if !times.is_empty() => {
            result.median_ms = Some(summarize(&times).0);
            result.runs_ms = times;
        }
        Ok(_) => result.failure = Some("no timed runs".into()),
        Err(e) => result.failure = Some(e.to_string()),
    }
    Ok(result)
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
        .map_err(|_| Error::readback("the timestamp readback was dropped"))?
        .map_err(|e| Error::readback(format!("timestamp readback: {e}")))?;
    let ticks = {
        let mapped = slice
            .get_mapped_range()
            .map_err(|e| Error::readback(format!("timestamp readback: {e}")))?;
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
