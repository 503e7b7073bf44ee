//! The command-line tool.

mod adapters;
mod bench;
mod conform;
mod demo;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use wgpu_batchnorm::{AdapterSelection, GpuContext, KernelChoice};

#[derive(Parser, Debug)]
#[command(
    name = "wgpu-batchnorm",
    version,
    about = "Keras BatchNormalization on wgpu: run, list adapters, check conformance, benchmark, compare machines"
)]
struct Cli {
    /// Backend to use (default: WGPU_BACKEND, else all).
    #[arg(long, global = true, value_enum)]
    backend: Option<BackendArg>,
    /// Use the first adapter whose name contains this (default: WGPU_ADAPTER_NAME).
    #[arg(long, global = true, value_name = "SUBSTRING")]
    adapter: Option<String>,
    /// Kernel family (default: WGPU_BATCHNORM_KERNELS, else auto: tuned plans, serial on CPUs, coalesced on GPUs).
    #[arg(long, global = true, value_enum)]
    kernels: Option<KernelsArg>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every adapter wgpu sees, with the limits and features that matter here.
    Adapters,
    /// Measure the layer against a buffer copy and a streaming kernel on this adapter.
    Bench(bench::BenchArgs),
    /// Run Keras reference cases (DIR/*.safetensors) and report conformance.
    Conform {
        /// Folder of case files.
        dir: PathBuf,
        /// Write `OUT/<file stem>.safetensors` (one per case file) with every output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run on the GPU or on the float64 CPU reference.
        #[arg(long, value_enum, default_value_t = DeviceArg::Gpu)]
        device: DeviceArg,
    },
    /// Put several machines' `bench --json` files side by side: a table and a plot across adapters.
    Report {
        /// Bench JSON files, one per machine or adapter.
        files: Vec<PathBuf>,
        /// Write the plot (grouped bars, a bar per adapter) as SVG.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Write the table as Markdown.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BackendArg {
    Vulkan,
    Gl,
    Metal,
    Dx12,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum KernelsArg {
    Serial,
    Coalesced,
    Auto,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceArg {
    Gpu,
    Cpu,
}

/// Which adapter to open and which kernels it runs.
pub(crate) struct Target {
    pub(crate) selection: AdapterSelection,
    /// `--kernels`; `None` leaves the context's own choice (the environment's).
    pub(crate) kernels: Option<KernelChoice>,
}

impl Cli {
    fn target(&self) -> Target {
        Target {
            selection: self.selection(),
            kernels: self.kernels.map(|k| match k {
                KernelsArg::Serial => KernelChoice::Serial,
                KernelsArg::Coalesced => KernelChoice::Coalesced,
                KernelsArg::Auto => KernelChoice::Auto,
            }),
        }
    }

    fn selection(&self) -> AdapterSelection {
        let env = AdapterSelection::from_env();
        AdapterSelection {
            backends: self
                .backend
                .map(|b| match b {
                    BackendArg::Vulkan => wgpu::Backends::VULKAN,
                    BackendArg::Gl => wgpu::Backends::GL,
                    BackendArg::Metal => wgpu::Backends::METAL,
                    BackendArg::Dx12 => wgpu::Backends::DX12,
                })
                .or(env.backends),
            name: self.adapter.clone().or(env.name),
            // set by open() from --kernels, so that a bad variable never
            // stops a run that names its kernels
            kernels: None,
        }
    }
}

/// Exit codes: 0 success, 1 a check failed, 2 usage or I/O error.
pub(crate) const EXIT_FAIL: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            e.print().ok();
            return ExitCode::from(code);
        }
    };
    let target = cli.target();
    let result = match &cli.command {
        None => demo::run(&target),
        Some(Command::Adapters) => adapters::run(&target.selection),
        Some(Command::Bench(args)) => bench::run(&target, args),
        Some(Command::Conform { dir, out, device }) => conform::run(&target, dir, out.as_deref(), *device),
        Some(Command::Report { files, svg, markdown }) => report::run(files, svg.as_deref(), markdown.as_deref()),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("wgpu-batchnorm: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Opens the selected adapter, with the error text as the message, applies
/// `--kernels` (which beats `WGPU_BATCHNORM_KERNELS`), and runs the plans
/// `bench --tune` cached for it (a corrupt cache is a warning; the default
/// plans run).
pub(crate) fn open(target: &Target) -> Result<GpuContext, String> {
    let selection = AdapterSelection {
        kernels: target.kernels,
        ..target.selection.clone()
    };
    let ctx = GpuContext::new(&selection).map_err(|e| e.to_string())?;
    if let Err(e) = ctx.reload_tuning_cache() {
        eprintln!("wgpu-batchnorm: ignoring the tuning cache ({e}); the default plans run");
    }
    Ok(ctx)
}

/// Milliseconds, three significant digits.
pub(crate) fn ms(d: std::time::Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}
