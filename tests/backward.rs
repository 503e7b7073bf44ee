//! Gradients: the float64 reference against finite differences, the GPU
//! against the reference on random shapes, and backward's error paths.

mod common;

use common::{compare_gradients, gpu, random_input, random_mask, read64, rng};
use rand::Rng;
use wgpu_batchnorm::keras::error_measure;
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, DType, Error, GpuContext, Mask, Regularizer, RenormClipping, StateSlot, Tensor,
};

/// A scalar loss L = sum(w * y) of one forward call from a fixed state.
fn loss(
    layer: &ReferenceLayer,
    x: &[f64],
    shape: &[usize],
    training: Option<bool>,
    mask: Option<&[u8]>,
    w: &[f64],
) -> f64 {
    let mut l = layer.clone();
    let y = l.forward(x, shape, training, mask).unwrap();
    y.iter().zip(w).map(|(a, b)| a * b).sum()
}

fn finite_difference_check(config: BatchNormConfig, shape: &[usize], training: Option<bool>, masked: bool, seed: u64) {
    let mut r = rng(seed);
    let axis = config.resolve_axis(shape.len()).unwrap();
    let channels = shape[axis];
    let mut layer = ReferenceLayer::new(config.clone(), channels).unwrap();
    for slot in StateSlot::ALL.into_iter().filter(|s| s.present(&config)) {
        *layer.state.slot_mut(slot) = (0..channels).map(|_| 0.5 + r.random::<f64>()).collect();
    }
    if config.renorm {
        // Keras stops the gradient through r and d; finite differences see
        // it unless both sit on their clipping bounds, where they are constant
        layer.state.renorm_stddev = vec![0.01; channels];
        layer.state.renorm_mean = vec![-100.0; channels];
    }
    let len: usize = shape.iter().product();
    let x: Vec<f64> = random_input(&mut r, len, 3.0).into_iter().map(f64::from).collect();
    let w: Vec<f64> = random_input(&mut r, len, 0.0).into_iter().map(f64::from).collect();
    let mask = masked.then(|| random_mask(&mut r, len / shape[shape.len() - 1]));
    let mut fwd = layer.clone();
    fwd.forward(&x, shape, training, mask.as_deref()).unwrap();
    let g = fwd.backward(&w, true).unwrap();

    let h = 1e-6;
    let scale = g.dx.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for e in (0..len).step_by((len / 17).max(1)) {
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus[e] += h;
        minus[e] -= h;
        let numeric = (loss(&layer, &plus, shape, training, mask.as_deref(), &w)
            - loss(&layer, &minus, shape, training, mask.as_deref(), &w))
            / (2.0 * h);
        assert!(
            (numeric - g.dx[e]).abs() <= 1e-6 * scale,
            "dx[{e}]: {numeric} vs {} ({config:?})",
            g.dx[e]
        );
    }
    for (slot, grad, reg) in [
        (StateSlot::Gamma, &g.dgamma, config.gamma_regularizer),
        (StateSlot::Beta, &g.dbeta, config.beta_regularizer),
    ] {
        let Some(grad) = grad else {
            assert!(!slot.present(&config) || !config.trainable);
            continue;
        };
        for c in 0..channels {
            let (mut plus, mut minus) = (layer.clone(), layer.clone());
            plus.state.slot_mut(slot)[c] += h;
            minus.state.slot_mut(slot)[c] -= h;
            let reg_term = |l: &ReferenceLayer| {
                reg.map(|r| {
                    l.state
                        .slot(slot)
                        .iter()
                        .map(|&v| r.l1 as f64 * v.abs() + r.l2 as f64 * v * v)
                        .sum::<f64>()
                })
                .unwrap_or(0.0)
            };
            let numeric = (loss(&plus, &x, shape, training, mask.as_deref(), &w) + reg_term(&plus)
                - loss(&minus, &x, shape, training, mask.as_deref(), &w)
                - reg_term(&minus))
                / (2.0 * h);
            let tol = 1e-6 * grad.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            assert!(
                (numeric - grad[c]).abs() <= tol,
                "{slot:?}[{c}]: {numeric} vs {} ({config:?})",
                grad[c]
            );
        }
    }
}

