//! Every shader module and pipeline the crate can create
//! ([`KernelKey::every_variant`]), through the compilers this crate's
//! native path never meets:
//! - Tint (Dawn: Chrome, Edge), through Dawn for Node.js
//!   (`scripts/tint/check.mjs`): on its null backend (every WGSL,
//!   uniformity and pipeline rule) and on SwiftShader's Vulkan driver (a
//!   real device), with WebGPU's default limits;
//! - naga's MSL (Metal 2.4), HLSL (shader model 6.0) and SPIR-V 1.3
//!   backends, with each pipeline's override values, the SPIR-V checked by
//!   `spirv-val`; and no entry point reading two globals bound at one
//!   binding, which Metal and D3D refuse.
//!
//! None of these is optional: a missing tool fails the test with what to
//! install (`scripts/test.sh` installs them all).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// The uniform view of a device with WebGPU's default 64 KiB limit.
const UNIFORM_VEC4S: u64 = 4096;

/// Where Debian's `chromium` package puts SwiftShader's Vulkan driver
/// (`WGPU_BATCHNORM_SWIFTSHADER_ICD` overrides it).
const SWIFTSHADER_ICD: &str = "/usr/lib/chromium/vk_swiftshader_icd.json";

/// The variants grouped by module, in a fixed order.
fn variants_by_module() -> Vec<(SourceKey, Vec<KernelKey>)> {
    let mut modules: Vec<(SourceKey, Vec<KernelKey>)> = Vec::new();
    for key in KernelKey::every_variant() {
        match modules.iter_mut().find(|(source, _)| *source == key.source_key()) {
            Some((_, keys)) => keys.push(key),
            None => modules.push((key.source_key(), vec![key])),
        }
    }
    modules
}

/// The module as the WGSL specification, and so Tint, wants it: subgroup
/// builtins need `enable subgroups;`, a directive naga 30 rejects. wgpu
/// compiles the crate's modules with naga on every native backend, and its
/// WebGPU backend does not expose `Features::SUBGROUP` (browsers always get
/// the workgroup-memory form, the same in both dialects), so only this check
/// writes the directive.
fn standard_wgsl(source: SourceKey) -> String {
    let wgsl = source.source(UNIFORM_VEC4S);
    if source.subgroups {
        format!("enable subgroups;\n{wgsl}")
    } else {
        wgsl
    }
}

fn label(source: &SourceKey) -> String {
    format!(
        "{:?} {} {} {}",
        source.kernel,
        source.dtype,
        source.strategy,
        if source.subgroups { "subgroups" } else { "workgroup-sum" }
    )
}

