//! The layer in a real browser: WebGPU in headless Chromium (its
//! SwiftShader adapter on a machine without a GPU), run by
//! `wasm-bindgen-test` (scripts/test-web.sh). The public Keras cases, random
//! inputs against the float64 reference for both kernel families (float32
//! and float16, channels first and last, masks, awkward sizes), backward
//! and an SGD step, typed errors, and a rejected pipeline as an error.
#![cfg(target_arch = "wasm32")]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wasm_bindgen_test::wasm_bindgen_test;
use wgpu_batchnorm::keras::{Device, error_measure, tolerance};
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{
    AdapterSelection, BatchNorm, BatchNormConfig, DType, Error, GpuContext, KernelChoice, Mask, Sgd, Tensor,
};
use wgpu_batchnorm_web::cases::public_cases;

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

async fn context(kernels: KernelChoice) -> GpuContext {
    let selection = AdapterSelection {
        kernels: Some(kernels),
        ..Default::default()
    };
    GpuContext::new_async(&selection)
        .await
        .unwrap_or_else(|e| panic!("{e}: the browser needs WebGPU (Chromium: --enable-unsafe-webgpu)"))
}

async fn read(ctx: &GpuContext, t: &Tensor) -> Vec<f64> {
    t.read_f32_async(ctx)
        .await
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

#[wasm_bindgen_test]
async fn the_public_keras_cases_pass() {
    for kernels in [KernelChoice::Serial, KernelChoice::Coalesced] {
        let ctx = context(kernels).await;
        for case in public_cases() {
            let report = case.run_async(&Device::Gpu(ctx.clone())).await;
            assert!(report.passes(), "{kernels:?} {}: {report:?}", case.name);
        }
        ctx.gpu_errors().await.unwrap();
    }
}

/// (shape, axis, masked): 1, primes, wider than a workgroup, channels
/// last of any width and of multiples of 4 and 8, NCHW with inner % 4,
/// % 16 and neither, runs of 17.
const SHAPES: &[(&[usize], i64, bool)] = &[
    (&[1, 1], -1, false),
    (&[7, 3], -1, true),
    (&[517, 12], -1, true),
    (&[300, 64], -1, false),
    (&[5, 13, 9], 1, true),
    (&[3, 8, 16], 1, false),
    (&[3, 4, 12], 1, false),
    (&[2, 6, 49], 1, false),
    (&[4, 3, 17], 1, true),
    (&[2, 3, 1031], 1, false),
];

fn values(rng: &mut StdRng, n: usize, offset: f32, dtype: DType) -> Vec<f32> {
    (0..n)
        .map(|_| dtype.round(offset + rng.random::<f32>() * 4.0 - 2.0))
        .collect()
}

/// Training forward, inference, backward and an SGD
/// step through the GPU layer and the float64 reference.
async fn against_the_reference(ctx: &GpuContext, shape: &[usize], axis: i64, masked: bool, dtype: DType, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let what = format!(
        "{:?} {shape:?} axis {axis} {dtype} masked {masked}",
        ctx.kernel_choice()
    );
    let config = BatchNormConfig::default().with_axis(axis).with_momentum(0.9);
    let channels = shape[axis.rem_euclid(shape.len() as i64) as usize];
    let layer = BatchNorm::new(ctx, config.clone(), channels).unwrap();
    let mut reference = ReferenceLayer::new(config, channels).unwrap();
    let len: usize = shape.iter().product();
    let x32 = values(&mut rng, len, 3.0, dtype);
    let dy32 = values(&mut rng, len, 0.5, dtype);
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let dy64: Vec<f64> = dy32.iter().map(|&v| v as f64).collect();
    let mask_shape = &shape[..shape.len() - 1];
    let flags: Option<Vec<u8>> = masked.then(|| {
        (0..mask_shape.iter().product())
            .map(|_| (rng.random::<f32>() < 0.7) as u8)
            .collect()
    });
    let mask = flags.as_ref().map(|f| Mask::from_u8(ctx, mask_shape, f).unwrap());
    let x = Tensor::from_f32_as(ctx, shape, &x32, dtype).unwrap();
    let (tol, grad_tol) = (tolerance(dtype, false), tolerance(dtype, true));

    let (y, saved) = layer.forward_saved(&x, Some(true), mask.as_ref()).unwrap();
    let want = reference.forward(&x64, shape, Some(true), flags.as_deref()).unwrap();
    let err = error_measure(&read(ctx, &y).await, &want);
    assert!(err <= tol, "{what}: training y {err:.2e}");

    let dy = Tensor::from_f32_as(ctx, shape, &dy32, dtype).unwrap();
    let got = layer.backward(&saved, &dy, true).unwrap();
    let want = reference.backward(&dy64, true).unwrap();
    let err = error_measure(&read(ctx, &got.dx).await, &want.dx);
    assert!(err <= grad_tol, "{what}: dx {err:.2e}");
    for (g, w) in [(&got.dgamma, &want.dgamma), (&got.dbeta, &want.dbeta)] {
        let err = error_measure(&read(ctx, g.as_ref().unwrap()).await, w.as_ref().unwrap());
        assert!(err <= grad_tol, "{what}: dgamma/dbeta {err:.2e}");
    }

    let y = layer.forward(&x, None, None).unwrap();
    let want = reference.forward(&x64, shape, None, None).unwrap();
    let err = error_measure(&read(ctx, &y).await, &want);
    assert!(err <= tol, "{what}: inference y {err:.2e}");
    for (slot, values) in layer.named_weights_async().await.unwrap() {
        let got: Vec<f64> = values.into_iter().map(f64::from).collect();
        let err = error_measure(&got, reference.state.slot(slot));
        assert!(err <= tol, "{what}: {slot:?} {err:.2e}");
    }

    // an SGD step moves gamma and beta against their gradients
    let before = layer.get_weights_async().await.unwrap();
    let mut sgd = Sgd::new(&layer, 0.1, 0.0, false).unwrap();
    sgd.step(&layer, &got).unwrap();
    let after = layer.get_weights_async().await.unwrap();
    let dgamma = read(ctx, got.dgamma.as_ref().unwrap()).await;
    for c in 0..channels {
        let want = before[0][c] as f64 - 0.1 * dgamma[c];
        assert!(
            (after[0][c] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{what}: SGD gamma[{c}]"
        );
    }
}

#[wasm_bindgen_test]
async fn random_inputs_match_the_reference_in_both_families() {
    for kernels in [KernelChoice::Serial, KernelChoice::Coalesced] {
        let ctx = context(kernels).await;
        for (i, &(shape, axis, masked)) in SHAPES.iter().enumerate() {
            for dtype in [DType::F32, DType::F16] {
                against_the_reference(&ctx, shape, axis, masked, dtype, 10 * i as u64).await;
            }
        }
        ctx.gpu_errors().await.unwrap();
    }
}

#[wasm_bindgen_test]
async fn bad_shapes_are_typed_errors() {
    let ctx = context(KernelChoice::Auto).await;
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 4).unwrap();
    let x = Tensor::from_f32(&ctx, &[2, 3], &[1.0; 6]).unwrap();
    assert!(matches!(
        layer.forward(&x, Some(true), None),
        Err(Error::Shape { argument: "x", .. })
    ));
    let x = Tensor::from_f32(&ctx, &[2, 4], &[1.0; 8]).unwrap();
    let mask = Mask::from_u8(&ctx, &[3], &[1, 0, 1]).unwrap();
    assert!(matches!(
        layer.forward(&x, Some(true), Some(&mask)),
        Err(Error::Shape { argument: "mask", .. })
    ));
    assert!(matches!(Tensor::from_f32(&ctx, &[3], &[1.0]), Err(Error::Shape { .. })));
    // the refused calls left nothing behind: a good call still records, and
    // the device reports no error
    assert!(
        layer
            .record_backward(
                &mut ctx.device().create_command_encoder(&Default::default()),
                &layer.forward_saved(&x, Some(true), None).unwrap().1,
                &x,
                false,
                &layer.gradient_tensors(&x).unwrap()
            )
            .is_ok()
    );
    ctx.gpu_errors().await.unwrap();
}

/// A pipeline the browser rejects is an error, never zeros: the browser
/// answers later, so the context reports it once it is known.
#[wasm_bindgen_test]
async fn a_rejected_pipeline_is_an_error() {
    let ctx = context(KernelChoice::Serial).await;
    assert!(ctx.break_kernel_for_tests("partial_stats"));
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 4).unwrap();
    let x = Tensor::from_f32(
        &ctx,
        &[3, 4],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0],
    )
    .unwrap();
    let _ = layer.forward(&x, Some(true), None);
    match ctx.gpu_errors().await {
        Err(Error::Gpu { message, .. }) => assert!(!message.is_empty()),
        other => panic!("a rejected pipeline gave {other:?}"),
    }
}
