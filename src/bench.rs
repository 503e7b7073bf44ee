//! The cross-vendor benchmark: the layer's passes against two baselines on
//! the same element count, a buffer copy and the best streaming kernel
//! (y = a * x + b), measured in the same run. Every configuration is checked
//! against the float64 reference before it is timed.
//!
//! One runner for the command-line tool and the browser page:
//! [`run_async`](crate::bench::run_async) never blocks (readbacks and the
//! queue's work-done callback are awaited; natively a helper thread drives
//! the device, as the library's other async forms do), and `run` (native
//! only) blocks on it. The baselines and the layer's calls are timed in
//! interleaved rounds (copy, stream, training forward, inference, backward
//! once each, in turn), so a machine that slows down for a while slows
//! every figure of the same rounds alike, and each figure comes with its
//! spread ([`Spread`](crate::bench::Spread)).
//! The drawing of a run and of several runs side by side is in
//! [`plot`](crate::bench::plot).

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{BatchNormConfig, ChannelView};
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::keras::error_measure;
use crate::layer::{BatchNorm, Gradients, SavedForward};
use crate::params::{PARAMS_SLOT, Params};
use crate::reference::{ReferenceGradients, ReferenceLayer};
use crate::tensor::{Tensor, Wait};
use crate::tuning::{self, AdapterKey, PlanTuning, Strategy, TunedEntry, shape_class};
use crate::variants::{Kernel, KernelKey};

pub mod plot;

/// The host clock: the browser's `performance.now()` on the web.
#[cfg(not(target_arch = "wasm32"))]
use std::time::Instant;
#[cfg(target_arch = "wasm32")]
use web_time::Instant;

/// One benchmarked input: a shape and its feature axis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// What one figure measures (ordered as the tables list the layer's calls).
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
    /// Every operation, baselines first: the order of a round.
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

    /// Whether this is one of the layer's calls (not a baseline).
    pub fn is_layer(self) -> bool {
        self.tuning_op().is_some()
    }
}

/// A figure whose interquartile range is above this fraction of its median
/// is flagged [`BenchResult::noisy`]: its median is not to be trusted.
pub const NOISY_SPREAD: f64 = 0.2;

/// One measured figure, in the JSON schema other tools read.
///
/// Fields added after the first version (`p25_ms`, `p75_ms`, `noisy`,
/// `runs_ms`, `ratio_p25`, `ratio_p75`) may be missing from older files:
/// they read as NaN (`false` for `noisy`, empty for `runs_ms`). Any float may be `null` (JSON has no NaN or
/// infinity): it reads as NaN.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// The input shape.
    pub shape: Vec<usize>,
    /// The feature axis.
    pub axis: i64,
    /// `f32` or `f16`.
    pub dtype: String,
    /// The operation.
    pub op: Op,
    /// Median milliseconds per run.
    #[serde(deserialize_with = "nan_if_null")]
    pub median_ms: f64,
    /// First quartile of the runs, in milliseconds.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub p25_ms: f64,
    /// Third quartile of the runs, in milliseconds.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub p75_ms: f64,
    /// Fastest run, in milliseconds.
    #[serde(deserialize_with = "nan_if_null")]
    pub min_ms: f64,
    /// Slowest run, in milliseconds.
    #[serde(deserialize_with = "nan_if_null")]
    pub max_ms: f64,
    /// Whether the interquartile range (`p75_ms - p25_ms`) is above
    /// [`NOISY_SPREAD`] of the median: the machine was too busy for this
    /// figure to be trusted.
    #[serde(default)]
    pub noisy: bool,
    /// Timed runs (rounds).
    pub runs: usize,
    /// Every timed run's milliseconds, round by round (the same index is
    /// the same round in every figure of a shape and dtype).
    #[serde(default)]
    pub runs_ms: Vec<f64>,
    /// Bytes a perfect implementation moves (see [`Op::passes`]).
    pub bytes: u64,
    /// `bytes` / median time, in GB/s.
    #[serde(deserialize_with = "nan_if_null")]
    pub gbps: f64,
    /// Time over the streaming baseline's of the same shape and dtype, taken
    /// round by round (both ran in the same round, moments apart): the
    /// median of the rounds' ratios.
    #[serde(deserialize_with = "nan_if_null")]
    pub ratio_to_stream: f64,
    /// First quartile of the rounds' ratios to the stream.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub ratio_p25: f64,
    /// Third quartile of the rounds' ratios to the stream.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub ratio_p75: f64,
    /// Conformance error against the float64 reference (None for baselines).
    #[serde(default)]
    pub max_error: Option<f64>,
    /// The layer's kernels that ran (None for baselines).
    #[serde(default)]
    pub kernels: Option<KernelsUsed>,
}

