//! Hand-written SVG charts: deterministic (fixed formatting, no timestamps or random ids),
//! well-formed (every text escaped), with linear or log₁₀ value axes.

use std::fmt::Write as _;

/// A value axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Axis {
    pub min: f64,
    pub max: f64,
    pub log: bool,
}

impl Axis {
    /// An axis covering `values` (non-finite values ignored, and non-positive ones on a log
    /// axis): log when the positive values span two decades or more and `allow_log`.
    pub fn fit(values: impl IntoIterator<Item = f64>, allow_log: bool) -> Axis {
        let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        let pos: Vec<f64> = v.iter().copied().filter(|&x| x > 0.0).collect();
        let (pmin, pmax) = pos.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        if allow_log && !pos.is_empty() && pmax / pmin >= 100.0 {
            // Decades kept within the normal f64 range, so both ends stay finite and positive.
            let (lo, hi) = (pmin.log10().floor().max(-307.0), pmax.log10().ceil().min(308.0));
            return Axis { min: 10f64.powf(lo), max: 10f64.powf(hi), log: true };
        }
        let (mut lo, mut hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        if !lo.is_finite() {
            return Axis { min: 0.0, max: 1.0, log: false };
        }
        lo = lo.min(0.0);
        if hi <= lo {
            hi = lo + 1.0;
        }
        let step = nice_step((hi - lo) / 5.0);
        let (min, max) = ((lo / step).floor() * step, (hi / step).ceil() * step);
        // Rounding out to the step can overflow near ±f64::MAX: keep the data range then.
        if min.is_finite() && max.is_finite() && min < max {
            Axis { min, max, log: false }
        } else {
            Axis { min: lo, max: hi, log: false }
        }
    }

    /// Position in [0, 1] (values outside clamp; `None` for non-positive values on a log axis).
    pub fn frac(&self, x: f64) -> Option<f64> {
        if !x.is_finite() {
            return None;
        }
        let f = if self.log {
            if x <= 0.0 {
                return None;
            }
            (x.log10() - self.min.log10()) / (self.max.log10() - self.min.log10())
        } else {
            (x - self.min) / (self.max - self.min)
        };
        // NaN when the axis itself is degenerate (an infinite span over an infinite offset).
        (!f.is_nan()).then(|| f.clamp(0.0, 1.0))
    }

    /// Tick values and labels. An axis too degenerate for round ticks (ends not finite, or a
    /// span the step cannot divide into a few ticks) gets its two ends.
    pub fn ticks(&self) -> Vec<(f64, String)> {
        let ends = || {
            [self.min, self.max]
                .into_iter()
                .filter(|x| x.is_finite() && (!self.log || *x > 0.0))
                .map(|x| (x, fmt_number(x)))
                .collect()
        };
        if self.log {
            let (a, b) = (self.min.log10().round(), self.max.log10().round());
            if !(a.is_finite() && b.is_finite() && a <= b && b - a <= 700.0) {
                return ends();
            }
            let (a, b) = (a as i32, b as i32);
            let every = ((b - a) / 8 + 1).max(1);
            (a..=b).filter(|k| (k - a) % every == 0).map(|k| (10f64.powi(k), pow10_label(k))).collect()
        } else {
            let step = nice_step((self.max - self.min) / 6.0);
            let first = (self.min / step - 1e-9).ceil();
            let last = (self.max / step + 1e-9).floor();
            if !(first.is_finite() && last.is_finite() && first <= last && last - first <= 100.0) {
                return ends();
            }
            (first as i64..=last as i64).map(|i| i as f64 * step).map(|x| (x, fmt_number(x))).collect()
        }
    }
}

fn pow10_label(k: i32) -> String {
    match k {
        0 => "1".into(),
        1 => "10".into(),
        _ => format!("1e{k}"),
    }
}

/// 1, 2 or 5 × 10^k at or above `raw`.
pub fn nice_step(raw: f64) -> f64 {
    if !(raw > 0.0 && raw.is_finite()) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    if !(p > 0.0 && p.is_finite()) {
        return raw; // subnormal or near f64::MAX: no rounder step exists
    }
    let m = raw / p;
    let f = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * p
}

/// A short human number: `0`, `12.5`, `0.004`, `3.2e-7`, `1.5e6`.
pub fn fmt_number(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let a = x.abs();
    if !(1e-3..1e5).contains(&a) {
        return fmt_sci(x, 2);
    }
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// `x` in scientific notation with `digits` decimals: `1.23e-4`.
pub fn fmt_sci(x: f64, digits: usize) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x == 0.0 {
        return "0".into();
    }
    let s = format!("{x:.digits$e}");
    s.strip_suffix("e0").map_or(s.clone(), str::to_string)
}

/// XML-escapes text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A fixed palette (colour-blind-friendly first, then distinct extras).
pub const PALETTE: [&str; 14] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000", "#8c564b", "#7f7f7f",
    "#17becf", "#bcbd22", "#9467bd", "#e377c2",
];

