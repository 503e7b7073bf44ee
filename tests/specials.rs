//! NaN and Inf behave as in the float64 reference: a NaN in a training
//! batch makes that channel's moving mean and variance NaN, an Inf gives
//! the reference's infinite mean and NaN variance, other channels stay
//! exact, and masked-out positions stay out of the statistics even when
//! they hold NaN. Every layout family, on Vulkan and GL.

mod common;

use common::{gl, gpu, random_input, rng};
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, Mask, StateSlot, Tensor};

/// Same class element by element (NaN, +Inf, -Inf) and within `tol` of
/// the largest finite truth where both are finite.
fn assert_same(got: &[f32], truth: &[f64], what: &str) {
    let scale = truth
        .iter()
        .filter(|t| t.is_finite())
        .fold(1.0f64, |m, t| m.max(t.abs()));
    for (i, (&g, &t)) in got.iter().zip(truth).enumerate() {
        let g = g as f64;
        let ok = if t.is_nan() {
            g.is_nan()
        } else if t.is_infinite() {
            g == t
        } else {
            g.is_finite() && (g - t).abs() <= 2e-5 * scale
        };
        assert!(ok, "{what}[{i}]: got {g}, reference {t}");
    }
}

/// Within the gradient tolerance of the largest truth.
fn assert_close(got: &[f32], truth: &[f64], what: &str) {
    let g: Vec<f64> = got.iter().map(|&v| v as f64).collect();
    let err = wgpu_batchnorm::keras::error_measure(&g, truth);
    assert!(err <= 1e-4, "{what}: error {err:.2e}");
}

/// (shape, axis): generic, channels last (vec4 and two quads), inner % 4,
/// runs of 17.
const LAYOUTS: &[(&[usize], i64)] = &[(&[9, 5], -1), (&[6, 8], -1), (&[3, 4, 8], 1), (&[2, 3, 17], 1)];

fn check(ctx: &GpuContext, special: f32, masked: bool) {
    for (i, &(shape, axis)) in LAYOUTS.iter().enumerate() {
        let config = BatchNormConfig {
            axis,
            momentum: 0.5,
            ..Default::default()
        };
        let channels = shape[(axis.rem_euclid(shape.len() as i64)) as usize];
        let layer = BatchNorm::new(ctx, config.clone(), channels).unwrap();
        let mut reference = ReferenceLayer::new(config, channels).unwrap();
        let len: usize = shape.iter().product();
        let mut x = random_input(&mut rng(40 + i as u64), len, 2.0);
        let last = shape[shape.len() - 1];
        // the special value at the first and a middle position
        let (first, middle) = (0, len / 2 + 1);
        x[first] = special;
        x[middle] = special;
        let flags: Option<Vec<u8>> = masked.then(|| {
            // mask out exactly the rows holding the special values
            (0..len / last)
                .map(|r| (r != first / last && r != middle / last) as u8)
                .collect()
        });
        let mask = flags
            .as_ref()
            .map(|f| Mask::from_u8(ctx, &shape[..shape.len() - 1], f).unwrap());
        let t = Tensor::from_f32(ctx, shape, &x).unwrap();
        let y = layer
            .forward(&t, Some(true), mask.as_ref())
            .unwrap()
            .read_f32(ctx)
            .unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let want = reference.forward(&x64, shape, Some(true), flags.as_deref()).unwrap();
        let what = format!("{shape:?} axis {axis} with {special} masked {masked}");
        assert_same(&y, &want, &format!("{what}: y"));
        for (slot, values) in layer.named_weights().unwrap() {
            assert_same(&values, reference.state.slot(slot), &format!("{what}: {slot:?}"));
        }
        if !masked {
            let weights = layer.named_weights().unwrap();
            let variance = &weights.iter().find(|(s, _)| *s == StateSlot::MovingVariance).unwrap().1;
            assert!(
                variance.iter().any(|v| v.is_nan()),
                "{what}: the moving variance must turn NaN"
            );
        }
    }
}

fn specials_follow_the_reference(ctx: &GpuContext) {
    for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        check(ctx, special, false);
        // masked-out NaN and Inf stay out of the statistics
        check(ctx, special, true);
    }
}

#[test]
fn nan_and_inf_follow_the_reference() {
    specials_follow_the_reference(&gpu());
}

#[test]
fn nan_and_inf_follow_the_reference_on_gl() {
    specials_follow_the_reference(&gl());
}

