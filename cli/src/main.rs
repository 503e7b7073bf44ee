//! `wgpu-batchnorm`: runs the layer on this machine's adapter, lists
//! adapters, and checks conformance against Keras reference cases.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
