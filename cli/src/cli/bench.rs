//! `wgpu-batchnorm bench`: the layer against a copy and a streaming kernel
//! on the same adapter, in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};

use wgpu_batchnorm::bench::{self, BenchOptions, BenchReport, BenchShape};
use wgpu_batchnorm::tuning::TuningCache;
use wgpu_batchnorm::{DType, GpuContext};

use super::{EXIT_FAIL, Target};

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// A shape to measure instead of the defaults, e.g. 32,56,56,64 (repeatable).
    #[arg(long = "shape", value_parser = parse_shape)]
    shapes: Vec<Vec<usize>>,
    /// The feature axis of each --shape (one for all, or one per shape; default -1).
    #[arg(long = "axis", allow_negative_numbers = true)]
    axes: Vec<i64>,
    /// Element types to measure.
    #[arg(long, value_enum, default_value_t = DTypes::Both)]
    dtype: DTypes,
    /// Timed rounds, each timing every figure of a shape once, in turn (the median is reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Untimed rounds first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Few runs, float32 only: a correctness and smoke check in under a minute.
    #[arg(long)]
    quick: bool,
    /// Time candidate plans for every shape and call, write the fastest to the tuning cache
    /// (then measure with them if --json or --svg is given).
    #[arg(long)]
    tune: bool,
    /// Write every figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw GB/s per shape and operation beside the baselines.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DTypes {
    F32,
    F16,
    Both,
}

fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let shape: Result<Vec<usize>, _> = s.split(',').map(|d| d.trim().parse::<usize>()).collect();
    match shape {
        Ok(v) if !v.is_empty() && v.len() <= 8 && !v.contains(&0) => {
            // the adapter's limits are checked once it is open; this only keeps
            // the element count (and its float64 copies) countable
            match v.iter().try_fold(8usize, |n, &d| n.checked_mul(d)) {
                Some(_) => Ok(v),
                None => Err(format!("{s:?} is too large: its size in bytes overflows")),
            }
        }
        _ => Err(format!("{s:?} is not a shape like 32,56,56,64 (1 to 8 positive sizes)")),
    }
}

pub(crate) fn run(target: &Target, args: &BenchArgs) -> Result<u8, String> {
    let shapes = if args.shapes.is_empty() {
        if !args.axes.is_empty() {
            return Err("--axis needs --shape".into());
        }
        bench::default_shapes()
    } else {
        let axes = match args.axes.len() {
            0 => vec![-1; args.shapes.len()],
            1 => vec![args.axes[0]; args.shapes.len()],
            n if n == args.shapes.len() => args.axes.clone(),
            n => return Err(format!("{n} --axis values for {} --shape values", args.shapes.len())),
        };
        args.shapes
            .iter()
            .zip(axes)
            .map(|(shape, axis)| BenchShape {
                shape: shape.clone(),
                axis,
            })
            .collect()
    };
    let dtypes = match (args.quick, args.dtype) {
        (true, _) | (_, DTypes::F32) => vec![DType::F32],
        (_, DTypes::F16) => vec![DType::F16],
        (_, DTypes::Both) => vec![DType::F32, DType::F16],
    };
    let (runs, warmup) = if args.quick {
        (3, 1)
    } else {
        (args.runs.max(1), args.warmup)
    };
    let options = BenchOptions {
        shapes,
        dtypes,
        warmup,
        runs,
    };
    // a path that cannot be written is refused now, not after minutes of measuring
    let mut json = args.json.as_deref().map(|p| OutputFile::open("json", p)).transpose()?;
    let mut svg = args.svg.as_deref().map(|p| OutputFile::open("svg", p)).transpose()?;
    let ctx = super::open(target)?;
    println!("adapter: {}", ctx.describe());
    let mut code = 0;
    if args.tune {
        if tune(&ctx, &options)? {
            code = EXIT_FAIL;
        }
        if json.is_none() && svg.is_none() {
            return Ok(code);
        }
        // the figures below run the plans just written
        ctx.reload_tuning_cache().map_err(|e| e.to_string())?;
        ctx.set_plan_tuning(None).map_err(|e| e.to_string())?;
    }
    let bar = indicatif::ProgressBar::new(bench::run_steps(&options) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").map_err(|e| e.to_string())?);
    let report = bench::run(&ctx, &options, |p| {
        bar.set_position(p.done as u64);
        bar.set_message(p.to_string());
    })
    .map_err(|e| e.to_string());
    bar.finish_and_clear();
    let report = report?;
    print_table(&report);
    if let Some(file) = &mut json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        file.write(text.as_bytes())?;
    }
    if let Some(file) = &mut svg {
        file.write(bench::plot::run_svg(&report)?.as_bytes())?;
    }
    Ok(code)
}

