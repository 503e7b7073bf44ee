//! Loads a BatchNormalization layer exported from Keras: its get_config()
//! JSON and its weights as safetensors with Keras's names (see
//! src/keras/weights.rs for the Python export snippet), then runs inference.
//!
//!     cargo run --release --example load_keras [CONFIG.json WEIGHTS.safetensors]

use std::path::PathBuf;

use wgpu_batchnorm::keras::{KerasLayerConfig, load_layer};
use wgpu_batchnorm::{GpuContext, Tensor};

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

    let ctx = GpuContext::from_env()?;
    // one call: the config, then the weights (which give the channel count)
    let layer = load_layer(&ctx, &config_path, &weights_path)?;
    let keras = KerasLayerConfig::from_json(&std::fs::read_to_string(&config_path)?)?;
    let channels = layer.channels();
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
