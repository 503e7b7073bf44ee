//! Seeded random inputs through the GPU layer and the float64 reference:
//! ranks 1-5, every axis, awkward sizes, every config flag, masks, float16,
//! channels of more than 2^20 values, and tensors beyond one binding.

mod common;

use common::{compare_with_reference, gpu, read64, tolerance};
use wgpu_batchnorm::{BatchNormConfig, DType, GpuContext, RenormClipping};

const SHAPES: &[&[usize]] = &[
    &[1],
    &[7],
    &[300],
    &[1, 1],
    &[3, 5],
    &[257, 3],
    &[2, 1031],
    &[2, 3, 5],
    &[1, 7, 1],
    &[13, 1, 17],
    &[2, 3, 5, 7],
    &[1, 1, 1, 1],
    &[3, 1, 257, 2],
    &[2, 3, 1, 5, 7],
    &[1, 2, 3, 1, 4],
    // vec4 layouts: channels last with channels % 4 == 0, inner % 4 == 0
    &[5, 12],
    &[3, 8, 4],
    &[2, 4, 6, 8],
    &[600, 16],
];

/// A config variant per index: every flag on and off across the sweep.
fn variant(i: usize, axis: i64) -> (BatchNormConfig, DType) {
    let mut c = BatchNormConfig::default()
        .with_axis(axis)
        .with_center(i.is_multiple_of(2))
        .with_scale(i % 3 != 1)
        .with_momentum([0.99, 0.9, 0.0, 1.0][i % 4])
        .with_epsilon([1e-3, 1e-5][i % 2]);
    if i % 5 == 2 {
        c.renorm = true;
        c.renorm_momentum = 0.9;
        c.renorm_clipping = match i % 3 {
            0 => RenormClipping::default(),
            1 => RenormClipping {
                rmax: Some(1.5),
                rmin: None,
                dmax: None,
            },
            _ => RenormClipping {
                rmax: Some(2.0),
                rmin: Some(0.7),
                dmax: Some(0.2),
            },
        };
    }
    let dtype = if i % 7 == 3 { DType::F16 } else { DType::F32 };
    (c, dtype)
}

/// Masked calls at every rank: a rank-1 input takes a rank-0 mask.
fn calls(_rank: usize) -> Vec<(Option<bool>, bool)> {
    let masked = true;
    vec![
        (Some(true), false),
        (Some(true), masked),
        (None, false),
        (Some(false), masked),
        (Some(true), false),
    ]
}

/// The default arguments on `axis`.
fn on_axis(axis: i64) -> BatchNormConfig {
    BatchNormConfig::default().with_axis(axis)
}

/// float32 with default arguments on `axis`: y and the state within 2e-5.
fn assert_float32_matches(shape: &[usize], axis: i64, calls: &[(Option<bool>, bool)], seed: u64) {
    for ctx in common::vulkan() {
        compare_with_reference(&ctx, &on_axis(axis), shape, DType::F32, calls, seed).assert_within(2e-5);
    }
}

