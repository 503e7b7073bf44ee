//! Both kernel families on every driver in one run (each Vulkan driver:
//! lavapipe and SwiftShader under scripts/test.sh, then GL): each shape
//! family (channels last of any width, runs of every kind, masks, float16,
//! chunked bindings) through forward and backward against the float64
//! reference, with the context's choice set explicitly. (scripts/test.sh
//! also runs the whole suite once per family.)

mod common;

use common::{compare_gradients, compare_with_reference, tolerance};
use wgpu_batchnorm::tuning::Op;
use wgpu_batchnorm::{BatchNormConfig, ChannelView, DType, GpuContext, KernelChoice, PlanTuning, Strategy};

/// A private context with `choice` on every driver.
fn contexts(choice: KernelChoice) -> Vec<GpuContext> {
    let mut ctxs = common::fresh_vulkan();
    ctxs.push(common::fresh(wgpu::Backends::GL, None));
    for ctx in &ctxs {
        ctx.set_kernel_choice(choice);
    }
    ctxs
}

/// (shape, axis, masked): 1, primes, rows narrower and wider than a
/// workgroup, channels % 4 and % 8, inner % 4 and % 16, runs of 16+ not a
/// multiple of 4, runs longer than a workgroup tile, masks per row and per
/// element.
const CASES: &[(&[usize], i64, bool)] = &[
    (&[1, 1], -1, false),
    (&[7, 3], -1, false),
    (&[7, 3], -1, true),
    (&[517, 12], -1, true),
    (&[300, 64], -1, false),
    (&[5, 7, 11], -1, true),
    (&[61, 1031], -1, false),
    (&[5, 13, 9], 1, false),
    (&[5, 13, 9], 1, true),
    (&[3, 8, 16], 1, false),
    (&[3, 4, 12], 1, false),
    (&[2, 6, 49], 1, false),
    (&[2, 6, 49], 1, true),
    (&[4, 3, 1001], 1, false),
    (&[2, 2, 70001], 1, false),
];

fn sweep(ctx: &GpuContext, strategy: Strategy) {
    for (i, &(shape, axis, masked)) in CASES.iter().enumerate() {
        let config = BatchNormConfig::default().with_axis(axis);
        let view = ChannelView::new(shape, config.resolve_axis(shape.len()).unwrap());
        for dtype in [DType::F32, DType::F16] {
            for op in Op::ALL {
                assert_eq!(ctx.plan_tuning(view, dtype, op).strategy, strategy);
            }
            let what = format!(
                "{} {strategy} {shape:?} axis {axis} {dtype} masked {masked}",
                ctx.describe()
            );
            let calls = [(Some(true), masked), (None, false), (Some(true), masked)];
            let out = compare_with_reference(ctx, &config, shape, dtype, &calls, 100 + i as u64);
            assert!(out.y_error <= tolerance(dtype), "{what}: y {:.2e}", out.y_error);
            assert!(
                out.state_error <= tolerance(dtype),
                "{what}: state {:.2e}",
                out.state_error
            );
            for training in [Some(true), None] {
                let err = compare_gradients(ctx, &config, shape, dtype, training, masked, 200 + i as u64);
                assert!(
                    err <= wgpu_batchnorm::keras::tolerance(dtype, true),
                    "{what} training {training:?}: gradients {err:.2e}"
                );
            }
        }
    }
}

#[test]
fn serial_kernels_on_every_driver() {
    for ctx in contexts(KernelChoice::Serial) {
        sweep(&ctx, Strategy::Serial);
    }
}

#[test]
fn coalesced_kernels_on_every_driver() {
    for ctx in contexts(KernelChoice::Coalesced) {
        sweep(&ctx, Strategy::Coalesced);
    }
}

/// The coalesced family with the smallest grids: every lane strides many
/// times (channel walks wrap), rows split into many column blocks.
#[test]
fn coalesced_kernels_with_small_grids_on_every_driver() {
    let tuning = PlanTuning::default_for(Strategy::Coalesced)
        .with_reduce_invocations(256)
        .with_elementwise_invocations(256)
        .with_lane_width(4);
    for ctx in contexts(KernelChoice::Coalesced) {
        ctx.set_plan_tuning(Some(tuning)).unwrap();
        sweep(&ctx, Strategy::Coalesced);
    }
}

