//! Trains a BatchNormalization layer (on the GPU) followed by a tiny linear
//! layer (on the CPU) to fit a target that depends on standardised inputs.
//! Prints the loss going down and the moving statistics converging to the
//! data's.
//!
//!     cargo run --release --example train

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, Sgd, Tensor};

const CHANNELS: usize = 4;
const BATCH: usize = 256;
/// The data: channel c is drawn from N(MEANS[c], STDS[c]^2).
const MEANS: [f32; CHANNELS] = [5.0, -3.0, 10.0, 0.5];
const STDS: [f32; CHANNELS] = [2.0, 0.5, 4.0, 1.0];
/// The target: sum(WEIGHTS[c] * standardised x_c) + OFFSET.
const WEIGHTS: [f32; CHANNELS] = [1.0, -2.0, 0.5, 3.0];
const OFFSET: f32 = 0.7;

pub struct TrainingRun {
    pub losses: Vec<f32>,
    pub moving_mean: Vec<f32>,
    pub moving_variance: Vec<f32>,
}

fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = 1.0 - rng.random::<f32>();
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

pub fn train(ctx: &GpuContext, steps: usize) -> Result<TrainingRun, wgpu_batchnorm::Error> {
    let config = BatchNormConfig::default().with_momentum(0.95);
    let layer = BatchNorm::new(ctx, config, CHANNELS)?;
    let mut sgd = Sgd::new(&layer, 0.02, 0.5, false)?;
    let mut rng = StdRng::seed_from_u64(1);
    // the linear layer, trained on the CPU with plain SGD
    let (mut w, mut b) = ([0.1f32; CHANNELS], 0.0f32);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let mut x = vec![0.0f32; BATCH * CHANNELS];
        let mut target = vec![OFFSET; BATCH];
        for n in 0..BATCH {
            for c in 0..CHANNELS {
                let z = normal(&mut rng);
                x[n * CHANNELS + c] = MEANS[c] + STDS[c] * z;
                target[n] += WEIGHTS[c] * z;
            }
        }
        let input = Tensor::from_f32(ctx, &[BATCH, CHANNELS], &x)?;
        let (z, saved) = layer.forward_saved(&input, Some(true), None)?;
        let z = z.read_f32(ctx)?;

        // prediction, mean squared error, and its gradient
        let mut loss = 0.0;
        let mut dy = vec![0.0f32; BATCH * CHANNELS];
        let (mut dw, mut db) = ([0.0f32; CHANNELS], 0.0f32);
        for n in 0..BATCH {
            let row = &z[n * CHANNELS..][..CHANNELS];
            let pred = b + row.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>();
            let err = pred - target[n];
            loss += err * err / BATCH as f32;
            let dpred = 2.0 * err / BATCH as f32;
            for c in 0..CHANNELS {
                dy[n * CHANNELS + c] = dpred * w[c];
                dw[c] += dpred * row[c];
            }
            db += dpred;
        }
        losses.push(loss);

        let dy = Tensor::from_f32(ctx, &[BATCH, CHANNELS], &dy)?;
        let grads = layer.backward(&saved, &dy, false)?;
        sgd.step(&layer, &grads)?;
        for c in 0..CHANNELS {
            w[c] -= 0.02 * dw[c];
        }
        b -= 0.02 * db;
    }
    let weights = layer.get_weights()?;
    Ok(TrainingRun {
        losses,
        moving_mean: weights[2].clone(),
        moving_variance: weights[3].clone(),
    })
}

fn main() -> Result<(), wgpu_batchnorm::Error> {
    let ctx = GpuContext::from_env()?;
    println!("adapter: {}", ctx.describe());
    let steps = 300;
    let run = train(&ctx, steps)?;
    for (step, loss) in run.losses.iter().enumerate() {
        if step % 50 == 0 || step + 1 == steps {
            println!("step {step:>3}  loss {loss:.4}");
        }
    }
    println!("channel  data mean  moving_mean  data var  moving_variance");
    for c in 0..CHANNELS {
        println!(
            "{c:>7}  {:>9.3}  {:>11.3}  {:>8.3}  {:>15.3}",
            MEANS[c],
            run.moving_mean[c],
            STDS[c] * STDS[c],
            run.moving_variance[c]
        );
    }
    Ok(())
}
