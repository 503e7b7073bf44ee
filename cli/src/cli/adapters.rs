//! `wgpu-batchnorm adapters`.

use wgpu_batchnorm::{AdapterSelection, list_adapters};

pub(crate) fn run(selection: &AdapterSelection) -> Result<u8, String> {
    let mut adapters = list_adapters(selection.backends);
    if let Some(name) = &selection.name {
        let name = name.to_lowercase();
        adapters.retain(|a| a.info.name.to_lowercase().contains(&name));
    }
    if adapters.is_empty() {
        return Err(wgpu_batchnorm::Error::NoAdapter("wgpu sees no adapter matching the selection".into()).to_string());
    }
    for a in adapters {
        let i = &a.info;
        let l = &a.limits;
        println!("{} ({})", i.name, i.backend);
        println!("  device type:          {:?}", i.device_type);
        println!("  driver:               {} {}", i.driver, i.driver_info);
        println!(
            "  max storage binding:  {} MiB",
            l.max_storage_buffer_binding_size >> 20
        );
        println!("  max buffer size:      {} MiB", l.max_buffer_size >> 20);
        println!(
            "  max workgroups/dim:   {} (invocations per workgroup {})",
            l.max_compute_workgroups_per_dimension, l.max_compute_invocations_per_workgroup
        );
        println!("  storage buffers/stage: {}", l.max_storage_buffers_per_shader_stage);
        let f = a.features;
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        let subgroups = if !f.contains(wgpu::Features::SUBGROUP) {
            "no".to_string()
        } else if i.subgroup_min_size == i.subgroup_max_size {
            format!("yes (size {})", i.subgroup_min_size)
        } else {
            format!("yes (sizes {}-{})", i.subgroup_min_size, i.subgroup_max_size)
        };
        println!(
            "  features:             shader-f16 {}, subgroups {subgroups}, timestamp queries {}",
            has(wgpu::Features::SHADER_F16),
            has(wgpu::Features::TIMESTAMP_QUERY)
        );
    }
    Ok(0)
}
