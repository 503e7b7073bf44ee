//! The optimiser step, constraints, regularizers and initializers on the GPU,
//! against float64 computations of Keras's formulas.

mod common;

use common::{gpu, random_input, rng};
use wgpu_batchnorm::keras::error_measure;
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Constraint, Error, Initializer, Regularizer, Sgd, StateSlot, Tensor};

fn sgd_matches_reference(momentum: f32, nesterov: bool, config: BatchNormConfig) {
    let ctx = gpu();
    let shape = [9usize, 4];
    let layer = BatchNorm::new(&ctx, config.clone(), 4).unwrap();
    let mut reference = ReferenceLayer::new(config.clone(), 4).unwrap();
    let mut sgd = Sgd::new(&layer, 0.1, momentum, nesterov).unwrap();
    let (lr, m) = (0.1f64, momentum as f64);
    let mut velocity = [vec![0.0f64; 4], vec![0.0f64; 4]];
    let mut r = rng(21);
    for _ in 0..3 {
        let x32 = random_input(&mut r, 36, 2.0);
        let dy32 = random_input(&mut r, 36, 0.3);
        let x = Tensor::from_f32(&ctx, &shape, &x32).unwrap();
        let dy = Tensor::from_f32(&ctx, &shape, &dy32).unwrap();
        let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
        let grads = layer.backward(&saved, &dy, true).unwrap();
        sgd.step(&layer, &grads).unwrap();

        let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let dy64: Vec<f64> = dy32.iter().map(|&v| v as f64).collect();
        reference.forward(&x64, &shape, Some(true), None).unwrap();
        let g = reference.backward(&dy64, true).unwrap();
        for (k, (slot, grad)) in [(StateSlot::Gamma, g.dgamma), (StateSlot::Beta, g.dbeta)]
            .into_iter()
            .enumerate()
        {
            let Some(grad) = grad else { continue };
            let w = reference.state.slot_mut(slot);
            for c in 0..4 {
                if momentum != 0.0 {
                    velocity[k][c] = velocity[k][c] * m - lr * grad[c];
                    w[c] += if nesterov {
                        velocity[k][c] * m - lr * grad[c]
                    } else {
                        velocity[k][c]
                    };
                } else {
                    w[c] -= lr * grad[c];
                }
            }
            let constraint = if slot == StateSlot::Gamma {
                config.gamma_constraint
            } else {
                config.beta_constraint
            };
            if let Some(c) = constraint {
                *w = c.apply(w);
            }
        }
    }
    for (slot, values) in layer.named_weights().unwrap() {
        let got: Vec<f64> = values.into_iter().map(f64::from).collect();
        let err = error_measure(&got, reference.state.slot(slot));
        assert!(
            err < 1e-5,
            "{slot:?} momentum {momentum} nesterov {nesterov}: {err:.2e}"
        );
    }
}

#[test]
fn sgd_steps_match_keras_formulas() {
    sgd_matches_reference(0.0, false, BatchNormConfig::default());
    sgd_matches_reference(0.9, false, BatchNormConfig::default());
    sgd_matches_reference(0.9, true, BatchNormConfig::default());
    let constrained = BatchNormConfig::default()
        .with_gamma_constraint(Some(Constraint::MaxNorm { max_value: 1.5 }))
        .with_beta_constraint(Some(Constraint::NonNeg))
        .with_gamma_regularizer(Some(Regularizer::l2()));
    sgd_matches_reference(0.5, false, constrained);
    sgd_matches_reference(0.0, false, BatchNormConfig::default().with_center(false));
}

#[test]
fn constraints_match_keras_formulas() {
    let ctx = gpu();
    let values: Vec<f32> = vec![0.9, -0.4, 2.5, 0.1, -1.3, 0.7, 3.0];
    for constraint in [
        Constraint::NonNeg,
        Constraint::MaxNorm { max_value: 2.0 },
        Constraint::MaxNorm { max_value: 100.0 },
        Constraint::MinMaxNorm {
            min_value: 0.0,
            max_value: 1.0,
            rate: 1.0,
        },
        Constraint::MinMaxNorm {
            min_value: 5.0,
            max_value: 6.0,
            rate: 0.5,
        },
        Constraint::UnitNorm,
    ] {
        let config = BatchNormConfig::default()
            .with_gamma_constraint(Some(constraint))
            .with_beta_constraint(Some(constraint));
        let layer = BatchNorm::new(&ctx, config, values.len()).unwrap();
        layer.set_weight(StateSlot::Gamma, &values).unwrap();
        layer.set_weight(StateSlot::Beta, &values).unwrap();
        layer.apply_constraints().unwrap();
        let want = constraint.apply(&values.iter().map(|&v| v as f64).collect::<Vec<_>>());
        for (slot, got) in layer.named_weights().unwrap().into_iter().take(2) {
            let got: Vec<f64> = got.into_iter().map(f64::from).collect();
            assert!(
                error_measure(&got, &want) < 1e-6,
                "{constraint:?} {slot:?}: {got:?} vs {want:?}"
            );
        }
    }
    // more channels than one workgroup has invocations
    let many: Vec<f32> = random_input(&mut rng(4), 1000, 0.0);
    let config = BatchNormConfig::default().with_gamma_constraint(Some(Constraint::UnitNorm));
    let layer = BatchNorm::new(&ctx, config, many.len()).unwrap();
    layer.set_weight(StateSlot::Gamma, &many).unwrap();
    layer.apply_constraints().unwrap();
    let norm: f64 = layer.get_weights().unwrap()[0]
        .iter()
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
}