impl BenchResult {
    /// The spread of the runs: the interquartile range over the median
    /// (NaN where the file had no quartiles).
    pub fn spread(&self) -> f64 {
        (self.p75_ms - self.p25_ms) / self.median_ms
    }
}

fn nan() -> f64 {
    f64::NAN
}

/// A float that JSON may hold as `null` (serde_json writes NaN and the
/// infinities so).
fn nan_if_null<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Which kernels a layer figure measured (the JSON's `kernels`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelsUsed {
    /// The kernel family.
    pub strategy: Strategy,
    /// The plan's knobs ([`PlanTuning::describe`]).
    pub plan: String,
    /// Whether the plan came from the tuning cache (`bench --tune`).
    pub tuned: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// The adapter a report was measured on.
pub struct AdapterDescription {
    /// Adapter name.
    pub name: String,
    /// Backend (vulkan, gl, metal, dx12, browserwebgpu).
    pub backend: String,
    /// Device type (DiscreteGpu, Cpu, ...).
    pub device_type: String,
    /// Driver name.
    pub driver: String,
    /// Driver version information.
    pub driver_info: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// Everything one `bench` run measured, as written by `--json` (and read
/// back by `report`).
pub struct BenchReport {
    /// The adapter.
    pub adapter: AdapterDescription,
    /// The browser the run measured in (its user agent), set by the web
    /// page; `null` natively.
    #[serde(default)]
    pub browser: Option<String>,
    /// This crate's version.
    pub crate_version: String,
    /// How times were taken: "gpu-timestamps" (timestamp queries written
    /// before and after the operation's commands) where the device has
    /// them, else "host-clock" (from submission to the queue's work-done
    /// callback).
    pub timing: String,
    /// One entry per shape, dtype and operation.
    pub results: Vec<BenchResult>,
}

impl BenchReport {
    /// The adapter, its backend and, for a browser's run, the browser:
    /// what a legend names this run by. An adapter without a name (a
    /// browser may not say it) goes by its device type.
    pub fn label(&self) -> String {
        let a = &self.adapter;
        let name = match a.name.trim() {
            "" => format!("unnamed {} adapter", a.device_type),
            name => name.to_string(),
        };
        match &self.browser {
            Some(browser) => format!("{name} ({}, {browser})", a.backend),
            None => format!("{name} ({})", a.backend),
        }
    }
}

impl BenchReport {
    /// The figure of `key`'s shape, axis, dtype and op, where measured.
    pub fn figure(&self, key: &FigureKey) -> Option<&BenchResult> {
        self.results
            .iter()
            .find(|r| r.shape == key.shape && r.axis == key.axis && r.dtype == key.dtype && r.op == key.op)
    }

    /// `key`'s GB/s over this run's copy of the same shape and dtype: the
    /// fraction of the adapter's own bandwidth, what compares across
    /// adapters. `None` where either was not measured.
    pub fn fraction_of_copy(&self, key: &FigureKey) -> Option<f64> {
        let gbps = self.figure(key)?.gbps;
        let copy = self
            .figure(&FigureKey {
                op: Op::Copy,
                ..key.clone()
            })?
            .gbps;
        (copy > 0.0).then(|| gbps / copy)
    }
}

/// A figure's place in runs compared side by side: shape, axis, dtype, op.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FigureKey {
    /// The input shape.
    pub shape: Vec<usize>,
    /// The feature axis.
    pub axis: i64,
    /// `f32` or `f16`.
    pub dtype: String,
    /// The operation.
    pub op: Op,
}

impl FigureKey {
    /// The key of a figure.
    pub fn of(r: &BenchResult) -> FigureKey {
        FigureKey {
            shape: r.shape.clone(),
            axis: r.axis,
            dtype: r.dtype.clone(),
            op: r.op,
        }
    }

    /// `32x56x56x64 axis -1 f32`: shape, axis and dtype.
    pub fn case(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(usize::to_string).collect();
        format!("{} axis {} {}", shape.join("x"), self.axis, self.dtype)
    }
}

/// Every layer figure (training forward, inference, backward) any of
/// `reports` measured, once each, ordered by shape, axis, dtype and call.
pub fn layer_rows(reports: &[&BenchReport]) -> Vec<FigureKey> {
    let mut keys: Vec<FigureKey> = reports
        .iter()
        .flat_map(|r| &r.results)
        .filter(|r| r.op.is_layer())
        .map(FigureKey::of)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Shapes to measure.
    pub shapes: Vec<BenchShape>,
    /// Element types to measure.
    pub dtypes: Vec<DType>,
    /// Untimed rounds before timing.
    pub warmup: usize,
    /// Timed rounds (the median is reported).
    pub runs: usize,
}

/// Where a benchmark run is, for a progress bar: what is being measured
/// and how many of the run's steps are done. A step is one shape and
/// dtype's check against the reference, or one round (warm-up or timed).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Progress {
    /// The shape, axis and dtype being measured, e.g. `[8, 512, 7, 7] axis
    /// 1 f32` (empty once finished).
    pub case: String,
    /// What is being done to it.
    pub stage: Stage,
    /// Steps finished so far.
    pub done: usize,
    /// Steps in the whole run ([`run_steps`]).
    pub total: usize,
}

