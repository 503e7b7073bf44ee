//! Synchronized batch normalization across MPI processes, checked against
//! one float64 layer over the global batch (feature `mpi`):
//!
//!     cargo build --release --features mpi --example sync_train
//!     mpiexec -n 3 target/release/examples/sync_train [--channels C] [--groups G] [--scheme S]
//!
//! Every rank holds its slice of a global batch of NHWC images of 5 x 6
//! pixels of C channels (8 by default; uneven slices; in the second step
//! the last rank is masked out entirely, in the third, with three ranks or
//! more, rank 1's slice is empty) and runs training steps: forward,
//! backward, an SGD step of gamma and beta. `--groups G` splits the world
//! into G groups of consecutive ranks (`MPI_Comm_split`; a world of 4 into
//! two groups of 2), each with a global batch of its own: a layer
//! synchronizes over its group only. Every rank checks its outputs, its
//! gradients and the layer's state against the reference over its group's
//! batch; rank 0 prints one line:
//!
//!     sync_train: ranks N, groups G, channels C, scheme S, global batch B,
//!     max error forward E1, gradients E2, moving statistics E3,
//!     ranks identical: yes|no, groups differ: yes|no|n/a,
//!     exchange overhead P%, synchronized step T ms, bytes per rank per step K
//!
//! (P: the extra time of a synchronized step over a local one of the same
//! per-rank size; T: the best of 20 synchronized steps; K: the bytes the
//! busiest rank's exchange counted, sent plus received, for one training
//! step's forward and backward) and a second line with each call's bytes:
//!
//!     sync_train: per call, busiest rank: forward sent S received R,
//!     backward sent S received R, collectives per step N
//!
//! Every rank exits with 1 if an error is above Keras's tolerances (2e-5
//! forward and state, 1e-4 gradients), the ranks of a group differ, or two
//! groups' states are the same. `--scheme auto|all-gather|reduce-scatter|tree`
//! picks the exchange's reduction (auto: by bytes, per call). `--mismatch`:
//! rank 1's layer has another epsilon; every rank must get an error from
//! its first training call (exit 0 when each did).

use std::sync::Arc;
use std::time::Instant;

use mpi::topology::Color;
use mpi::traits::Communicator;
use wgpu_batchnorm::keras::{error_measure, tolerance};
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::sync::{Scheme, Traffic};
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, DType, Error, Exchange, GpuContext, Mask, MpiExchange, Sgd, StateSlot, Tensor,
};

/// One image: 5 x 6 pixels (NHWC), of `--channels` channels.
const PIXELS: [usize; 2] = [5, 6];
const STEPS: usize = 3;
const LEARNING_RATE: f32 = 0.05;
const TIMED_STEPS: usize = 20;

struct Args {
    channels: usize,
    groups: usize,
    scheme: Scheme,
    mismatch: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        channels: 8,
        groups: 1,
        scheme: Scheme::Auto,
        mismatch: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--mismatch" => args.mismatch = true,
            "--channels" => args.channels = value("--channels")?.parse().map_err(|e| format!("--channels: {e}"))?,
            "--groups" => args.groups = value("--groups")?.parse().map_err(|e| format!("--groups: {e}"))?,
            "--scheme" => args.scheme = value("--scheme")?.parse()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.channels == 0 || args.groups == 0 {
        return Err("--channels and --groups take 1 or more".into());
    }
    Ok(args)
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialised once");
    let world = universe.world();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("sync_train: {e}");
            std::process::exit(2);
        }
    };
    let (world_rank, world_size) = (world.rank() as usize, world.size() as usize);
    if args.groups > world_size {
        eprintln!("sync_train: {} groups of {world_size} ranks", args.groups);
        std::process::exit(2);
    }
    // consecutive ranks per group: a world of 4 in two groups of 2
    let group_of = |rank: usize| rank * args.groups / world_size;
    let group = world
        .split_by_color(Color::with_value(group_of(world_rank) as i32))
        .expect("every rank has a color");
    let exchange = Arc::new(MpiExchange::new(group).with_scheme(args.scheme));
    // the example's own checks go over the whole world
    let checks = MpiExchange::new(universe.world());
    let code = match if args.mismatch {
        mismatched(exchange.clone(), &args)
    } else {
        train(exchange.clone(), &checks, &args, group_of(world_rank), &group_of)
    } {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sync_train: rank {world_rank}: {e}");
            1
        }
    };
    drop((exchange, checks));
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

