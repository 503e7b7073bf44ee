//! The benchmark run: every shape checked against the device and the
//! host's memory, then checked against the reference and timed in rounds.

use super::clock::{Clock, work_done};
use super::setup::{Errors, Setup, StreamBaseline, case_label};
use super::{
    BenchOptions, BenchReport, BenchResult, BenchShape, KernelsUsed, Op, Progress, Spread, Stage, Steps,
    describe_adapter, dtype_name, run_steps,
};
use crate::config::BatchNormConfig;
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{Error, Result};

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

/// [`check_shape`] for every shape and dtype of `options`.
pub(super) fn check_shapes(ctx: &GpuContext, options: &BenchOptions) -> Result<()> {
    for shape in &options.shapes {
        for &dtype in &options.dtypes {
            check_shape(ctx, shape, dtype)?;
        }
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
    check_shapes(ctx, options)?;
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
