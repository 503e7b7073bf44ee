//! Keras reference cases: the safetensors case format of
//! `tests/fixtures/keras/README.md`, the error measure and tolerances that
//! define conformance, and a runner for the GPU layer or the CPU reference.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::config::config_from_case_json;
use super::measure::{error_measure, tolerance};
use crate::config::BatchNormConfig;
use crate::context::GpuContext;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layer::{BatchNorm, StateSlot};
use crate::reference::ReferenceLayer;
use crate::tensor::{Mask, Tensor};

/// One tensor of a case file, widened to float64.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseTensor {
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// The tensor's stored dtype.
    pub dtype: Dtype,
    /// Its values, masks as stored (Keras casts a mask to bool: any
    /// non-zero value, NaN included, is in); empty for a dtype this crate
    /// cannot read (see [`KerasCase::unsupported`]).
    pub values: Vec<f64>,
}

/// One call of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// Keras's `training` argument (`None` is inference).
    pub training: Option<bool>,
    /// Whether the call has a mask (`mask.k`).
    pub mask: bool,
}

/// A Keras reference case.
#[derive(Debug, Clone)]
pub struct KerasCase {
    /// The file.
    pub path: PathBuf,
    /// The case's name (the file's stem).
    pub name: String,
    /// The layer config, or why this crate cannot run it.
    pub config: std::result::Result<BatchNormConfig, String>,
    /// The dtype of inputs and outputs, or why this crate cannot run it.
    pub dtype: std::result::Result<DType, String>,
    /// Why this crate cannot run the case, for anything else a well-formed
    /// file may hold that it lacks (a tensor of a dtype it cannot read, a
    /// state tensor it does not know): the case is then a failure with
    /// this reason, not a file error.
    pub unsupported: Option<String>,
    /// The input shape.
    pub shape: Vec<usize>,
    /// The calls, in order.
    pub calls: Vec<Call>,
    /// Every tensor of the file by key.
    pub tensors: BTreeMap<String, CaseTensor>,
}

/// Worst error of one output key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyError {
    /// The output key (`y.0`, `final.moving_mean`, `grad.dx`, ...).
    pub key: String,
    /// The conformance error (see [`error_measure`]).
    pub error: f64,
    /// The tolerance for this key.
    pub tolerance: f64,
}

impl KeyError {
    /// Whether the error is within the tolerance.
    pub fn passes(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// A tensor the runner produced, as `--out` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The key it is written under.
    pub key: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its dtype in the output file.
    pub dtype: DType,
    /// Its values.
    pub values: Vec<f64>,
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// The error of every output key.
    pub keys: Vec<KeyError>,
    /// Set when the case could not run (an unsupported feature, a GPU error).
    pub failure: Option<String>,
    /// What `--out` writes.
    pub outputs: Vec<Output>,
}

impl CaseReport {
    /// Whether every key passes and nothing failed.
    pub fn passes(&self) -> bool {
        self.failure.is_none() && !self.keys.is_empty() && self.keys.iter().all(KeyError::passes)
    }
}

/// What one run of a case's calls produced.
struct RunOutputs {
    ys: Vec<Vec<f64>>,
    finals: Vec<(StateSlot, Vec<f64>)>,
    /// `dx`, `dgamma`, `dbeta` of call 0 from the initial state, for cases
    /// with a `grad.dy`
    grads: Vec<(&'static str, Vec<f64>)>,
}

type InitFn<'a> = dyn Fn(StateSlot) -> std::result::Result<Vec<f64>, String> + 'a;

/// How a case's layer is built.
struct Setup<'a> {
    config: &'a BatchNormConfig,
    dtype: DType,
    channels: usize,
    slots: &'a [StateSlot],
    init: &'a InitFn<'a>,
}

/// Where a case runs.
#[derive(Debug, Clone)]
pub enum Device {
    /// A GPU context.
    Gpu(GpuContext),
    /// The float64 reference.
    Cpu,
}

fn widen(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    Some(match dtype {
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        Dtype::U8 | Dtype::BOOL => bytes.iter().map(|&b| b as f64).collect(),
        // integer masks, as Keras takes them (any non-zero value is in)
        Dtype::I8 => bytes.iter().map(|&b| b as i8 as f64).collect(),
        Dtype::I16 => bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]) as f64)
            .collect(),
        Dtype::U16 => bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as f64)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::U32 => bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::U64 => bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        _ => return None,
    })
}

