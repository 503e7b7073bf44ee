//! Loads a BatchNormalization layer exported from Keras: its get_config()
//! JSON and its weights as safetensors with Keras's names (see
//! src/keras/weights.rs for the Python export snippet), then runs inference.
//!
//!     cargo run --release --example load_keras [CONFIG.json WEIGHTS.safetensors]

use std::path::PathBuf;

use wgpu_batchnorm::keras::{KerasLayerConfig, load_weights};
use wgpu_batchnorm::{BatchNorm, GpuContext, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras_export");
    let mut args = std::env::args().skip(1);
    let config_path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(fixtures.join("bn_config.json"));
    let weights_path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(fixtures.join("bn.safetensors"));

    let keras = KerasLayerConfig::from_json(&std::fs::read_to_string(&config_path)?)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let ctx = GpuContext::from_env()?;
    let channels = {
        // the weight file says how many features the layer was built for
        let bytes = std::fs::read(&weights_path)?;
        let file = safetensors::SafeTensors::deserialize(&bytes)?;
        file.tensor("moving_mean")?.shape()[0]
    };
    let layer = BatchNorm::new(&ctx, keras.config.clone(), channels)?;
    load_weights(&layer, &weights_path)?;
    println!(
        "{} on {}: {channels} channels, axis {}",
        keras.name.as_deref().unwrap_or("layer"),
        ctx.describe(),
        keras.config.axis
    );

    let x = Tensor::from_f32(
        &ctx,
        &[2, channels],
        &(0..2 * channels).map(|i| i as f32 * 0.5).collect::<Vec<_>>(),
    )?;
    println!("inference: {:?}", layer.forward(&x, None, None)?.read_f32(&ctx)?);
    println!("config back out: {}", keras.to_json().lines().count() > 1);
    Ok(())
}
