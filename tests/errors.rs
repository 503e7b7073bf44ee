//! Bad input gives typed errors, never a panic, and changes nothing.

mod common;

use common::gpu;
use wgpu_batchnorm::reference::ReferenceLayer;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, ConfigError, Error, Mask, RenormClipping, StateSlot, Tensor};

fn renorm(clip: RenormClipping) -> BatchNormConfig {
    BatchNormConfig::default().with_renorm(true).with_renorm_clipping(clip)
}

type IsExpected = fn(&ConfigError) -> bool;

#[test]
fn invalid_configs_are_refused_like_keras() {
    let cases: Vec<(BatchNormConfig, IsExpected)> = vec![
        (
            renorm(RenormClipping {
                rmax: Some(0.5),
                rmin: Some(2.0),
                dmax: None,
            }),
            |e| matches!(e, ConfigError::RenormClippingOrder { .. }),
        ),
        (
            renorm(RenormClipping {
                rmax: None,
                rmin: None,
                dmax: Some(-1.0),
            }),
            |e| matches!(e, ConfigError::NegativeDmax(_)),
        ),
        (
            renorm(RenormClipping {
                rmax: Some(f32::NAN),
                rmin: None,
                dmax: None,
            }),
            |e| matches!(e, ConfigError::RenormClippingValue { .. }),
        ),
        (BatchNormConfig::default().with_epsilon(0.0), |e| {
            matches!(e, ConfigError::Epsilon(_))
        }),
        (BatchNormConfig::default().with_epsilon(-1e-3), |e| {
            matches!(e, ConfigError::Epsilon(_))
        }),
        (BatchNormConfig::default().with_epsilon(f32::NAN), |e| {
            matches!(e, ConfigError::Epsilon(_))
        }),
        (BatchNormConfig::default().with_momentum(1.5), |e| {
            matches!(e, ConfigError::Momentum(_))
        }),
        (BatchNormConfig::default().with_momentum(-0.1), |e| {
            matches!(e, ConfigError::Momentum(_))
        }),
        (
            BatchNormConfig::default().with_renorm(true).with_renorm_momentum(2.0),
            |e| matches!(e, ConfigError::RenormMomentum(_)),
        ),
    ];
    let ctx = gpu();
    for (config, expected) in cases {
        match BatchNorm::new(&ctx, config.clone(), 3) {
            Err(Error::Config(e)) => assert!(expected(&e), "{config:?}: {e}"),
            other => panic!("{config:?}: {other:?}"),
        }
        match ReferenceLayer::new(config.clone(), 3) {
            Err(Error::Config(e)) => assert!(expected(&e), "{config:?}: {e}"),
            other => panic!("{config:?}: {other:?}"),
        }
    }
    // renorm clipping is only checked when renorm is on, as in Keras
    let off = (renorm(RenormClipping {
        rmax: Some(0.5),
        rmin: Some(2.0),
        dmax: Some(-1.0),
    }))
    .with_renorm(false);
    assert!(BatchNorm::new(&ctx, off, 3).is_ok());
}

