//! Synchronized batch normalization across MPI processes, checked against
//! one float64 layer over the global batch (feature `mpi`):
//!
//!     cargo build --release --features mpi --example sync_train
//!     mpiexec -n 3 target/release/examples/sync_train
//!
//! Every rank holds its slice of a global batch of NHWC images (uneven
//! slices; in the second step the last rank is masked out entirely, in the
//! third, with three ranks or more, rank 1's slice is empty) and runs
//! training steps: forward, backward, an SGD step of gamma and beta. Every
//! rank checks its outputs, its gradients and the layer's state against
//! the reference; rank 0 prints one line:
//!
//!     sync_train: ranks N, global batch B, max error forward E1, gradients E2,
//!     moving statistics E3, ranks identical: yes|no, exchange overhead P%
//!
//! (P: the extra time of a synchronized step over a local one of the same
//! per-rank size) and every rank exits with 1 if an error is above Keras's
//! tolerances (2e-5 forward and state, 1e-4 gradients) or the ranks' state
//! differs. `--mismatch`: rank 1's layer has another epsilon; every rank
//! must get an error from its first training call (exit 0 when each did).

use std::sync::Arc;
use std::time::Instant;

use wgpu_batchnorm::keras::{error_measure, tolerance};
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, DType, Error, Exchange, GpuContext, Mask, MpiExchange, Sgd, StateSlot, Tensor,
};

/// One image: 5 x 6 pixels of 8 channels (NHWC).
const IMAGE: [usize; 3] = [5, 6, 8];
const CHANNELS: usize = IMAGE[2];
const STEPS: usize = 3;
const LEARNING_RATE: f32 = 0.05;
const TIMED_STEPS: usize = 20;

fn main() {
    let universe = mpi::initialize().expect("MPI initialised once");
    let exchange = Arc::new(MpiExchange::new(universe.world()));
    let mismatch = std::env::args().any(|a| a == "--mismatch");
    let code = match if mismatch {
        mismatched(exchange.clone())
    } else {
        train(exchange.clone())
    } {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sync_train: rank {}: {e}", exchange.rank());
            1
        }
    };
    drop(universe);
    std::process::exit(code);
}

/// Rows of the global batch per rank in `step`: uneven, the same total
/// every step; with three ranks or more, rank 1 has none in the third.
fn slices(ranks: usize, step: usize) -> Vec<usize> {
    let mut rows: Vec<usize> = (0..ranks).map(|r| 1 + (r * 5 + 2) % 4).collect();
    if ranks >= 3 && step == 2 {
        rows[0] += rows[1];
        rows[1] = 0;
    }
    rows
}

