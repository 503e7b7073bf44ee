//! The WGSL kernels: their uniform block, bind-group layouts and a pipeline
//! cache keyed by what a variant depends on.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::device::KernelNeeds;
use crate::error::{Error, Result};
use crate::plan::Layout;
use crate::tensor::DType;
use crate::tuning::{PlanTuning, Strategy};

/// Workgroup size of the statistics and normalise kernels (`WG` in WGSL).
pub(crate) const WORKGROUP: u32 = 256;
/// Workgroup size of the finalize kernel.
pub(crate) const FINALIZE_WORKGROUP: u32 = 64;
/// Bytes between two uniform slots (wgpu's maximum uniform offset alignment).
pub(crate) const PARAMS_SLOT: u64 = 256;
/// Bytes of the uniform view of the per-channel parameters: 64 KiB
/// (WebGPU's default `max_uniform_buffer_binding_size`), less where the
/// device allows less. The WGSL declares `array<vec4<f32>,
/// UNIFORM_VIEW_VEC4S>`, a constant the host prepends.
pub(crate) fn uniform_view_bytes(limits: &wgpu::Limits) -> u64 {
    (limits.max_uniform_buffer_binding_size.min(65536) / 16 * 16).max(16)
}

pub(crate) const FLAG_MASKED: u32 = 1;
pub(crate) const FLAG_TRAINING: u32 = 2;
pub(crate) const FLAG_RENORM: u32 = 4;
pub(crate) const FLAG_CENTER: u32 = 8;
pub(crate) const FLAG_SCALE: u32 = 16;
pub(crate) const FLAG_RMIN: u32 = 32;
pub(crate) const FLAG_RMAX: u32 = 64;
pub(crate) const FLAG_DMAX: u32 = 128;
pub(crate) const FLAG_GAMMA_L1: u32 = 256;
pub(crate) const FLAG_GAMMA_L2: u32 = 512;
pub(crate) const FLAG_BETA_L1: u32 = 1024;
pub(crate) const FLAG_BETA_L2: u32 = 2048;
pub(crate) const FLAG_PYTORCH: u32 = 4096;
/// Synchronized calls, first phase: the finalize kernels write each
/// channel's merged tiles (to `saved` forward, `coeffs` backward) and stop.
pub(crate) const FLAG_MERGE_ONLY: u32 = 8192;
/// `StatePrecision::Float16`: weights round to float16 when written.
pub(crate) const FLAG_F16_STATE: u32 = 16384;

/// The uniform block of `shaders/params.wgsl`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub channels: u32,
    pub inner: u32,
    pub chunk_start: u32,
    pub x_base: u32,
    pub y_base: u32,
    pub last_dim: u32,
    pub lane_width: u32,
    pub elems_per_thread: u32,
    pub tiles: u32,
    pub tile_offset: u32,
    pub total_tiles: u32,
    pub stats_groups_x: u32,
    pub norm_groups_x: u32,
    pub finalize_groups_x: u32,
    pub chunk_elems: u32,
    pub flags: u32,
    pub momentum: f32,
    pub epsilon: f32,
    pub renorm_momentum: f32,
    pub rmin: f32,
    pub rmax: f32,
    pub dmax: f32,
    pub gamma_l1: f32,
    pub gamma_l2: f32,
    pub beta_l1: f32,
    pub beta_l2: f32,
    pub column_blocks: u32,
    pub elementwise_steps: u32,
    pub state_stride: u32,
    /// Always 0: the block of the slot the kernels read (`p()` in
    /// `shaders/params.wgsl`).
    pub zero: u32,
    pub _pad: [u32; 2],
}

/// The uniform block of `shaders/optimizer.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct OptimizerParams {
    pub channels: u32,
    pub flags: u32,
    pub learning_rate: f32,
    pub momentum: f32,
    /// (kind, argument 1, argument 2, argument 3) per weight
    pub gamma_constraint: [f32; 4],
    pub beta_constraint: [f32; 4],
    pub state_stride: u32,
    /// Always 0 (`q()` in `shaders/optimizer.wgsl`).
    pub zero: u32,
    pub _pad: [u32; 2],
}

pub(crate) const OPT_HAS_GAMMA: u32 = 1;
pub(crate) const OPT_HAS_BETA: u32 = 2;
pub(crate) const OPT_NESTEROV: u32 = 4;
pub(crate) const OPT_USE_MOMENTUM: u32 = 8;
pub(crate) const OPT_F16_STATE: u32 = 16;

const PARAMS_WGSL: &str = include_str!("../shaders/params.wgsl");
const FLOAT16_WGSL: &str = include_str!("../shaders/float16.wgsl");
const CHANNEL_TILES_WGSL: &str = include_str!("../shaders/channel_tiles.wgsl");
const MASK_WGSL: &str = include_str!("../shaders/mask.wgsl");
const STATISTICS_WGSL: &str = include_str!("../shaders/statistics.wgsl");
const FINALIZE_WGSL: &str = include_str!("../shaders/finalize.wgsl");
const NORMALIZE_WGSL: &str = include_str!("../shaders/normalize.wgsl");
const BACKWARD_REDUCE_WGSL: &str = include_str!("../shaders/backward_reduce.wgsl");
const BACKWARD_FINALIZE_WGSL: &str = include_str!("../shaders/backward_finalize.wgsl");
const BACKWARD_DX_WGSL: &str = include_str!("../shaders/backward_dx.wgsl");
const OPTIMIZER_WGSL: &str = include_str!("../shaders/optimizer.wgsl");
const STREAM_WGSL: &str = include_str!("../shaders/stream.wgsl");
const CHANNEL_WALK_WGSL: &str = include_str!("../shaders/channel_walk.wgsl");
const QUAD_F32_WGSL: &str = include_str!("../shaders/quad_f32.wgsl");
const QUAD_F16_WGSL: &str = include_str!("../shaders/quad_f16.wgsl");
const COALESCED_LANES_WGSL: &str = include_str!("../shaders/coalesced_lanes.wgsl");
const REDUCE_SUBGROUP_WGSL: &str = include_str!("../shaders/reduce_subgroup.wgsl");
const REDUCE_WORKGROUP_WGSL: &str = include_str!("../shaders/reduce_workgroup.wgsl");
const STATISTICS_COALESCED_WGSL: &str = include_str!("../shaders/statistics_coalesced.wgsl");
const BACKWARD_REDUCE_COALESCED_WGSL: &str = include_str!("../shaders/backward_reduce_coalesced.wgsl");
const NORMALIZE_COALESCED_WGSL: &str = include_str!("../shaders/normalize_coalesced.wgsl");
const BACKWARD_DX_COALESCED_WGSL: &str = include_str!("../shaders/backward_dx_coalesced.wgsl");

