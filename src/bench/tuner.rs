//! `bench --tune`: the candidate plans of each shape, dtype and call,
//! checked against the reference and timed, and the fastest chosen.

use serde::Serialize;

use super::clock::Clock;
use super::runner::check_shapes;
use super::setup::Setup;
use super::{BenchOptions, BenchShape, Op, Spread, dtype_name};
use crate::config::{BatchNormConfig, ChannelView};
use crate::context::GpuContext;
use crate::error::Result;
use crate::tuning::{self, AdapterKey, PlanTuning, Strategy, TunedEntry, shape_class};

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
/// called after each candidate. Never blocks (as [`run_async`](super::run_async)).
pub async fn tune_async(
    ctx: &GpuContext,
    options: &BenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<TuneReport> {
    check_shapes(ctx, options)?;
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
