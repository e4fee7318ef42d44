//! Stage 5, `manifest-to-md`: a Markdown report of a `qsens.manifest`, rendered from a minijinja
//! template (the default one is `report.md.j2`, embedded), with SVG plots written beside it.
//!
//! For `report.md` the plots are `report-sensitivity.svg` (score per layer across depth, one
//! series per projection kind), `report-towers.svg` (vision vs text) and `report-frontier.svg`
//! (objective vs effective bits, the chosen point marked), linked by relative paths. With an
//! evaluation (`--evaluation`, see [`evaluation`]) a "Predicted vs measured" section and
//! `report-predicted-vs-measured.svg` are added. Everything is rendered in memory first, so a
//! failure writes nothing. The template context is documented in `docs/manifest.md`.

pub mod evaluation;
pub mod experts;
pub mod svg;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::artifact::evaluation::Evaluation;
use crate::artifact::manifest::{GroupEntry, LayerEntry, Manifest};
use crate::artifact::{self, Artifact, Location};
use crate::cli::Reporter;
use crate::search::naming;
use svg::{fmt_number, fmt_sci, Axis, Highlight, Panel, Series};

pub const TOOL: &str = "manifest-to-md";

/// The default template.
pub const DEFAULT_TEMPLATE: &str = include_str!("report.md.j2");

#[derive(Debug, Clone)]
pub struct ReportArgs {
    pub manifest: Location,
    /// The Markdown file; the SVGs go beside it.
    pub output: PathBuf,
    pub template: Option<PathBuf>,
    /// A `qsens.evaluation` of the same model: adds the "Predicted vs measured" section.
    pub evaluation: Option<Location>,
}

/// A rendered report: the Markdown and the SVG files (name, content) to write beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub markdown: String,
    pub svgs: Vec<(String, String)>,
}

/// Reads the manifest, renders, and writes the report and its plots.
pub fn run(args: &ReportArgs, reporter: Reporter) -> Result<()> {
    let out = &args.output;
    ensure!(out.as_os_str() != "-", "the report needs a file path (-o FILE): its plots are written beside it");
    let manifest: Artifact<Manifest> = artifact::read(args.manifest.clone())?;
    validate(&manifest.payload).with_context(|| format!("{}", args.manifest))?;
    let evaluation = match &args.evaluation {
        Some(location) => {
            let e: Artifact<Evaluation> = artifact::read(location.clone())?;
            evaluation::validate(&e.payload, &manifest.payload).with_context(|| format!("{location}"))?;
            Some(e)
        }
        None => None,
    };
    let (name, template) = match &args.template {
        Some(p) => (
            p.file_name().map_or_else(|| "template".into(), |n| n.to_string_lossy().into_owned()),
            std::fs::read_to_string(p).with_context(|| format!("reading template {}", p.display()))?,
        ),
        None => ("report.md.j2".to_string(), DEFAULT_TEMPLATE.to_string()),
    };
    let stem = out.file_stem().map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
    let rendered =
        render_with_evaluation(&manifest, evaluation.as_ref(), &stem, &name, &template).with_context(|| match &args
            .template
        {
            Some(p) => format!("template {}", p.display()),
            None => "default template".into(),
        })?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    for (file, content) in &rendered.svgs {
        artifact::write_file_atomic(&dir.join(file), content.as_bytes())?;
    }
    artifact::write_file_atomic(out, rendered.markdown.as_bytes())?;
    reporter.note(format!("{TOOL}: wrote {} and {} plots", out.display(), rendered.svgs.len()));
    Ok(())
}

