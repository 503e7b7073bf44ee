//! What the crate asks of a device, and how it hears a refusal: error scopes
//! around its own work, so that a shader module, pipeline, allocation or
//! command the device rejects is an error of the call that caused it, never
//! a silent zero, and never a message to an application's own
//! uncaptured-error handler. Below the kernels: adapters, the device and
//! its queue, limits and error scopes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::tuning::KernelChoice;

/// The error filters every scope catches.
const FILTERS: [wgpu::ErrorFilter; 3] = [
    wgpu::ErrorFilter::Validation,
    wgpu::ErrorFilter::OutOfMemory,
    wgpu::ErrorFilter::Internal,
];

/// What an error scope caught, as the crate reports it.
fn gpu_error(what: String, error: &wgpu::Error) -> Error {
    Error::Gpu {
        what,
        message: message_of(error),
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

/// Which adapter [`crate::GpuContext::new`] should open.
#[derive(Debug, Clone, Default)]
pub struct AdapterSelection {
    /// Backends to search; `None` searches all of them.
    pub backends: Option<wgpu::Backends>,
    /// A case-insensitive substring of the adapter's name.
    pub name: Option<String>,
    /// The kernel choice of the new context; `None` reads
    /// `WGPU_BATCHNORM_KERNELS` (and `Auto` where it is unset).
    pub kernels: Option<KernelChoice>,
}

impl AdapterSelection {
    /// Reads `WGPU_BACKEND` (e.g. `vulkan`, `gl`, `metal,dx12`) and
    /// `WGPU_ADAPTER_NAME` (a substring of the adapter name), as wgpu's own
    /// helpers do.
    pub fn from_env() -> Self {
        AdapterSelection {
            backends: wgpu::Backends::from_env(),
            name: std::env::var("WGPU_ADAPTER_NAME").ok().filter(|s| !s.is_empty()),
            kernels: None,
        }
    }

    /// Parses a backend name as the CLI and `WGPU_BACKEND` accept it.
    pub fn parse_backend(name: &str) -> Option<wgpu::Backends> {
        let backends = wgpu::Backends::from_comma_list(name);
        (!backends.is_empty()).then_some(backends)
    }
}

static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// One adapter as the `adapters` command reports it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdapterReport {
    /// What the adapter says of itself.
    pub info: wgpu::AdapterInfo,
    /// The adapter's limits.
    pub limits: wgpu::Limits,
    /// The adapter's optional features.
    pub features: wgpu::Features,
}

/// Every adapter wgpu finds on `backends` (all when `None`). Not on the
/// web: use [`list_adapters_async`].
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters(backends: Option<wgpu::Backends>) -> Vec<AdapterReport> {
    pollster::block_on(list_adapters_async(backends))
}

/// Every adapter wgpu finds on `backends` (all when `None`).
pub async fn list_adapters_async(backends: Option<wgpu::Backends>) -> Vec<AdapterReport> {
    let instance = new_instance(backends);
    instance
        .enumerate_adapters(backends.unwrap_or(wgpu::Backends::all()))
        .await
        .into_iter()
        .map(|a| AdapterReport {
            info: a.get_info(),
            limits: a.limits(),
            features: a.features(),
        })
        .collect()
}

fn new_instance(backends: Option<wgpu::Backends>) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends.unwrap_or(wgpu::Backends::all());
    desc.backend_options = wgpu::BackendOptions::from_env_or_default();
    wgpu::Instance::new(desc)
}

/// Hardware first, then native APIs before GL.
fn preference(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (device, backend)
}

