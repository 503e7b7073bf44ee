//! Keras `get_config()` JSON: the layer's whole config object, and the
//! serialized initializers, regularizers and constraints inside it. Unknown
//! keys and classes are errors, never ignored.

use serde_json::{Map, Value, json};

use crate::config::{BatchNormConfig, Constraint, Initializer, Regularizer, RenormClipping};
use crate::error::{ConfigError, Error, Result};

type Parsed<T> = std::result::Result<T, String>;

/// A `BatchNormalization` layer's `get_config()`: the layer's name and
/// dtype policy (kept as given, for the round trip) and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct KerasLayerConfig {
    /// The layer's Keras name.
    pub name: Option<String>,
    /// The dtype policy, as Keras wrote it.
    pub dtype: Option<Value>,
    /// The layer's arguments.
    pub config: BatchNormConfig,
}

impl KerasLayerConfig {
    /// Parses `layer.get_config()` JSON, or the `{"class_name":
    /// "BatchNormalization", "config": {...}}` form Keras saves models in.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::KerasConfig {
            message: format!("not JSON: {e}"),
        })?;
        Self::from_value(&value)
    }

    /// [`KerasLayerConfig::from_json`] on parsed JSON.
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(value).map_err(|message| Error::KerasConfig { message })
    }

    fn parse(value: &Value) -> Parsed<Self> {
        let obj = value.as_object().ok_or("the layer config is not a JSON object")?;
        if let Some(class) = obj.get("class_name") {
            if class != "BatchNormalization" {
                return Err(format!("class_name {class} is not BatchNormalization"));
            }
            return Self::parse(obj.get("config").ok_or("no `config` beside class_name")?);
        }
        let mut config = BatchNormConfig::default();
        let mut name = None;
        let mut dtype = None;
        let mut unknown = Vec::new();
        for (key, v) in obj {
            match key.as_str() {
                "name" => name = Some(v.as_str().ok_or("name is not a string")?.to_string()),
                "dtype" => dtype = Some(v.clone()),
                "trainable" => config.trainable = boolean(v, key)?,
                "activity_regularizer" if v.is_null() => {}
                _ => {
                    if !set_layer_field(&mut config, key, v)? {
                        unknown.push(key.clone());
                    }
                }
            }
        }
        if !unknown.is_empty() {
            return Err(format!(
                "unknown BatchNormalization config keys: {}",
                unknown.join(", ")
            ));
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(KerasLayerConfig { name, dtype, config })
    }

    /// The same JSON Keras's `get_config()` produces.
    pub fn to_value(&self) -> Value {
        let c = &self.config;
        let clip = c.renorm_clipping;
        let clipping = if clip == RenormClipping::default() {
            Value::Null
        } else {
            let mut m = Map::new();
            for (k, v) in [("rmax", clip.rmax), ("rmin", clip.rmin), ("dmax", clip.dmax)] {
                if let Some(v) = v {
                    m.insert(k.into(), decimal(v));
                }
            }
            Value::Object(m)
        };
        json!({
            "name": self.name.clone().unwrap_or_else(|| "batch_normalization".into()),
            "trainable": c.trainable,
            "dtype": self.dtype.clone().unwrap_or_else(|| json!({
                "module": "keras", "class_name": "DTypePolicy",
                "config": {"name": "float32"}, "registered_name": null
            })),
            "axis": c.axis,
            "momentum": decimal(c.momentum),
            "epsilon": decimal(c.epsilon),
            "center": c.center,
            "scale": c.scale,
            "beta_initializer": initializer_to_json(c.beta_initializer),
            "gamma_initializer": initializer_to_json(c.gamma_initializer),
            "moving_mean_initializer": initializer_to_json(c.moving_mean_initializer),
            "moving_variance_initializer": initializer_to_json(c.moving_variance_initializer),
            "beta_regularizer": c.beta_regularizer.map(regularizer_to_json),
            "gamma_regularizer": c.gamma_regularizer.map(regularizer_to_json),
            "beta_constraint": c.beta_constraint.map(constraint_to_json),
            "gamma_constraint": c.gamma_constraint.map(constraint_to_json),
            "synchronized": c.synchronized,
            "renorm": c.renorm,
            "renorm_clipping": clipping,
            "renorm_momentum": decimal(c.renorm_momentum),
        })
    }

    /// [`KerasLayerConfig::to_value`] as pretty-printed JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_value()).expect("JSON values serialize")
    }
}

