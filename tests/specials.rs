//! NaN and Inf behave as in the float64 reference: a NaN in a training
//! batch makes that channel's moving mean and variance NaN, an Inf gives
//! the reference's infinite mean and NaN variance, other channels stay
//! exact, and masked-out positions stay out of the statistics even when
//! they hold NaN, as in Keras 3 (it sums `ops.where(mask, x, 0)`, so a NaN
//! in the padding never reaches its statistics). Values far from zero:
//! sums of squares past float32, constant channels of 1e30 and 3e37, a
//! variance of 2e37 around -1e25. Every layout family, on Vulkan and GL.

mod common;

use common::{random_input, rng};
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
        let config = BatchNormConfig::default().with_axis(axis).with_momentum(0.5);
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
        // masked-out NaN and Inf stay out of the statistics, as Keras's
        // ops.where(mask, x, 0) keeps them out
        check(ctx, special, true);
    }
}

#[test]
fn nan_and_inf_follow_the_reference() {
    for ctx in common::drivers() {
        specials_follow_the_reference(&ctx);
    }
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
            let config = BatchNormConfig::default().with_axis(axis);
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
    for ctx in common::drivers() {
        large_magnitudes_normalise(&ctx);
    }
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
            let config = BatchNormConfig::default()
                .with_axis(axis)
                .with_momentum(0.5)
                .with_state_precision(wgpu_batchnorm::StatePrecision::Float16);
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
/// The channel kinds of [`far_from_zero`]'s inputs, channel c of kind
/// c % 4: unmasked, constants of 1e30 and 3e37 (y = beta, a variance of 0)
/// and -1e25 + r * 1e18 (a variance about 2e37); masked, where Keras's
/// count + 1e-7 gives a constant channel a variance of about (1e-7 * value
/// / count)^2, constants of 1e20 and -4e22 instead.
fn far_kinds(masked: bool) -> [&'static str; 4] {
    match masked {
        false => ["constant 1e30", "constant 3e37", "-1e25 + r * 1e18", "ordinary"],
        true => ["constant 1e20", "constant -4e22", "-1e25 + r * 1e18", "ordinary"],
    }
}

/// Worst errors of one channel kind: y (training and inference), moving
/// statistics, dx, dx relative to the channel's largest |dx|, dgamma and
/// dbeta.
type KindErrors = [f64; 5];

/// Channels far from zero whose variance float32 holds (see
/// [`far_kinds`]), beside an ordinary channel. Their tile sums are scaled
/// by the shift's power of two (2^-99 for 1e30), whose square float32
/// cannot hold: forward y, the moving statistics and inference after
/// them, dx, dgamma and dbeta must match the reference anyway. Every
/// layout family. Each channel is measured on its own: y and dx against
/// max(1, the channel's largest |truth|) as Keras conformance does (dx also
/// against its largest |truth| alone: its values are about 1e-19 on the
/// -1e25 channel), state, dgamma and dbeta per value against max(1, |truth|).
fn far_from_zero(ctx: &GpuContext, masked: bool) -> [KindErrors; 4] {
    use rand::Rng;
    use wgpu_batchnorm::ChannelView;
    let kinds = far_kinds(masked);
    let mut worst = [[0.0f64; 5]; 4];
    for (i, &(shape, axis)) in LAYOUTS
        .iter()
        .chain([(&[4096usize, 8][..], -1i64), (&[300, 3, 5][..], 1)].iter())
        .enumerate()
    {
        let config = BatchNormConfig::default().with_axis(axis).with_momentum(0.5);
        let axis = config.resolve_axis(shape.len()).unwrap();
        let view = ChannelView::new(shape, axis);
        let channels = view.channels;
        let layer = BatchNorm::new(ctx, config.clone(), channels).unwrap();
        let mut reference = ReferenceLayer::new(config, channels).unwrap();
        // gamma and beta away from 1 and 0: y = beta exactly on a constant channel
        let gamma: Vec<f32> = (0..channels).map(|c| 1.5 - 0.125 * c as f32).collect();
        let beta: Vec<f32> = (0..channels).map(|c| 0.25 + 0.5 * c as f32).collect();
        for (slot, values) in [(StateSlot::Gamma, &gamma), (StateSlot::Beta, &beta)] {
            layer.set_weight(slot, values).unwrap();
            *reference.state.slot_mut(slot) = values.iter().map(|&v| v as f64).collect();
        }
        let mut r = rng(80 + i as u64);
        let constants = if masked { [1e20f32, -4e22] } else { [1e30, 3e37] };
        let x: Vec<f32> = (0..view.len())
            .map(|e| match view.channel_of(e) % 4 {
                k @ (0 | 1) => constants[k],
                2 => -1e25 + (r.random::<f32>() * 16.0 - 8.0) * 1e18,
                _ => r.random::<f32>() * 4.0 - 1.0,
            })
            .collect();
        let dy32: Vec<f32> = (0..view.len()).map(|_| r.random::<f32>() - 0.5).collect();
        let last = shape[shape.len() - 1];
        let flags: Option<Vec<u8>> = masked.then(|| {
            (0..view.len() / last)
                .map(|_| (r.random::<f32>() < 0.7) as u8)
                .collect()
        });
        let mask = flags
            .as_ref()
            .map(|f| Mask::from_u8(ctx, &shape[..shape.len() - 1], f).unwrap());
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let dy64: Vec<f64> = dy32.iter().map(|&v| v as f64).collect();
        let t = Tensor::from_f32(ctx, shape, &x).unwrap();
        let dy = Tensor::from_f32(ctx, shape, &dy32).unwrap();
        let what = format!("{} {shape:?} axis {axis} masked {masked}", ctx.describe());
        // per channel: max |got - truth| / max(1, max |truth|) into `keras`,
        // and / max |truth| into `relative`, each the worst of its kind
        let mut by_channel = |got: &[f32], truth: &[f64], out: &str, keras: usize, relative: Option<usize>| {
            let mut err = vec![0.0f64; channels];
            let mut scale = vec![0.0f64; channels];
            for (e, (&g, &t)) in got.iter().zip(truth).enumerate() {
                let c = view.channel_of(e);
                assert!(
                    g.is_finite() && t.is_finite(),
                    "{what}: {out}[{e}] ({}): got {g}, reference {t}",
                    kinds[c % 4]
                );
                err[c] = err[c].max((g as f64 - t).abs());
                scale[c] = scale[c].max(t.abs());
            }
            for c in 0..channels {
                let w = &mut worst[c % 4];
                w[keras] = w[keras].max(err[c] / scale[c].max(1.0));
                if let Some(relative) = relative {
                    w[relative] = w[relative].max(err[c] / scale[c]);
                }
            }
        };
        // training (backward from it), then inference with the moving statistics
        let (y, saved) = layer.forward_saved(&t, Some(true), mask.as_ref()).unwrap();
        let want = reference.forward(&x64, shape, Some(true), flags.as_deref()).unwrap();
        by_channel(&y.read_f32(ctx).unwrap(), &want, "y", 0, None);
        let got = layer.backward(&saved, &dy, false).unwrap();
        let want = reference.backward(&dy64, false).unwrap();
        by_channel(&got.dx.read_f32(ctx).unwrap(), &want.dx, "dx", 2, Some(3));
        let y = layer.forward(&t, None, None).unwrap();
        let want_y = reference.forward(&x64, shape, None, None).unwrap();
        by_channel(&y.read_f32(ctx).unwrap(), &want_y, "inference y", 0, None);
        let mut per_value = |got: &[f32], truth: &[f64], out: String, at: usize| {
            for (c, (&g, &w)) in got.iter().zip(truth).enumerate() {
                let g = g as f64;
                assert!(
                    g.is_finite(),
                    "{what}: {out}[{c}] ({}): got {g}, reference {w}",
                    kinds[c % 4]
                );
                let e = (g - w).abs() / w.abs().max(1.0);
                worst[c % 4][at] = worst[c % 4][at].max(e);
            }
        };
        for (name, g, w) in [
            ("dgamma", &got.dgamma, &want.dgamma),
            ("dbeta", &got.dbeta, &want.dbeta),
        ] {
            per_value(
                &g.as_ref().unwrap().read_f32(ctx).unwrap(),
                w.as_ref().unwrap(),
                name.into(),
                4,
            );
        }
        for (slot, values) in layer.named_weights().unwrap() {
            per_value(&values, reference.state.slot(slot), format!("{slot:?}"), 1);
        }
    }
    worst
}

fn far_from_zero_in_both_families(backends: wgpu::Backends, name: Option<&str>) {
    use wgpu_batchnorm::tuning::Op;
    use wgpu_batchnorm::{ChannelView, DType, KernelChoice, Strategy};
    let mut failures = Vec::new();
    for (kernels, strategy) in [
        (KernelChoice::Serial, Strategy::Serial),
        (KernelChoice::Coalesced, Strategy::Coalesced),
    ] {
        let ctx = common::fresh(backends, name);
        ctx.set_kernel_choice(kernels);
        let view = ChannelView::new(&[4096, 8], 1);
        assert_eq!(ctx.plan_tuning(view, DType::F32, Op::Training).strategy, strategy);
        for masked in [false, true] {
            let worst = far_from_zero(&ctx, masked);
            for (kind, [y, state, dx, dx_relative, dparams]) in far_kinds(masked).iter().zip(worst) {
                let line = format!(
                    "{} {kernels:?} {kind}: y {y:.2e}, state {state:.2e}, dx {dx:.2e} ({dx_relative:.2e} of the \
                     channel's largest), dgamma/dbeta {dparams:.2e}",
                    ctx.describe()
                );
                eprintln!("{line}");
                // the conformance tolerances, and dx relative to its own size
                if !(y <= 2e-5 && state <= 2e-5 && dx <= 1e-4 && dx_relative <= 1e-4 && dparams <= 1e-4) {
                    failures.push(line);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn constant_and_huge_variance_channels_far_from_zero_match_the_reference() {
    for name in common::vulkan_adapters() {
        far_from_zero_in_both_families(wgpu::Backends::VULKAN, Some(&name));
    }
    far_from_zero_in_both_families(wgpu::Backends::GL, None);
}
