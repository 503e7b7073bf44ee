//! Every backward is paired with its own forward call: threads sharing one
//! layer, forward calls recorded into an application's encoder and
//! submitted later, recorded calls dropped unsubmitted. On Vulkan and GL.

mod common;

use common::{random_input, read64, rng};
use wgpu_batchnorm::keras::error_measure;
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, SavedForward, Tensor};

const SHAPE: [usize; 2] = [24, 6];
const LEN: usize = 24 * 6;

/// dx of a training forward on `x` for `dy`, from the float64 reference
/// (the default config's gamma and beta never change here).
fn reference_dx(x: &[f32], dy: &[f32]) -> Vec<f64> {
    let mut reference = ReferenceLayer::new(BatchNormConfig::default(), SHAPE[1]).unwrap();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    reference.forward(&x64, &SHAPE, Some(true), None).unwrap();
    let dy64: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
    reference.backward(&dy64, false).unwrap().dx
}

fn dx_of(ctx: &GpuContext, layer: &BatchNorm, saved: &SavedForward, dy: &Tensor) -> Vec<f64> {
    let g = layer.backward(saved, dy, false).unwrap();
    read64(ctx, &g.dx)
}

const TOL: f64 = 1e-4;

/// Four threads train one shared layer, each on inputs of its own (far
/// apart, so another thread's statistics would show): every iteration's dx
/// is the one of that thread's input.
fn threads_get_their_own_gradients(ctx: &GpuContext) {
    let layer = BatchNorm::new(ctx, BatchNormConfig::default(), SHAPE[1]).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (layer, ctx) = (&layer, ctx.clone());
            s.spawn(move || {
                let mut r = rng(100 + t);
                for i in 0..60 {
                    let x32 = random_input(&mut r, LEN, 10.0 * t as f32);
                    let dy32 = random_input(&mut r, LEN, 0.5);
                    let x = Tensor::from_f32(&ctx, &SHAPE, &x32).unwrap();
                    let dy = Tensor::from_f32(&ctx, &SHAPE, &dy32).unwrap();
                    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
                    let err = error_measure(&dx_of(&ctx, layer, &saved, &dy), &reference_dx(&x32, &dy32));
                    assert!(err < TOL, "thread {t} iteration {i}: dx error {err:.2e}");
                }
            });
        }
    });
}

#[test]
fn threads_sharing_a_layer_get_the_gradients_of_their_own_input() {
    for ctx in common::drivers() {
        threads_get_their_own_gradients(&ctx);
    }
}

/// A forward recorded into an application's encoder, an immediate forward
/// on another input, then the encoder submitted: each backward gets its
/// own call's gradients. A recorded forward dropped unsubmitted changes
/// nothing for the others. Two forward calls in flight (micro-batches)
/// keep their own statistics, in any backward order.
fn interleaved_calls_keep_their_pairing(ctx: &GpuContext) {
    let layer = BatchNorm::new(ctx, BatchNormConfig::default(), SHAPE[1]).unwrap();
    let mut r = rng(7);
    let inputs: Vec<Vec<f32>> = (0..4)
        .map(|i| random_input(&mut r, LEN, 5.0 * i as f32 - 7.0))
        .collect();
    let dy32 = random_input(&mut r, LEN, 0.3);
    let t = |v: &[f32]| Tensor::from_f32(ctx, &SHAPE, v).unwrap();
    let dy = t(&dy32);
    let check = |saved: &SavedForward, x: &[f32], what: &str| {
        let err = error_measure(&dx_of(ctx, &layer, saved, &dy), &reference_dx(x, &dy32));
        assert!(err < TOL, "{what}: dx error {err:.2e}");
    };

    let (x1, x2) = (t(&inputs[0]), t(&inputs[1]));
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let y1 = Tensor::from_f32(ctx, &SHAPE, &[0.0; LEN]).unwrap();
    let recorded = layer.record_forward(&mut encoder, &x1, Some(true), None, &y1).unwrap();
    let (_, immediate) = layer.forward_saved(&x2, Some(true), None).unwrap();
    ctx.queue().submit([encoder.finish()]);
    check(&recorded, &inputs[0], "the recorded forward");
    check(&immediate, &inputs[1], "the immediate forward");

    // a recorded forward never submitted
    let (x3, x4) = (t(&inputs[2]), t(&inputs[3]));
    let (_, third) = layer.forward_saved(&x3, Some(true), None).unwrap();
    {
        let mut dropped = ctx.device().create_command_encoder(&Default::default());
        let y = Tensor::from_f32(ctx, &SHAPE, &[0.0; LEN]).unwrap();
        let _ = layer.record_forward(&mut dropped, &x4, Some(true), None, &y).unwrap();
    }
    check(&third, &inputs[2], "the forward before a dropped one");

    // micro-batches: two forwards, then their backwards in reverse order
    let (_, a) = layer.forward_saved(&x1, Some(true), None).unwrap();
    let (_, b) = layer.forward_saved(&x4, Some(true), None).unwrap();
    check(&b, &inputs[3], "the second micro-batch");
    check(&a, &inputs[0], "the first micro-batch");
}

#[test]
fn interleaved_and_recorded_forward_calls_keep_their_pairing() {
    for ctx in common::drivers() {
        interleaved_calls_keep_their_pairing(&ctx);
    }
}
