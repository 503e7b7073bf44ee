//! Using the layer inside an application: its own device and encoder,
//! outputs it owns, weight files with Keras's names, inference folding, and
//! sharing a layer between threads.

mod common;

use common::{gpu, random_input, read64, rng};
use wgpu_batchnorm::keras::{error_measure, load_layer, load_weights, save_weights};
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Error, GpuContext, StateSlot, Tensor};

#[test]
fn layers_and_tensors_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BatchNorm>();
    assert_send_sync::<GpuContext>();
    assert_send_sync::<Tensor>();
    let ctx = gpu();
    let layer = std::sync::Arc::new(BatchNorm::new(&ctx, BatchNormConfig::default(), 4).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (layer, ctx) = (layer.clone(), ctx.clone());
            std::thread::spawn(move || {
                let x = Tensor::from_f32(&ctx, &[8, 4], &random_input(&mut rng(i), 32, 1.0)).unwrap();
                layer.forward(&x, None, None).unwrap().read_f32(&ctx).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().len(), 32);
    }
}

#[test]
fn an_application_device_and_encoder_run_several_layers_in_one_submission() {
    // the application's own device, as it would create it
    let app = gpu();
    let ctx = GpuContext::from_device(app.device().clone(), app.queue().clone());
    assert!(ctx.adapter_info().is_none());
    let first = BatchNorm::new(&ctx, BatchNormConfig::default(), 6).unwrap();
    let second = BatchNorm::new(&ctx, BatchNormConfig::default().with_axis(1), 5).unwrap();
    let x32 = random_input(&mut rng(5), 5 * 6, 2.0);
    let x = Tensor::from_f32(&ctx, &[5, 6], &x32).unwrap();
    let middle = Tensor::from_f32(&ctx, &[5, 6], &[0.0; 30]).unwrap();
    let out = Tensor::from_f32(&ctx, &[5, 6], &[0.0; 30]).unwrap();
    // the second layer normalises the first one's output along axis 1 of
    // a [5, 6] view... it has 6 values on axis 1: use a [6, 5]-shaped view
    let middle_t = Tensor::from_buffer(&ctx, middle.buffer().clone(), &[6, 5], wgpu_batchnorm::DType::F32).unwrap();
    let out_t = Tensor::from_buffer(&ctx, out.buffer().clone(), &[6, 5], wgpu_batchnorm::DType::F32).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    first
        .record_forward(&mut encoder, &x, Some(true), None, &middle)
        .unwrap();
    second
        .record_forward(&mut encoder, &middle_t, Some(true), None, &out_t)
        .unwrap();
    ctx.queue().submit([encoder.finish()]);

    let mut r1 = ReferenceLayer::new(BatchNormConfig::default(), 6).unwrap();
    let mut r2 = ReferenceLayer::new(BatchNormConfig::default().with_axis(1), 5).unwrap();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let m = r1.forward(&x64, &[5, 6], Some(true), None).unwrap();
    let want = r2.forward(&m, &[6, 5], Some(true), None).unwrap();
    let got = read64(&ctx, &out_t);
    assert!(error_measure(&got, &want) < 2e-5);

    // outputs must fit and must not alias the input
    assert!(matches!(
        first.forward_into(&x, None, None, &x),
        Err(Error::Aliasing { .. })
    ));
    assert!(matches!(
        first.forward_into(&x, None, None, &middle_t),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn weights_round_trip_through_a_keras_named_file() {
    let ctx = gpu();
    let config = BatchNormConfig::default().with_renorm(true);
    let layer = BatchNorm::new(&ctx, config.clone(), 3).unwrap();
    for (i, slot) in layer.weight_slots().into_iter().enumerate() {
        layer.set_weight(slot, &[i as f32 + 0.5, 1.25, 2.0 + i as f32]).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("wgpu-batchnorm-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bn.safetensors");
    save_weights(&layer, &path).unwrap();
    let names = {
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    };
    assert_eq!(
        names,
        [
            "beta",
            "gamma",
            "moving_mean",
            "moving_stddev",
            "moving_variance",
            "renorm_mean",
            "renorm_stddev"
        ]
    );
    let copy = BatchNorm::new(&ctx, config, 3).unwrap();
    load_weights(&copy, &path).unwrap();
    assert_eq!(copy.get_weights().unwrap(), layer.get_weights().unwrap());
    let x = Tensor::from_f32(&ctx, &[4, 3], &random_input(&mut rng(8), 12, 0.0)).unwrap();
    assert_eq!(
        copy.forward(&x, None, None).unwrap().read_f32(&ctx).unwrap(),
        layer.forward(&x, None, None).unwrap().read_f32(&ctx).unwrap()
    );

    // a layer without renorm refuses the renorm tensors; a wider one the shapes
    let plain = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    assert!(matches!(load_weights(&plain, &path), Err(Error::File { .. })));
    let wide = BatchNorm::new(&ctx, BatchNormConfig::default().with_renorm(true), 4).unwrap();
    let before = wide.get_weights().unwrap();
    assert!(matches!(load_weights(&wide, &path), Err(Error::File { .. })));
    assert_eq!(wide.get_weights().unwrap(), before, "nothing written on error");
    assert!(matches!(
        load_weights(&plain, &dir.join("missing.safetensors")),
        Err(Error::File { .. })
    ));
}

#[test]
fn inference_folding_matches_inference() {
    let ctx = gpu();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default().with_axis(1), 3).unwrap();
    layer.set_weight(StateSlot::Gamma, &[0.5, 2.0, -1.0]).unwrap();
    layer.set_weight(StateSlot::Beta, &[0.1, 0.2, 0.3]).unwrap();
    layer.set_weight(StateSlot::MovingMean, &[1.0, -2.0, 3.0]).unwrap();
    layer.set_weight(StateSlot::MovingVariance, &[0.25, 4.0, 1.0]).unwrap();
    let (scale, shift) = layer.inference_affine().unwrap();
    let x32 = random_input(&mut rng(2), 2 * 3 * 5, 1.0);
    let x = Tensor::from_f32(&ctx, &[2, 3, 5], &x32).unwrap();
    let y = layer.forward(&x, None, None).unwrap().read_f32(&ctx).unwrap();
    for (e, (&xv, &yv)) in x32.iter().zip(&y).enumerate() {
        let c = (e / 5) % 3;
        assert!((xv * scale[c] + shift[c] - yv).abs() < 1e-5, "{e}");
    }
}

/// Files written by Keras 3.15.1 itself (tests/fixtures/keras_export/export.py).
#[test]
fn a_layer_exported_from_keras_gives_keras_outputs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras_export");
    let json = std::fs::read_to_string(dir.join("bn_config.json")).unwrap();
    let keras_config = wgpu_batchnorm::keras::KerasLayerConfig::from_json(&json).unwrap();
    // the config goes back out as the same JSON
    let original: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(keras_config.to_value(), original);

    let ctx = gpu();
    // one call: the channel count comes from the weights
    let layer = load_layer(&ctx, &dir.join("bn_config.json"), &dir.join("bn.safetensors")).unwrap();
    assert_eq!(layer.channels(), 5);
    assert_eq!(layer.config(), &keras_config.config);
    // and by hand, as before
    let by_hand = BatchNorm::new(&ctx, keras_config.config, 5).unwrap();
    load_weights(&by_hand, &dir.join("bn.safetensors")).unwrap();
    assert_eq!(by_hand.get_weights().unwrap(), layer.get_weights().unwrap());
    // a weight file without moving_mean, and a config that is not JSON, say which file
    let err = load_layer(&ctx, &dir.join("bn.safetensors"), &dir.join("bn.safetensors")).unwrap_err();
    assert!(err.to_string().contains("bn.safetensors"), "{err}");
    let err = load_layer(&ctx, &dir.join("bn_config.json"), &dir.join("bn_io.safetensors")).unwrap_err();
    assert!(err.to_string().contains("moving_mean"), "{err}");
    let io = std::fs::read(dir.join("bn_io.safetensors")).unwrap();
    let io = safetensors::SafeTensors::deserialize(&io).unwrap();
    let floats = |name: &str| -> Vec<f32> {
        io.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let x = Tensor::from_f32(&ctx, &[7, 5], &floats("x")).unwrap();
    let got = read64(&ctx, &layer.forward(&x, None, None).unwrap());
    let want: Vec<f64> = floats("y").into_iter().map(f64::from).collect();
    assert!(error_measure(&got, &want) < 1e-6, "{got:?} vs {want:?}");
}

#[test]
fn forward_and_backward_never_compile_a_pipeline() {
    let ctx = GpuContext::new(&wgpu_batchnorm::AdapterSelection::from_env()).unwrap();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default().with_renorm(true), 4).unwrap();
    let compiled = ctx.compiled_pipelines();
    assert!(compiled > 10);
    for (shape, axis) in [
        (vec![6usize, 4], -1i64),
        (vec![2, 4, 16], 1),
        (vec![2, 4, 12], 1),
        (vec![3, 4, 5], 1),
    ] {
        let config = BatchNormConfig::default().with_axis(axis);
        let layer = BatchNorm::new(&ctx, config, 4).unwrap();
        for dtype in [wgpu_batchnorm::DType::F32, wgpu_batchnorm::DType::F16] {
            let len: usize = shape.iter().product();
            let x = Tensor::from_f32_as(&ctx, &shape, &random_input(&mut rng(1), len, 1.0), dtype).unwrap();
            let mask_shape = &shape[..shape.len() - 1];
            let mask = wgpu_batchnorm::Mask::from_u8(&ctx, mask_shape, &vec![1; mask_shape.iter().product()]).unwrap();
            for (training, m) in [(Some(true), None), (Some(true), Some(&mask)), (None, None)] {
                let (_, saved) = layer.forward_saved(&x, training, m).unwrap();
                layer.backward(&saved, &x, true).unwrap();
            }
        }
    }
    let mut sgd = wgpu_batchnorm::Sgd::new(&layer, 0.1, 0.9, false).unwrap();
    let x = Tensor::from_f32(&ctx, &[6, 4], &random_input(&mut rng(2), 24, 1.0)).unwrap();
    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
    sgd.step(&layer, &layer.backward(&saved, &x, false).unwrap()).unwrap();
    layer.apply_constraints().unwrap();
    assert_eq!(ctx.compiled_pipelines(), compiled);
}

#[test]
fn views_at_offsets_inside_application_buffers() {
    let ctx = GpuContext::new(&wgpu_batchnorm::AdapterSelection::from_env()).unwrap();
    let align = ctx.storage_offset_alignment();
    let (shape, len) = ([50usize, 12], 600usize);
    let slot = ((len * 4) as u64).div_ceil(align) * align;
    // WebGPU binds a buffer either read-only or read-write within one
    // dispatch: inputs [x | dy] in one arena, outputs [y | dx] in another
    let arena = |label| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: 2 * slot,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    };
    let (inputs, outputs) = (arena("inputs"), arena("outputs"));
    let x32 = random_input(&mut rng(12), len, 3.0);
    let dy32 = random_input(&mut rng(13), len, 0.2);
    ctx.queue().write_buffer(&inputs, 0, bytemuck::cast_slice(&x32));
    ctx.queue().write_buffer(&inputs, slot, bytemuck::cast_slice(&dy32));
    let f32_ = wgpu_batchnorm::DType::F32;
    let view = |b: &wgpu::Buffer, i: u64| Tensor::view_of(&ctx, b.clone(), i * slot, &shape, f32_).unwrap();
    let (x, dy, y, dx) = (view(&inputs, 0), view(&inputs, 1), view(&outputs, 0), view(&outputs, 1));
    // small bindings: the views are bound in several chunks
    ctx.set_max_binding_size(1024);
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 12).unwrap();
    let saved = layer.forward_into(&x, Some(true), None, &y).unwrap();
    let grads = wgpu_batchnorm::Gradients {
        dx: dx.clone(),
        dgamma: Some(Tensor::from_f32(&ctx, &[12], &[0.0; 12]).unwrap()),
        dbeta: Some(Tensor::from_f32(&ctx, &[12], &[0.0; 12]).unwrap()),
    };
    layer.backward_into(&saved, &dy, false, &grads).unwrap();

    let mut reference = ReferenceLayer::new(BatchNormConfig::default(), 12).unwrap();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let want_y = reference.forward(&x64, &shape, Some(true), None).unwrap();
    let want = reference
        .backward(&dy32.iter().map(|&v| v as f64).collect::<Vec<_>>(), false)
        .unwrap();
    let read = |t: &Tensor| read64(&ctx, t);
    assert!(error_measure(&read(&y), &want_y) < 2e-5);
    assert!(error_measure(&read(&dx), &want.dx) < 1e-4);
    assert!(error_measure(&read(grads.dgamma.as_ref().unwrap()), want.dgamma.as_ref().unwrap()) < 1e-4);
    assert_eq!(x.read_f32(&ctx).unwrap(), x32, "the input is untouched");

    // misaligned and out-of-bounds views, and outputs in an input's buffer, are refused
    assert!(matches!(
        Tensor::view_of(&ctx, inputs.clone(), 4, &shape, f32_),
        Err(Error::Alignment { offset: 4, .. })
    ));
    assert!(matches!(
        Tensor::view_of(&ctx, inputs.clone(), 2 * slot, &shape, f32_),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        layer.forward_into(&x, None, None, &dy),
        Err(Error::Aliasing { .. })
    ));
    assert!(x.overlaps(&Tensor::view_of(&ctx, inputs.clone(), 0, &[2, 12], f32_).unwrap()));
    assert!(!x.overlaps(&dy));
}