fn key_label(key: &KernelKey) -> String {
    let constants: Vec<String> = key.constants().iter().map(|(n, v)| format!("{n}={v}")).collect();
    format!(
        "{} [{}] ({})",
        key.entry_point(),
        constants.join(" "),
        label(&key.source_key())
    )
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgpu-batchnorm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The modules and pipelines as `scripts/tint/check.mjs` reads them.
fn tint_manifest() -> serde_json::Value {
    use serde_json::json;
    let mut modules = Vec::new();
    let mut pipelines = Vec::new();
    for (index, (source, keys)) in variants_by_module().into_iter().enumerate() {
        modules.push(json!({ "label": label(&source), "code": standard_wgsl(source) }));
        for key in keys {
            let bindings: Vec<_> = key
                .kernel
                .layout_entries(UNIFORM_VEC4S * 16)
                .iter()
                .map(|e| {
                    let wgpu::BindingType::Buffer {
                        ty,
                        has_dynamic_offset,
                        min_binding_size,
                    } = e.ty
                    else {
                        unreachable!("the kernels bind buffers only")
                    };
                    let kind = match ty {
                        wgpu::BufferBindingType::Uniform => "uniform",
                        wgpu::BufferBindingType::Storage { read_only: true } => "read-only-storage",
                        wgpu::BufferBindingType::Storage { read_only: false } => "storage",
                    };
                    json!({
                        "binding": e.binding,
                        "kind": kind,
                        "dynamicOffset": has_dynamic_offset,
                        "minBindingSize": min_binding_size.map_or(0, |s| s.get()),
                    })
                })
                .collect();
            let constants: serde_json::Map<String, serde_json::Value> = key
                .constants()
                .into_iter()
                .map(|(n, v)| (n.to_string(), json!(v)))
                .collect();
            pipelines.push(json!({
                "label": key_label(&key),
                "module": index,
                "entryPoint": key.entry_point(),
                "constants": constants,
                "bindings": bindings,
            }));
        }
    }
    json!({ "modules": modules, "pipelines": pipelines, "features": ["subgroups"] })
}

/// Runs the Tint check on Dawn's `backend`, with `env` for the node process.
fn run_tint(backend: &str, env: &[(&str, &str)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/tint/check.mjs");
    let package = root.join("scripts/tint/node_modules/webgpu/package.json");
    assert!(
        package.exists(),
        "the Tint check needs Dawn for Node.js: run scripts/ensure-tint.sh (npm ci in scripts/tint; Node.js \
         and npm from your distribution), or scripts/test.sh, which does it"
    );
    let dir = scratch_dir(&format!("tint-{backend}"));
    let manifest = dir.join("manifest.json");
    std::fs::write(&manifest, serde_json::to_vec(&tint_manifest()).unwrap()).unwrap();
    let out = Command::new("node")
        .arg(&script)
        .arg(&manifest)
        .arg(backend)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): install Node.js (apt-get install -y nodejs npm)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "Tint ({backend}) refused variants:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(", 0 failures"), "{stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tint_compiles_every_variant_on_dawns_null_backend() {
    run_tint("null", &[]);
}

#[test]
fn tint_compiles_every_variant_on_swiftshader() {
    let icd = std::env::var("WGPU_BATCHNORM_SWIFTSHADER_ICD").unwrap_or_else(|_| SWIFTSHADER_ICD.to_string());
    assert!(
        Path::new(&icd).exists(),
        "no SwiftShader Vulkan driver at {icd}: on Debian `apt-get install -y chromium` ships it (scripts/test.sh \
         installs it), or set WGPU_BATCHNORM_SWIFTSHADER_ICD to its ICD json"
    );
    run_tint("vulkan", &[("VK_ICD_FILENAMES", icd.as_str())]);
}

/// A parsed and validated module with the capabilities its source needs.
fn naga_module(source: SourceKey) -> (naga::Module, naga::valid::ModuleInfo) {
    let wgsl = source.source(UNIFORM_VEC4S);
    let module = naga::front::wgsl::parse_str(&wgsl)
        .unwrap_or_else(|e| panic!("{}: {}", label(&source), e.emit_to_string(&wgsl)));
    let mut capabilities = naga::valid::Capabilities::all();
    if !source.subgroups {
        capabilities -= naga::valid::Capabilities::SUBGROUP | naga::valid::Capabilities::SUBGROUP_BARRIER;
    }
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", label(&source), e.emit_to_string(&wgsl)));
    (module, info)
}

/// The resource bindings an entry point reads or writes, each once: Metal
/// and D3D cannot bind two globals at one slot.
fn used_bindings(module: &naga::Module, info: &naga::valid::ModuleInfo, entry: &str) -> Vec<(u32, bool)> {
    let index = module
        .entry_points
        .iter()
        .position(|e| e.name == entry)
        .unwrap_or_else(|| panic!("no entry point {entry}"));
    let function = info.get_entry_point(index);
    let mut seen: HashMap<u32, &str> = HashMap::new();
    let mut bindings = Vec::new();
    for (handle, global) in module.global_variables.iter() {
        let Some(binding) = &global.binding else { continue };
        if function[handle].is_empty() {
            continue;
        }
        let name = global.name.as_deref().unwrap_or("?");
        if let Some(other) = seen.insert(binding.binding, name) {
            panic!(
                "{entry} uses {other} and {name}, both at binding {}: Metal and D3D refuse two globals at one slot",
                binding.binding
            );
        }
        let mutable = matches!(global.space, naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE));
        bindings.push((binding.binding, mutable));
    }
    bindings
}

/// What the entry point uses agrees with what the host binds and checks:
/// every used binding is in the kernel's layout with the same kind, and
/// its workgroup memory is within `Kernel::needs`.
fn check_against_host(
    key: &KernelKey,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    bindings: &[(u32, bool)],
) {
    let entry = key.entry_point();
    let layout = key.kernel.layout_entries(UNIFORM_VEC4S * 16);
    for (_, global) in module.global_variables.iter() {
        let Some(binding) = &global.binding else { continue };
        if !bindings.iter().any(|&(b, _)| b == binding.binding) {
            continue;
        }
        let host = layout
            .iter()
            .find(|e| e.binding == binding.binding)
            .unwrap_or_else(|| panic!("{entry}: binding {} is not in the host's layout", binding.binding));
        let wgpu::BindingType::Buffer { ty, .. } = host.ty else {
            unreachable!()
        };
        let agrees = match (global.space, ty) {
            (naga::AddressSpace::Uniform, wgpu::BufferBindingType::Uniform) => true,
            (naga::AddressSpace::Storage { access }, wgpu::BufferBindingType::Storage { read_only }) => {
                read_only != access.contains(naga::StorageAccess::STORE)
            }
            _ => false,
        };
        assert!(
            agrees,
            "{entry}: {:?} binding {} is {ty:?} on the host",
            global.name, binding.binding
        );
    }
    let index = module.entry_points.iter().position(|e| e.name == entry).unwrap();
    let function = info.get_entry_point(index);
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).unwrap();
    let workgroup_bytes: u32 = module
        .global_variables
        .iter()
        .filter(|(h, g)| g.space == naga::AddressSpace::WorkGroup && !function[*h].is_empty())
        .map(|(_, g)| layouter[g.ty].size)
        .sum();
    let needs = key.kernel.needs(key.strategy);
    assert!(
        workgroup_bytes <= needs.workgroup_bytes,
        "{entry} uses {workgroup_bytes} bytes of workgroup memory, Kernel::needs says {}",
        needs.workgroup_bytes
    );
    let storage = bindings.iter().filter(|&&(b, _)| {
        layout.iter().any(|e| {
            e.binding == b
                && matches!(
                    e.ty,
                    wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { .. },
                        ..
                    }
                )
        })
    });
    assert!(storage.count() as u32 <= needs.storage_buffers, "{entry}");
    assert_eq!(
        module.entry_points[index].workgroup_size,
        [needs.invocations, 1, 1],
        "{entry}"
    );
}