/// Deterministic values around `offset`, never all equal; every rank
/// makes the same global batch.
fn values(n: usize, seed: u64, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            offset + (h >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

fn config() -> BatchNormConfig {
    BatchNormConfig {
        momentum: 0.9,
        ..Default::default()
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

fn train(exchange: Arc<MpiExchange>) -> Result<i32, Error> {
    let (rank, ranks) = (exchange.rank(), exchange.size());
    let ctx = GpuContext::from_env()?;
    let mut layer = BatchNorm::new(&ctx, config(), CHANNELS)?;
    layer.set_exchange(exchange.clone());
    let mut sgd = Sgd::new(&layer, LEARNING_RATE, 0.0, false)?;
    let mut reference = ReferenceLayer::new(config(), CHANNELS)?;
    let pixels: usize = IMAGE.iter().product();
    let rows_of_mask = IMAGE[0] * IMAGE[1];
    let (mut forward_error, mut gradient_error) = (0.0f64, 0.0f64);
    let mut global_batch = 0;
    for step in 0..STEPS {
        let rows = slices(ranks, step);
        let batch: usize = rows.iter().sum();
        global_batch = batch;
        let start: usize = rows[..rank].iter().sum();
        let (a, b) = (start * pixels, (start + rows[rank]) * pixels);
        let x = values(batch * pixels, 10 + step as u64, 4.0 - step as f32);
        let dy = values(batch * pixels, 20 + step as u64, 0.3);
        // step 1: the last rank masked out entirely, a third of the rest too
        let last_start: usize = rows[..ranks - 1].iter().sum();
        let mask: Vec<u8> = (0..batch * rows_of_mask)
            .map(|i| u8::from(i % 3 != 1 && i / rows_of_mask < last_start))
            .collect();
        let masked = step == 1;

        let global_shape = [batch, IMAGE[0], IMAGE[1], IMAGE[2]];
        let want_y = reference.forward(&f64s(&x), &global_shape, Some(true), masked.then_some(&mask[..]))?;
        let want = reference.backward(&f64s(&dy), true)?;
        for (slot, grad) in [(StateSlot::Gamma, &want.dgamma), (StateSlot::Beta, &want.dbeta)] {
            let grad = grad.as_ref().expect("gamma and beta are trainable");
            for (w, g) in reference.state.slot_mut(slot).iter_mut().zip(grad) {
                *w -= f64::from(LEARNING_RATE) * g;
            }
        }

        let shape = [rows[rank], IMAGE[0], IMAGE[1], IMAGE[2]];
        let x_local = Tensor::from_f32(&ctx, &shape, &x[a..b])?;
        let dy_local = Tensor::from_f32(&ctx, &shape, &dy[a..b])?;
        let mask_local = masked
            .then(|| Mask::from_u8(&ctx, &shape[..3], &mask[a / CHANNELS..b / CHANNELS]))
            .transpose()?;
        let (y, saved) = layer.forward_saved(&x_local, Some(true), mask_local.as_ref())?;
        let grads = layer.backward(&saved, &dy_local, true)?;
        sgd.step(&layer, &grads)?;

        let read = |t: &Tensor| t.read_f32(&ctx).map(|v| f64s(&v));
        forward_error = forward_error.max(error_measure(&read(&y)?, &want_y[a..b]));
        gradient_error = gradient_error.max(error_measure(&read(&grads.dx)?, &want.dx[a..b]));
        for (got, truth) in [(&grads.dgamma, &want.dgamma), (&grads.dbeta, &want.dbeta)] {
            let (got, truth) = (got.as_ref().expect("dgamma, dbeta"), truth.as_ref().expect("dgamma"));
            gradient_error = gradient_error.max(error_measure(&read(got)?, truth));
        }
    }
    let mut state_error = 0.0f64;
    let mut state_bytes = Vec::new();
    for (slot, values) in layer.named_weights()? {
        state_error = state_error.max(error_measure(&f64s(&values), reference.state.slot(slot)));
        state_bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    let identical = exchange.all_gather(&state_bytes)?.iter().all(|s| *s == state_bytes);
    let overhead = overhead_percent(&ctx, &layer, ranks, rank)?;

    // every rank decides alike: it sees every rank's errors
    let mine: Vec<u8> = [forward_error, gradient_error, state_error]
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    let errors: Vec<[f64; 3]> = exchange
        .all_gather(&mine)?
        .iter()
        .map(|b| std::array::from_fn(|i| f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())))
        .collect();
    let worst = |i: usize| errors.iter().map(|e| e[i]).fold(0.0, f64::max);
    let (e1, e2, e3) = (worst(0), worst(1), worst(2));
    if rank == 0 {
        println!(
            "sync_train: ranks {ranks}, global batch {global_batch}, max error forward {e1:.2e}, gradients {e2:.2e}, \
             moving statistics {e3:.2e}, ranks identical: {}, exchange overhead {overhead:.0}%",
            if identical { "yes" } else { "no" }
        );
    }
    let pass = e1 <= tolerance(DType::F32, false)
        && e3 <= tolerance(DType::F32, false)
        && e2 <= tolerance(DType::F32, true)
        && identical;
    Ok(if pass { 0 } else { 1 })
}

/// The extra time of a synchronized training step (forward and backward)
/// over a local one on the same slice, in percent of the local one.
fn overhead_percent(ctx: &GpuContext, synchronized: &BatchNorm, ranks: usize, rank: usize) -> Result<f64, Error> {
    let rows = slices(ranks, 0)[rank];
    let shape = [rows, IMAGE[0], IMAGE[1], IMAGE[2]];
    let x = Tensor::from_f32(ctx, &shape, &values(shape.iter().product(), 30, 1.0))?;
    let dy = Tensor::from_f32(ctx, &shape, &values(shape.iter().product(), 31, 0.0))?;
    let local = BatchNorm::new(ctx, config(), CHANNELS)?;
    let time = |layer: &BatchNorm| -> Result<f64, Error> {
        let grads = layer.gradient_tensors(&dy)?;
        let y = Tensor::from_f32(ctx, &shape, &values(shape.iter().product(), 32, 0.0))?;
        let mut best = f64::INFINITY;
        for _ in 0..TIMED_STEPS {
            let start = Instant::now();
            let saved = layer.forward_into(&x, Some(true), None, &y)?;
            layer.backward_into(&saved, &dy, true, &grads)?;
            // wait for the GPU: a local step's end is its readback too
            grads.dx.read_f32(ctx)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let (t_local, t_sync) = (time(&local)?, time(synchronized)?);
    Ok((t_sync / t_local - 1.0) * 100.0)
}

/// Rank 1's layer has another epsilon: every rank's first training call
/// must fail with an exchange error.
fn mismatched(exchange: Arc<MpiExchange>) -> Result<i32, Error> {
    let rank = exchange.rank();
    let ctx = GpuContext::from_env()?;
    let config = BatchNormConfig {
        epsilon: if rank == 1 { 2e-3 } else { 1e-3 },
        ..config()
    };
    let mut layer = BatchNorm::new(&ctx, config, CHANNELS)?;
    layer.set_exchange(exchange);
    let x = Tensor::from_f32(&ctx, &[2, CHANNELS], &values(2 * CHANNELS, 1, 0.0))?;
    let start = Instant::now();
    match layer.forward(&x, Some(true), None) {
        Err(Error::Exchange(why)) => {
            println!(
                "sync_train: rank {rank}: refused in {:.1} s: {why}",
                start.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Err(e) => {
            println!("sync_train: rank {rank}: another error: {e}");
            Ok(1)
        }
        Ok(_) => {
            println!("sync_train: rank {rank}: the mismatched call ran");
            Ok(1)
        }
    }
}