#[test]
fn regularization_loss_and_gradient() {
    let ctx = gpu();
    let config = BatchNormConfig::default()
        .with_gamma_regularizer(Some(Regularizer { l1: 0.02, l2: 0.05 }))
        .with_beta_regularizer(Some(Regularizer::l1()));
    let layer = BatchNorm::new(&ctx, config, 3).unwrap();
    layer.set_weight(StateSlot::Gamma, &[1.0, -2.0, 0.5]).unwrap();
    layer.set_weight(StateSlot::Beta, &[0.5, 0.0, -1.5]).unwrap();
    let want = 0.02 * 3.5 + 0.05 * (1.0 + 4.0 + 0.25) + 0.01 * 2.0;
    assert!((layer.regularization_loss().unwrap() as f64 - want).abs() < 1e-6);
    // with dy = 0 the gradients are the regularizers' alone
    let x = Tensor::from_f32(&ctx, &[2, 3], &[1.0, 2.0, 3.0, 2.0, 4.0, 1.0]).unwrap();
    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
    let zeros = Tensor::from_f32(&ctx, &[2, 3], &[0.0; 6]).unwrap();
    let g = layer.backward(&saved, &zeros, true).unwrap();
    let dgamma = g.dgamma.unwrap().read_f32(&ctx).unwrap();
    let dbeta = g.dbeta.unwrap().read_f32(&ctx).unwrap();
    for (got, want) in dgamma
        .iter()
        .zip([0.02 + 0.1 * 1.0, -0.02 - 0.1 * 2.0, 0.02 + 0.1 * 0.5])
    {
        assert!((got - want).abs() < 1e-6, "{dgamma:?}");
    }
    assert_eq!(dbeta, vec![0.01, 0.0, -0.01]);
    let plain = layer.backward(&saved, &zeros, false).unwrap();
    assert_eq!(plain.dgamma.unwrap().read_f32(&ctx).unwrap(), vec![0.0; 3]);
}

#[test]
fn random_initializers_are_seeded_and_keep_keras_ranges() {
    let normal = Initializer::RandomNormal {
        mean: 1.0,
        stddev: 0.5,
        seed: Some(3),
    };
    assert_eq!(normal.values(100), normal.values(100));
    let v = normal.values(20000);
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    assert!((mean - 1.0).abs() < 0.02 && (std - 0.5).abs() < 0.02, "{mean} {std}");
    let uniform = Initializer::RandomUniform {
        minval: -0.05,
        maxval: 0.05,
        seed: Some(1),
    };
    assert!(uniform.values(1000).iter().all(|v| (-0.05..=0.05).contains(v)));
    let truncated = Initializer::TruncatedNormal {
        mean: 0.0,
        stddev: 0.05,
        seed: Some(2),
    };
    assert!(truncated.values(5000).iter().all(|v| v.abs() <= 0.1 + 1e-7));

    let config = BatchNormConfig::default()
        .with_gamma_initializer(uniform)
        .with_moving_variance_initializer(Initializer::Constant(4.0))
        .with_renorm(true);
    let layer = BatchNorm::new(&gpu(), config, 5).unwrap();
    let w = layer.get_weights().unwrap();
    assert_eq!(w[0], uniform.values(5));
    assert_eq!(w[3], vec![4.0; 5]);
    assert_eq!(w[4], vec![2.0; 5], "moving_stddev starts at sqrt(moving_variance)");
    assert_eq!(w[6], vec![2.0; 5], "renorm_stddev too");
}