/// What a benchmark step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// The inputs, the float64 reference's answers, and a fresh layer
    /// checked against them.
    Checking,
    /// An untimed round, `round` of `rounds` (from 1).
    Warmup {
        /// This round.
        round: usize,
        /// Warm-up rounds in all.
        rounds: usize,
    },
    /// A timed round (every operation once), `round` of `rounds` (from 1).
    Timing {
        /// This round.
        round: usize,
        /// Timed rounds in all.
        rounds: usize,
    },
    /// Everything is measured: `done == total`.
    Finished,
}

impl Progress {
    /// `done / total`, for a progress bar (1 when there is nothing to do).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stage {
            Stage::Checking => write!(f, "{}: checking against the float64 reference", self.case),
            Stage::Warmup { round, rounds } => write!(f, "{}: warm-up round {round} of {rounds}", self.case),
            Stage::Timing { round, rounds } => write!(f, "{}: round {round} of {rounds}", self.case),
            Stage::Finished => write!(f, "finished"),
        }
    }
}

/// The steps [`run_async`] reports through its progress callback.
pub fn run_steps(options: &BenchOptions) -> usize {
    options.shapes.len() * options.dtypes.len() * (1 + options.warmup + options.runs)
}

/// Counts steps and tells the callback where the run is.
struct Steps<F: FnMut(Progress)> {
    done: usize,
    total: usize,
    progress: F,
}

impl<F: FnMut(Progress)> Steps<F> {
    /// A step begins (the ones before it are done).
    fn start(&mut self, case: &str, stage: Stage) {
        (self.progress)(Progress {
            case: case.to_string(),
            stage,
            done: self.done,
            total: self.total,
        });
        self.done += 1;
    }
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
/// the machine has available (where the OS says: Linux's `MemAvailable`;
/// never on the web).
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
#[cfg(not(target_arch = "wasm32"))]
fn available_host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A browser does not say how much memory a page may take.
#[cfg(target_arch = "wasm32")]
fn available_host_memory() -> Option<u64> {
    None
}

/// Runs every (shape, dtype, op) of `options`, blocking until done (see
/// [`run_async`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn run(ctx: &GpuContext, options: &BenchOptions, progress: impl FnMut(Progress)) -> Result<BenchReport> {
    pollster::block_on(run_async(ctx, options, progress))
}

