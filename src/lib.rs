#![warn(missing_docs)]
// wgpu's WebGPU types are not Send on wasm32: the crate's shared handles
// (Arc) are then shared by one thread only, which is all the web has
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]
// The web build's docs name the native forms its async ones stand in for
// (blocking calls, file paths, LocalExchange): those links resolve natively.
#![cfg_attr(target_arch = "wasm32", allow(rustdoc::broken_intra_doc_links))]
//! Keras 3's `BatchNormalization` layer as wgpu compute kernels.
//!
//! ```
//! use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, Tensor};
//!
//! let ctx = GpuContext::from_env()?;
//! let layer = BatchNorm::new(&ctx, BatchNormConfig::default(), 4)?;
//! let x = Tensor::from_f32(&ctx, &[2, 4], &[1., 2., 3., 4., 5., 6., 7., 8.])?;
//! let y = layer.forward(&x, Some(true), None)?; // training: batch statistics
//! println!("{:?}", y.read_f32(&ctx)?);
//! # Ok::<(), wgpu_batchnorm::Error>(())
//! ```
//!
//! # Guide
//!
//! - **Context.** [`GpuContext::from_env`] opens the adapter chosen by
//!   `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` (or the best one);
//!   [`GpuContext::from_device`] wraps an application's device and queue.
//!   Layers of one context share its compiled kernels.
//! - **Layer.** [`BatchNorm::new`] takes a [`BatchNormConfig`] (every Keras
//!   argument) and the channel count. [`BatchNorm::forward`] is Keras's
//!   `layer(x, training=..., mask=...)`; [`BatchNorm::forward_saved`] also
//!   returns a [`SavedForward`], and [`BatchNorm::backward`] takes it and
//!   returns dx, dgamma and dbeta of that call; [`Sgd`] updates gamma and
//!   beta and applies the constraints, all on the GPU.
//! - **Your own encoder and buffers.** [`BatchNorm::record_forward`] and
//!   [`BatchNorm::record_backward`] record into a caller's
//!   `wgpu::CommandEncoder`; [`Tensor::view_of`] views a region of a
//!   caller's buffer. Outputs must be in another buffer than their inputs
//!   (a WebGPU rule).
//! - **Keras in and out.** [`keras::KerasLayerConfig`] reads and writes
//!   `get_config()` JSON; [`keras::load_weights`] / [`keras::save_weights`]
//!   read and write Keras's weight files with its names (natively), and
//!   [`keras::load_weights_from_bytes`] / [`keras::weights_to_bytes_async`]
//!   do without files; the `conform` command of the command-line tool runs
//!   Keras reference cases.
//! - **Threads.** [`BatchNorm`], [`GpuContext`] and [`Tensor`] are
//!   `Send + Sync` on native targets (not on wasm32, where wgpu's WebGPU
//!   types are not `Send`); each call's dispatches run together on the
//!   queue, and each backward reads the [`SavedForward`] of its own forward call.
//! - **Synchronized statistics** (Keras `synchronized=True`, PyTorch's
//!   SyncBatchNorm): [`BatchNorm::set_exchange`] makes a layer use the
//!   global batch's statistics across the ranks of an [`Exchange`]:
//!   [`LocalExchange`] among the devices (threads) of one process, an
//!   MPI one across processes and machines (feature `mpi`), or the
//!   application's own transport, over any group of ranks. Each call
//!   moves O(channels) bytes a rank whatever the rank count
//!   ([`sync::Scheme`]), and every rank gets the same bits. The float64
//!   reference's `forward_synchronized` / `backward_synchronized` give
//!   the same phases.
//! - **Numerics.** Statistics are float32 (float16 tensors too), shifted by
//!   a sample of each channel and merged with Chan's formula, so inputs far
//!   from zero keep their precision. Every kernel has a float64 mirror in
//!   [`mod@reference`], which the tests and the `conform` command compare
//!   against.
//! - **Performance.** Two kernel families ([`Strategy`]): `Serial`
//!   (each invocation walks its own run; for CPU adapters such as lavapipe)
//!   and `Coalesced` (neighbouring lanes on neighbouring words, grids that
//!   fill a GPU, workgroup or subgroup sums; for GPUs). `Auto` picks by
//!   device type, or the plan `bench --tune` measured for the input's
//!   shape class ([`tuning`]); [`GpuContext::set_kernel_choice`] and
//!   `WGPU_BATCHNORM_KERNELS` override it. Each call picks vec4 kernels
//!   by layout (channels last, `inner % 4 == 0`, runs of 16 or more),
//!   float16 included, and scalar kernels elsewhere; a mask per row keeps
//!   the channels-last ones. On CPU adapters per-channel parameters are
//!   read through a uniform binding ([`GpuContext::set_uniform_parameters`]).
//!   The `bench` command and `benches/NOTES.md` give the figures.

/// The command-line tool's benchmark runner (feature `bench`, which the
/// tool enables): not part of the library's API, and not stable. It stays
/// in the library because it times the crate's own kernels (the streaming
/// baseline shares their uniform block).
#[cfg(feature = "bench")]
#[doc(hidden)]
pub mod bench;
pub mod config;
pub mod context;
pub(crate) mod device;
pub(crate) mod dtype;
pub mod error;
pub mod guide;
pub mod keras;
pub(crate) mod kernels;
pub mod layer;
pub mod optimizer;
pub(crate) mod params;
pub(crate) mod plan;
pub mod reference;
pub mod sync;
pub mod tensor;
pub mod tuning;
pub(crate) mod variants;

#[cfg(all(feature = "mpi", target_arch = "wasm32"))]
compile_error!("the mpi feature (MpiExchange) needs MPI processes: it does not build for the web (wasm32)");

pub use config::{
    BatchNormConfig, ChannelView, Constraint, Initializer, Regularizer, RenormClipping, RunningStatistics,
    StatePrecision,
};
#[cfg(not(target_arch = "wasm32"))]
pub use context::list_adapters;
pub use context::{AdapterReport, AdapterSelection, GpuContext, list_adapters_async};
pub use dtype::DType;
pub use error::{ConfigError, Error, ExchangeFailure, Result};
pub use layer::{BatchNorm, Gradients, SavedForward, StateSlot};
pub use optimizer::Sgd;
pub use sync::Exchange;
#[cfg(not(target_arch = "wasm32"))]
pub use sync::LocalExchange;
#[cfg(all(feature = "mpi", not(target_arch = "wasm32")))]
pub use sync::MpiExchange;
pub use tensor::{Mask, Tensor};
pub use tuning::{KernelChoice, PlanTuning, Strategy};

/// This crate's version, as `bench --json` files record it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The README's example compiles as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
