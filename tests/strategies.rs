//! Both kernel families on both adapters in one run: each shape family
//! (channels last of any width, runs of every kind, masks, float16,
//! chunked bindings) through forward and backward against the float64
//! reference, with the context's choice set explicitly. (scripts/test.sh
//! also runs the whole suite once per family.)

mod common;

use common::{compare_gradients, compare_with_reference, tolerance};
use wgpu_batchnorm::tuning::Op;
use wgpu_batchnorm::{
    AdapterSelection, BatchNormConfig, ChannelView, DType, GpuContext, KernelChoice, PlanTuning, Strategy,
};

fn context(backends: wgpu::Backends, choice: KernelChoice) -> GpuContext {
    let ctx = GpuContext::new(&AdapterSelection {
        backends: Some(backends),
        name: None,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}\nGPU tests never skip: install mesa-vulkan-drivers (scripts/test.sh does)"));
    ctx.set_kernel_choice(choice);
    ctx
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
        let config = BatchNormConfig {
            axis,
            ..Default::default()
        };
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
fn serial_kernels_on_vulkan() {
    sweep(&context(wgpu::Backends::VULKAN, KernelChoice::Serial), Strategy::Serial);
}

#[test]
fn coalesced_kernels_on_vulkan() {
    sweep(
        &context(wgpu::Backends::VULKAN, KernelChoice::Coalesced),
        Strategy::Coalesced,
    );
}

#[test]
fn serial_kernels_on_gl() {
    sweep(&context(wgpu::Backends::GL, KernelChoice::Serial), Strategy::Serial);
}

#[test]
fn coalesced_kernels_on_gl() {
    sweep(
        &context(wgpu::Backends::GL, KernelChoice::Coalesced),
        Strategy::Coalesced,
    );
}

/// The coalesced family with the smallest grids: every lane strides many
/// times (channel walks wrap), rows split into many column blocks.
fn small_grids(backends: wgpu::Backends) -> GpuContext {
    let ctx = context(backends, KernelChoice::Coalesced);
    let tuning = PlanTuning {
        reduce_invocations: 256,
        elementwise_invocations: 256,
        lane_width: 4,
        ..PlanTuning::default_for(Strategy::Coalesced)
    };
    ctx.set_plan_tuning(Some(tuning)).unwrap();
    ctx
}

#[test]
fn coalesced_kernels_with_small_grids_on_vulkan() {
    sweep(&small_grids(wgpu::Backends::VULKAN), Strategy::Coalesced);
}

#[test]
fn coalesced_kernels_with_small_grids_on_gl() {
    sweep(&small_grids(wgpu::Backends::GL), Strategy::Coalesced);
}

/// The serial family with every knob away from its default: long and
/// short elementwise invocations, few rows each, small reduce grids.
#[test]
fn serial_kernels_with_other_knobs() {
    for values_per_thread in [1, 8, 16] {
        let ctx = context(wgpu::Backends::VULKAN, KernelChoice::Serial);
        let tuning = PlanTuning {
            values_per_thread,
            rows_per_thread: 3,
            reduce_invocations: 256,
            uniform_parameters: Some(values_per_thread != 8),
            ..PlanTuning::default_for(Strategy::Serial)
        };
        ctx.set_plan_tuning(Some(tuning)).unwrap();
        sweep(&ctx, Strategy::Serial);
    }
}

/// Inputs cut into several bindings (chunks that start and end inside a
/// row of channels) with both families.
#[test]
fn both_families_in_chunked_bindings() {
    let backends = [wgpu::Backends::VULKAN, wgpu::Backends::GL];
    for (backends, choice) in backends
        .into_iter()
        .flat_map(|b| [(b, KernelChoice::Serial), (b, KernelChoice::Coalesced)])
    {
        let ctx = context(backends, choice);
        ctx.set_max_binding_size(4096);
        for (shape, axis, masked) in [
            (&[1001, 3][..], -1, true),
            (&[999, 12][..], -1, false),
            (&[30, 5, 17][..], 1, false),
            (&[7, 2, 400][..], 1, true),
        ] {
            let config = BatchNormConfig {
                axis,
                ..Default::default()
            };
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

/// lavapipe has subgroups, and the context asks for them: the coalesced
/// reductions' subgroup path runs on Vulkan here, the workgroup-memory
/// one on GL (which has none).
#[test]
fn the_subgroup_path_runs_on_lavapipe_and_not_on_gl() {
    let vulkan = context(wgpu::Backends::VULKAN, KernelChoice::Coalesced);
    if vulkan.describe().contains("llvmpipe") {
        assert!(vulkan.device().features().contains(wgpu::Features::SUBGROUP));
    }
    let gl = context(wgpu::Backends::GL, KernelChoice::Coalesced);
    assert!(!gl.device().features().contains(wgpu::Features::SUBGROUP));
}

/// `Auto` runs the device type's family: serial on a CPU adapter.
#[test]
fn auto_follows_the_device_type() {
    let ctx = context(wgpu::Backends::VULKAN, KernelChoice::Auto);
    let cpu = ctx.device().adapter_info().device_type == wgpu::DeviceType::Cpu;
    assert_eq!(ctx.default_strategy() == Strategy::Serial, cpu);
    let view = ChannelView::new(&[8, 4], 1);
    // the tuning cache may name a plan; its family is one of the two
    let tuning = ctx.plan_tuning(view, DType::F32, Op::Inference);
    tuning.validate().unwrap();
}
