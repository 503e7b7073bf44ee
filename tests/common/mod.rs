//! Shared test helpers: one GPU context per test binary, seeded inputs and
//! the GPU-vs-reference comparison.
#![allow(dead_code)]

pub mod case_files;

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_batchnorm::keras::error_measure;
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{AdapterSelection, BatchNorm, BatchNormConfig, DType, GpuContext, Mask, Tensor};

const INSTALL_HINT: &str = "GPU tests need an adapter and never skip. On Debian/Ubuntu without a GPU run \
     `apt-get install -y mesa-vulkan-drivers` (or scripts/test.sh, which does it), then rerun";

fn open(selection: AdapterSelection) -> GpuContext {
    match GpuContext::new(&selection) {
        Ok(ctx) => ctx,
        Err(e) => panic!("{e}\n{INSTALL_HINT}"),
    }
}

/// The default adapter (WGPU_BACKEND / WGPU_ADAPTER_NAME respected).
pub fn gpu() -> GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| open(AdapterSelection::from_env())).clone()
}

/// The GL adapter (Mesa's llvmpipe through EGL on a headless Linux box).
pub fn gl() -> GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        open(AdapterSelection {
            backends: Some(wgpu::Backends::GL),
            name: None,
            ..Default::default()
        })
    })
    .clone()
}

/// A new context of its own (not shared with other tests) on `backends`,
/// on the adapter whose name contains `name` where given: for tests that
/// change a context or break its kernels.
pub fn fresh(backends: wgpu::Backends, name: Option<&str>) -> GpuContext {
    open(AdapterSelection {
        backends: Some(backends),
        name: name.map(str::to_string),
        ..Default::default()
    })
}

