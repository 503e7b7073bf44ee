//! `wgpu-batchnorm conform DIR`: Keras reference cases, one row each.

use std::path::{Path, PathBuf};

use wgpu_batchnorm::keras::{self, Device, KerasCase};

use super::{DeviceArg, EXIT_FAIL, Target};

pub(crate) fn run(target: &Target, dir: &Path, out: Option<&Path>, device: DeviceArg) -> Result<u8, String> {
    // Read every case first: a bad file is a usage error, not a failed case.
    let cases = keras::load_dir(dir).map_err(|e| e.to_string())?;
    // every output path is settled before any case runs
    let outputs = match out {
        Some(out) => {
            std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
            Some(plan_outputs(&cases, out)?)
        }
        None => None,
    };
    let device = match device {
        DeviceArg::Gpu => {
            let ctx = super::open(target)?;
            println!("adapter: {}", ctx.describe());
            Device::Gpu(ctx)
        }
        DeviceArg::Cpu => {
            println!("device: cpu reference");
            Device::Cpu
        }
    };
    let width = cases.iter().map(|c| c.name.len()).max().unwrap_or(4).max(4);
    let mut passed = 0;
    for (i, case) in cases.iter().enumerate() {
        let report = case.run(&device);
        let verdict = if report.passes() { "PASS" } else { "FAIL" };
        let mut row = format!("{:width$}  {verdict}", report.name);
        for k in &report.keys {
            let mark = if k.passes() { "" } else { "!" };
            row += &format!("  {}={:.2e}{mark}", k.key, k.error);
        }
        if let Some(reason) = &report.failure {
            row += &format!("  ({reason})");
        }
        println!("{row}");
        if report.passes() {
            passed += 1;
        }
        if let Some(paths) = &outputs {
            keras::write_outputs_as(&report, &paths[i]).map_err(|e| e.to_string())?;
        }
    }
    println!("{passed}/{} cases pass", cases.len());
    Ok(if passed == cases.len() { 0 } else { EXIT_FAIL })
}

/// `OUT/<file stem>.safetensors` for every case: named after the input
/// file, not the case's metadata name (which may say `../x` or `/abs/x`).
/// Refused when two cases would write one file, when an output would
/// replace a case (OUT is DIR), or when an output path exists as something
/// other than a regular file (a link would write outside OUT, a FIFO block).
fn plan_outputs(cases: &[KerasCase], out: &Path) -> Result<Vec<PathBuf>, String> {
    let mut paths: Vec<PathBuf> = Vec::with_capacity(cases.len());
    for case in cases {
        let stem = case
            .path
            .file_stem()
            .ok_or_else(|| format!("{}: no file name", case.path.display()))?;
        let mut name = stem.to_os_string();
        name.push(".safetensors");
        let path = out.join(name);
        if let Some(k) = paths.iter().position(|p| *p == path) {
            return Err(format!(
                "{} and {} would both write {}",
                cases[k].path.display(),
                case.path.display(),
                path.display()
            ));
        }
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.is_file() {
                return Err(format!(
                    "{}: exists and is not a regular file; not writing through it",
                    path.display()
                ));
            }
            if let Some(input) = cases.iter().find(|c| same_file(&c.path, &path)) {
                return Err(format!(
                    "{}: --out would overwrite the case {} with its outputs",
                    path.display(),
                    input.path.display()
                ));
            }
        }
        paths.push(path);
    }
    Ok(paths)
}

/// Whether two existing paths are one file (links and `..` resolved).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}
