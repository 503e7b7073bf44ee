//! What the crate asks of a device, and how it hears a refusal: error scopes
//! around its own work, so that a shader module, pipeline, allocation or
//! command the device rejects is an error of the call that caused it, never
//! a silent zero, and never a message to an application's own
//! uncaptured-error handler.

use crate::error::{Error, Result};

/// The error filters every scope catches.
const FILTERS: [wgpu::ErrorFilter; 3] = [
    wgpu::ErrorFilter::Validation,
    wgpu::ErrorFilter::OutOfMemory,
    wgpu::ErrorFilter::Internal,
];

/// Runs `work` inside this thread's error scopes on `device` (wgpu's
/// scopes are per thread, so calls on other threads are not caught here):
/// the first error they catch becomes [`Error::Gpu`] naming `what`, and
/// wins over `work`'s own result.
pub(crate) fn scoped<T>(
    device: &wgpu::Device,
    what: impl FnOnce() -> String,
    work: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let scopes = FILTERS.map(|filter| device.push_error_scope(filter));
    let result = work();
    let mut caught = None;
    // innermost first; on native the futures are ready at once
    for scope in scopes.into_iter().rev() {
        if let Some(error) = pollster::block_on(scope.pop()) {
            caught.get_or_insert(error);
        }
    }
    match caught {
        Some(error) => Err(Error::Gpu {
            what: what(),
            message: message_of(&error),
        }),
        None => result,
    }
}

/// wgpu's description of the error (its `Display` says only its kind).
fn message_of(error: &wgpu::Error) -> String {
    let (kind, description) = match error {
        wgpu::Error::OutOfMemory { source } => ("out of memory", source.to_string()),
        wgpu::Error::Validation { description, .. } => ("validation", description.clone()),
        wgpu::Error::Internal { description, .. } => ("internal", description.clone()),
    };
    // wgpu's description repeats the kind before its causes
    let causes = description
        .trim()
        .trim_start_matches("Validation Error")
        .trim_start()
        .trim_start_matches("Caused by:")
        .trim();
    format!("{kind} error: {causes}")
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