/// A kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    PartialStats,
    Finalize,
    Normalize,
    BackwardReduce,
    BackwardFinalize,
    BackwardDx,
    SgdStep,
    Constrain,
    /// The benchmark's streaming baseline.
    Stream,
}

impl Kernel {
    pub(crate) const ALL: [Kernel; 9] = [
        Kernel::PartialStats,
        Kernel::Finalize,
        Kernel::Normalize,
        Kernel::BackwardReduce,
        Kernel::BackwardFinalize,
        Kernel::BackwardDx,
        Kernel::SgdStep,
        Kernel::Constrain,
        Kernel::Stream,
    ];

    /// The WGSL source of one module: the shared uniform block and float16
    /// conversion, the shared
    /// pieces the kernel uses (among them how `dtype` stores four values,
    /// for the vec4 layouts), the kernel's own file, and for the coalesced
    /// family its file after the serial one (sharing bindings and helpers)
    /// with the workgroup sum of the device (subgroups or workgroup memory).
    /// `uniform_vec4s`: the vec4s of the device's uniform view.
    pub(crate) fn source(self, dtype: DType, strategy: Strategy, subgroups: bool, uniform_vec4s: u64) -> String {
        let quad = match dtype {
            DType::F32 => QUAD_F32_WGSL,
            DType::F16 => QUAD_F16_WGSL,
        };
        let reduce = if subgroups {
            REDUCE_SUBGROUP_WGSL
        } else {
            REDUCE_WORKGROUP_WGSL
        };
        let coalesced = strategy == Strategy::Coalesced && self.has_families();
        let mut pieces: Vec<&str> = match self {
            Kernel::PartialStats => vec![CHANNEL_TILES_WGSL, MASK_WGSL, quad, STATISTICS_WGSL],
            Kernel::Finalize => vec![FINALIZE_WGSL],
            Kernel::Normalize => vec![CHANNEL_WALK_WGSL, quad, NORMALIZE_WGSL],
            Kernel::BackwardReduce => vec![CHANNEL_TILES_WGSL, MASK_WGSL, quad, BACKWARD_REDUCE_WGSL],
            Kernel::BackwardFinalize => vec![BACKWARD_FINALIZE_WGSL],
            Kernel::BackwardDx => vec![MASK_WGSL, CHANNEL_WALK_WGSL, quad, BACKWARD_DX_WGSL],
            Kernel::Stream => vec![STREAM_WGSL],
            // its own uniform block
            Kernel::SgdStep | Kernel::Constrain => return [FLOAT16_WGSL, OPTIMIZER_WGSL].join("\n"),
        };
        if coalesced {
            pieces.extend(match self {
                Kernel::PartialStats => vec![COALESCED_LANES_WGSL, reduce, STATISTICS_COALESCED_WGSL],
                Kernel::BackwardReduce => vec![COALESCED_LANES_WGSL, reduce, BACKWARD_REDUCE_COALESCED_WGSL],
                Kernel::Normalize => vec![NORMALIZE_COALESCED_WGSL],
                Kernel::BackwardDx => vec![BACKWARD_DX_COALESCED_WGSL],
                _ => vec![],
            });
        }
        let view = format!("const UNIFORM_VIEW_VEC4S: u32 = {uniform_vec4s}u;");
        [view.as_str(), PARAMS_WGSL, FLOAT16_WGSL]
            .into_iter()
            .chain(pieces)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether the kernel comes in both families (the finalize kernels,
    /// the optimiser and the stream are one for both).
    pub(crate) fn has_families(self) -> bool {
        matches!(
            self,
            Kernel::PartialStats | Kernel::Normalize | Kernel::BackwardReduce | Kernel::BackwardDx
        )
    }

    /// Whether the coalesced form sums over its workgroup (and so differs
    /// with and without subgroup operations).
    fn reduces(self) -> bool {
        matches!(self, Kernel::PartialStats | Kernel::BackwardReduce)
    }

    pub(crate) fn entry_point(self) -> &'static str {
        match self {
            Kernel::PartialStats => "partial_stats",
            Kernel::Finalize => "finalize",
            Kernel::Normalize => "normalize",
            Kernel::BackwardReduce => "backward_reduce",
            Kernel::BackwardFinalize => "backward_finalize",
            Kernel::BackwardDx => "backward_dx",
            Kernel::SgdStep => "sgd_step",
            Kernel::Constrain => "constrain",
            Kernel::Stream => "stream_f16",
        }
    }

    /// The binding of the uniform view of the per-channel parameters, for
    /// the kernels that can read them that way (see `KernelKey::uniform_params`).
    pub(crate) fn uniform_params_binding(self) -> Option<u32> {
        match self {
            // after x, affine, y
            Kernel::Normalize => Some(4),
            // after x, dy, mask, coeffs, dx
            Kernel::BackwardDx => Some(6),
            _ => None,
        }
    }

    /// Bytes of the uniform binding at 0: two blocks, of which the kernels
    /// read the first (at an index the compiler cannot fold, see
    /// `p()` in `shaders/params.wgsl`).
    pub(crate) fn uniform_size(self) -> u64 {
        let block = match self {
            Kernel::SgdStep | Kernel::Constrain => std::mem::size_of::<OptimizerParams>(),
            _ => std::mem::size_of::<Params>(),
        };
        2 * block as u64
    }

    /// Storage bindings after the uniform at binding 0: `true` = read-only.
    fn storage_bindings(self) -> &'static [bool] {
        match self {
            // x, mask, partials
            Kernel::PartialStats => &[true, true, false],
            // partials, state, affine, saved
            Kernel::Finalize => &[true, false, false, false],
            // x, affine, y
            Kernel::Normalize => &[true, true, false],
            // x, dy, saved, mask, partials
            Kernel::BackwardReduce => &[true, true, true, true, false],
            // partials, state, saved, grads, coeffs
            Kernel::BackwardFinalize => &[true, true, true, false, false],
            // x, dy, mask, coeffs, dx
            Kernel::BackwardDx => &[true, true, true, true, false],
            // state, dgamma, dbeta, velocity
            Kernel::SgdStep | Kernel::Constrain => &[false, true, true, false],
            // x, y
            Kernel::Stream => &[true, false],
        }
    }

