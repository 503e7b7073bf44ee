//! Criterion benchmarks of the forward pass on the default adapter.
//! Each iteration submits one forward call and waits for the GPU.

use criterion::{Criterion, criterion_group, criterion_main};
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, Tensor};

fn forward(c: &mut Criterion) {
    let ctx = GpuContext::from_env().expect("a GPU adapter (see README: scripts/ensure-driver.sh)");
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    for (shape, axis) in [(&[32usize, 56, 56, 64][..], -1i64), (&[32, 64, 56, 56][..], 1)] {
        let config = BatchNormConfig {
            axis,
            ..Default::default()
        };
        let channels = shape[config.resolve_axis(shape.len()).unwrap()];
        let layer = BatchNorm::new(&ctx, config, channels).unwrap();
        let len: usize = shape.iter().product();
        let data: Vec<f32> = (0..len).map(|i| (i % 251) as f32 * 0.01).collect();
        let x = Tensor::from_f32(&ctx, shape, &data).unwrap();
        for (mode, training) in [("train", Some(true)), ("inference", None)] {
            group.bench_function(format!("{mode} {shape:?} axis {axis}"), |b| {
                b.iter(|| {
                    layer.forward(&x, training, None).unwrap();
                    ctx.device().poll(wgpu::PollType::wait_indefinitely()).unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