#[test]
fn axis_out_of_range_and_bad_ranks_are_typed_errors() {
    let ctx = gpu();
    for (axis, shape) in [(2i64, vec![4usize, 3]), (-3, vec![4, 3]), (1, vec![3])] {
        let config = BatchNormConfig::default().with_axis(axis);
        let layer = BatchNorm::new(&ctx, config.clone(), 3).unwrap();
        let x = Tensor::from_f32(&ctx, &shape, &vec![1.0; shape.iter().product()]).unwrap();
        assert!(
            matches!(
                layer.forward(&x, Some(true), None),
                Err(Error::Config(ConfigError::AxisOutOfRange { .. }))
            ),
            "axis {axis} shape {shape:?}"
        );
        let mut reference = ReferenceLayer::new(config, 3).unwrap();
        assert!(matches!(
            reference.forward(&vec![1.0; shape.iter().product()], &shape, Some(true), None),
            Err(Error::Config(ConfigError::AxisOutOfRange { .. }))
        ));
    }
    let nine = [1usize; 9];
    assert!(matches!(
        Tensor::from_f32(&ctx, &nine, &[1.0]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        BatchNormConfig::default().resolve_axis(9),
        Err(ConfigError::Rank(9))
    ));
    assert!(matches!(
        BatchNorm::new(&ctx, BatchNormConfig::default(), 0),
        Err(Error::Config(ConfigError::NoChannels))
    ));
    // more channels than a buffer holds: refused before any allocation
    for channels in [1usize << 40, usize::MAX] {
        assert!(matches!(
            BatchNorm::new(&ctx, BatchNormConfig::default(), channels),
            Err(Error::TooLarge { .. })
        ));
    }
}

#[test]
fn shape_mismatches_are_typed_errors_and_change_nothing() {
    let ctx = gpu();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    let before = layer.get_weights().unwrap();
    // wrong channel count
    let x = Tensor::from_f32(&ctx, &[2, 4], &[1.0; 8]).unwrap();
    assert!(matches!(layer.forward(&x, Some(true), None), Err(Error::Shape { .. })));
    // a mask of the wrong shape
    let x = Tensor::from_f32(&ctx, &[2, 5, 3], &common::random_input(&mut common::rng(3), 30, 0.0)).unwrap();
    for shape in [vec![2usize], vec![2, 3], vec![5, 2], vec![2, 5, 3]] {
        let n = shape.iter().product();
        let mask = Mask::from_u8(&ctx, &shape, &vec![1; n]).unwrap();
        assert!(
            matches!(layer.forward(&x, Some(true), Some(&mask)), Err(Error::Shape { .. })),
            "{shape:?}"
        );
    }
    assert_eq!(layer.get_weights().unwrap(), before);
    // tensors whose data does not fit their shape
    assert!(matches!(
        Tensor::from_f32(&ctx, &[2, 2], &[1.0; 3]),
        Err(Error::Shape { .. })
    ));
    // an empty batch is a tensor (a synchronized rank's slice), not an input of a plain layer
    let empty = Tensor::from_f32(&ctx, &[0, 3], &[]).unwrap();
    assert!(matches!(
        layer.forward(&empty, Some(true), None),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(layer.forward(&empty, None, None), Err(Error::Shape { .. })));
    // reading back copies out of the byte vector, whatever its alignment or length
    assert_eq!(empty.read_f32(&ctx).unwrap(), Vec::<f32>::new());
    let odd = [
        half::f16::from_f32(1.5),
        half::f16::from_f32(-2.0),
        half::f16::from_f32(0.25),
    ];
    let odd_tensor = Tensor::from_f16(&ctx, &[3, 1], &odd).unwrap();
    assert_eq!(odd_tensor.read_f16(&ctx).unwrap(), odd);
    assert_eq!(odd_tensor.read_f32(&ctx).unwrap(), vec![1.5, -2.0, 0.25]);
    assert!(matches!(Tensor::from_f32(&ctx, &[], &[1.0]), Err(Error::Shape { .. })));
    assert!(matches!(Mask::from_u8(&ctx, &[3], &[1, 0]), Err(Error::Shape { .. })));
    // a buffer too small for the shape it is said to hold
    let small = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    assert!(matches!(
        Tensor::from_buffer(&ctx, small, &[5], wgpu_batchnorm::DType::F32),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn weights_of_the_wrong_count_length_or_kind_are_refused() {
    let ctx = gpu();
    let config = BatchNormConfig::default().with_scale(false);
    let layer = BatchNorm::new(&ctx, config, 2).unwrap();
    let before = layer.get_weights().unwrap();
    assert_eq!(before.len(), 3, "beta, moving_mean, moving_variance");
    assert!(matches!(
        layer.set_weights(&vec![vec![0.0; 2]; 4]),
        Err(Error::Weights { .. })
    ));
    assert!(matches!(
        layer.set_weights(&[vec![0.0; 2], vec![0.0; 3], vec![1.0; 2]]),
        Err(Error::Weights { .. })
    ));
    assert!(matches!(
        layer.set_weight(StateSlot::Gamma, &[1.0, 1.0]),
        Err(Error::Weights { .. })
    ));
    assert!(matches!(
        layer.set_weight(StateSlot::RenormMean, &[1.0, 1.0]),
        Err(Error::Weights { .. })
    ));
    assert_eq!(
        layer.get_weights().unwrap(),
        before,
        "a refused set_weights changes nothing"
    );
    layer
        .set_weights(&[vec![0.5, 0.25], vec![1.0, 2.0], vec![3.0, 4.0]])
        .unwrap();
    assert_eq!(
        layer.get_weights().unwrap(),
        vec![vec![0.5, 0.25], vec![1.0, 2.0], vec![3.0, 4.0]]
    );
}

#[test]
fn no_matching_adapter_is_a_clear_error() {
    let selection = wgpu_batchnorm::AdapterSelection {
        backends: None,
        name: Some("no adapter is called this".into()),
        ..Default::default()
    };
    let err = wgpu_batchnorm::GpuContext::new(&selection).unwrap_err();
    assert!(matches!(err, Error::NoAdapter(_)));
    assert!(err.to_string().contains("mesa-vulkan-drivers"), "{err}");
}

/// Tensors, masks and gradients of another device (even one built alike)
/// are typed errors at the crate's boundary, never a wgpu panic or a
/// buffer read as this device's.
#[test]
fn objects_of_another_device_are_refused() {
    let ctx = gpu();
    let twin = wgpu_batchnorm::GpuContext::new(&wgpu_batchnorm::AdapterSelection::from_env()).unwrap();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 3).unwrap();
    let data = [1.0, 2.0, 3.0, 4.0, 6.0, 5.0];
    let x = Tensor::from_f32(&ctx, &[2, 3], &data).unwrap();
    let foreign = Tensor::from_f32(&twin, &[2, 3], &data).unwrap();
    let is_device = |r: Result<_, Error>| matches!(r, Err(Error::Device { .. }));
    assert!(is_device(layer.forward(&foreign, Some(true), None).map(drop)));
    let y_foreign = Tensor::from_f32(&twin, &[2, 3], &[0.0; 6]).unwrap();
    assert!(is_device(layer.forward_into(&x, None, None, &y_foreign).map(drop)));
    let mask = Mask::from_u8(&twin, &[2], &[1, 0]).unwrap();
    assert!(is_device(layer.forward(&x, Some(true), Some(&mask)).map(drop)));

    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
    assert!(is_device(layer.backward(&saved, &foreign, false).map(drop)));
    let mut grads = layer.gradient_tensors(&x).unwrap();
    grads.dx = y_foreign.clone();
    assert!(is_device(layer.backward_into(&saved, &x, false, &grads)));
    let mut grads = layer.gradient_tensors(&x).unwrap();
    grads.dgamma = Some(Tensor::from_f32(&twin, &[3], &[0.0; 3]).unwrap());
    assert!(is_device(layer.backward_into(&saved, &x, false, &grads)));
    let mut sgd = wgpu_batchnorm::Sgd::new(&layer, 0.1, 0.0, false).unwrap();
    assert!(is_device(sgd.step(&layer, &grads)));
    // a readback through another context
    assert!(is_device(x.read_f32(&twin).map(drop)));
    // nothing was left half-done: the layer still works
    let g = layer.backward(&saved, &x, false).unwrap();
    assert_eq!(g.dx.read_f32(&ctx).unwrap().len(), 6);
}

/// Application buffers without the usage their role needs: Error::Usage
/// naming the role, before wgpu sees them.
#[test]
fn buffer_roles_are_validated() {
    let ctx = gpu();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 4).unwrap();
    let buffer = |usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("application buffer"),
            size: 64,
            usage,
            mapped_at_creation: false,
        })
    };
    use wgpu::BufferUsages as U;
    assert!(matches!(
        Tensor::view_of(&ctx, buffer(U::COPY_DST), 0, &[4], wgpu_batchnorm::DType::F32),
        Err(Error::Usage { .. })
    ));
    let x = Tensor::from_f32(&ctx, &[2, 4], &[1.0, 2.0, 3.0, 4.0, 0.5, 0.0, 2.0, 1.0]).unwrap();
    let (_, saved) = layer.forward_saved(&x, Some(true), None).unwrap();
    let mut grads = layer.gradient_tensors(&x).unwrap();
    // dgamma without COPY_DST
    grads.dgamma = Some(
        Tensor::view_of(
            &ctx,
            buffer(U::STORAGE | U::COPY_SRC),
            0,
            &[4],
            wgpu_batchnorm::DType::F32,
        )
        .unwrap(),
    );
    assert!(matches!(
        layer.backward_into(&saved, &x, false, &grads),
        Err(Error::Usage { role: "dgamma", .. })
    ));
    // read back without COPY_SRC
    let no_src = Tensor::view_of(
        &ctx,
        buffer(U::STORAGE | U::COPY_DST),
        0,
        &[2, 4],
        wgpu_batchnorm::DType::F32,
    )
    .unwrap();
    assert!(matches!(no_src.read_f32(&ctx), Err(Error::Usage { .. })));
    // the output can be written and then not read: the forward itself works
    layer.forward_into(&x, None, None, &no_src).unwrap();
    // dx in dy's buffer
    let mut grads = layer.gradient_tensors(&x).unwrap();
    grads.dx = x.clone();
    assert!(matches!(
        layer.backward_into(&saved, &x, false, &grads),
        Err(Error::Aliasing { .. })
    ));
}