/// Inputs far from zero with a spread to match (values around 1e18 and
/// 1e19, variance up to 1e38): their sums of squares overflow float32,
/// their variance does not, and the output is right. Every layout family.
fn large_magnitudes_normalise(ctx: &GpuContext) {
    // 1e30: the variance (1e60) is past float32, the training output is
    // not (the float32 moving variance, and so inference, cannot hold it)
    for magnitude in [1e18f32, 1e19, 3e15, 1e30] {
        let beyond = magnitude > 1e20;
        for (i, &(shape, axis)) in LAYOUTS
            .iter()
            .chain([(&[4096usize, 8][..], -1i64), (&[300, 3, 5][..], 1)].iter())
            .enumerate()
        {
            let config = BatchNormConfig {
                axis,
                ..Default::default()
            };
            let channels = shape[(axis.rem_euclid(shape.len() as i64)) as usize];
            let layer = BatchNorm::new(ctx, config.clone(), channels).unwrap();
            let mut reference = ReferenceLayer::new(config, channels).unwrap();
            let len: usize = shape.iter().product();
            let x: Vec<f32> = random_input(&mut rng(60 + i as u64), len, 3.0)
                .into_iter()
                .map(|v| v * magnitude)
                .collect();
            let t = Tensor::from_f32(ctx, shape, &x).unwrap();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let dy32 = random_input(&mut rng(70 + i as u64), len, 0.5);
            let dy = Tensor::from_f32(ctx, shape, &dy32).unwrap();
            let dy64: Vec<f64> = dy32.iter().map(|&v| v as f64).collect();
            for training in [Some(true), None] {
                if beyond && training.is_none() {
                    continue;
                }
                let what = format!("{shape:?} axis {axis} x {magnitude:e} training {training:?}");
                let (y, saved) = layer.forward_saved(&t, training, None).unwrap();
                let want = reference.forward(&x64, shape, training, None).unwrap();
                assert_same(&y.read_f32(ctx).unwrap(), &want, &format!("{what}: y"));
                if beyond {
                    continue;
                }
                let got = layer.backward(&saved, &dy, false).unwrap();
                let want = reference.backward(&dy64, false).unwrap();
                assert_close(&got.dx.read_f32(ctx).unwrap(), &want.dx, &format!("{what}: dx"));
                assert_close(
                    &got.dgamma.unwrap().read_f32(ctx).unwrap(),
                    want.dgamma.as_ref().unwrap(),
                    &format!("{what}: dgamma"),
                );
                assert_close(
                    &got.dbeta.unwrap().read_f32(ctx).unwrap(),
                    want.dbeta.as_ref().unwrap(),
                    &format!("{what}: dbeta"),
                );
            }
            for (slot, values) in layer.named_weights().unwrap() {
                if !beyond {
                    assert_same(
                        &values,
                        reference.state.slot(slot),
                        &format!("{shape:?} x {magnitude:e}: {slot:?}"),
                    );
                }
            }
        }
    }
}

#[test]
fn inputs_far_beyond_the_square_root_of_float32_normalise() {
    large_magnitudes_normalise(&gpu());
}

#[test]
fn inputs_far_beyond_the_square_root_of_float32_normalise_on_gl() {
    large_magnitudes_normalise(&gl());
}

/// Float16 where WGSL leaves the conversion open (pack2x16float of a value
/// past 65504, or of NaN, is indeterminate): NaN and Inf inputs, outputs
/// and gradients that overflow float16, and float16 state that overflows,
/// all as the float64 reference rounded to float16 says (+-Inf, NaN).
/// Every layout family, on every driver.
#[test]
fn float16_saturates_to_infinity_and_keeps_nan() {
    let f16 = |v: &[f64]| -> Vec<f64> { v.iter().map(|&t| half::f16::from_f64(t).to_f64()).collect() };
    for ctx in common::drivers() {
        for (i, &(shape, axis)) in LAYOUTS.iter().enumerate() {
            let channels = shape[(axis.rem_euclid(shape.len() as i64)) as usize];
            let config = BatchNormConfig {
                axis,
                momentum: 0.5,
                state_precision: wgpu_batchnorm::StatePrecision::Float16,
                ..Default::default()
            };
            let layer = BatchNorm::new(&ctx, config.clone(), channels).unwrap();
            let mut reference = ReferenceLayer::new(config, channels).unwrap();
            // gamma pushes outputs past 65504 on every channel but the first
            let gamma: Vec<f32> = (0..channels).map(|c| if c == 0 { 1.0 } else { 3e4 }).collect();
            layer.set_weight(StateSlot::Gamma, &gamma).unwrap();
            *reference.state.slot_mut(StateSlot::Gamma) = gamma.iter().map(|&g| g as f64).collect();
            let len: usize = shape.iter().product();
            // spread of about 1e4: the batch variance (~3e7) overflows the
            // float16 moving variance
            let mut x: Vec<f32> = random_input(&mut rng(90 + i as u64), len, 0.0)
                .into_iter()
                .map(|v| half::f16::from_f32(v * 5e3).to_f32())
                .collect();
            x[len / 2 + 1] = f32::NAN;
            x[len - 1] = f32::INFINITY;
            let t = Tensor::from_f32_as(&ctx, shape, &x, wgpu_batchnorm::DType::F16).unwrap();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let what = format!("{} {shape:?} axis {axis}", ctx.describe());
            for training in [Some(true), None] {
                let (y, saved) = layer.forward_saved(&t, training, None).unwrap();
                let want = f16(&reference.forward(&x64, shape, training, None).unwrap());
                assert_same(&y.read_f32(&ctx).unwrap(), &want, &format!("{what} {training:?}: y"));
                if training.is_none() {
                    let dy: Vec<f32> = (0..len).map(|k| if k % 3 == 0 { 6e4 } else { -0.5 }).collect();
                    let dy16 = Tensor::from_f32_as(&ctx, shape, &dy, wgpu_batchnorm::DType::F16).unwrap();
                    let dy64: Vec<f64> = dy.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect();
                    let got = layer.backward(&saved, &dy16, false).unwrap();
                    let want = f16(&reference.backward(&dy64, false).unwrap().dx);
                    assert_same(&got.dx.read_f32(&ctx).unwrap(), &want, &format!("{what}: dx"));
                }
            }
            for (slot, values) in layer.named_weights().unwrap() {
                assert_same(&values, reference.state.slot(slot), &format!("{what}: {slot:?}"));
            }
            let variance = layer.get_weights().unwrap()[3].clone();
            assert!(
                variance[1..].iter().any(|v| v.is_nan() || v.is_infinite()),
                "{what}: {variance:?}"
            );
        }
    }
}
