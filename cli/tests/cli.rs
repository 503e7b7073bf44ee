//! The command-line tool: exit codes, the conform table, `--out`, and
//! one-line errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    // the library's fixtures, one folder up
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/keras")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpu-batchnorm"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh folder for one test, removed again when dropped (also when the
/// test fails).
fn scratch(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("wgpu-batchnorm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

#[path = "../../tests/common/case_files.rs"]
mod case_files;
#[path = "../../tests/common/svg_text.rs"]
mod svg_text;
use case_files::{Tensors, read_case};

/// A fixture's `case` metadata and tensors.
fn fixture_case(source: &str) -> (serde_json::Value, Tensors) {
    read_case(&fixtures().join(format!("{source}.safetensors")))
}

/// Writes `dir/<name>.safetensors` with the `case` metadata and tensors.
fn write_case(dir: &Path, name: &str, case: &serde_json::Value, tensors: Tensors) {
    case_files::write_case(&dir.join(format!("{name}.safetensors")), case, tensors);
}

/// Copies a fixture under another name, its `case` metadata edited.
fn edit_case(dir: &Path, source: &str, name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let (mut case, tensors) = fixture_case(source);
    case["name"] = name.into();
    edit(&mut case);
    write_case(dir, name, &case, tensors);
}

/// Copies a fixture under another name.
fn copy_case(dir: &Path, source: &str, name: &str) {
    edit_case(dir, source, name, |_| {});
}

/// Copies a fixture under another name with one tensor's shape or bytes
/// edited.
fn edit_tensor(dir: &Path, source: &str, name: &str, tensor: &str, edit: impl Fn(&mut Vec<usize>, &mut Vec<u8>)) {
    let (mut case, mut tensors) = fixture_case(source);
    case["name"] = name.into();
    for (k, _, shape, data) in &mut tensors {
        if k == tensor {
            edit(shape, data);
        }
    }
    write_case(dir, name, &case, tensors);
}

#[test]
fn conform_passes_every_public_case_on_the_gpu_and_writes_outputs() {
    let out = scratch("out");
    let o = run(&["conform", fixtures().to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("adapter: ") && lines[0].ends_with(')'),
        "{}",
        lines[0]
    );
    assert_eq!(*lines.last().unwrap(), "15/15 cases pass");
    assert_eq!(lines.len(), 17, "{stdout}");

    let bytes = std::fs::read(out.join("renorm_clipped.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    for key in [
        "y.0",
        "y.3",
        "final.gamma",
        "final.moving_mean",
        "final.moving_variance",
        "final.moving_stddev",
        "final.renorm_mean",
        "final.renorm_stddev",
    ] {
        assert!(names.contains(&key), "{key} missing from {names:?}");
    }
    let f16 = SafeTensors::deserialize(&std::fs::read(out.join("float16_policy.safetensors")).unwrap())
        .unwrap()
        .tensor("y.0")
        .unwrap()
        .dtype();
    assert_eq!(f16, safetensors::Dtype::F16);
}

#[test]
fn conform_on_the_cpu_reference() {
    let o = run(&["conform", fixtures().to_str().unwrap(), "--device", "cpu"]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.lines().next(), Some("device: cpu reference"));
}

#[test]
fn a_wrong_truth_or_an_unsupported_feature_is_a_fail_row_and_exit_1_and_synchronized_passes() {
    let dir = scratch("fail");
    edit_tensor(&dir, "dense_default", "wrong_truth", "ref64.y.0", |_, data| {
        data[..8].copy_from_slice(&100.0f64.to_le_bytes())
    });
    edit_case(&dir, "dense_default", "synchronized", |c| {
        c["config"]["synchronized"] = true.into()
    });
    edit_case(&dir, "dense_default", "bfloat16", |c| c["dtype"] = "bfloat16".into());
    copy_case(&dir, "inference_only", "fine");
    let o = run(&["conform", dir.to_str().unwrap()]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}{}", text(&o.stderr));
    let row = |name: &str| stdout.lines().find(|l| l.starts_with(name)).unwrap().to_string();
    assert!(row("wrong_truth").contains("FAIL") && row("wrong_truth").contains("y.0="));
    // one replica, as Keras ran it
    assert!(row("synchronized").contains("PASS"), "{stdout}");
    assert!(row("bfloat16").contains("FAIL") && row("bfloat16").contains("bfloat16"));
    assert!(row("fine ").contains("PASS"));
    assert!(stdout.ends_with("2/4 cases pass\n"), "{stdout}");
}

/// A rank-1 case with a rank-0 mask per call (one flag for the whole
/// input, as Keras takes it), with Keras's float64 results written out by
/// hand: each of the `n` channels holds one value per batch. A flag of 0.5
/// is in (mean x / (1 + 1e-7)), 0.0 out (mean 0, variance 0); the third
/// call is inference, which ignores its NaN flag.
fn rank_1_masked_case(dir: &Path, name: &str) {
    use safetensors::Dtype;
    let n = 6;
    let (momentum, eps) = (0.5f64, 1e-3f64);
    let f32s = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&a| (a as f32).to_le_bytes()).collect() };
    let f64s = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&a| a.to_le_bytes()).collect() };
    // initial state and inputs, as float32 holds them
    let round = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|a| a as f32 as f64).collect() };
    let gamma = round((0..n).map(|c| 0.75 + 0.125 * c as f64).collect());
    let beta = round((0..n).map(|c| 0.5 - 0.25 * c as f64).collect());
    let mut mean = round((0..n).map(|c| 0.1 * c as f64).collect());
    let mut var = round((0..n).map(|c| 1.0 + 0.2 * c as f64).collect());
    let mut tensors: Tensors = vec![
        ("init.gamma".into(), Dtype::F32, vec![n], f32s(&gamma)),
        ("init.beta".into(), Dtype::F32, vec![n], f32s(&beta)),
        ("init.moving_mean".into(), Dtype::F32, vec![n], f32s(&mean)),
        ("init.moving_variance".into(), Dtype::F32, vec![n], f32s(&var)),
    ];
    let flags = [0.5f32, 0.0, f32::NAN];
    for (k, flag) in flags.into_iter().enumerate() {
        let x = round((0..n).map(|c| ((c * 7 + k * 3) % 11) as f64 * 0.75 - 2.0).collect());
        let y: Vec<f64> = (0..n)
            .map(|c| {
                let (m, v) = if k < 2 {
                    let w = if flag != 0.0 { 1.0 } else { 0.0 };
                    let m = w * x[c] / (w + 1e-7);
                    let v = w * (x[c] - m) * (x[c] - m) / (w + 1e-7);
                    mean[c] = mean[c] * momentum + m * (1.0 - momentum);
                    var[c] = var[c] * momentum + v * (1.0 - momentum);
                    (m, v)
                } else {
                    (mean[c], var[c])
                };
                (x[c] - m) / (v + eps).sqrt() * gamma[c] + beta[c]
            })
            .collect();
        tensors.push((format!("x.{k}"), Dtype::F32, vec![n], f32s(&x)));
        tensors.push((format!("mask.{k}"), Dtype::F32, vec![], flag.to_le_bytes().to_vec()));
        tensors.push((format!("ref64.y.{k}"), Dtype::F64, vec![n], f64s(&y)));
    }
    for (key, values) in [
        ("gamma", &gamma),
        ("beta", &beta),
        ("moving_mean", &mean),
        ("moving_variance", &var),
    ] {
        tensors.push((format!("ref64.final.{key}"), Dtype::F64, vec![n], f64s(values)));
    }
    let case = serde_json::json!({
        "name": name,
        "config": {
            "axis": -1, "momentum": momentum, "epsilon": eps, "center": true, "scale": true,
            "renorm": false, "renorm_clipping": null, "renorm_momentum": 0.99
        },
        "trainable": true,
        "dtype": "float32",
        "shape": [n],
        "calls": [
            {"training": true, "mask": true},
            {"training": true, "mask": true},
            {"training": null, "mask": true}
        ],
    });
    write_case(dir, name, &case, tensors);
}

