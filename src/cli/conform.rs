//! `wgpu-batchnorm conform DIR`: Keras reference cases, one row each.

use std::path::Path;

use wgpu_batchnorm::AdapterSelection;
use wgpu_batchnorm::keras::{self, Device};

use super::{DeviceArg, EXIT_FAIL};

pub(crate) fn run(
    selection: &AdapterSelection,
    dir: &Path,
    out: Option<&Path>,
    device: DeviceArg,
) -> Result<u8, String> {
    // Read every case first: a bad file is a usage error, not a failed case.
    let cases = keras::load_dir(dir).map_err(|e| e.to_string())?;
    if let Some(out) = out {
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let device = match device {
        DeviceArg::Gpu => {
            let ctx = super::open(selection)?;
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
    for case in &cases {
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
        if let Some(out) = out {
            keras::write_outputs(&report, out).map_err(|e| e.to_string())?;
        }
    }
    println!("{passed}/{} cases pass", cases.len());
    Ok(if passed == cases.len() { 0 } else { EXIT_FAIL })
}