/// Runs every (shape, dtype, op) of `options` without ever blocking: in a
/// browser, and natively on any executor. Every shape is checked with
/// [`check_shape`] before anything is measured; each shape and dtype is
/// then checked against the float64 reference (the GPU's results read
/// back asynchronously) and timed in `options.warmup` untimed and
/// `options.runs` timed rounds, each timing the copy, the stream, the
/// training forward, inference and backward once, in turn. `progress` is
/// called as each step begins and once more when everything is done
/// (`done == total`, [`Stage::Finished`]). The report's `browser` is left
/// `None`: a page fills it.
pub async fn run_async(
    ctx: &GpuContext,
    options: &BenchOptions,
    progress: impl FnMut(Progress),
) -> Result<BenchReport> {
    for shape in &options.shapes {
        for &dtype in &options.dtypes {
            check_shape(ctx, shape, dtype)?;
        }
    }
    let clock = Clock::new(ctx);
    let mut steps = Steps {
        done: 0,
        total: run_steps(options),
        progress,
    };
    let mut results = Vec::new();
    for shape in &options.shapes {
        for &dtype in &options.dtypes {
            results.extend(measure_shape(ctx, &clock, shape, dtype, options, &mut steps).await?);
        }
    }
    // the web's error scopes answer late: nothing the device refused may pass
    ctx.gpu_errors().await?;
    (steps.progress)(Progress {
        case: String::new(),
        stage: Stage::Finished,
        done: steps.total,
        total: steps.total,
    });
    Ok(BenchReport {
        adapter: describe_adapter(ctx),
        browser: None,
        crate_version: crate::VERSION.to_string(),
        timing: clock.name().to_string(),
        results,
    })
}

/// Quartiles of a set of runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The smallest value.
    pub min: f64,
    /// The first quartile.
    pub p25: f64,
    /// The median.
    pub median: f64,
    /// The third quartile.
    pub p75: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The quartiles of `values` (linear between the closest ranks, as
    /// numpy's default); all NaN for no values. NaNs sort last.
    pub fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if sorted.is_empty() {
                return f64::NAN;
            }
            let rank = q * (sorted.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        };
        Spread {
            min: at(0.0),
            p25: at(0.25),
            median: at(0.5),
            p75: at(0.75),
            max: at(1.0),
        }
    }

    /// The interquartile range over the median.
    pub fn relative_iqr(&self) -> f64 {
        (self.p75 - self.p25) / self.median
    }

    /// Whether the interquartile range is above [`NOISY_SPREAD`] of the median.
    pub fn noisy(&self) -> bool {
        self.relative_iqr() > NOISY_SPREAD
    }
}

/// `[32, 56, 56, 64] axis -1 f32`: one shape and dtype of a run.
fn case_label(bench: &BenchShape, dtype: DType) -> String {
    format!("{:?} axis {} {}", bench.shape, bench.axis, dtype_name(dtype))
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

/// A tensor's values as float64, read back without blocking.
async fn read64(ctx: &GpuContext, t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.read_f32_async(ctx).await?.into_iter().map(f64::from).collect())
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
    async fn check(&self, ctx: &GpuContext) -> Result<Checked> {
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
    async fn time_round(
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
                    Op::InferenceForward => layer.record_forward(encoder, x, None, None, y).map(drop),
                    Op::TrainForward => layer.record_forward(encoder, x, Some(true), None, y).map(drop),
                    Op::Backward => layer.record_backward(encoder, saved, dy, false, grads),
                })
                .await?;
            host.push(ms);
        }
        clock.read(ctx, host).await
    }
}

/// A layer that ran [`Setup::check`]: what timing it needs, and its errors.
struct Checked {
    layer: BatchNorm,
    grads: Gradients,
    /// The last training call's statistics (what backward reads).
    saved: SavedForward,
    errors: Errors,
}

async fn measure_shape<F: FnMut(Progress)>(
    ctx: &GpuContext,
    clock: &Clock,
    bench: &BenchShape,
    dtype: DType,
    options: &BenchOptions,
    steps: &mut Steps<F>,
) -> Result<Vec<BenchResult>> {
    let case = case_label(bench, dtype);
    steps.start(&case, Stage::Checking);
    // lets a page show the step before the reference's seconds of arithmetic
    work_done(ctx).await?;
    let setup = Setup::new(ctx, bench, dtype)?;
    let label = &setup.label;
    // correctness first: one training call and its backward, one inference call
    let mut checked = setup.check(ctx).await?;
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
    // rounds[r][i]: round r's time of Op::ALL[i]
    let mut rounds = Vec::with_capacity(options.runs);
    for round in 0..options.warmup + options.runs {
        let stage = if round < options.warmup {
            Stage::Warmup {
                round: round + 1,
                rounds: options.warmup,
            }
        } else {
            Stage::Timing {
                round: round + 1 - options.warmup,
                rounds: options.runs,
            }
        };
        steps.start(&case, stage);
        let times = setup
            .time_round(ctx, clock, &mut checked, Some(&stream), &Op::ALL)
            .await?;
        if round >= options.warmup {
            rounds.push(times);
        }
    }
    Ok(figures(ctx, &setup, bench, &checked.errors, &rounds))
}