/// Checks that the numbers the report uses are finite.
pub fn validate(m: &Manifest) -> Result<()> {
    let s = &m.summary;
    for (what, v) in [
        ("summary.objective", s.objective),
        ("summary.achieved_effective_bits", s.achieved_effective_bits),
        ("summary.budget.effective_bits", s.budget.effective_bits),
        ("summary.budget.min_effective_bits", s.budget.min_effective_bits),
        ("summary.objective_all_quantized", s.objective_all_quantized),
    ] {
        ensure!(v.is_finite(), "{what} is {v}");
    }
    for g in &m.groups {
        let bad =
            g.scores.iter().chain(&g.costs).chain(std::iter::once(&g.sensitivity)).chain(std::iter::once(&g.share));
        if let Some(v) = bad.into_iter().find(|v| !v.is_finite()) {
            bail!("group '{}': value {v}", g.name);
        }
        if let Some(ci) = g.ci {
            ensure!(ci.iter().all(|v| v.is_finite()), "group '{}': interval {:?}", g.name, ci);
        }
    }
    for l in &m.layers {
        for v in l.scores.iter().flatten().chain(l.sensitivity.iter()).chain(l.share.iter()) {
            ensure!(v.is_finite(), "layer '{}': value {v}", l.name);
        }
        if let Some(ci) = l.ci {
            ensure!(ci.iter().all(|v| v.is_finite()), "layer '{}': interval {:?}", l.name, ci);
        }
    }
    ensure!(
        !m.frontier.points.is_empty() && m.frontier.chosen < m.frontier.points.len(),
        "frontier has no chosen point"
    );
    for p in &m.frontier.points {
        ensure!(
            p.objective.is_finite() && p.budget_bits.is_finite() && p.effective_bits.is_finite(),
            "frontier point {:?} is not finite",
            p
        );
    }
    Ok(())
}

/// One plotted / tabulated entity (a layer, or a group when only groups were scored).
#[derive(Debug, Clone, Serialize)]
struct Row {
    rank: usize,
    name: String,
    group: String,
    tower: String,
    series: String,
    block: Option<usize>,
    params: u64,
    params_fmt: String,
    score: f64,
    score_fmt: String,
    share: f64,
    share_fmt: String,
    ci: Option<[f64; 2]>,
    ci_fmt: String,
    rank_interval: Option<[usize; 2]>,
    rank_ci_fmt: String,
    chosen: String,
}

fn thousands(x: impl Into<u128>) -> String {
    let x: u128 = x.into();
    let s = x.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

fn ci_fmt(ci: Option<[f64; 2]>) -> String {
    ci.map_or_else(|| "–".into(), |[a, b]| format!("{} – {}", fmt_sci(a, 2), fmt_sci(b, 2)))
}

fn rank_fmt(r: Option<[usize; 2]>) -> String {
    r.map_or_else(|| "–".into(), |[a, b]| if a == b { a.to_string() } else { format!("{a}–{b}") })
}

fn layer_row(l: &LayerEntry) -> Option<Row> {
    let score = l.sensitivity?;
    Some(Row {
        rank: l.rank?,
        name: l.name.clone(),
        group: l.group.clone(),
        tower: l.tower.clone(),
        series: l.series.clone(),
        block: l.block,
        params: l.params,
        params_fmt: thousands(l.params),
        score,
        score_fmt: fmt_sci(score, 3),
        share: l.share.unwrap_or(0.0),
        share_fmt: pct(l.share.unwrap_or(0.0)),
        ci: l.ci,
        ci_fmt: ci_fmt(l.ci),
        rank_interval: l.rank_interval,
        rank_ci_fmt: rank_fmt(l.rank_interval),
        chosen: l.chosen.clone(),
    })
}

fn group_row(g: &GroupEntry) -> Row {
    let first = g.members.first().map_or(g.name.as_str(), |m| m.as_str());
    Row {
        rank: g.rank,
        name: g.name.clone(),
        group: g.name.clone(),
        tower: g.tower.clone(),
        series: g.series.clone(),
        block: naming::classify(first).block,
        params: g.params,
        params_fmt: thousands(g.params),
        score: g.sensitivity,
        score_fmt: fmt_sci(g.sensitivity, 3),
        share: g.share,
        share_fmt: pct(g.share),
        ci: g.ci,
        ci_fmt: ci_fmt(g.ci),
        rank_interval: g.rank_interval,
        rank_ci_fmt: rank_fmt(g.rank_interval),
        chosen: g.chosen.clone(),
    }
}

/// Sorted by rank, then name.
fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
    rows.sort_by(|a, b| a.rank.cmp(&b.rank).then(a.name.cmp(&b.name)));
    rows
}

