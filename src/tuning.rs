//! Kernel strategies and the knobs of their plans: which kernel family a
//! call runs (`Serial` for CPU adapters, `Coalesced` for GPUs), how it cuts
//! its work, and the per-machine cache that `bench --tune` writes and
//! contexts read.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::config::ChannelView;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// A kernel family: how invocations map onto the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Strategy {
    /// Each invocation walks its own contiguous run: about 16K statistics
    /// invocations, no workgroup reductions. Right for CPU adapters
    /// (lavapipe, WARP, SwiftShader), where a SIMD group runs its whole loop
    /// and a barrier costs thousands of loads.
    Serial,
    /// Neighbouring lanes read neighbouring words, grids that fill a GPU,
    /// workgroup (or subgroup) reductions of each tile. Right for GPUs.
    Coalesced,
}

impl Strategy {
    /// `serial` or `coalesced`.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Serial => "serial",
            Strategy::Coalesced => "coalesced",
        }
    }

    /// The family `auto` picks for a device type without a tuned plan.
    pub fn default_for(device_type: wgpu::DeviceType) -> Strategy {
        match device_type {
            wgpu::DeviceType::Cpu => Strategy::Serial,
            _ => Strategy::Coalesced,
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a context runs: a family, or `Auto` (a tuned plan from the cache
/// where `bench --tune` wrote one, else `Serial` on CPU adapters and
/// `Coalesced` on every other device type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KernelChoice {
    /// The cache's plan, or the device type's family.
    #[default]
    Auto,
    /// Always the serial family, default knobs.
    Serial,
    /// Always the coalesced family, default knobs.
    Coalesced,
}

/// The environment variable that sets a new context's [`KernelChoice`].
pub const KERNELS_ENV: &str = "WGPU_BATCHNORM_KERNELS";
/// The environment variable that overrides the tuning cache's folder.
pub const CACHE_DIR_ENV: &str = "WGPU_BATCHNORM_CACHE_DIR";

impl std::str::FromStr for KernelChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(KernelChoice::Auto),
            "serial" => Ok(KernelChoice::Serial),
            "coalesced" => Ok(KernelChoice::Coalesced),
            other => Err(Error::kernels(
                "kernel choice",
                format!("{other:?}: expected serial, coalesced or auto"),
            )),
        }
    }
}

impl KernelChoice {
    /// `WGPU_BATCHNORM_KERNELS`, or `Auto` where it is unset or empty.
    pub fn from_env() -> Result<Self> {
        match std::env::var(KERNELS_ENV) {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map_err(|e| Error::kernels(KERNELS_ENV, format!("{KERNELS_ENV}: {e}"))),
            _ => Ok(KernelChoice::Auto),
        }
    }
}

/// One plan's knobs: the family and how it cuts the work. Every valid
/// value gives the same results up to float32 rounding (sums run in
/// another order; the tests hold every family and knob to the Keras
/// tolerances); only speed differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlanTuning {
    /// The kernel family.
    pub strategy: Strategy,
    /// Invocations the statistics and backward-reduce dispatches aim for
    /// (serial: one per tile and channel; coalesced: 256 per tile).
    pub reduce_invocations: u32,
    /// Serial elementwise kernels: values (vec4s, float16 words) per
    /// invocation, a power of two up to 16.
    pub values_per_thread: u32,
    /// Serial channels-last elementwise kernels: rows per invocation, 1 to 64.
    pub rows_per_thread: u32,
    /// Coalesced elementwise kernels: invocations a dispatch aims for (each
    /// strides over the chunk).
    pub elementwise_invocations: u32,
    /// Coalesced channels-last reductions: the most lanes of a workgroup
    /// across a row (a power of two, 1 to 256); the others step down rows.
    pub lane_width: u32,
    /// Per-channel parameters through a uniform binding (see
    /// [`crate::GpuContext::set_uniform_parameters`]); `None` keeps the
    /// context's setting.
    pub uniform_parameters: Option<bool>,
}

crate::config::with_fields!(PlanTuning {
    with_strategy => strategy: Strategy,
    with_reduce_invocations => reduce_invocations: u32,
    with_values_per_thread => values_per_thread: u32,
    with_rows_per_thread => rows_per_thread: u32,
    with_elementwise_invocations => elementwise_invocations: u32,
    with_lane_width => lane_width: u32,
    with_uniform_parameters => uniform_parameters: Option<bool>,
});

