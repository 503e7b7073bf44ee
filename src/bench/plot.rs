//! The benchmark's pictures, drawn with `plotters` on any of its backends:
//! SVG for the command-line tool (`bench --svg`, `report --svg`), a canvas
//! on the web page (`plotters-canvas`'s `CanvasBackend`).
//!
//! [`draw_run`] draws one run (a group of bars per shape and dtype, a bar
//! per operation, GB/s with the quartiles of the rounds as whiskers);
//! [`draw_report`] draws several runs side by side (a group per shape,
//! dtype and layer call, a bar per run, the fraction of that run's own copy
//! bandwidth). Both size their margins from their labels (measured by the
//! backend, and never less than a wide sans-serif would need), so no label
//! is clipped; [`run_size`] and [`report_size`] say how large a picture
//! holds every bar at a readable width.
//!
//! ```no_run
//! # use wgpu_batchnorm::bench::{BenchReport, plot};
//! # fn f(report: &BenchReport) -> Result<(), String> {
//! let svg = plot::run_svg(report)?;
//! # Ok(()) }
//! ```

use std::ops::Range;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{BenchReport, Op, layer_rows};

/// The bars' colours: series `i` (an operation of a run, or a run of a
/// comparison) is drawn in `PALETTE[i % PALETTE.len()]`.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Font sizes, in plotters' units (its SVG backend writes `size / 1.24`
/// as the font size; a canvas uses them as pixels).
const TITLE_SIZE: f64 = 18.0;
const TEXT_SIZE: f64 = 14.0;
/// The widest a sans-serif character runs, on average over a label, in
/// font sizes: what a margin is sized for when the backend guesses less
/// (plotters' own guess without a font library is 0.45).
const CHAR_WIDTH: f64 = 0.6;
/// Space around the picture and between its parts, in pixels.
const PAD: i32 = 10;
/// The plot's height and a bar's width when the caller lets us choose.
const PLOT_HEIGHT: i32 = 320;
const BAR_WIDTH: i32 = 14;
const GROUP_GAP: i32 = 18;

/// What a bar chart shows, whatever it came from.
struct Bars {
    title: String,
    y_desc: String,
    x_desc: String,
    /// The legend: one name per series, in bar order within a group.
    series: Vec<String>,
    groups: Vec<Group>,
}

/// One x label's bars: a value per series (None: not measured) and,
/// where known, a whisker (low, high) per series.
struct Group {
    label: String,
    values: Vec<Option<f64>>,
    whiskers: Vec<Option<(f64, f64)>>,
}

impl Bars {
    /// One run: a group per shape, axis and dtype, a bar per operation
    /// (GB/s), whiskers from the first to the third quartile of the rounds.
    fn of_run(report: &BenchReport) -> Bars {
        let mut groups: Vec<Group> = Vec::new();
        let mut keys: Vec<(&[usize], i64, &str)> = Vec::new();
        for r in &report.results {
            let key = (&r.shape[..], r.axis, r.dtype.as_str());
            let g = match keys.iter().position(|k| *k == key) {
                Some(g) => g,
                None => {
                    keys.push(key);
                    groups.push(Group {
                        label: format!("{} axis {} {}", shape_text(&r.shape), r.axis, r.dtype),
                        values: vec![None; Op::ALL.len()],
                        whiskers: vec![None; Op::ALL.len()],
                    });
                    groups.len() - 1
                }
            };
            let i = Op::ALL.iter().position(|&o| o == r.op).unwrap_or(0);
            let gbps = |ms: f64| r.bytes as f64 / (ms * 1e-3) / 1e9;
            groups[g].values[i] = Some(r.gbps).filter(|v| v.is_finite());
            groups[g].whiskers[i] =
                Some((gbps(r.p75_ms), gbps(r.p25_ms))).filter(|(a, b)| a.is_finite() && b.is_finite());
        }
        let runs = report.results.first().map_or(0, |r| r.runs);
        Bars {
            title: format!(
                "wgpu-batchnorm on {}: GB/s, median of {runs} rounds ({}; whiskers: quartiles)",
                report.label(),
                report.timing
            ),
            y_desc: "GB/s (bytes a perfect pass moves / median time)".into(),
            x_desc: "shape, axis and dtype".into(),
            series: Op::ALL.iter().map(|o| o.name().to_string()).collect(),
            groups,
        }
    }

