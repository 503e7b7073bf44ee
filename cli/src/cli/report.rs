//! `report`: several machines' `bench --json` files side by side: one
//! table (GB/s and the fraction of each adapter's own copy bandwidth, per
//! shape, dtype and op) and one grouped bar plot with an axis and a legend
//! (the library's `bench::plot`, which the web page draws with too).

use std::path::{Path, PathBuf};

use serde_json::Value;
use wgpu_batchnorm::bench::{self, BenchReport};

/// One bench file: its figures and the label its column and bars get.
struct Machine {
    label: String,
    report: BenchReport,
}

pub(crate) fn run(files: &[PathBuf], svg: Option<&Path>, markdown: Option<&Path>) -> Result<u8, String> {
    if files.is_empty() {
        return Err("report needs at least one bench JSON file (from `bench --json FILE`)".into());
    }
    // outputs checked before anything is read or printed
    for path in [svg, markdown].into_iter().flatten() {
        check_output(path)?;
    }
    let mut machines = files.iter().map(|f| read(f)).collect::<Result<Vec<_>, _>>()?;
    disambiguate(&mut machines, files);
    let table = table(&machines);
    if let Some(path) = markdown {
        std::fs::write(path, &table).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = svg {
        let runs: Vec<(&str, &BenchReport)> = machines.iter().map(|m| (m.label.as_str(), &m.report)).collect();
        let picture = bench::plot::report_svg(&runs)?;
        std::fs::write(path, picture).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    print!("{table}");
    Ok(0)
}

/// An output path must be a file (or nothing yet) in an existing folder.
fn check_output(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{}: is a folder, not a file to write", path.display()));
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(format!(
            "{}: the folder {} does not exist",
            path.display(),
            dir.display()
        )),
        _ => Ok(()),
    }
}

/// A `bench --json` file of this crate version: files written before the
/// spread fields existed read too (they have no quartiles and no `noisy`),
/// and so do a browser page's (its `browser` names the browser).
fn read(path: &Path) -> Result<Machine, String> {
    let at = |m: String| format!("{}: {m}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| at(format!("not JSON: {e}")))?;
    let version = json
        .get("crate_version")
        .and_then(Value::as_str)
        .ok_or_else(|| at("no `crate_version`: not a `bench --json` file of wgpu-batchnorm".into()))?;
    let ours = wgpu_batchnorm::VERSION;
    if version != ours {
        return Err(at(format!(
            "written by wgpu-batchnorm {version}, this is {ours}: its figures may not compare; rerun \
             `bench --json` with this version"
        )));
    }
    let report: BenchReport =
        serde_json::from_value(json).map_err(|e| at(format!("not a `bench --json` file: {e}")))?;
    if report.results.is_empty() {
        return Err(at("no results".into()));
    }
    Ok(Machine {
        label: report.label(),
        report,
    })
}

/// Two files of one adapter (two machines alike, or two runs) get their
/// file names added.
fn disambiguate(machines: &mut [Machine], files: &[PathBuf]) {
    let labels: Vec<String> = machines.iter().map(|m| m.label.clone()).collect();
    let stem = |f: &PathBuf| {
        f.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let stems: Vec<String> = files.iter().map(stem).collect();
    for (i, (m, file)) in machines.iter_mut().zip(files).enumerate() {
        if labels.iter().filter(|l| **l == labels[i]).count() > 1 {
            // the file name, or its whole path where two names are alike,
            // and its place on the command line where the path is too
            let mut name = if stems.iter().filter(|s| **s == stems[i]).count() > 1 {
                file.display().to_string()
            } else {
                stems[i].clone()
            };
            if files.iter().filter(|f| *f == file).count() > 1 {
                name = format!("{name} #{}", i + 1);
            }
            m.label = format!("{} [{name}]", m.label);
        }
    }
}

fn table(machines: &[Machine]) -> String {
    let mut out = String::from("| shape, axis, dtype | op |");
    for m in machines {
        out += &format!(" {} |", m.label.replace('|', "/"));
    }
    out += "\n| --- | --- |";
    out += &" --- |".repeat(machines.len());
    out += "\n";
    let reports: Vec<&BenchReport> = machines.iter().map(|m| &m.report).collect();
    let mut noisy = false;
    for key in bench::layer_rows(&reports) {
        out += &format!("| {} | {} |", key.case(), key.op.name());
        for m in machines {
            out += &match m.report.figure(&key) {
                Some(r) => {
                    let mark = if r.noisy { " !" } else { "" };
                    noisy |= r.noisy;
                    match m.report.fraction_of_copy(&key) {
                        Some(f) => format!(" {} GB/s ({}% of copy){mark} |", figures(r.gbps), figures(f * 100.0)),
                        None => format!(" {} GB/s (no copy figure){mark} |", figures(r.gbps)),
                    }
                }
                None => " not measured |".into(),
            };
        }
        out += "\n";
    }
    out += "\nGB/s: bytes a perfect implementation moves over the median time; % of copy: over the same \
            adapter's buffer copy of the same size (its own bandwidth). Small shapes measure fixed costs \
            (submission, a copy a driver may shortcut): compare adapters on shapes of megabytes.\n";
    if noisy {
        out += &format!(
            "!: the runs' interquartile range was above {:.0}% of their median: the machine was too busy \
             for that figure to be trusted.\n",
            bench::NOISY_SPREAD * 100.0
        );
    }
    out
}

/// Three significant figures (small shapes run at a few MB/s).
fn figures(gbps: f64) -> String {
    if gbps >= 100.0 || gbps == 0.0 || !gbps.is_finite() {
        format!("{gbps:.0}")
    } else {
        let decimals = (2 - gbps.abs().log10().floor() as i32).max(0) as usize;
        format!("{gbps:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::figures;

    #[test]
    fn three_significant_figures() {
        assert_eq!(figures(123.4), "123");
        assert_eq!(figures(12.345), "12.3");
        assert_eq!(figures(0.01234), "0.0123");
        assert_eq!(figures(f64::NAN), "NaN");
    }
}
