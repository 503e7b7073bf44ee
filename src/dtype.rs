//! The element types of tensors: part of the shared vocabulary, below the
//! device.

/// Element type of a tensor. Statistics are always computed in float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float.
    F32,
    /// Stored as packed pairs; works on every adapter (no `SHADER_F16`).
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    /// `v` as a tensor of this dtype holds it (float16 rounds to nearest,
    /// past 65504 to infinity).
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => half::f16::from_f32(v).to_f32(),
        }
    }

    /// The Keras name: `float32` or `float16`.
    pub fn keras_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
        }
    }

    /// The dtype of a Keras dtype name.
    pub fn from_keras_name(name: &str) -> Option<Self> {
        match name {
            "float32" => Some(DType::F32),
            "float16" => Some(DType::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.keras_name())
    }
}

/// Bytes a buffer needs for `len` elements: wgpu copies and bindings work
/// in multiples of 4 bytes.
pub(crate) fn padded_bytes(len: usize, dtype: DType) -> u64 {
    ((len * dtype.size()) as u64).div_ceil(4) * 4
}