/// `--tune`: times the candidates, prints one line per shape, dtype and
/// call, and writes the winners into the tuning cache. Returns whether any
/// candidate failed its check.
fn tune(ctx: &GpuContext, options: &BenchOptions) -> Result<bool, String> {
    let err = |e: wgpu_batchnorm::Error| e.to_string();
    let total = bench::tune_steps(ctx, options).map_err(err)? as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").map_err(|e| e.to_string())?);
    let report = bench::tune(ctx, options, |label| {
        bar.set_message(label.to_string());
        bar.inc(1);
    })
    .map_err(err);
    bar.finish_and_clear();
    let report = report?;
    println!("tuning: fastest of the candidate plans, against the default plan");
    for r in &report.results {
        let shape = r
            .shape
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let what = format!("{shape} axis {} {} {}", r.shape.axis, r.dtype, r.op.name());
        for c in &r.candidates {
            if let Some(failure) = &c.failure {
                println!("  FAIL {what}: {}: {failure}", c.tuning.describe());
            }
        }
        let n = r.candidates.len();
        match (r.chosen_plan(), r.speedup) {
            (Some(c), Some(speedup)) => {
                let ms = c.median_ms.unwrap_or(f64::NAN);
                let verdict = if r.chosen == Some(0) {
                    "the default".to_string()
                } else {
                    format!("{speedup:.2}x the default")
                };
                println!(
                    "{what}: {} ({ms:.3} ms, {verdict}; {n} candidates)",
                    c.tuning.describe()
                );
            }
            (Some(_), None) => println!("{what}: the default plan did not run; nothing cached ({n} candidates)"),
            (None, _) => println!("{what}: no candidate passed; nothing cached ({n} candidates)"),
        }
    }
    let mut cache = TuningCache::load().unwrap_or_else(|e| {
        eprintln!("wgpu-batchnorm: replacing the tuning cache ({e})");
        TuningCache::default()
    });
    let entries = report.entries();
    let written = entries.len();
    for entry in entries {
        cache.insert(entry);
    }
    let path = cache.save().map_err(err)?;
    println!("tuning cache: {} ({written} plans written)", path.display());
    Ok(report.any_failed())
}

/// A `--json` or `--svg` file, opened before the benchmark runs. A file
/// this run created is removed again if the run ends before writing it.
struct OutputFile {
    path: PathBuf,
    file: std::fs::File,
    created: bool,
    written: bool,
}

impl OutputFile {
    fn open(flag: &str, path: &Path) -> Result<Self, String> {
        let created = std::fs::symlink_metadata(path).is_err();
        // not truncated yet: a refused or failed run leaves an existing file as it was
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| match path.parent() {
                Some(dir) if e.kind() == std::io::ErrorKind::NotFound && !dir.as_os_str().is_empty() => {
                    format!(
                        "--{flag} {}: cannot write it: the folder {} does not exist",
                        path.display(),
                        dir.display()
                    )
                }
                _ => format!("--{flag} {}: cannot write it: {e}", path.display()),
            })?;
        Ok(OutputFile {
            path: path.to_path_buf(),
            file,
            created,
            written: false,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let bad = |e: std::io::Error| format!("{}: {e}", self.path.display());
        self.written = true;
        // a regular file is replaced; /dev/stdout or a pipe cannot be truncated
        if self.file.metadata().map_err(bad)?.is_file() {
            self.file.set_len(0).map_err(bad)?;
        }
        self.file.write_all(bytes).map_err(bad)?;
        self.file.flush().map_err(bad)
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn print_table(report: &BenchReport) {
    println!(
        "timing: {}, interleaved rounds (median of runs; spread: interquartile range over the median; \
         GB/s counts the bytes a perfect pass moves; x stream: median of each round's ratio)",
        report.timing
    );
    println!(
        "{:<20} {:>4} {:<4} {:<18} {:>10} {:>7} {:>8} {:>9} {:>10}  kernels",
        "shape", "axis", "type", "op", "ms", "spread", "GB/s", "x stream", "max error"
    );
    let mut noisy = false;
    for r in &report.results {
        let shape = r.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let error = r.max_error.map(|e| format!("{e:.1e}")).unwrap_or_else(|| "-".into());
        let kernels = match &r.kernels {
            Some(k) if k.tuned => format!("{} (tuned)", k.strategy),
            Some(k) => k.strategy.to_string(),
            None => "-".into(),
        };
        let mark = if r.noisy { "!" } else { " " };
        noisy |= r.noisy;
        println!(
            "{:<20} {:>4} {:<4} {:<18} {:>10.3} {:>6.0}%{mark}{:>8.2} {:>9.2} {:>10}  {}",
            shape,
            r.axis,
            r.dtype,
            r.op.name(),
            r.median_ms,
            r.spread() * 100.0,
            r.gbps,
            r.ratio_to_stream,
            error,
            kernels
        );
    }
    if noisy {
        println!(
            "! spread above {:.0}% of the median: the machine was too busy for that figure to be trusted",
            bench::NOISY_SPREAD * 100.0
        );
    }
}