fn spirv_val(path: &Path) -> std::result::Result<(), String> {
    let out = Command::new("spirv-val")
        .args(["--target-env", "vulkan1.1"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run spirv-val ({e}): install SPIRV-Tools (apt-get install -y spirv-tools; scripts/test.sh does it)")
        });
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn naga_translates_every_variant_for_metal_d3d_and_vulkan() {
    use naga::back::{hlsl, msl, spv};
    let dir = scratch_dir("spirv");
    let mut failures = Vec::new();
    let mut pipelines = 0;
    for (source, keys) in variants_by_module() {
        let (module, info) = naga_module(source);
        for key in keys {
            pipelines += 1;
            let what = key_label(&key);
            let entry = key.entry_point();
            let constants: naga::back::PipelineConstants =
                key.constants().into_iter().map(|(n, v)| (n.to_string(), v)).collect();
            let (module, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, entry)),
                &constants,
            )
            .unwrap_or_else(|e| panic!("{what}: overrides: {e}"));
            let bindings = used_bindings(&module, &info, entry);
            check_against_host(&key, &module, &info, &bindings);

            let resources = msl::EntryPointResources {
                resources: bindings
                    .iter()
                    .map(|&(binding, mutable)| {
                        let target = msl::BindTarget {
                            buffer: Some(binding as u8),
                            mutable,
                            ..Default::default()
                        };
                        (naga::ResourceBinding { group: 0, binding }, target)
                    })
                    .collect(),
                immediates_buffer: None,
                sizes_buffer: Some(30),
            };
            let options = msl::Options {
                lang_version: (2, 4),
                per_entry_point_map: [(entry.to_string(), resources)].into_iter().collect(),
                fake_missing_bindings: false,
                ..Default::default()
            };
            let pipeline = msl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
                ..Default::default()
            };
            if let Err(e) = msl::write_string(&module, &info, &options, &pipeline) {
                failures.push(format!("{what}: MSL 2.4: {e}"));
            }

            let options = hlsl::Options {
                shader_model: hlsl::ShaderModel::V6_0,
                binding_map: bindings
                    .iter()
                    .map(|&(binding, _)| {
                        let target = hlsl::BindTarget {
                            space: 0,
                            register: binding,
                            binding_array_size: None,
                            dynamic_storage_buffer_offsets_index: None,
                            restrict_indexing: false,
                        };
                        (naga::ResourceBinding { group: 0, binding }, target)
                    })
                    .collect(),
                fake_missing_bindings: false,
                // num_workgroups comes from a constant buffer on D3D
                special_constants_binding: Some(hlsl::BindTarget {
                    space: 1,
                    register: 0,
                    binding_array_size: None,
                    dynamic_storage_buffer_offsets_index: None,
                    restrict_indexing: false,
                }),
                ..Default::default()
            };
            let pipeline = hlsl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
            };
            let mut hlsl_source = String::new();
            if let Err(e) = hlsl::Writer::new(&mut hlsl_source, &options, &pipeline).write(&module, &info, None) {
                failures.push(format!("{what}: HLSL SM 6.0: {e}"));
            }

            let options = spv::Options {
                lang_version: (1, 3),
                ..Default::default()
            };
            let pipeline = spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: entry.to_string(),
            };
            match spv::write_vec(&module, &info, &options, Some(&pipeline)) {
                Err(e) => failures.push(format!("{what}: SPIR-V 1.3: {e}")),
                Ok(words) => {
                    let path = dir.join(format!("{pipelines}.spv"));
                    std::fs::write(&path, bytemuck::cast_slice(&words)).unwrap();
                    if let Err(e) = spirv_val(&path) {
                        failures.push(format!("{what}: spirv-val: {e}"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {pipelines} pipelines:\n{}",
        failures.len(),
        failures.join("\n")
    );
    std::fs::remove_dir_all(dir).unwrap();
    println!("{pipelines} pipelines translate to MSL 2.4, HLSL SM 6.0 and SPIR-V 1.3");
}
