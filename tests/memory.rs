//! Long training loops keep host memory flat: thousands of steps
//! (training forward, backward, SGD step) on every driver (each Vulkan
//! driver, GL), RSS growth after warm-up under 16 MiB; and short loops on
//! one shape per layout family the planner picks (masked and not, float32
//! and float16), with the kernel family of WGPU_BATCHNORM_KERNELS
//! (scripts/test.sh runs both). Linux: RSS comes from /proc/self/statm.

mod common;

use common::{random_input, random_mask, rng};
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, DType, GpuContext, LocalExchange, Mask, Sgd, Tensor};

/// Resident set size in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm (this test needs Linux)");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // the page size of every Linux this runs on (x86-64, aarch64 4 KiB kernels)
    pages * 4096
}

/// `steps` training steps; the device is waited on every 100.
fn train(
    ctx: &GpuContext,
    layer: &BatchNorm,
    sgd: &mut Sgd,
    x: &Tensor,
    mask: Option<&Mask>,
    dy: &Tensor,
    steps: usize,
) {
    for i in 0..steps {
        let (_, saved) = layer.forward_saved(x, Some(true), mask).unwrap();
        let grads = layer.backward(&saved, dy, false).unwrap();
        sgd.step(layer, &grads).unwrap();
        if i % 100 == 99 {
            ctx.device().poll(wgpu::PollType::wait_indefinitely()).unwrap();
        }
    }
    ctx.device().poll(wgpu::PollType::wait_indefinitely()).unwrap();
}

/// RSS is the process's: the tests of this file run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn layer(ctx: &GpuContext, channels: usize, axis: i64, synchronized: bool) -> BatchNorm {
    let config = BatchNormConfig::default().with_axis(axis);
    let mut layer = BatchNorm::new(ctx, config, channels).unwrap();
    if synchronized {
        // a group of one: every call still reads back and exchanges
        let one = LocalExchange::group(1, std::time::Duration::from_secs(60));
        layer.set_exchange(std::sync::Arc::new(one.into_iter().next().unwrap()));
    }
    layer
}

fn memory_stays_flat(ctx: &GpuContext, name: &str, synchronized: bool) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let shape = [64usize, 32];
    let x = Tensor::from_f32(ctx, &shape, &random_input(&mut rng(1), 64 * 32, 1.0)).unwrap();
    let dy = Tensor::from_f32(ctx, &shape, &random_input(&mut rng(2), 64 * 32, 0.1)).unwrap();
    let layer = layer(ctx, 32, -1, synchronized);
    let mut sgd = Sgd::new(&layer, 0.001, 0.9, false).unwrap();
    train(ctx, &layer, &mut sgd, &x, None, &dy, 500);
    let before = rss();
    const STEPS: u64 = 3000;
    train(ctx, &layer, &mut sgd, &x, None, &dy, STEPS as usize);
    let growth = rss().saturating_sub(before);
    eprintln!(
        "{name}: RSS {} MiB, growth {} KiB over {STEPS} steps",
        before >> 20,
        growth >> 10
    );
    assert!(
        growth < 16 << 20,
        "{name}: RSS grew {} KiB over {STEPS} training steps ({} bytes a step)",
        growth >> 10,
        growth / STEPS
    );
}

/// One shape per layout family of the planner (`src/plan.rs`), as
/// (shape, axis, masked, dtype, the layouts it plans; the coalesced family
/// runs Channels8 on its Channels4 kernels and Inner16 as Inner4, and
/// reduces channels-last Generic inputs as Rows1).
/// Their channel counts (6, 12, 24) are among those that leaked about 210
/// KiB a step on lavapipe before every kernel read its parameters at an
/// offset no compiler can fold (`p()` in `shaders/params.wgsl`).
/// A mask on a channels-last input has one value per row; on the NCHW one
/// it has one per position (Generic).
const LAYOUT_CASES: &[(&[usize], i64, bool, DType, &str)] = &[
    (&[64, 6], -1, false, DType::F32, "Generic"),
    (&[8, 6, 12], 1, false, DType::F32, "Inner4"),
    (&[4, 6, 8, 8], 1, false, DType::F32, "Inner16"),
    (&[64, 12], -1, false, DType::F32, "Channels4"),
    (&[64, 24], -1, false, DType::F32, "Channels8"),
    (&[8, 6, 7, 7], 1, false, DType::F32, "Runs16"),
    (&[64, 12], -1, true, DType::F32, "Channels4 masked by row"),
    (&[8, 6, 7, 7], 1, true, DType::F32, "Generic masked, normalise Runs16"),
    (&[64, 6], -1, false, DType::F16, "Generic, float16"),
    (&[4, 6, 8, 8], 1, false, DType::F16, "Inner16, float16"),
    (&[64, 24], -1, true, DType::F16, "Channels8 masked by row, float16"),
];

/// Steps per measured window of a layout case, after WARM_UP_STEPS that
/// compile every pipeline the case uses. Two windows: a leak grows RSS in
/// both, a one-time allocation (a driver's cache filling) in one, so the
/// smaller growth is the leak's; one of 200 KiB a step grows RSS by 10 MiB
/// a window, ten times the bound.
const LAYOUT_STEPS: u64 = 50;
const WARM_UP_STEPS: usize = 20;
const LAYOUT_BOUND: u64 = 1 << 20;

