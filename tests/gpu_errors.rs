//! What the GPU refuses is an error of the call that caused it, never
//! zeros: a pipeline the device rejects, a kernel over the device's limits,
//! a destroyed buffer, an optimiser of another context. On Vulkan and GL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fresh, random_input, raw_device, rng};
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Error, GpuContext, Sgd, Tensor};

const BACKENDS: [wgpu::Backends; 2] = [wgpu::Backends::VULKAN, wgpu::Backends::GL];

fn input(ctx: &GpuContext, shape: &[usize]) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_f32(ctx, shape, &random_input(&mut rng(7), len, 1.0)).unwrap()
}

/// Runs training forward, inference forward and backward, returning what
/// each gave.
fn calls(ctx: &GpuContext) -> [Result<(), Error>; 3] {
    let layer = BatchNorm::new(ctx, BatchNormConfig::default(), 5).unwrap();
    let x = input(ctx, &[9, 5]);
    let training = layer.forward_saved(&x, Some(true), None).map(|_| ());
    let inference = layer.forward(&x, None, None).map(|_| ());
    // a saved forward from inference, whose kernels are untouched here
    let (_, saved) = layer.forward_saved(&x, None, None).unwrap_or_else(|e| panic!("{e}"));
    let backward = layer.backward(&saved, &x, false).map(|_| ());
    [training, inference, backward]
}

#[test]
fn a_rejected_pipeline_is_an_error_of_the_calls_that_need_it() {
    for backends in BACKENDS {
        // the statistics kernel: training forward fails, inference runs
        let ctx = fresh(backends, None);
        assert!(ctx.break_kernel_for_tests("partial_stats"));
        let [training, inference, backward] = calls(&ctx);
        match training {
            Err(Error::Gpu { what, message }) => {
                assert!(what.contains("partial_stats"), "{backends:?}: {what}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{backends:?}: a training forward with a rejected kernel gave {other:?}"),
        }
        inference.unwrap_or_else(|e| panic!("{backends:?}: {e}"));
        backward.unwrap_or_else(|e| panic!("{backends:?}: {e}"));

        // the dx kernel: backward fails, every forward runs
        let ctx = fresh(backends, None);
        assert!(ctx.break_kernel_for_tests("backward_dx"));
        let [training, inference, backward] = calls(&ctx);
        training.unwrap_or_else(|e| panic!("{backends:?}: {e}"));
        inference.unwrap_or_else(|e| panic!("{backends:?}: {e}"));
        assert!(
            matches!(&backward, Err(Error::Gpu { what, .. }) if what.contains("backward_dx")),
            "{backends:?}: {backward:?}"
        );
    }
    assert!(!fresh(wgpu::Backends::VULKAN, None).break_kernel_for_tests("no_such_kernel"));
}

/// wgpu's downlevel limits and GLES 3.1 guarantee four storage buffers a
/// stage: the backward kernels bind five. Forward runs and is right;
/// backward says which kernel needs which limit.
#[test]
fn a_device_of_four_storage_buffers_refuses_backward_by_name() {
    for backends in BACKENDS {
        let (device, queue) = raw_device(backends, |l| l.max_storage_buffers_per_shader_stage = 4);
        let ctx = GpuContext::from_device(device, queue);
        let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 5).unwrap();
        let x = input(&ctx, &[9, 5]);
        let (y, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
        assert!(y.read_f32(&ctx).unwrap().iter().all(|v| v.is_finite()));
        match layer.backward(&saved, &x, false) {
            Err(Error::DeviceLimit {
                kernel,
                limit,
                needs,
                allows,
            }) => {
                assert!(kernel.starts_with("backward_"), "{kernel}");
                assert_eq!((limit, needs, allows), ("max_storage_buffers_per_shader_stage", 5, 4));
            }
            other => panic!("{backends:?}: {other:?}"),
        }
    }
}

/// A tensor viewing an application's buffer that was destroyed since: the
/// call fails with the GPU's message, and the application's own
/// uncaptured-error handler hears nothing of it.
#[test]
fn a_destroyed_buffer_is_an_error_of_the_call_not_of_the_application() {
    for backends in BACKENDS {
        let (device, queue) = raw_device(backends, |_| {});
        let uncaptured = Arc::new(AtomicUsize::new(0));
        let seen = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        }));
        let ctx = GpuContext::from_device(device.clone(), queue);
        let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 4).unwrap();
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("application buffer"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue_write(&ctx, &buffer);
        let x = Tensor::view_of(&ctx, buffer.clone(), 0, &[8, 4], wgpu_batchnorm::DType::F32).unwrap();
        layer.forward(&x, Some(true), None).unwrap();
        buffer.destroy();
        for training in [Some(true), None] {
            let err = layer.forward(&x, training, None).unwrap_err();
            assert!(matches!(err, Error::Gpu { .. }), "{backends:?}: {err:?}");
        }
        // the layer still works with live buffers
        let y = layer.forward(&input(&ctx, &[8, 4]), Some(true), None).unwrap();
        assert!(y.read_f32(&ctx).unwrap().iter().all(|v| v.is_finite()));
        assert_eq!(uncaptured.load(Ordering::SeqCst), 0, "{backends:?}");
    }
}

fn queue_write(ctx: &GpuContext, buffer: &wgpu::Buffer) {
    let values = random_input(&mut rng(3), 32, 0.0);
    ctx.queue().write_buffer(buffer, 0, bytemuck::cast_slice(&values));
}

#[test]
fn an_optimiser_of_another_context_is_a_typed_error() {
    let (a, b) = (fresh(wgpu::Backends::VULKAN, None), fresh(wgpu::Backends::VULKAN, None));
    let layer_a = BatchNorm::new(&a, BatchNormConfig::default(), 4).unwrap();
    let layer_b = BatchNorm::new(&b, BatchNormConfig::default(), 4).unwrap();
    let (_, saved) = layer_b.forward_saved(&input(&b, &[8, 4]), Some(true), None).unwrap();
    let grads = layer_b.backward(&saved, &input(&b, &[8, 4]), false).unwrap();
    let mut sgd = Sgd::new(&layer_a, 0.1, 0.9, false).unwrap();
    assert!(matches!(sgd.step(&layer_b, &grads), Err(Error::Device { .. })));
    // gradients of another context than the layer's: refused too
    assert!(matches!(sgd.step(&layer_a, &grads), Err(Error::Device { .. })));
    let mut own = Sgd::new(&layer_b, 0.1, 0.9, false).unwrap();
    own.step(&layer_b, &grads).unwrap();
}