    /// Several runs: a group per shape, axis, dtype and layer call, a bar
    /// per run (the fraction of that run's own copy bandwidth).
    fn of_reports(reports: &[(&str, &BenchReport)]) -> Bars {
        let runs: Vec<&BenchReport> = reports.iter().map(|(_, r)| *r).collect();
        let groups = layer_rows(&runs)
            .into_iter()
            .map(|key| Group {
                label: format!("{} {}", key.case(), key.op.name()),
                values: runs
                    .iter()
                    .map(|r| r.fraction_of_copy(&key).filter(|f| f.is_finite()))
                    .collect(),
                whiskers: vec![None; runs.len()],
            })
            .collect();
        let title = match reports {
            [(label, _)] => format!("wgpu-batchnorm on {label}: fraction of the adapter's own copy bandwidth"),
            _ => "wgpu-batchnorm across adapters: fraction of each adapter's own copy bandwidth".into(),
        };
        Bars {
            title,
            y_desc: "fraction of copy bandwidth".into(),
            x_desc: "shape, axis, dtype and op".into(),
            series: reports.iter().map(|(label, _)| label.to_string()).collect(),
            groups,
        }
    }

    /// The tallest value or whisker.
    fn top(&self) -> f64 {
        self.groups
            .iter()
            .flat_map(|g| {
                let whiskers = g.whiskers.iter().flatten().map(|w| w.1);
                g.values.iter().flatten().copied().chain(whiskers)
            })
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
    }

    /// The y axis: its top and its ticks.
    fn ticks(&self) -> (f64, Vec<f64>) {
        let top = self.top();
        let step = tick_step(top);
        let y_max = ((top / step).ceil() * step).max(step);
        let ticks = (0..=(y_max / step).round() as usize).map(|t| t as f64 * step).collect();
        (y_max, ticks)
    }

    fn tick_label(&self, v: f64) -> String {
        format!("{v:.*}", decimals(tick_step(self.top())))
    }
}

