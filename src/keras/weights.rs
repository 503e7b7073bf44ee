//! The layer's weights as safetensors with Keras's weight names (`gamma`,
//! `beta`, `moving_mean`, `moving_variance`, and with renorm
//! `moving_stddev`, `renorm_mean`, `renorm_stddev`), float32, one axis each.
//!
//! A trained Keras layer exports to this format with:
//!
//! ```python
//! import numpy as np
//! from safetensors.numpy import save_file
//! layer = model.get_layer("batch_normalization")
//! save_file({w.name: np.asarray(w.numpy(), dtype=np.float32) for w in layer.weights},
//!           "batch_normalization.safetensors")
//! ```

#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::KerasLayerConfig;
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::layer::{BatchNorm, StateSlot};

#[cfg(not(target_arch = "wasm32"))]
fn file_error(path: &Path, error: Error) -> Error {
    let message = match error {
        Error::Weights { message, .. } => message,
        other => other.to_string(),
    };
    Error::File {
        path: path.to_path_buf(),
        message,
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Every weight the layer has under its Keras name, as safetensors bytes
/// (never blocks; see [`crate::Tensor::read_f32_async`]).
pub async fn weights_to_bytes_async(layer: &BatchNorm) -> Result<Vec<u8>> {
    safetensors_of(layer, layer.named_weights_async().await?)
}

/// Blocking form of [`weights_to_bytes_async`] (not on the web).
#[cfg(not(target_arch = "wasm32"))]
pub fn weights_to_bytes(layer: &BatchNorm) -> Result<Vec<u8>> {
    safetensors_of(layer, layer.named_weights()?)
}

fn safetensors_of(layer: &BatchNorm, weights: Vec<(StateSlot, Vec<f32>)>) -> Result<Vec<u8>> {
    let weights: Vec<(StateSlot, Vec<u8>)> = weights
        .into_iter()
        .map(|(slot, values)| (slot, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = weights
        .iter()
        .map(|(slot, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, vec![layer.channels()], bytes)
                .map(|view| (slot.keras_name().to_string(), view))
                .map_err(|e| Error::weights(None, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(|e| Error::weights(None, e.to_string()))
}

/// Writes every weight the layer has under its Keras name
/// ([`weights_to_bytes`] to a file).
#[cfg(not(target_arch = "wasm32"))]
pub fn save_weights(layer: &BatchNorm, path: &Path) -> Result<()> {
    let bytes = weights_to_bytes(layer).map_err(|e| file_error(path, e))?;
    std::fs::write(path, bytes).map_err(|e| io_error(path, e))
}

/// Reads a weight file (as [`save_weights`] or the Python snippet above
/// writes it) into the layer ([`load_weights_from_bytes`] of a file).
#[cfg(not(target_arch = "wasm32"))]
pub fn load_weights(layer: &BatchNorm, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    load_weights_from_bytes(layer, &bytes).map_err(|e| file_error(path, e))
}

/// Reads safetensors bytes (as [`weights_to_bytes`] or the Python snippet
/// above makes them) into the layer. Every weight the layer has must be
/// there, of its channel count; a name the layer does not know is an error
/// ([`Error::Weights`]). Nothing is written unless the whole file fits.
pub fn load_weights_from_bytes(layer: &BatchNorm, bytes: &[u8]) -> Result<()> {
    let bad = |message: String| Error::weights(None, message);
    let file = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let slots = layer.weight_slots();
    for name in file.names() {
        // Keras 3 may prefix a variable's path; its last part is the name
        let short = name.rsplit('/').next().unwrap_or(name);
        if !StateSlot::from_keras_name(short).is_some_and(|s| slots.contains(&s)) {
            return Err(bad(format!("tensor {name:?} is not a weight of this layer")));
        }
    }
    let mut values = Vec::new();
    for slot in slots {
        let view = file
            .names()
            .into_iter()
            .find(|n| n.rsplit('/').next() == Some(slot.keras_name()))
            .and_then(|n| file.tensor(n).ok())
            .ok_or_else(|| bad(format!("no {} tensor", slot.keras_name())))?;
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            other => return Err(bad(format!("{} is {other:?}, not float32", slot.keras_name()))),
        };
        if view.shape() != [layer.channels()] {
            return Err(bad(format!(
                "{} has shape {:?}, the layer has {} channels",
                slot.keras_name(),
                view.shape(),
                layer.channels()
            )));
        }
        values.push((slot, data));
    }
    for (slot, data) in values {
        layer.set_weight(slot, &data)?;
    }
    Ok(())
}

/// Builds a layer from Keras in one call: `config` is the layer's
/// `get_config()` JSON (or the `{"class_name": "BatchNormalization",
/// "config": ...}` form), `weights` its weight file (as [`save_weights`] or
/// the Python snippet above writes it). The channel count is read from the
/// weights; every weight is then loaded as [`load_weights`] does
/// ([`load_layer_from_bytes`] of two files).
///
/// The state is float32 whatever the config's dtype policy: for a Keras
/// layer of `dtype="float16"`'s rounding, set
/// [`crate::BatchNormConfig::state_precision`] on a config from
/// [`KerasLayerConfig`] and load the weights with [`load_weights`].
///
/// Not supported: a `.keras` archive (a zip of `config.json` and
/// `model.weights.h5`) holds a whole model and HDF5 weights, which would
/// need an HDF5 library; export the layer's weights to safetensors with
/// the snippet above and its `layer.get_config()` to JSON instead.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_layer(ctx: &GpuContext, config: &Path, weights: &Path) -> Result<BatchNorm> {
    let text = std::fs::read_to_string(config).map_err(|e| io_error(config, e))?;
    let keras = KerasLayerConfig::from_json(&text).map_err(|e| file_error(config, e))?;
    let bytes = std::fs::read(weights).map_err(|e| io_error(weights, e))?;
    let channels = weight_channels(&bytes).map_err(|e| file_error(weights, e))?;
    let layer = BatchNorm::new(ctx, keras.config, channels)?;
    load_weights_from_bytes(&layer, &bytes).map_err(|e| file_error(weights, e))?;
    Ok(layer)
}

/// [`load_layer`] from the config JSON's text and the weights' bytes (no
/// file system: the web, or files the application read itself).
pub fn load_layer_from_bytes(ctx: &GpuContext, config_json: &str, weights: &[u8]) -> Result<BatchNorm> {
    let keras = KerasLayerConfig::from_json(config_json)?;
    let layer = BatchNorm::new(ctx, keras.config, weight_channels(weights)?)?;
    load_weights_from_bytes(&layer, weights)?;
    Ok(layer)
}

/// The channel count of a weight file: the length of its `moving_mean`
/// (every Keras BatchNormalization has one).
fn weight_channels(bytes: &[u8]) -> Result<usize> {
    let bad = |message: String| Error::weights(None, message);
    let file = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let name = StateSlot::MovingMean.keras_name();
    let view = file
        .names()
        .into_iter()
        .find(|n| n.rsplit('/').next() == Some(name))
        .and_then(|n| file.tensor(n).ok())
        .ok_or_else(|| bad(format!("no {name} tensor: cannot tell the channel count")))?;
    match view.shape() {
        &[channels] if channels > 0 => Ok(channels),
        shape => Err(bad(format!("{name} has shape {shape:?}, not [channels]"))),
    }
}
