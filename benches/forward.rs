//! Criterion benchmarks over the same cases as `wgpu-batchnorm bench`:
//! training forward, inference forward and backward of every default shape
//! (float32), with the copy baseline beside them. Each iteration records
//! one call, submits it and waits for the GPU. The CLI's `bench` reports
//! the ratios to the streaming baseline; criterion tracks changes over time.

use criterion::{Criterion, criterion_group, criterion_main};
use wgpu_batchnorm::bench::default_shapes;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, Tensor};

fn wait(ctx: &GpuContext) {
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("GPU poll");
}

fn layer_passes(c: &mut Criterion) {
    let ctx = GpuContext::from_env().expect("a GPU adapter (scripts/ensure-driver.sh installs lavapipe)");
    let mut group = c.benchmark_group(format!("batchnorm on {}", ctx.describe()));
    group.sample_size(10);
    for bench in default_shapes() {
        let config = BatchNormConfig::default().with_axis(bench.axis);
        let channels = bench.shape[config.resolve_axis(bench.shape.len()).unwrap()];
        let layer = BatchNorm::new(&ctx, config, channels).unwrap();
        let len: usize = bench.shape.iter().product();
        let data: Vec<f32> = (0..len).map(|i| 3.0 + (i % 251) as f32 * 0.01).collect();
        let x = Tensor::from_f32(&ctx, &bench.shape, &data).unwrap();
        let y = layer.forward(&x, None, None).unwrap();
        let grads = layer.gradient_tensors(&x).unwrap();
        let name = format!("{:?} axis {}", bench.shape, bench.axis);
        group.bench_function(format!("copy {name}"), |b| {
            b.iter(|| {
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                encoder.copy_buffer_to_buffer(x.buffer(), 0, y.buffer(), 0, (len * 4) as u64);
                ctx.queue().submit([encoder.finish()]);
                wait(&ctx);
            })
        });
        for (mode, training) in [("train_forward", Some(true)), ("inference_forward", None)] {
            group.bench_function(format!("{mode} {name}"), |b| {
                b.iter(|| {
                    layer.forward_into(&x, training, None, &y).map(drop).unwrap();
                    wait(&ctx);
                })
            });
        }
        let saved = layer.forward_into(&x, Some(true), None, &y).unwrap();
        group.bench_function(format!("backward {name}"), |b| {
            b.iter(|| {
                layer.backward_into(&saved, &x, false, &grads).unwrap();
                wait(&ctx);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layer_passes);
criterion_main!(benches);