/// The figures of one shape and dtype from its rounds (`rounds[r][i]`:
/// round r's milliseconds of `Op::ALL[i]`).
fn figures(
    ctx: &GpuContext,
    setup: &Setup,
    bench: &BenchShape,
    errors: &Errors,
    rounds: &[Vec<f64>],
) -> Vec<BenchResult> {
    let dtype = setup.dtype;
    let bytes = (setup.len * dtype.size()) as u64;
    let stream_at = Op::ALL.iter().position(|&o| o == Op::Stream).unwrap_or(0);
    Op::ALL
        .iter()
        .enumerate()
        .map(|(i, &op)| {
            let times: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
            let ratios: Vec<f64> = rounds.iter().map(|r| r[i] / r[stream_at]).collect();
            let (time, ratio) = (Spread::of(&times), Spread::of(&ratios));
            let total = bytes * op.passes();
            let kernels = op.tuning_op().map(|t| {
                let plan = ctx.plan_tuning(setup.view, dtype, t);
                KernelsUsed {
                    strategy: plan.strategy,
                    plan: plan.describe(),
                    tuned: ctx.tuned_plan(setup.view, dtype, t).is_some(),
                }
            });
            BenchResult {
                shape: bench.shape.clone(),
                axis: bench.axis,
                dtype: dtype_name(dtype).to_string(),
                op,
                median_ms: time.median,
                p25_ms: time.p25,
                p75_ms: time.p75,
                min_ms: time.min,
                max_ms: time.max,
                noisy: time.noisy(),
                runs: times.len(),
                runs_ms: times,
                bytes: total,
                gbps: total as f64 / (time.median * 1e-3) / 1e9,
                ratio_to_stream: ratio.median,
                ratio_p25: ratio.p25,
                ratio_p75: ratio.p75,
                max_error: match op {
                    Op::TrainForward => Some(errors.train),
                    Op::InferenceForward => Some(errors.inference),
                    Op::Backward => Some(errors.backward),
                    Op::Copy | Op::Stream => None,
                },
                kernels,
            }
        })
        .collect()
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

/// How many candidates [`tune_async`] times for `options` (for a progress bar).
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

/// Times the [`candidates`] of every shape, dtype and call of `options`,
/// blocking until done (see [`tune_async`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn tune(ctx: &GpuContext, options: &BenchOptions, progress: impl FnMut(&str)) -> Result<TuneReport> {
    pollster::block_on(tune_async(ctx, options, progress))
}