#[test]
fn reference_gradients_match_finite_differences() {
    let renorm = BatchNormConfig::default()
        .with_renorm(true)
        .with_renorm_momentum(0.9)
        .with_renorm_clipping(RenormClipping {
            rmax: Some(1.5),
            rmin: Some(0.5),
            dmax: Some(0.3),
        });
    let regularized = BatchNormConfig::default()
        .with_gamma_regularizer(Some(Regularizer { l1: 0.02, l2: 0.03 }))
        .with_beta_regularizer(Some(Regularizer::l2()));
    let cases = [
        (BatchNormConfig::default(), &[6usize, 3][..], Some(true), false),
        (BatchNormConfig::default(), &[4, 3, 5], Some(true), true),
        (BatchNormConfig::default().with_axis(1), &[3, 4, 5], Some(true), false),
        (BatchNormConfig::default(), &[6, 3], None, false),
        (BatchNormConfig::default(), &[6, 3], Some(false), true),
        (
            BatchNormConfig::default().with_center(false).with_scale(false),
            &[5, 2],
            Some(true),
            false,
        ),
        (
            BatchNormConfig::default().with_trainable(false),
            &[5, 2],
            Some(true),
            false,
        ),
        (renorm.clone(), &[7, 3], Some(true), false),
        (renorm, &[2, 7, 3], Some(true), true),
        (regularized, &[5, 3], Some(true), false),
    ];
    for (i, (config, shape, training, masked)) in cases.into_iter().enumerate() {
        finite_difference_check(config, shape, training, masked, i as u64);
    }
}

#[test]
fn gpu_gradients_match_the_reference_on_random_shapes() {
    for ctx in common::vulkan() {
        gradient_sweep(&ctx);
    }
}

/// The dx kernels reading their coefficients through a storage binding
/// (the GPU default; a CPU adapter reads them through a uniform one).
#[test]
fn gpu_gradients_with_storage_parameters() {
    for ctx in common::fresh_vulkan() {
        ctx.set_uniform_parameters(!ctx.uniform_parameters());
        gradient_sweep(&ctx);
    }
}

/// Unmasked gradients of the default config, training and inference, for
/// each (shape, axis) and dtype: within the gradient tolerance.
fn assert_gradients_match(ctx: &GpuContext, cases: &[(&[usize], i64)], dtypes: &[DType], seed: u64) {
    for (i, &(shape, axis)) in cases.iter().enumerate() {
        let config = BatchNormConfig::default().with_axis(axis);
        for &dtype in dtypes {
            for training in [Some(true), None] {
                let err = compare_gradients(ctx, &config, shape, dtype, training, false, seed + i as u64);
                assert!(
                    err <= wgpu_batchnorm::keras::tolerance(dtype, true),
                    "{shape:?} axis {axis} {dtype} training {training:?}: {err:.2e}"
                );
            }
        }
    }
}

/// More channels than the 4096 the uniform view of the dx coefficients holds.
#[test]
fn gpu_gradients_beyond_the_uniform_parameter_view() {
    let cases: &[(&[usize], i64)] = &[(&[3, 4100], -1), (&[2, 4099, 5], 1), (&[2, 5000, 4], 1)];
    for ctx in common::fresh_vulkan() {
        ctx.set_uniform_parameters(true);
        assert_gradients_match(&ctx, cases, &[DType::F32], 500);
    }
}