/// Deterministic values around `offset`, never all equal; every rank of a
/// group makes the same global batch.
fn values(n: usize, seed: u64, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            offset + (h >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

fn config() -> BatchNormConfig {
    BatchNormConfig::default().with_momentum(0.9)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

fn traffic(exchange: &MpiExchange) -> Traffic {
    exchange.traffic().expect("MpiExchange counts its bytes")
}

fn train(
    exchange: Arc<MpiExchange>,
    checks: &MpiExchange,
    args: &Args,
    group: usize,
    group_of: &dyn Fn(usize) -> usize,
) -> Result<i32, Error> {
    let (rank, ranks) = (exchange.rank(), exchange.size());
    let channels = args.channels;
    let image = [PIXELS[0], PIXELS[1], channels];
    let ctx = GpuContext::from_env()?;
    let mut layer = BatchNorm::new(&ctx, config(), channels)?;
    layer.set_exchange(exchange.clone());
    let mut sgd = Sgd::new(&layer, LEARNING_RATE, 0.0, false)?;
    let mut reference = ReferenceLayer::new(config(), channels)?;
    let pixels: usize = image.iter().product();
    let rows_of_mask = PIXELS[0] * PIXELS[1];
    let (mut forward_error, mut gradient_error) = (0.0f64, 0.0f64);
    let mut global_batch = 0;
    // the most one call of each kind moved for this rank
    let (mut forward_bytes, mut backward_bytes) = (Traffic::default(), Traffic::default());
    for step in 0..STEPS {
        let rows = slices(ranks, step);
        let batch: usize = rows.iter().sum();
        global_batch = batch;
        let start: usize = rows[..rank].iter().sum();
        let (a, b) = (start * pixels, (start + rows[rank]) * pixels);
        // each group trains on a batch of its own
        let seed = 10 + step as u64 + 100 * group as u64;
        let x = values(batch * pixels, seed, 4.0 - step as f32 + group as f32);
        let dy = values(batch * pixels, seed + 10, 0.3);
        // step 1: the last rank masked out entirely, a third of the rest too
        let last_start: usize = rows[..ranks - 1].iter().sum();
        let mask: Vec<u8> = (0..batch * rows_of_mask)
            .map(|i| u8::from(i % 3 != 1 && i / rows_of_mask < last_start))
            .collect();
        let masked = step == 1;

        let global_shape = [batch, image[0], image[1], image[2]];
        let want_y = reference.forward(&f64s(&x), &global_shape, Some(true), masked.then_some(&mask[..]))?;
        let want = reference.backward(&f64s(&dy), true)?;
        for (slot, grad) in [(StateSlot::Gamma, &want.dgamma), (StateSlot::Beta, &want.dbeta)] {
            let grad = grad.as_ref().expect("gamma and beta are trainable");
            for (w, g) in reference.state.slot_mut(slot).iter_mut().zip(grad) {
                *w -= f64::from(LEARNING_RATE) * g;
            }
        }

        let shape = [rows[rank], image[0], image[1], image[2]];
        let x_local = Tensor::from_f32(&ctx, &shape, &x[a..b])?;
        let dy_local = Tensor::from_f32(&ctx, &shape, &dy[a..b])?;
        let mask_local = masked
            .then(|| Mask::from_u8(&ctx, &shape[..3], &mask[a / channels..b / channels]))
            .transpose()?;
        let before = traffic(&exchange);
        let (y, saved) = layer.forward_saved(&x_local, Some(true), mask_local.as_ref())?;
        let between = traffic(&exchange);
        let grads = layer.backward(&saved, &dy_local, true)?;
        let after = traffic(&exchange);
        sgd.step(&layer, &grads)?;
        for (most, call) in [
            (&mut forward_bytes, between.since(before)),
            (&mut backward_bytes, after.since(between)),
        ] {
            if call.total() > most.total() {
                *most = call;
            }
        }

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
    // every rank of a group holds the same bits; groups hold others
    let states = checks.all_gather(&state_bytes)?;
    let identical = states
        .iter()
        .enumerate()
        .all(|(r, s)| group_of(r) != group || *s == state_bytes);
    let groups_differ = states
        .iter()
        .enumerate()
        .all(|(r, s)| group_of(r) == group || *s != state_bytes);
    let (overhead, step_ms) = overhead_percent(&ctx, &layer, ranks, rank, channels)?;

    // every rank decides alike: it sees every rank's errors and bytes
    let mine: Vec<u8> = [
        forward_error,
        gradient_error,
        state_error,
        f64::from(u8::from(identical)),
        forward_bytes.sent as f64,
        forward_bytes.received as f64,
        backward_bytes.sent as f64,
        backward_bytes.received as f64,
        (forward_bytes.collectives + backward_bytes.collectives) as f64,
        f64::from(u8::from(groups_differ)),
    ]
    .iter()
    .flat_map(|e| e.to_le_bytes())
    .collect();
    let all: Vec<[f64; 10]> = checks
        .all_gather(&mine)?
        .iter()
        .map(|b| std::array::from_fn(|i| f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())))
        .collect();
    let worst = |i: usize| all.iter().map(|e| e[i]).fold(0.0, f64::max);
    let (e1, e2, e3) = (worst(0), worst(1), worst(2));
    let identical = all.iter().all(|e| e[3] == 1.0);
    // vacuous with one group
    let groups_differ = all.iter().all(|e| e[9] == 1.0);
    let busiest = all
        .iter()
        .max_by_key(|e| (e[4] + e[5] + e[6] + e[7]) as u64)
        .expect("one rank or more");
    if checks.rank() == 0 {
        let step_bytes = (busiest[4] + busiest[5] + busiest[6] + busiest[7]) as u64;
        let yes = |b: bool| if b { "yes" } else { "no" };
        println!(
            "sync_train: ranks {}, groups {}, channels {channels}, scheme {}, global batch {global_batch}, \
             max error forward {e1:.2e}, gradients {e2:.2e}, moving statistics {e3:.2e}, ranks identical: {}, \
             groups differ: {}, exchange overhead {overhead:.0}%, synchronized step {step_ms:.2} ms, \
             bytes per rank per step {step_bytes}",
            checks.size(),
            args.groups,
            args.scheme,
            yes(identical),
            if args.groups == 1 { "n/a" } else { yes(groups_differ) },
        );
        println!(
            "sync_train: per call, busiest rank: forward sent {} received {}, backward sent {} received {}, \
             collectives per step {}",
            busiest[4], busiest[5], busiest[6], busiest[7], busiest[8]
        );
    }
    let pass = e1 <= tolerance(DType::F32, false)
        && e3 <= tolerance(DType::F32, false)
        && e2 <= tolerance(DType::F32, true)
        && identical
        && groups_differ;
    Ok(if pass { 0 } else { 1 })
}

/// The extra time of a synchronized training step (forward and backward)
/// over a local one on the same slice, in percent of the local one, and
/// the synchronized step's time in milliseconds.
fn overhead_percent(
    ctx: &GpuContext,
    synchronized: &BatchNorm,
    ranks: usize,
    rank: usize,
    channels: usize,
) -> Result<(f64, f64), Error> {
    let rows = slices(ranks, 0)[rank];
    let shape = [rows, PIXELS[0], PIXELS[1], channels];
    let x = Tensor::from_f32(ctx, &shape, &values(shape.iter().product(), 30, 1.0))?;
    let dy = Tensor::from_f32(ctx, &shape, &values(shape.iter().product(), 31, 0.0))?;
    let local = BatchNorm::new(ctx, config(), channels)?;
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
    Ok(((t_sync / t_local - 1.0) * 100.0, t_sync * 1e3))
}

/// Rank 1's layer has another epsilon: every rank's first training call
/// must fail with an exchange error.
fn mismatched(exchange: Arc<MpiExchange>, args: &Args) -> Result<i32, Error> {
    let rank = exchange.rank();
    let ctx = GpuContext::from_env()?;
    let config = config().with_epsilon(if rank == 1 { 2e-3 } else { 1e-3 });
    let channels = args.channels;
    let mut layer = BatchNorm::new(&ctx, config, channels)?;
    layer.set_exchange(exchange);
    let x = Tensor::from_f32(&ctx, &[2, channels], &values(2 * channels, 1, 0.0))?;
    let start = Instant::now();
    match layer.forward(&x, Some(true), None) {
        Err(Error::Exchange { message: why, .. }) => {
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
