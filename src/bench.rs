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
//!
//! In rooms: `report` (the JSON schema, [`Spread`](crate::bench::Spread)),
//! `runner` (the run), `setup` (one case's inputs, check and timed round,
//! the streaming baseline), `clock` (how a round is timed), `tuner`
//! (`bench --tune`), and [`plot`](crate::bench::plot).

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::tuning;

mod clock;
pub mod plot;
mod report;
mod runner;
mod setup;
mod tuner;

pub use report::{
    AdapterDescription, BenchReport, BenchResult, FigureKey, KernelsUsed, NOISY_SPREAD, Spread, describe_adapter,
    layer_rows,
};
#[cfg(not(target_arch = "wasm32"))]
pub use runner::run;
pub use runner::{check_shape, run_async};
#[cfg(not(target_arch = "wasm32"))]
pub use tuner::tune;
pub use tuner::{CandidateResult, TuneReport, TuneResult, candidates, tune_async, tune_steps};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::setup::case_label;

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
}
