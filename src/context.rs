//! The GPU context: a device and queue (created here or handed in by the
//! application), the adapter they came from, and the kernel cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::ChannelView;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::tuning::{AdapterKey, KernelChoice, Op, PlanTuning, Strategy, TuningCache, shape_class};

/// Which adapter [`GpuContext::new`] should open.
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

/// A handle on one wgpu device. Cloning is cheap and shares the device,
/// the queue and the compiled kernels.
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) adapter_info: Option<wgpu::AdapterInfo>,
    pub(crate) kernels: Kernels,
    /// Bytes one storage binding may cover (the device limit unless capped).
    max_binding: AtomicU64,
    /// A 4-byte buffer bound where a kernel's optional input is absent.
    pub(crate) placeholder: wgpu::Buffer,
    /// Whether the elementwise kernels read per-channel parameters through
    /// a uniform binding (see [`GpuContext::set_uniform_parameters`]).
    uniform_params: AtomicBool,
    /// Tells this context's tensors from other contexts': wgpu compares
    /// devices by an id that two identically built instances share.
    pub(crate) id: u64,
    /// Which kernels calls run (see [`GpuContext::plan_tuning`]).
    plans: Mutex<Plans>,
    /// Why the device was lost, once it is (only for devices this crate
    /// requested: an application's device keeps its own callback).
    lost: Arc<Mutex<Option<String>>>,
}

/// What decides a call's plan: the choice, a plan forced on every call,
/// and the plans `bench --tune` measured on this adapter.
struct Plans {
    choice: KernelChoice,
    forced: Option<PlanTuning>,
    tuned: HashMap<(String, Op), PlanTuning>,
}

impl Plans {
    /// The plan every call runs whatever its shape: the forced one, or an
    /// explicit family's defaults; `None` for `Auto`.
    fn fixed(&self) -> Option<PlanTuning> {
        match (self.forced, self.choice) {
            (Some(forced), _) => Some(forced),
            (None, KernelChoice::Serial) => Some(PlanTuning::default_for(Strategy::Serial)),
            (None, KernelChoice::Coalesced) => Some(PlanTuning::default_for(Strategy::Coalesced)),
            (None, KernelChoice::Auto) => None,
        }
    }

    /// The cache's plan for a call (no lookup, nor its key's allocation,
    /// where the cache holds nothing).
    fn tuned_for(&self, view: ChannelView, dtype: DType, op: Op) -> Option<PlanTuning> {
        if self.tuned.is_empty() {
            return None;
        }
        self.tuned.get(&(shape_class(view, dtype), op)).copied()
    }
}

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

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