#[test]
fn the_fused_relu_epilogue_matches_the_reference_and_refuses_backward() {
    let ctx = gpu();
    for (shape, axis, dtype) in [
        (vec![9usize, 8], -1i64, wgpu_batchnorm::DType::F32),
        (vec![2, 4, 16], 1, wgpu_batchnorm::DType::F32),
        (vec![3, 5, 7], 1, wgpu_batchnorm::DType::F16),
    ] {
        let config = BatchNormConfig::default().with_axis(axis).with_fused_relu(true);
        let channels = shape[config.resolve_axis(shape.len()).unwrap()];
        let layer = BatchNorm::new(&ctx, config.clone(), channels).unwrap();
        let mut reference = ReferenceLayer::new(config, channels).unwrap();
        let len: usize = shape.iter().product();
        let x32: Vec<f32> = random_input(&mut rng(31), len, 1.0)
            .into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect();
        let x = Tensor::from_f32_as(&ctx, &shape, &x32, dtype).unwrap();
        for training in [Some(true), None] {
            let got = read64(&ctx, &layer.forward(&x, training, None).unwrap());
            let want = reference
                .forward(
                    &x32.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                    &shape,
                    training,
                    None,
                )
                .unwrap();
            assert!(want.iter().all(|&v| v >= 0.0) && want.contains(&0.0));
            assert!(
                error_measure(&got, &want) < wgpu_batchnorm::keras::tolerance(dtype, false),
                "{shape:?} {training:?} {:?} {:?}",
                &got[..8],
                &want[..8]
            );
        }
        let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
        assert!(matches!(layer.backward(&saved, &x, false), Err(Error::Config(_))));
    }
}