#[test]
fn optimiser_errors_are_typed() {
    let ctx = gpu();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    assert!(Sgd::new(&layer, -1.0, 0.0, false).is_err());
    assert!(Sgd::new(&layer, 0.1, 1.5, false).is_err());
    let other = BatchNorm::new(&ctx, BatchNormConfig::default(), 4).unwrap();
    let x = Tensor::from_f32(&ctx, &[2, 4], &[1.0, 2.0, 3.0, 4.0, 2.0, 1.0, 0.0, 1.0]).unwrap();
    let (_, saved) = other.forward_saved(&x, Some(true), None).unwrap();
    let g = other.backward(&saved, &x, false).unwrap();
    let mut sgd = Sgd::new(&layer, 0.1, 0.0, false).unwrap();
    assert!(matches!(sgd.step(&other, &g), Err(Error::Weights { .. })));
    let frozen = BatchNorm::new(&ctx, BatchNormConfig::default().with_trainable(false), 4).unwrap();
    let mut frozen_sgd = Sgd::new(&frozen, 0.1, 0.0, false).unwrap();
    assert!(matches!(frozen_sgd.step(&frozen, &g), Err(Error::Weights { .. })));
    let bad = BatchNormConfig::default().with_gamma_regularizer(Some(Regularizer { l1: -0.1, l2: 0.0 }));
    assert!(matches!(BatchNorm::new(&ctx, bad, 3), Err(Error::Config(_))));
}

/// `StatePrecision::Float16` (Keras's float16 variables): every weight the
/// layer holds is a float16 value after initialisation, `set_weight`,
/// training calls (plain, renorm, PyTorch statistics) and an SGD step, and
/// the moving statistics follow the reference that rounds the same way.
#[test]
fn float16_state_rounds_every_weight_as_keras_float16_variables() {
    use wgpu_batchnorm::{RunningStatistics, StatePrecision};
    let ctx = gpu();
    let is_half = |v: f32| half::f16::from_f32(v).to_f32() == v;
    for base in [
        BatchNormConfig::default(),
        BatchNormConfig::default().with_renorm(true),
        BatchNormConfig::default()
            .with_running_statistics(RunningStatistics::PyTorch)
            .with_momentum(0.1),
    ] {
        let momentum = if base.running_statistics == RunningStatistics::PyTorch {
            0.1
        } else {
            0.9
        };
        let config = base
            .with_state_precision(StatePrecision::Float16)
            .with_momentum(momentum);
        let channels = 6;
        let layer = BatchNorm::new(&ctx, config.clone(), channels).unwrap();
        let mut reference = ReferenceLayer::new(config.clone(), channels).unwrap();
        let gamma = [1.1f32, 0.3, 2.7, 1.0 / 3.0, 0.9, 1.7];
        layer.set_weight(StateSlot::Gamma, &gamma).unwrap();
        *reference.state.slot_mut(StateSlot::Gamma) = gamma
            .iter()
            .map(|&g| wgpu_batchnorm::reference::stored(&config, g as f64))
            .collect();
        let mut sgd = Sgd::new(&layer, 0.01, 0.0, false).unwrap();
        let mut r = rng(5);
        for _ in 0..4 {
            let x = random_input(&mut r, 16 * channels, 3.0);
            let xt = Tensor::from_f32(&ctx, &[16, channels], &x).unwrap();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            layer.forward(&xt, Some(true), None).unwrap();
            reference.forward(&x64, &[16, channels], Some(true), None).unwrap();
            for (slot, values) in layer.named_weights().unwrap() {
                assert!(values.iter().all(|&v| is_half(v)), "{slot:?}: {values:?}");
                let err = error_measure(
                    &values.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                    reference.state.slot(slot),
                );
                // the same float16 values, or one float16 step apart
                assert!(err <= 1e-3, "{config:?} {slot:?}: {err:.2e}");
            }
        }
        // an optimiser step stores float16 values too
        let (_, saved) = layer
            .forward_saved(
                &Tensor::from_f32(&ctx, &[16, channels], &random_input(&mut r, 16 * channels, 1.0)).unwrap(),
                Some(true),
                None,
            )
            .unwrap();
        let dy = Tensor::from_f32(&ctx, &[16, channels], &random_input(&mut r, 16 * channels, 0.3)).unwrap();
        let grads = layer.backward(&saved, &dy, false).unwrap();
        sgd.step(&layer, &grads).unwrap();
        for (slot, values) in layer.named_weights().unwrap() {
            assert!(values.iter().all(|&v| is_half(v)), "after SGD {slot:?}: {values:?}");
        }
    }
    // the default keeps float32
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 1).unwrap();
    layer.set_weight(StateSlot::Gamma, &[1.0 / 3.0]).unwrap();
    assert!(!is_half(layer.get_weights().unwrap()[0][0]));
}