fn sweep(ctx: &GpuContext) {
    let mut failures = Vec::new();
    let mut i = 0;
    for shape in SHAPES {
        let rank = shape.len() as i64;
        for axis in 0..rank {
            // both spellings of the axis
            for spelled in [axis, axis - rank] {
                let (config, dtype) = variant(i, spelled);
                let o = compare_with_reference(ctx, &config, shape, dtype, &calls(shape.len()), i as u64);
                let tol = tolerance(dtype);
                if !(o.y_error <= tol && o.state_error <= tol) {
                    failures.push(format!(
                        "shape {shape:?} axis {spelled} {dtype} {config:?}: y {:.2e} state {:.2e}",
                        o.y_error, o.state_error
                    ));
                }
                i += 1;
            }
        }
    }
    assert!(i > 60);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_rank_axis_and_flag_matches_the_reference() {
    for ctx in common::drivers() {
        sweep(&ctx);
    }
}

/// The normalise kernels reading their parameters through a storage
/// binding (the GPU default; a CPU adapter, as every one here, reads them
/// through a uniform one by default, which the test above runs).
#[test]
fn every_rank_axis_and_flag_matches_the_reference_with_storage_parameters() {
    for ctx in common::fresh_vulkan() {
        ctx.set_uniform_parameters(false);
        sweep(&ctx);
    }
}

/// Uniform parameters are on by default exactly for CPU adapters, and a
/// layer whose parameters outgrow the 64 KiB uniform view (3 x 5462 floats
/// for the normalise pass) reads them from storage.
#[test]
fn uniform_parameters_default_and_their_channel_limit() {
    for ctx in common::fresh_vulkan() {
        let cpu = ctx.device().adapter_info().device_type == wgpu::DeviceType::Cpu;
        assert_eq!(ctx.uniform_parameters(), cpu);
        ctx.set_uniform_parameters(true);
        for (i, (shape, axis)) in [
            (&[3usize, 5461][..], -1i64),
            (&[3, 5462][..], -1),
            (&[3, 5464][..], -1),
            (&[2, 5462, 16][..], 1),
            (&[2, 5461, 3][..], 1),
        ]
        .into_iter()
        .enumerate()
        {
            let calls = [(Some(true), false), (None, false)];
            compare_with_reference(&ctx, &on_axis(axis), shape, DType::F32, &calls, 40 + i as u64).assert_within(2e-5);
        }
    }
}

/// float16 in every vec4 layout (four halves per 8-byte load): channels
/// last, inner % 16 == 0 and inner % 4 == 0, each also cut into chunks.
#[test]
fn float16_in_the_vec4_layouts() {
    let chunked = common::fresh_vulkan();
    for ctx in &chunked {
        ctx.set_max_binding_size(4096);
    }
    for (i, (shape, axis)) in [
        (&[500usize, 12][..], -1i64),
        (&[37, 3, 8][..], -1),
        (&[3, 4, 48][..], 1),
        (&[5, 3, 4, 4][..], 1),
        (&[3, 4, 12][..], 1),
        (&[2, 8, 5, 4][..], 1),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut config, _) = variant(i, axis);
        config.axis = axis;
        let calls = [(Some(true), false), (None, false), (Some(true), false)];
        for ctx in common::vulkan().into_iter().chain(chunked.iter().cloned()) {
            let tol = tolerance(DType::F16);
            compare_with_reference(&ctx, &config, shape, DType::F16, &calls, 60 + i as u64).assert_within(tol);
        }
    }
}

/// inner >= 16 but not a multiple of 4 (7x7 maps): whole vec4s whose four
/// values may straddle two channels; a length not a multiple of 4 takes the
/// scalar kernels. Whole and chunked, float32 and float16.
#[test]
fn runs_of_16_or_more_values_not_a_multiple_of_4() {
    let chunked = common::fresh_vulkan();
    for ctx in &chunked {
        ctx.set_max_binding_size(4096);
    }
    for (i, shape) in [
        &[8usize, 5, 7, 7][..],
        &[4, 3, 17],
        &[3, 5, 17],
        &[2, 7, 18],
        &[1, 1, 49],
        &[6, 2, 3, 7],
    ]
    .into_iter()
    .enumerate()
    {
        let (mut config, _) = variant(i, 1);
        config.axis = 1;
        for ctx in common::vulkan().into_iter().chain(chunked.iter().cloned()) {
            for dtype in [DType::F32, DType::F16] {
                let calls = [(Some(true), false), (None, false), (Some(true), false)];
                compare_with_reference(&ctx, &config, shape, dtype, &calls, 80 + i as u64)
                    .assert_within(tolerance(dtype));
            }
        }
    }
}

/// A device with 16 KiB uniform bindings: the parameters' uniform view is
/// 16 KiB, used up to 1365 channels (3 x 4 bytes each) and not beyond.
#[test]
fn a_device_with_small_uniform_bindings() {
    let ctx = common::small_uniform_device();
    for (i, (shape, axis)) in [
        (&[3usize, 1364][..], -1i64),
        (&[3, 1368][..], -1),
        (&[2, 1365, 4][..], 1),
        (&[2, 1366, 7][..], 1),
    ]
    .into_iter()
    .enumerate()
    {
        let calls = [(Some(true), false), (None, false)];
        compare_with_reference(&ctx, &on_axis(axis), shape, DType::F32, &calls, 120 + i as u64).assert_within(2e-5);
    }
}

