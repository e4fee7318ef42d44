//! The "Predicted vs measured" section of `manifest-to-md --evaluation`: what `evaluate` measured
//! for each recipe (loss, KL, top-1 agreement, with intervals) beside what `search` predicted (its
//! objective), the rank correlation of the two, a scatter plot, and one sentence on the chosen
//! recipe. The template context it adds is documented in `docs/manifest.md`.

use anyhow::{bail, Result};
use minijinja::Value;
use serde::Serialize;

use super::svg::{self, fmt_number, fmt_sci, Axis, Highlight, Panel, Series};
use super::thousands;
use crate::artifact::evaluation::{Estimate, Evaluation, RecipeResult};
use crate::artifact::manifest::Manifest;
use crate::artifact::Artifact;

/// Recipe kinds in legend order, with their plot colours.
const KINDS: [(&str, &str); 5] = [
    ("unquantized", "#7f7f7f"),
    ("all-quantized", "#d55e00"),
    ("chosen", "#009e73"),
    ("frontier", "#0072b2"),
    ("checkpoint", "#cc79a7"),
];

/// Refuses an evaluation of another model than the manifest's, or with non-finite figures.
pub fn validate(evaluation: &Evaluation, manifest: &Manifest) -> Result<()> {
    let (e, m) = (&evaluation.model, &manifest.summary.model);
    if e != m {
        bail!(
            "evaluates model '{}' ({}, {} parameters), but the manifest is for '{}' ({}, {} parameters)",
            e.name,
            e.architecture,
            e.num_parameters,
            m.name,
            m.architecture,
            m.num_parameters
        );
    }
    for r in &evaluation.recipes {
        let o = &r.overall;
        let estimates = [
            o.mean_nll,
            o.delta_nll,
            o.delta_nll_relative,
            o.perplexity,
            o.kl_all,
            o.kl_label,
            o.top1_agreement_all,
            o.top1_agreement_label,
        ];
        let values = estimates.iter().flat_map(|e| std::iter::once(e.value).chain(e.ci.into_iter().flatten()));
        let mut values = values.chain([r.effective_bits]).chain(r.predicted_objective);
        if let Some(v) = values.find(|v| !v.is_finite()) {
            bail!("recipe '{}': value {v}", r.name);
        }
    }
    Ok(())
}

/// One row of the recipe table (`evaluation.recipes[]` in the template).
#[derive(Debug, Clone, Serialize)]
struct RecipeRow {
    name: String,
    kind: String,
    source: Option<String>,
    effective_bits: f64,
    bits_fmt: String,
    groups_quantized: usize,
    groups_fmt: String,
    predicted_objective: Option<f64>,
    predicted_fmt: String,
    mean_nll_fmt: String,
    delta_nll_fmt: String,
    kl_all_fmt: String,
    top1_fmt: String,
    chosen: bool,
}

/// `value (low – high)`, or the value alone without an interval.
fn with_ci(e: &Estimate, fmt: impl Fn(f64) -> String) -> String {
    match e.ci {
        Some([lo, hi]) => format!("{} ({} – {})", fmt(e.value), fmt(lo), fmt(hi)),
        None => fmt(e.value),
    }
}

/// A fraction as a percentage number (no `%`): one decimal from 0.1 % up, else two significant
/// digits (`0.8`, `12.3`, `0.034`).
fn percent(fraction: f64) -> String {
    let p = 100.0 * fraction;
    let a = p.abs();
    if a == 0.0 || a >= 0.1 {
        format!("{p:.1}")
    } else if a < 1e-6 {
        fmt_sci(p, 1)
    } else {
        let decimals = (-a.log10()).ceil() as usize + 1;
        format!("{p:.decimals$}")
    }
}

/// Like [`percent`], with a sign on positive values (`+0.8`).
fn signed_percent(fraction: f64) -> String {
    let s = percent(fraction);
    if fraction > 0.0 {
        format!("+{s}")
    } else {
        s
    }
}

