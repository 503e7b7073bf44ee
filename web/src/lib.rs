//! wgpu-batchnorm in the browser. The conformance and benchmark page
//! (`run_page`) and what the browser tests share live here; natively this
//! crate is empty.
#![cfg(target_arch = "wasm32")]

mod bench;
pub mod cases;
mod page;

pub use page::run_page;