/// Builds a config from a reference case's `config` object (a subset of
/// `get_config()`); the case gives `trainable` beside it. The conformance
/// harness's (feature `conformance`).
#[cfg(feature = "conformance")]
#[doc(hidden)]
pub fn config_from_case_json(config: &Value, trainable: bool) -> Result<BatchNormConfig> {
    case_config(config, trainable).map_err(|message| Error::KerasConfig { message })
}

#[cfg(feature = "conformance")]
fn case_config(config: &Value, trainable: bool) -> Parsed<BatchNormConfig> {
    let obj = config.as_object().ok_or("config is not an object")?;
    let mut cfg = BatchNormConfig {
        trainable,
        ..Default::default()
    };
    for (key, v) in obj {
        if !set_layer_field(&mut cfg, key, v)? {
            return Err(format!("unsupported config key {key:?}"));
        }
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn number(v: &Value, key: &str) -> Parsed<f32> {
    v.as_f64().map(|x| x as f32).ok_or(format!("{key} is not a number"))
}

fn boolean(v: &Value, key: &str) -> Parsed<bool> {
    v.as_bool().ok_or(format!("{key} is not a boolean"))
}

/// Sets one of the layer's own arguments; `false` for a key it does not know.
fn set_layer_field(c: &mut BatchNormConfig, key: &str, v: &Value) -> Parsed<bool> {
    match key {
        "axis" => {
            c.axis = match v {
                Value::Array(a) if a.len() == 1 => a[0].as_i64(),
                _ => v.as_i64(),
            }
            .ok_or("axis is not an integer (several axes are not supported)")?
        }
        "momentum" => c.momentum = number(v, key)?,
        "epsilon" => c.epsilon = number(v, key)?,
        "center" => c.center = boolean(v, key)?,
        "scale" => c.scale = boolean(v, key)?,
        "renorm" => c.renorm = boolean(v, key)?,
        "renorm_momentum" => c.renorm_momentum = number(v, key)?,
        "renorm_clipping" => c.renorm_clipping = renorm_clipping(v)?,
        "beta_initializer" => c.beta_initializer = initializer_from_json(v)?,
        "gamma_initializer" => c.gamma_initializer = initializer_from_json(v)?,
        "moving_mean_initializer" => c.moving_mean_initializer = initializer_from_json(v)?,
        "moving_variance_initializer" => c.moving_variance_initializer = initializer_from_json(v)?,
        "beta_regularizer" => c.beta_regularizer = optional(v, regularizer_from_json)?,
        "gamma_regularizer" => c.gamma_regularizer = optional(v, regularizer_from_json)?,
        "beta_constraint" => c.beta_constraint = optional(v, constraint_from_json)?,
        "gamma_constraint" => c.gamma_constraint = optional(v, constraint_from_json)?,
        "synchronized" => c.synchronized = boolean(v, key)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn optional<T>(v: &Value, parse: fn(&Value) -> Parsed<T>) -> Parsed<Option<T>> {
    if v.is_null() { Ok(None) } else { parse(v).map(Some) }
}

fn renorm_clipping(v: &Value) -> Parsed<RenormClipping> {
    if v.is_null() {
        return Ok(RenormClipping::default());
    }
    let obj = v.as_object().ok_or("renorm_clipping is not an object")?;
    let unknown: Vec<String> = obj
        .keys()
        .filter(|k| !["rmax", "rmin", "dmax"].contains(&k.as_str()))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(ConfigError::RenormClippingKeys(unknown).to_string());
    }
    let get = |k: &str| -> Parsed<Option<f32>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => number(v, &format!("renorm_clipping.{k}")).map(Some),
        }
    };
    Ok(RenormClipping {
        rmax: get("rmax")?,
        rmin: get("rmin")?,
        dmax: get("dmax")?,
    })
}

/// A serialized Keras object: a bare identifier string or
/// `{"class_name": ..., "config": {...}}`. Returns the class and its config.
fn class_and_config<'a>(v: &'a Value, what: &str) -> Parsed<(String, Option<&'a Map<String, Value>>)> {
    match v {
        Value::String(s) => Ok((s.clone(), None)),
        Value::Object(o) => {
            let class = o
                .get("class_name")
                .and_then(Value::as_str)
                .ok_or(format!("{what} has no class_name"))?;
            let config = match o.get("config") {
                None | Some(Value::Null) => None,
                Some(Value::Object(m)) => Some(m),
                Some(_) => return Err(format!("{what} config is not an object")),
            };
            Ok((class.to_string(), config))
        }
        _ => Err(format!("{what} is neither a string nor an object")),
    }
}

