//! The "Routed experts" section of a mixture-of-experts report: per sparse layer, how the
//! calibration tokens were routed to its experts (a layer × expert heat map), the layer's experts
//! group score and format, and the experts no calibration token reached.
//!
//! ModelOpt's auto_quantize (and so qsens) scores all experts of a layer as one group with one
//! format, so sensitivity is per layer; routing is what is known per expert. An expert no token
//! reached was never exercised by calibration or scoring: its weights are quantized on faith.

use std::fmt::Write;

use minijinja::Value;
use serde::Serialize;

use super::svg::{esc, fmt_sci};
use crate::artifact::manifest::{LayerEntry, Manifest};

pub const PLOT_TITLE: &str = "Calibration tokens routed per expert";

pub struct Section {
    pub context: Value,
    pub plot_file: String,
    pub plot: String,
}

#[derive(Debug, Serialize)]
struct LayerRow {
    name: String,
    block: Option<usize>,
    score_fmt: String,
    chosen: String,
    routed_fmt: String,
    /// Fewest and most pairs one expert got, as multiples of the even share.
    spread_fmt: String,
    unreached: Vec<usize>,
}

/// The section, or `None` for a model without experts.
pub fn section(m: &Manifest, stem: &str) -> Option<Section> {
    let layers: Vec<&LayerEntry> = m.layers.iter().filter(|l| l.experts.is_some()).collect();
    let first = layers.first()?.experts.as_ref()?;
    let rows: Vec<LayerRow> = layers.iter().map(|l| layer_row(l, m)).collect();
    let unreached_total: usize = rows.iter().map(|r| r.unreached.len()).sum();
    let plot_file = format!("{stem}-experts.svg");
    let plot = heat_map(&layers);
    let context = minijinja::context! {
        layers => layers.len(),
        num_experts => first.num_experts,
        top_k => first.top_k,
        rows => Value::from_serialize(&rows),
        unreached_total => unreached_total,
        calibration_samples => m.summary.samples,
    };
    Some(Section { context, plot_file, plot })
}

fn layer_row(l: &LayerEntry, m: &Manifest) -> LayerRow {
    let c = l.experts.as_ref().expect("filtered on experts");
    let total: u64 = c.tokens_routed.iter().sum();
    let even = total as f64 / c.num_experts.max(1) as f64;
    let (lo, hi) =
        (c.tokens_routed.iter().min().copied().unwrap_or(0), c.tokens_routed.iter().max().copied().unwrap_or(0));
    let score = m.groups.iter().find(|g| g.name == l.group).map(|g| g.sensitivity);
    LayerRow {
        name: l.name.clone(),
        block: l.block,
        score_fmt: score.map_or_else(|| "–".into(), |s| fmt_sci(s, 3)),
        chosen: l.chosen.clone(),
        routed_fmt: total.to_string(),
        spread_fmt: if even > 0.0 {
            format!("{:.2}× / {:.2}×", lo as f64 / even, hi as f64 / even)
        } else {
            "–".into()
        },
        unreached: c.tokens_routed.iter().enumerate().filter(|(_, &n)| n == 0).map(|(e, _)| e).collect(),
    }
}

/// Rows: sparse layers; columns: experts; shade: the expert's (token, expert) pairs as a share
/// of the layer's busiest expert. Unreached experts are marked with a red cross.
fn heat_map(layers: &[&LayerEntry]) -> String {
    let experts = layers.iter().filter_map(|l| l.experts.as_ref()).map(|c| c.num_experts).max().unwrap_or(1);
    let cell = (720.0 / experts as f64).clamp(3.0, 24.0);
    let row_h = (cell).clamp(10.0, 24.0);
    let (left, top) = (150.0, 40.0);
    let width = (left + cell * experts as f64 + 20.0).max(560.0);
    let height = top + row_h * layers.len() as f64 + 40.0;
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, "<title>{}</title>", esc(PLOT_TITLE));
    let _ = writeln!(s, r##"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="#ffffff"/>"##);
    let _ = writeln!(s, r#"<text x="10" y="18" font-size="13">{}</text>"#, esc(PLOT_TITLE));
    let _ = writeln!(
        s,
        r##"<text x="10" y="32" fill="#555555">shade: pairs routed / the layer's busiest expert; red cross: never reached</text>"##
    );
    for (r, l) in layers.iter().enumerate() {
        let Some(c) = l.experts.as_ref() else { continue };
        let y = top + r as f64 * row_h;
        let label = match l.block {
            Some(b) => format!("layer {b} ({})", l.chosen),
            None => l.name.clone(),
        };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y + row_h * 0.7,
            esc(&label)
        );
        let busiest = c.tokens_routed.iter().copied().max().unwrap_or(0).max(1) as f64;
        for (e, &n) in c.tokens_routed.iter().enumerate() {
            let x = left + e as f64 * cell;
            let shade = n as f64 / busiest;
            // White → dark blue.
            let channel = |hi: f64, lo: f64| (hi + (lo - hi) * shade).round() as u8;
            let fill = format!("#{:02x}{:02x}{:02x}", channel(255.0, 8.0), channel(255.0, 48.0), channel(255.0, 107.0));
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{cell:.1}" height="{row_h:.1}" fill="{fill}" stroke="#dddddd" stroke-width="0.5"><title>layer {} expert {e}: {n} pairs</title></rect>"##,
                l.block.map_or_else(|| "?".into(), |b| b.to_string())
            );
            if n == 0 {
                let (x1, y1, x2, y2) = (x + 1.0, y + 1.0, x + cell - 1.0, y + row_h - 1.0);
                let _ = writeln!(
                    s,
                    r##"<path d="M{x1:.1},{y1:.1} L{x2:.1},{y2:.1} M{x2:.1},{y1:.1} L{x1:.1},{y2:.1}" stroke="#d55e00" stroke-width="1.5"/>"##
                );
            }
        }
    }
    let axis_y = top + row_h * layers.len() as f64 + 16.0;
    let _ = writeln!(s, r#"<text x="{left:.0}" y="{axis_y:.1}">expert 0</text>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{axis_y:.1}" text-anchor="end">{}</text>"#,
        left + cell * experts as f64,
        experts - 1
    );
    s.push_str("</svg>\n");
    s
}
