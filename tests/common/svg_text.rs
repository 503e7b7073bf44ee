//! The text of an SVG (as plotters writes it) and where it lies, for tests
//! that no label runs off the picture. Shared by the library's plot tests
//! and the command-line tool's.
#![allow(dead_code)]

/// A `<text>` element: its content and its box, estimated.
#[derive(Debug)]
pub struct Text {
    pub text: String,
    /// (left, top, right, bottom) in the picture's pixels.
    pub bounds: (f64, f64, f64, f64),
}

/// A sans-serif character's width in font sizes, on average over a label
/// (Helvetica's digits are 0.56, its lowercase about 0.5).
const CHAR_WIDTH: f64 = 0.6;
/// Above and below the baseline, in font sizes.
const ASCENT: f64 = 0.8;
const DESCENT: f64 = 0.2;

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(tag[start..start + len].to_string())
}

fn number(tag: &str, name: &str) -> f64 {
    attr(tag, name)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        .parse()
        .unwrap_or_else(|e| panic!("{name} in {tag}: {e}"))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The picture's (width, height).
pub fn size(svg: &str) -> (f64, f64) {
    let start = svg.find("<svg").expect("an <svg> element");
    let tag = &svg[start..start + svg[start..].find('>').expect("a whole <svg> tag")];
    (number(tag, "width"), number(tag, "height"))
}

/// Every `<text>` element with its box: the content's width estimated at
/// [`CHAR_WIDTH`], placed by `text-anchor`, `dy` (em or ex) and a
/// `rotate(angle, cx, cy)` transform.
pub fn texts(svg: &str) -> Vec<Text> {
    let mut out = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find("<text") {
        let after = &rest[start..];
        let open_end = after.find('>').expect("a whole <text> tag");
        let tag = &after[..open_end];
        let close = after.find("</text>").expect("a closed <text>");
        let text = unescape(after[open_end + 1..close].trim());
        rest = &after[close..];

        let (x, y) = (number(tag, "x"), number(tag, "y"));
        let size = number(tag, "font-size");
        let dy = match attr(tag, "dy") {
            Some(d) if d.ends_with("em") => d.trim_end_matches("em").parse::<f64>().unwrap() * size,
            Some(d) if d.ends_with("ex") => d.trim_end_matches("ex").parse::<f64>().unwrap() * size / 2.0,
            Some(d) => d.parse().unwrap(),
            None => 0.0,
        };
        let width = CHAR_WIDTH * size * text.chars().count() as f64;
        let (left, right) = match attr(tag, "text-anchor").as_deref() {
            Some("middle") => (x - width / 2.0, x + width / 2.0),
            Some("end") => (x - width, x),
            _ => (x, x + width),
        };
        let baseline = y + dy;
        let corners = [
            (left, baseline - ASCENT * size),
            (right, baseline - ASCENT * size),
            (left, baseline + DESCENT * size),
            (right, baseline + DESCENT * size),
        ];
        let corners: Vec<(f64, f64)> = match attr(tag, "transform") {
            Some(t) => {
                let inner = t
                    .strip_prefix("rotate(")
                    .and_then(|t| t.strip_suffix(')'))
                    .unwrap_or_else(|| panic!("a transform other than rotate: {t}"));
                let v: Vec<f64> = inner.split(',').map(|n| n.trim().parse().unwrap()).collect();
                let (angle, cx, cy) = (v[0].to_radians(), v[1], v[2]);
                corners
                    .iter()
                    .map(|&(px, py)| {
                        let (dx, dy) = (px - cx, py - cy);
                        (
                            cx + dx * angle.cos() - dy * angle.sin(),
                            cy + dx * angle.sin() + dy * angle.cos(),
                        )
                    })
                    .collect()
            }
            None => corners.to_vec(),
        };
        let fold =
            |f: fn(f64, f64) -> f64, pick: fn(&(f64, f64)) -> f64, init: f64| corners.iter().map(pick).fold(init, f);
        out.push(Text {
            text,
            bounds: (
                fold(f64::min, |c| c.0, f64::INFINITY),
                fold(f64::min, |c| c.1, f64::INFINITY),
                fold(f64::max, |c| c.0, f64::NEG_INFINITY),
                fold(f64::max, |c| c.1, f64::NEG_INFINITY),
            ),
        });
    }
    out
}

/// Panics naming every text element whose box leaves the picture.
pub fn assert_inside(svg: &str) {
    let (width, height) = size(svg);
    let texts = texts(svg);
    assert!(!texts.is_empty(), "no text at all");
    let outside: Vec<String> = texts
        .iter()
        .filter(|t| {
            let (l, top, r, b) = t.bounds;
            l < 0.0 || top < 0.0 || r > width || b > height
        })
        .map(|t| format!("{:?} at {:?}", t.text, t.bounds))
        .collect();
    assert!(
        outside.is_empty(),
        "text outside the {width}x{height} picture:\n{}",
        outside.join("\n")
    );
}