/// Reads the named arguments of a Keras class, refusing unknown ones.
fn arguments(config: Option<&Map<String, Value>>, class: &str, allowed: &[&str]) -> Parsed<Map<String, Value>> {
    let map = config.cloned().unwrap_or_default();
    let unknown: Vec<&String> = map.keys().filter(|k| !allowed.contains(&k.as_str())).collect();
    if !unknown.is_empty() {
        return Err(format!("{class}: unknown arguments {unknown:?}"));
    }
    Ok(map)
}

fn argument(map: &Map<String, Value>, key: &str, default: f32) -> Parsed<f32> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => number(v, key),
    }
}

fn seed(map: &Map<String, Value>) -> Parsed<Option<u64>> {
    match map.get("seed") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or("seed is not a non-negative integer".into()),
    }
}

/// Keras initializer JSON (`"zeros"`, `{"class_name": "RandomNormal", ...}`).
pub(crate) fn initializer_from_json(v: &Value) -> Parsed<Initializer> {
    let (class, config) = class_and_config(v, "initializer")?;
    Ok(match class.as_str() {
        "Zeros" | "zeros" => {
            arguments(config, &class, &[])?;
            Initializer::Zeros
        }
        "Ones" | "ones" => {
            arguments(config, &class, &[])?;
            Initializer::Ones
        }
        "Constant" | "constant" => {
            let a = arguments(config, &class, &["value"])?;
            Initializer::Constant(argument(&a, "value", 0.0)?)
        }
        "RandomNormal" | "random_normal" => {
            let a = arguments(config, &class, &["mean", "stddev", "seed"])?;
            Initializer::RandomNormal {
                mean: argument(&a, "mean", 0.0)?,
                stddev: argument(&a, "stddev", 0.05)?,
                seed: seed(&a)?,
            }
        }
        "RandomUniform" | "random_uniform" => {
            let a = arguments(config, &class, &["minval", "maxval", "seed"])?;
            Initializer::RandomUniform {
                minval: argument(&a, "minval", -0.05)?,
                maxval: argument(&a, "maxval", 0.05)?,
                seed: seed(&a)?,
            }
        }
        "TruncatedNormal" | "truncated_normal" => {
            let a = arguments(config, &class, &["mean", "stddev", "seed"])?;
            Initializer::TruncatedNormal {
                mean: argument(&a, "mean", 0.0)?,
                stddev: argument(&a, "stddev", 0.05)?,
                seed: seed(&a)?,
            }
        }
        other => return Err(format!("initializer {other} is not supported")),
    })
}

/// A float32 written as the shortest decimal that reads back to it (0.02,
/// not 0.019999999552965164), as Keras's float64 config holds it.
fn decimal(v: f32) -> Value {
    v.to_string().parse::<f64>().map(Value::from).unwrap_or(Value::Null)
}

fn keras_object(module: &str, class: &str, config: Value) -> Value {
    json!({"module": module, "class_name": class, "config": config, "registered_name": null})
}

/// Keras's serialized form of an initializer.
pub(crate) fn initializer_to_json(i: Initializer) -> Value {
    let (class, config) = match i {
        Initializer::Zeros => ("Zeros", json!({})),
        Initializer::Ones => ("Ones", json!({})),
        Initializer::Constant(value) => ("Constant", json!({"value": decimal(value)})),
        Initializer::RandomNormal { mean, stddev, seed } => (
            "RandomNormal",
            json!({"mean": decimal(mean), "stddev": decimal(stddev), "seed": seed}),
        ),
        Initializer::RandomUniform { minval, maxval, seed } => (
            "RandomUniform",
            json!({"minval": decimal(minval), "maxval": decimal(maxval), "seed": seed}),
        ),
        Initializer::TruncatedNormal { mean, stddev, seed } => (
            "TruncatedNormal",
            json!({"mean": decimal(mean), "stddev": decimal(stddev), "seed": seed}),
        ),
    };
    keras_object("keras.initializers", class, config)
}