/// Plot series in display order, with their colours (stable across charts).
pub const SERIES: [(&str, &str); 19] = [
    ("q", "#0072b2"),
    ("k", "#56b4e9"),
    ("v", "#009e73"),
    ("q/k/v", "#0072b2"),
    ("o", "#cc79a7"),
    ("gate", "#e69f00"),
    ("up", "#b8860b"),
    ("gate/up", "#e69f00"),
    ("down", "#d55e00"),
    ("lm_head", "#000000"),
    ("patch_embed", "#7f7f7f"),
    ("qkv", "#0072b2"),
    ("proj", "#cc79a7"),
    ("fc1", "#e69f00"),
    ("fc2", "#d55e00"),
    ("fc1/fc2", "#e69f00"),
    ("merger", "#009e73"),
    ("deepstack mergers", "#9467bd"),
    ("other", "#8c564b"),
];

/// Colour of a series name (a palette colour by `fallback` for unknown names).
pub fn series_color(name: &str, fallback: usize) -> &'static str {
    SERIES.iter().find(|(n, _)| *n == name).map_or(PALETTE[fallback % PALETTE.len()], |(_, c)| c)
}

/// Display rank of a series name (unknown names last, in name order).
pub fn series_order(name: &str) -> usize {
    SERIES.iter().position(|(n, _)| *n == name).unwrap_or(SERIES.len())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub color: String,
    pub points: Vec<(f64, f64)>,
    /// Join the points with a line (in x order).
    pub line: bool,
    /// Draw the line as a post-step (value holds until the next x).
    pub step: bool,
    /// Marker radius (0 = none).
    pub marker: f64,
}

/// A highlighted point with a label.
#[derive(Debug, Clone, PartialEq)]
pub struct Highlight {
    pub x: f64,
    pub y: f64,
    pub label: String,
    pub color: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x: Axis,
    pub y: Axis,
    /// Custom x tick labels (category axes); empty = numeric ticks from `x`.
    pub x_ticks: Vec<(f64, String)>,
    pub series: Vec<Series>,
    pub highlights: Vec<Highlight>,
    /// Vertical dashed reference lines with labels.
    pub vlines: Vec<(f64, String)>,
    /// A line of text under the title (e.g. what was left out).
    pub note: String,
}

const WIDTH: f64 = 920.0;
const PANEL_H: f64 = 330.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 46.0;
const BOTTOM: f64 = 52.0;

fn n(x: f64) -> String {
    format!("{x:.2}")
}

