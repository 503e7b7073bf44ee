//! Picking an adapter: list what wgpu sees, then open one by backend and
//! name, as WGPU_BACKEND / WGPU_ADAPTER_NAME or the CLI's --backend /
//! --adapter do.
//!
//!     cargo run --release --example adapters [NAME-SUBSTRING]

use wgpu_batchnorm::{AdapterSelection, GpuContext, list_adapters};

fn main() -> Result<(), wgpu_batchnorm::Error> {
    for a in list_adapters(None) {
        println!(
            "{} ({}, {:?}), max storage binding {} MiB",
            a.info.name,
            a.info.backend,
            a.info.device_type,
            a.limits.max_storage_buffer_binding_size >> 20
        );
    }
    let selection = AdapterSelection {
        backends: None,
        name: std::env::args().nth(1),
        ..Default::default()
    };
    let ctx = GpuContext::new(&selection)?;
    println!("opened: {}", ctx.describe());
    Ok(())
}