/// Keras's masks as Keras takes them (float values of any kind, non-zero
/// in; a rank-0 mask for a rank-1 input) pass, and a well-formed case
/// this crate cannot run (a state tensor it does not have, a tensor dtype
/// it cannot read) is a FAIL row with its reason while the other cases
/// still run: exit 1, never 2 for the whole folder. On the GPU and the
/// reference.
#[test]
fn masks_of_any_value_and_rank_0_pass_and_cases_the_crate_cannot_run_are_fail_rows() {
    use safetensors::Dtype;
    let dir = scratch("keras_masks");
    let (mut case, tensors) = fixture_case("masked_sequence");
    case["name"] = "float_masks".into();
    let values = [0.5f32, -2.0, f32::NAN, f32::INFINITY, 3e38, 1e-30];
    let tensors: Tensors = tensors
        .into_iter()
        .map(|(k, d, s, b)| match k.starts_with("mask.") {
            true => {
                let wide = b
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &on)| if on != 0 { values[i % values.len()] } else { -0.0 }.to_le_bytes())
                    .collect();
                (k, Dtype::F32, s, wide)
            }
            false => (k, d, s, b),
        })
        .collect();
    write_case(&dir, "float_masks", &case, tensors);
    rank_1_masked_case(&dir, "rank_1_masked");
    let (mut case, mut tensors) = fixture_case("dense_default");
    case["name"] = "unknown_state".into();
    tensors.push(("init.future_state".into(), Dtype::F32, vec![16], vec![0; 64]));
    write_case(&dir, "unknown_state", &case, tensors);
    let (mut case, tensors) = fixture_case("dense_default");
    case["name"] = "float8_input".into();
    let tensors = tensors
        .into_iter()
        .map(|(k, d, s, b)| match k.as_str() {
            // one byte a value: the same shape in float8
            "x.0" => (k, Dtype::F8_E4M3, s, b[..b.len() / 4].to_vec()),
            _ => (k, d, s, b),
        })
        .collect();
    write_case(&dir, "float8_input", &case, tensors);
    copy_case(&dir, "inference_only", "fine");

    for device in ["gpu", "cpu"] {
        let o = run(&["conform", dir.to_str().unwrap(), "--device", device]);
        let stdout = text(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{device}: {stdout}{}", text(&o.stderr));
        let row = |name: &str| {
            stdout
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{device}: no row {name}: {stdout}"))
                .to_string()
        };
        assert!(row("float_masks").contains("PASS"), "{device}: {stdout}");
        assert!(row("rank_1_masked").contains("PASS"), "{device}: {stdout}");
        assert!(row("rank_1_masked").contains("y.2="), "{device}: {stdout}");
        assert!(row("fine").contains("PASS"), "{device}: {stdout}");
        let unknown = row("unknown_state");
        assert!(
            unknown.contains("FAIL") && unknown.contains("init.future_state"),
            "{device}: {stdout}"
        );
        let float8 = row("float8_input");
        assert!(
            float8.contains("FAIL") && float8.contains("x.0") && float8.contains("F8_E4M3"),
            "{device}: {stdout}"
        );
        assert!(stdout.ends_with("3/5 cases pass\n"), "{device}: {stdout}");
    }
}

