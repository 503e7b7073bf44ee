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
//! Every kernel has a float64 mirror in [`reference`], which the tests and
//! the `conform` command compare against.

pub mod bench;
pub mod config;
pub mod context;
pub mod error;
pub mod keras;
pub(crate) mod kernels;
pub mod layer;
pub mod optimizer;
pub(crate) mod plan;
pub mod reference;
pub mod tensor;

pub use config::{
    BatchNormConfig, ChannelView, Constraint, Initializer, Regularizer, RenormClipping, RunningStatistics,
};
pub use context::{AdapterReport, AdapterSelection, GpuContext, list_adapters};
pub use error::{ConfigError, Error, Result};
pub use layer::{BatchNorm, Gradients, StateSlot};
pub use optimizer::Sgd;
pub use tensor::{DType, Mask, Tensor};

/// The README's example compiles as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
