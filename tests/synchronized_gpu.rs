//! Synchronized GPU layers across several contexts of one process (issue
//! 11): ranks alternate between the Vulkan and the GL adapter, hold uneven
//! slices of a global batch (one empty, one fully masked out), and run
//! training steps through a `LocalExchange`; their outputs, gradients and
//! moving statistics must be those of the float64 reference over the whole
//! batch, and ranks on one adapter must hold bitwise the same state, under
//! every reduction scheme (issue 20).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{gl, gpu, tolerance};
use wgpu_batchnorm::keras::{KerasLayerConfig, error_measure};
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::sync::Scheme;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, DType, Error, Exchange, GpuContext, LocalExchange, Mask, RenormClipping, StateSlot,
    Tensor,
};

/// Deterministic values around `offset`, never all equal, as `dtype` holds them.
fn values(n: usize, seed: u64, offset: f32, dtype: DType) -> Vec<f32> {
    common::hashed_unit(n, seed)
        .map(|u| dtype.round(offset + u as f32 * 4.0 - 2.0))
        .collect()
}

struct Case {
    config: BatchNormConfig,
    /// The global batch; ranks split axis 0.
    shape: Vec<usize>,
    split: Vec<usize>,
    masked: bool,
    dtype: DType,
    /// Inputs of this size around 0, rows in pairs of opposite values (a
    /// global mean near 0 with values far past it); 0: around 3.
    magnitude: f32,
    /// The reduction every rank asks for.
    scheme: Scheme,
}

/// What one rank ends with: per step (y, dx, dgamma, dbeta), then its state.
type RankResult = (Vec<[Vec<f32>; 4]>, Vec<(StateSlot, Vec<f32>)>);

const STEPS: usize = 3;

/// One step's global x, dy and mask.
type Step = (Vec<f32>, Vec<f32>, Option<Vec<u8>>);

fn contexts(ranks: usize) -> Vec<GpuContext> {
    (0..ranks).map(|r| if r % 2 == 0 { gpu() } else { gl() }).collect()
}