    /// The bind group layout: the uniform block at binding 0 (a dynamic
    /// offset per chunk), the storage bindings, and where the kernel has
    /// one, the per-channel parameters' uniform view of `uniform_view` bytes.
    pub(crate) fn layout_entries(self, uniform_view: u64) -> Vec<wgpu::BindGroupLayoutEntry> {
        let entry =
            |binding: u32, ty: wgpu::BufferBindingType, dynamic: bool, min: Option<u64>| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty,
                    has_dynamic_offset: dynamic,
                    min_binding_size: min.and_then(wgpu::BufferSize::new),
                },
                count: None,
            };
        let mut entries = vec![entry(
            0,
            wgpu::BufferBindingType::Uniform,
            true,
            Some(self.uniform_size()),
        )];
        for (i, &read_only) in self.storage_bindings().iter().enumerate() {
            entries.push(entry(
                i as u32 + 1,
                wgpu::BufferBindingType::Storage { read_only },
                false,
                None,
            ));
        }
        if let Some(binding) = self.uniform_params_binding() {
            entries.push(entry(
                binding,
                wgpu::BufferBindingType::Uniform,
                false,
                Some(uniform_view),
            ));
        }
        entries
    }

    /// What the kernel's entry points need of the device at most (the
    /// portability test reflects every entry point and holds them to it).
    pub(crate) fn needs(self, strategy: Strategy) -> KernelNeeds {
        let coalesced = strategy == Strategy::Coalesced && self.has_families();
        let vec4s = |n: u32| n * 16;
        let workgroup_bytes = match self {
            // three sums of a vec4 a lane, and the first kept position a lane
            Kernel::PartialStats if coalesced => 3 * vec4s(WORKGROUP) + 4 * WORKGROUP,
            Kernel::BackwardReduce if coalesced => 3 * vec4s(WORKGROUP),
            Kernel::Finalize | Kernel::BackwardFinalize => vec4s(FINALIZE_WORKGROUP),
            Kernel::SgdStep | Kernel::Constrain => 4 * WORKGROUP,
            _ => 0,
        };
        KernelNeeds {
            storage_buffers: self.storage_bindings().len() as u32,
            uniform_buffers: 1 + self.uniform_params_binding().is_some() as u32,
            invocations: self.workgroup_size(),
            workgroup_bytes,
        }
    }

    /// Whether the device lets the kernel's bind group layout exist.
    fn bindings_fit(self, limits: &wgpu::Limits) -> Result<()> {
        KernelNeeds {
            invocations: 0,
            workgroup_bytes: 0,
            ..self.needs(Strategy::Serial)
        }
        .check(self.entry_point(), limits)
    }

    pub(crate) fn workgroup_size(self) -> u32 {
        match self {
            Kernel::Finalize | Kernel::BackwardFinalize | Kernel::SgdStep => FINALIZE_WORKGROUP,
            _ => WORKGROUP,
        }
    }
}

/// One compiled variant: the family plus what its entry point and override
/// constants fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KernelKey {
    pub kernel: Kernel,
    pub dtype: DType,
    pub masked: bool,
    pub layout: Layout,
    /// The normalise pass's fused ReLU epilogue.
    pub relu: bool,
    /// Per-channel parameters read through a uniform binding instead of a
    /// storage one (normalise and dx only). On llvmpipe a storage load is a
    /// per-lane loop while a uniform load is one vector gather: the
    /// parameters then cost next to nothing.
    pub uniform_params: bool,
    /// The kernel family (Serial for the kernels that have one form).
    pub strategy: Strategy,
    /// Coalesced reductions: subgroup operations for the workgroup sum.
    pub subgroups: bool,
    /// Serial normalise and dx: values and channels-last rows per invocation
    /// (the `PER_THREAD` and `ROWS_PER_THREAD` overrides).
    pub per_thread: u32,
    pub rows_per_thread: u32,
}

/// What one shader module is made of: the variants of a module differ by
/// entry point and override constants only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SourceKey {
    pub kernel: Kernel,
    pub dtype: DType,
    pub strategy: Strategy,
    pub subgroups: bool,
}

impl SourceKey {
    /// The module's WGSL as naga (wgpu's native compiler) takes it; see
    /// [`Kernel::source`].
    pub(crate) fn source(&self, uniform_vec4s: u64) -> String {
        self.kernel
            .source(self.dtype, self.strategy, self.subgroups, uniform_vec4s)
    }
}

