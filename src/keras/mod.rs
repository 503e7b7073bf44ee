//! Keras in and out: `get_config()` JSON for the layer and its initializers, regularizers and
//! constraints (`config`), and weight files with Keras's names (`weights`).

/// The conformance harness of the command-line tool's `conform` (feature
/// `conformance`, which the tool enables): not part of the library's API.
#[cfg(feature = "conformance")]
#[doc(hidden)]
pub mod cases;
pub mod config;
mod measure;
pub mod weights;

#[cfg(feature = "conformance")]
#[doc(hidden)]
pub use cases::{
    Call, CaseReport, CaseTensor, Device, KerasCase, KeyError, Output, load_dir, write_outputs, write_outputs_as,
};
pub use config::KerasLayerConfig;
#[cfg(feature = "conformance")]
#[doc(hidden)]
pub use config::config_from_case_json;
pub use measure::{error_measure, tolerance};
#[cfg(not(target_arch = "wasm32"))]
pub use weights::{load_layer, load_weights, save_weights, weights_to_bytes};
pub use weights::{load_layer_from_bytes, load_weights_from_bytes, weights_to_bytes_async};