/// The serial family with every knob away from its default: long and
/// short elementwise invocations, few rows each, small reduce grids, on
/// every driver.
#[test]
fn serial_kernels_with_other_knobs() {
    for ctx in contexts(KernelChoice::Serial) {
        for values_per_thread in [1, 8, 16] {
            let tuning = PlanTuning::default_for(Strategy::Serial)
                .with_values_per_thread(values_per_thread)
                .with_rows_per_thread(3)
                .with_reduce_invocations(256)
                .with_uniform_parameters(Some(values_per_thread != 8));
            ctx.set_plan_tuning(Some(tuning)).unwrap();
            sweep(&ctx, Strategy::Serial);
        }
    }
}

/// Inputs cut into several bindings (chunks that start and end inside a
/// row of channels) with both families.
#[test]
fn both_families_in_chunked_bindings() {
    for choice in [KernelChoice::Serial, KernelChoice::Coalesced] {
        for ctx in contexts(choice) {
            ctx.set_max_binding_size(4096);
            for (shape, axis, masked) in [
                (&[1001, 3][..], -1, true),
                (&[999, 12][..], -1, false),
                (&[30, 5, 17][..], 1, false),
                (&[7, 2, 400][..], 1, true),
            ] {
                let config = BatchNormConfig::default().with_axis(axis);
                for dtype in [DType::F32, DType::F16] {
                    let what = format!("{} {choice:?} {shape:?} {dtype} masked {masked}", ctx.describe());
                    let out =
                        compare_with_reference(&ctx, &config, shape, dtype, &[(Some(true), masked), (None, false)], 7);
                    assert!(out.y_error <= tolerance(dtype), "{what}: y {:.2e}", out.y_error);
                    assert!(
                        out.state_error <= tolerance(dtype),
                        "{what}: state {:.2e}",
                        out.state_error
                    );
                    let err = compare_gradients(&ctx, &config, shape, dtype, Some(true), masked, 8);
                    assert!(
                        err <= wgpu_batchnorm::keras::tolerance(dtype, true),
                        "{what}: gradients {err:.2e}"
                    );
                }
            }
        }
    }
}

/// The suite runs on two Vulkan drivers (scripts/test.sh makes
/// SwiftShader visible beside lavapipe, or a GPU's driver is there), and
/// the coalesced reductions' subgroup path runs with two subgroup sizes or
/// more (lavapipe 8, SwiftShader 4); GL has no subgroups and runs the
/// workgroup-memory path.
#[test]
fn two_vulkan_drivers_and_two_subgroup_sizes() {
    let names = common::vulkan_adapters();
    assert!(
        names.len() >= 2,
        "the GPU tests run on every Vulkan driver and need two, found {names:?}: run scripts/test.sh, or install \
         chromium (its SwiftShader driver) and set VK_ADD_DRIVER_FILES=/usr/lib/chromium/vk_swiftshader_icd.json"
    );
    let mut sizes: Vec<u32> = common::vulkan()
        .iter()
        .filter(|ctx| ctx.device().features().contains(wgpu::Features::SUBGROUP))
        .flat_map(|ctx| {
            let info = ctx.adapter_info().unwrap();
            [info.subgroup_min_size, info.subgroup_max_size]
        })
        .collect();
    sizes.sort();
    sizes.dedup();
    assert!(sizes.len() >= 2, "subgroup sizes {sizes:?} on {names:?}");
    let gl = common::gl();
    assert!(!gl.device().features().contains(wgpu::Features::SUBGROUP));
}

/// `Auto` runs the device type's family: serial on a CPU adapter.
#[test]
fn auto_follows_the_device_type() {
    let ctx = common::fresh(wgpu::Backends::VULKAN, None);
    ctx.set_kernel_choice(KernelChoice::Auto);
    let cpu = ctx.device().adapter_info().device_type == wgpu::DeviceType::Cpu;
    assert_eq!(ctx.default_strategy() == Strategy::Serial, cpu);
    let view = ChannelView::new(&[8, 4], 1);
    // the tuning cache may name a plan; its family is one of the two
    let tuning = ctx.plan_tuning(view, DType::F32, Op::Inference);
    tuning.validate().unwrap();
}