/// `32x56x56x64`.
fn shape_text(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// The tick spacing of an axis up to `top`: 0.25 from 0.5 to 2.5 (the
/// fractions of copy bandwidth), else the first of 1, 2 or 5 times a
/// power of ten giving at most ten ticks.
pub fn tick_step(top: f64) -> f64 {
    if !top.is_finite() || top <= 0.0 {
        return 0.25;
    }
    if top > 0.5 && top <= 2.5 {
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

/// Decimals a tick label at multiples of `step` needs (0.25: two).
fn decimals(step: f64) -> usize {
    let magnitude = step.log10().floor();
    let leading = step / 10f64.powf(magnitude);
    let extra = usize::from((leading - leading.round()).abs() > 1e-9);
    (-magnitude).max(0.0) as usize + extra
}

/// A linear y axis from 0 to `top` ticked exactly at `ticks` (plotters'
/// own choice steps by 1, 2 or 5 only, never 0.25).
struct Ticked {
    top: f64,
    ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        RangedCoordf64::from(0.0..self.top).map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // bold lines (and labels) at the ticks, no light lines between
        if hint.weight().allow_light_points() || hint.max_num_points() == 0 {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        0.0..self.top
    }
}

fn font(size: f64) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", size).into_font())
}

/// The least width a label of `size` takes, whatever the backend says.
fn floor_width(text: &str, size: f64) -> i32 {
    (CHAR_WIDTH * size * text.chars().count() as f64).ceil() as i32
}

/// Where everything goes, in pixels, given how wide each label is.
struct Layout {
    /// Top of the plot (below the title and the legend).
    top: i32,
    /// Below the plot: the rotated group labels and the x description.
    bottom: i32,
    /// Left of the plot: the y description and the tick labels.
    left: i32,
    /// Right of the plot.
    right: i32,
    /// The widest of the title, the legend and the x description, with
    /// their padding: the picture is at least this wide.
    min_width: i32,
    /// The legend's line height.
    line: i32,
}

impl Layout {
    fn new(bars: &Bars, width: &dyn Fn(&str, f64) -> i32) -> Layout {
        let line = (TEXT_SIZE * 1.5).ceil() as i32;
        let title_h = (TITLE_SIZE * 1.6).ceil() as i32;
        let top = PAD + title_h + line * bars.series.len() as i32 + PAD;
        let (_, ticks) = bars.ticks();
        let tick_w = ticks
            .iter()
            .map(|&v| width(&bars.tick_label(v), TEXT_SIZE))
            .max()
            .unwrap_or(0);
        // the description (rotated, one line), tick labels, tick marks
        let left = PAD + line + tick_w + 20;
        let label_w = bars
            .groups
            .iter()
            .map(|g| width(&g.label, TEXT_SIZE))
            .max()
            .unwrap_or(0);
        let bottom = 10 + label_w + 10 + line + PAD;
        // a rotated label is centred on its group: half a line beyond the last
        let right = PAD + line;
        let swatch = (TEXT_SIZE * 1.2).ceil() as i32;
        let legend_w = bars
            .series
            .iter()
            .map(|s| swatch + width(s, TEXT_SIZE))
            .max()
            .unwrap_or(0);
        let min_width = 2 * PAD
            + [width(&bars.title, TITLE_SIZE), legend_w, width(&bars.x_desc, TEXT_SIZE)]
                .into_iter()
                .max()
                .unwrap_or(0);
        Layout {
            top,
            bottom,
            left,
            right,
            min_width,
            line,
        }
    }

    /// A picture that holds every bar at [`BAR_WIDTH`] and every label.
    fn size(&self, bars: &Bars) -> (u32, u32) {
        let group_w = BAR_WIDTH * bars.series.len().max(1) as i32 + GROUP_GAP;
        let width = (self.left + group_w * bars.groups.len().max(1) as i32 + self.right).max(self.min_width);
        // the y description must fit along the plot
        let height = PLOT_HEIGHT.max(floor_width(&bars.y_desc, TEXT_SIZE) + 2 * PAD);
        (width as u32, (self.top + height + self.bottom) as u32)
    }
}

/// The size [`draw_run`] wants for `report`.
pub fn run_size(report: &BenchReport) -> (u32, u32) {
    let bars = Bars::of_run(report);
    Layout::new(&bars, &floor_width).size(&bars)
}

/// The size [`draw_report`] wants for `reports`.
pub fn report_size(reports: &[(&str, &BenchReport)]) -> (u32, u32) {
    let bars = Bars::of_reports(reports);
    Layout::new(&bars, &floor_width).size(&bars)
}

/// Draws one run on `root` (any plotters backend; [`run_size`] is the
/// size it was made for, a smaller area gets narrower bars): a group of
/// bars per shape, axis and dtype, a bar per operation (copy, stream,
/// training forward, inference, backward) in GB/s, whiskers from the first
/// to the third quartile of the rounds, a legend of the operations.
pub fn draw_run<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &BenchReport,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    draw_bars(root, &Bars::of_run(report))
}

/// Draws several runs side by side on `root` (any plotters backend;
/// [`report_size`] is the size it was made for): a group per shape, axis,
/// dtype and layer call any run measured, a bar per run (the fraction of
/// that run's own copy bandwidth: what compares across adapters), a y axis
/// with ticks and a legend naming each run by its label (e.g.
/// [`BenchReport::label`]).
pub fn draw_report<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    reports: &[(&str, &BenchReport)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    draw_bars(root, &Bars::of_reports(reports))
}

/// [`draw_run`] as an SVG document of [`run_size`].
pub fn run_svg(report: &BenchReport) -> Result<String, String> {
    svg(run_size(report), |root| draw_run(root, report))
}

/// [`draw_report`] as an SVG document of [`report_size`].
pub fn report_svg(reports: &[(&str, &BenchReport)]) -> Result<String, String> {
    svg(report_size(reports), |root| draw_report(root, reports))
}

fn svg(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), DrawingAreaErrorKind<std::io::Error>>,
) -> Result<String, String> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        draw(&root).map_err(|e| format!("drawing the plot: {e}"))?;
        root.present().map_err(|e| format!("drawing the plot: {e}"))?;
    }
    Ok(text)
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    bars: &Bars,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    // each label as wide as the backend measures it, and never narrower
    // than a wide sans-serif would draw it (an SVG's reader picks the font)
    let width = |text: &str, size: f64| {
        let measured = root.estimate_text_size(text, &font(size)).map_or(0, |(w, _)| w as i32);
        measured.max(floor_width(text, size))
    };
    let layout = Layout::new(bars, &width);
    let (w, h) = root.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let text = font(TEXT_SIZE);

    // the title and the legend, one series a line
    let at = |h, v| Pos::new(h, v);
    root.draw_text(
        &bars.title,
        &font(TITLE_SIZE).pos(at(HPos::Left, VPos::Top)),
        (PAD, PAD),
    )?;
    let swatch = (TEXT_SIZE * 0.8) as i32;
    for (i, name) in bars.series.iter().enumerate() {
        let y = PAD + (TITLE_SIZE * 1.6).ceil() as i32 + layout.line * i as i32;
        let colour = PALETTE[i % PALETTE.len()];
        root.draw(&Rectangle::new([(PAD, y), (PAD + swatch, y + swatch)], colour.filled()))?;
        root.draw_text(
            name,
            &text.pos(at(HPos::Left, VPos::Center)),
            (PAD + (TEXT_SIZE * 1.2).ceil() as i32, y + swatch / 2),
        )?;
    }

    // the plot: y axis and ticks through plotters' mesh, bars and whiskers
    let (y_max, ticks) = bars.ticks();
    let groups = bars.groups.len().max(1);
    let area = root.margin(
        layout.top,
        layout.bottom.min(h - layout.top - 1).max(0),
        PAD,
        layout.right,
    );
    let mut chart = ChartBuilder::on(&area)
        .y_label_area_size(layout.left - PAD)
        .build_cartesian_2d(0.0..groups as f64, Ticked { top: y_max, ticks })?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(bars.y_desc.as_str())
        .y_label_formatter(&|v| bars.tick_label(*v))
        .label_style(text.clone())
        .axis_desc_style(text.clone())
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .axis_style(BLACK)
        .draw()?;
    let n = bars.series.len().max(1) as f64;
    let inset = 0.1;
    let bar = (1.0 - 2.0 * inset) / n;
    for (g, group) in bars.groups.iter().enumerate() {
        for (i, value) in group.values.iter().enumerate() {
            let Some(v) = *value else { continue };
            let x0 = g as f64 + inset + i as f64 * bar;
            let colour = PALETTE[i % PALETTE.len()];
            chart
                .plotting_area()
                .draw(&Rectangle::new([(x0, 0.0), (x0 + bar, v)], colour.filled()))?;
            if let Some(Some((lo, hi))) = group.whiskers.get(i) {
                let (xc, cap) = (x0 + bar / 2.0, bar / 4.0);
                for line in [
                    vec![(xc, *lo), (xc, *hi)],
                    vec![(xc - cap, *lo), (xc + cap, *lo)],
                    vec![(xc - cap, *hi), (xc + cap, *hi)],
                ] {
                    chart.plotting_area().draw(&PathElement::new(line, BLACK))?;
                }
            }
        }
    }
    chart
        .plotting_area()
        .draw(&PathElement::new(vec![(0.0, 0.0), (groups as f64, 0.0)], BLACK))?;

    // the group labels, rotated, below their groups; the x description
    let base = root.get_base_pixel();
    let label = text
        .transform(FontTransform::Rotate90)
        .pos(at(HPos::Left, VPos::Center));
    for (g, group) in bars.groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw_text(&group.label, &label, (x - base.0, y - base.1 + 10))?;
    }
    let (left, right) = (
        chart.backend_coord(&(0.0, 0.0)).0,
        chart.backend_coord(&(groups as f64, 0.0)).0,
    );
    let centre = ((left + right) / 2 - base.0).clamp(PAD, w.max(2 * PAD) - PAD);
    root.draw_text(
        &bars.x_desc,
        &text.pos(at(HPos::Center, VPos::Bottom)),
        (centre, h - PAD),
    )?;
    Ok(())
}