fn every_layout_stays_flat(ctx: &GpuContext, name: &str, synchronized: bool) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    for (i, &(shape, axis, masked, dtype, layouts)) in LAYOUT_CASES.iter().enumerate() {
        let len = shape.iter().product();
        let seed = 10 * i as u64;
        let x = Tensor::from_f32_as(ctx, shape, &random_input(&mut rng(seed), len, 1.0), dtype).unwrap();
        let dy = Tensor::from_f32_as(ctx, shape, &random_input(&mut rng(seed + 1), len, 0.1), dtype).unwrap();
        let mask_shape = &shape[..shape.len() - 1];
        let mask = masked.then(|| {
            let flags = random_mask(&mut rng(seed + 2), mask_shape.iter().product());
            Mask::from_u8(ctx, mask_shape, &flags).unwrap()
        });
        let channels = shape[axis.rem_euclid(shape.len() as i64) as usize];
        let layer = layer(ctx, channels, axis, synchronized);
        let mut sgd = Sgd::new(&layer, 0.001, 0.9, false).unwrap();
        train(ctx, &layer, &mut sgd, &x, mask.as_ref(), &dy, WARM_UP_STEPS);
        let before = rss();
        let mut windows = [0u64; 2];
        for window in &mut windows {
            let start = rss();
            train(ctx, &layer, &mut sgd, &x, mask.as_ref(), &dy, LAYOUT_STEPS as usize);
            *window = rss().saturating_sub(start);
        }
        let growth = windows[0].min(windows[1]);
        let case = format!("{shape:?} axis {axis} {dtype} masked {masked} ({layouts})");
        eprintln!(
            "{name}: {case}: RSS {} MiB, growth {} and {} KiB over two windows of {LAYOUT_STEPS} steps",
            before >> 20,
            windows[0] >> 10,
            windows[1] >> 10
        );
        if growth >= LAYOUT_BOUND {
            failures.push(format!("{case}: {} bytes a step", growth / LAYOUT_STEPS));
        }
    }
    assert!(failures.is_empty(), "{name}: RSS grew on {failures:#?}");
}

/// Each Vulkan driver, then GL, with its name.
fn drivers() -> Vec<(GpuContext, String)> {
    common::drivers()
        .into_iter()
        .map(|ctx| {
            let name = ctx.describe();
            (ctx, name)
        })
        .collect()
}

#[test]
fn three_thousand_training_steps_keep_memory_flat_on_every_driver() {
    for (ctx, name) in drivers() {
        memory_stays_flat(&ctx, &name, false);
    }
}

/// A synchronized layer's calls read back and upload O(channels) bytes
/// twice a step, and exchange them: host memory stays flat through that.
#[test]
fn three_thousand_synchronized_training_steps_keep_memory_flat() {
    for ctx in common::vulkan() {
        memory_stays_flat(&ctx, &format!("{}, synchronized", ctx.describe()), true);
    }
}

#[test]
fn every_layout_keeps_memory_flat_on_every_driver() {
    for (ctx, name) in drivers() {
        every_layout_stays_flat(&ctx, &name, false);
    }
}

#[test]
fn every_layout_keeps_memory_flat_synchronized() {
    for ctx in common::vulkan() {
        every_layout_stays_flat(&ctx, &format!("{}, synchronized", ctx.describe()), true);
    }
}

/// A warm training loop of `forward_into`, `backward_into` and an SGD step
/// on tensors the application keeps creates no GPU buffer and no bind
/// group: uniform slots, bind groups, statistics and scratch are reused.
/// Channels last and NCHW, float32 and float16, masked and not, whole and
/// cut into chunks, synchronized (a group of one: both phases, the
/// readback and the upload) and not, with the constraints an application's
/// own optimiser applies, both families (WGPU_BATCHNORM_KERNELS), every
/// driver.
#[test]
fn a_warm_training_loop_creates_no_gpu_objects() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut contexts = common::drivers();
    let chunked = common::fresh(wgpu::Backends::VULKAN, None);
    chunked.set_max_binding_size(4096);
    contexts.push(chunked);
    for ctx in contexts {
        for (i, &(shape, axis, masked, dtype)) in [
            (&[64usize, 12][..], -1i64, false, DType::F32),
            (&[4, 6, 7, 7][..], 1, true, DType::F32),
            (&[300, 24][..], -1, true, DType::F16),
        ]
        .iter()
        .enumerate()
        {
            let len: usize = shape.iter().product();
            let tensor =
                |seed| Tensor::from_f32_as(&ctx, shape, &random_input(&mut rng(seed), len, 1.0), dtype).unwrap();
            let (x, y, dy) = (tensor(1), tensor(2), tensor(3));
            let mask_shape = &shape[..shape.len() - 1];
            let mask = masked.then(|| {
                Mask::from_u8(&ctx, mask_shape, &random_mask(&mut rng(4), mask_shape.iter().product())).unwrap()
            });
            let channels = shape[axis.rem_euclid(shape.len() as i64) as usize];
            for synchronized in [false, true] {
                let layer = layer(&ctx, channels, axis, synchronized);
                let grads = layer.gradient_tensors(&dy).unwrap();
                let mut sgd = Sgd::new(&layer, 0.001, 0.9, false).unwrap();
                let mut step = || {
                    let saved = layer.forward_into(&x, Some(true), mask.as_ref(), &y).unwrap();
                    layer.backward_into(&saved, &dy, false, &grads).unwrap();
                    sgd.step(&layer, &grads).unwrap();
                    layer.apply_constraints().unwrap();
                };
                for _ in 0..3 {
                    step();
                }
                let before = ctx.created_objects_for_tests();
                for _ in 0..50 {
                    step();
                }
                ctx.device().poll(wgpu::PollType::wait_indefinitely()).unwrap();
                let after = ctx.created_objects_for_tests();
                assert_eq!(
                    before,
                    after,
                    "{} case {i} {shape:?} synchronized {synchronized}: (buffers, bind groups) created before and \
                     after 50 warm steps",
                    ctx.describe()
                );
            }
        }
    }
}
