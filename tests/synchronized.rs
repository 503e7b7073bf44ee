//! Synchronized statistics in the float64 reference (issue 11, first
//! part): ranks holding uneven slices of a global batch, one of them
//! empty, exchanging through `LocalExchange`, give the outputs, moving
//! statistics and gradients of one layer over the whole batch, bitwise the
//! same state on every rank; ranks that disagree get an error each.

use std::time::Duration;

use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::sync::{Exchange, LocalExchange};
use wgpu_batchnorm::{BatchNormConfig, Error, RenormClipping};

/// Deterministic values around `offset`, never all equal.
fn values(n: usize, seed: u64, offset: f64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            offset + (h >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect()
}

struct Case {
    config: BatchNormConfig,
    /// The global batch's shape; ranks split axis 0.
    shape: Vec<usize>,
    /// Rows of axis 0 per rank.
    split: Vec<usize>,
    masked: bool,
}

fn run(case: &Case) {
    let rows: usize = case.split.iter().sum();
    assert_eq!(rows, case.shape[0]);
    let row_len: usize = case.shape[1..].iter().product();
    let last = *case.shape.last().unwrap();
    let axis = case.config.resolve_axis(case.shape.len()).unwrap();
    let channels = case.shape[axis];
    let x = values(rows * row_len, 1, 3.0);
    let dy = values(rows * row_len, 2, 0.5);
    // one rank entirely masked out in the first step when masked
    let mask: Vec<u8> = (0..rows * row_len / last)
        .map(|i| u8::from(i % 3 != 0 || i < case.split[0] * row_len / last))
        .collect();
    let mask = case.masked.then_some(mask);

    // the truth: one layer over the whole batch, two training steps
    let mut whole = ReferenceLayer::new(case.config.clone(), channels).unwrap();
    let mut want = Vec::new();
    for _ in 0..2 {
        let y = whole.forward(&x, &case.shape, Some(true), mask.as_deref()).unwrap();
        let g = whole.backward(&dy, true).unwrap();
        want.push((y, g));
    }

    let exchanges = LocalExchange::group(case.split.len(), Duration::from_secs(30));
    let mut starts = vec![0];
    for s in &case.split {
        starts.push(starts.last().unwrap() + s);
    }
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
            .into_iter()
            .enumerate()
            .map(|(rank, ex)| {
                let (a, b) = (starts[rank] * row_len, starts[rank + 1] * row_len);
                let mut shape = case.shape.clone();
                shape[0] = case.split[rank];
                let (x, dy, mask) = (&x, &dy, &mask);
                let config = case.config.clone();
                scope.spawn(move || {
                    let mut layer = ReferenceLayer::new(config, channels).unwrap();
                    let mut steps = Vec::new();
                    for _ in 0..2 {
                        let m = mask.as_ref().map(|m| &m[a / last..b / last]);
                        let y = layer
                            .forward_synchronized(&x[a..b], &shape, Some(true), m, &ex)
                            .unwrap();
                        let g = layer.backward_synchronized(&dy[a..b], true, &ex).unwrap();
                        steps.push((y, g));
                    }
                    (steps, layer.state.clone(), ex.rank())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let close = |a: &[f64], b: &[f64], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() <= 1e-9 * (1.0 + q.abs()), "{what}[{i}]: {p} vs {q}");
        }
    };
    for (steps, state, rank) in &results {
        let (a, b) = (starts[*rank] * row_len, starts[rank + 1] * row_len);
        for (step, ((y, g), (wy, wg))) in steps.iter().zip(&want).enumerate() {
            let what = format!("{:?} rank {rank} step {step}", case.shape);
            close(y, &wy[a..b], &format!("{what} y"));
            close(&g.dx, &wg.dx[a..b], &format!("{what} dx"));
            for (got, truth) in [(&g.dgamma, &wg.dgamma), (&g.dbeta, &wg.dbeta)] {
                close(
                    got.as_ref().unwrap(),
                    truth.as_ref().unwrap(),
                    &format!("{what} dgamma/dbeta"),
                );
            }
        }
        close(&state.moving_mean, &whole.state.moving_mean, "moving mean");
        close(&state.moving_variance, &whole.state.moving_variance, "moving variance");
        // every rank merged the same moments in the same order: the same bits
        assert_eq!(state, &results[0].1, "rank {rank} state");
    }
}

#[test]
fn uneven_ranks_match_one_layer_over_the_global_batch() {
    let channels_last = BatchNormConfig::default();
    let nchw = BatchNormConfig {
        axis: 1,
        ..Default::default()
    };
    let renorm = BatchNormConfig {
        renorm: true,
        renorm_clipping: RenormClipping {
            rmax: Some(1.5),
            rmin: Some(0.7),
            dmax: Some(0.3),
        },
        ..Default::default()
    };
    for case in [
        Case {
            config: channels_last.clone(),
            shape: vec![9, 5],
            split: vec![2, 0, 7],
            masked: false,
        },
        Case {
            config: channels_last.clone(),
            shape: vec![12, 3, 4],
            split: vec![3, 4, 1, 4],
            masked: true,
        },
        Case {
            config: nchw,
            shape: vec![5, 3, 7],
            split: vec![1, 4],
            masked: false,
        },
        Case {
            config: renorm,
            shape: vec![10, 6],
            split: vec![6, 4],
            masked: false,
        },
    ] {
        run(&case);
    }
}

#[test]
fn ranks_with_another_layer_or_call_get_an_error_each() {
    let exchanges = LocalExchange::group(2, Duration::from_secs(30));
    let errors: Vec<Error> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
            .into_iter()
            .map(|ex| {
                scope.spawn(move || {
                    // rank 1's layer has another epsilon
                    let config = BatchNormConfig {
                        epsilon: 1e-3 * (1.0 + ex.rank() as f32),
                        ..Default::default()
                    };
                    let mut layer = ReferenceLayer::new(config, 2).unwrap();
                    layer
                        .forward_synchronized(&values(8, 3, 0.0), &[4, 2], Some(true), None, &ex)
                        .unwrap_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errors {
        assert!(matches!(e, Error::Exchange(_)), "{e}");
    }
}

/// A rank whose own call fails (a wrong dy) tells the others at once: they
/// fail in well under the exchange's timeout.
#[test]
fn a_failing_rank_fails_the_others_at_once() {
    let exchanges = LocalExchange::group(3, Duration::from_secs(60));
    let start = std::time::Instant::now();
    let errors: Vec<Error> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
            .into_iter()
            .map(|ex| {
                scope.spawn(move || {
                    let mut layer = ReferenceLayer::new(BatchNormConfig::default(), 2).unwrap();
                    layer
                        .forward_synchronized(&values(8, 4, 0.0), &[4, 2], Some(true), None, &ex)
                        .unwrap();
                    // rank 2 passes too few gradients
                    let n = if ex.rank() == 2 { 6 } else { 8 };
                    layer.backward_synchronized(&values(n, 5, 0.0), false, &ex).unwrap_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    assert!(matches!(errors[2], Error::Shape(_)), "{}", errors[2]);
    for e in &errors[..2] {
        assert!(e.to_string().contains("rank 2"), "{e}");
    }
}