fn assert_usage_error(args: &[&str], mentions: &str) {
    let o = run(args);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}{}", text(&o.stdout));
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(mentions), "{stderr} should mention {mentions}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_files_are_one_line_errors_with_exit_2() {
    assert_usage_error(&["conform", "/no/such/folder"], "/no/such/folder");

    let dir = scratch("truncated");
    let bytes = std::fs::read(fixtures().join("dense_default.safetensors")).unwrap();
    std::fs::write(dir.join("cut.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_usage_error(&["conform", dir.to_str().unwrap()], "cut.safetensors");

    let dir = scratch("garbage");
    std::fs::write(dir.join("junk.safetensors"), b"not a safetensors file at all").unwrap();
    assert_usage_error(&["conform", dir.to_str().unwrap()], "junk.safetensors");

    let dir = scratch("shape");
    edit_tensor(&dir, "dense_default", "reshaped", "x.0", |shape, _| {
        *shape = vec![16, 64]
    });
    assert_usage_error(&["conform", dir.to_str().unwrap()], "reshaped.safetensors");

    let dir = scratch("nometa");
    edit_case(&dir, "dense_default", "nocalls", |c| {
        c.as_object_mut().unwrap().remove("calls");
    });
    assert_usage_error(&["conform", dir.to_str().unwrap()], "calls");

    let dir = scratch("empty");
    assert_usage_error(&["conform", dir.to_str().unwrap()], "no *.safetensors");
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["conform"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--backend", "opengl-es-9", "adapters"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--adapter", "no adapter is called this", "adapters"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("mesa-vulkan-drivers"));
}

#[test]
fn adapters_lists_the_vulkan_and_gl_adapters() {
    let o = run(&["adapters"]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        stdout.contains("(vulkan)") || stdout.contains("(metal)") || stdout.contains("(dx12)"),
        "{stdout}"
    );
    assert!(stdout.contains("max storage binding"));
}

#[test]
fn the_main_job_checks_itself_and_succeeds() {
    let o = run(&[]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    assert!(stdout.starts_with("adapter: "));
    assert_eq!(stdout.matches("PASS").count(), 4, "{stdout}");
    assert!(stdout.contains("inference"));
}

#[test]
fn bench_writes_the_json_schema_and_an_svg() {
    let dir = scratch("bench");
    let json = dir.join("bench.json");
    let svg = dir.join("bench.svg");
    let o = run(&[
        "bench",
        "--quick",
        "--shape",
        "64,8",
        "--shape",
        "3,4,16",
        "--axis",
        "-1",
        "--axis",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}{}", text(&o.stdout), text(&o.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["name", "backend", "device_type", "driver", "driver_info"] {
        assert!(report["adapter"][key].is_string(), "adapter.{key}");
    }
    assert!(report["crate_version"].is_string());
    assert!(report["browser"].is_null(), "only a browser page names a browser");
    // the device's own clock wherever the adapter offers timestamp queries
    let ctx = wgpu_batchnorm::GpuContext::from_env().unwrap();
    let timestamps = ctx.device().features().contains(wgpu::Features::TIMESTAMP_QUERY);
    let expected = if timestamps { "gpu-timestamps" } else { "host-clock" };
    assert_eq!(report["timing"], expected);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2 * 5);
    for r in results {
        for key in ["median_ms", "min_ms", "max_ms", "gbps", "ratio_to_stream"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key} in {r}");
        }
        // the spread of the rounds beside each median, and the ratio's own
        let f = |key: &str| r[key].as_f64().unwrap_or_else(|| panic!("{key} in {r}"));
        assert!(f("min_ms") <= f("p25_ms") && f("p25_ms") <= f("median_ms"), "{r}");
        assert!(f("median_ms") <= f("p75_ms") && f("p75_ms") <= f("max_ms"), "{r}");
        assert!(
            f("ratio_p25") <= f("ratio_to_stream") && f("ratio_to_stream") <= f("ratio_p75"),
            "{r}"
        );
        let rounds = r["runs_ms"].as_array().unwrap();
        assert_eq!(rounds.len() as u64, r["runs"].as_u64().unwrap(), "{r}");
        let noisy = f("p75_ms") - f("p25_ms") > 0.2 * f("median_ms");
        assert_eq!(r["noisy"].as_bool(), Some(noisy), "{r}");
        let op = r["op"].as_str().unwrap();
        assert!(["train_forward", "inference_forward", "backward", "copy", "stream"].contains(&op));
        let passes = match op {
            "train_forward" => 3,
            "backward" => 5,
            _ => 2,
        };
        let elems: u64 = r["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product();
        assert_eq!(r["bytes"].as_u64().unwrap(), passes * elems * 4, "{r}");
        assert_eq!(r["max_error"].is_null(), op == "copy" || op == "stream");
    }
    let stream = results.iter().find(|r| r["op"] == "stream").unwrap();
    assert_eq!(stream["ratio_to_stream"].as_f64(), Some(1.0), "{stream}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    svg_text::assert_inside(&plot);
    let texts: Vec<String> = svg_text::texts(&plot).into_iter().map(|t| t.text).collect();
    for op in ["copy", "stream", "train_forward", "inference_forward", "backward"] {
        assert!(texts.iter().any(|t| t == op), "legend: {op} in {texts:?}");
    }
    assert!(texts.iter().any(|t| t == "3x4x16 axis 1 f32"), "{texts:?}");
    // the table: a spread column beside the median
    let stdout = text(&o.stdout);
    assert!(stdout.lines().any(|l| l.contains("spread")), "{stdout}");
    let bad = run(&["bench", "--shape", "3,0"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn a_grad_dy_that_disagrees_with_the_input_shape_is_exit_2() {
    // same element count, another shape: only a shape check can tell
    let dir = scratch("dy_shape");
    edit_tensor(&dir, "dense_default", "dy_reshaped", "grad.dy", |shape, _| {
        *shape = vec![16, 64]
    });
    let dir = dir.to_str().unwrap();
    assert_usage_error(&["conform", dir, "--device", "cpu"], "dy_reshaped.safetensors");
    assert_usage_error(&["conform", dir, "--device", "cpu"], "grad.dy");
}

/// `run`, killed after `seconds` so that a hang fails the test instead of blocking it.
fn run_with_timeout(args: &[&str], seconds: u64) -> Output {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wgpu-batchnorm"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after {seconds} s: {}{}",
                text(&o.stdout),
                text(&o.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[cfg(unix)]
#[test]
fn a_fifo_or_a_folder_named_like_a_case_is_refused_without_opening_it() {
    let dir = scratch("fifo");
    copy_case(&dir, "dense_default", "fine");
    let fifo = dir.join("stuck.safetensors");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
    assert!(made.success());
    let o = run_with_timeout(&["conform", dir.to_str().unwrap(), "--device", "cpu"], 30);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}{}", text(&o.stdout));
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("stuck.safetensors") && stderr.contains("FIFO"),
        "{stderr}"
    );

    let dir = scratch("folder");
    copy_case(&dir, "dense_default", "fine");
    std::fs::create_dir(dir.join("nested.safetensors")).unwrap();
    assert_usage_error(
        &["conform", dir.to_str().unwrap(), "--device", "cpu"],
        "nested.safetensors",
    );
}

#[test]
fn conform_out_names_outputs_after_the_input_files_and_stays_inside_out() {
    let root = scratch("names");
    let cases = root.join("cases");
    let out = root.join("out");
    std::fs::create_dir_all(&cases).unwrap();
    let absolute = root.join("abs_escaped").to_str().unwrap().to_string();
    // metadata names that would escape OUT, and one name for two files:
    // each file still gets its own output, named after it
    for (case, file, name) in [
        ("dense_default", "dotdot", "../escaped"),
        ("dense_default", "abs", absolute.as_str()),
        ("inference_only", "first", "same"),
        ("inference_only", "second", "same"),
    ] {
        edit_case(&cases, case, file, |c| c["name"] = name.into());
    }
    let (cases_dir, out_dir) = (cases.to_str().unwrap(), out.to_str().unwrap());
    let o = run(&["conform", cases_dir, "--out", out_dir, "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", text(&o.stdout), text(&o.stderr));
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "abs.safetensors",
            "dotdot.safetensors",
            "first.safetensors",
            "second.safetensors"
        ]
    );
    let mut beside: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["cases", "out"], "nothing written outside OUT");
    let y = SafeTensors::deserialize(&std::fs::read(out.join("dotdot.safetensors")).unwrap())
        .unwrap()
        .tensor("y.0")
        .unwrap()
        .shape()
        .to_vec();
    assert_eq!(y, [64, 16]);
}

#[test]
fn conform_out_refuses_to_overwrite_a_case_or_write_through_a_link() {
    // OUT = DIR would replace every case with its outputs
    let dir = scratch("same_dir");
    copy_case(&dir, "dense_default", "case");
    let before = std::fs::read(dir.join("case.safetensors")).unwrap();
    let d = dir.to_str().unwrap();
    assert_usage_error(&["conform", d, "--out", d, "--device", "cpu"], "case.safetensors");
    assert_eq!(std::fs::read(dir.join("case.safetensors")).unwrap(), before);

    // a link in OUT named like an output would write wherever it points
    #[cfg(unix)]
    a_link_at_an_output_path_is_refused();
}

#[cfg(unix)]
fn a_link_at_an_output_path_is_refused() {
    let root = scratch("link_out");
    let (cases, out) = (root.join("cases"), root.join("out"));
    std::fs::create_dir_all(&cases).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    copy_case(&cases, "dense_default", "case");
    let target = root.join("elsewhere");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, out.join("case.safetensors")).unwrap();
    let (cases_dir, out_dir) = (cases.to_str().unwrap(), out.to_str().unwrap());
    assert_usage_error(
        &["conform", cases_dir, "--out", out_dir, "--device", "cpu"],
        "case.safetensors",
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
}

#[test]
fn the_library_write_outputs_refuses_a_case_name_that_leaves_its_folder() {
    let root = scratch("lib_names");
    let dir = root.join("out");
    std::fs::create_dir_all(&dir).unwrap();
    let report = |name: &str| wgpu_batchnorm::keras::CaseReport {
        name: name.into(),
        keys: Vec::new(),
        failure: None,
        outputs: Vec::new(),
    };
    let absolute = root.join("abs_escaped");
    for name in ["../escaped", absolute.to_str().unwrap(), "sub/x"] {
        let e = wgpu_batchnorm::keras::write_outputs(&report(name), &dir).unwrap_err();
        assert!(e.to_string().contains("not a plain file name"), "{name}: {e}");
    }
    assert!(!root.join("escaped.safetensors").exists() && !root.join("abs_escaped.safetensors").exists());
    let written = wgpu_batchnorm::keras::write_outputs(&report("plain"), &dir).unwrap();
    assert_eq!(written, dir.join("plain.safetensors"));
}

/// A usage error found before anything was measured (no table on stdout).
fn assert_refused_before_benchmarking(args: &[&str], mentions: &str) {
    let o = run(args);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}{stdout}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(mentions), "{stderr} should mention {mentions}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stdout.contains("timing:"), "measured before refusing: {stdout}");
}

#[test]
fn bench_checks_its_json_and_svg_paths_before_measuring() {
    let dir = scratch("bench_paths");
    let quick = ["bench", "--quick", "--shape", "8,4"];
    let missing = dir.join("no/such/folder/bench.json");
    let missing = missing.to_str().unwrap();
    assert_refused_before_benchmarking(&[&quick[..], &["--json", missing]].concat(), missing);
    let folder = dir.to_str().unwrap();
    assert_refused_before_benchmarking(&[&quick[..], &["--svg", folder]].concat(), folder);

    // a good --json is not left behind when --svg is refused
    let json = dir.join("bench.json");
    let svg = dir.join("missing/bench.svg");
    let (json_s, svg_s) = (json.to_str().unwrap(), svg.to_str().unwrap());
    assert_refused_before_benchmarking(&[&quick[..], &["--json", json_s, "--svg", svg_s]].concat(), svg_s);
    assert!(!json.exists(), "{json_s} was created");
}

#[test]
fn bench_refuses_shapes_whose_size_overflows_or_exceeds_the_device() {
    // the element count overflows usize: a clap usage error, not a panic
    let o = run(&["bench", "--shape", "18446744073709551615,2"]);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("too large") && !stderr.contains("panicked"), "{stderr}");
    // 40 GB of float32: refused against max_buffer_size, not an aborted allocation
    assert_refused_before_benchmarking(&["bench", "--shape", "100000,100000"], "too large");
    assert_refused_before_benchmarking(&["bench", "--dtype", "f16", "--shape", "100000,100000"], "too large");
}

/// `args` with the address space limited to `kib` KiB (`ulimit -v`).
#[cfg(target_os = "linux")]
fn run_limited(args: &[&str], kib: u64) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_wgpu-batchnorm"))
        .args(args)
        .output()
        .expect("sh runs")
}

