//! Synchronized statistics in the float64 reference (issues 11 and 20):
//! ranks holding uneven slices of a global batch, one of them empty,
//! exchanging through `LocalExchange` under every reduction scheme, give
//! the outputs, moving statistics and gradients of one layer over the
//! whole batch, bitwise the same state on every rank; groups split from a
//! world each match one layer over their own batch; ranks that disagree
//! get an error each.

mod common;

use std::time::Duration;

use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::sync::{Exchange, LocalExchange, Scheme};
use wgpu_batchnorm::{BatchNormConfig, Error, RenormClipping};

/// Deterministic values around `offset`, never all equal.
fn values(n: usize, seed: u64, offset: f64) -> Vec<f64> {
    common::hashed_unit(n, seed).map(|u| offset + u * 4.0 - 2.0).collect()
}

struct Case {
    config: BatchNormConfig,
    /// The global batch's shape; ranks split axis 0.
    shape: Vec<usize>,
    /// Rows of axis 0 per rank.
    split: Vec<usize>,
    masked: bool,
}

/// One rank's results: per step (y, gradients), then its state and rank.
type RankResult = (
    Vec<(Vec<f64>, wgpu_batchnorm::reference::ReferenceGradients)>,
    wgpu_batchnorm::reference::ReferenceState,
    usize,
);

/// Runs `case` under `scheme` and returns the state every rank ended with
/// (the same bits on every rank).
fn run(case: &Case, scheme: Scheme) -> wgpu_batchnorm::reference::ReferenceState {
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

    let exchanges = LocalExchange::group(case.split.len(), Duration::from_secs(30))
        .into_iter()
        .map(|ex| ex.with_scheme(scheme));
    let mut starts = vec![0];
    for s in &case.split {
        starts.push(starts.last().unwrap() + s);
    }
    let results: Vec<RankResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = exchanges
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
    results[0].1.clone()
}

#[test]
fn uneven_ranks_match_one_layer_over_the_global_batch() {
    let channels_last = BatchNormConfig::default();
    let nchw = BatchNormConfig::default().with_axis(1);
    let renorm = BatchNormConfig::default()
        .with_renorm(true)
        .with_renorm_clipping(RenormClipping {
            rmax: Some(1.5),
            rmin: Some(0.7),
            dmax: Some(0.3),
        });
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
        // the all-gather and the reduce-scatter merge in rank order alike:
        // the same bits; the tree in its own order, close to them
        let states: Vec<_> = Scheme::ALL.into_iter().map(|scheme| run(&case, scheme)).collect();
        assert_eq!(states[1], states[2], "{:?}: all-gather vs reduce-scatter", case.shape);
    }
}

/// A world of five ranks split into groups of three and two
/// (`LocalExchange::split`): each group synchronizes over its own ranks,
/// and matches one layer over its own batch, not the other group's.
#[test]
fn groups_split_from_a_world_each_match_their_own_batch() {
    let colors = [0, 1, 0, 1, 0];
    let world = LocalExchange::split(&colors, Duration::from_secs(30));
    let shape = [4, 3];
    let results: Vec<(usize, Vec<f64>, Vec<f64>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = world
            .into_iter()
            .zip(colors)
            .map(|(ex, group)| {
                scope.spawn(move || {
                    let mut layer = ReferenceLayer::new(BatchNormConfig::default(), 3).unwrap();
                    // each rank's slice of its group's batch
                    let x = values(12, 10 * group as u64 + ex.rank() as u64, 3.0 + group as f64);
                    let y = layer.forward_synchronized(&x, &shape, Some(true), None, &ex).unwrap();
                    (group, x, y)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for group in 0..2 {
        let members: Vec<&(usize, Vec<f64>, Vec<f64>)> = results.iter().filter(|r| r.0 == group).collect();
        let batch: Vec<f64> = members.iter().flat_map(|r| r.1.clone()).collect();
        let mut whole = ReferenceLayer::new(BatchNormConfig::default(), 3).unwrap();
        let want = whole
            .forward(&batch, &[4 * members.len(), 3], Some(true), None)
            .unwrap();
        let got: Vec<f64> = members.iter().flat_map(|r| r.2.clone()).collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-9 * (1.0 + w.abs()),
                "group {group} [{i}]: {g} vs {w}"
            );
        }
    }
}

/// With far more ranks than channels, the tree (which `Auto` picks) still
/// gives one layer over the global batch, bitwise the same on every rank.
#[test]
fn many_ranks_of_few_channels_match_through_the_tree() {
    let case = Case {
        config: BatchNormConfig::default(),
        shape: vec![40, 2],
        split: (0..19).map(|r| [1, 3, 0, 2][r % 4]).chain([12]).collect(),
        masked: false,
    };
    assert_eq!(
        wgpu_batchnorm::sync::call_cost(Scheme::Auto, 20, 2).scheme,
        Scheme::Tree
    );
    run(&case, Scheme::Auto);
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
                    let config = BatchNormConfig::default().with_epsilon(1e-3 * (1.0 + ex.rank() as f32));
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
        assert!(matches!(e, Error::Exchange { .. }), "{e}");
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
    assert!(matches!(errors[2], Error::Shape { .. }), "{}", errors[2]);
    for e in &errors[..2] {
        assert!(e.to_string().contains("rank 2"), "{e}");
    }
}