/// The family a row belongs to in the tower comparison.
fn family(r: &Row) -> &'static str {
    let s = r.series.as_str();
    match r.tower.as_str() {
        "lm_head" => "lm_head",
        "vision" if s.starts_with("merger") || s.starts_with("deepstack") || s == "patch_embed" => {
            "vision mergers + patch embed"
        }
        "vision" if s == "fc1" || s == "fc2" => "vision MLP",
        "vision" => "vision attention",
        _ if ["gate", "up", "down", "gate/up"].contains(&s) => "text MLP",
        _ => "text attention",
    }
}

const FAMILIES: [&str; 6] =
    ["vision attention", "vision MLP", "vision mergers + patch embed", "text attention", "text MLP", "lm_head"];

#[derive(Debug, Clone, Serialize)]
struct FamilyStat {
    name: String,
    entries: usize,
    params_fmt: String,
    score_fmt: String,
    share_fmt: String,
    median_fmt: String,
    quantized: usize,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn family_stats(rows: &[Row], none: &str) -> Vec<FamilyStat> {
    let total: f64 = rows.iter().map(|r| r.score).sum();
    FAMILIES
        .iter()
        .filter_map(|&f| {
            let members: Vec<&Row> = rows.iter().filter(|r| family(r) == f).collect();
            if members.is_empty() {
                return None;
            }
            let score: f64 = members.iter().map(|r| r.score).sum();
            let mut scores: Vec<f64> = members.iter().map(|r| r.score).collect();
            Some(FamilyStat {
                name: f.to_string(),
                entries: members.len(),
                params_fmt: thousands(members.iter().map(|r| r.params as u128).sum::<u128>()),
                score_fmt: fmt_sci(score, 3),
                share_fmt: pct(if total > 0.0 { score / total } else { 0.0 }),
                median_fmt: fmt_sci(median(&mut scores), 2),
                quantized: members.iter().filter(|r| r.chosen != none).count(),
            })
        })
        .collect()
}

/// Depth plot: text and vision panels, one series per projection kind.
fn sensitivity_plot(rows: &[Row], level: &str) -> String {
    let axis = Axis::fit(rows.iter().map(|r| r.score), true);
    let note = |n: usize| {
        if n > 0 {
            format!("{n} {} with score 0 not shown (log axis)", if n == 1 { "entry" } else { "entries" })
        } else {
            String::new()
        }
    };
    let mut panels = Vec::new();
    let y_label = format!("score per {level}");
    for tower in ["text", "vision"] {
        let part: Vec<&Row> = rows
            .iter()
            .filter(|r| if tower == "text" { r.tower == "text" || r.tower == "lm_head" } else { r.tower == tower })
            .collect();
        if part.is_empty() {
            continue;
        }
        let depth =
            part.iter().filter(|r| !is_extra(r)).filter_map(|r| r.block).max().map_or(0, |b| b.saturating_add(1));
        let x_of = |r: &Row| -> f64 {
            let s = r.series.as_str();
            match (tower, s) {
                (_, "lm_head") => depth as f64 + 1.0,
                ("vision", "patch_embed") => -1.5,
                ("vision", _) if s.starts_with("merger") => depth as f64 + 0.5,
                ("vision", _) if s.starts_with("deepstack") => depth as f64 + 1.5 + r.block.unwrap_or(0) as f64,
                _ => r.block.unwrap_or(0) as f64,
            }
        };
        let mut names: Vec<String> = Vec::new();
        for r in &part {
            let key = series_key(&r.series);
            if !names.contains(&key) {
                names.push(key);
            }
        }
        names.sort_by(|a, b| svg::series_order(a).cmp(&svg::series_order(b)).then(a.cmp(b)));
        let series: Vec<Series> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let points: Vec<(f64, f64)> =
                    part.iter().filter(|r| &series_key(&r.series) == name).map(|r| (x_of(r), r.score)).collect();
                Series {
                    name: name.clone(),
                    color: svg::series_color(name, i).to_string(),
                    line: points.len() > 1
                        && !["merger", "deepstack mergers", "patch_embed", "lm_head"].contains(&name.as_str()),
                    step: false,
                    points,
                    marker: 3.0,
                }
            })
            .collect();
        let extra_max = part.iter().map(|r| x_of(r)).fold(depth as f64, f64::max);
        let extra_min = part.iter().map(|r| x_of(r)).fold(0.0, f64::min);
        let every = (depth / 12).max(1);
        let mut ticks: Vec<(f64, String)> = (0..depth).step_by(every).map(|b| (b as f64, b.to_string())).collect();
        if tower == "text" && part.iter().any(|r| r.series == "lm_head") {
            ticks.push((depth as f64 + 1.0, "lm_head".into()));
        }
        if tower == "vision" {
            if part.iter().any(|r| r.series == "patch_embed") {
                ticks.push((-1.5, "PE".into()));
            }
            if part.iter().any(|r| r.series.starts_with("merger")) {
                ticks.push((depth as f64 + 0.5, "M".into()));
            }
            let mut ds: Vec<usize> =
                part.iter().filter(|r| r.series.starts_with("deepstack")).filter_map(|r| r.block).collect();
            ds.sort_unstable();
            ds.dedup();
            for k in ds {
                ticks.push((depth as f64 + 1.5 + k as f64, format!("D{k}")));
            }
        }
        let x_label = if tower == "text" {
            "decoder layer (lm_head at the end)".to_string()
        } else {
            "ViT block (PE = patch embed, M = merger, Dk = deepstack merger k)".to_string()
        };
        let n_omitted = part.iter().filter(|r| axis.log && r.score <= 0.0).count();
        panels.push(Panel {
            title: format!("{} tower: sensitivity across depth", if tower == "text" { "Text" } else { "Vision" }),
            x_label,
            y_label: y_label.clone(),
            x: Axis { min: extra_min - 0.8, max: extra_max + 0.8, log: false },
            y: axis,
            x_ticks: ticks,
            series,
            highlights: Vec::new(),
            vlines: Vec::new(),
            note: note(n_omitted),
        });
    }
    svg::render("Sensitivity across depth", &panels)
}

