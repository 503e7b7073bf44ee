//! The GPU context: a device and queue (created here or handed in by the
//! application), the adapter they came from, and the kernel cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::ChannelView;
use crate::device::Device;
#[cfg(not(target_arch = "wasm32"))]
pub use crate::device::list_adapters;
pub use crate::device::{AdapterReport, AdapterSelection, list_adapters_async};
use crate::dtype::DType;
use crate::error::Result;
use crate::kernels::Kernels;
use crate::tuning::{AdapterKey, KernelChoice, Op, PlanTuning, Strategy, TuningCache, shape_class};

/// A handle on one wgpu device. Cloning is cheap and shares the device,
/// the queue and the compiled kernels.
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) device: Device,
    pub(crate) kernels: Kernels,
    /// Whether the elementwise kernels read per-channel parameters through
    /// a uniform binding (see [`GpuContext::set_uniform_parameters`]).
    uniform_params: AtomicBool,
    /// Which kernels calls run (see [`GpuContext::plan_tuning`]).
    plans: Mutex<Plans>,
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

impl GpuContext {
    /// Opens the adapter chosen by `WGPU_BACKEND` / `WGPU_ADAPTER_NAME`, or
    /// the best one found (discrete, integrated, virtual, then CPU). Not on
    /// the web, where nothing may block: use [`GpuContext::new_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_env() -> Result<Self> {
        Self::new(&AdapterSelection::from_env())
    }

    /// Blocking form of [`GpuContext::new_async`] (not on the web).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(selection: &AdapterSelection) -> Result<Self> {
        pollster::block_on(Self::new_async(selection))
    }

    /// Opens an adapter and requests a device with the adapter's own limits
    /// (so storage bindings may exceed wgpu's 128 MiB default) and, where
    /// it has them, subgroup operations. The kernel choice is
    /// `selection.kernels`, else `WGPU_BATCHNORM_KERNELS`: a value of the
    /// variable that is none of `serial`, `coalesced`, `auto` is an
    /// [`crate::Error::Kernels`].
    pub async fn new_async(selection: &AdapterSelection) -> Result<Self> {
        let device = Device::open(selection).await?;
        let choice = match selection.kernels {
            Some(choice) => choice,
            None => KernelChoice::from_env()?,
        };
        Ok(Self::build(device, choice))
    }

    /// Wraps a device and queue the application already has. The layer then
    /// lives within that device's limits (request the adapter's limits to
    /// bind more than 128 MiB at once; larger tensors are bound in chunks).
    ///
    /// `WGPU_BATCHNORM_KERNELS` sets the kernel choice as for
    /// [`GpuContext::new`]; a value that is none of `serial`, `coalesced`,
    /// `auto` is logged (`log::warn!`) and `auto` is used. Requesting
    /// `Features::SUBGROUP` on the device lets the coalesced reductions
    /// use subgroup operations.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let choice = KernelChoice::from_env().unwrap_or_else(|e| {
            log::warn!("{e}; using auto");
            KernelChoice::Auto
        });
        Self::build(Device::wrap(device, queue), choice)
    }

    fn build(device: Device, choice: KernelChoice) -> Self {
        let kernels = Kernels::new(&device);
        // a CPU adapter (llvmpipe, WARP, SwiftShader) runs each storage
        // load as a loop over SIMD lanes but a uniform load as one gather
        let uniform_params = device.device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        GpuContext {
            inner: Arc::new(ContextInner {
                device,
                kernels,
                uniform_params: AtomicBool::new(uniform_params),
                plans: Mutex::new(Plans {
                    choice,
                    forced: None,
                    tuned: HashMap::new(),
                }),
            }),
        }
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.device.queue
    }

    /// The adapter this context opened; `None` for a wrapped device.
    pub fn adapter_info(&self) -> Option<&wgpu::AdapterInfo> {
        self.inner.device.adapter_info.as_ref()
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
        self.inner.device.max_binding_size()
    }

    /// Caps the bytes bound per dispatch below the device limit (never
    /// above it). Chunked binding is then used for smaller tensors too,
    /// which is how the tests exercise it cheaply.
    pub fn set_max_binding_size(&self, bytes: u64) {
        self.inner.device.set_max_binding_size(bytes);
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
        Strategy::default_for(self.gpu().device_type)
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
    #[cfg(feature = "bench")]
    pub fn tuned_plan(&self, view: ChannelView, dtype: DType, op: Op) -> Option<PlanTuning> {
        let plans = self.lock_plans();
        match plans.fixed() {
            Some(_) => None,
            None => plans.tuned_for(view, dtype, op),
        }
    }

    /// Reads the tuning cache file that `bench --tune` writes (see
    /// [`crate::tuning::cache_path`]) and runs its plans for this adapter
    /// where the choice is `Auto`; returns how many it holds for this
    /// adapter. A context starts with none: a file in the user's cache
    /// folder changes which kernels run only once the application calls
    /// this (the command-line tool does). A corrupt file is an error here
    /// and leaves the plans as they were.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn reload_tuning_cache(&self) -> Result<usize> {
        Ok(self.use_tuning_cache(&TuningCache::load()?))
    }

    /// Runs the plans `cache` holds for this adapter (a cache the
    /// application read itself, e.g. with [`TuningCache::from_json`] where
    /// there is no file system); returns how many there are.
    pub fn use_tuning_cache(&self, cache: &TuningCache) -> usize {
        let tuned = cache.for_adapter(&AdapterKey::of(&self.device().adapter_info()));
        let n = tuned.len();
        self.lock_plans().tuned = tuned;
        self.precompile();
        n
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
            self.inner.kernels.precompile(self.gpu(), &tuning, uniform);
        }
    }

    fn lock_plans(&self) -> std::sync::MutexGuard<'_, Plans> {
        self.inner.plans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every GPU error the crate's own work so far could raise
    /// is known, and returns the first. On native backends each call
    /// reports its own errors before it returns, so this is `Ok` at once.
    /// In a browser the device answers later: a call reports what earlier
    /// calls caused as soon as it is known, and this waits for all of it
    /// (a test's, or a page's, way of seeing a rejected pipeline).
    pub async fn gpu_errors(&self) -> Result<()> {
        self.inner.device.settle().await
    }

    /// Runs `work` (the crate's own device work for one call) inside error
    /// scopes: anything the device refuses in it, and a lost device, is an
    /// [`crate::Error::Gpu`] naming `what`.
    pub(crate) fn scoped<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.inner.device.scoped(what, work)
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

    /// Test hook, not part of the API: how many buffers and bind groups the
    /// crate has created on this context's device so far.
    #[doc(hidden)]
    pub fn created_objects_for_tests(&self) -> (u64, u64) {
        self.inner.device.created()
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
        let device = &self.inner.device;
        crate::plan::PlanLimits {
            max_binding: device.max_binding_size(),
            device_binding: device.binding_size(),
            alignment: device.storage_alignment(),
            max_groups: device.max_workgroups_per_dimension(),
        }
    }

    /// The device floor of this context.
    pub(crate) fn gpu(&self) -> &Device {
        &self.inner.device
    }

    pub(crate) fn device_binding_size(&self) -> u64 {
        self.inner.device.binding_size()
    }

    pub(crate) fn max_workgroups_per_dimension(&self) -> u32 {
        self.inner.device.max_workgroups_per_dimension()
    }

    pub(crate) fn storage_alignment(&self) -> u64 {
        self.inner.device.storage_alignment()
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({})", self.describe())
    }
}