/// One opened device and what the crate keeps of it: its queue, the
/// adapter it came from, limits it may cap, a placeholder binding, and
/// whether it was lost. Knows nothing of kernels.
pub(crate) struct Device {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    /// The adapter it was opened on; `None` for an application's device.
    pub(crate) adapter_info: Option<wgpu::AdapterInfo>,
    /// The device's limits and its adapter's type, read once: every call
    /// plans with them (wgpu answers each query afresh, from JavaScript on
    /// the web).
    pub(crate) limits: wgpu::Limits,
    pub(crate) device_type: wgpu::DeviceType,
    /// Tells this device's tensors from other devices': wgpu compares
    /// devices by an id that two identically built instances share.
    pub(crate) id: u64,
    /// Bytes one storage binding may cover (the device limit unless capped).
    max_binding: AtomicU64,
    /// A 4-byte buffer bound where a kernel's optional input is absent.
    pub(crate) placeholder: wgpu::Buffer,
    /// Why the device was lost, once it is (only for devices this crate
    /// requested: an application's device keeps its own callback).
    lost: Arc<Mutex<Option<String>>>,
    /// Buffers and bind groups the crate has created on this device: a
    /// training loop's calls create none once warm (tests/memory.rs).
    buffers_created: AtomicU64,
    bind_groups_created: AtomicU64,
    /// The web: the scopes of earlier calls whose answers the browser has
    /// not given yet, with what each call was doing.
    #[cfg(target_arch = "wasm32")]
    pending: Mutex<Vec<PendingScope>>,
}

/// An error scope's answer still to come (the web), and its call.
#[cfg(target_arch = "wasm32")]
type PendingScope = (
    String,
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<wgpu::Error>>>>,
);