#[test]
fn chunked_bindings_match_the_reference() {
    // private contexts: capping their bindings forces several chunks per input
    for ctx in common::fresh_vulkan() {
        ctx.set_max_binding_size(4096);
        for (i, (shape, axis, dtype)) in [
            (&[1001usize, 3, 7][..], 1i64, DType::F32),
            (&[1001, 3, 7], 1, DType::F16),
            (&[999, 5], -1, DType::F16),
            (&[4000, 3], 0, DType::F32),
            (&[77, 3, 2, 5], 2, DType::F16),
            (&[500, 8], -1, DType::F32),
            (&[50, 3, 4, 4], 1, DType::F32),
        ]
        .into_iter()
        .enumerate()
        {
            let (mut config, _) = variant(i, axis);
            config.axis = axis;
            let seed = 100 + i as u64;
            compare_with_reference(&ctx, &config, shape, dtype, &calls(shape.len()), seed)
                .assert_within(tolerance(dtype));
        }
    }
}

#[test]
fn channels_longer_than_one_workgroup_tile() {
    for (shape, axis) in [
        (&[40000usize, 3][..], -1i64),
        (&[3, 5, 10007][..], 1),
        (&[20011, 1][..], 1),
        (&[40000, 8][..], -1),
        (&[3, 4, 20000][..], 1),
    ] {
        assert_float32_matches(shape, axis, &[(Some(true), true), (None, false)], 5);
        assert_float32_matches(shape, axis, &[(Some(true), false), (Some(true), false)], 6);
    }
}

/// llvmpipe ends any shader loop after 65535 iterations: a kernel that
/// loops over a whole channel is wrong past that. Both layouts, > 2^20 values.
#[test]
fn channels_of_more_than_2_pow_20_values_nhwc_and_nchw() {
    for (shape, axis) in [(&[17usize, 256, 256, 4][..], -1i64), (&[3, 4, 600, 600][..], 1)] {
        assert!(shape.iter().product::<usize>() / 4 > 1 << 20);
        assert_float32_matches(shape, axis, &[(Some(true), false), (None, false)], 11);
    }
}

/// 144 MB of float32: more than wgpu's default (and lavapipe's) 128 MiB
/// storage binding.
#[test]
fn tensor_larger_than_one_binding() {
    let shape = [9usize, 4, 1000, 1000];
    assert!(shape.iter().product::<usize>() * 4 > 128 << 20);
    assert_float32_matches(&shape, 1, &[(Some(true), false), (None, false)], 13);
}

#[test]
fn trainable_false_is_inference_and_changes_nothing() {
    let config = BatchNormConfig::default().with_trainable(false);
    let ctx = gpu();
    let layer = wgpu_batchnorm::BatchNorm::new(&ctx, config.clone(), 3).unwrap();
    let before = layer.get_weights().unwrap();
    let x =
        wgpu_batchnorm::Tensor::from_f32(&ctx, &[4, 3], &common::random_input(&mut common::rng(1), 12, 2.0)).unwrap();
    layer.forward(&x, Some(true), None).unwrap();
    assert_eq!(layer.get_weights().unwrap(), before);
    let o = compare_with_reference(
        &ctx,
        &config,
        &[5, 3],
        DType::F32,
        &[(Some(true), false), (Some(true), true)],
        2,
    );
    assert!(o.y_error <= 2e-5 && o.state_error == 0.0);
}

#[test]
fn a_fully_masked_out_batch_gives_keras_zero_statistics() {
    // Keras: mean = 0 / (0 + 1e-7) = 0 and var = 0 when nothing is masked in
    let ctx = gpu();
    let config = BatchNormConfig::default();
    let layer = wgpu_batchnorm::BatchNorm::new(&ctx, config.clone(), 2).unwrap();
    let values = [3.0f32, -1.0, 5.0, 2.0, 4.0, 0.5];
    let x = wgpu_batchnorm::Tensor::from_f32(&ctx, &[3, 2], &values).unwrap();
    let mask = wgpu_batchnorm::Mask::from_u8(&ctx, &[3], &[0, 0, 0]).unwrap();
    let y = layer
        .forward(&x, Some(true), Some(&mask))
        .unwrap()
        .read_f32(&ctx)
        .unwrap();
    let inv = 1.0 / (1e-3f32).sqrt();
    for (got, v) in y.iter().zip(values) {
        assert!((got - v * inv).abs() <= 1e-5 * inv * 5.0, "{got} vs {}", v * inv);
    }
    let w = layer.get_weights().unwrap();
    assert!(w[2].iter().all(|&m| m == 0.0));
    assert!(w[3].iter().all(|&v| (v - 0.99).abs() < 1e-7));
}