impl KerasCase {
    /// Reads and checks a case file. Structural problems (not a regular
    /// file, unreadable, malformed, shapes that disagree with the metadata)
    /// are errors; features this crate lacks are kept in `config`, `dtype`
    /// and `unsupported` as reasons, and [`KerasCase::run`] reports them as
    /// the case's failure.
    pub fn load(path: &Path) -> Result<Self> {
        // reading a FIFO blocks until a writer comes, so look before opening
        let kind = std::fs::metadata(path)
            .map_err(|e| file_error(path, e.to_string()))?
            .file_type();
        if !kind.is_file() {
            return Err(file_error(
                path,
                format!(
                    "not a regular file ({}); case files must be regular files",
                    file_kind(&kind)
                ),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
        Self::parse(path, &bytes)
    }

    /// [`KerasCase::load`] on bytes already read; `path` names the file in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| file_error(path, m);
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let case_json = meta
            .metadata()
            .as_ref()
            .and_then(|m: &HashMap<String, String>| m.get("case"))
            .ok_or_else(|| bad("no `case` metadata".into()))?;
        let case: Value =
            serde_json::from_str(case_json).map_err(|e| bad(format!("`case` metadata is not JSON: {e}")))?;
        let field = |k: &str| case.get(k).ok_or_else(|| bad(format!("`case` has no `{k}`")));

        let name = match case.get("name").and_then(Value::as_str) {
            Some(n) => n.to_string(),
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let trainable = field("trainable")?
            .as_bool()
            .ok_or_else(|| bad("`trainable` is not a boolean".into()))?;
        let config = config_from_case_json(field("config")?, trainable).map_err(|e| e.to_string());
        let dtype_name = field("dtype")?
            .as_str()
            .ok_or_else(|| bad("`dtype` is not a string".into()))?;
        let dtype = DType::from_keras_name(dtype_name).ok_or(format!("dtype {dtype_name} is not supported"));
        let shape: Vec<usize> = serde_json::from_value(field("shape")?.clone())
            .map_err(|e| bad(format!("`shape` is not a list of sizes: {e}")))?;
        if shape.is_empty() || shape.contains(&0) {
            return Err(bad(format!("`shape` {shape:?} is empty")));
        }
        let calls_json = field("calls")?
            .as_array()
            .ok_or_else(|| bad("`calls` is not a list".into()))?;
        let mut calls = Vec::new();
        for c in calls_json {
            let training = match c.get("training") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(other) => {
                    return Err(bad(format!("call training {other} is not true/false/null")));
                }
            };
            let mask = c.get("mask").and_then(Value::as_bool).unwrap_or(false);
            calls.push(Call { training, mask });
        }
        if calls.is_empty() {
            return Err(bad("`calls` is empty".into()));
        }

        let mut tensors = BTreeMap::new();
        let mut unsupported = Vec::new();
        for (key, view) in st.tensors() {
            let values = match widen(view.dtype(), view.data()) {
                Some(values) => values,
                None => {
                    // a dtype this crate cannot read: the case cannot run
                    // where the runner reads the tensor (Keras's own
                    // outputs `y.k`, `final.*`, `grad.dx`... are not read,
                    // only their shapes checked)
                    let read =
                        ["x.", "mask.", "init.", "ref64."].iter().any(|p| key.starts_with(p)) || key == "grad.dy";
                    if read {
                        unsupported.push(format!(
                            "tensor {key} has dtype {:?}, which this crate cannot read",
                            view.dtype()
                        ));
                    }
                    Vec::new()
                }
            };
            tensors.insert(
                key,
                CaseTensor {
                    shape: view.shape().to_vec(),
                    dtype: view.dtype(),
                    values,
                },
            );
        }
        let mut case = KerasCase {
            path: path.to_path_buf(),
            name,
            config,
            dtype,
            shape,
            calls,
            tensors,
            unsupported: None,
        };
        case.check_shapes(&mut unsupported)?;
        unsupported.sort();
        case.unsupported = (!unsupported.is_empty()).then(|| unsupported.join("; "));
        Ok(case)
    }

    /// Shapes that disagree with the metadata are errors; what this crate
    /// lacks goes to `unsupported`.
    fn check_shapes(&self, unsupported: &mut Vec<String>) -> Result<()> {
        let bad = |m: String| file_error(&self.path, m);
        let expect = |key: &str, shape: &[usize]| -> Result<()> {
            match self.tensors.get(key) {
                None => Err(bad(format!("missing tensor {key}"))),
                Some(t) if t.shape != shape => Err(bad(format!(
                    "tensor {key} has shape {:?}, the metadata says {shape:?}",
                    t.shape
                ))),
                Some(_) => Ok(()),
            }
        };
        for (k, call) in self.calls.iter().enumerate() {
            expect(&format!("x.{k}"), &self.shape)?;
            if call.mask {
                let key = format!("mask.{k}");
                // any shape that broadcasts to the input without its last
                // axis (`[]` for a rank-1 input: one flag, as Keras takes it)
                let to = &self.shape[..self.shape.len() - 1];
                let mask = self
                    .tensors
                    .get(&key)
                    .ok_or_else(|| bad(format!("missing tensor {key}")))?;
                if !crate::tensor::mask_broadcasts(&mask.shape, to) {
                    return Err(bad(format!(
                        "tensor {key} has shape {:?}, which does not broadcast to {to:?}",
                        mask.shape
                    )));
                }
            }
        }
        for (key, t) in &self.tensors {
            // dy is uploaded with the input's shape; a reshaped dy of the
            // same length would otherwise run and pass
            if key.starts_with("y.") || key.starts_with("ref64.y.") || key == "grad.dy" {
                expect(key, &self.shape)?;
            }
            // a state Keras has and this crate lacks: nothing would check it
            let state = key.strip_prefix("ref64.").unwrap_or(key);
            if let Some(rest) = state.strip_prefix("init.").or(state.strip_prefix("final."))
                && StateSlot::from_keras_name(rest).is_none()
            {
                unsupported.push(format!("state tensor {key} is not one this crate has"));
            }
            if (key.starts_with("init.") || key.starts_with("final.")) && t.shape.len() != 1 {
                return Err(bad(format!(
                    "state tensor {key} has shape {:?}, expected one axis",
                    t.shape
                )));
            }
        }
        if let Ok(cfg) = &self.config
            && let Ok(axis) = cfg.resolve_axis(self.shape.len())
        {
            let channels = self.shape[axis];
            for (key, t) in &self.tensors {
                if (key.starts_with("init.") || key.contains("final.")) && t.shape != [channels] {
                    return Err(bad(format!(
                        "state tensor {key} has shape {:?}, the input has {channels} channels",
                        t.shape
                    )));
                }
            }
        }
        Ok(())
    }

    /// The case's input tensor of call `k` on the GPU (float16 values
    /// round-trip exactly through float32).
    fn gpu_input(&self, ctx: &GpuContext, k: usize, dtype: DType) -> Result<Tensor> {
        let values: Vec<f32> = self.tensors[&format!("x.{k}")]
            .values
            .iter()
            .map(|&v| v as f32)
            .collect();
        Tensor::from_f32_as(ctx, &self.shape, &values, dtype)
    }

    /// Call k's mask, spread to the input shape without its last axis.
    /// As Keras's `ops.cast(mask, "bool")`: any non-zero value (NaN and Inf
    /// too) is in, 0 is out; no position is weighed by its value.
    fn mask_bytes(&self, k: usize) -> Vec<u8> {
        let mask = &self.tensors[&format!("mask.{k}")];
        let flags: Vec<u8> = mask.values.iter().map(|&v| (v != 0.0) as u8).collect();
        crate::tensor::broadcast_mask(&flags, &mask.shape, &self.shape[..self.shape.len() - 1])
            .expect("check_shapes checked the mask broadcasts")
    }

    /// Runs every call and compares with the `ref64.*` truth (not on the
    /// web: see [`KerasCase::run_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run(&self, device: &Device) -> CaseReport {
        pollster::block_on(self.run_async(device))
    }

    /// Runs every call and compares with the `ref64.*` truth, reading the
    /// GPU's results back without blocking.
    pub async fn run_async(&self, device: &Device) -> CaseReport {
        let mut report = CaseReport {
            name: self.name.clone(),
            keys: Vec::new(),
            failure: None,
            outputs: Vec::new(),
        };
        if let Err(reason) = self.execute(device, &mut report).await {
            report.failure = Some(reason);
        }
        report
    }

    async fn execute(&self, device: &Device, report: &mut CaseReport) -> std::result::Result<(), String> {
        if let Some(reason) = &self.unsupported {
            return Err(reason.clone());
        }
        let config = self.config.clone()?;
        let dtype = self.dtype.clone()?;
        let axis = config.resolve_axis(self.shape.len()).map_err(|e| e.to_string())?;
        let channels = self.shape[axis];
        let init = |slot: StateSlot| -> std::result::Result<Vec<f64>, String> {
            let key = format!("init.{}", slot.keras_name());
            self.tensors
                .get(&key)
                .map(|t| t.values.clone())
                .ok_or(format!("missing {key}"))
        };
        let slots: Vec<StateSlot> = StateSlot::ALL.into_iter().filter(|s| s.present(&config)).collect();

        let setup = Setup {
            config: &config,
            dtype,
            channels,
            slots: &slots,
            init: &init,
        };
        let RunOutputs { ys, finals, grads } = match device {
            Device::Gpu(ctx) => self.run_gpu(ctx, &setup).await.map_err(|e| e.to_string())?,
            Device::Cpu => self.run_cpu(&setup)?,
        };

        let tol = tolerance(dtype, false);
        for (k, y) in ys.into_iter().enumerate() {
            let key = format!("y.{k}");
            self.compare(report, &key, &y, tol)?;
            report.outputs.push(Output {
                key,
                shape: self.shape.clone(),
                dtype,
                values: y,
            });
        }
        for (slot, values) in finals {
            let key = format!("final.{}", slot.keras_name());
            if self.tensors.contains_key(&format!("ref64.{key}")) {
                self.compare(report, &key, &values, tol)?;
            }
            report.outputs.push(Output {
                key,
                shape: vec![channels],
                dtype: DType::F32,
                values,
            });
        }
        let grad_tol = tolerance(dtype, true);
        for (name, values) in grads {
            let key = format!("grad.{name}");
            self.compare(report, &key, &values, grad_tol)?;
            let (shape, dtype) = if name == "dx" {
                (self.shape.clone(), dtype)
            } else {
                (vec![channels], DType::F32)
            };
            report.outputs.push(Output {
                key,
                shape,
                dtype,
                values,
            });
        }
        for key in self.tensors.keys().filter_map(|k| k.strip_prefix("ref64.grad.")) {
            if !report.keys.iter().any(|k| k.key == format!("grad.{key}")) {
                return Err(format!("Keras computed grad.{key}; this layer produced none"));
            }
        }
        Ok(())
    }

    async fn run_gpu(&self, ctx: &GpuContext, setup: &Setup<'_>) -> Result<RunOutputs> {
        let new_layer = || -> Result<BatchNorm> {
            #[allow(unused_mut)]
            let mut layer = BatchNorm::new(ctx, setup.config.clone(), setup.channels)?;
            if setup.config.synchronized {
                // Keras ran the case on one replica: a group of one
                #[cfg(not(target_arch = "wasm32"))]
                {
                    let one = crate::sync::LocalExchange::group(1, std::time::Duration::from_secs(60));
                    layer.set_exchange(std::sync::Arc::new(one.into_iter().next().expect("a group of one")));
                }
                #[cfg(target_arch = "wasm32")]
                return Err(Error::exchange(
                    crate::ExchangeFailure::Unsupported,
                    "synchronized layers do not run on the web",
                ));
            }
            for &slot in setup.slots {
                let values: Vec<f32> = (setup.init)(slot)
                    .map_err(|m| file_error(&self.path, m))?
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                layer.set_weight(slot, &values)?;
            }
            Ok(layer)
        };
        let call_forward = |layer: &BatchNorm, k: usize| -> Result<(Tensor, crate::SavedForward)> {
            let x = self.gpu_input(ctx, k, setup.dtype)?;
            let mask = match self.calls[k].mask {
                true => Some(Mask::from_u8(
                    ctx,
                    &self.shape[..self.shape.len() - 1],
                    &self.mask_bytes(k),
                )?),
                false => None,
            };
            layer.forward_saved(&x, self.calls[k].training, mask.as_ref())
        };
        let read = |t: Tensor| async move {
            Ok::<_, Error>(
                t.read_f32_async(ctx)
                    .await?
                    .into_iter()
                    .map(f64::from)
                    .collect::<Vec<_>>(),
            )
        };

        let layer = new_layer()?;
        let mut ys = Vec::new();
        for k in 0..self.calls.len() {
            ys.push(read(call_forward(&layer, k)?.0).await?);
        }
        let finals = layer
            .named_weights_async()
            .await?
            .into_iter()
            .map(|(s, v)| (s, v.into_iter().map(f64::from).collect()))
            .collect();

        let mut grads = Vec::new();
        if let Some(dy) = self.tensors.get("grad.dy") {
            let layer = new_layer()?;
            let (_, saved) = call_forward(&layer, 0)?;
            let dy: Vec<f32> = dy.values.iter().map(|&v| v as f32).collect();
            let dy = Tensor::from_f32_as(ctx, &self.shape, &dy, setup.dtype)?;
            let g = layer.backward(&saved, &dy, false)?;
            grads.push(("dx", read(g.dx).await?));
            if let Some(t) = g.dgamma {
                grads.push(("dgamma", read(t).await?));
            }
            if let Some(t) = g.dbeta {
                grads.push(("dbeta", read(t).await?));
            }
        }
        Ok(RunOutputs { ys, finals, grads })
    }

    fn run_cpu(&self, setup: &Setup) -> std::result::Result<RunOutputs, String> {
        let new_layer = || -> std::result::Result<ReferenceLayer, String> {
            let mut layer = ReferenceLayer::new(setup.config.clone(), setup.channels).map_err(|e| e.to_string())?;
            for &slot in setup.slots {
                *layer.state.slot_mut(slot) = (setup.init)(slot)?;
            }
            Ok(layer)
        };
        let call_forward = |layer: &mut ReferenceLayer, k: usize| -> std::result::Result<Vec<f64>, String> {
            let x = &self.tensors[&format!("x.{k}")].values;
            let mask = self.calls[k].mask.then(|| self.mask_bytes(k));
            layer
                .forward(x, &self.shape, self.calls[k].training, mask.as_deref())
                .map_err(|e| e.to_string())
        };
        // outputs are cast to the input dtype, as Keras does
        let cast = |v: &[f64], dtype: DType| -> Vec<f64> {
            match dtype {
                DType::F32 => v.iter().map(|&v| v as f32 as f64).collect(),
                DType::F16 => v.iter().map(|&v| f16::from_f64(v).to_f64()).collect(),
            }
        };

        let mut layer = new_layer()?;
        let mut ys = Vec::new();
        for k in 0..self.calls.len() {
            ys.push(cast(&call_forward(&mut layer, k)?, setup.dtype));
        }
        let mut grads = Vec::new();
        if let Some(dy) = self.tensors.get("grad.dy") {
            let mut layer = new_layer()?;
            call_forward(&mut layer, 0)?;
            let dy = cast(&dy.values, setup.dtype);
            let g = layer.backward(&dy, false).map_err(|e| e.to_string())?;
            grads.push(("dx", cast(&g.dx, setup.dtype)));
            if let Some(v) = g.dgamma {
                grads.push(("dgamma", cast(&v, DType::F32)));
            }
            if let Some(v) = g.dbeta {
                grads.push(("dbeta", cast(&v, DType::F32)));
            }
        }
        let finals = setup
            .slots
            .iter()
            .map(|&s| (s, layer.state.slot(s).iter().map(|&v| v as f32 as f64).collect()))
            .collect();
        Ok(RunOutputs { ys, finals, grads })
    }

    fn compare(
        &self,
        report: &mut CaseReport,
        key: &str,
        got: &[f64],
        tolerance: f64,
    ) -> std::result::Result<(), String> {
        let truth = self
            .tensors
            .get(&format!("ref64.{key}"))
            .ok_or(format!("the case has no ref64.{key} to compare with"))?;
        report.keys.push(KeyError {
            key: key.to_string(),
            error: error_measure(got, &truth.values),
            tolerance,
        });
        Ok(())
    }
}

/// What a non-regular file is, for messages.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_block_device() || kind.is_char_device() {
            return "a device";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "another file type"
    }
}

