//! The WGSL kernels: module sources composed from `shaders/`, bind-group
//! layouts, and a pipeline cache keyed by the variant (`variants::KernelKey`).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::params::{optimizer_params_wgsl, params_wgsl, uniform_view_bytes};
use crate::tuning::{PlanTuning, Strategy};
use crate::variants::{Kernel, KernelKey, SourceKey, WORKGROUP};

const PARAMS_WGSL: &str = include_str!("../shaders/params.wgsl");
const FLOAT16_WGSL: &str = include_str!("../shaders/float16.wgsl");
const CHANNEL_TILES_WGSL: &str = include_str!("../shaders/channel_tiles.wgsl");
const MASK_WGSL: &str = include_str!("../shaders/mask.wgsl");
const STATISTICS_WGSL: &str = include_str!("../shaders/statistics.wgsl");
const FINALIZE_WGSL: &str = include_str!("../shaders/finalize.wgsl");
const FINALIZE_LANES_WGSL: &str = include_str!("../shaders/finalize_lanes.wgsl");
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
const WALK_TILES_WGSL: &str = include_str!("../shaders/walk_tiles.wgsl");
const WALK_TILES_COALESCED_WGSL: &str = include_str!("../shaders/walk_tiles_coalesced.wgsl");
const WALK_VALUES_WGSL: &str = include_str!("../shaders/walk_values.wgsl");
const WALK_VALUES_COALESCED_WGSL: &str = include_str!("../shaders/walk_values_coalesced.wgsl");

impl Kernel {
    /// The WGSL source of one module: the uniform block and flags
    /// generated from `params.rs`, the shared helpers and float16
    /// conversion, the shared pieces the kernel uses (among them how
    /// `dtype` stores four values, for the vec4 layouts), and the kernel's
    /// own file. A kernel with families (statistics, normalise, backward
    /// reduce, dx) is then its family's walks (`walk_*.wgsl`, shared by the
    /// forward and backward kernels), which call the functions of the
    /// kernel's file; the coalesced family adds its file after the serial
    /// one (sharing bindings and helpers), with the workgroup sum of the
    /// device (subgroups or workgroup memory). Their entry points are
    /// generated: one per entry point name, calling its layout's walk.
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
            Kernel::Finalize => vec![FINALIZE_LANES_WGSL, FINALIZE_WGSL],
            Kernel::Normalize => vec![CHANNEL_WALK_WGSL, quad, NORMALIZE_WGSL],
            Kernel::BackwardReduce => vec![CHANNEL_TILES_WGSL, MASK_WGSL, quad, BACKWARD_REDUCE_WGSL],
            Kernel::BackwardFinalize => vec![FINALIZE_LANES_WGSL, BACKWARD_FINALIZE_WGSL],
            Kernel::BackwardDx => vec![MASK_WGSL, CHANNEL_WALK_WGSL, quad, BACKWARD_DX_WGSL],
            Kernel::Stream => vec![STREAM_WGSL],
            // its own uniform block
            Kernel::SgdStep | Kernel::Constrain => {
                return [optimizer_params_wgsl().as_str(), FLOAT16_WGSL, OPTIMIZER_WGSL].join("\n");
            }
        };
        pieces.extend(match (self, coalesced) {
            (Kernel::PartialStats, false) | (Kernel::BackwardReduce, false) => vec![WALK_TILES_WGSL],
            (Kernel::PartialStats, true) => vec![COALESCED_LANES_WGSL, reduce, STATISTICS_COALESCED_WGSL],
            (Kernel::BackwardReduce, true) => vec![COALESCED_LANES_WGSL, reduce, BACKWARD_REDUCE_COALESCED_WGSL],
            (Kernel::Normalize | Kernel::BackwardDx, false) => vec![WALK_VALUES_WGSL],
            _ => vec![],
        });
        if coalesced {
            pieces.push(if self.reduces() {
                WALK_TILES_COALESCED_WGSL
            } else {
                WALK_VALUES_COALESCED_WGSL
            });
        }
        let mut prelude = format!("const UNIFORM_VIEW_VEC4S: u32 = {uniform_vec4s}u;\n");
        let mut entry_points = String::new();
        if self.has_families() {
            prelude += &format!("const WG: u32 = {WORKGROUP}u;\n");
            entry_points = self.entry_points(strategy);
        }
        let params = params_wgsl();
        [prelude.as_str(), params.as_str(), PARAMS_WGSL, FLOAT16_WGSL]
            .into_iter()
            .chain(pieces)
            .chain([entry_points.as_str()])
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The entry points of a kernel with families, in `strategy`'s family:
    /// one for each (name, walk) `KernelKey::family_entry_points` gives (a
    /// row of the family entry table), with the builtins the family's
    /// walks take.
    fn entry_points(self, strategy: Strategy) -> String {
        let builtins = match (strategy, self.reduces()) {
            (Strategy::Serial, _) => "@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32",
            (Strategy::Coalesced, false) => {
                "@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, \
                 @builtin(local_invocation_index) lid: u32"
            }
            (Strategy::Coalesced, true) => "@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes",
        };
        let mut out = String::new();
        for (name, walk) in KernelKey::family_entry_points(self, strategy) {
            out += &format!(
                "@compute @workgroup_size({})\nfn {name}({builtins}) {{\n    {walk};\n}}\n\n",
                self.workgroup_size(),
            );
        }
        out
    }
}