/// The serial elementwise kernels' knobs where a key does not use them.
const DEFAULT_PER_THREAD: u32 = 4;
const DEFAULT_ROWS_PER_THREAD: u32 = 8;

impl KernelKey {
    /// The key with only the fields the kernel's source depends on: equal
    /// variants share one pipeline.
    pub(crate) fn new(kernel: Kernel, dtype: DType, masked: bool) -> Self {
        let (dtype, masked) = match kernel {
            Kernel::Finalize | Kernel::BackwardFinalize | Kernel::SgdStep | Kernel::Constrain => (DType::F32, false),
            Kernel::Normalize | Kernel::Stream => (dtype, false),
            Kernel::PartialStats | Kernel::BackwardReduce | Kernel::BackwardDx => (dtype, masked),
        };
        KernelKey {
            kernel,
            dtype,
            masked,
            layout: Layout::Generic,
            relu: false,
            uniform_params: false,
            strategy: Strategy::Serial,
            subgroups: false,
            per_thread: DEFAULT_PER_THREAD,
            rows_per_thread: DEFAULT_ROWS_PER_THREAD,
        }
    }

    /// The kernel of a plan made with `tuning`, on a device with (or
    /// without) subgroup operations. Only the fields its source and
    /// constants depend on are set, so equal variants share a pipeline.
    pub(crate) fn with_tuning(self, tuning: &PlanTuning, subgroups: bool) -> Self {
        if !self.kernel.has_families() {
            return self;
        }
        let strategy = tuning.strategy;
        let elementwise = matches!(self.kernel, Kernel::Normalize | Kernel::BackwardDx);
        let serial_elementwise = elementwise && strategy == Strategy::Serial;
        let key = KernelKey {
            strategy,
            subgroups: subgroups && strategy == Strategy::Coalesced && self.kernel.reduces(),
            per_thread: if serial_elementwise {
                tuning.values_per_thread
            } else {
                DEFAULT_PER_THREAD
            },
            rows_per_thread: if serial_elementwise {
                tuning.rows_per_thread
            } else {
                DEFAULT_ROWS_PER_THREAD
            },
            ..self
        };
        // a layout the family reads like another shares its pipeline
        key.with_layout(self.layout)
    }

    /// The kernel reading its per-channel parameters through the uniform
    /// binding (where it has one).
    pub(crate) fn with_uniform_params(self, on: bool) -> Self {
        KernelKey {
            uniform_params: on && self.kernel.uniform_params_binding().is_some(),
            ..self
        }
    }

    /// The normalise kernel with (or without) its ReLU epilogue.
    pub(crate) fn with_relu(self, relu: bool) -> Self {
        KernelKey {
            relu: relu && self.kernel == Kernel::Normalize,
            ..self
        }
    }

    /// Every variant a layer's forward, backward or optimiser step can ask
    /// for with plans of `tuning` (the vec4 layouts exist for unmasked
    /// inputs only, but for a mask per row in channels-last kernels).
    pub(crate) fn layer_variants(tuning: &PlanTuning, subgroups: bool, uniform_params: bool) -> Vec<KernelKey> {
        let coalesced = tuning.strategy == Strategy::Coalesced;
        let mut keys = Vec::new();
        for kernel in Kernel::ALL.into_iter().filter(|k| *k != Kernel::Stream) {
            for dtype in [DType::F32, DType::F16] {
                for masked in [false, true] {
                    let key = KernelKey::new(kernel, dtype, masked);
                    for layout in Layout::ALL {
                        let reducing = matches!(kernel, Kernel::PartialStats | Kernel::BackwardReduce);
                        let exists = match (kernel, layout) {
                            (_, Layout::Generic) => true,
                            // coalesced statistics only, masked or not
                            (_, Layout::Rows1) => reducing && coalesced,
                            // the statistics kernels treat Inner16 as Inner4
                            (Kernel::PartialStats | Kernel::BackwardReduce, Layout::Inner16) => false,
                            // a mask per row suits the channels-last kernels
                            (
                                Kernel::PartialStats | Kernel::BackwardReduce | Kernel::BackwardDx,
                                Layout::Channels4 | Layout::Channels8,
                            ) => true,
                            (
                                Kernel::PartialStats | Kernel::BackwardReduce | Kernel::Normalize | Kernel::BackwardDx,
                                _,
                            ) => !key.masked,
                            _ => false,
                        };
                        if !exists {
                            continue;
                        }
                        for relu in [false, true] {
                            let key = key
                                .with_layout(layout)
                                .with_relu(relu)
                                .with_uniform_params(uniform_params)
                                .with_tuning(tuning, subgroups);
                            if !keys.contains(&key) {
                                keys.push(key);
                            }
                        }
                    }
                }
            }
        }
        keys
    }

    /// The kernel for `layout`; the coalesced family reads some layouts
    /// with one entry point (see `entry_point`), whose keys are made equal,
    /// and an override the entry point does not read keeps its default.
    pub(crate) fn with_layout(self, layout: Layout) -> Self {
        let layout = match (self.strategy, self.kernel, layout) {
            (Strategy::Coalesced, Kernel::PartialStats | Kernel::BackwardReduce, Layout::Runs16) => Layout::Generic,
            (Strategy::Coalesced, Kernel::PartialStats | Kernel::BackwardReduce, Layout::Inner16) => Layout::Inner4,
            (Strategy::Coalesced, _, Layout::Channels8) => Layout::Channels4,
            (Strategy::Coalesced, Kernel::Normalize | Kernel::BackwardDx, Layout::Inner16) => Layout::Inner4,
            _ => layout,
        };
        // serial channels-last entry points walk ROWS_PER_THREAD rows, the
        // other serial elementwise ones PER_THREAD values
        let serial_elementwise =
            self.strategy == Strategy::Serial && matches!(self.kernel, Kernel::Normalize | Kernel::BackwardDx);
        let by_rows = matches!(layout, Layout::Channels4 | Layout::Channels8);
        KernelKey {
            layout,
            per_thread: if serial_elementwise && !by_rows {
                self.per_thread
            } else {
                DEFAULT_PER_THREAD
            },
            rows_per_thread: if serial_elementwise && by_rows {
                self.rows_per_thread
            } else {
                DEFAULT_ROWS_PER_THREAD
            },
            ..self
        }
    }