/// Shapes whose size overflows are refused in every build, never a
/// wrapped product or a debug-build panic.
#[test]
fn shapes_whose_size_overflows_are_refused() {
    let ctx = gpu();
    let huge = [usize::MAX, 2];
    let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    for shape in [&huge[..], &[1 << 32, 1 << 32][..], &[1 << 62, 2][..]] {
        assert!(matches!(
            Tensor::view_of(&ctx, buffer.clone(), 0, shape, wgpu_batchnorm::DType::F32),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(Mask::from_u8(&ctx, shape, &[1]), Err(Error::TooLarge { .. })));
    }
}

/// Keras's broadcastable masks: a (6, 1) mask for a (6, 11, 5) input is the
/// (6, 11) mask of whole rows; shapes that do not broadcast are refused.
#[test]
fn a_broadcastable_mask_spreads_over_the_input() {
    use wgpu_batchnorm::tensor::broadcast_mask;
    let ctx = common::gpu();
    let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 5).unwrap();
    let shape = [6usize, 11, 5];
    let x: Vec<f32> = (0..6 * 11 * 5).map(|i| ((i * 37) % 17) as f32 * 0.25).collect();
    let x = Tensor::from_f32(&ctx, &shape, &x).unwrap();
    let rows = [1u8, 0, 1, 1, 0, 1];
    let spread: Vec<u8> = rows.iter().flat_map(|&r| [r; 11]).collect();
    assert_eq!(broadcast_mask(&rows, &[6, 1], &[6, 11]).unwrap(), spread);
    // and along the other axis
    let cols: Vec<u8> = (0..11).map(|i| u8::from(i % 2 == 0)).collect();
    let by_col = broadcast_mask(&cols, &[1, 11], &[6, 11]).unwrap();
    assert_eq!(&by_col[11..22], &cols[..]);
    let broadcast = Mask::from_u8_broadcast(&ctx, &[6, 1], &rows, &shape).unwrap();
    let full = Mask::from_u8(&ctx, &[6, 11], &spread).unwrap();
    // fewer axes broadcast from the right: (11,) is every sample's same positions
    let per_position = Mask::from_u8_broadcast(&ctx, &[11], &cols, &shape).unwrap();
    let by_col_full = Mask::from_u8(&ctx, &[6, 11], &by_col).unwrap();
    let fresh = |m: &Mask| {
        let l = BatchNorm::new(&ctx, BatchNormConfig::default(), 5).unwrap();
        l.forward(&x, Some(true), Some(m)).unwrap().read_f32(&ctx).unwrap()
    };
    assert_eq!(fresh(&broadcast), fresh(&full));
    assert_eq!(fresh(&per_position), fresh(&by_col_full));
    assert_ne!(fresh(&broadcast), fresh(&by_col_full));
    for bad in [&[6usize, 2][..], &[3, 1], &[6], &[1, 6, 11], &[2, 6, 11]] {
        let n = bad.iter().product();
        assert!(
            matches!(
                Mask::from_u8_broadcast(&ctx, bad, &vec![1; n], &shape),
                Err(Error::Shape { .. })
            ),
            "{bad:?}"
        );
    }
    // a mask of the wrong shape given to the layer says how to spread one
    let small = Mask::from_u8(&ctx, &[6, 1], &rows).unwrap();
    let err = layer.forward(&x, Some(true), Some(&small)).unwrap_err();
    assert!(err.to_string().contains("from_u8_broadcast"), "{err}");
}