fn recipe_row(r: &RecipeResult, groups_total: usize, chosen: bool) -> RecipeRow {
    let o = &r.overall;
    RecipeRow {
        name: r.name.clone(),
        kind: r.kind.clone(),
        source: r.source.clone(),
        effective_bits: r.effective_bits,
        bits_fmt: format!("{:.3}", r.effective_bits),
        groups_quantized: r.groups_quantized,
        groups_fmt: format!("{}/{groups_total}", r.groups_quantized),
        predicted_objective: r.predicted_objective,
        predicted_fmt: r.predicted_objective.map_or_else(|| "–".into(), |v| fmt_sci(v, 3)),
        mean_nll_fmt: with_ci(&o.mean_nll, |v| format!("{v:.4}")),
        delta_nll_fmt: format!("{} %", with_ci(&o.delta_nll_relative, signed_percent)),
        kl_all_fmt: with_ci(&o.kl_all, |v| fmt_sci(v, 2)),
        top1_fmt: format!("{} %", with_ci(&o.top1_agreement_all, percent)),
        chosen,
    }
}

/// Spearman's rank correlation of `x` and `y` (average ranks for ties; Pearson's correlation of
/// the ranks). `None` with fewer than 3 pairs or when either side is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 3 {
        return None;
    }
    let (rx, ry) = (average_ranks(x), average_ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// 1-based ranks, ascending; tied values share the mean of their ranks.
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// `FP8`, `FP8 and INT4`, `FP8, INT4 and INT8`: the formats of a recipe in first-use order.
fn format_list(r: &RecipeResult) -> String {
    let mut names: Vec<&str> = Vec::new();
    for l in &r.quantized_layers {
        if !names.contains(&l.format.as_str()) {
            names.push(&l.format);
        }
    }
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// One plain sentence on a recipe: what it quantizes, what that does to the loss (with its
/// interval) and how often it changes the most likely token.
fn sentence(r: &RecipeResult, groups_total: usize, level: f64) -> String {
    let what = if r.groups_quantized == 0 {
        "Quantizing no group".to_string()
    } else {
        format!("{} on {} of {groups_total} groups", format_list(r), r.groups_quantized)
    };
    let rel = &r.overall.delta_nll_relative;
    let change = if rel.value > 0.0 {
        format!("raises the loss by {} %", percent(rel.value))
    } else if rel.value < 0.0 {
        format!("lowers the loss by {} %", percent(-rel.value))
    } else {
        "leaves the loss unchanged".to_string()
    };
    let ci = match rel.ci {
        Some([lo, hi]) if lo >= 0.0 => {
            format!(" ({} % CI {}–{} %)", fmt_number(100.0 * level), percent(lo), percent(hi))
        }
        Some([lo, hi]) => format!(
            " ({} % CI of the change {} % to {} %)",
            fmt_number(100.0 * level),
            signed_percent(lo),
            signed_percent(hi)
        ),
        None => String::new(),
    };
    let changed = 1.0 - r.overall.top1_agreement_all.value;
    format!("{what} {change}{ci} and changes the top-1 token at {} % of positions.", percent(changed))
}

/// The section's template context (`evaluation`) and its plot (`<stem>-predicted-vs-measured.svg`).
pub struct Section {
    pub context: Value,
    pub plot_file: String,
    pub plot: String,
}

pub const PLOT_TITLE: &str = "Predicted vs measured";

/// Builds the section for an evaluation already checked by [`validate`].
pub fn section(evaluation: &Artifact<Evaluation>, manifest: &Manifest, stem: &str) -> Section {
    let e = &evaluation.payload;
    let groups_total = manifest.summary.groups_total;
    // The first recipe of kind `chosen` is the one the sentence and the plot's label are about.
    let chosen = e.recipes.iter().position(|r| r.kind == "chosen");
    let rows: Vec<RecipeRow> =
        e.recipes.iter().enumerate().map(|(i, r)| recipe_row(r, groups_total, Some(i) == chosen)).collect();
    let predicted: Vec<&RecipeResult> = e.recipes.iter().filter(|r| r.predicted_objective.is_some()).collect();
    let xs: Vec<f64> = predicted.iter().filter_map(|r| r.predicted_objective).collect();
    let ys: Vec<f64> = predicted.iter().map(|r| r.overall.kl_all.value).collect();
    let rho = spearman(&xs, &ys);
    let rho_fmt = rho.map_or_else(|| "n/a".into(), |v| format!("{v:.3}"));
    let plot_file = format!("{stem}-predicted-vs-measured.svg");
    let plot = scatter(&predicted, chosen.map(|i| &e.recipes[i]), &rho_fmt);
    let label_tokens: usize = e.samples.iter().map(|s| s.num_label_tokens).sum();
    let positions: usize = e.samples.iter().map(|s| s.num_tokens).sum();
    let context = minijinja::context! {
        header => minijinja::context! {
            kind => &evaluation.kind,
            schema_version => evaluation.schema_version,
            tool => &evaluation.tool,
            tool_version => &evaluation.tool_version,
            provenance => Value::from_serialize(&evaluation.provenance),
        },
        payload => Value::from_serialize(e),
        dtype => &e.dtype,
        as_scored => e.as_scored,
        samples => e.samples.len(),
        label_tokens => label_tokens,
        label_tokens_fmt => thousands(label_tokens as u64),
        positions => positions,
        positions_fmt => thousands(positions as u64),
        confidence => Value::from_serialize(&e.confidence),
        level_fmt => fmt_number(100.0 * e.confidence.level),
        recipes => Value::from_serialize(&rows),
        spearman => minijinja::context! { value => rho, fmt => &rho_fmt, n => xs.len() },
        chosen => chosen.map(|i| Value::from_serialize(&rows[i])),
        sentence => chosen.map(|i| sentence(&e.recipes[i], groups_total, e.confidence.level)),
        plot => minijinja::context! { file => &plot_file, title => PLOT_TITLE },
    };
    Section { context, plot_file, plot }
}

/// Predicted objective (x) vs measured KL per token (y), one marker per recipe with a predicted
/// objective, coloured by kind; the chosen recipe circled. Log axes when a side spans two
/// decades or more (zeros are then listed as not shown).
fn scatter(recipes: &[&RecipeResult], chosen: Option<&RecipeResult>, rho: &str) -> String {
    let point = |r: &RecipeResult| (r.predicted_objective.unwrap_or(0.0), r.overall.kl_all.value);
    let x = Axis::fit(recipes.iter().map(|r| point(r).0), true);
    let y = Axis::fit(recipes.iter().map(|r| point(r).1), true);
    let hidden = |&(px, py): &(f64, f64)| (x.log && px <= 0.0) || (y.log && py <= 0.0);
    let mut series = Vec::new();
    for (kind, color) in KINDS.iter().copied().chain([("other", "#8c564b")]) {
        let known = |k: &str| KINDS.iter().any(|(n, _)| *n == k);
        let points: Vec<(f64, f64)> = recipes
            .iter()
            .filter(|r| if kind == "other" { !known(&r.kind) } else { r.kind == kind })
            .map(|r| point(r))
            .filter(|p| !hidden(p))
            .collect();
        if !points.is_empty() {
            series.push(Series {
                name: kind.into(),
                color: color.into(),
                points,
                line: false,
                step: false,
                marker: 4.5,
            });
        }
    }
    let omitted = recipes.iter().filter(|r| hidden(&point(r))).count();
    let mut note = format!("Spearman rank correlation {rho} over {} recipes", recipes.len());
    if omitted > 0 {
        let what = if omitted == 1 { "recipe" } else { "recipes" };
        note.push_str(&format!("; {omitted} {what} at 0 not shown (log axis)"));
    }
    let highlights = chosen
        .filter(|r| r.predicted_objective.is_some() && !hidden(&point(r)))
        .map(|r| {
            let (px, py) = point(r);
            Highlight { x: px, y: py, label: format!("chosen: {}", r.name), color: "#009e73".into() }
        })
        .into_iter()
        .collect();
    let panel = Panel {
        title: "Search objective vs measured KL per token".into(),
        x_label: "predicted: search objective (Σ score of the quantized groups)".into(),
        y_label: "measured: KL per token".into(),
        x,
        y,
        x_ticks: Vec::new(),
        series,
        highlights,
        vlines: Vec::new(),
        note,
    };
    svg::render(PLOT_TITLE, &[panel])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_percentages() {
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(percent(0.008), "0.8");
        assert_eq!(percent(0.123), "12.3");
        assert_eq!(percent(0.00034), "0.034");
        assert_eq!(signed_percent(0.008), "+0.8");
        assert_eq!(signed_percent(-0.008), "-0.8");
    }
}