#[cfg(target_os = "linux")]
#[test]
fn a_shape_past_the_device_limit_is_refused_before_its_inputs_are_allocated() {
    let ctx = wgpu_batchnorm::GpuContext::from_env().unwrap();
    let max = ctx.device().limits().max_buffer_size;
    // the smallest address space (in 1.25x steps) a tiny benchmark runs in
    let tiny = ["bench", "--quick", "--shape", "8,4"];
    let mut kib: u64 = 512 << 10;
    while run_limited(&tiny, kib).status.code() != Some(0) {
        kib = kib * 5 / 4;
        assert!(
            kib < 64 << 20,
            "a tiny benchmark does not run in 64 GiB of address space"
        );
    }
    // one float32 buffer past max_buffer_size; 1 GiB more address space is
    // far less than its host copies (x and dy, 4 bytes an element each)
    let shape = format!("{},4", max / 16 + 1);
    let o = run_limited(&["bench", "--dtype", "f32", "--shape", &shape], kib + (1 << 20));
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(2), "{shape}: {stderr}{stdout}");
    assert!(stderr.contains("too large") && !stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
}

/// `run` with the tuning cache in `cache` and no kernel choice from the
/// environment.
fn run_cached(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpu-batchnorm"))
        .args(args)
        .env(wgpu_batchnorm::tuning::CACHE_DIR_ENV, cache)
        .env_remove(wgpu_batchnorm::tuning::KERNELS_ENV)
        .output()
        .expect("the binary runs")
}