/// A device with 16 KiB uniform bindings: the dx coefficients' uniform
/// view holds 1024 channels.
#[test]
fn gpu_gradients_on_a_device_with_small_uniform_bindings() {
    let cases: &[(&[usize], i64)] = &[
        (&[3, 1024], -1),
        (&[3, 1028], -1),
        (&[2, 1023, 5], 1),
        (&[2, 1025, 4], 1),
    ];
    assert_gradients_match(&common::small_uniform_device(), cases, &[DType::F32], 600);
}

/// float16 gradients in every vec4 layout (unmasked: a mask takes the
/// scalar kernels), training and inference.
#[test]
fn float16_gradients_in_the_vec4_layouts() {
    let cases: &[(&[usize], i64)] = &[(&[500, 12], -1), (&[3, 4, 48], 1), (&[3, 4, 12], 1), (&[2, 8, 5, 4], 1)];
    for ctx in common::vulkan() {
        assert_gradients_match(&ctx, cases, &[DType::F16], 700);
    }
}

/// Gradients where inner >= 16 is not a multiple of 4 (the vec4 kernels
/// whose values straddle two channels), float32 and float16.
#[test]
fn gradients_of_runs_not_a_multiple_of_4() {
    let cases: &[(&[usize], i64)] = &[(&[8, 5, 7, 7], 1), (&[4, 3, 17], 1), (&[3, 5, 17], 1), (&[2, 7, 18], 1)];
    for ctx in common::vulkan() {
        assert_gradients_match(&ctx, cases, &[DType::F32, DType::F16], 800);
    }
}

/// A mask per row (channels last, the channels the last axis) runs the
/// vec4 channels-last kernels: forward (statistics over the masked-in rows,
/// shift from a masked-in row), state and gradients against the reference.
/// Masked-out rows hold values far from the rest, so a shift taken from one
/// of them would cost the variance its precision; the first tiles are
/// masked out entirely.
#[test]
fn masks_per_row_in_the_channels_last_kernels() {
    let chunked = common::fresh_vulkan();
    for ctx in &chunked {
        ctx.set_max_binding_size(4096);
    }
    let contexts: Vec<GpuContext> = common::vulkan().into_iter().chain(chunked).collect();
    for (i, shape) in [&[600usize, 16][..], &[7, 90, 8], &[300, 12], &[5, 41, 4]]
        .into_iter()
        .enumerate()
    {
        let channels = *shape.last().unwrap();
        let rows: usize = shape.iter().product::<usize>() / channels;
        let mut r = rng(900 + i as u64);
        // the first third of the rows out, then 70% in
        let flags: Vec<u8> = (0..rows)
            .map(|row| (row >= rows / 3 && r.random::<f32>() < 0.7) as u8)
            .collect();
        let mut x32 = random_input(&mut r, rows * channels, 3.0);
        for (row, &f) in flags.iter().enumerate() {
            if f == 0 {
                for v in &mut x32[row * channels..][..channels] {
                    *v += 1.0e4;
                }
            }
        }
        let dy32 = random_input(&mut r, rows * channels, 0.5);
        let runs = contexts
            .iter()
            .flat_map(|ctx| [(ctx.clone(), DType::F32), (ctx.clone(), DType::F16)]);
        for (ctx, dtype) in runs {
            let config = BatchNormConfig::default();
            let layer = BatchNorm::new(&ctx, config.clone(), channels).unwrap();
            let mut reference = ReferenceLayer::new(config, channels).unwrap();
            let round = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| f64::from(dtype.round(a))).collect() };
            let x = Tensor::from_f32_as(&ctx, shape, &x32, dtype).unwrap();
            let mask = Mask::from_u8(&ctx, &shape[..shape.len() - 1], &flags).unwrap();
            let (y, saved) = layer.forward_saved(&x, Some(true), Some(&mask)).unwrap();
            let want_y = reference
                .forward(&round(&x32), shape, Some(true), Some(&flags))
                .unwrap();
            let read = |t: &Tensor| read64(&ctx, t);
            let tol = wgpu_batchnorm::keras::tolerance(dtype, false);
            let y_err = error_measure(&read(&y), &want_y);
            assert!(y_err <= tol, "{shape:?} {dtype}: y {y_err:.2e}");
            for (slot, values) in layer.named_weights().unwrap() {
                let got: Vec<f64> = values.into_iter().map(f64::from).collect();
                let err = error_measure(&got, reference.state.slot(slot));
                assert!(err <= tol, "{shape:?} {dtype}: {slot:?} {err:.2e}");
            }
            let dy = Tensor::from_f32_as(&ctx, shape, &dy32, dtype).unwrap();
            let got = layer.backward(&saved, &dy, false).unwrap();
            let want = reference.backward(&round(&dy32), false).unwrap();
            let grad_tol = wgpu_batchnorm::keras::tolerance(dtype, true);
            let mut err = error_measure(&read(&got.dx), &want.dx);
            for (g, w) in [(&got.dgamma, &want.dgamma), (&got.dbeta, &want.dbeta)] {
                err = err.max(error_measure(&read(g.as_ref().unwrap()), w.as_ref().unwrap()));
            }
            assert!(err <= grad_tol, "{shape:?} {dtype}: gradients {err:.2e}");
        }
    }
}

