//! The public Keras cases, embedded: the browser has no file system.

use wgpu_batchnorm::keras::KerasCase;

macro_rules! cases {
    ($($name:literal),* $(,)?) => {
        /// (file name, bytes) of every public case.
        pub const FILES: &[(&str, &[u8])] = &[
            $(($name, include_bytes!(concat!("../../tests/fixtures/keras/", $name, ".safetensors")))),*
        ];
    };
}

cases!(
    "dense_default",
    "float16_policy",
    "frozen_trainable_false",
    "inference_only",
    "large_offset",
    "many_channels",
    "masked_sequence",
    "nchw_axis1",
    "nhwc_three_steps",
    "no_center_no_scale",
    "one_channel_long",
    "rank5_middle_axis",
    "renorm_clipped",
    "single_sample",
    "training_none_is_inference",
);

/// Every public case, parsed.
pub fn public_cases() -> Vec<KerasCase> {
    FILES
        .iter()
        .map(|(name, bytes)| {
            KerasCase::parse(std::path::Path::new(&format!("{name}.safetensors")), bytes)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        })
        .collect()
}
