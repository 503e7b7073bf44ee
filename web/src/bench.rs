//! The page's benchmark: the command-line tool's runner
//! (`bench::run_async`, interleaved rounds, quartiles, noisy flags) with a
//! progress bar, the tool's table, a plot of each call's fraction of the
//! copy bandwidth drawn on a canvas by the plotters code that writes the
//! tool's SVG, and the result as the tool's
//! bench JSON (the browser recorded), which `wgpu-batchnorm report` puts
//! beside native runs.

use plotters::prelude::IntoDrawingArea;
use plotters_canvas::CanvasBackend;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{HtmlCanvasElement, HtmlProgressElement};
use wgpu_batchnorm::bench::{self, BenchOptions, BenchReport, BenchShape};
use wgpu_batchnorm::{DType, GpuContext};

use crate::page::{element, escape, status};

/// What the page measures: the tool's `bench` (its default shapes, float32
/// and float16, 3 warm-up and 10 timed rounds), or with `?quick` in the
/// address two small shapes and 3 rounds (the end-to-end test's smoke run).
fn options(quick: bool) -> BenchOptions {
    if quick {
        let shapes = [(vec![8, 512, 7, 7], 1), (vec![256, 96], -1)]
            .into_iter()
            .map(|(shape, axis)| BenchShape { shape, axis })
            .collect();
        BenchOptions {
            shapes,
            dtypes: vec![DType::F32, DType::F16],
            warmup: 1,
            runs: 3,
        }
    } else {
        BenchOptions {
            shapes: bench::default_shapes(),
            dtypes: vec![DType::F32, DType::F16],
            warmup: 3,
            runs: 10,
        }
    }
}

fn quick() -> bool {
    web_sys::window()
        .and_then(|w| w.location().search().ok())
        .is_some_and(|q| q.trim_start_matches('?').split('&').any(|p| p == "quick"))
}

/// What the browser said of itself and its adapter (`run_page`'s JSON).
pub(crate) struct Browser {
    /// `navigator.userAgent`.
    pub user_agent: String,
    /// `GPUAdapterInfo`'s vendor, architecture, device and description,
    /// those it gave.
    pub adapter: Vec<String>,
}

impl Browser {
    pub(crate) fn parse(json: &str) -> Browser {
        let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().trim().to_string();
        let adapter = ["vendor", "architecture", "device", "description"]
            .iter()
            .map(|k| text(&value["adapter"][k]))
            .filter(|s| !s.is_empty())
            .collect();
        Browser {
            user_agent: text(&value["browser"]),
            adapter,
        }
    }
}

/// Runs the benchmark and shows it; the page's state is `done` after it,
/// or `failed` with the error.
pub(crate) async fn run(ctx: &GpuContext, summary: &str, browser: &Browser) -> Result<(), JsValue> {
    let options = options(quick());
    let progress: HtmlProgressElement = element("progress").dyn_into()?;
    let report = bench::run_async(ctx, &options, |p| {
        progress.set_value(p.fraction());
        status("running", &format!("{summary}; benchmark: {p}"));
    })
    .await;
    let mut report = match report {
        Ok(report) => report,
        Err(e) => {
            status("failed", &format!("{summary}; the benchmark failed: {e}"));
            return Err(JsValue::from_str(&e.to_string()));
        }
    };
    report.browser = Some(browser.user_agent.clone());
    // wgpu leaves the adapter unnamed on the web: the browser's own words
    if report.adapter.name.is_empty() {
        report.adapter.name = browser.adapter.join(" ");
    }
    element("bench-timing").set_text_content(Some(&timing_note(&report)));
    element("bench-table").set_inner_html(&table_html(&report));
    draw(&report)?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| JsValue::from_str(&e.to_string()))?;
    offer_download(&json)?;
    let noisy = report.results.iter().filter(|r| r.noisy).count();
    let noisy = match noisy {
        0 => String::new(),
        n => format!(" ({n} noisy figures)"),
    };
    status("done", &format!("{summary}; benchmark done{noisy}: save it below"));
    Ok(())
}

fn timing_note(report: &BenchReport) -> String {
    let clock = match report.timing.as_str() {
        "gpu-timestamps" => "the adapter's timestamp queries",
        _ => "the host clock around onSubmittedWorkDone (the adapter has no timestamp queries)",
    };
    format!(
        "Timed with {clock}, in interleaved rounds: each figure is the median of its rounds, its spread \
         the interquartile range over the median (marked ! above {:.0}%: the machine was too busy to \
         trust it); x stream is the median of each round's ratio to the stream kernel.",
        bench::NOISY_SPREAD * 100.0
    )
}

