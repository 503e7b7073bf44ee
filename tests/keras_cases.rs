//! Every public Keras reference case, on the GPU (Vulkan and GL) and on the
//! float64 reference, within the conformance tolerances.

mod common;

use std::path::Path;

use wgpu_batchnorm::keras::{self, Device};

fn cases() -> Vec<keras::KerasCase> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras");
    let cases = keras::load_dir(&dir).expect("fixtures load");
    assert!(cases.len() >= 15, "expected the 15 public cases, found {}", cases.len());
    cases
}

fn assert_all_pass(device: Device) {
    let mut failures = Vec::new();
    for case in cases() {
        let report = case.run(&device);
        if !report.passes() {
            failures.push(format!("{report:?}"));
        }
        // every output the case can be checked on was checked
        assert!(report.keys.iter().any(|k| k.key == "y.0"), "{}", case.name);
    }
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
}

#[test]
fn cpu_reference_passes_every_case() {
    assert_all_pass(Device::Cpu);
}

#[test]
fn gpu_passes_every_case() {
    for ctx in common::vulkan() {
        assert_all_pass(Device::Gpu(ctx));
    }
}

// wgpu's GL backend is what Linux machines without Vulkan fall back to
// (Mesa's llvmpipe through EGL on a headless box); elsewhere it is not expected.
#[cfg(target_os = "linux")]
#[test]
fn gl_backend_passes_every_case() {
    let ctx = common::gl();
    assert_eq!(ctx.adapter_info().unwrap().backend, wgpu::Backend::Gl);
    assert_all_pass(Device::Gpu(ctx));
}

#[test]
fn gpu_passes_every_case_in_small_binding_chunks() {
    for ctx in common::fresh_vulkan() {
        // 1 KiB bindings: every case but the smallest spans several chunks
        ctx.set_max_binding_size(1024);
        assert_all_pass(Device::Gpu(ctx));
    }
}

#[test]
fn large_offset_beats_keras_own_float32() {
    let case = cases().into_iter().find(|c| c.name == "large_offset").unwrap();
    let report = case.run(&Device::Gpu(common::gpu()));
    let y0 = report.keys.iter().find(|k| k.key == "y.0").unwrap();
    // Keras's own float32 output misses by 4.3e-4 here
    assert!(y0.error < 2e-6, "{y0:?}");
}

/// Masks of any dtype as Keras takes them: it casts a mask to bool, so any
/// non-zero value (2, -3, 0.5, NaN, Inf) is in and 0 (or -0.0) is out, with
/// no weighting. The fixture's uint8 masks rewritten as int32 and float32
/// of such values pass against the same truth, on the GPU and the
/// reference.
#[test]
fn integer_and_float_masks_in_a_case_file_pass() {
    use common::case_files::{Tensors, keras_fixtures, read_case, write_case};
    use safetensors::Dtype;
    let (meta, tensors) = read_case(&keras_fixtures().join("masked_sequence.safetensors"));
    // every mask byte rewritten as `dtype` by `value(position, in)`
    let rewrite = |dtype: Dtype, value: &dyn Fn(usize, bool) -> Vec<u8>| -> Tensors {
        tensors
            .iter()
            .map(|(key, d, shape, data)| match key.starts_with("mask.") {
                true => {
                    let wide = data.iter().enumerate().flat_map(|(i, &b)| value(i, b != 0)).collect();
                    (key.clone(), dtype, shape.clone(), wide)
                }
                false => (key.clone(), *d, shape.clone(), data.clone()),
            })
            .collect()
    };
    let out = std::env::temp_dir().join(format!("wgpu-batchnorm-int-mask-{}.safetensors", std::process::id()));
    let ints = [1i32, 2, -3, i32::MAX];
    let floats = [1.0f32, 0.5, -2.0, f32::NAN, f32::INFINITY, 1e-30];
    let variants = [
        (
            "int32 0/1",
            rewrite(Dtype::I32, &|_, on| i32::from(on).to_le_bytes().to_vec()),
        ),
        (
            "int32 of any non-zero value",
            rewrite(Dtype::I32, &|i, on| {
                (if on { ints[i % ints.len()] } else { 0 }).to_le_bytes().to_vec()
            }),
        ),
        (
            "float32 of any non-zero value, NaN and Inf included",
            rewrite(Dtype::F32, &|i, on| {
                let off = if i % 2 == 0 { 0.0f32 } else { -0.0 };
                (if on { floats[i % floats.len()] } else { off }).to_le_bytes().to_vec()
            }),
        ),
    ];
    let mut masks = 0;
    for (what, tensors) in &variants {
        masks += tensors.iter().filter(|t| t.0.starts_with("mask.")).count();
        write_case(&out, &meta, tensors.clone());
        let case = keras::KerasCase::load(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(case.unsupported, None, "{what}");
        for device in [Device::Cpu, Device::Gpu(common::gpu())] {
            let report = case.run(&device);
            assert!(report.passes(), "{what}: {report:?}");
        }
    }
    std::fs::remove_file(&out).unwrap();
    assert!(masks > 0, "the fixture has masks");
}
