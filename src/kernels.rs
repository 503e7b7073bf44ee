//! The WGSL kernels: their uniform block, bind-group layouts and a pipeline
//! cache keyed by what a variant depends on.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::tensor::DType;

/// Workgroup size of the statistics and normalise kernels (`WG` in WGSL).
pub(crate) const WORKGROUP: u32 = 256;
/// Workgroup size of the finalize kernel.
pub(crate) const FINALIZE_WORKGROUP: u32 = 64;
/// Elements (f32) or packed words (f16) one normalise invocation handles.
pub(crate) const NORMALIZE_PER_THREAD: u32 = 4;
/// Bytes between two uniform slots (wgpu's maximum uniform offset alignment).
pub(crate) const PARAMS_SLOT: u64 = 256;

pub(crate) const FLAG_MASKED: u32 = 1;
pub(crate) const FLAG_TRAINING: u32 = 2;
pub(crate) const FLAG_RENORM: u32 = 4;
pub(crate) const FLAG_CENTER: u32 = 8;
pub(crate) const FLAG_SCALE: u32 = 16;
pub(crate) const FLAG_RMIN: u32 = 32;
pub(crate) const FLAG_RMAX: u32 = 64;
pub(crate) const FLAG_DMAX: u32 = 128;

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
    pub _pad2: u32,
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
    pub _pad0: u32,
    pub _pad1: u32,
}

const PARAMS_WGSL: &str = include_str!("../shaders/params.wgsl");
const STATISTICS_WGSL: &str = include_str!("../shaders/statistics.wgsl");
const FINALIZE_WGSL: &str = include_str!("../shaders/finalize.wgsl");
const NORMALIZE_WGSL: &str = include_str!("../shaders/normalize.wgsl");

/// A kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    PartialStats,
    Finalize,
    Normalize,
}

impl Kernel {
    pub(crate) const ALL: [Kernel; 3] = [Kernel::PartialStats, Kernel::Finalize, Kernel::Normalize];

    /// The WGSL source: the shared uniform block followed by the family's file.
    pub(crate) fn source(self) -> String {
        let body = match self {
            Kernel::PartialStats => STATISTICS_WGSL,
            Kernel::Finalize => FINALIZE_WGSL,
            Kernel::Normalize => NORMALIZE_WGSL,
        };
        format!("{PARAMS_WGSL}\n{body}")
    }

    pub(crate) fn entry_point(self) -> &'static str {
        match self {
            Kernel::PartialStats => "partial_stats",
            Kernel::Finalize => "finalize",
            Kernel::Normalize => "normalize",
        }
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
        }
    }
}

/// One compiled variant: the family plus what its override constants fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KernelKey {
    pub kernel: Kernel,
    pub dtype: DType,
    pub masked: bool,
}

impl KernelKey {
    fn constants(&self) -> Vec<(&'static str, f64)> {
        let f16 = if self.dtype == DType::F16 { 1.0 } else { 0.0 };
        match self.kernel {
            Kernel::PartialStats => vec![("IS_F16", f16), ("MASKED", self.masked as u8 as f64)],
            Kernel::Normalize => vec![("IS_F16", f16)],
            Kernel::Finalize => vec![],
        }
    }
}

/// Bind-group layouts (one per family) and the pipelines compiled so far.
pub(crate) struct Kernels {
    layouts: HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    pipelines: Mutex<HashMap<KernelKey, wgpu::ComputePipeline>>,
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        let layouts = Kernel::ALL
            .into_iter()
            .map(|kernel| {
                let mut entries = vec![wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
                        min_binding_size: wgpu::BufferSize::new(
                            std::mem::size_of::<Params>() as u64
                        ),
                    },
                    count: None,
                }];
                for (i, &read_only) in kernel.storage_bindings().iter().enumerate() {
                    entries.push(wgpu::BindGroupLayoutEntry {
                        binding: i as u32 + 1,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage { read_only },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    });
                }
                let bind = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(kernel.entry_point()),
                    entries: &entries,
                });
                let pipeline = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(kernel.entry_point()),
                    bind_group_layouts: &[Some(&bind)],
                    immediate_size: 0,
                });
                (kernel, (bind, pipeline))
            })
            .collect();
        Kernels {
            layouts,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn bind_group_layout(&self, kernel: Kernel) -> &wgpu::BindGroupLayout {
        &self.layouts[&kernel].0
    }

    /// The pipeline for `key`, compiled on first use and cached for the
    /// device's lifetime.
    pub(crate) fn pipeline(&self, device: &wgpu::Device, key: KernelKey) -> wgpu::ComputePipeline {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(key.kernel.entry_point()),
                    source: wgpu::ShaderSource::Wgsl(key.kernel.source().into()),
                });
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key.kernel.entry_point()),
                    layout: Some(&self.layouts[&key.kernel].1),
                    module: &module,
                    entry_point: Some(key.kernel.entry_point()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &key.constants(),
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
            })
            .clone()
    }
}

/// A 2-D grid for `groups` workgroups: WebGPU caps each dimension at 65535.
pub(crate) fn grid(groups: u32) -> (u32, u32) {
    const MAX: u32 = 65535;
    if groups <= MAX {
        (groups.max(1), 1)
    } else {
        (MAX, groups.div_ceil(MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel parses and validates with naga, and its workgroup size is
    /// the one the host plans dispatches with.
    #[test]
    fn shaders_validate_and_match_host_constants() {
        for kernel in Kernel::ALL {
            let source = kernel.source();
            let module = naga::front::wgsl::parse_str(&source)
                .unwrap_or_else(|e| panic!("{kernel:?}: {}", e.emit_to_string(&source)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{kernel:?}: {e:?}"));
            let entry = module
                .entry_points
                .iter()
                .find(|e| e.name == kernel.entry_point())
                .expect("entry point");
            let expected = match kernel {
                Kernel::Finalize => FINALIZE_WORKGROUP,
                _ => WORKGROUP,
            };
            assert_eq!(entry.workgroup_size, [expected, 1, 1], "{kernel:?}");
        }
    }

    #[test]
    fn params_is_one_uniform_slot() {
        assert!(std::mem::size_of::<Params>() as u64 <= PARAMS_SLOT);
        assert_eq!(std::mem::size_of::<Params>() % 16, 0);
    }

    #[test]
    fn grids_cover_every_workgroup() {
        for groups in [1, 65535, 65536, 200_000] {
            let (x, y) = grid(groups);
            assert!(x <= 65535 && y <= 65535 && x * y >= groups);
        }
    }
}
