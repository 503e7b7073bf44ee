//! The kernel variants: which kernels exist, the layouts and families they
//! come in, the key that names one compiled variant, its entry point and
//! override constants, its bindings and what it needs of a device. Plain
//! data, shared by the plan (which picks variants) and the pipeline cache
//! (which compiles them); nothing here touches a device.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::params::{OptimizerParams, Params};
use crate::tuning::{PlanTuning, Strategy};

/// Workgroup size of the statistics and normalise kernels (`WG` in WGSL).
pub(crate) const WORKGROUP: u32 = 256;
/// Workgroup size of the finalize kernel.
pub(crate) const FINALIZE_WORKGROUP: u32 = 64;
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
    pub(crate) fn reduces(self) -> bool {
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

    /// What the kernel binds after its uniform block at binding 0, in
    /// binding order: each buffer's role and whether the kernel writes it.
    /// The one table of the kernels' bindings (the portability test
    /// reflects every entry point against it).
    pub(crate) fn bindings(self) -> &'static [(Role, Access)] {
        use Access::{Read, Write};
        match self {
            Kernel::PartialStats => &[(Role::X, Read), (Role::Mask, Read), (Role::Partials, Write)],
            Kernel::Finalize => &[
                (Role::Partials, Read),
                (Role::State, Write),
                (Role::Affine, Write),
                (Role::Saved, Write),
            ],
            Kernel::Normalize => &[(Role::X, Read), (Role::Affine, Read), (Role::Y, Write)],
            Kernel::BackwardReduce => &[
                (Role::X, Read),
                (Role::Dy, Read),
                (Role::Saved, Read),
                (Role::Mask, Read),
                (Role::Partials, Write),
            ],
            Kernel::BackwardFinalize => &[
                (Role::Partials, Read),
                (Role::State, Read),
                (Role::Saved, Read),
                (Role::Grads, Write),
                (Role::Coeffs, Write),
            ],
            Kernel::BackwardDx => &[
                (Role::X, Read),
                (Role::Dy, Read),
                (Role::Mask, Read),
                (Role::Coeffs, Read),
                (Role::Dx, Write),
            ],
            Kernel::SgdStep | Kernel::Constrain => &[
                (Role::State, Write),
                (Role::Dgamma, Read),
                (Role::Dbeta, Read),
                (Role::Velocity, Write),
            ],
            Kernel::Stream => &[(Role::X, Read), (Role::Y, Write)],
        }
    }

    /// Storage bindings after the uniform at binding 0: `true` = read-only.
    fn storage_bindings(self) -> impl Iterator<Item = bool> {
        self.bindings().iter().map(|&(_, access)| access == Access::Read)
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
        for (i, read_only) in self.storage_bindings().enumerate() {
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
            storage_buffers: self.bindings().len() as u32,
            uniform_buffers: 1 + self.uniform_params_binding().is_some() as u32,
            invocations: self.workgroup_size(),
            workgroup_bytes,
        }
    }

    /// Whether the device lets the kernel's bind group layout exist.
    pub(crate) fn bindings_fit(self, limits: &wgpu::Limits) -> Result<()> {
        KernelNeeds {
            invocations: 0,
            workgroup_bytes: 0,
            ..self.needs(Strategy::Serial)
        }
        .check(self.entry_point(), limits)
    }

    /// The per-value passes (normalise, dx): nothing to run over an empty
    /// batch.
    pub(crate) fn is_elementwise(self) -> bool {
        matches!(self, Kernel::Normalize | Kernel::BackwardDx)
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

/// The serial elementwise kernels' knobs where a key does not use them.
const DEFAULT_PER_THREAD: u32 = 4;
const DEFAULT_ROWS_PER_THREAD: u32 = 8;

/// The buffer a binding holds, in the kernels' names (see
/// `Kernel::bindings`): the call's tensors (per chunk where the kernel runs
/// over chunks), its mask, and the layer's or call's per-channel buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    X,
    Y,
    Dy,
    Dx,
    Mask,
    /// Statistics tiles (or a synchronized call's merged partials).
    Partials,
    /// The layer's weights, slot by slot.
    State,
    /// [shift | scale | offset] a channel, for the normalise pass.
    Affine,
    /// A forward call's own statistics, for its backward.
    Saved,
    /// dx's coefficients a channel.
    Coeffs,
    /// [dgamma | dbeta].
    Grads,
    Dgamma,
    Dbeta,
    Velocity,
}

/// Whether a kernel reads a binding only, or writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