impl Device {
    /// Opens the adapter `selection` names (or the best one) and requests a
    /// device with the adapter's own limits (storage bindings may exceed
    /// wgpu's 128 MiB default) and, where it has them, timestamps and
    /// subgroup operations.
    pub(crate) async fn open(selection: &AdapterSelection) -> Result<Device> {
        let instance = new_instance(selection.backends);
        let backends = selection.backends.unwrap_or(wgpu::Backends::all());
        let mut adapters = instance.enumerate_adapters(backends).await;
        let wanted = selection.name.as_ref().map(|n| n.to_lowercase());
        if let Some(name) = &wanted {
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(name));
        }
        adapters.sort_by_key(|a| preference(&a.get_info()));
        let Some(adapter) = adapters.into_iter().next() else {
            let what = match (&selection.name, selection.backends) {
                (Some(n), Some(b)) => format!("no adapter named like {n:?} on backends {b:?}"),
                (Some(n), None) => format!("no adapter named like {n:?}"),
                (None, Some(b)) => format!("none on backends {b:?}"),
                (None, None) => "wgpu sees no adapter at all".to_string(),
            };
            return Err(Error::NoAdapter(what));
        };
        let info = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-batchnorm"),
                // timestamps let the benchmark time on the device's own
                // clock; subgroups speed up the coalesced reductions
                required_features: adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|source| Error::RequestDevice {
                adapter: info.name.clone(),
                source,
            })?;
        let opened = Device::new(device, queue, Some(info));
        let lost = opened.lost.clone();
        opened.device.set_device_lost_callback(move |reason, message| {
            // dropping the context destroys the device: no one is left to tell
            if reason != wgpu::DeviceLostReason::Destroyed {
                *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{reason:?}: {message}"));
            }
        });
        Ok(opened)
    }

    /// An application's device and queue, its callbacks left as they are.
    pub(crate) fn wrap(device: wgpu::Device, queue: wgpu::Queue) -> Device {
        Device::new(device, queue, None)
    }

    fn new(device: wgpu::Device, queue: wgpu::Queue, adapter_info: Option<wgpu::AdapterInfo>) -> Device {
        let limits = device.limits();
        let placeholder = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("placeholder"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let device_type = device.adapter_info().device_type;
        Device {
            device,
            queue,
            adapter_info,
            id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            max_binding: AtomicU64::new(limits.max_storage_buffer_binding_size.min(limits.max_buffer_size)),
            limits,
            device_type,
            placeholder,
            lost: Arc::new(Mutex::new(None)),
            buffers_created: AtomicU64::new(0),
            bind_groups_created: AtomicU64::new(0),
            #[cfg(target_arch = "wasm32")]
            pending: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of the crate's (counted).
    pub(crate) fn create_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.buffers_created.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// A buffer of the crate's holding `contents` (counted).
    pub(crate) fn create_buffer_init(&self, label: &str, contents: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.buffers_created.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage,
        })
    }

    /// A bind group of the crate's (counted).
    pub(crate) fn create_bind_group(&self, desc: &wgpu::BindGroupDescriptor) -> wgpu::BindGroup {
        self.bind_groups_created.fetch_add(1, Ordering::Relaxed);
        self.device.create_bind_group(desc)
    }

    /// (buffers, bind groups) the crate has created on this device so far.
    pub(crate) fn created(&self) -> (u64, u64) {
        (
            self.buffers_created.load(Ordering::Relaxed),
            self.bind_groups_created.load(Ordering::Relaxed),
        )
    }

    /// Runs `work` (the crate's own device work for one call) inside this
    /// thread's error scopes (validation, out of memory, internal; wgpu's
    /// scopes are per thread): what they catch is an [`Error::Gpu`] naming
    /// `what`, winning over `work`'s own result, and so is a lost device.
    ///
    /// On native backends the scopes answer at once. In a browser they
    /// answer later, and a call cannot wait: each call first reports what
    /// earlier calls' scopes have answered since ([`Device::settle`] waits
    /// for every answer).
    pub(crate) fn scoped<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        #[cfg(target_arch = "wasm32")]
        self.answered()?;
        let scopes = FILTERS.map(|filter| self.device.push_error_scope(filter));
        let result = work();
        #[cfg(not(target_arch = "wasm32"))]
        let result = {
            let mut caught = None;
            // innermost first; on native the futures are ready at once
            for scope in scopes.into_iter().rev() {
                if let Some(error) = pollster::block_on(scope.pop()) {
                    caught.get_or_insert(error);
                }
            }
            match caught {
                Some(error) => Err(gpu_error(what.to_string(), &error)),
                None => result,
            }
        };
        #[cfg(target_arch = "wasm32")]
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for scope in scopes.into_iter().rev() {
                pending.push((what.to_string(), Box::pin(scope.pop())));
            }
        }
        if let Some(reason) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(Error::Gpu {
                what: what.to_string(),
                message: format!("the device was lost ({reason})"),
            });
        }
        result
    }

    /// The web: the first error among the scopes that have answered
    /// (polled once each, never waited on).
    #[cfg(target_arch = "wasm32")]
    fn answered(&self) -> Result<()> {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = None;
        pending.retain_mut(|(what, scope)| match scope.as_mut().poll(&mut context) {
            std::task::Poll::Ready(caught) => {
                if let Some(error) = caught {
                    first.get_or_insert_with(|| gpu_error(std::mem::take(what), &error));
                }
                false
            }
            std::task::Poll::Pending => true,
        });
        first.map_or(Ok(()), Err)
    }

    /// Waits until every error scope of the crate's work so far has
    /// answered; the first error among them. Native backends answer each
    /// call's scopes before it returns: nothing is left to wait for.
    pub(crate) async fn settle(&self) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            let mut first = None;
            for (what, scope) in pending {
                if let Some(error) = scope.await {
                    first.get_or_insert_with(|| gpu_error(what, &error));
                }
            }
            if let Some(error) = first {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Bytes one storage binding may cover.
    pub(crate) fn max_binding_size(&self) -> u64 {
        self.max_binding.load(Ordering::Relaxed)
    }

    /// Caps the bytes bound per dispatch (1 KiB up to the device's limit).
    pub(crate) fn set_max_binding_size(&self, bytes: u64) {
        self.max_binding
            .store(bytes.clamp(1024, self.binding_size()), Ordering::Relaxed);
    }

    /// The most bytes the device lets one storage binding cover.
    pub(crate) fn binding_size(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// The device's `max_compute_workgroups_per_dimension`.
    pub(crate) fn max_workgroups_per_dimension(&self) -> u32 {
        self.limits.max_compute_workgroups_per_dimension
    }

    /// `min_storage_buffer_offset_alignment`.
    pub(crate) fn storage_alignment(&self) -> u64 {
        self.limits.min_storage_buffer_offset_alignment as u64
    }
}