/// Vision/text rows that are not part of the repeated blocks.
fn is_extra(r: &Row) -> bool {
    let s = r.series.as_str();
    s == "lm_head" || s == "patch_embed" || s.starts_with("merger") || s.starts_with("deepstack")
}

/// Merger and deepstack series are one series each in the plot (fc1 and fc2 share it).
fn series_key(s: &str) -> String {
    if s.starts_with("deepstack") {
        "deepstack mergers".into()
    } else if s.starts_with("merger") {
        "merger".into()
    } else {
        s.to_string()
    }
}

/// Vision vs text: every entry as a dot in its family's column, with the median marked.
fn towers_plot(rows: &[Row], stats: &[FamilyStat], level: &str) -> String {
    let axis = Axis::fit(rows.iter().map(|r| r.score), true);
    let fams: Vec<&str> = FAMILIES.iter().copied().filter(|f| rows.iter().any(|r| family(r) == *f)).collect();
    let mut series = Vec::new();
    let mut ticks = Vec::new();
    for (i, f) in fams.iter().enumerate() {
        let members: Vec<&Row> = rows.iter().filter(|r| family(r) == *f).collect();
        // Deterministic scatter within the column (a multiplicative hash of the index).
        let jitter = |j: usize| ((j as u64).wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0 - 0.5;
        let points = members.iter().enumerate().map(|(j, r)| (i as f64 + 0.5 * jitter(j), r.score)).collect();
        let color = if f.starts_with("vision") {
            svg::PALETTE[0]
        } else if *f == "lm_head" {
            svg::PALETTE[7]
        } else {
            svg::PALETTE[5]
        };
        series.push(Series { name: String::new(), color: color.into(), points, line: false, step: false, marker: 3.0 });
        let mut scores: Vec<f64> = members.iter().map(|r| r.score).collect();
        let med = median(&mut scores);
        series.push(Series {
            name: String::new(),
            color: "#222222".into(),
            points: vec![(i as f64 - 0.3, med), (i as f64 + 0.3, med)],
            line: true,
            step: false,
            marker: 0.0,
        });
        let share = stats.iter().find(|s| s.name == *f).map_or(String::new(), |s| s.share_fmt.clone());
        ticks.push((i as f64, format!("{}\n{share} of score", short_family(f))));
    }
    series.push(Series {
        name: "vision".into(),
        color: svg::PALETTE[0].into(),
        points: vec![],
        line: false,
        step: false,
        marker: 0.0,
    });
    series.push(Series {
        name: "text".into(),
        color: svg::PALETTE[5].into(),
        points: vec![],
        line: false,
        step: false,
        marker: 0.0,
    });
    series.push(Series {
        name: "lm_head".into(),
        color: svg::PALETTE[7].into(),
        points: vec![],
        line: false,
        step: false,
        marker: 0.0,
    });
    series.push(Series {
        name: "median".into(),
        color: "#222222".into(),
        points: vec![],
        line: false,
        step: false,
        marker: 0.0,
    });
    let omitted = rows.iter().filter(|r| axis.log && r.score <= 0.0).count();
    let panel = Panel {
        title: "Vision vs text: sensitivity by module family".into(),
        x_label: String::new(),
        y_label: format!("score per {level}"),
        x: Axis { min: -0.6, max: fams.len() as f64 - 0.4, log: false },
        y: axis,
        x_ticks: ticks,
        series,
        highlights: Vec::new(),
        vlines: Vec::new(),
        note: if omitted > 0 {
            format!("{omitted} {} with score 0 not shown (log axis)", if omitted == 1 { "entry" } else { "entries" })
        } else {
            String::new()
        },
    };
    svg::render("Vision vs text", &[panel])
}

fn short_family(f: &str) -> &str {
    match f {
        "vision attention" => "vision attn",
        "vision MLP" => "vision MLP",
        "vision mergers + patch embed" => "mergers + PE",
        "text attention" => "text attn",
        "text MLP" => "text MLP",
        other => other,
    }
}

/// Objective vs effective bits, the chosen point marked.
fn frontier_plot(m: &Manifest) -> String {
    let f = &m.frontier;
    let axis = Axis::fit(f.points.iter().map(|p| p.objective), true);
    let xs = f.points.iter().map(|p| p.budget_bits);
    let (xmin, xmax) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let x = Axis { min: (xmin - 0.25).floor().max(0.0), max: xmax.max(16.0).ceil(), log: false };
    let c = &f.points[f.chosen];
    let omitted = f.points.iter().filter(|p| axis.log && p.objective <= 0.0).count();
    let panel = Panel {
        title: "Frontier: minimum objective vs effective-bits budget".into(),
        x_label: "effective bits (budget)".into(),
        y_label: "objective (Σ score)".into(),
        x,
        y: axis,
        x_ticks: Vec::new(),
        series: vec![Series {
            name: "optimum".into(),
            color: svg::PALETTE[0].into(),
            points: f.points.iter().map(|p| (p.budget_bits, p.objective)).collect(),
            line: true,
            step: true,
            marker: 0.0,
        }],
        highlights: vec![Highlight {
            x: c.budget_bits,
            y: c.objective,
            label: format!("chosen: {:.3} bits, {}", c.effective_bits, fmt_sci(c.objective, 2)),
            color: svg::PALETTE[5].into(),
        }],
        vlines: vec![(
            m.summary.budget.effective_bits,
            format!("budget {}", fmt_number(m.summary.budget.effective_bits)),
        )],
        note: if omitted > 0 {
            format!("{omitted} {} with objective 0 not shown (log axis)", if omitted == 1 { "point" } else { "points" })
        } else {
            String::new()
        },
    };
    svg::render("Frontier", &[panel])
}

fn environment<'a>() -> Environment<'a> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_keep_trailing_newline(true);
    env.add_filter("sci", |x: f64, digits: Option<usize>| fmt_sci(x, digits.unwrap_or(3)));
    env.add_filter("num", |x: f64| fmt_number(x));
    env.add_filter("pct", |x: f64, digits: Option<usize>| format!("{:.*} %", digits.unwrap_or(1), 100.0 * x));
    env.add_filter("bits", |x: f64| format!("{x:.3}"));
    env.add_filter("thousands", |x: u64| thousands(x));
    env.add_filter("md", |s: String| s.replace('|', "\\|"));
    env
}

