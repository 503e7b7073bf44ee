//! The main job: the adapter, a few Keras-style training steps and an
//! inference call on a realistic shape, each checked against the float64
//! reference.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use wgpu_batchnorm::keras::error_measure;
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Tensor};

use super::{EXIT_FAIL, Target};

const SHAPE: [usize; 4] = [32, 56, 56, 64];
const TRAINING_STEPS: usize = 3;

pub(crate) fn run(target: &Target) -> Result<u8, String> {
    let ctx = super::open(target)?;
    match ctx.adapter_info() {
        Some(i) => println!(
            "adapter: {} ({}, {:?}, driver {} {})",
            i.name, i.backend, i.device_type, i.driver, i.driver_info
        ),
        None => println!("adapter: {}", ctx.describe()),
    }
    let err = |e: wgpu_batchnorm::Error| e.to_string();
    let config = BatchNormConfig::default();
    let channels = SHAPE[3];
    let layer = BatchNorm::new(&ctx, config.clone(), channels).map_err(err)?;
    let mut reference = ReferenceLayer::new(config, channels).map_err(err)?;
    let len: usize = SHAPE.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // a warm-up call compiles the pipelines outside the timings
    let warm = Tensor::from_f32(&ctx, &SHAPE, &vec![0.5; len]).map_err(err)?;
    layer.forward(&warm, None, None).map_err(err)?;

    println!(
        "{:<16} {:<10} {:>10} {:>10} {:>8}  check",
        "shape", "mode", "max error", "ms", "GB/s"
    );
    let mut all_pass = true;
    let steps = (0..TRAINING_STEPS).map(|_| Some(true)).chain([None]);
    for training in steps {
        // channels with different means and scales, far from zero
        let x: Vec<f32> = (0..len)
            .map(|e| {
                let c = (e % channels) as f32;
                3.0 + 0.1 * c + (1.0 + 0.05 * c) * (rng.random::<f32>() * 2.0 - 1.0)
            })
            .collect();
        let input = Tensor::from_f32(&ctx, &SHAPE, &x).map_err(err)?;
        let start = Instant::now();
        let y = layer.forward(&input, training, None).map_err(err)?;
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| e.to_string())?;
        let elapsed = start.elapsed();
        let got: Vec<f64> = y.read_f32(&ctx).map_err(err)?.into_iter().map(f64::from).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let truth = reference.forward(&x64, &SHAPE, training, None).map_err(err)?;
        let error = error_measure(&got, &truth);
        let pass = error <= wgpu_batchnorm::keras::tolerance(wgpu_batchnorm::DType::F32, false);
        all_pass &= pass;
        let (mode, passes) = if training.is_some() {
            ("training", 3.0)
        } else {
            ("inference", 2.0)
        };
        let gbps = passes * (len * 4) as f64 / elapsed.as_secs_f64() / 1e9;
        println!(
            "{:<16} {:<10} {:>10.2e} {:>10} {:>8.2}  {}",
            format!("{}x{}x{}x{}", SHAPE[0], SHAPE[1], SHAPE[2], SHAPE[3]),
            mode,
            error,
            super::ms(elapsed),
            gbps,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    let state = layer.named_weights().map_err(err)?;
    let mut state_error = 0.0f64;
    for (slot, values) in state {
        let got: Vec<f64> = values.into_iter().map(f64::from).collect();
        state_error = state_error.max(error_measure(&got, reference.state.slot(slot)));
    }
    println!("moving statistics after {TRAINING_STEPS} steps: max error {state_error:.2e}");
    println!("(times include submission and a blocking wait; GB/s counts the bytes a perfect pass moves)");
    Ok(if all_pass && state_error <= 2e-5 { 0 } else { EXIT_FAIL })
}