/// Every state slot starts at the device's storage offset alignment, so an
/// application can bind one slot on its own: a view of gamma's range, and
/// of every other slot's, reads that weight; an application's write to
/// beta's range is what the layer uses.
#[test]
fn every_state_slot_is_bindable_at_its_own_range() {
    let ctx = gpu();
    let align = ctx.storage_offset_alignment();
    for channels in [1usize, 3, 65, 1000] {
        let config = BatchNormConfig::default().with_renorm(true);
        let layer = BatchNorm::new(&ctx, config, channels).unwrap();
        let mut r = rng(channels as u64);
        for slot in layer.weight_slots() {
            // positive, so that the variances are
            let values: Vec<f32> = random_input(&mut r, channels, 1.0)
                .iter()
                .map(|v| v.abs() + 0.5)
                .collect();
            layer.set_weight(slot, &values).unwrap();
        }
        for (slot, values) in layer.named_weights().unwrap() {
            let range = layer.weight_range(slot);
            assert_eq!(range.start % align, 0, "{slot:?} of {channels} channels");
            assert_eq!(range.end - range.start, channels as u64 * 4);
            let view = Tensor::view_of(
                &ctx,
                layer.state_buffer().clone(),
                range.start,
                &[channels],
                wgpu_batchnorm::DType::F32,
            )
            .unwrap();
            assert_eq!(view.read_f32(&ctx).unwrap(), values, "{slot:?} of {channels} channels");
        }
        // the application writes beta itself: inference uses it
        let beta = vec![2.5f32; channels];
        ctx.queue().write_buffer(
            layer.state_buffer(),
            layer.weight_range(StateSlot::Beta).start,
            bytemuck::cast_slice(&beta),
        );
        layer.mark_weights_changed();
        let w = layer.named_weights().unwrap();
        let get = |s: StateSlot| w.iter().find(|(k, _)| *k == s).unwrap().1.clone();
        assert_eq!(get(StateSlot::Beta), beta);
        let (gamma, mean, var) = (
            get(StateSlot::Gamma),
            get(StateSlot::MovingMean),
            get(StateSlot::MovingVariance),
        );
        let x = random_input(&mut r, 2 * channels, 0.0);
        let y = layer
            .forward(&Tensor::from_f32(&ctx, &[2, channels], &x).unwrap(), None, None)
            .unwrap()
            .read_f32(&ctx)
            .unwrap();
        for (i, (&x, &y)) in x.iter().zip(&y).enumerate() {
            let c = i % channels;
            let want = (x - mean[c]) * gamma[c] / (var[c] + 1e-3).sqrt() + 2.5;
            assert!((y - want).abs() <= 1e-4 * want.abs().max(1.0), "{i}: {y} vs {want}");
        }
    }
}