/// Keras regularizer JSON: `"l1"`, `"l2"`, `"l1_l2"` (factors 0.01) or
/// `{"class_name": "L1" | "L2" | "L1L2", "config": {...}}`.
pub(crate) fn regularizer_from_json(v: &Value) -> Parsed<Regularizer> {
    let (class, config) = class_and_config(v, "regularizer")?;
    let r = match class.as_str() {
        "l1" if config.is_none() => Regularizer::l1(),
        "l2" if config.is_none() => Regularizer::l2(),
        "l1_l2" if config.is_none() => Regularizer::l1_l2(),
        "L1" | "l1" => {
            let a = arguments(config, &class, &["l1"])?;
            Regularizer {
                l1: argument(&a, "l1", Regularizer::DEFAULT_FACTOR)?,
                l2: 0.0,
            }
        }
        "L2" | "l2" => {
            let a = arguments(config, &class, &["l2"])?;
            Regularizer {
                l1: 0.0,
                l2: argument(&a, "l2", Regularizer::DEFAULT_FACTOR)?,
            }
        }
        // the class's own defaults are 0, unlike the "l1_l2" string's
        "L1L2" | "l1_l2" => {
            let a = arguments(config, &class, &["l1", "l2"])?;
            Regularizer {
                l1: argument(&a, "l1", 0.0)?,
                l2: argument(&a, "l2", 0.0)?,
            }
        }
        other => return Err(format!("regularizer {other} is not supported")),
    };
    Ok(r)
}

/// Keras's serialized form of a regularizer.
pub(crate) fn regularizer_to_json(r: Regularizer) -> Value {
    let (class, config) = match (r.l1 != 0.0, r.l2 != 0.0) {
        (true, false) => ("L1", json!({"l1": decimal(r.l1)})),
        (false, true) => ("L2", json!({"l2": decimal(r.l2)})),
        _ => ("L1L2", json!({"l1": decimal(r.l1), "l2": decimal(r.l2)})),
    };
    keras_object("keras.regularizers", class, config)
}

/// Keras constraint JSON (`"non_neg"`, `{"class_name": "MaxNorm", ...}`).
/// Only `axis=0` is meaningful for the layer's one-axis weights.
pub(crate) fn constraint_from_json(v: &Value) -> Parsed<Constraint> {
    let (class, config) = class_and_config(v, "constraint")?;
    let axis_ok = |a: &Map<String, Value>| -> Parsed<()> {
        match a.get("axis") {
            None | Some(Value::Null) => Ok(()),
            Some(v) if v.as_i64() == Some(0) || v.as_i64() == Some(-1) => Ok(()),
            Some(v) => Err(format!("{class}: axis {v} does not exist on a one-axis weight")),
        }
    };
    Ok(match class.as_str() {
        "NonNeg" | "non_neg" => {
            arguments(config, &class, &[])?;
            Constraint::NonNeg
        }
        "MaxNorm" | "max_norm" => {
            let a = arguments(config, &class, &["max_value", "axis"])?;
            axis_ok(&a)?;
            Constraint::MaxNorm {
                max_value: argument(&a, "max_value", 2.0)?,
            }
        }
        "MinMaxNorm" | "min_max_norm" => {
            let a = arguments(config, &class, &["min_value", "max_value", "rate", "axis"])?;
            axis_ok(&a)?;
            Constraint::MinMaxNorm {
                min_value: argument(&a, "min_value", 0.0)?,
                max_value: argument(&a, "max_value", 1.0)?,
                rate: argument(&a, "rate", 1.0)?,
            }
        }
        "UnitNorm" | "unit_norm" => {
            let a = arguments(config, &class, &["axis"])?;
            axis_ok(&a)?;
            Constraint::UnitNorm
        }
        other => return Err(format!("constraint {other} is not supported")),
    })
}

/// Keras's serialized form of a constraint (`axis` 0).
pub(crate) fn constraint_to_json(c: Constraint) -> Value {
    let (class, config) = match c {
        Constraint::NonNeg => ("NonNeg", json!({})),
        Constraint::MaxNorm { max_value } => ("MaxNorm", json!({"max_value": decimal(max_value), "axis": 0})),
        Constraint::MinMaxNorm {
            min_value,
            max_value,
            rate,
        } => (
            "MinMaxNorm",
            json!({"min_value": decimal(min_value), "max_value": decimal(max_value), "rate": decimal(rate), "axis": 0}),
        ),
        Constraint::UnitNorm => ("UnitNorm", json!({"axis": 0})),
    };
    keras_object("keras.constraints", class, config)
}
