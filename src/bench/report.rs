//! The JSON schema of a run (what `bench --json` writes and `report`
//! reads), the quartiles its figures carry, and the adapter it names.

use serde::{Deserialize, Deserializer, Serialize};

use super::Op;
use crate::context::GpuContext;
use crate::tuning::Strategy;

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
    /// The plan's knobs ([`PlanTuning::describe`](crate::tuning::PlanTuning::describe)).
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
