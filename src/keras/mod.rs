//! Keras in and out: reference case files and conformance (`cases`), and
//! `get_config()` JSON for the layer and its initializers, regularizers and
//! constraints (`config`), and weight files with Keras's names (`weights`).

pub mod cases;
pub mod config;
pub mod weights;

pub use cases::{
    Call, CaseReport, CaseTensor, Device, KerasCase, KeyError, Output, error_measure, load_dir, tolerance,
    write_outputs, write_outputs_as,
};
pub use config::{KerasLayerConfig, config_from_case_json};
pub use weights::{
    load_layer, load_layer_from_bytes, load_weights, load_weights_from_bytes, save_weights, weights_to_bytes,
};
