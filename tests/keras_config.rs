//! Keras `get_config()` JSON in and out, with initializers, regularizers and
//! constraints under Keras's names.

use wgpu_batchnorm::keras::KerasLayerConfig;
use wgpu_batchnorm::{Constraint, Initializer, Regularizer, RenormClipping};

/// What Keras 3's `BatchNormalization(...).get_config()` returns, with
/// non-default objects in every slot.
const KERAS_CONFIG: &str = r#"{
  "name": "bn_7", "trainable": true,
  "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_float16"}, "registered_name": null},
  "axis": 1, "momentum": 0.9, "epsilon": 1e-05, "center": true, "scale": true,
  "beta_initializer": {"module": "keras.initializers", "class_name": "Constant", "config": {"value": 0.25}, "registered_name": null},
  "gamma_initializer": {"module": "keras.initializers", "class_name": "RandomNormal", "config": {"mean": 1.0, "stddev": 0.02, "seed": 42}, "registered_name": null},
  "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {}, "registered_name": null},
  "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {}, "registered_name": null},
  "beta_regularizer": {"module": "keras.regularizers", "class_name": "L1L2", "config": {"l1": 0.001, "l2": 0.002}, "registered_name": null},
  "gamma_regularizer": {"module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.01}, "registered_name": null},
  "beta_constraint": {"module": "keras.constraints", "class_name": "MinMaxNorm", "config": {"min_value": 0.0, "max_value": 1.0, "rate": 0.5, "axis": 0}, "registered_name": null},
  "gamma_constraint": {"module": "keras.constraints", "class_name": "NonNeg", "config": {}, "registered_name": null},
  "synchronized": false, "renorm": true, "renorm_clipping": {"rmax": 3.0, "rmin": 0.333, "dmax": 5.0}, "renorm_momentum": 0.99
}"#;

#[test]
fn a_keras_config_is_read_whole_and_written_back() {
    let parsed = KerasLayerConfig::from_json(KERAS_CONFIG).unwrap();
    let c = &parsed.config;
    assert_eq!(parsed.name.as_deref(), Some("bn_7"));
    assert_eq!((c.axis, c.momentum, c.epsilon), (1, 0.9, 1e-5));
    assert_eq!(c.beta_initializer, Initializer::Constant(0.25));
    assert_eq!(
        c.gamma_initializer,
        Initializer::RandomNormal {
            mean: 1.0,
            stddev: 0.02,
            seed: Some(42)
        }
    );
    assert_eq!(c.beta_regularizer, Some(Regularizer { l1: 0.001, l2: 0.002 }));
    assert_eq!(c.gamma_regularizer, Some(Regularizer { l1: 0.0, l2: 0.01 }));
    assert_eq!(
        c.beta_constraint,
        Some(Constraint::MinMaxNorm {
            min_value: 0.0,
            max_value: 1.0,
            rate: 0.5
        })
    );
    assert_eq!(c.gamma_constraint, Some(Constraint::NonNeg));
    assert_eq!(
        c.renorm_clipping,
        RenormClipping {
            rmax: Some(3.0),
            rmin: Some(0.333),
            dmax: Some(5.0)
        }
    );

    let written = parsed.to_value();
    let original: serde_json::Value = serde_json::from_str(KERAS_CONFIG).unwrap();
    let mut keys: Vec<_> = written.as_object().unwrap().keys().collect();
    let mut original_keys: Vec<_> = original.as_object().unwrap().keys().collect();
    keys.sort();
    original_keys.sort();
    assert_eq!(keys, original_keys, "the same keys as Keras writes");
    assert_eq!(written["dtype"], original["dtype"]);
    assert_eq!(written["gamma_initializer"], original["gamma_initializer"]);
    assert_eq!(KerasLayerConfig::from_value(&written).unwrap(), parsed);
}

#[test]
fn keras_string_identifiers_and_saved_model_form() {
    let json = r#"{"class_name": "BatchNormalization", "config": {
        "gamma_initializer": "ones", "beta_initializer": "zeros",
        "gamma_regularizer": "l1_l2", "beta_regularizer": "l2", "gamma_constraint": "non_neg"}}"#;
    let c = KerasLayerConfig::from_json(json).unwrap().config;
    assert_eq!(c.gamma_regularizer, Some(Regularizer { l1: 0.01, l2: 0.01 }));
    assert_eq!(c.beta_regularizer, Some(Regularizer { l1: 0.0, l2: 0.01 }));
    assert_eq!(c.gamma_constraint, Some(Constraint::NonNeg));
    // the L1L2 class itself defaults to zero factors
    let json = r#"{"gamma_regularizer": {"class_name": "L1L2", "config": {"l2": 0.1}}}"#;
    let c = KerasLayerConfig::from_json(json).unwrap().config;
    assert_eq!(c.gamma_regularizer, Some(Regularizer { l1: 0.0, l2: 0.1 }));
}

#[test]
fn unknown_or_invalid_entries_are_reported() {
    for (json, mentions) in [
        (r#"{"axis": -1, "virtual_batch_size": 4}"#, "virtual_batch_size"),
        (
            r#"{"gamma_initializer": {"class_name": "GlorotUniform", "config": {}}}"#,
            "GlorotUniform",
        ),
        (
            r#"{"gamma_initializer": {"class_name": "Constant", "config": {"value": 1, "shape": 3}}}"#,
            "shape",
        ),
        (
            r#"{"gamma_regularizer": {"class_name": "OrthogonalRegularizer", "config": {}}}"#,
            "OrthogonalRegularizer",
        ),
        (
            r#"{"gamma_constraint": {"class_name": "MaxNorm", "config": {"max_value": 2, "axis": 3}}}"#,
            "axis",
        ),
        (
            r#"{"renorm": true, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}"#,
            "rmax",
        ),
        (
            r#"{"renorm": true, "renorm_clipping": {"rmax": 1.0, "r_max": 2.0}}"#,
            "r_max",
        ),
        (r#"{"epsilon": 0}"#, "epsilon"),
        (
            r#"{"class_name": "LayerNormalization", "config": {}}"#,
            "LayerNormalization",
        ),
        (r#"[1, 2]"#, "object"),
        (r#"{"axis": "#, "JSON"),
    ] {
        let err = KerasLayerConfig::from_json(json).unwrap_err();
        assert!(
            matches!(err, wgpu_batchnorm::Error::KerasConfig { .. }),
            "{json}: {err}"
        );
        assert!(err.to_string().contains(mentions), "{json}: {err}");
    }
}