fn run(case: &Case) {
    let what = format!(
        "{:?} split {:?} axis {} masked {} {} {}",
        case.shape, case.split, case.config.axis, case.masked, case.dtype, case.scheme
    );
    let rows: usize = case.split.iter().sum();
    assert_eq!(rows, case.shape[0]);
    let row_len: usize = case.shape[1..].iter().product();
    let last = *case.shape.last().unwrap();
    let channels = case.shape[case.config.resolve_axis(case.shape.len()).unwrap()];
    let mut starts = vec![0];
    for s in &case.split {
        starts.push(starts.last().unwrap() + s);
    }
    let steps: Vec<Step> = (0..STEPS)
        .map(|step| {
            let mut x = values(rows * row_len, 10 + step as u64, 3.0 - step as f32, case.dtype);
            if case.magnitude != 0.0 {
                x = values(rows * row_len, 10 + step as u64, 0.0, case.dtype);
                for v in &mut x {
                    *v *= case.magnitude;
                }
                for pair in x.chunks_exact_mut(2 * row_len) {
                    let (even, odd) = pair.split_at_mut(row_len);
                    for (o, e) in odd.iter_mut().zip(even.iter()) {
                        *o = -*e;
                    }
                }
            }
            let dy = values(rows * row_len, 20 + step as u64, 0.5, case.dtype);
            // rank 0 entirely masked out in the first step
            let mask = (0..rows * row_len / last)
                .map(|i| u8::from(i % 3 != 1 && (step > 0 || i >= case.split[0] * row_len / last)))
                .collect();
            (x, dy, case.masked.then_some(mask))
        })
        .collect();

    let mut whole = ReferenceLayer::new(case.config.clone(), channels).unwrap();
    let mut want = Vec::new();
    for (x, dy, mask) in &steps {
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let dy: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
        let y = whole.forward(&x, &case.shape, Some(true), mask.as_deref()).unwrap();
        want.push((y, whole.backward(&dy, true).unwrap()));
    }

    let exchanges = LocalExchange::group(case.split.len(), Duration::from_secs(60));
    let results: Vec<RankResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
            .into_iter()
            .zip(contexts(case.split.len()))
            .enumerate()
            .map(|(rank, (ex, ctx))| {
                let (a, b) = (starts[rank] * row_len, starts[rank + 1] * row_len);
                let mut shape = case.shape.clone();
                shape[0] = case.split[rank];
                let steps = &steps;
                scope.spawn(move || {
                    let mut layer = BatchNorm::new(&ctx, case.config.clone(), channels).unwrap();
                    layer.set_exchange(Arc::new(ex.with_scheme(case.scheme)));
                    let mut out = Vec::new();
                    for (x, dy, mask) in steps {
                        let x = Tensor::from_f32_as(&ctx, &shape, &x[a..b], case.dtype).unwrap();
                        let dy = Tensor::from_f32_as(&ctx, &shape, &dy[a..b], case.dtype).unwrap();
                        let mask = mask
                            .as_ref()
                            .map(|m| Mask::from_u8(&ctx, &shape[..shape.len() - 1], &m[a / last..b / last]).unwrap());
                        let (y, saved) = layer.forward_saved(&x, Some(true), mask.as_ref()).unwrap();
                        let g = layer.backward(&saved, &dy, true).unwrap();
                        let read = |t: &Tensor| t.read_f32(&ctx).unwrap();
                        out.push([
                            read(&y),
                            read(&g.dx),
                            read(g.dgamma.as_ref().unwrap()),
                            read(g.dbeta.as_ref().unwrap()),
                        ]);
                    }
                    (out, layer.named_weights().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
    let forward_tol = tolerance(case.dtype);
    let gradient_tol = wgpu_batchnorm::keras::tolerance(case.dtype, true);
    for (rank, (out, state)) in results.iter().enumerate() {
        let (a, b) = (starts[rank] * row_len, starts[rank + 1] * row_len);
        for (step, (got, (wy, wg))) in out.iter().zip(&want).enumerate() {
            let at = format!("{what}: rank {rank} step {step}");
            let checks = [
                ("y", &got[0], &wy[a..b], forward_tol),
                ("dx", &got[1], &wg.dx[a..b], gradient_tol),
                ("dgamma", &got[2], &wg.dgamma.as_ref().unwrap()[..], gradient_tol),
                ("dbeta", &got[3], &wg.dbeta.as_ref().unwrap()[..], gradient_tol),
            ];
            for (name, got, truth, tol) in checks {
                assert_eq!(got.len(), truth.len(), "{at} {name}");
                let err = error_measure(&f64s(got), truth);
                assert!(err <= tol, "{at} {name}: error {err:.2e} > {tol:.0e}");
            }
        }
        for (slot, values) in state {
            let truth = whole.state.slot(*slot);
            let err = if case.magnitude != 0.0 && *slot == StateSlot::MovingMean {
                // a mean near 0 of values near 1e19: float32 sums are off by
                // about 1e19 * 2^-24 however they are merged; measured
                // against the values' size
                let worst = values
                    .iter()
                    .zip(truth)
                    .map(|(&g, t)| (g as f64 - t).abs())
                    .fold(0.0, f64::max);
                worst / case.magnitude as f64
            } else {
                error_measure(&f64s(values), truth)
            };
            assert!(err <= forward_tol, "{what}: rank {rank} {slot:?} error {err:.2e}");
        }
    }
    // ranks of one adapter (r and r - 2) ran the same kernels on the same
    // merged moments: the same bits
    for rank in 2..results.len() {
        let ((mine, state), (theirs, their_state)) = (&results[rank], &results[rank - 2]);
        assert_eq!(state, their_state, "{what}: rank {rank}'s state");
        for (step, (mine, theirs)) in mine.iter().zip(theirs).enumerate() {
            assert_eq!(
                mine[2..],
                theirs[2..],
                "{what}: rank {rank}'s dgamma, dbeta in step {step}"
            );
        }
    }
}

fn renorm() -> BatchNormConfig {
    BatchNormConfig::default()
        .with_renorm(true)
        .with_renorm_clipping(RenormClipping {
            rmax: Some(1.5),
            rmin: Some(0.7),
            dmax: Some(0.3),
        })
}

#[test]
fn vulkan_and_gl_ranks_match_one_layer_over_the_global_batch() {
    let nchw = BatchNormConfig::default().with_axis(1);
    let case = |config: &BatchNormConfig, shape: &[usize], split: &[usize], masked, dtype| Case {
        config: config.clone(),
        shape: shape.to_vec(),
        split: split.to_vec(),
        masked,
        dtype,
        magnitude: 0.0,
        scheme: Scheme::Auto,
    };
    let pytorch = BatchNormConfig::default()
        .with_running_statistics(wgpu_batchnorm::RunningStatistics::PyTorch)
        .with_momentum(0.1);
    let plain = BatchNormConfig::default();
    for case in [
        // an empty rank among three
        case(&plain, &[9, 5], &[2, 0, 7], false, DType::F32),
        // four ranks, a mask, rank 0 fully masked out in the first step
        case(&plain, &[12, 3, 4], &[3, 4, 1, 4], true, DType::F32),
        case(&plain, &[12, 3, 4], &[3, 4, 1, 4], true, DType::F16),
        // runs, with many tiles per channel
        case(&nchw, &[5, 3, 7], &[1, 4], false, DType::F32),
        case(&nchw, &[6, 4, 3001], &[5, 1], true, DType::F16),
        case(&renorm(), &[10, 6], &[6, 4], false, DType::F32),
        case(&renorm(), &[12, 3, 4], &[5, 0, 7], true, DType::F32),
        case(&pytorch, &[9, 7], &[4, 2, 3], false, DType::F32),
        // +-1e19 in opposite pairs: a global mean near 0, M2 past float32
        Case {
            magnitude: 1e19,
            ..case(&plain, &[10, 6], &[3, 7], false, DType::F32)
        },
        // rows wider than a workgroup, uneven
        case(&plain, &[1031, 300], &[17, 1014], true, DType::F32),
        // the schemes Auto does not pick for these: an empty rank, a rank
        // fully masked out
        Case {
            scheme: Scheme::Tree,
            ..case(&plain, &[12, 3, 4], &[3, 4, 1, 4], true, DType::F32)
        },
        Case {
            scheme: Scheme::Tree,
            ..case(&renorm(), &[12, 3, 4], &[5, 0, 7], true, DType::F32)
        },
        Case {
            scheme: Scheme::AllGather,
            ..case(&plain, &[9, 5], &[2, 0, 7], false, DType::F32)
        },
        // more ranks than channels: ranks with no range of their own
        Case {
            scheme: Scheme::ReduceScatter,
            ..case(&plain, &[10, 2], &[3, 0, 2, 4, 1], true, DType::F32)
        },
    ] {
        run(&case);
    }
}

/// Two ranks on the GL context and the Vulkan one whose layers differ
/// (epsilon): every rank gets an error, none hangs.
#[test]
fn ranks_whose_layers_differ_all_get_an_error() {
    let exchanges = LocalExchange::group(2, Duration::from_secs(60));
    let start = Instant::now();
    let errors: Vec<Error> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
            .into_iter()
            .zip(contexts(2))
            .map(|(ex, ctx)| {
                scope.spawn(move || {
                    let config = BatchNormConfig::default().with_epsilon(1e-3 * (1.0 + ex.rank() as f32));
                    let mut layer = BatchNorm::new(&ctx, config, 2).unwrap();
                    layer.set_exchange(Arc::new(ex));
                    let x = Tensor::from_f32(&ctx, &[4, 2], &values(8, 3, 0.0, DType::F32)).unwrap();
                    layer.forward(&x, Some(true), None).unwrap_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    for e in errors {
        assert!(e.to_string().contains("another call"), "{e}");
    }
}

/// A rank whose backward is wrong (dy of another shape) fails, and tells
/// the others, which fail in well under the exchange's timeout.
#[test]
fn a_failing_rank_fails_the_others_at_once() {
    let exchanges = LocalExchange::group(3, Duration::from_secs(120));
    let start = Instant::now();
    let errors: Vec<[Error; 2]> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
            .into_iter()
            .zip(contexts(3))
            .map(|(ex, ctx)| {
                scope.spawn(move || {
                    let rank = ex.rank();
                    let mut layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 2).unwrap();
                    layer.set_exchange(Arc::new(ex));
                    let x = Tensor::from_f32(&ctx, &[4, 2], &values(8, 4, 0.0, DType::F32)).unwrap();
                    // rank 2's forward has a mask of the wrong shape
                    let mask_rows = if rank == 2 { 3 } else { 4 };
                    let mask = Mask::from_u8(&ctx, &[mask_rows], &vec![1; mask_rows]).unwrap();
                    let forward_error = layer.forward(&x, Some(true), Some(&mask)).unwrap_err();
                    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
                    // then its backward has dy of the wrong shape
                    let shape: &[usize] = if rank == 2 { &[2, 2] } else { &[4, 2] };
                    let dy = Tensor::from_f32(&ctx, shape, &values(shape[0] * 2, 5, 0.0, DType::F32)).unwrap();
                    let backward_error = layer.backward(&saved, &dy, false).unwrap_err();
                    // the failed rounds kept every rank in step: a good step runs
                    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
                    let dy = Tensor::from_f32(&ctx, &[4, 2], &values(8, 5, 0.0, DType::F32)).unwrap();
                    layer.backward(&saved, &dy, false).unwrap();
                    [forward_error, backward_error]
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    for e in &errors[2] {
        assert!(matches!(e, Error::Shape { .. }), "{e}");
    }
    for e in errors[..2].iter().flatten() {
        assert!(
            matches!(e, Error::Exchange { .. }) && e.to_string().contains("rank 2"),
            "{e}"
        );
    }
}

/// A rank with an empty batch trains in a group of one: nothing to
/// normalise, zero gradient sums.
#[test]
fn an_empty_synchronized_rank_runs_forward_and_backward() {
    let ctx = gpu();
    let mut layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    layer.set_exchange(Arc::new(LocalExchange::group(1, Duration::from_secs(10)).remove(0)));
    let empty = Tensor::from_f32(&ctx, &[0, 4, 3], &[]).unwrap();
    let mask = Mask::from_u8(&ctx, &[0, 4], &[]).unwrap();
    let (y, saved) = layer.forward_saved(&empty, Some(true), Some(&mask)).unwrap();
    assert!(y.read_f32(&ctx).unwrap().is_empty());
    let g = layer.backward(&saved, &empty, true).unwrap();
    assert!(g.dx.read_f32(&ctx).unwrap().is_empty());
    assert_eq!(g.dgamma.unwrap().read_f32(&ctx).unwrap(), vec![0.0; 3]);
    assert_eq!(g.dbeta.unwrap().read_f32(&ctx).unwrap(), vec![0.0; 3]);
    // inference of an empty batch too
    assert!(
        layer
            .forward(&empty, None, None)
            .unwrap()
            .read_f32(&ctx)
            .unwrap()
            .is_empty()
    );
}

/// Keras's `synchronized: true` builds a layer that needs an exchange: its
/// training calls say so until it has one, inference needs none, and a
/// synchronized training call cannot be recorded into an encoder. With a
/// group of one, it is the plain layer.
#[test]
fn a_keras_synchronized_layer_needs_an_exchange() {
    let ctx = gpu();
    let json = r#"{"class_name": "BatchNormalization", "config": {"axis": -1, "synchronized": true}}"#;
    let config = KerasLayerConfig::from_json(json).unwrap().config;
    assert!(config.synchronized);
    let mut layer = BatchNorm::new(&ctx, config.clone(), 3).unwrap();
    let data = values(12, 6, 1.0, DType::F32);
    let x = Tensor::from_f32(&ctx, &[4, 3], &data).unwrap();
    let err = layer.forward(&x, Some(true), None).unwrap_err();
    assert!(err.to_string().contains("set_exchange"), "{err}");
    let inference = layer.forward(&x, None, None).unwrap().read_f32(&ctx).unwrap();

    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let y = Tensor::from_f32(&ctx, &[4, 3], &data).unwrap();
    layer.set_exchange(Arc::new(LocalExchange::group(1, Duration::from_secs(10)).remove(0)));
    let err = layer
        .record_forward(&mut encoder, &x, Some(true), None, &y)
        .unwrap_err();
    assert!(matches!(err, Error::Exchange { .. }), "{err}");
    // inference records as any layer's
    layer.record_forward(&mut encoder, &x, None, None, &y).unwrap();

    let plain = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    assert_eq!(
        plain.forward(&x, None, None).unwrap().read_f32(&ctx).unwrap(),
        inference
    );
    let (y_sync, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
    let (y_plain, plain_saved) = plain.forward_saved(&x, Some(true), None).unwrap();
    let close = |a: Vec<f32>, b: Vec<f32>| {
        let err = error_measure(
            &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        assert!(err <= 1e-6, "{err:.2e}");
    };
    close(y_sync.read_f32(&ctx).unwrap(), y_plain.read_f32(&ctx).unwrap());
    let dy = Tensor::from_f32(&ctx, &[4, 3], &values(12, 7, 0.0, DType::F32)).unwrap();
    let g = layer.backward(&saved, &dy, false).unwrap();
    let p = plain.backward(&plain_saved, &dy, false).unwrap();
    close(g.dx.read_f32(&ctx).unwrap(), p.dx.read_f32(&ctx).unwrap());
    close(
        g.dgamma.unwrap().read_f32(&ctx).unwrap(),
        p.dgamma.unwrap().read_f32(&ctx).unwrap(),
    );
    // the config round-trips with its flag
    let back = KerasLayerConfig {
        config: layer.config().clone(),
        ..KerasLayerConfig::from_json(json).unwrap()
    };
    assert!(back.to_json().contains("\"synchronized\": true"));
}

/// An unsynchronized layer refuses an empty batch; a synchronized rank
/// with one joins the exchange.
#[test]
fn only_a_synchronized_layer_takes_an_empty_batch() {
    let ctx = gpu();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    let empty = Tensor::from_f32(&ctx, &[0, 3], &[]).unwrap();
    let err = layer.forward(&empty, Some(true), None).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(empty.read_f32(&ctx).unwrap().is_empty());
}