#[cfg(test)]
#[path = "../../tests/common/svg_text.rs"]
mod svg_text;

#[cfg(test)]
mod tests {
    use super::svg_text;
    use super::*;
    use crate::bench::{AdapterDescription, BenchResult, KernelsUsed};
    use crate::tuning::Strategy;

    /// A run of `shapes`, every figure present, on an adapter called `name`.
    fn report(name: &str, shapes: &[(&[usize], i64, &str)], scale: f64) -> BenchReport {
        let mut results = Vec::new();
        for &(shape, axis, dtype) in shapes {
            for (i, op) in Op::ALL.into_iter().enumerate() {
                let ms = scale * (1.0 + i as f64);
                results.push(BenchResult {
                    shape: shape.to_vec(),
                    axis,
                    dtype: dtype.into(),
                    op,
                    median_ms: ms,
                    p25_ms: ms * 0.9,
                    p75_ms: ms * 1.2,
                    min_ms: ms * 0.8,
                    max_ms: ms * 1.5,
                    noisy: false,
                    runs: 20,
                    runs_ms: Vec::new(),
                    bytes: 25_690_112 * op.passes(),
                    gbps: 25_690_112.0 * op.passes() as f64 / (ms * 1e-3) / 1e9,
                    ratio_to_stream: (1.0 + i as f64) / 2.0,
                    ratio_p25: 0.5,
                    ratio_p75: 1.5,
                    max_error: op.is_layer().then_some(1e-7),
                    kernels: op.is_layer().then(|| KernelsUsed {
                        strategy: Strategy::Serial,
                        plan: "defaults".into(),
                        tuned: false,
                    }),
                });
            }
        }
        BenchReport {
            adapter: AdapterDescription {
                name: name.into(),
                backend: "vulkan".into(),
                device_type: "Cpu".into(),
                driver: "llvmpipe".into(),
                driver_info: "Mesa 22.3.6".into(),
            },
            browser: None,
            crate_version: crate::VERSION.into(),
            timing: "gpu-timestamps".into(),
            results,
        }
    }