/// `bench --quick --shape SHAPE --json` in `dir`: the layer figures' `kernels`.
fn bench_kernels(dir: &Path, extra: &[&str], shape: &str) -> (Output, Vec<serde_json::Value>) {
    let json = dir.join("bench.json");
    let _ = std::fs::remove_file(&json);
    let args = [
        extra,
        &["bench", "--quick", "--shape", shape, "--json", json.to_str().unwrap()],
    ]
    .concat();
    let o = run_cached(&args, &dir.join("cache"));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{args:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let mut kernels = Vec::new();
    for r in report["results"].as_array().unwrap() {
        match r["op"].as_str().unwrap() {
            "copy" | "stream" => assert!(r["kernels"].is_null(), "{r}"),
            _ => kernels.push(r["kernels"].clone()),
        }
    }
    assert_eq!(kernels.len(), 3, "{report}");
    (o, kernels)
}

#[test]
fn bench_tune_writes_the_cache_and_later_runs_use_it() {
    use wgpu_batchnorm::tuning::{AdapterKey, Op, TuningCache, shape_class};
    let dir = scratch("tune");
    let cache = dir.join("cache");
    let o = run_cached(&["bench", "--tune", "--quick", "--shape", "64,8"], &cache);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    let path = cache.join("tuning.json");
    assert!(
        stdout.contains(&format!("tuning cache: {}", path.display())),
        "{stdout}"
    );
    for op in ["training", "inference", "backward"] {
        let line = format!("64x8 axis -1 f32 {op}: ");
        assert!(stdout.lines().any(|l| l.starts_with(&line)), "no {line:?} in {stdout}");
    }
    // no kernel figures without --json or --svg
    assert!(!stdout.contains("timing:"), "{stdout}");

    let written: TuningCache = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ctx = wgpu_batchnorm::GpuContext::from_env().unwrap();
    let adapter = AdapterKey::of(ctx.adapter_info().unwrap());
    let class = shape_class(
        wgpu_batchnorm::ChannelView {
            outer: 64,
            channels: 8,
            inner: 1,
        },
        wgpu_batchnorm::DType::F32,
    );
    let mut plans = Vec::new();
    for op in Op::ALL {
        let entry = written
            .entries
            .iter()
            .find(|e| e.adapter == adapter && e.class == class && e.op == op)
            .unwrap_or_else(|| panic!("no {op:?} entry for {adapter:?} {class} in {written:?}"));
        assert!(entry.speedup > 0.0 && entry.speedup.is_finite(), "{entry:?}");
        plans.push(entry.tuning.describe());
    }

    // a later run reports the cached plans as tuned
    let (_, kernels) = bench_kernels(&dir, &[], "64,8");
    for (k, plan) in kernels.iter().zip(&plans) {
        assert_eq!(k["tuned"], true, "{k}");
        assert_eq!(k["plan"].as_str(), Some(plan.as_str()), "{k}");
        assert!(plan.starts_with(k["strategy"].as_str().unwrap()), "{k}");
    }
    // --kernels beats the cache: the family's defaults, not tuned
    let (_, kernels) = bench_kernels(&dir, &["--kernels", "serial"], "64,8");
    assert!(
        kernels.iter().all(|k| k["tuned"] == false && k["strategy"] == "serial"),
        "{kernels:?}"
    );

    // a corrupt cache is a warning, and the defaults run
    std::fs::write(&path, b"{ not json").unwrap();
    let (o, kernels) = bench_kernels(&dir, &[], "64,8");
    let stderr = text(&o.stderr);
    assert!(
        stderr.contains("tuning cache") && stderr.contains("tuning.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(kernels.iter().all(|k| k["tuned"] == false), "{kernels:?}");
}

#[test]
fn bench_tune_with_json_measures_with_the_new_plans() {
    let dir = scratch("tune_json");
    let json = dir.join("bench.json");
    let o = run_cached(
        &[
            "bench",
            "--tune",
            "--quick",
            "--shape",
            "3,4,20",
            "--axis",
            "1",
            "--json",
            json.to_str().unwrap(),
        ],
        &dir.join("cache"),
    );
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    assert!(stdout.contains("timing:"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for r in results.iter().filter(|r| !r["kernels"].is_null()) {
        assert_eq!(r["kernels"]["tuned"], true, "{r}");
    }
}

#[test]
fn kernels_flag_picks_the_family() {
    let dir = scratch("kernels_flag");
    for family in ["coalesced", "serial"] {
        let (o, kernels) = bench_kernels(&dir, &["--kernels", family], "3,4,16");
        for k in &kernels {
            assert_eq!(k["strategy"], family, "{k}");
            assert_eq!(k["tuned"], false, "{k}");
            assert!(k["plan"].as_str().unwrap().starts_with(family), "{k}");
        }
        let table = text(&o.stdout);
        let row = table.lines().find(|l| l.contains("train_forward")).unwrap();
        assert!(row.ends_with(family), "{row}");
    }
    // the flag beats the environment
    let json = dir.join("env.json");
    let o = Command::new(env!("CARGO_BIN_EXE_wgpu-batchnorm"))
        .args(["bench", "--quick", "--shape", "8,4", "--kernels", "serial", "--json"])
        .arg(&json)
        .env(wgpu_batchnorm::tuning::CACHE_DIR_ENV, dir.join("cache"))
        .env(wgpu_batchnorm::tuning::KERNELS_ENV, "coalesced")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let train = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["op"] == "train_forward")
        .unwrap();
    assert_eq!(train["kernels"]["strategy"], "serial", "{train}");
}

#[test]
fn conform_passes_with_the_coalesced_kernels() {
    let dir = scratch("conform_coalesced");
    let o = run_cached(
        &["conform", fixtures().to_str().unwrap(), "--kernels", "coalesced"],
        &dir,
    );
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    assert_eq!(stdout.lines().last(), Some("15/15 cases pass"), "{stdout}");
}

#[test]
fn a_bogus_kernels_value_is_a_usage_error() {
    for args in [
        &["--kernels", "bogus", "bench", "--quick"][..],
        &["bench", "--kernels", "fast"],
        &["conform", "--kernels", "", "tests/fixtures/keras"],
    ] {
        let o = run(args);
        let stderr = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--kernels"), "{stderr}");
        assert!(
            !stderr.contains("panicked") && !text(&o.stdout).contains("timing:"),
            "{stderr}"
        );
    }
}

/// A WGPU_BATCHNORM_KERNELS that names no family stops a run that does not
/// name its kernels, with a message naming the variable; `--kernels` runs.
#[test]
fn a_bogus_kernels_variable_is_an_error_unless_the_flag_names_the_kernels() {
    let dir = scratch("bogus_env");
    let bench = |flag: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wgpu-batchnorm"))
            .args(flag)
            .args(["bench", "--quick", "--shape", "8,4"])
            .env(wgpu_batchnorm::tuning::CACHE_DIR_ENV, dir.join("cache"))
            .env(wgpu_batchnorm::tuning::KERNELS_ENV, "fastest")
            .output()
            .unwrap()
    };
    let o = bench(&[]);
    let stderr = text(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(wgpu_batchnorm::tuning::KERNELS_ENV), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let o = bench(&["--kernels", "serial"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

#[test]
fn tune_candidates_are_valid_distinct_and_one_knob_from_the_default() {
    use wgpu_batchnorm::tuning::Op;
    use wgpu_batchnorm::{ChannelView, PlanTuning, Strategy};
    let ctx = wgpu_batchnorm::GpuContext::from_env().unwrap();
    let default = PlanTuning::default_for(ctx.default_strategy());
    let views = [
        ChannelView {
            outer: 100352,
            channels: 64,
            inner: 1,
        },
        ChannelView {
            outer: 32,
            channels: 64,
            inner: 3136,
        },
        ChannelView {
            outer: 8,
            channels: 512,
            inner: 49,
        },
    ];
    for view in views {
        for op in Op::ALL {
            let plans = wgpu_batchnorm::bench::candidates(&ctx, view, op);
            assert_eq!(plans[0], default);
            let families: Vec<Strategy> = plans.iter().map(|p| p.strategy).collect();
            assert!(families.contains(&Strategy::Serial) && families.contains(&Strategy::Coalesced));
            for (i, p) in plans.iter().enumerate() {
                p.validate().unwrap();
                assert!(!plans[..i].contains(p), "{p:?} twice");
                if i >= 2 {
                    let knobs = |p: &PlanTuning| {
                        [
                            p.reduce_invocations != default.reduce_invocations,
                            p.values_per_thread != default.values_per_thread,
                            p.rows_per_thread != default.rows_per_thread,
                            p.elementwise_invocations != default.elementwise_invocations,
                            p.lane_width != default.lane_width,
                            p.uniform_parameters != default.uniform_parameters,
                        ]
                    };
                    assert_eq!(knobs(p).iter().filter(|&&b| b).count(), 1, "{p:?}");
                    assert_eq!(p.strategy, default.strategy);
                    // inference has no reductions to tune
                    if op == Op::Inference {
                        assert_eq!(p.reduce_invocations, default.reduce_invocations, "{p:?}");
                        assert_eq!(p.lane_width, default.lane_width, "{p:?}");
                    }
                    // channels last in quads: rows per invocation, not values
                    if view.inner == 1 && view.channels.is_multiple_of(4) {
                        assert_eq!(p.values_per_thread, default.values_per_thread, "{p:?}");
                    }
                }
            }
        }
    }
}

/// `report` puts the Vulkan and the GL adapter's bench JSON side by side:
/// a table with both adapters' GB/s and fraction of their own copy, and an
/// SVG with a labelled axis, ticks and a legend naming both; files of
/// another version or with fields missing are refused, naming the file.
#[test]
fn report_puts_two_adapters_side_by_side() {
    let dir = scratch("report");
    let mut files = Vec::new();
    for backend in ["vulkan", "gl"] {
        let json = dir.join(format!("{backend}.json"));
        let o = run(&[
            "--backend",
            backend,
            "bench",
            "--quick",
            "--shape",
            "64,8",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}{}", text(&o.stdout), text(&o.stderr));
        files.push(json);
    }
    let (svg, md) = (dir.join("report.svg"), dir.join("report.md"));
    let mut args = vec!["report"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    args.extend(["--svg", svg.to_str().unwrap(), "--markdown", md.to_str().unwrap()]);
    let o = run(&args);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    let header = stdout.lines().next().unwrap();
    assert!(header.contains("(vulkan)") && header.contains("(gl)"), "{header}");
    for op in ["train_forward", "inference_forward", "backward"] {
        let row = stdout
            .lines()
            .find(|l| l.contains("64x8 axis -1 f32") && l.contains(&format!("| {op} |")))
            .unwrap_or_else(|| panic!("no {op} row:\n{stdout}"));
        assert_eq!(row.matches("% of copy").count(), 2, "{row}");
    }
    assert_eq!(std::fs::read_to_string(&md).unwrap(), stdout);
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    svg_text::assert_inside(&plot);
    let texts: Vec<String> = svg_text::texts(&plot).into_iter().map(|t| t.text).collect();
    assert!(texts.iter().any(|t| t == "fraction of copy bandwidth"), "y axis label");
    let ticks: Vec<f64> = texts.iter().filter_map(|t| t.parse().ok()).collect();
    assert!(ticks.contains(&0.0) && ticks.len() >= 3, "ticks: {texts:?}");
    assert!(
        texts.iter().any(|t| t.ends_with("(vulkan)")) && texts.iter().any(|t| t.ends_with("(gl)")),
        "legend: {texts:?}"
    );
    // a legend swatch and a bar per layer call, in each adapter's colour
    for colour in &wgpu_batchnorm::bench::plot::PALETTE[..2] {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", colour.0, colour.1, colour.2);
        let rects = plot
            .lines()
            .filter(|l| l.starts_with("<rect") && l.contains(&fill))
            .count();
        assert_eq!(rects, 1 + 3, "bars in {fill}");
    }

    // one file twice: two columns told apart
    let twice = run(&["report", files[0].to_str().unwrap(), files[0].to_str().unwrap()]);
    let header = text(&twice.stdout).lines().next().unwrap().to_string();
    assert!(header.contains("#1]") && header.contains("#2]"), "{header}");
    // an SVG into a folder that does not exist: refused before any output
    let nowhere = dir.join("no-such-folder").join("r.svg");
    let o = run(&["report", files[0].to_str().unwrap(), "--svg", nowhere.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("no-such-folder"), "{}", text(&o.stderr));
    // a file written before the spread fields, and a browser page's file,
    // read alongside a new one
    let mut first: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    first.as_object_mut().unwrap().remove("browser");
    for r in first["results"].as_array_mut().unwrap() {
        for key in ["p25_ms", "p75_ms", "noisy", "ratio_p25", "ratio_p75"] {
            r.as_object_mut().unwrap().remove(key);
        }
    }
    let first_file = dir.join("first-schema.json");
    std::fs::write(&first_file, first.to_string()).unwrap();
    let mut page: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
    page["browser"] = "HeadlessChrome/140".into();
    let page_file = dir.join("page.json");
    std::fs::write(&page_file, page.to_string()).unwrap();
    let o = run(&[
        "report",
        first_file.to_str().unwrap(),
        page_file.to_str().unwrap(),
        files[0].to_str().unwrap(),
    ]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    let header = stdout.lines().next().unwrap();
    assert!(header.contains("(gl, HeadlessChrome/140)"), "{header}");
    assert!(header.contains("[first-schema]"), "{header}");
    // another version, a missing field, a file that is not there
    let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    old["crate_version"] = "0.0.1".into();
    let old_file = dir.join("old.json");
    std::fs::write(&old_file, old.to_string()).unwrap();
    let mut broken = old.clone();
    broken["crate_version"] = wgpu_batchnorm::VERSION.into();
    broken["results"][0].as_object_mut().unwrap().remove("gbps");
    let broken_file = dir.join("broken.json");
    std::fs::write(&broken_file, broken.to_string()).unwrap();
    for (file, says) in [
        (&old_file, "0.0.1"),
        (&broken_file, "gbps"),
        (&dir.join("missing.json"), "missing.json"),
    ] {
        let o = run(&["report", files[1].to_str().unwrap(), file.to_str().unwrap()]);
        let stderr = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(file.file_name().unwrap().to_str().unwrap()) && stderr.contains(says),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// `report --svg` keeps every label inside the picture, however long the
/// adapters' names and the cases' labels (the hand-written plot let its
/// last rotated labels run off the right edge); no GPU needed.
#[test]
fn report_svg_keeps_every_label_inside_the_picture() {
    use wgpu_batchnorm::bench::{AdapterDescription, BenchReport, BenchResult, Op};
    let dir = scratch("report_labels");
    let run_of = |name: &str, browser: Option<&str>, dtypes: &[&str]| {
        let mut results = Vec::new();
        for shape in wgpu_batchnorm::bench::default_shapes() {
            let elems: usize = shape.shape.iter().product();
            for dtype in dtypes {
                for (i, op) in Op::ALL.into_iter().enumerate() {
                    let ms = 2.0 + i as f64;
                    let bytes = (elems * 4) as u64 * op.passes();
                    results.push(BenchResult {
                        shape: shape.shape.clone(),
                        axis: shape.axis,
                        dtype: dtype.to_string(),
                        op,
                        median_ms: ms,
                        p25_ms: ms * 0.95,
                        p75_ms: ms * 1.05,
                        min_ms: ms * 0.9,
                        max_ms: ms * 1.3,
                        noisy: false,
                        runs: 10,
                        runs_ms: vec![ms; 10],
                        bytes,
                        gbps: bytes as f64 / (ms * 1e-3) / 1e9,
                        ratio_to_stream: ms / 3.0,
                        ratio_p25: ms / 3.1,
                        ratio_p75: ms / 2.9,
                        max_error: op.is_layer().then_some(1e-7),
                        kernels: None,
                    });
                }
            }
        }
        BenchReport {
            adapter: AdapterDescription {
                name: name.into(),
                backend: "vulkan".into(),
                device_type: "DiscreteGpu".into(),
                driver: "driver".into(),
                driver_info: "1.2.3".into(),
            },
            browser: browser.map(String::from),
            crate_version: wgpu_batchnorm::VERSION.into(),
            timing: "gpu-timestamps".into(),
            results,
        }
    };
    let runs = [
        run_of("llvmpipe (LLVM 15.0.6, 256 bits)", None, &["f32", "f16"]),
        run_of(
            "NVIDIA GeForce RTX 4090 Laptop GPU with a very long adapter name",
            Some("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/140.0.0.0"),
            &["f32"],
        ),
    ];
    let mut args = vec!["report".to_string()];
    for (i, r) in runs.iter().enumerate() {
        let file = dir.join(format!("run{i}.json"));
        std::fs::write(&file, serde_json::to_string(r).unwrap()).unwrap();
        args.push(file.to_str().unwrap().into());
    }
    let svg = dir.join("report.svg");
    args.extend(["--svg".into(), svg.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{}{}", text(&o.stdout), text(&o.stderr));
    let plot = std::fs::read_to_string(&svg).unwrap();
    svg_text::assert_inside(&plot);
    let texts: Vec<String> = svg_text::texts(&plot).into_iter().map(|t| t.text).collect();
    // the last group of the picture: the rightmost rotated label
    assert!(
        texts.iter().any(|t| t == "32x64x56x56 axis 1 f32 backward"),
        "{texts:?}"
    );
    assert!(texts.iter().any(|t| t.contains("Chrome/140.0.0.0")), "{texts:?}");
}
