//! Long training loops keep host memory flat: thousands of steps
//! (training forward, backward, SGD step) on Vulkan and on GL, RSS growth
//! after warm-up under 16 MiB. Linux: RSS comes from /proc/self/statm.

mod common;

use common::{gl, gpu, random_input, rng};
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, LocalExchange, Sgd, Tensor};

/// Resident set size in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm (this test needs Linux)");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // the page size of every Linux this runs on (x86-64, aarch64 4 KiB kernels)
    pages * 4096
}

/// `steps` training steps on [64, 32]; the device is waited on every 100.
fn train(ctx: &GpuContext, layer: &BatchNorm, sgd: &mut Sgd, x: &Tensor, dy: &Tensor, steps: usize) {
    for i in 0..steps {
        let (_, saved) = layer.forward_saved(x, Some(true), None).unwrap();
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

fn memory_stays_flat(ctx: &GpuContext, name: &str, synchronized: bool) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let shape = [64usize, 32];
    let x = Tensor::from_f32(ctx, &shape, &random_input(&mut rng(1), 64 * 32, 1.0)).unwrap();
    let dy = Tensor::from_f32(ctx, &shape, &random_input(&mut rng(2), 64 * 32, 0.1)).unwrap();
    let mut layer = BatchNorm::new(ctx, BatchNormConfig::default(), 32).unwrap();
    if synchronized {
        // a group of one: every call still reads back and exchanges
        let one = LocalExchange::group(1, std::time::Duration::from_secs(60));
        layer.set_exchange(std::sync::Arc::new(one.into_iter().next().unwrap()));
    }
    let mut sgd = Sgd::new(&layer, 0.001, 0.9, false).unwrap();
    train(ctx, &layer, &mut sgd, &x, &dy, 500);
    let before = rss();
    const STEPS: u64 = 3000;
    train(ctx, &layer, &mut sgd, &x, &dy, STEPS as usize);
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

#[test]
fn three_thousand_training_steps_keep_memory_flat_on_vulkan() {
    memory_stays_flat(&gpu(), "vulkan", false);
}

/// A synchronized layer's calls allocate their O(channels) readback and
/// upload buffers per call: they must be freed too.
#[test]
fn three_thousand_synchronized_training_steps_keep_memory_flat() {
    memory_stays_flat(&gpu(), "vulkan, synchronized", true);
}

#[test]
fn three_thousand_training_steps_keep_memory_flat_on_gl() {
    memory_stays_flat(&gl(), "gl", false);
}