impl PlanTuning {
    /// The family's default knobs.
    pub fn default_for(strategy: Strategy) -> Self {
        PlanTuning {
            strategy,
            // serial: about 16K invocations stream long runs; coalesced:
            // about 1024 workgroups fill a GPU
            reduce_invocations: match strategy {
                Strategy::Serial => 16384,
                Strategy::Coalesced => 262_144,
            },
            values_per_thread: 4,
            rows_per_thread: 8,
            elementwise_invocations: 262_144,
            lane_width: 64,
            uniform_parameters: None,
        }
    }

    /// Plans whose kernels carry every override value a compiler must
    /// accept: both families' defaults, and the serial family with each
    /// power of two of `values_per_thread` and `rows_per_thread` at 1, its
    /// default and 64 (values in between compile alike: loop bounds).
    #[cfg(test)]
    pub(crate) fn override_extremes() -> Vec<PlanTuning> {
        let serial = PlanTuning::default_for(Strategy::Serial);
        let mut plans = vec![serial, PlanTuning::default_for(Strategy::Coalesced)];
        for values_per_thread in [1, 2, 4, 8, 16] {
            for rows_per_thread in [1, serial.rows_per_thread, 64] {
                plans.push(PlanTuning {
                    values_per_thread,
                    rows_per_thread,
                    ..serial
                });
            }
        }
        plans
    }

    /// Refuses knobs outside the ranges the kernels are written for.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: &'static str, what: String| Err(Error::kernels(setting, what));
        if !(256..=1 << 24).contains(&self.reduce_invocations) {
            return bad(
                "reduce_invocations",
                format!("reduce_invocations {} outside 256..=2^24", self.reduce_invocations),
            );
        }
        if !(256..=1 << 24).contains(&self.elementwise_invocations) {
            return bad(
                "elementwise_invocations",
                format!(
                    "elementwise_invocations {} outside 256..=2^24",
                    self.elementwise_invocations
                ),
            );
        }
        // a power of two: an invocation's values then never straddle a
        // chunk's 64-element start (the vec4 layouts rely on it)
        if !self.values_per_thread.is_power_of_two() || self.values_per_thread > 16 {
            return bad(
                "values_per_thread",
                format!(
                    "values_per_thread {} is not a power of two up to 16",
                    self.values_per_thread
                ),
            );
        }
        if !(1..=64).contains(&self.rows_per_thread) {
            return bad(
                "rows_per_thread",
                format!("rows_per_thread {} outside 1..=64", self.rows_per_thread),
            );
        }
        if !self.lane_width.is_power_of_two() || self.lane_width > 256 {
            return bad(
                "lane_width",
                format!("lane_width {} is not a power of two up to 256", self.lane_width),
            );
        }
        Ok(())
    }

    /// One line naming the family and its knobs (the bench JSON's `kernels`).
    pub fn describe(&self) -> String {
        let uniform = match self.uniform_parameters {
            Some(true) => " uniform-params",
            Some(false) => " storage-params",
            None => "",
        };
        match self.strategy {
            Strategy::Serial => format!(
                "serial reduce={} values/thread={} rows/thread={}{uniform}",
                self.reduce_invocations, self.values_per_thread, self.rows_per_thread
            ),
            Strategy::Coalesced => format!(
                "coalesced reduce={} elementwise={} lane-width={}{uniform}",
                self.reduce_invocations, self.elementwise_invocations, self.lane_width
            ),
        }
    }
}

/// Which of a layer's calls a plan is for: they read and write different
/// amounts and may prefer different plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A forward call with batch statistics.
    Training,
    /// A forward call with the moving statistics.
    Inference,
    /// A backward call.
    Backward,
}

impl Op {
    /// Every op, in the bench's order.
    pub const ALL: [Op; 3] = [Op::Training, Op::Inference, Op::Backward];

    /// `training`, `inference` or `backward`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Training => "training",
            Op::Inference => "inference",
            Op::Backward => "backward",
        }
    }
}

/// The class of shapes one tuned plan stands for: dtype, how the channel
/// axis lies (last, runs whose length is a multiple of 4, other runs) and
/// the size to the next power of four.
pub fn shape_class(view: ChannelView, dtype: DType) -> String {
    let layout = match view.inner {
        1 => "channels-last",
        i if i % 4 == 0 => "inner4",
        _ => "runs",
    };
    let len = view.len().max(1) as u64;
    let mut bits = 64 - (len - 1).leading_zeros();
    bits += bits % 2;
    format!("{dtype}/{layout}/2^{bits}")
}