/// Every adapter wgpu finds on `backends` (all when `None`).
pub fn list_adapters(backends: Option<wgpu::Backends>) -> Vec<AdapterReport> {
    let instance = new_instance(backends);
    pollster::block_on(instance.enumerate_adapters(backends.unwrap_or(wgpu::Backends::all())))
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

impl GpuContext {
    /// Opens the adapter chosen by `WGPU_BACKEND` / `WGPU_ADAPTER_NAME`, or
    /// the best one found (discrete, integrated, virtual, then CPU).
    pub fn from_env() -> Result<Self> {
        Self::new(&AdapterSelection::from_env())
    }

    /// Blocking form of [`GpuContext::new_async`].
    pub fn new(selection: &AdapterSelection) -> Result<Self> {
        pollster::block_on(Self::new_async(selection))
    }

    /// Opens an adapter and requests a device with the adapter's own limits
    /// (so storage bindings may exceed wgpu's 128 MiB default) and, where
    /// it has them, subgroup operations. The kernel choice is
    /// `selection.kernels`, else `WGPU_BATCHNORM_KERNELS`: a value of the
    /// variable that is none of `serial`, `coalesced`, `auto` is an
    /// [`Error::Kernels`].
    pub async fn new_async(selection: &AdapterSelection) -> Result<Self> {
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
        let choice = match selection.kernels {
            Some(choice) => choice,
            None => KernelChoice::from_env()?,
        };
        let ctx = Self::build(device, queue, Some(info), choice);
        let lost = ctx.inner.lost.clone();
        ctx.device().set_device_lost_callback(move |reason, message| {
            // dropping the context destroys the device: no one is left to tell
            if reason != wgpu::DeviceLostReason::Destroyed {
                *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{reason:?}: {message}"));
            }
        });
        Ok(ctx)
    }

    /// Wraps a device and queue the application already has. The layer then
    /// lives within that device's limits (request the adapter's limits to
    /// bind more than 128 MiB at once; larger tensors are bound in chunks).
    ///
    /// `WGPU_BATCHNORM_KERNELS` sets the kernel choice as for
    /// [`GpuContext::new`]; a value that is none of `serial`, `coalesced`,
    /// `auto` is reported on stderr and `auto` is used. Requesting
    /// `Features::SUBGROUP` on the device lets the coalesced reductions
    /// use subgroup operations.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let choice = KernelChoice::from_env().unwrap_or_else(|e| {
            eprintln!("wgpu-batchnorm: {e}; using auto");
            KernelChoice::Auto
        });
        Self::build(device, queue, None, choice)
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter_info: Option<wgpu::AdapterInfo>,
        choice: KernelChoice,
    ) -> Self {
        let kernels = Kernels::new(&device);
        let limits = device.limits();
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let placeholder = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("placeholder"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        // a CPU adapter (llvmpipe, WARP, SwiftShader) runs each storage
        // load as a loop over SIMD lanes but a uniform load as one gather
        let uniform_params = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let tuned = tuned_plans(&device.adapter_info());
        GpuContext {
            inner: Arc::new(ContextInner {
                device,
                queue,
                adapter_info,
                kernels,
                max_binding: AtomicU64::new(max_binding),
                placeholder,
                uniform_params: AtomicBool::new(uniform_params),
                id: NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed),
                plans: Mutex::new(Plans {
                    choice,
                    forced: None,
                    tuned,
                }),
                lost: Arc::new(Mutex::new(None)),
            }),
        }
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// The adapter this context opened; `None` for a wrapped device.
    pub fn adapter_info(&self) -> Option<&wgpu::AdapterInfo> {
        self.inner.adapter_info.as_ref()
    }

    /// `NAME (BACKEND)`, or a note that the device was handed in.
    pub fn describe(&self) -> String {
        match self.adapter_info() {
            Some(i) => format!("{} ({})", i.name, i.backend),
            None => "application device".to_string(),
        }
    }

    /// Bytes one storage binding may cover; tensors larger than this are
    /// processed in chunks.
    pub fn max_binding_size(&self) -> u64 {
        self.inner.max_binding.load(Ordering::Relaxed)
    }

    /// Caps the bytes bound per dispatch below the device limit (never
    /// above it). Chunked binding is then used for smaller tensors too,
    /// which is how the tests exercise it cheaply.
    pub fn set_max_binding_size(&self, bytes: u64) {
        let cap = self.device_binding_size();
        self.inner.max_binding.store(bytes.clamp(1024, cap), Ordering::Relaxed);
    }

    /// Whether the normalise and dx kernels read the per-channel
    /// parameters through a uniform binding of 64 KiB (or the device's
    /// `max_uniform_buffer_binding_size` if smaller: layers of up to 4096
    /// channels at 64 KiB) rather than a storage binding. On by default for CPU
    /// adapters, where it makes those parameters nearly free; off for GPUs,
    /// where lanes reading different uniform addresses serialise.
    pub fn uniform_parameters(&self) -> bool {
        self.inner.uniform_params.load(Ordering::Relaxed)
    }

    /// Chooses how the normalise and dx kernels read per-channel parameters
    /// (see [`GpuContext::uniform_parameters`]); both ways give the same
    /// results. Compiles the chosen variants now, so that later calls
    /// compile nothing.
    pub fn set_uniform_parameters(&self, on: bool) {
        self.inner.uniform_params.store(on, Ordering::Relaxed);
        self.precompile();
    }

    /// The kernel choice (see [`KernelChoice`]): the last
    /// [`GpuContext::set_kernel_choice`], else the one the context was
    /// made with ([`AdapterSelection::kernels`] or `WGPU_BATCHNORM_KERNELS`,
    /// `Auto` where neither says).
    pub fn kernel_choice(&self) -> KernelChoice {
        self.lock_plans().choice
    }

    /// Sets the kernel choice for later calls, and compiles its kernels now.
    /// Every choice gives the same results (to float32 rounding); only the
    /// speed differs.
    pub fn set_kernel_choice(&self, choice: KernelChoice) {
        self.lock_plans().choice = choice;
        self.precompile();
    }

    /// Forces one plan on every later call (`None`: back to the choice),
    /// as `bench --tune` does to time candidates. Refuses knobs outside
    /// their ranges.
    pub fn set_plan_tuning(&self, tuning: Option<PlanTuning>) -> Result<()> {
        if let Some(t) = &tuning {
            t.validate()?;
        }
        self.lock_plans().forced = tuning;
        self.precompile();
        Ok(())
    }

    /// The family `Auto` runs where no plan was tuned: `Serial` on CPU
    /// adapters, `Coalesced` on every other device type.
    pub fn default_strategy(&self) -> Strategy {
        Strategy::default_for(self.inner.device.adapter_info().device_type)
    }

    /// The plan a call of `op` on an input of `view` and `dtype` runs: the
    /// forced plan, else the choice's family with its default knobs, else
    /// (`Auto`) the plan `bench --tune` wrote for this adapter and the
    /// input's shape class, else the default family's.
    pub fn plan_tuning(&self, view: ChannelView, dtype: DType, op: Op) -> PlanTuning {
        let plans = self.lock_plans();
        plans
            .fixed()
            .or_else(|| plans.tuned_for(view, dtype, op))
            .unwrap_or_else(|| PlanTuning::default_for(self.default_strategy()))
    }

    /// The cached plan that [`GpuContext::plan_tuning`] returns for these
    /// calls, if it comes from the tuning cache (choice `Auto`, no forced
    /// plan, an entry for this adapter and shape class); `None` otherwise.
    pub fn tuned_plan(&self, view: ChannelView, dtype: DType, op: Op) -> Option<PlanTuning> {
        let plans = self.lock_plans();
        match plans.fixed() {
            Some(_) => None,
            None => plans.tuned_for(view, dtype, op),
        }
    }

    /// Reads the tuning cache again (after `bench --tune` rewrote it);
    /// returns how many plans it holds for this adapter. A corrupt cache is
    /// an error here and leaves the plans as they were.
    pub fn reload_tuning_cache(&self) -> Result<usize> {
        let tuned = TuningCache::load()?.for_adapter(&AdapterKey::of(&self.inner.device.adapter_info()));
        let n = tuned.len();
        self.lock_plans().tuned = tuned;
        self.precompile();
        Ok(n)
    }

    /// Compiles the layer kernels of every plan this context may run
    /// without a call compiling one: the forced plan, or the choice's
    /// defaults and (for `Auto`) the tuned plans.
    pub(crate) fn precompile(&self) {
        let tunings: Vec<PlanTuning> = {
            let plans = self.lock_plans();
            match plans.fixed() {
                Some(fixed) => vec![fixed],
                None => std::iter::once(PlanTuning::default_for(self.default_strategy()))
                    .chain(plans.tuned.values().copied())
                    .collect(),
            }
        };
        for tuning in tunings {
            let uniform = tuning.uniform_parameters.unwrap_or(self.uniform_parameters());
            self.inner.kernels.precompile(&self.inner.device, &tuning, uniform);
        }
    }

    fn lock_plans(&self) -> std::sync::MutexGuard<'_, Plans> {
        self.inner.plans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` (the crate's own device work for one call) inside error
    /// scopes: anything the device refuses in it, and a lost device, is an
    /// [`Error::Gpu`] naming `what`.
    pub(crate) fn scoped<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let result = crate::device::scoped(self.device(), || what.to_string(), work);
        if let Some(reason) = self.inner.lost.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(Error::Gpu {
                what: what.to_string(),
                message: format!("the device was lost ({reason})"),
            });
        }
        result
    }

    /// Test hook, not part of the API: every shader module of the kernel
    /// whose entry point is `entry` (e.g. `"partial_stats"`) compiled from
    /// now on gets an invalid line, so the device refuses its pipelines.
    /// Returns whether such a kernel exists.
    #[doc(hidden)]
    pub fn break_kernel_for_tests(&self, entry: &str) -> bool {
        let kernel = crate::variants::Kernel::ALL
            .into_iter()
            .find(|k| k.entry_point() == entry);
        if let Some(kernel) = kernel {
            self.inner.kernels.break_kernel(kernel);
        }
        kernel.is_some()
    }

    /// How many compute pipelines this context has compiled (they are
    /// shared by every layer of the context).
    pub fn compiled_pipelines(&self) -> usize {
        self.inner.kernels.compiled()
    }

    /// The alignment a tensor view's offset needs
    /// (`min_storage_buffer_offset_alignment`).
    pub fn storage_offset_alignment(&self) -> u64 {
        self.storage_alignment()
    }

    /// What a dispatch plan needs of this device.
    pub(crate) fn plan_limits(&self) -> crate::plan::PlanLimits {
        crate::plan::PlanLimits {
            max_binding: self.max_binding_size(),
            device_binding: self.device_binding_size(),
            alignment: self.storage_alignment(),
            max_groups: self.max_workgroups_per_dimension(),
        }
    }

    /// The most bytes the device lets one storage binding cover.
    pub(crate) fn device_binding_size(&self) -> u64 {
        let limits = self.inner.device.limits();
        limits.max_storage_buffer_binding_size.min(limits.max_buffer_size)
    }

    /// The device's `max_compute_workgroups_per_dimension`.
    pub(crate) fn max_workgroups_per_dimension(&self) -> u32 {
        self.inner.device.limits().max_compute_workgroups_per_dimension
    }

    pub(crate) fn storage_alignment(&self) -> u64 {
        self.inner.device.limits().min_storage_buffer_offset_alignment as u64
    }
}

/// The plans the tuning cache holds for this adapter; a corrupt cache is
/// reported on stderr and ignored (the defaults run).
fn tuned_plans(info: &wgpu::AdapterInfo) -> HashMap<(String, Op), PlanTuning> {
    match TuningCache::load() {
        Ok(cache) => cache.for_adapter(&AdapterKey::of(info)),
        Err(e) => {
            eprintln!("wgpu-batchnorm: ignoring the tuning cache ({e}); the default plans run");
            HashMap::new()
        }
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({})", self.describe())
    }
}