/// Renders panels stacked vertically into one SVG document.
pub fn render(title: &str, panels: &[Panel]) -> String {
    let height = PANEL_H * panels.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#,
        w = n(WIDTH),
        h = n(height)
    );
    let _ = writeln!(s, "<title>{}</title>", esc(title));
    let _ = writeln!(s, r##"<rect x="0" y="0" width="{}" height="{}" fill="#ffffff"/>"##, n(WIDTH), n(height));
    for (i, p) in panels.iter().enumerate() {
        panel(&mut s, p, i as f64 * PANEL_H);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, p: &Panel, top: f64) {
    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (top + TOP, top + PANEL_H - BOTTOM);
    let px = |x: f64| p.x.frac(x).map(|f| x0 + f * (x1 - x0));
    let py = |y: f64| p.y.frac(y).map(|f| y1 - f * (y1 - y0));
    let _ = writeln!(s, "<g>");
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        n(x0),
        n(top + 20.0),
        esc(&p.title)
    );
    if !p.note.is_empty() {
        let _ = writeln!(s, r##"<text x="{}" y="{}" fill="#555555">{}</text>"##, n(x0), n(top + 36.0), esc(&p.note));
    }
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#444444"/>"##,
        n(x0),
        n(y0),
        n(x1 - x0),
        n(y1 - y0)
    );
    // Y grid and ticks.
    for (v, label) in p.y.ticks() {
        if let Some(y) = py(v) {
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#dddddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                n(x0),
                n(x1),
                n(x0 - 6.0),
                n(y + 4.0),
                esc(&label),
                y = n(y)
            );
        }
    }
    // X ticks.
    let xt = if p.x_ticks.is_empty() { p.x.ticks() } else { p.x_ticks.clone() };
    for (v, label) in xt {
        if let Some(x) = px(v) {
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#444444"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
                n(y1),
                n(y1 + 5.0),
                n(y1 + 18.0),
                label
                    .split('\n')
                    .enumerate()
                    .map(|(i, part)| format!(
                        r#"<tspan x="{}" dy="{}">{}</tspan>"#,
                        n(x),
                        if i == 0 { "0" } else { "14" },
                        esc(part)
                    ))
                    .collect::<String>(),
                x = n(x)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        n((x0 + x1) / 2.0),
        n(y1 + 38.0),
        esc(&p.x_label)
    );
    let (yl_x, yl_y) = (x0 - 58.0, (y0 + y1) / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{}</text>"#,
        n(yl_x),
        n(yl_y),
        n(yl_x),
        n(yl_y),
        esc(&p.y_label)
    );
    for (v, label) in &p.vlines {
        if let Some(x) = px(*v) {
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#888888" stroke-dasharray="5 4"/><text x="{}" y="{}" fill="#555555">{}</text>"##,
                n(y0),
                n(y1),
                n(x + 4.0),
                n(y0 + 14.0),
                esc(label),
                x = n(x)
            );
        }
    }
    // Series.
    for ser in &p.series {
        let mut pts: Vec<(f64, f64)> = ser.points.iter().filter_map(|&(x, y)| Some((px(x)?, py(y)?))).collect();
        if ser.line && pts.len() > 1 {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut path = String::new();
            let mut prev: Option<(f64, f64)> = None;
            for &(x, y) in &pts {
                match prev {
                    None => path.push_str(&format!("{},{}", n(x), n(y))),
                    Some((_, py_)) if ser.step => path.push_str(&format!(" {},{} {},{}", n(x), n(py_), n(x), n(y))),
                    Some(_) => path.push_str(&format!(" {},{}", n(x), n(y))),
                }
                prev = Some((x, y));
            }
            let _ = writeln!(
                s,
                r#"<polyline points="{path}" fill="none" stroke="{}" stroke-width="1.6"><title>{}</title></polyline>"#,
                esc(&ser.color),
                esc(&ser.name)
            );
        }
        if ser.marker > 0.0 {
            for &(x, y) in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{}" cy="{}" r="{}" fill="{}" fill-opacity="0.85"/>"#,
                    n(x),
                    n(y),
                    n(ser.marker),
                    esc(&ser.color)
                );
            }
        }
    }
    for h in &p.highlights {
        if let (Some(x), Some(y)) = (px(h.x), py(h.y)) {
            let anchor = if x > (x0 + x1) / 2.0 { "end" } else { "start" };
            let dx = if anchor == "end" { -9.0 } else { 9.0 };
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{}" r="6" fill="none" stroke="{c}" stroke-width="2.5"/><text x="{}" y="{}" text-anchor="{anchor}" fill="{c}" font-weight="bold">{}</text>"#,
                n(x),
                n(y),
                n(x + dx),
                n(y - 9.0),
                esc(&h.label),
                c = esc(&h.color)
            );
        }
    }
    // Legend.
    let mut ly = y0 + 6.0;
    for ser in p.series.iter().filter(|s| !s.name.is_empty()) {
        let lx = x1 + 14.0;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            n(lx),
            n(ly),
            esc(&ser.color),
            n(lx + 18.0),
            n(ly + 10.5),
            esc(&ser.name)
        );
        ly += 18.0;
    }
    let _ = writeln!(s, "</g>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_and_ticks() {
        let a = Axis::fit([1e-6, 3e-3, 0.0], true);
        assert!(a.log && a.min == 1e-6 && a.max == 1e-2);
        assert_eq!(a.ticks().len(), 5);
        assert_eq!(a.frac(0.0), None);
        let l = Axis::fit([0.3, 4.2], true);
        assert!(!l.log && l.min == 0.0 && l.max == 5.0);
        assert_eq!(l.ticks().iter().map(|t| t.1.as_str()).collect::<Vec<_>>(), ["0", "1", "2", "3", "4", "5"]);
        assert_eq!(nice_step(0.13), 0.2);
        // Extreme values give finite axes and a few ticks, not an overflow or a huge range.
        for values in [vec![0.0, f64::MAX], vec![5e-324, f64::MAX], vec![-f64::MAX, f64::MAX], vec![1.0, 1.0 + 1e-15]] {
            for allow_log in [false, true] {
                let a = Axis::fit(values.iter().copied(), allow_log);
                assert!(a.min.is_finite() && a.max.is_finite() && a.min < a.max, "{values:?}: {a:?}");
                assert!((1..=101).contains(&a.ticks().len()), "{values:?}: {:?}", a.ticks());
            }
        }
        let degenerate = Axis { min: 0.0, max: f64::INFINITY, log: false };
        assert!(degenerate.ticks().len() <= 2);
        assert_eq!(fmt_number(2.5e-7), "2.50e-7");
        assert_eq!(fmt_sci(2.81606, 3), "2.816");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