fn gradient_sweep(ctx: &GpuContext) {
    let renorm = BatchNormConfig::default()
        .with_renorm(true)
        .with_renorm_clipping(RenormClipping {
            rmax: Some(2.0),
            rmin: Some(0.5),
            dmax: Some(0.5),
        });
    let regularized = BatchNormConfig::default()
        .with_gamma_regularizer(Some(Regularizer::l1_l2()))
        .with_beta_regularizer(Some(Regularizer::l1()));
    let mut failures = Vec::new();
    let shapes: &[(&[usize], i64)] = &[
        (&[1], 0),
        (&[7, 1], -1),
        (&[13, 5], -1),
        (&[257, 3], 0),
        (&[2, 3, 5], 1),
        (&[3, 1, 17, 2], -1),
        (&[2, 3, 1, 5, 7], 2),
        (&[40000, 3], -1),
        (&[3, 2, 10007], 1),
        // vec4 layouts: channels last, inner % 16 == 0, inner % 4 == 0
        (&[64, 8], -1),
        (&[500, 12], -1),
        (&[3, 4, 16], 1),
        (&[3, 4, 12], 1),
        (&[2, 8, 5, 4], 1),
    ];
    for (i, &(shape, axis)) in shapes.iter().enumerate() {
        let base = [BatchNormConfig::default(), renorm.clone(), regularized.clone()][i % 3].clone();
        let variants = [
            (base.clone().with_axis(axis), DType::F32, Some(true), false),
            (base.clone().with_axis(axis), DType::F32, Some(true), shape.len() >= 2),
            (base.clone().with_axis(axis), DType::F32, None, false),
            (
                base.clone()
                    .with_axis(axis)
                    .with_center(i % 2 == 0)
                    .with_scale(i % 2 == 1),
                DType::F32,
                Some(true),
                false,
            ),
            (
                base.clone().with_axis(axis).with_trainable(false),
                DType::F32,
                Some(true),
                false,
            ),
            (base.clone().with_axis(axis), DType::F16, Some(true), shape.len() >= 2),
        ];
        for (j, (config, dtype, training, masked)) in variants.into_iter().enumerate() {
            let err = compare_gradients(ctx, &config, shape, dtype, training, masked, (i * 10 + j) as u64);
            let tol = wgpu_batchnorm::keras::tolerance(dtype, true);
            if err.is_nan() || err > tol {
                failures.push(format!(
                    "{shape:?} {dtype} training {training:?} masked {masked} {config:?}: {err:.2e}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gpu_gradients_in_chunked_bindings() {
    for ctx in common::fresh_vulkan() {
        ctx.set_max_binding_size(4096);
        for (i, (shape, axis, dtype)) in [
            (&[1001usize, 3, 7][..], 1i64, DType::F32),
            (&[999, 5][..], -1, DType::F16),
            (&[4000, 3][..], 0, DType::F32),
            (&[500, 8][..], -1, DType::F32),
            (&[50, 3, 16][..], 1, DType::F32),
        ]
        .into_iter()
        .enumerate()
        {
            let config = BatchNormConfig::default().with_axis(axis);
            // the vec4 kernels take no mask: the last cases run unmasked
            let err = compare_gradients(&ctx, &config, shape, dtype, Some(true), i < 3, 50 + i as u64);
            assert!(
                err <= wgpu_batchnorm::keras::tolerance(dtype, true),
                "{shape:?}: {err:.2e}"
            );
        }
    }
}

#[test]
fn gpu_gradients_for_channels_of_more_than_2_pow_20_values() {
    for (shape, axis) in [(&[17usize, 256, 256, 4][..], -1i64), (&[3, 4, 600, 600][..], 1)] {
        let config = BatchNormConfig::default().with_axis(axis);
        for ctx in common::vulkan() {
            let err = compare_gradients(&ctx, &config, shape, DType::F32, Some(true), false, 77);
            assert!(err <= 1e-4, "{} {shape:?}: {err:.2e}", ctx.describe());
        }
    }
}

#[test]
fn backward_errors_are_typed_and_change_nothing() {
    let ctx = gpu();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    let dy = Tensor::from_f32(&ctx, &[4, 3], &[0.5; 12]).unwrap();
    let x = Tensor::from_f32(&ctx, &[4, 3], &random_input(&mut rng(9), 12, 1.0)).unwrap();
    // the SavedForward of another layer, even one built alike
    let twin = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    let (_, foreign) = twin.forward_saved(&x, Some(true), None).unwrap();
    assert!(matches!(layer.backward(&foreign, &dy, false), Err(Error::ForeignSaved)));

    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
    let before = layer.get_weights().unwrap();
    let wrong_shape = Tensor::from_f32(&ctx, &[3, 4], &[0.5; 12]).unwrap();
    assert!(matches!(
        layer.backward(&saved, &wrong_shape, false),
        Err(Error::Shape { .. })
    ));
    let wrong_dtype = Tensor::from_f32_as(&ctx, &[4, 3], &[0.5; 12], DType::F16).unwrap();
    assert!(matches!(
        layer.backward(&saved, &wrong_dtype, false),
        Err(Error::DType { .. })
    ));
    assert!(layer.backward(&saved, &dy, false).is_ok());
    assert_eq!(layer.get_weights().unwrap(), before, "backward changes no weight");

    layer.set_weight(StateSlot::Gamma, &[2.0, 2.0, 2.0]).unwrap();
    assert!(matches!(layer.backward(&saved, &dy, false), Err(Error::WeightsChanged)));
    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
    assert!(layer.backward(&saved, &dy, false).is_ok());

    let mut reference = ReferenceLayer::new(BatchNormConfig::default(), 3).unwrap();
    assert!(matches!(reference.backward(&[0.0; 12], false), Err(Error::NoForward)));
    reference.forward(&[1.0; 12], &[4, 3], Some(true), None).unwrap();
    assert!(matches!(
        reference.backward(&[0.0; 11], false),
        Err(Error::Shape { .. })
    ));
}

/// Gradients of layers wider than 524,280 channels (2-D finalize and
/// optimiser grids), training and inference, on Vulkan and GL.
fn wide_layer_gradients_match(ctx: &GpuContext) {
    let cases: &[(&[usize], i64)] = &[(&[3, 524_281], -1), (&[2, 600_000], -1), (&[2, 1 << 20], -1)];
    assert_gradients_match(ctx, cases, &[DType::F32], 910);
}

#[test]
fn gradients_of_layers_wider_than_2_pow_19_channels() {
    for ctx in common::drivers() {
        wide_layer_gradients_match(&ctx);
    }
}