    const SHAPES: [(&[usize], i64, &str); 4] = [
        (&[32, 56, 56, 64], -1, "f32"),
        (&[1, 3, 1024, 1024], 1, "f16"),
        (&[4096, 1024], -1, "f32"),
        (&[8, 512, 7, 7], 1, "f16"),
    ];

    #[test]
    fn every_label_of_a_run_lies_inside_the_picture() {
        let run = report("llvmpipe (LLVM 15.0.6, 256 bits)", &SHAPES, 3.0);
        let svg = run_svg(&run).unwrap();
        svg_text::assert_inside(&svg);
        let texts = svg_text::texts(&svg);
        for op in Op::ALL {
            assert!(texts.iter().any(|t| t.text == op.name()), "legend: {}", op.name());
        }
        assert!(texts.iter().any(|t| t.text == "1x3x1024x1024 axis 1 f16"));
    }

    #[test]
    fn every_label_of_a_comparison_lies_inside_the_picture() {
        let a = report("llvmpipe (LLVM 15.0.6, 256 bits)", &SHAPES, 3.0);
        let mut b = report("SwiftShader Device (Subzero) with a long name", &SHAPES[1..], 1.0);
        b.browser = Some("Mozilla/5.0 (X11; Linux x86_64) Chrome/140.0.0.0".into());
        let (la, lb) = (a.label(), b.label());
        let svg = report_svg(&[(&la, &a), (&lb, &b)]).unwrap();
        svg_text::assert_inside(&svg);
        let texts = svg_text::texts(&svg);
        assert!(texts.iter().any(|t| t.text == lb), "legend: {lb}");
        // the last group's label, the one that ran off the hand-written picture
        assert!(texts.iter().any(|t| t.text == "32x56x56x64 axis -1 f32 backward"));
        // a bar per run and layer call, and a legend swatch per run
        for (i, want) in [(0, 1 + 4 * 3), (1, 1 + 3 * 3)] {
            let c = PALETTE[i];
            let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
            let rects = svg.lines().filter(|l| l.contains("<rect") && l.contains(&fill)).count();
            assert_eq!(rects, want, "{fill}");
        }
        // a smaller canvas than asked for still keeps every label inside
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, (900, 700)).into_drawing_area();
            draw_report(&root, &[(&la, &a), (&lb, &b)]).unwrap();
            root.present().unwrap();
        }
        svg_text::assert_inside(&text);
    }

    #[test]
    fn ticks_stay_few_whatever_the_tallest_bar() {
        for top in [0.0, 0.3, 2.5, 2.6, 9.0, 11.0, 1234.5, 1e12, f64::NAN] {
            let step = tick_step(top);
            assert!(step > 0.0);
            assert!(top.is_nan() || top / step <= 10.5, "{top}: step {step}");
        }
        assert_eq!(tick_step(1.0), 0.25);
        assert!((tick_step(0.012) - 0.002).abs() < 1e-12);
        let labels = |step: f64| format!("{:.*} {:.*}", decimals(step), step, decimals(step), 3.0 * step);
        assert_eq!(labels(0.25), "0.25 0.75");
        assert_eq!(labels(0.5), "0.5 1.5");
        assert_eq!(labels(20.0), "20 60");
        assert_eq!(labels(0.002), "0.002 0.006");
    }
}
