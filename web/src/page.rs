//! The conformance and benchmark page: opened in any browser with WebGPU,
//! it shows the adapter, runs the public Keras cases, then the benchmark
//! of the command-line tool's `bench`, and offers the result as the same
//! JSON that `wgpu-batchnorm report` puts beside native runs.

use wasm_bindgen::prelude::*;
use web_sys::{Document, Element};
use wgpu_batchnorm::keras::{CaseReport, Device};
use wgpu_batchnorm::{AdapterSelection, GpuContext, KernelChoice};

use crate::bench::Browser;
use crate::cases::public_cases;

fn document() -> Document {
    web_sys::window().and_then(|w| w.document()).expect("a page")
}

pub(crate) fn element(id: &str) -> Element {
    document()
        .get_element_by_id(id)
        .unwrap_or_else(|| panic!("the page has no #{id}"))
}

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Sets the page's state (`data-state` on the body: `running`, `done`,
/// `failed`), which the end-to-end test waits on, and its status line.
pub(crate) fn status(state: &str, message: &str) {
    let body = document().body().expect("a body");
    body.set_attribute("data-state", state).ok();
    element("status").set_text_content(Some(message));
}

/// The adapter as the page shows it: what it says of itself, the limits
/// the layer uses, and the features that change which kernels run.
fn adapter_html(ctx: &GpuContext) -> String {
    let limits = ctx.device().limits();
    let features = ctx.device().features();
    let mut rows = Vec::new();
    if let Some(info) = ctx.adapter_info() {
        // wgpu's view of the adapter, beside the browser's GPUAdapterInfo above
        rows.push(("wgpu name", info.name.clone()));
        rows.push(("wgpu vendor id", format!("{:#x}", info.vendor)));
        rows.push(("wgpu device id", format!("{:#x}", info.device)));
        rows.push(("wgpu device type", format!("{:?}", info.device_type)));
        rows.push(("wgpu driver", format!("{} {}", info.driver, info.driver_info)));
        rows.push(("wgpu backend", info.backend.to_string()));
    }
    rows.push((
        "max storage binding",
        format!("{} MiB", limits.max_storage_buffer_binding_size >> 20),
    ));
    rows.push(("max buffer", format!("{} MiB", limits.max_buffer_size >> 20)));
    rows.push((
        "storage buffers a stage",
        limits.max_storage_buffers_per_shader_stage.to_string(),
    ));
    rows.push((
        "workgroups a dimension",
        limits.max_compute_workgroups_per_dimension.to_string(),
    ));
    let has = |f: wgpu::Features| if features.contains(f) { "yes" } else { "no" };
    rows.push(("timestamp queries", has(wgpu::Features::TIMESTAMP_QUERY).to_string()));
    rows.push((
        "subgroups",
        "not offered to WebGPU by wgpu 30: the workgroup-memory reductions run".to_string(),
    ));
    rows.iter()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v)))
        .collect()
}

fn case_row(kernels: &str, report: &CaseReport) -> String {
    let verdict = if report.passes() { "PASS" } else { "FAIL" };
    let errors: Vec<String> = report
        .keys
        .iter()
        .map(|k| format!("{}={:.2e}", k.key, k.error))
        .chain(report.failure.iter().map(|f| format!("failure: {f}")))
        .collect();
    format!(
        "<tr class=\"{}\"><td>{}</td><td>{}</td><td class=\"verdict\">{verdict}</td><td>{}</td></tr>",
        verdict.to_lowercase(),
        escape(&report.name),
        kernels,
        escape(&errors.join("  "))
    )
}

/// Runs the page: adapter, conformance, then the benchmark. `browser` is
/// the JSON the page's script passes: `{"adapter": GPUAdapterInfo's
/// fields, "browser": navigator.userAgent}`.
#[wasm_bindgen]
pub async fn run_page(browser: String) -> Result<(), JsValue> {
    let browser = Browser::parse(&browser);
    console_error_panic_hook_set();
    status("running", "opening the WebGPU adapter");
    let ctx = match GpuContext::new_async(&AdapterSelection::default()).await {
        Ok(ctx) => ctx,
        Err(e) => {
            status("failed", &format!("no WebGPU adapter: {e}"));
            return Err(JsValue::from_str(&e.to_string()));
        }
    };
    element("adapter").set_inner_html(&adapter_html(&ctx));

    let cases = public_cases();
    let mut rows = String::new();
    let mut failed = 0;
    for (kernels, choice) in [("serial", KernelChoice::Serial), ("coalesced", KernelChoice::Coalesced)] {
        ctx.set_kernel_choice(choice);
        for (i, case) in cases.iter().enumerate() {
            status(
                "running",
                &format!(
                    "conformance, {kernels} kernels: {} ({}/{})",
                    case.name,
                    i + 1,
                    cases.len()
                ),
            );
            let report = case.run_async(&Device::Gpu(ctx.clone())).await;
            failed += usize::from(!report.passes());
            rows.push_str(&case_row(kernels, &report));
            element("cases").set_inner_html(&rows);
        }
    }
    if let Err(e) = ctx.gpu_errors().await {
        status("failed", &format!("GPU error: {e}"));
        return Err(JsValue::from_str(&e.to_string()));
    }
    ctx.set_kernel_choice(KernelChoice::Auto);
    let summary = format!("{}/{} cases pass", 2 * cases.len() - failed, 2 * cases.len());
    element("conformance-summary").set_text_content(Some(&summary));
    if failed > 0 {
        status("failed", &format!("{summary}: the benchmark did not run"));
        return Err(JsValue::from_str(&summary));
    }
    crate::bench::run(&ctx, &summary, &browser).await
}

fn console_error_panic_hook_set() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&JsValue::from_str(&info.to_string()));
        status("failed", &format!("panic: {info}"));
    }));
}
