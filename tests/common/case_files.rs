//! Keras case files for tests that edit them (the library's and the
//! command-line tool's: `cli/tests` includes this file by path).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

/// A case file's tensors: key, dtype, shape, bytes.
pub type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// The public Keras cases, in the library's test fixtures.
pub fn keras_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("tests/fixtures/keras"))
        .find(|dir| dir.is_dir())
        .expect("tests/fixtures/keras in this package or the workspace above it")
}

/// A case file's `case` metadata, its whole metadata and its tensors.
pub fn read_case(path: &Path) -> (serde_json::Value, Tensors) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let case: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["case"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    (case, tensors)
}

/// Writes `path` with the `case` metadata and tensors.
pub fn write_case(path: &Path, case: &serde_json::Value, mut tensors: Tensors) {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("case".to_string(), case.to_string())]);
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}
