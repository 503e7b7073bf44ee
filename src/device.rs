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
