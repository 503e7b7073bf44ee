//! The page's benchmark: the command-line tool's runner, its table, plot
//! and JSON (filled in once the runner runs in a browser).

use wasm_bindgen::prelude::*;
use wgpu_batchnorm::GpuContext;

pub(crate) async fn run(_ctx: &GpuContext, summary: &str, _browser: &str) -> Result<(), JsValue> {
    super::page_status("done", summary);
    Ok(())
}