    /// Every pipeline the crate can create on any device: every kernel,
    /// family, dtype, mask use, layout, ReLU epilogue, parameter binding
    /// and workgroup sum (subgroups or workgroup memory), with the
    /// override values at the ends of each knob's range and at its default
    /// (`PlanTuning::override_extremes`), and the benchmark's stream. The
    /// portability checks (Tint, naga's MSL, HLSL and SPIR-V backends)
    /// take their variants from here and nowhere else.
    #[cfg(test)]
    pub(crate) fn every_variant() -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for tuning in PlanTuning::override_extremes() {
            for subgroups in [false, true] {
                for uniform_params in [false, true] {
                    for key in KernelKey::layer_variants(&tuning, subgroups, uniform_params) {
                        if !keys.contains(&key) {
                            keys.push(key);
                        }
                    }
                }
            }
        }
        keys.extend([DType::F32, DType::F16].map(|dtype| KernelKey::new(Kernel::Stream, dtype, false)));
        keys
    }

    /// What the module of this key is compiled from: variants with equal
    /// sources share one shader module.
    pub(crate) fn source_key(&self) -> SourceKey {
        SourceKey {
            kernel: self.kernel,
            dtype: self.dtype,
            strategy: self.strategy,
            subgroups: self.subgroups,
        }
    }

    pub(crate) fn entry_point(&self) -> &'static str {
        if self.strategy == Strategy::Coalesced {
            return self.coalesced_entry_point();
        }
        match (self.kernel, self.layout) {
            (Kernel::PartialStats, Layout::Inner4) => "partial_stats_inner4",
            (Kernel::PartialStats, Layout::Channels4) => "partial_stats_channels4",
            (Kernel::PartialStats, Layout::Channels8) => "partial_stats_channels8",
            (Kernel::PartialStats, Layout::Runs16) => "partial_stats_runs16",
            (Kernel::Normalize, Layout::Inner4) => "normalize_inner4",
            (Kernel::Normalize, Layout::Inner16) => "normalize_inner16",
            (Kernel::Normalize, Layout::Channels4) => "normalize_channels4",
            (Kernel::Normalize, Layout::Channels8) => "normalize_channels8",
            (Kernel::Normalize, Layout::Runs16) => "normalize_runs16",
            (Kernel::BackwardReduce, Layout::Inner4 | Layout::Inner16) => "backward_reduce_inner4",
            (Kernel::BackwardReduce, Layout::Channels4) => "backward_reduce_channels4",
            (Kernel::BackwardReduce, Layout::Channels8) => "backward_reduce_channels8",
            (Kernel::BackwardReduce, Layout::Runs16) => "backward_reduce_runs16",
            (Kernel::BackwardDx, Layout::Inner4) => "backward_dx_inner4",
            (Kernel::BackwardDx, Layout::Inner16) => "backward_dx_inner16",
            (Kernel::BackwardDx, Layout::Channels4) => "backward_dx_channels4",
            (Kernel::BackwardDx, Layout::Channels8) => "backward_dx_channels8",
            (Kernel::BackwardDx, Layout::Runs16) => "backward_dx_runs16",
            (Kernel::Stream, _) if self.dtype == DType::F32 => "stream_f32",
            (kernel, _) => kernel.entry_point(),
        }
    }

    /// Entry points of the coalesced family: the reductions by rows
    /// (channels last) or runs, four values a lane or one.
    fn coalesced_entry_point(&self) -> &'static str {
        match (self.kernel, self.layout) {
            (Kernel::PartialStats, Layout::Rows1) => "partial_stats_coalesced_rows1",
            (Kernel::PartialStats, Layout::Channels4 | Layout::Channels8) => "partial_stats_coalesced_rows4",
            (Kernel::PartialStats, Layout::Inner4 | Layout::Inner16) => "partial_stats_coalesced_runs4",
            (Kernel::PartialStats, Layout::Generic | Layout::Runs16) => "partial_stats_coalesced_runs1",
            (Kernel::BackwardReduce, Layout::Rows1) => "backward_reduce_coalesced_rows1",
            (Kernel::BackwardReduce, Layout::Channels4 | Layout::Channels8) => "backward_reduce_coalesced_rows4",
            (Kernel::BackwardReduce, Layout::Inner4 | Layout::Inner16) => "backward_reduce_coalesced_runs4",
            (Kernel::BackwardReduce, Layout::Generic | Layout::Runs16) => "backward_reduce_coalesced_runs1",
            (Kernel::Normalize, Layout::Inner4 | Layout::Inner16) => "normalize_coalesced_inner4",
            (Kernel::Normalize, Layout::Channels4 | Layout::Channels8) => "normalize_coalesced_channels4",
            (Kernel::Normalize, Layout::Runs16) => "normalize_coalesced_runs16",
            (Kernel::Normalize, Layout::Generic | Layout::Rows1) => "normalize_coalesced",
            (Kernel::BackwardDx, Layout::Inner4 | Layout::Inner16) => "backward_dx_coalesced_inner4",
            (Kernel::BackwardDx, Layout::Channels4 | Layout::Channels8) => "backward_dx_coalesced_channels4",
            (Kernel::BackwardDx, Layout::Runs16) => "backward_dx_coalesced_runs16",
            (Kernel::BackwardDx, Layout::Generic | Layout::Rows1) => "backward_dx_coalesced",
            (kernel, _) => kernel.entry_point(),
        }
    }

    fn constants(&self) -> Vec<(&'static str, f64)> {
        let f16 = if self.dtype == DType::F16 { 1.0 } else { 0.0 };
        let masked = self.masked as u8 as f64;
        let rows = self.rows_per_thread as f64;
        let per = self.per_thread as f64;
        let uniform = self.uniform_params as u8 as f64;
        match self.kernel {
            Kernel::PartialStats | Kernel::BackwardReduce => vec![("IS_F16", f16), ("MASKED", masked)],
            Kernel::BackwardDx => vec![
                ("IS_F16", f16),
                ("MASKED", masked),
                ("ROWS_PER_THREAD", rows),
                ("PER_THREAD", per),
                ("UNIFORM_PARAMS", uniform),
            ],
            Kernel::Normalize => vec![
                ("IS_F16", f16),
                ("RELU", self.relu as u8 as f64),
                ("ROWS_PER_THREAD", rows),
                ("PER_THREAD", per),
                ("UNIFORM_PARAMS", uniform),
            ],
            Kernel::Stream => vec![],
            Kernel::Finalize | Kernel::BackwardFinalize | Kernel::SgdStep | Kernel::Constrain => vec![],
        }
    }
}