/// Times the [`candidates`] of every shape, dtype and call of `options`
/// with [`GpuContext::set_plan_tuning`], after checking each against the
/// float64 reference (a candidate that fails is never chosen), and picks
/// the fastest. Writes nothing: [`TuneReport::entries`] are what the cache
/// takes. The context runs its own plans again afterwards. `progress` is
/// called after each candidate. Never blocks (as [`run_async`]).
pub async fn tune_async(
    ctx: &GpuContext,
    options: &BenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<TuneReport> {
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
                let candidate = |plan, is_default| Candidate {
                    ctx,
                    clock: &clock,
                    options,
                    setup: &setup,
                    plan,
                    op: bench_op,
                    tol,
                    is_default,
                };
                let mut tried = Vec::new();
                for (i, plan) in candidates(ctx, setup.view, op).into_iter().enumerate() {
                    tried.push(candidate(plan, i == 0).run().await?);
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
                        let again = candidate(tried[i].tuning, true).run().await?;
                        let c = &mut tried[i];
                        c.runs_ms.extend(again.runs_ms);
                        c.median_ms = (!c.runs_ms.is_empty()).then(|| Spread::of(&c.runs_ms).median);
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
    ctx.gpu_errors().await?;
    Ok(TuneReport {
        adapter: AdapterKey::of(&ctx.device().adapter_info()),
        results,
    })
}

/// One candidate plan of a tuning run, for one call of one setup.
struct Candidate<'a> {
    ctx: &'a GpuContext,
    clock: &'a Clock,
    options: &'a BenchOptions,
    setup: &'a Setup,
    plan: PlanTuning,
    op: Op,
    tol: f64,
    is_default: bool,
}

impl Candidate<'_> {
    /// Checks the candidate on a fresh layer and times it if it passed
    /// (the default always, where it ran: it is what the others are
    /// measured against). What the layer refuses under this plan is its
    /// failure.
    async fn run(&self) -> Result<CandidateResult> {
        let (ctx, setup, op) = (self.ctx, self.setup, self.op);
        ctx.set_plan_tuning(Some(self.plan))?;
        let mut result = CandidateResult {
            tuning: self.plan,
            error: None,
            failure: None,
            median_ms: None,
            runs_ms: Vec::new(),
        };
        let mut checked = match setup.check(ctx).await {
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
        let passed = error <= self.tol; // NaN fails too
        if !passed {
            result.failure = Some(format!("error {error:.2e} above the tolerance {:.0e}", self.tol));
            if !self.is_default {
                return Ok(result);
            }
        }
        let mut times = Vec::with_capacity(self.options.runs);
        for i in 0..self.options.warmup + self.options.runs {
            match setup.time_round(ctx, self.clock, &mut checked, None, &[op]).await {
                Ok(ms) if i >= self.options.warmup => times.extend(ms),
                Ok(_) => {}
                Err(e) => {
                    result.failure = Some(e.to_string());
                    return Ok(result);
                }
            }
        }
        if times.is_empty() {
            result.failure = Some("no timed runs".into());
        } else {
            result.median_ms = Some(Spread::of(&times).median);
            result.runs_ms = times;
        }
        Ok(result)
    }
}

/// Waits, without blocking, until the GPU has finished everything
/// submitted so far; the host clock's time when the queue said so (taken
/// in the queue's callback). Natively a helper thread drives the device
/// (as the library's async reads do); in a browser the browser does.
async fn work_done(ctx: &GpuContext) -> Result<Instant> {
    let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
    ctx.queue().on_submitted_work_done(move || {
        sender.send(Instant::now()).ok();
    });
    #[cfg(not(target_arch = "wasm32"))]
    {
        let device = ctx.device().clone();
        std::thread::spawn(move || device.poll(wgpu::PollType::wait_indefinitely()));
    }
    receiver
        .receive()
        .await
        .ok_or_else(|| Error::readback("the queue's work-done callback never ran"))
}

/// Timestamp pairs a round can hold: one per operation.
const SLOTS: u32 = Op::ALL.len() as u32;

/// How a run is timed: GPU timestamp queries around the operation's
/// commands where the device has them (no submission or wait overhead;
/// one readback per round), else the host clock from submission to the
/// queue's work-done callback.
enum Clock {
    Gpu {
        /// A pair of timestamps per slot.
        queries: wgpu::QuerySet,
        /// Where they are resolved to (16 bytes a slot).
        resolved: wgpu::Buffer,
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
        Clock::Gpu {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * SLOTS,
            }),
            resolved: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("resolved timestamps"),
                size: 16 * u64::from(SLOTS),
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
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

    /// Submits `record`'s commands alone, between slot `slot`'s two
    /// timestamps, and waits (without blocking) until they have run. The
    /// host clock's milliseconds from before recording to the queue's
    /// callback; NaN for the GPU clock, whose figures [`Clock::read`] gives.
    async fn submit(
        &self,
        ctx: &GpuContext,
        slot: u32,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<f64> {
        let start = Instant::now();
        ctx.scoped("timing a benchmark run", || {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            self.mark(&mut encoder, slot, true);
            record(&mut encoder)?;
            self.mark(&mut encoder, slot, false);
            ctx.queue().submit([encoder.finish()]);
            Ok(())
        })?;
        let end = work_done(ctx).await?;
        Ok(match self {
            Clock::Host => end.duration_since(start).as_secs_f64() * 1e3,
            Clock::Gpu { .. } => f64::NAN,
        })
    }

    /// The milliseconds of the round just submitted, slot by slot: `host`
    /// itself for the host clock, the timestamps of as many slots read back
    /// (without blocking) for the GPU clock.
    async fn read(&self, ctx: &GpuContext, host: Vec<f64>) -> Result<Vec<f64>> {
        let Clock::Gpu {
            queries,
            resolved,
            period,
        } = self
        else {
            return Ok(host);
        };
        let n = host.len() as u32;
        ctx.scoped("resolving benchmark timestamps", || {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            encoder.resolve_query_set(queries, 0..2 * n, resolved, 0);
            ctx.queue().submit([encoder.finish()]);
            Ok(())
        })?;
        let bytes = crate::tensor::read_buffer(ctx, resolved, 0, 16 * u64::from(n), Wait::Await).await?;
        let ticks: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        Ok(ticks
            .chunks_exact(2)
            .map(|pair| pair[1].saturating_sub(pair[0]) as f64 * period / 1e6)
            .collect())
    }

    /// An empty compute pass that writes slot `slot`'s first timestamp
    /// (`begin`) or its second, bracketing the commands recorded between.
    fn mark(&self, encoder: &mut wgpu::CommandEncoder, slot: u32, begin: bool) {
        if let Clock::Gpu { queries, .. } = self {
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench timestamp"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: queries,
                    beginning_of_pass_write_index: begin.then_some(2 * slot),
                    end_of_pass_write_index: (!begin).then_some(2 * slot + 1),
                }),
            });
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quartiles_interpolate_between_ranks() {
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0, 5.0]);
        assert_eq!((s.min, s.p25, s.median, s.p75, s.max), (1.0, 2.0, 3.0, 4.0, 5.0));
        let s = Spread::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((s.p25, s.median, s.p75), (1.75, 2.5, 3.25));
        let one = Spread::of(&[7.0]);
        assert_eq!((one.p25, one.median, one.p75), (7.0, 7.0, 7.0));
        assert!(!one.noisy());
        assert!(Spread::of(&[]).median.is_nan());
    }

    #[test]
    fn a_wide_spread_is_noisy() {
        // IQR 2 around a median of 10: 20%, not above the bar
        assert!(!Spread::of(&[8.0, 9.0, 10.0, 11.0, 12.0]).noisy());
        // 11.1 ms and 6.5 ms of one stream in one run: far above it
        assert!(Spread::of(&[6.5, 6.6, 11.1, 11.0, 6.4, 10.9]).noisy());
    }

    #[test]
    fn progress_counts_every_step_and_says_what_runs() {
        let options = BenchOptions {
            shapes: default_shapes()[..2].to_vec(),
            dtypes: vec![DType::F32, DType::F16],
            warmup: 2,
            runs: 5,
        };
        assert_eq!(run_steps(&options), 2 * 2 * (1 + 2 + 5));
        let p = Progress {
            case: case_label(&options.shapes[1], DType::F16),
            stage: Stage::Timing { round: 3, rounds: 5 },
            done: 7,
            total: 28,
        };
        assert_eq!(p.to_string(), "[32, 64, 56, 56] axis 1 f16: round 3 of 5");
        assert_eq!(p.fraction(), 0.25);
    }

    /// A file of the first schema (no quartiles, no `noisy`, no `browser`,
    /// a `null` figure) still reads; a new one reads back as written.
    #[test]
    fn reports_of_the_first_schema_still_read() {
        let old = r#"{"adapter": {"name": "llvmpipe", "backend": "vulkan", "device_type": "Cpu",
            "driver": "llvmpipe", "driver_info": "Mesa"}, "crate_version": "0.1.0",
            "timing": "gpu-timestamps", "results": [{"shape": [64, 8], "axis": -1, "dtype": "f32",
            "op": "train_forward", "median_ms": 0.5, "min_ms": 0.4, "max_ms": 0.7, "runs": 3,
            "bytes": 6144, "gbps": 0.012, "ratio_to_stream": null, "max_error": 1e-7,
            "kernels": {"strategy": "serial", "plan": "defaults", "tuned": false}}]}"#;
        let report: BenchReport = serde_json::from_str(old).unwrap();
        let r = &report.results[0];
        assert!(r.p25_ms.is_nan() && r.ratio_to_stream.is_nan() && !r.noisy);
        assert_eq!(report.browser, None);
        assert_eq!(report.label(), "llvmpipe (vulkan)");
        let mut page = report.clone();
        page.adapter.name = String::new();
        page.adapter.backend = "webgpu".into();
        page.browser = Some("HeadlessChrome/140".into());
        assert_eq!(page.label(), "unnamed Cpu adapter (webgpu, HeadlessChrome/140)");
        let again: BenchReport = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(again.results[0].median_ms, 0.5);
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["browser"].is_null() && json["results"][0]["p25_ms"].is_null());
        assert_eq!(json["results"][0]["noisy"], false);
    }
}