/// The adapter a cache entry was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AdapterKey {
    /// The adapter's name.
    pub name: String,
    /// Driver name and version.
    pub driver: String,
    /// The wgpu backend.
    pub backend: String,
}

impl AdapterKey {
    /// The key of an adapter.
    pub fn of(info: &wgpu::AdapterInfo) -> Self {
        AdapterKey {
            name: info.name.clone(),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            backend: info.backend.to_string(),
        }
    }
}

/// One tuned plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TunedEntry {
    /// Where it was measured.
    pub adapter: AdapterKey,
    /// [`shape_class`] of the shapes it stands for.
    pub class: String,
    /// The call it is for.
    pub op: Op,
    /// The winning plan.
    pub tuning: PlanTuning,
    /// How much faster than the default plan it ran (default time / its time).
    pub speedup: f64,
}

/// The format version of `tuning.json` this build reads and writes.
const CACHE_VERSION: u32 = 1;

/// The tuning cache: the JSON file `bench --tune` writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TuningCache {
    /// The file's format version.
    pub version: u32,
    /// Every tuned plan, for any adapter.
    pub entries: Vec<TunedEntry>,
}

impl TuningCache {
    /// Parses a cache as `bench --tune` writes it (the JSON of
    /// `tuning.json`); refuses another format version and invalid knobs.
    pub fn from_json(text: &str) -> Result<Self> {
        let cache: TuningCache = serde_json::from_str(text)
            .map_err(|e| Error::kernels("tuning cache", format!("not a tuning cache: {e}")))?;
        if cache.version != CACHE_VERSION {
            return Err(Error::kernels(
                "tuning cache",
                format!(
                    "tuning cache version {} (this build reads {CACHE_VERSION})",
                    cache.version
                ),
            ));
        }
        for entry in &cache.entries {
            entry.tuning.validate()?;
        }
        Ok(cache)
    }

    /// The cache as `tuning.json` holds it.
    pub fn to_json(&self) -> String {
        let mut cache = self.clone();
        cache.version = CACHE_VERSION;
        serde_json::to_string_pretty(&cache).expect("a cache serialises")
    }

    /// Adds or replaces the entry for (adapter, class, op).
    pub fn insert(&mut self, entry: TunedEntry) {
        self.entries
            .retain(|e| !(e.adapter == entry.adapter && e.class == entry.class && e.op == entry.op));
        self.entries.push(entry);
    }

    /// The plans tuned on `adapter`, by (class, op).
    pub(crate) fn for_adapter(&self, adapter: &AdapterKey) -> HashMap<(String, Op), PlanTuning> {
        self.entries
            .iter()
            .filter(|e| &e.adapter == adapter)
            .map(|e| ((e.class.clone(), e.op), e.tuning))
            .collect()
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod file;
#[cfg(not(target_arch = "wasm32"))]
pub use file::{cache_dir, cache_path};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_knobs_do_not() {
        for s in [Strategy::Serial, Strategy::Coalesced] {
            PlanTuning::default_for(s).validate().unwrap();
        }
        let bad = PlanTuning {
            lane_width: 48,
            ..PlanTuning::default_for(Strategy::Coalesced)
        };
        assert!(bad.validate().is_err());
        for values_per_thread in [0, 3, 5, 32] {
            let bad = PlanTuning {
                values_per_thread,
                ..PlanTuning::default_for(Strategy::Serial)
            };
            assert!(bad.validate().is_err(), "{values_per_thread}");
        }
    }

    #[test]
    fn choices_parse() {
        assert_eq!("Coalesced".parse::<KernelChoice>().unwrap(), KernelChoice::Coalesced);
        assert_eq!("auto".parse::<KernelChoice>().unwrap(), KernelChoice::Auto);
        assert!("fast".parse::<KernelChoice>().is_err());
    }

    #[test]
    fn shape_classes_group_by_layout_and_size() {
        let v = |outer, channels, inner| ChannelView { outer, channels, inner };
        assert_eq!(shape_class(v(100352, 64, 1), DType::F32), "float32/channels-last/2^24");
        assert_eq!(shape_class(v(32, 64, 3136), DType::F16), "float16/inner4/2^24");
        assert_eq!(shape_class(v(8, 512, 49), DType::F32), "float32/runs/2^18");
        assert_eq!(shape_class(v(1, 1, 1), DType::F32), "float32/channels-last/2^0");
    }
}
