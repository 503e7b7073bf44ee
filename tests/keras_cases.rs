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

/// A case whose masks are int32 (Keras takes integer masks) passes as its
/// boolean original does, on the GPU and the reference; a mask value
/// other than 0 and 1 (which Keras would use as a weight) is refused.
#[test]
fn integer_masks_in_a_case_file_pass() {
    use safetensors::{Dtype, SafeTensors};
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras/masked_sequence.safetensors");
    let bytes = std::fs::read(&source).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut masks = 0;
    for (key, view) in st.tensors() {
        if key.starts_with("mask.") {
            masks += 1;
            // 0/1 bytes as int32
            let wide: Vec<u8> = view.data().iter().flat_map(|&b| i32::from(b).to_le_bytes()).collect();
            owned.push((key, Dtype::I32, view.shape().to_vec(), wide));
        } else {
            owned.push((key, view.dtype(), view.shape().to_vec(), view.data().to_vec()));
        }
    }
    assert!(masks > 0, "the fixture has masks");
    let out = std::env::temp_dir().join(format!("wgpu-batchnorm-int-mask-{}.safetensors", std::process::id()));
    let write = |tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]| {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(k, d, s, b)| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(&out, safetensors::serialize(views, meta.metadata().clone()).unwrap()).unwrap();
    };
    write(&owned);
    let case = keras::KerasCase::load(&out).unwrap();
    for device in [Device::Cpu, Device::Gpu(common::gpu())] {
        let report = case.run(&device);
        assert!(report.passes(), "{report:?}");
    }
    // a 2 among the flags
    let twos: Vec<_> = owned
        .iter()
        .map(|(k, d, s, b)| {
            let mut b = b.clone();
            if k.starts_with("mask.") {
                b[..4].copy_from_slice(&2i32.to_le_bytes());
            }
            (k.clone(), *d, s.clone(), b)
        })
        .collect();
    write(&twos);
    let err = keras::KerasCase::load(&out).unwrap_err();
    std::fs::remove_file(&out).unwrap();
    assert!(err.to_string().contains("0/1"), "{err}");
}