impl SourceKey {
    /// The module's WGSL as naga (wgpu's native compiler) takes it; see
    /// [`Kernel::source`].
    pub(crate) fn source(&self, uniform_vec4s: u64) -> String {
        self.kernel
            .source(self.dtype, self.strategy, self.subgroups, uniform_vec4s)
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

/// Bind-group layouts (one per kernel) and the pipelines compiled so far,
/// or why the device refused them: a kernel over the device's limits, a
/// module or pipeline the device rejects (an error scope around every
/// creation catches it). A refusal is kept and returned by every call
/// that needs the kernel.
pub(crate) struct Kernels {
    /// Bytes of the per-channel parameters' uniform view on this device.
    pub(crate) uniform_view: u64,
    /// Bound as the uniform view by kernels that read their parameters
    /// from storage (the layout has the binding either way), so that a
    /// layer's parameter buffers need not be padded to the view.
    pub(crate) uniform_view_placeholder: wgpu::Buffer,
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
    pub(crate) fn new(gpu: &Device) -> Self {
        let device = &gpu.device;
        let limits = device.limits();
        let uniform_view = uniform_view_bytes(&limits);
        let layouts = Kernel::ALL
            .into_iter()
            .map(|kernel| {
                let what = format!("the bind group layout of {}", kernel.entry_point());
                let layouts = gpu.scoped(&what, || {
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
                });
                (kernel, layouts.map_err(Refusal::from))
            })
            .collect();
        Kernels {
            uniform_view,
            uniform_view_placeholder: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("uniform view placeholder"),
                size: uniform_view,
                usage: wgpu::BufferUsages::UNIFORM,
                mapped_at_creation: false,
            }),
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
    pub(crate) fn precompile(&self, device: &Device, tuning: &PlanTuning, uniform_params: bool) {
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
    pub(crate) fn pipeline(&self, device: &Device, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(made) = cache.get(&key) {
            return made.clone().map_err(Error::from);
        }
        let made = self.create_pipeline(device, key).map_err(Refusal::from);
        cache.insert(key, made.clone());
        made.map_err(Error::from)
    }

    fn create_pipeline(&self, gpu: &Device, key: KernelKey) -> Result<wgpu::ComputePipeline> {
        key.kernel.needs(key.strategy).check(key.entry_point(), &gpu.limits)?;
        let layout = &self.layouts(key.kernel)?.1;
        let module = self.module(gpu, key.source_key())?;
        gpu.scoped(&format!("compiling pipeline {}", key.entry_point()), || {
            Ok(gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
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
        })
    }

    /// One module per source: the variants of a family differ by entry
    /// point and override constants only.
    fn module(&self, gpu: &Device, source: SourceKey) -> Result<wgpu::ShaderModule> {
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
        let what = format!("compiling the shader module of {}", source.kernel.entry_point());
        let made = gpu
            .scoped(&what, || {
                Ok(gpu.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(source.kernel.entry_point()),
                    source: wgpu::ShaderSource::Wgsl(wgsl.into()),
                }))
            })
            .map_err(Refusal::from);
        modules.insert(source, made.clone());
        made.map_err(Error::from)
    }
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
                    let mut names: Vec<&str> = KernelKey::family_entry_points(kernel, strategy)
                        .map(|(name, _)| name)
                        .collect();
                    if !kernel.has_families() {
                        names.push(KernelKey::new(kernel, dtype, false).entry_point());
                    }
                    for name in names {
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
}
