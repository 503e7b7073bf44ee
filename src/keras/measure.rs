//! The conformance measure and its tolerances (the Keras cases' README).

use crate::dtype::DType;

/// The conformance measure: max |got - truth| / max(1, max |truth|).
/// NaN anywhere counts as an infinite error.
pub fn error_measure(got: &[f64], truth: &[f64]) -> f64 {
    if got.len() != truth.len() {
        return f64::INFINITY;
    }
    let scale = truth.iter().fold(1.0f64, |m, t| m.max(t.abs()));
    got.iter().zip(truth).fold(0.0f64, |worst, (g, t)| {
        let e = (g - t).abs();
        if e.is_nan() { f64::INFINITY } else { worst.max(e) }
    }) / scale
}

/// Conformance tolerance for a case dtype and a kind of output.
pub fn tolerance(dtype: DType, gradient: bool) -> f64 {
    match (dtype, gradient) {
        (DType::F32, false) => 2e-5,
        (DType::F32, true) => 1e-4,
        (DType::F16, _) => 2e-3,
    }
}
