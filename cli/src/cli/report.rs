//! `report`: several machines' `bench --json` files side by side: one
//! table (GB/s and the fraction of each adapter's own copy bandwidth, per
//! shape, dtype and op) and one grouped bar plot with an axis and a legend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One bench file: the adapter it measured and its figures.
struct Machine {
    label: String,
    /// (shape, axis, dtype, op) -> GB/s
    gbps: BTreeMap<Key, f64>,
}

/// A figure's place: shape, axis, dtype, op.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    shape: Vec<u64>,
    axis: i64,
    dtype: String,
    op: String,
}

impl Key {
    fn case(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(u64::to_string).collect();
        format!("{} axis {} {}", shape.join("x"), self.axis, self.dtype)
    }

    fn copy(&self) -> Key {
        Key {
            op: "copy".into(),
            ..self.clone()
        }
    }
}

/// The layer's operations, in the order of the table and the plot.
const LAYER_OPS: [&str; 3] = ["train_forward", "inference_forward", "backward"];

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
        std::fs::write(path, plot(&machines)).map_err(|e| format!("{}: {e}", path.display()))?;
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
    let field = |v: &Value, k: &str| -> Result<Value, String> {
        v.get(k).cloned().ok_or_else(|| at(format!("a result has no `{k}`")))
    };
    let adapter = json.get("adapter").ok_or_else(|| at("no `adapter`".into()))?;
    let name = adapter
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| at("no `adapter.name`".into()))?;
    let backend = adapter
        .get("backend")
        .and_then(Value::as_str)
        .ok_or_else(|| at("no `adapter.backend`".into()))?;
    let results = json
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| at("`results` is not a list".into()))?;
    let mut gbps = BTreeMap::new();
    for r in results {
        let shape: Vec<u64> = serde_json::from_value(field(r, "shape")?).map_err(|e| at(format!("`shape`: {e}")))?;
        let key = Key {
            shape,
            axis: field(r, "axis")?
                .as_i64()
                .ok_or_else(|| at("`axis` is not an integer".into()))?,
            dtype: field(r, "dtype")?
                .as_str()
                .ok_or_else(|| at("`dtype` is not a string".into()))?
                .into(),
            op: field(r, "op")?
                .as_str()
                .ok_or_else(|| at("`op` is not a string".into()))?
                .into(),
        };
        let value = field(r, "gbps")?
            .as_f64()
            .ok_or_else(|| at("`gbps` is not a number".into()))?;
        gbps.insert(key, value);
    }
    if gbps.is_empty() {
        return Err(at("no results".into()));
    }
    Ok(Machine {
        label: format!("{name} ({backend})"),
        gbps,
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

/// Every (case, op) of the layer any machine measured, in order.
fn rows(machines: &[Machine]) -> Vec<Key> {
    let mut keys: Vec<Key> = machines
        .iter()
        .flat_map(|m| m.gbps.keys())
        .filter(|k| LAYER_OPS.contains(&k.op.as_str()))
        .cloned()
        .collect();
    keys.sort_by(|a, b| {
        (&a.shape, a.axis, &a.dtype, LAYER_OPS.iter().position(|o| *o == a.op)).cmp(&(
            &b.shape,
            b.axis,
            &b.dtype,
            LAYER_OPS.iter().position(|o| *o == b.op),
        ))
    });
    keys.dedup();
    keys
}

/// GB/s and the fraction of the machine's copy of the same shape and dtype.
fn figure(m: &Machine, key: &Key) -> Option<(f64, Option<f64>)> {
    let gbps = *m.gbps.get(key)?;
    let copy = m.gbps.get(&key.copy()).copied().filter(|c| *c > 0.0);
    Some((gbps, copy.map(|c| gbps / c)))
}

fn table(machines: &[Machine]) -> String {
    let mut out = String::from("| shape, axis, dtype | op |");
    for m in machines {
        out += &format!(" {} |", m.label.replace('|', "/"));
    }
    out += "\n| --- | --- |";
    out += &" --- |".repeat(machines.len());
    out += "\n";
    for key in rows(machines) {
        out += &format!("| {} | {} |", key.case(), key.op);
        for m in machines {
            out += &match figure(m, &key) {
                Some((gbps, Some(f))) => format!(" {} GB/s ({:.0}% of copy) |", figures(gbps), f * 100.0),
                Some((gbps, None)) => format!(" {} GB/s (no copy figure) |", figures(gbps)),
                None => " not measured |".into(),
            };
        }
        out += "\n";
    }
    out += "\nGB/s: bytes a perfect implementation moves over the median time; % of copy: over the same \
            adapter's buffer copy of the same size (its own bandwidth). Small shapes measure fixed costs \
            (submission, a copy a driver may shortcut): compare adapters on shapes of megabytes.\n";
    out
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// Grouped bars: a group per (case, op), a bar per machine, the height the
/// fraction of that machine's copy bandwidth; a y axis with ticks and a
/// legend of the adapters.
fn plot(machines: &[Machine]) -> String {
    let rows = rows(machines);
    let fractions: Vec<Vec<Option<f64>>> = rows
        .iter()
        .map(|k| machines.iter().map(|m| figure(m, k).and_then(|f| f.1)).collect())
        .collect();
    let top_value = fractions
        .iter()
        .flatten()
        .flatten()
        .filter(|f| f.is_finite())
        .fold(0.0f64, |a, &b| a.max(b));
    // ticks every 0.25 (past 2.5, a power of ten times 1, 2 or 5, so that
    // there are never more than about ten) up to the tallest bar
    let step = tick_step(top_value);
    let y_max = ((top_value / step).ceil() * step).max(step);
    let (bar_w, gap, height, left, legend_h) = (12.0, 18.0, 300.0, 70.0, 18.0 * machines.len() as f64);
    let top = 40.0 + legend_h;
    let group_w = bar_w * machines.len() as f64 + gap;
    let width = (left + group_w * rows.len() as f64 + 40.0).max(520.0);
    let bottom = top + height;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{:.0}\" font-family=\"sans-serif\" \
         font-size=\"11\">\n",
        bottom + 190.0
    );
    svg += &format!(
        "<text x=\"{left}\" y=\"18\" font-size=\"14\">wgpu-batchnorm across adapters: fraction of each adapter's \
         own copy bandwidth</text>\n"
    );
    for (i, m) in machines.iter().enumerate() {
        let y = 30.0 + 18.0 * i as f64;
        svg += &format!(
            "<rect x=\"{left}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            COLORS[i % COLORS.len()],
            left + 18.0,
            y + 10.0,
            escape(&m.label)
        );
    }
    // the y axis, its ticks and its label
    svg += &format!("<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"black\"/>\n");
    let ticks = (y_max / step).round() as usize;
    for t in 0..=ticks {
        let v = t as f64 * step;
        let y = bottom - v / y_max * height;
        svg += &format!(
            "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{left}\" y2=\"{y:.1}\" stroke=\"black\"/><text x=\"{}\" y=\"{:.1}\" \
             text-anchor=\"end\">{v:.2}</text>\n",
            left - 4.0,
            left - 6.0,
            y + 4.0
        );
        if t > 0 {
            svg += &format!(
                "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#dddddd\"/>\n",
                width - 20.0
            );
        }
    }
    svg += &format!(
        "<text transform=\"translate(16,{:.1}) rotate(-90)\" text-anchor=\"middle\">fraction of copy bandwidth</text>\n",
        top + height / 2.0
    );
    // the x axis: a group per case and op
    svg += &format!(
        "<line x1=\"{left}\" y1=\"{bottom}\" x2=\"{:.1}\" y2=\"{bottom}\" stroke=\"black\"/>\n",
        width - 20.0
    );
    for (g, (key, bars)) in rows.iter().zip(&fractions).enumerate() {
        let x0 = left + gap / 2.0 + g as f64 * group_w;
        for (i, f) in bars.iter().enumerate() {
            let Some(f) = f.filter(|f| f.is_finite()) else {
                continue;
            };
            let h = f / y_max * height;
            svg += &format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bar_w}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {} {}: \
                 {:.0}% of copy</title></rect>\n",
                x0 + i as f64 * bar_w,
                bottom - h,
                COLORS[i % COLORS.len()],
                escape(&machines[i].label),
                escape(&key.case()),
                key.op,
                f * 100.0
            );
        }
        svg += &format!(
            "<text transform=\"translate({:.1},{:.1}) rotate(45)\">{} {}</text>\n",
            x0,
            bottom + 12.0,
            escape(&key.case()),
            key.op
        );
    }
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">shape, axis, dtype and op</text>\n",
        left + (width - left) / 2.0,
        bottom + 180.0
    );
    svg += "</svg>\n";
    svg
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

/// The tick spacing of an axis up to `top`: 0.25 up to 2.5, else the
/// first of 1, 2 or 5 times a power of ten giving at most ten ticks.
fn tick_step(top: f64) -> f64 {
    if top <= 2.5 {
        return 0.25;
    }
    let mut unit = 10f64.powf((top / 10.0).log10().floor());
    loop {
        for m in [1.0, 2.0, 5.0] {
            if top / (m * unit) <= 10.0 {
                return m * unit;
            }
        }
        unit *= 10.0;
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::tick_step;

    #[test]
    fn ticks_stay_few_whatever_the_tallest_bar() {
        for top in [0.0, 0.3, 2.5, 2.6, 9.0, 11.0, 1234.5, 1e12] {
            let step = tick_step(top);
            assert!(step > 0.0);
            assert!(top / step <= 10.5, "{top}: step {step}");
        }
        assert_eq!(tick_step(1.0), 0.25);
    }
}