/// A rank-1 input takes a rank-0 mask (shape `[]`, one flag for the whole
/// input), as Keras does: a non-zero flag lets every value into the
/// statistics (with Keras's count + 1e-7), a zero one none (mean 0,
/// variance 0). y, the moving statistics and the gradients match the
/// reference with either kernel family, also in bindings of 4 KiB (chunks
/// that start inside the one row), and `from_u8_broadcast` makes the same
/// mask.
#[test]
fn a_rank_1_input_takes_a_rank_0_mask() {
    use wgpu_batchnorm::keras::error_measure;
    use wgpu_batchnorm::reference::ReferenceLayer;
    use wgpu_batchnorm::{AdapterSelection, BatchNorm, KernelChoice, Mask, StateSlot, Tensor};
    for (kernels, chunked) in [KernelChoice::Serial, KernelChoice::Coalesced]
        .into_iter()
        .flat_map(|k| [(k, false), (k, true)])
    {
        let ctx = GpuContext::new(&AdapterSelection {
            kernels: Some(kernels),
            ..AdapterSelection::from_env()
        })
        .unwrap();
        if chunked {
            ctx.set_max_binding_size(4096);
        }
        for (n, axis) in [(1usize, -1i64), (7, 0), (300, -1), (4099, 0)] {
            let config = BatchNormConfig::default().with_axis(axis).with_momentum(0.5);
            for (flag, broadcast) in [(1u8, false), (0, false), (7, true), (0, true)] {
                let what = format!(
                    "{} {kernels:?} chunked {chunked} [{n}] axis {axis} flag {flag}",
                    ctx.describe()
                );
                let layer = BatchNorm::new(&ctx, config.clone(), n).unwrap();
                let mut reference = ReferenceLayer::new(config.clone(), n).unwrap();
                let gamma: Vec<f32> = (0..n).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
                let beta: Vec<f32> = (0..n).map(|c| (c % 3) as f32 - 1.0).collect();
                for (slot, values) in [(StateSlot::Gamma, &gamma), (StateSlot::Beta, &beta)] {
                    layer.set_weight(slot, values).unwrap();
                    *reference.state.slot_mut(slot) = values.iter().map(|&v| v as f64).collect();
                }
                let mut r = common::rng(n as u64 + u64::from(flag));
                let x32 = common::random_input(&mut r, n, 3.0);
                let dy32 = common::random_input(&mut r, n, 0.5);
                let widen = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
                let x = Tensor::from_f32(&ctx, &[n], &x32).unwrap();
                let dy = Tensor::from_f32(&ctx, &[n], &dy32).unwrap();
                let mask = match broadcast {
                    false => Mask::from_u8(&ctx, &[], &[flag]).unwrap(),
                    true => Mask::from_u8_broadcast(&ctx, &[], &[flag], &[n]).unwrap(),
                };
                assert_eq!(mask.shape(), &[] as &[usize]);
                let read = |t: &Tensor| read64(&ctx, t);
                let (y, saved) = layer.forward_saved(&x, Some(true), Some(&mask)).unwrap();
                let want = reference
                    .forward(&widen(&x32), &[n], Some(true), Some(&[flag]))
                    .unwrap();
                let e = error_measure(&read(&y), &want);
                assert!(e <= 2e-5, "{what}: y {e:.2e}");
                if flag == 0 {
                    // nothing in: mean 0 and variance 0, so y = x * gamma / sqrt(eps) + beta
                    let inv = 1.0 / (config.epsilon as f64).sqrt();
                    let direct: Vec<f64> = (0..n)
                        .map(|c| x32[c] as f64 * gamma[c] as f64 * inv + beta[c] as f64)
                        .collect();
                    assert!(error_measure(&want, &direct) <= 1e-12, "{what}: the reference's y");
                }
                let grads = layer.backward(&saved, &dy, false).unwrap();
                let want_grads = reference.backward(&widen(&dy32), false).unwrap();
                for (name, got, want) in [
                    ("dx", read(&grads.dx), &want_grads.dx),
                    (
                        "dgamma",
                        read(grads.dgamma.as_ref().unwrap()),
                        want_grads.dgamma.as_ref().unwrap(),
                    ),
                    (
                        "dbeta",
                        read(grads.dbeta.as_ref().unwrap()),
                        want_grads.dbeta.as_ref().unwrap(),
                    ),
                ] {
                    let e = error_measure(&got, want);
                    assert!(e <= 1e-4, "{what}: {name} {e:.2e}");
                }
                for (slot, values) in layer.named_weights().unwrap() {
                    let got: Vec<f64> = values.into_iter().map(f64::from).collect();
                    let e = error_measure(&got, reference.state.slot(slot));
                    assert!(e <= 2e-5, "{what}: {slot:?} {e:.2e}");
                }
            }
        }
    }
}