/// The names of the Vulkan adapters wgpu finds (lavapipe and SwiftShader
/// where scripts/test.sh made both visible; a real GPU's driver too).
pub fn vulkan_adapters() -> Vec<String> {
    let mut names: Vec<String> = wgpu_batchnorm::list_adapters(Some(wgpu::Backends::VULKAN))
        .into_iter()
        .map(|a| a.info.name)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// One shared context on each Vulkan driver wgpu finds (lavapipe and
/// SwiftShader under scripts/test.sh, a real GPU's driver where there is
/// one): the GPU-vs-reference tests run on every one of them.
pub fn vulkan() -> Vec<GpuContext> {
    static CTXS: OnceLock<Vec<GpuContext>> = OnceLock::new();
    CTXS.get_or_init(fresh_vulkan).clone()
}

/// A private context on each Vulkan driver, for tests that change theirs
/// (binding caps, parameter bindings).
pub fn fresh_vulkan() -> Vec<GpuContext> {
    let names = vulkan_adapters();
    assert!(!names.is_empty(), "no Vulkan adapter\n{INSTALL_HINT}");
    names
        .iter()
        .map(|name| fresh(wgpu::Backends::VULKAN, Some(name)))
        .collect()
}

/// Every driver the suite runs on: each Vulkan driver, then GL (on Linux:
/// Mesa's llvmpipe through EGL; elsewhere GL is not among wgpu's adapters).
pub fn drivers() -> Vec<GpuContext> {
    let mut ctxs = vulkan();
    if cfg!(target_os = "linux") {
        ctxs.push(gl());
    }
    ctxs
}

/// A device on the default adapter that allows uniform bindings of 16 KiB
/// only (WebGPU's WebGL2 limit): the per-channel parameters' uniform view
/// shrinks to it. Uniform parameters on.
pub fn small_uniform_device() -> GpuContext {
    let (device, queue) = raw_device(wgpu::Backends::all(), |l| l.max_uniform_buffer_binding_size = 16 << 10);
    let ctx = GpuContext::from_device(device, queue);
    ctx.set_uniform_parameters(true);
    ctx
}

/// `n` values in [0, 1) from a hash of their index and `seed`: the same on
/// every rank and thread that asks (no random state to share).
pub fn hashed_unit(n: usize, seed: u64) -> impl Iterator<Item = f64> {
    (0..n).map(move |i| {
        let h = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        (h >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Values around `offset` with per-channel spread, never all equal.
pub fn random_input(rng: &mut StdRng, len: usize, offset: f32) -> Vec<f32> {
    (0..len)
        .map(|_| offset + rng.random::<f32>() * 4.0 - 2.0 + rng.random::<f32>() * rng.random::<f32>())
        .collect()
}

pub fn random_mask(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| (rng.random::<f32>() < 0.7) as u8).collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// One call on both paths and the conformance error of y and of the state.
pub struct Outcome {
    pub y_error: f64,
    pub state_error: f64,
    /// The shape, axis and dtype, for a failure's message.
    pub what: String,
}

impl Outcome {
    /// Asserts y and the state within `tol`.
    pub fn assert_within(&self, tol: f64) {
        assert!(
            self.y_error <= tol && self.state_error <= tol,
            "{}: y {:.2e} state {:.2e}",
            self.what,
            self.y_error,
            self.state_error
        );
    }
}

/// Runs `calls` (training flag, with mask) through the GPU layer and the
/// float64 reference from the same random initial state; returns the worst
/// errors.
pub fn compare_with_reference(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    shape: &[usize],
    dtype: DType,
    calls: &[(Option<bool>, bool)],
    seed: u64,
) -> Outcome {
    let mut rng = rng(seed);
    // a non-trivial starting state
    let (layer, mut reference) = random_pair(ctx, config, shape, &mut rng);
    let len: usize = shape.iter().product();
    let mask_shape = &shape[..shape.len() - 1];
    let mut outcome = Outcome {
        y_error: 0.0,
        state_error: 0.0,
        what: format!("{shape:?} axis {} {dtype}", config.axis),
    };
    for &(training, masked) in calls {
        let offset = rng.random::<f32>() * 10.0 - 5.0;
        let x32 = random_input(&mut rng, len, offset);
        let x = Tensor::from_f32_as(ctx, shape, &x32, dtype).unwrap();
        // what the GPU really sees (float16 rounds)
        let x64: Vec<f64> = x32.iter().map(|&v| f64::from(dtype.round(v))).collect();
        let flags = masked.then(|| random_mask(&mut rng, len / shape[shape.len() - 1]));
        let mask = flags.as_ref().map(|f| Mask::from_u8(ctx, mask_shape, f).unwrap());
        let y = layer.forward(&x, training, mask.as_ref()).unwrap();
        let got = read64(ctx, &y);
        let truth = reference.forward(&x64, shape, training, flags.as_deref()).unwrap();
        outcome.y_error = outcome.y_error.max(error_measure(&got, &truth));
    }
    for (slot, values) in layer.named_weights().unwrap() {
        let got: Vec<f64> = values.into_iter().map(f64::from).collect();
        outcome.state_error = outcome.state_error.max(error_measure(&got, reference.state.slot(slot)));
    }
    outcome
}

/// One forward (training flag, mask) and its backward with regularization
/// through the GPU layer and the float64 reference from the same random
/// state; returns the worst error of dx, dgamma and dbeta.
pub fn compare_gradients(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    shape: &[usize],
    dtype: DType,
    training: Option<bool>,
    masked: bool,
    seed: u64,
) -> f64 {
    let mut r = rng(seed);
    let (layer, mut reference) = random_pair(ctx, config, shape, &mut r);
    let len: usize = shape.iter().product();
    let round = |v: Vec<f32>| -> (Vec<f32>, Vec<f64>) {
        let v: Vec<f32> = v.into_iter().map(|a| dtype.round(a)).collect();
        let w = v.iter().map(|&a| a as f64).collect();
        (v, w)
    };
    let (x32, x64) = round(random_input(&mut r, len, 4.0));
    let (dy32, dy64) = round(random_input(&mut r, len, 0.5));
    let flags = masked.then(|| random_mask(&mut r, len / shape[shape.len() - 1]));
    let mask = flags
        .as_ref()
        .map(|f| Mask::from_u8(ctx, &shape[..shape.len() - 1], f).unwrap());
    let x = Tensor::from_f32_as(ctx, shape, &x32, dtype).unwrap();
    let (_, saved) = layer.forward_saved(&x, training, mask.as_ref()).unwrap();
    reference.forward(&x64, shape, training, flags.as_deref()).unwrap();
    let dy = Tensor::from_f32_as(ctx, shape, &dy32, dtype).unwrap();
    let got = layer.backward(&saved, &dy, true).unwrap();
    let want = reference.backward(&dy64, true).unwrap();
    let read = |t: &Tensor| read64(ctx, t);
    let mut worst = error_measure(&read(&got.dx), &want.dx);
    for (g, w) in [(&got.dgamma, &want.dgamma), (&got.dbeta, &want.dbeta)] {
        match (g, w) {
            (Some(g), Some(w)) => worst = worst.max(error_measure(&read(g), w)),
            (None, None) => {}
            _ => panic!("GPU and reference disagree on which gradients exist ({config:?})"),
        }
    }
    worst
}

pub fn tolerance(dtype: DType) -> f64 {
    wgpu_batchnorm::keras::tolerance(dtype, false)
}

/// An application's own device on the default adapter of `backends`, with
/// the adapter's limits as `limits` edits them.
pub fn raw_device(backends: wgpu::Backends, limits: impl FnOnce(&mut wgpu::Limits)) -> (wgpu::Device, wgpu::Queue) {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))
        .unwrap_or_else(|e| panic!("{e}\n{INSTALL_HINT}"));
    let mut required_limits = adapter.limits();
    limits(&mut required_limits);
    let descriptor = wgpu::DeviceDescriptor {
        required_limits,
        ..Default::default()
    };
    pollster::block_on(adapter.request_device(&descriptor)).unwrap()
}

/// A tensor's values read back, widened to float64.
pub fn read64(ctx: &GpuContext, t: &Tensor) -> Vec<f64> {
    t.read_f32(ctx).unwrap().into_iter().map(f64::from).collect()
}

/// A layer and its float64 reference of `config` for an input of `shape`,
/// from the same random state (0.5 to 1.5).
pub fn random_pair(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    shape: &[usize],
    rng: &mut StdRng,
) -> (BatchNorm, ReferenceLayer) {
    let channels = shape[config.resolve_axis(shape.len()).unwrap()];
    let layer = BatchNorm::new(ctx, config.clone(), channels).unwrap();
    let mut reference = ReferenceLayer::new(config.clone(), channels).unwrap();
    for slot in layer.weight_slots() {
        let values: Vec<f32> = (0..channels).map(|_| 0.5 + rng.random::<f32>()).collect();
        layer.set_weight(slot, &values).unwrap();
        *reference.state.slot_mut(slot) = values.iter().map(|&v| v as f64).collect();
    }
    (layer, reference)
}