/// What a call decides about its kernels beyond their layout: the dtype,
/// whether its reductions (and dx) read a mask, its plan's knobs, the
/// device's subgroups, how the elementwise kernels read their per-channel
/// parameters, and the fused ReLU. `KernelKey::of` settles it into one
/// kernel's key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Variant {
    pub dtype: DType,
    pub masked: bool,
    pub tuning: PlanTuning,
    pub subgroups: bool,
    /// Normalise reads [shift | scale | offset] through the uniform view.
    pub uniform_affine: bool,
    /// dx reads its coefficients through the uniform view.
    pub uniform_coeffs: bool,
    pub relu: bool,
}

impl KernelKey {
    /// The key of `kernel` in `layout` for a call of `variant`, with only
    /// the fields its source, entry point and constants depend on: equal
    /// variants share one pipeline, whatever the call.
    pub(crate) fn of(kernel: Kernel, layout: Layout, variant: &Variant) -> Self {
        let uniform = match kernel {
            Kernel::Normalize => variant.uniform_affine,
            Kernel::BackwardDx => variant.uniform_coeffs,
            _ => false,
        };
        KernelKey::new(kernel, variant.dtype, variant.masked)
            .with_tuning(&variant.tuning, variant.subgroups)
            .with_layout(layout)
            .with_relu(variant.relu)
            .with_uniform_params(uniform)
    }

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
    /// for with plans of `tuning`: each entry point of the family, masked
    /// where it reads a mask, and the kernels without families.
    pub(crate) fn layer_variants(tuning: &PlanTuning, subgroups: bool, uniform_params: bool) -> Vec<KernelKey> {
        let mut keys = Vec::new();
        for kernel in Kernel::ALL.into_iter().filter(|k| *k != Kernel::Stream) {
            let layouts: Vec<(Layout, bool)> = if kernel.has_families() {
                FamilyEntry::of(kernel, tuning.strategy)
                    .map(|e| (e.layouts[0], e.masked))
                    .collect()
            } else {
                vec![(Layout::Generic, true)]
            };
            for (layout, reads_masks) in layouts {
                for dtype in [DType::F32, DType::F16] {
                    for masked in [false, reads_masks] {
                        for relu in [false, true] {
                            let variant = Variant {
                                dtype,
                                masked,
                                tuning: *tuning,
                                subgroups,
                                uniform_affine: uniform_params,
                                uniform_coeffs: uniform_params,
                                relu,
                            };
                            let key = KernelKey::of(kernel, layout, &variant);
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

    /// The kernel for `layout`: layouts one entry point reads alike share
    /// its key (the first of its entry's layouts), and an override the
    /// entry point does not read keeps its default.
    pub(crate) fn with_layout(self, layout: Layout) -> Self {
        let layout = FamilyEntry::reading(self.kernel, self.strategy, layout).map_or(layout, |e| e.layouts[0]);
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
        match FamilyEntry::reading(self.kernel, self.strategy, self.layout) {
            Some(entry) => entry.name(self.kernel),
            None if self.kernel == Kernel::Stream && self.dtype == DType::F32 => "stream_f32",
            None => self.kernel.entry_point(),
        }
    }

    /// Every entry point of `kernel`'s form in `strategy`'s family, as a
    /// key of that layout: its name and the walk it calls.
    pub(crate) fn family_entry_points(
        kernel: Kernel,
        strategy: Strategy,
    ) -> impl Iterator<Item = (&'static str, &'static str)> {
        FamilyEntry::of(kernel, strategy).map(move |e| (e.name(kernel), e.walk))
    }

    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
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

/// How the kernels walk an input: one scalar at a time anywhere, or four
/// values at a time (a vec4 of float32, a vec2<u32> of float16) when the
/// layout lets four neighbours share a channel (`Inner4`:
/// inner % 4 == 0, e.g. NCHW) or be four consecutive channels (`Channels4`:
/// inner == 1 and channels % 4 == 0, e.g. NHWC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Layout {
    Generic,
    Inner4,
    /// Inner4 with inner % 16 == 0, and a multiple of a serial
    /// invocation's 4 x values_per_thread values (a power of two, so an
    /// invocation starts on such a multiple: the elementwise kernels need no
    /// channel tracking); statistics treat it as Inner4.
    Inner16,
    Channels4,
    /// Channels4 with channels % 8 == 0: an invocation takes two
    /// neighbouring quads, so a SIMD group of eight reads 256 contiguous
    /// bytes of a row per step (10-30% faster on lavapipe than one quad,
    /// see benches/NOTES.md).
    Channels8,
    /// inner >= 16 but not a multiple of 4 (7x7 feature maps), length %
    /// 4 == 0: vec4s over the flat tensor. An elementwise invocation's
    /// sixteen values meet at most two channels, whose parameters it loads
    /// once and selects per lane; statistics read each run in the vec4s
    /// that cover it and mask the lanes outside (tiles sized in values, as
    /// Generic).
    Runs16,
    /// Coalesced statistics only: inner == 1 with any channel count,
    /// scalar lanes across a row (Generic reads one channel's values
    /// `channels` apart).
    Rows1,
}

impl Layout {
    #[cfg(test)]
    pub(crate) const ALL: [Layout; 7] = [
        Layout::Generic,
        Layout::Inner4,
        Layout::Inner16,
        Layout::Channels4,
        Layout::Channels8,
        Layout::Runs16,
        Layout::Rows1,
    ];
}

/// One entry point of the kernels that come in both families: which
/// family, whether it is a reduction (statistics, backward reduce) or
/// elementwise (normalise, dx), the layouts it reads, whether it reads a
/// mask, its names and the walk it calls. The one table from which the
/// keys' layouts (`KernelKey::with_layout`), the variants a layer can ask
/// for (`KernelKey::layer_variants`), the entry points' names and the
/// generated entry points themselves (`Kernel::source`) are all drawn.
struct FamilyEntry {
    strategy: Strategy,
    reduces: bool,
    /// The layouts it reads; a key's layout is the first, so layouts read
    /// alike share one pipeline.
    layouts: &'static [Layout],
    /// Reads a mask (one a value, or one a row in the channels-last
    /// forms); a masked input never takes the others.
    masked: bool,
    /// Its name in the forward kernel (statistics or normalise) and in the
    /// backward one (backward reduce or dx).
    names: [&'static str; 2],
    /// The call its body makes: a walk of `shaders/walk_*.wgsl`, with the
    /// builtins `Kernel::source` declares for the family.
    walk: &'static str,
}

/// The table's rows as tuples (strategy, reduces, layouts, masked,
/// names, walk), in `FamilyEntry`'s field order.
macro_rules! family_entries {
    ($(($strategy:expr, $reduces:expr, $layouts:expr, $masked:expr, $names:expr, $walk:expr)),* $(,)?) => {
        &[$(FamilyEntry { strategy: $strategy, reduces: $reduces, layouts: $layouts, masked: $masked, names: $names, walk: $walk }),*]
    };
}

#[rustfmt::skip]
const FAMILY_ENTRIES: &[FamilyEntry] = {
    use Layout::*;
    use Strategy::{Coalesced as C, Serial as S};
    family_entries![
        (S, true, &[Generic, Rows1], true, ["partial_stats", "backward_reduce"], "tiles_runs1(wid, lid)"),
        (S, true, &[Inner4, Inner16], false, ["partial_stats_inner4", "backward_reduce_inner4"], "tiles_runs(wid, lid, true)"),
        (S, true, &[Runs16], false, ["partial_stats_runs16", "backward_reduce_runs16"], "tiles_runs(wid, lid, false)"),
        (S, true, &[Channels4], true, ["partial_stats_channels4", "backward_reduce_channels4"], "tiles_rows(wid, lid, false)"),
        (S, true, &[Channels8], true, ["partial_stats_channels8", "backward_reduce_channels8"], "tiles_rows(wid, lid, true)"),
        (S, false, &[Generic, Rows1], true, ["normalize", "backward_dx"], "values_any(wid, lid)"),
        (S, false, &[Inner4], false, ["normalize_inner4", "backward_dx_inner4"], "values_inner(wid, lid, true)"),
        (S, false, &[Inner16], false, ["normalize_inner16", "backward_dx_inner16"], "values_inner(wid, lid, false)"),
        (S, false, &[Channels4], true, ["normalize_channels4", "backward_dx_channels4"], "values_rows(wid, lid, false)"),
        (S, false, &[Channels8], true, ["normalize_channels8", "backward_dx_channels8"], "values_rows(wid, lid, true)"),
        (S, false, &[Runs16], false, ["normalize_runs16", "backward_dx_runs16"], "values_runs16(wid, lid)"),
        (C, true, &[Generic, Runs16], true, ["partial_stats_coalesced_runs1", "backward_reduce_coalesced_runs1"], "tiles_coalesced_runs1(wid, lanes)"),
        (C, true, &[Inner4, Inner16], false, ["partial_stats_coalesced_runs4", "backward_reduce_coalesced_runs4"], "tiles_coalesced_runs4(wid, lanes)"),
        (C, true, &[Channels4, Channels8], true, ["partial_stats_coalesced_rows4", "backward_reduce_coalesced_rows4"], "tiles_coalesced_rows4(wid, lanes)"),
        (C, true, &[Rows1], true, ["partial_stats_coalesced_rows1", "backward_reduce_coalesced_rows1"], "tiles_coalesced_rows1(wid, lanes)"),
        (C, false, &[Generic, Rows1], true, ["normalize_coalesced", "backward_dx_coalesced"], "values_coalesced_any(wid, nwg, lid)"),
        (C, false, &[Inner4, Inner16], false, ["normalize_coalesced_inner4", "backward_dx_coalesced_inner4"], "values_coalesced_runs(wid, nwg, lid, true)"),
        (C, false, &[Runs16], false, ["normalize_coalesced_runs16", "backward_dx_coalesced_runs16"], "values_coalesced_runs(wid, nwg, lid, false)"),
        (C, false, &[Channels4, Channels8], true, ["normalize_coalesced_channels4", "backward_dx_coalesced_channels4"], "values_coalesced_rows4(wid, nwg, lid)"),
    ]
};

impl FamilyEntry {
    /// The entries of `kernel`'s form in `strategy`'s family.
    fn of(kernel: Kernel, strategy: Strategy) -> impl Iterator<Item = &'static FamilyEntry> {
        FAMILY_ENTRIES
            .iter()
            .filter(move |e| kernel.has_families() && e.strategy == strategy && e.reduces == kernel.reduces())
    }

    /// The entry of `kernel` reading `layout` in `strategy`'s family.
    fn reading(kernel: Kernel, strategy: Strategy, layout: Layout) -> Option<&'static FamilyEntry> {
        Self::of(kernel, strategy).find(|e| e.layouts.contains(&layout))
    }

    fn name(&self, kernel: Kernel) -> &'static str {
        self.names[usize::from(matches!(kernel, Kernel::BackwardReduce | Kernel::BackwardDx))]
    }
}

/// What one kernel needs of a device beyond WebGPU's core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KernelNeeds {
    pub storage_buffers: u32,
    pub uniform_buffers: u32,
    pub invocations: u32,
    pub workgroup_bytes: u32,
}

impl KernelNeeds {
    /// The first limit of `limits` these needs exceed, as
    /// [`Error::DeviceLimit`] naming `kernel`.
    pub(crate) fn check(&self, kernel: &'static str, limits: &wgpu::Limits) -> Result<()> {
        let checks = [
            (
                "max_storage_buffers_per_shader_stage",
                self.storage_buffers,
                limits.max_storage_buffers_per_shader_stage,
            ),
            (
                "max_uniform_buffers_per_shader_stage",
                self.uniform_buffers,
                limits.max_uniform_buffers_per_shader_stage,
            ),
            (
                "max_compute_invocations_per_workgroup",
                self.invocations,
                limits.max_compute_invocations_per_workgroup,
            ),
            (
                "max_compute_workgroup_size_x",
                self.invocations,
                limits.max_compute_workgroup_size_x,
            ),
            (
                "max_compute_workgroup_storage_size",
                self.workgroup_bytes,
                limits.max_compute_workgroup_storage_size,
            ),
        ];
        for (limit, needs, allows) in checks {
            if needs > allows {
                return Err(Error::DeviceLimit {
                    kernel,
                    limit,
                    needs: needs.into(),
                    allows: allows.into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::PARAMS_SLOT;

    #[test]
    fn params_binding_is_one_uniform_slot() {
        assert!(Kernel::Normalize.uniform_size() <= PARAMS_SLOT);
        assert_eq!(std::mem::size_of::<Params>() % 16, 0);
        assert_eq!(std::mem::size_of::<OptimizerParams>() % 16, 0);
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
                // every layout a plan can give a family's kernel is read by one of its entry points
                for layout in Layout::ALL.into_iter().skip(1) {
                    for kernel in families {
                        for dtype in [DType::F32, DType::F16] {
                            let key = KernelKey::new(kernel, dtype, false)
                                .with_layout(layout)
                                .with_tuning(&tuning, subgroups);
                            assert!(
                                FamilyEntry::reading(kernel, strategy, layout).is_some(),
                                "{kernel:?} {layout:?}"
                            );
                            assert!(variants.contains(&key), "{key:?}");
                        }
                    }
                }
                assert!(variants.contains(&KernelKey::new(Kernel::Finalize, DType::F16, true)));
            }
        }
    }
}