/// The tool's table, as HTML.
fn table_html(report: &BenchReport) -> String {
    let head = [
        "shape",
        "axis",
        "type",
        "op",
        "ms",
        "spread",
        "GB/s",
        "x stream",
        "max error",
        "kernels",
    ];
    let mut html = format!(
        "<thead><tr>{}</tr></thead><tbody>",
        head.map(|h| format!("<th>{h}</th>")).concat()
    );
    for r in &report.results {
        let shape = r.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let spread = format!("{:.0}%{}", r.spread() * 100.0, if r.noisy { " !" } else { "" });
        let cells = [
            shape,
            r.axis.to_string(),
            r.dtype.clone(),
            r.op.name().to_string(),
            format!("{:.3}", r.median_ms),
            spread,
            format!("{:.2}", r.gbps),
            format!("{:.2}", r.ratio_to_stream),
            r.max_error.map_or("-".into(), |e| format!("{e:.1e}")),
            r.kernels.as_ref().map_or("-".into(), |k| k.strategy.to_string()),
        ];
        let class = if r.noisy { " class=\"noisy\"" } else { "" };
        html += &format!(
            "<tr{class}>{}</tr>",
            cells.map(|c| format!("<td>{}</td>", escape(&c))).concat()
        );
    }
    html + "</tbody>"
}

/// Each layer call's fraction of this adapter's own copy bandwidth (the
/// tool's `report` plot, `bench::plot::draw_report`, of this one run) on
/// the page's canvas, sized as the tool sizes its SVG.
fn draw(report: &BenchReport) -> Result<(), JsValue> {
    let canvas: HtmlCanvasElement = element("plot").dyn_into()?;
    let label = report.label();
    let runs = [(label.as_str(), report)];
    let (width, height) = bench::plot::report_size(&runs);
    canvas.set_width(width);
    canvas.set_height(height);
    let backend = CanvasBackend::with_canvas_object(canvas).ok_or("the plot's canvas has no 2-D context")?;
    let root = backend.into_drawing_area();
    bench::plot::draw_report(&root, &runs).map_err(|e| JsValue::from_str(&format!("drawing the plot: {e}")))?;
    root.present()
        .map_err(|e| JsValue::from_str(&format!("drawing the plot: {e}")))
}

/// Keeps the JSON on the page (`window.benchJson`, which the end-to-end
/// test reads) and lets the download button save it.
fn offer_download(json: &str) -> Result<(), JsValue> {
    let window = web_sys::window().ok_or("no window")?;
    js_sys::Reflect::set(&window, &"benchJson".into(), &json.into())?;
    let button: web_sys::HtmlElement = element("download").dyn_into()?;
    let json = json.to_string();
    let save = Closure::<dyn Fn()>::new(move || {
        if let Err(e) = download(&json) {
            web_sys::console::error_1(&e);
        }
    });
    button.set_onclick(Some(save.as_ref().unchecked_ref()));
    // the page keeps the button, and so the handler, to its end
    save.forget();
    button.remove_attribute("disabled")
}

fn download(json: &str) -> Result<(), JsValue> {
    let parts = js_sys::Array::of1(&json.into());
    let options = web_sys::BlobPropertyBag::new();
    options.set_type("application/json");
    let blob = web_sys::Blob::new_with_str_sequence_and_options(&parts, &options)?;
    let url = web_sys::Url::create_object_url_with_blob(&blob)?;
    let document = web_sys::window().and_then(|w| w.document()).ok_or("no document")?;
    let link: web_sys::HtmlAnchorElement = document.create_element("a")?.dyn_into()?;
    link.set_href(&url);
    link.set_download("wgpu-batchnorm-bench.json");
    // in the document while clicked, and its URL kept for a minute: some
    // browsers cancel a download from a detached link or a revoked URL
    let body = document.body().ok_or("no body")?;
    body.append_child(&link)?;
    link.click();
    link.remove();
    let revoke = Closure::once_into_js(move || web_sys::Url::revoke_object_url(&url));
    web_sys::window()
        .ok_or("no window")?
        .set_timeout_with_callback_and_timeout_and_arguments_0(revoke.unchecked_ref(), 60_000)?;
    Ok(())
}