/// PyTorch's running statistics for ported models: momentum weighs the new
/// value, the running variance is unbiased, normalisation stays biased.
#[test]
fn pytorch_running_statistics() {
    let ctx = gpu();
    let config = BatchNormConfig::default()
        .with_momentum(0.1)
        .with_epsilon(1e-5)
        .with_running_statistics(wgpu_batchnorm::RunningStatistics::PyTorch);
    let layer = wgpu_batchnorm::BatchNorm::new(&ctx, config.clone(), 2).unwrap();
    let x = wgpu_batchnorm::Tensor::from_f32(&ctx, &[3, 2], &[1.0, 2.0, 3.0, 6.0, 5.0, 10.0]).unwrap();
    let y = layer.forward(&x, Some(true), None).unwrap().read_f32(&ctx).unwrap();
    let w = layer.get_weights().unwrap();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-5);
    assert!(close(&w[2], &[0.3, 0.6]), "{:?}", w[2]);
    assert!(close(&w[3], &[0.9 + 0.4, 0.9 + 1.6]), "{:?}", w[3]);
    let biased = [8.0f32 / 3.0, 32.0 / 3.0];
    assert!((y[0] - (1.0 - 3.0) / (biased[0] + 1e-5).sqrt()).abs() < 1e-5);
    // the random sweep's flags under PyTorch statistics, masks included
    for (i, shape) in [&[7usize, 3][..], &[2, 5, 8], &[4, 4, 16]].into_iter().enumerate() {
        let config = config.clone().with_axis(1);
        let o = compare_with_reference(&ctx, &config, shape, DType::F32, &calls(shape.len()), 300 + i as u64);
        assert!(
            o.y_error <= 2e-5 && o.state_error <= 2e-5,
            "{shape:?}: {:.2e} {:.2e}",
            o.y_error,
            o.state_error
        );
    }
    let renorm = config.with_renorm(true);
    assert!(wgpu_batchnorm::BatchNorm::new(&ctx, renorm, 2).is_err());
}

/// Layers wider than 524,280 channels (the finalize grid needs a second
/// dimension): every channel normalised and its moving statistics updated,
/// training and inference, on Vulkan and GL. The test profile is optimised
/// (opt-level 1), where rustc 1.95 miscompiled the old grid clamp.
fn wide_layers_match(ctx: &GpuContext) {
    for (i, (shape, axis)) in [
        (&[3usize, 524_281][..], -1i64),
        (&[2, 600_000][..], -1),
        (&[2, 1 << 20][..], -1),
        (&[2, 600_000, 1][..], 1),
    ]
    .into_iter()
    .enumerate()
    {
        let calls = [(Some(true), false), (None, false), (Some(true), shape.len() > 2)];
        compare_with_reference(ctx, &on_axis(axis), shape, DType::F32, &calls, 900 + i as u64).assert_within(2e-5);
    }
    compare_with_reference(
        ctx,
        &on_axis(-1),
        &[3, 600_001],
        DType::F16,
        &[(Some(true), false)],
        905,
    )
    .assert_within(tolerance(DType::F16));
}

#[test]
fn layers_wider_than_2_pow_19_channels() {
    for ctx in common::drivers() {
        wide_layers_match(&ctx);
    }
}