/// Why a kernel or pipeline cannot be used on this device, kept so that
/// every call needing it fails alike.
#[derive(Debug, Clone)]
enum Refusal {
    Limit {
        kernel: &'static str,
        limit: &'static str,
        needs: u64,
        allows: u64,
    },
    Gpu {
        what: String,
        message: String,
    },
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        match e {
            Error::DeviceLimit {
                kernel,
                limit,
                needs,
                allows,
            } => Refusal::Limit {
                kernel,
                limit,
                needs,
                allows,
            },
            Error::Gpu { what, message } => Refusal::Gpu { what, message },
            other => Refusal::Gpu {
                what: "creating a pipeline".into(),
                message: other.to_string(),
            },
        }
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Limit {
                kernel,
                limit,
                needs,
                allows,
            } => Error::DeviceLimit {
                kernel,
                limit,
                needs,
                allows,
            },
            Refusal::Gpu { what, message } => Error::Gpu { what, message },
        }
    }
}

type Layouts = (wgpu::BindGroupLayout, wgpu::PipelineLayout);

/// Bind-group layouts (one per family) and the pipelines compiled so far,
/// or why the device refused them: a kernel over the device's limits, a
/// module or pipeline the device rejects (an error scope around every
/// creation catches it). A refusal is kept and returned by every call
/// that needs the kernel.
pub(crate) struct Kernels {
    /// Bytes of the per-channel parameters' uniform view on this device.
    pub(crate) uniform_view: u64,
    /// Whether the coalesced reductions use subgroup operations: the device
    /// has `Features::SUBGROUP` and is not DX12. (wgpu 30's WebGPU backend
    /// never offers the feature: browsers run the workgroup-memory sums.)
    pub(crate) subgroups: bool,
    layouts: HashMap<Kernel, std::result::Result<Layouts, Refusal>>,
    /// Shader modules by source, kept for compiling more variants of it.
    modules: Mutex<HashMap<SourceKey, std::result::Result<wgpu::ShaderModule, Refusal>>>,
    pipelines: Mutex<HashMap<KernelKey, std::result::Result<wgpu::ComputePipeline, Refusal>>>,
    /// Kernels whose WGSL gets an invalid line (`GpuContext::break_kernel`).
    broken: Mutex<Vec<Kernel>>,
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        let limits = device.limits();
        let uniform_view = uniform_view_bytes(&limits);
        let layouts = Kernel::ALL
            .into_iter()
            .map(|kernel| {
                let layouts = crate::device::scoped(
                    device,
                    || format!("the bind group layout of {}", kernel.entry_point()),
                    || {
                        kernel.bindings_fit(&limits)?;
                        let entries = kernel.layout_entries(uniform_view);
                        let bind = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                            label: Some(kernel.entry_point()),
                            entries: &entries,
                        });
                        let pipeline = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                            label: Some(kernel.entry_point()),
                            bind_group_layouts: &[Some(&bind)],
                            immediate_size: 0,
                        });
                        Ok((bind, pipeline))
                    },
                );
                (kernel, layouts.map_err(Refusal::from))
            })
            .collect();
        Kernels {
            uniform_view,
            // naga's HLSL derives the subgroup id from the lane count, which
            // D3D12 does not promise: DX12 takes the workgroup-memory sum
            subgroups: device.features().contains(wgpu::Features::SUBGROUP)
                && device.adapter_info().backend != wgpu::Backend::Dx12,
            layouts,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            broken: Mutex::new(Vec::new()),
        }
    }

    fn layouts(&self, kernel: Kernel) -> Result<&Layouts> {
        self.layouts[&kernel].as_ref().map_err(|r| r.clone().into())
    }

    pub(crate) fn bind_group_layout(&self, kernel: Kernel) -> Result<&wgpu::BindGroupLayout> {
        Ok(&self.layouts(kernel)?.0)
    }

    /// Compiles every layer variant of plans made with `tuning` not
    /// compiled yet, so that no forward or backward call with such plans
    /// compiles a pipeline. A variant the device refuses is kept as
    /// refused: the calls that need it return the error.
    pub(crate) fn precompile(&self, device: &wgpu::Device, tuning: &PlanTuning, uniform_params: bool) {
        for key in KernelKey::layer_variants(tuning, self.subgroups, uniform_params) {
            let _ = self.pipeline(device, key);
        }
    }

    /// How many pipelines were compiled so far.
    pub(crate) fn compiled(&self) -> usize {
        let pipelines = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        pipelines.values().filter(|p| p.is_ok()).count()
    }

    /// Makes every module of `kernel` compiled from now on invalid WGSL (a
    /// test's way of seeing a rejected pipeline become an error).
    pub(crate) fn break_kernel(&self, kernel: Kernel) {
        self.broken.lock().unwrap_or_else(|e| e.into_inner()).push(kernel);
    }

    /// The pipeline for `key`, compiled on first use and cached for the
    /// device's lifetime, or why the device refuses it (also cached).
    pub(crate) fn pipeline(&self, device: &wgpu::Device, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(made) = cache.get(&key) {
            return made.clone().map_err(Error::from);
        }
        let made = self.create_pipeline(device, key).map_err(Refusal::from);
        cache.insert(key, made.clone());
        made.map_err(Error::from)
    }

    fn create_pipeline(&self, device: &wgpu::Device, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        key.kernel
            .needs(key.strategy)
            .check(key.entry_point(), &device.limits())?;
        let layout = &self.layouts(key.kernel)?.1;
        let module = self.module(device, key.source_key())?;
        crate::device::scoped(
            device,
            || format!("compiling pipeline {}", key.entry_point()),
            || {
                Ok(device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key.entry_point()),
                    layout: Some(layout),
                    module: &module,
                    entry_point: Some(key.entry_point()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &key.constants(),
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                }))
            },
        )
    }

    /// One module per source: the variants of a family differ by entry
    /// point and override constants only.
    fn module(&self, device: &wgpu::Device, source: SourceKey) -> Result<wgpu::ShaderModule> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(made) = modules.get(&source) {
            return made.clone().map_err(Error::from);
        }
        let mut wgsl = source.source(self.uniform_view / 16);
        if self
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&source.kernel)
        {
            wgsl.push_str("\nfn broken_on_purpose() -> u32 { return 1.5; }\n");
        }
        let made = crate::device::scoped(
            device,
            || format!("compiling the shader module of {}", source.kernel.entry_point()),
            || {
                Ok(device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(source.kernel.entry_point()),
                    source: wgpu::ShaderSource::Wgsl(wgsl.into()),
                }))
            },
        )
        .map_err(Refusal::from);
        modules.insert(source, made.clone());
        made.map_err(Error::from)
    }
}

