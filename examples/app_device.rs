//! Inference inside an application's own wgpu device and command encoder:
//! the application creates the device, owns the buffers, records two layers
//! into one encoder and submits once. Also shows folding the layer into a
//! preceding linear map.
//!
//!     cargo run --release --example app_device

use wgpu_batchnorm::{BatchNorm, BatchNormConfig, DType, GpuContext, StateSlot, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // the application's device, made the usual wgpu way
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))?;
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default()))?;
    println!("adapter: {}", adapter.get_info().name);
    let ctx = GpuContext::from_device(device.clone(), queue.clone());

    // the application's buffer, viewed as a [batch, features] tensor
    let (batch, features) = (4usize, 8usize);
    let data: Vec<f32> = (0..batch * features).map(|i| (i % 7) as f32 - 3.0).collect();
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("activations"),
        size: (data.len() * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    queue.write_buffer(&buffer, 0, bytemuck::cast_slice(&data));
    let x = Tensor::from_buffer(&ctx, buffer, &[batch, features], DType::F32)?;

    let first = BatchNorm::new(&ctx, BatchNormConfig::default(), features)?;
    let second = BatchNorm::new(&ctx, BatchNormConfig::default(), features)?;
    first.set_weight(StateSlot::MovingMean, &[0.5; 8])?;
    first.set_weight(StateSlot::MovingVariance, &[4.0; 8])?;
    let middle = Tensor::from_f32(&ctx, &[batch, features], &vec![0.0; batch * features])?;
    let out = Tensor::from_f32(&ctx, &[batch, features], &vec![0.0; batch * features])?;

    // two layers, one encoder, one submission
    let mut encoder = device.create_command_encoder(&Default::default());
    first.record_forward(&mut encoder, &x, None, None, &middle)?;
    second.record_forward(&mut encoder, &middle, None, None, &out)?;
    queue.submit([encoder.finish()]);
    println!("y = {:?}", &out.read_f32(&ctx)?[..features]);

    // folding: y = x * scale + shift per channel
    let (scale, shift) = first.inference_affine()?;
    println!("first layer folded: scale {:?}, shift {:?}", &scale[..2], &shift[..2]);
    Ok(())
}