/// Renders the report for `manifest` with plots named `<stem>-*.svg`.
pub fn render(manifest: &Artifact<Manifest>, stem: &str, template_name: &str, template: &str) -> Result<Rendered> {
    render_with_evaluation(manifest, None, stem, template_name, template)
}

/// [`render`], with the "Predicted vs measured" section of an evaluation that
/// [`evaluation::validate`] accepted for this manifest.
pub fn render_with_evaluation(
    manifest: &Artifact<Manifest>,
    evaluation: Option<&Artifact<Evaluation>>,
    stem: &str,
    template_name: &str,
    template: &str,
) -> Result<Rendered> {
    let m = &manifest.payload;
    let none = m.formats.last().map_or("NONE", |f| f.info.name.as_str());
    let layer_rows: Vec<Row> = m.layers.iter().filter_map(layer_row).collect();
    let (level, rows) = if !layer_rows.is_empty() && layer_rows.len() == m.layers.len() {
        ("layer", sorted(layer_rows))
    } else {
        ("group", sorted(m.groups.iter().map(group_row).collect()))
    };
    let group_rows = sorted(m.groups.iter().map(group_row).collect());
    let stats = family_stats(&rows, none);

    let files = [
        ("sensitivity", format!("{stem}-sensitivity.svg"), "Sensitivity across depth"),
        ("towers", format!("{stem}-towers.svg"), "Vision vs text"),
        ("frontier", format!("{stem}-frontier.svg"), "Frontier"),
    ];
    let mut svgs = vec![
        (files[0].1.clone(), sensitivity_plot(&rows, level)),
        (files[1].1.clone(), towers_plot(&rows, &stats, level)),
        (files[2].1.clone(), frontier_plot(m)),
    ];
    let mut plots: std::collections::BTreeMap<&str, Value> =
        files.iter().map(|(id, file, title)| (*id, minijinja::context! { file => file, title => title })).collect();
    let evaluation_context = evaluation.map(|e| {
        let section = evaluation::section(e, m, stem);
        plots.insert(
            "predicted_vs_measured",
            minijinja::context! { file => &section.plot_file, title => evaluation::PLOT_TITLE },
        );
        svgs.push((section.plot_file, section.plot));
        section.context
    });
    let experts_context = experts::section(m, stem).map(|section| {
        plots.insert("experts", minijinja::context! { file => &section.plot_file, title => experts::PLOT_TITLE });
        svgs.push((section.plot_file, section.plot));
        section.context
    });

    let s = &m.summary;
    let fp = &m.frontier;
    let chosen = &fp.points[fp.chosen];
    // Frontier table: whole-bit grid budgets plus the chosen point.
    let frontier_rows: Vec<&crate::artifact::manifest::FrontierPoint> = fp
        .points
        .iter()
        .filter(|p| p.kind == "chosen" || (p.kind == "grid" && (p.budget_bits - p.budget_bits.round()).abs() < 1e-9))
        .collect();
    // With several quantized formats: every group's score per format, and each frontier
    // point's mix of formats.
    let quantized_formats: Vec<&str> =
        m.formats[..m.formats.len().saturating_sub(1)].iter().map(|f| f.info.name.as_str()).collect();
    let per_format = (quantized_formats.len() > 1).then(|| {
        let mut groups: Vec<&GroupEntry> = m.groups.iter().collect();
        groups.sort_by(|a, b| a.rank.cmp(&b.rank).then(a.name.cmp(&b.name)));
        let rows: Vec<Value> = groups
            .iter()
            .map(|g| {
                let scores: Vec<String> = g.scores[..quantized_formats.len()].iter().map(|&x| fmt_sci(x, 3)).collect();
                minijinja::context! { name => &g.name, params_fmt => thousands(g.params), scores => scores, chosen => &g.chosen }
            })
            .collect();
        minijinja::context! { formats => &quantized_formats, rows => rows }
    });
    let mix_of = |p: &crate::artifact::manifest::FrontierPoint| -> String {
        p.groups_per_format
            .iter()
            .zip(&m.formats)
            .filter(|(&n, _)| n > 0)
            .map(|(n, f)| format!("{} {n}", f.info.name))
            .collect::<Vec<_>>()
            .join(" · ")
    };
    let frontier_mix: Vec<String> = frontier_rows.iter().map(|p| mix_of(p)).collect();
    let true_cost = m.formats.iter().any(|f| f.info.modelopt_bits.is_some());
    let summary_fmt = minijinja::context! {
        budget_bits => fmt_number(s.budget.effective_bits),
        achieved_bits => format!("{:.3}", s.achieved_effective_bits),
        min_bits => format!("{:.3}", s.budget.min_effective_bits),
        objective => fmt_sci(s.objective, 4),
        objective_all => fmt_sci(s.objective_all_quantized, 4),
        objective_ratio => if s.objective_all_quantized > 0.0 { pct(s.objective / s.objective_all_quantized) } else { "–".into() },
        params_total => thousands(s.params_total),
        params_quantized => thousands(s.params_quantized),
        params_quantized_pct => pct(if s.params_total > 0 { s.params_quantized as f64 / s.params_total as f64 } else { 0.0 }),
        gap => fmt_sci(s.solver.gap, 2),
        lp_bound => fmt_sci(s.solver.lp_bound, 4),
    };
    let ctx = minijinja::context! {
        tool => TOOL,
        version => env!("CARGO_PKG_VERSION"),
        header => minijinja::context! {
            kind => &manifest.kind,
            schema_version => manifest.schema_version,
            tool => &manifest.tool,
            tool_version => &manifest.tool_version,
            provenance => Value::from_serialize(&manifest.provenance),
        },
        manifest => Value::from_serialize(m),
        summary => Value::from_serialize(s),
        s => summary_fmt,
        formats => Value::from_serialize(&m.formats),
        per_format => per_format,
        true_cost => true_cost,
        table => minijinja::context! { level => level, rows => Value::from_serialize(&rows) },
        group_rows => Value::from_serialize(&group_rows),
        towers => Value::from_serialize(&stats),
        plots => Value::from_serialize(&plots),
        frontier => minijinja::context! {
            points => fp.points.len(),
            exhaustive => fp.exhaustive,
            pareto_points => fp.pareto_points,
            step => fp.step,
            chosen => Value::from_serialize(chosen),
            rows => Value::from_serialize(&frontier_rows),
            mix => frontier_mix,
        },
        exports => Value::from_serialize(&m.exports),
        confidence => Value::from_serialize(&m.confidence),
        source => Value::from_serialize(&m.scores_source),
        evaluation => evaluation_context,
        experts => experts_context,
    };
    let mut env = environment();
    env.add_template_owned(template_name.to_string(), template.to_string()).map_err(one_line)?;
    let markdown = env.get_template(template_name).map_err(one_line)?.render(ctx).map_err(one_line)?;
    Ok(Rendered { markdown, svgs })
}

/// minijinja errors (with their cause, line and name) on one line.
fn one_line(e: minijinja::Error) -> anyhow::Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    anyhow::anyhow!(msg)
}

/// Paths of the plots for a report path (`report.md` → `report-sensitivity.svg`, ...).
pub fn plot_paths(report: &Path) -> Vec<PathBuf> {
    let stem = report.file_stem().map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
    let dir = report.parent().unwrap_or(Path::new(""));
    ["sensitivity", "towers", "frontier"].iter().map(|k| dir.join(format!("{stem}-{k}.svg"))).collect()
}