/// Workgroups of the finalize kernels: eight invocations per channel,
/// eight channels per workgroup (`LANES` in finalize.wgsl).
pub(crate) fn finalize_groups(channels: usize) -> u64 {
    channels.div_ceil(8) as u64
}

/// A 2-D grid of at least `groups` workgroups with neither dimension above
/// `max` (the device's `max_compute_workgroups_per_dimension`, 65535 in
/// WebGPU); the kernels number workgroups `wid.x + wid.y * x` and skip
/// those past their work. Checked here, on the host: a grid the device
/// cannot run is an error, never a dispatch.
pub(crate) fn grid(groups: u64, max: u32) -> Result<(u32, u32)> {
    // Plain divisions, no clamp: rustc 1.95's LLVM miscompiles
    // `if g <= 65535 { g.max(1) } else { 65535 }` (65536 for 65536).
    let max = u64::from(max);
    let y = groups.saturating_sub(1) / max + 1;
    let x = groups.saturating_sub(1) / y + 1;
    if x > max || y > max || x * y < groups {
        return Err(Error::TooLarge(format!(
            "{groups} workgroups do not fit a grid of {max} x {max} (max_compute_workgroups_per_dimension)"
        )));
    }
    Ok((x as u32, y as u32))
}

#[cfg(test)]
mod portability;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module of both families (the coalesced one with and without
    /// subgroups) parses and validates with naga, and every entry point a
    /// key names exists with the workgroup size the host plans with.
    #[test]
    fn shaders_validate_and_match_host_constants() {
        for kernel in Kernel::ALL {
            for dtype in [DType::F32, DType::F16] {
                for (strategy, subgroups) in [
                    (Strategy::Serial, false),
                    (Strategy::Coalesced, false),
                    (Strategy::Coalesced, true),
                ] {
                    let what = format!("{kernel:?} {dtype} {strategy} subgroups {subgroups}");
                    let source = kernel.source(dtype, strategy, subgroups, 4096);
                    let module = naga::front::wgsl::parse_str(&source)
                        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&source)));
                    let capabilities = if subgroups {
                        naga::valid::Capabilities::all()
                    } else {
                        naga::valid::Capabilities::all()
                            - naga::valid::Capabilities::SUBGROUP
                            - naga::valid::Capabilities::SUBGROUP_BARRIER
                    };
                    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
                        .validate(&module)
                        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    let tuning = PlanTuning::default_for(strategy);
                    for layout in Layout::ALL {
                        let name = KernelKey::new(kernel, dtype, false)
                            .with_tuning(&tuning, subgroups)
                            .with_layout(layout)
                            .entry_point();
                        let entry = module
                            .entry_points
                            .iter()
                            .find(|e| e.name == name)
                            .unwrap_or_else(|| panic!("{what}: no entry point {name}"));
                        assert_eq!(entry.workgroup_size, [kernel.workgroup_size(), 1, 1], "{name}");
                    }
                }
            }
        }
    }

    /// No kernel reads a uniform at an offset its compiler can fold: a
    /// uniform binding is only ever indexed, by a runtime value (the
    /// parameters' slot by `min(wid.z, 1u)`, the per-channel views by
    /// channel), and every entry point loads `p` (or `q`) first. Mesa
    /// 22.3's lavapipe "inlines" uniform values read at constant offsets,
    /// compiling a variant per dispatch that it never frees
    /// (`load_params` in `shaders/params.wgsl`, tests/memory.rs).
    /// The uniform parameters are never read at a constant offset: every
    /// kernel reads binding 0 through `p()` (or the optimiser's `q()`),
    /// whose block index is itself read from the uniform (the one constant
    /// read, of that index), and the per-channel parameters' uniform views
    /// are indexed by channel. Mesa 22.3's lavapipe "inlines" uniform
    /// values read at constant offsets, compiling a variant per dispatch
    /// that it never frees (`p()` in `shaders/params.wgsl`,
    /// tests/memory.rs).
    #[test]
    fn uniforms_are_never_read_at_constant_offsets() {
        use naga::Expression as E;
        let mut sources: Vec<SourceKey> = KernelKey::every_variant().iter().map(|k| k.source_key()).collect();
        sources.dedup();
        for source in sources {
            let what = format!("{source:?}");
            let module = naga::front::wgsl::parse_str(&source.source(4096)).unwrap();
            let uniform =
                |g: naga::Handle<naga::GlobalVariable>| module.global_variables[g].space == naga::AddressSpace::Uniform;
            for (_, f) in module.functions.iter() {
                let name = f.name.as_deref().unwrap_or("?");
                let globals: Vec<_> = f
                    .expressions
                    .iter()
                    .filter(|(_, e)| matches!(**e, E::GlobalVariable(g) if uniform(g)))
                    .map(|(h, _)| h)
                    .collect();
                let reader = matches!(name, "p" | "q");
                for (_, e) in f.expressions.iter() {
                    match *e {
                        E::Access { base, index } if globals.contains(&base) => {
                            let folded = matches!(
                                f.expressions[index],
                                E::Literal(_) | E::Constant(_) | E::Override(_) | E::ZeroValue(_)
                            );
                            assert!(!folded, "{what}: {name} indexes a uniform by a constant");
                        }
                        // p() and q() read their block index at a constant offset
                        E::AccessIndex { base, .. } | E::Load { pointer: base }
                            if globals.contains(&base) && !reader =>
                        {
                            panic!("{what}: {name} reads a uniform at a constant offset")
                        }
                        _ => {}
                    }
                }
            }
            for entry in &module.entry_points {
                let f = &entry.function;
                let touches = f
                    .expressions
                    .iter()
                    .any(|(_, e)| matches!(*e, E::GlobalVariable(g) if uniform(g)));
                assert!(!touches, "{what}: {} reads a uniform itself", entry.name);
            }
        }
    }

    /// Every key the layer builds is among the precompiled variants, for
    /// both families.
    #[test]
    fn layer_keys_are_all_precompiled_variants() {
        for strategy in [Strategy::Serial, Strategy::Coalesced] {
            let tuning = PlanTuning::default_for(strategy);
            for subgroups in [false, true] {
                for uniform in [false, true] {
                    let variants = KernelKey::layer_variants(&tuning, subgroups, uniform);
                    for kernel in [Kernel::Normalize, Kernel::BackwardDx] {
                        let key = KernelKey::new(kernel, DType::F32, false)
                            .with_uniform_params(uniform)
                            .with_tuning(&tuning, subgroups);
                        assert_eq!(key.uniform_params, uniform);
                        assert!(variants.contains(&key), "{key:?}");
                    }
                }
                let variants = KernelKey::layer_variants(&tuning, subgroups, false);
                let families = [
                    Kernel::PartialStats,
                    Kernel::BackwardReduce,
                    Kernel::BackwardDx,
                    Kernel::Normalize,
                ];
                for kernel in families {
                    for dtype in [DType::F32, DType::F16] {
                        for masked in [false, true] {
                            let key = KernelKey::new(kernel, dtype, masked).with_tuning(&tuning, subgroups);
                            assert!(variants.contains(&key), "{key:?}");
                        }
                    }
                }
                for layout in Layout::ALL.into_iter().skip(1) {
                    for kernel in families {
                        let reducing = matches!(kernel, Kernel::PartialStats | Kernel::BackwardReduce);
                        // the statistics kernels read Inner16 as Inner4; Rows1 is coalesced statistics only
                        if reducing && layout == Layout::Inner16
                            || layout == Layout::Rows1 && !(reducing && strategy == Strategy::Coalesced)
                        {
                            continue;
                        }
                        for dtype in [DType::F32, DType::F16] {
                            let key = KernelKey::new(kernel, dtype, false)
                                .with_layout(layout)
                                .with_tuning(&tuning, subgroups);
                            assert!(variants.contains(&key), "{key:?}");
                        }
                    }
                }
                assert!(variants.contains(&KernelKey::new(Kernel::Finalize, DType::F16, true)));
            }
        }
    }

    /// A chunk's binding (two Params blocks) fits its slot, so the last
    /// chunk's binding ends inside the buffer.
    #[test]
    fn params_binding_is_one_uniform_slot() {
        assert!(Kernel::Normalize.uniform_size() <= PARAMS_SLOT);
        assert_eq!(std::mem::size_of::<Params>() % 16, 0);
        assert_eq!(std::mem::size_of::<OptimizerParams>() % 16, 0);
    }

    #[test]
    fn grids_cover_every_workgroup() {
        // the unit tests build at opt-level 1, where the old clamp shape
        // returned 65536 for 65536
        for max in [65535, 1000, 1] {
            for groups in [
                0,
                1,
                2,
                999,
                1000,
                1001,
                65534,
                65535,
                65536,
                65537,
                200_000,
                524_281 / 8 + 1,
            ] {
                let Ok((x, y)) = grid(std::hint::black_box(groups), std::hint::black_box(max)) else {
                    assert!(groups > u64::from(max) * u64::from(max), "{groups} in {max}");
                    continue;
                };
                let (x, y) = (u64::from(x), u64::from(y));
                assert!(x >= 1 && y >= 1, "{groups}: {x} x {y}");
                assert!(
                    x <= u64::from(max) && y <= u64::from(max),
                    "{groups} in {max}: {x} x {y}"
                );
                assert!(x * y >= groups, "{groups}: {x} x {y}");
            }
        }
        assert!(grid(65535 * 65535 + 1, 65535).is_err());
        assert_eq!(grid(65536, 65535).unwrap(), (32768, 2));
    }
}