fn file_error(path: &Path, message: String) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message,
    }
}

/// Every `*.safetensors` case in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<KerasCase>> {
    let entries = std::fs::read_dir(dir).map_err(|e| file_error(dir, e.to_string()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(file_error(dir, "no *.safetensors case files".into()));
    }
    paths.iter().map(|p| KerasCase::load(p)).collect()
}

/// Writes a report's outputs as `<dir>/<name>.safetensors`. The name comes
/// from the case's metadata, so one that is not a single plain file name
/// (`../x`, `/abs/x`, `a/b`) is refused rather than written outside `dir`.
pub fn write_outputs(report: &CaseReport, dir: &Path) -> Result<PathBuf> {
    let file = format!("{}.safetensors", report.name);
    let path = dir.join(&file);
    let mut parts = Path::new(&file).components();
    if !matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    ) {
        return Err(file_error(
            &path,
            format!(
                "case name {:?} is not a plain file name; not writing outside {}",
                report.name,
                dir.display()
            ),
        ));
    }
    write_outputs_as(report, &path)?;
    Ok(path)
}

/// Writes a report's outputs to the file `path`. An existing `path` that is
/// not a regular file is refused: a link would write wherever it points, a
/// FIFO would block.
pub fn write_outputs_as(report: &CaseReport, path: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.is_file()
    {
        return Err(file_error(
            path,
            "exists and is not a regular file; not writing through it".into(),
        ));
    }
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    let blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = report
        .outputs
        .iter()
        .map(|o| {
            let (dtype, bytes) = match o.dtype {
                DType::F32 => (
                    Dtype::F32,
                    o.values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
                ),
                DType::F16 => (
                    Dtype::F16,
                    o.values.iter().flat_map(|&v| f16::from_f64(v).to_le_bytes()).collect(),
                ),
            };
            (o.key.clone(), dtype, o.shape.clone(), bytes)
        })
        .collect();
    for (key, dtype, shape, bytes) in &blobs {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| file_error(path, e.to_string()))?;
        tensors.push((key.clone(), view));
    }
    let bytes = safetensors::serialize(tensors, None).map_err(|e| file_error(path, e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| file_error(path, e.to_string()))
}
