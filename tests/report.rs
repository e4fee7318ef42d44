//! `manifest-to-md`: well-formed linked SVGs, a sorted table, custom templates, determinism,
//! failures that write nothing.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use qsens::artifact::manifest::Manifest;
use qsens::artifact::{self, Artifact, Encoding, Provenance};
use qsens::cli::Reporter;
use qsens::report::{self, plot_paths};
use qsens::search::synthetic::{self, SyntheticSpec};
use qsens::search::{build_manifest, Settings};

fn source() -> qsens::artifact::manifest::ScoresSource {
    qsens::artifact::manifest::ScoresSource {
        path: "scores.msgpack".into(),
        digest: "sha256:00".into(),
        tool: "score-layers".into(),
        tool_version: "0.1.0".into(),
        provenance: Provenance::default(),
    }
}

fn manifest(spec: &SyntheticSpec, bits: f64) -> Artifact<Manifest> {
    let scores = synthetic::scores(spec);
    let mut settings = Settings::new(bits);
    settings.bootstrap.resamples = 200;
    let m = build_manifest(&scores, source(), &settings, Reporter::silent()).unwrap();
    Artifact::new("search", Provenance::default(), m)
}

fn small() -> SyntheticSpec {
    SyntheticSpec { vision_blocks: 4, deepstack: 2, text_layers: 5, formats: 4, samples: 12, seed: 5, ragged: false }
}

fn write_manifest(dir: &Path, name: &str, m: &Artifact<Manifest>, enc: Encoding) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, artifact::to_bytes(m, enc).unwrap()).unwrap();
    p
}

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_manifest-to-md")
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(exe()).args(args).output().unwrap()
}

fn table_ranks(md: &str) -> Vec<usize> {
    let section = md.split("by sensitivity").nth(1).unwrap().split("## Frontier").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| ") && l.split('|').nth(1).is_some_and(|c| c.trim().parse::<usize>().is_ok()))
        .map(|l| l.split('|').nth(1).unwrap().trim().parse().unwrap())
        .collect()
}

#[test]
fn report_links_well_formed_svgs_and_sorts_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(&small(), 7.0);
    let mpath = write_manifest(dir.path(), "m.json", &m, Encoding::Json);
    let out = dir.path().join("out/report.md");
    let o = run(&["--manifest", mpath.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(&out).unwrap();
    for svg in plot_paths(&out) {
        let name = svg.file_name().unwrap().to_str().unwrap();
        assert!(md.contains(&format!("]({name})")), "report does not link {name}");
        let text = std::fs::read_to_string(&svg).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let marks = doc.descendants().filter(|n| n.has_tag_name("circle") || n.has_tag_name("polyline")).count();
        assert!(marks > 1, "{name} shows no data");
    }
    let ranks = table_ranks(&md);
    assert_eq!(ranks.len(), m.payload.layers.len());
    assert_eq!(ranks, (1..=ranks.len()).collect::<Vec<_>>());
    assert!(md.contains("Layers by sensitivity"));
    assert!(md.contains(&format!(
        "{} of {} layer groups quantized",
        m.payload.summary.groups_quantized, m.payload.summary.groups_total
    )));
    // Rerunning on the same manifest gives byte-identical files.
    let before: Vec<Vec<u8>> =
        std::iter::once(out.clone()).chain(plot_paths(&out)).map(|p| std::fs::read(p).unwrap()).collect();
    let o = run(&["--manifest", mpath.to_str().unwrap(), "-o", out.to_str().unwrap(), "-q"]);
    assert!(o.status.success());
    let after: Vec<Vec<u8>> =
        std::iter::once(out.clone()).chain(plot_paths(&out)).map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(before, after);
    // The msgpack encoding of the same manifest renders the same report.
    let mp = write_manifest(dir.path(), "m.msgpack", &m, Encoding::MessagePack);
    let r1 = report::render(&m, "x", "t", report::DEFAULT_TEMPLATE).unwrap();
    let back: Artifact<Manifest> = artifact::read(mp.as_path()).unwrap();
    assert_eq!(r1, report::render(&back, "x", "t", report::DEFAULT_TEMPLATE).unwrap());
}

#[test]
fn group_level_report_when_only_groups_were_scored() {
    let mut scores = synthetic::scores(&small());
    for l in &mut scores.layers {
        l.per_sample.clear();
    }
    let m = build_manifest(&scores, source(), &Settings::new(6.0), Reporter::silent()).unwrap();
    let a = Artifact::new("search", Provenance::default(), m);
    let r = report::render(&a, "r", "t", report::DEFAULT_TEMPLATE).unwrap();
    assert!(r.markdown.contains("Groups by sensitivity"));
    assert_eq!(table_ranks(&r.markdown).len(), a.payload.groups.len());
    for (name, svg) in &r.svgs {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn custom_template_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(&small(), 8.0);
    let mpath = write_manifest(dir.path(), "m.json", &m, Encoding::Json);
    let tpl = dir.path().join("mine.j2");
    std::fs::write(
        &tpl,
        "model={{ summary.model.name }} bits={{ summary.achieved_effective_bits | bits }} level={{ table.level }}\n\
         top={{ table.rows[0].name }} plot={{ plots.frontier.file }}\n\
         {% for f in formats %}{{ f.name }}:{{ f.groups_chosen }} {% endfor %}\n",
    )
    .unwrap();
    let out = dir.path().join("custom.md");
    let o =
        run(&["--manifest", mpath.to_str().unwrap(), "-o", out.to_str().unwrap(), "--template", tpl.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(&out).unwrap();
    let top = m.payload.layers.iter().find(|l| l.rank == Some(1)).unwrap();
    assert!(md.starts_with("model=synthetic-qwen3-vl bits="), "{md}");
    assert!(md.contains(&format!("top={} plot=custom-frontier.svg", top.name)), "{md}");
    assert!(dir.path().join("custom-frontier.svg").exists());
}

#[test]
fn failures_write_nothing_and_say_why_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.md");
    let check = |args: &[&str], needle: &str| {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("manifest-to-md: ") && err.contains(needle), "{err}");
        assert!(!out.exists());
        for p in plot_paths(&out) {
            assert!(!p.exists());
        }
    };
    let o = out.to_str().unwrap();
    // Wrong kind: a scores artifact.
    let scores = synthetic::scores(&small());
    let sp = dir.path().join("scores.json");
    std::fs::write(
        &sp,
        artifact::to_bytes(&Artifact::new("t", Provenance::default(), scores), Encoding::Json).unwrap(),
    )
    .unwrap();
    check(
        &["--manifest", sp.to_str().unwrap(), "-o", o],
        "scores.json: artifact kind is 'qsens.scores', expected 'qsens.manifest'",
    );
    // Malformed JSON.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, b"{\"kind\": \"qsens.manifest\", \"schema_version\": 1, ").unwrap();
    check(&["--manifest", bad.to_str().unwrap(), "-o", o], "bad.json");
    // NaN in a msgpack manifest.
    let mut m = manifest(&small(), 8.0);
    m.payload.groups[3].scores[0] = f64::NAN;
    let nan = write_manifest(dir.path(), "nan.msgpack", &m, Encoding::MessagePack);
    check(&["--manifest", nan.to_str().unwrap(), "-o", o], "nan.msgpack: group");
    // A template with a syntax error, and one using an undefined variable.
    let good = write_manifest(dir.path(), "good.json", &manifest(&small(), 8.0), Encoding::Json);
    let tpl = dir.path().join("broken.j2");
    std::fs::write(&tpl, "{% for x in %}").unwrap();
    check(&["--manifest", good.to_str().unwrap(), "-o", o, "--template", tpl.to_str().unwrap()], "broken.j2");
    std::fs::write(&tpl, "{{ no_such_thing.field }}").unwrap();
    check(&["--manifest", good.to_str().unwrap(), "-o", o, "--template", tpl.to_str().unwrap()], "undefined");
}

/// Writes a demo report to `QSENS_REPORT_DEMO` (a directory) for looking at; skipped otherwise.
#[test]
fn demo_report() {
    let Some(dir) = std::env::var_os("QSENS_REPORT_DEMO").map(PathBuf::from) else { return };
    let m = manifest(&SyntheticSpec { samples: 16, ..SyntheticSpec::qwen3_vl_250() }, 6.0);
    let r = report::render(&m, "report", "report.md.j2", report::DEFAULT_TEMPLATE).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("report.md"), &r.markdown).unwrap();
    for (n, s) in &r.svgs {
        std::fs::write(dir.join(n), s).unwrap();
    }
    write_manifest(&dir, "manifest.json", &m, Encoding::Json);
    // With a (synthetic) evaluation.
    let e = evaluation(&m.payload);
    let r = report::render_with_evaluation(&m, Some(&e), "evaluated", "t", report::DEFAULT_TEMPLATE).unwrap();
    std::fs::write(dir.join("evaluated.md"), &r.markdown).unwrap();
    for (n, s) in &r.svgs {
        std::fs::write(dir.join(n), s).unwrap();
    }
    let scores = synthetic::scores(&SyntheticSpec { samples: 16, ..SyntheticSpec::qwen3_vl_250() });
    let bytes = artifact::to_bytes(&Artifact::new("synthetic", Provenance::default(), scores), Encoding::MessagePack);
    std::fs::write(dir.join("scores.msgpack"), bytes.unwrap()).unwrap();
    // The same with group scores only.
    let mut scores = synthetic::scores(&SyntheticSpec { samples: 16, ..SyntheticSpec::qwen3_vl_250() });
    for l in &mut scores.layers {
        l.per_sample.clear();
    }
    let g = build_manifest(&scores, source(), &Settings::new(6.0), Reporter::silent()).unwrap();
    let r = report::render(&Artifact::new("search", Provenance::default(), g), "groups", "t", report::DEFAULT_TEMPLATE)
        .unwrap();
    std::fs::write(dir.join("groups.md"), &r.markdown).unwrap();
    for (n, s) in &r.svgs {
        std::fs::write(dir.join(n), s).unwrap();
    }
}

// ---- manifest-to-md --evaluation ---------------------------------------------------------------

use qsens::artifact::evaluation::{
    EvalConfidence, EvalSample, Evaluation, QuantizedLayer, RecipeResult, SampleMetrics,
};
use qsens::evaluate::metrics::summarize;
use qsens::search::confidence::Bootstrap;

const EVAL_SAMPLES: usize = 5;

/// Per-sample measurements of a recipe with the given KL per token and relative loss rise,
/// pooled by `summarize` against the unquantized model's.
fn measured(kl_per_token: f64, rise: f64, changed: f64) -> (Vec<SampleMetrics>, qsens::artifact::evaluation::Metrics) {
    let sample = |i: usize, kl: f64, rise: f64, changed: f64| {
        let (positions, labels) = (100 + 10 * i, 20 + i);
        let wobble = 1.0 + 0.2 * ((i * 7 % 5) as f64 - 2.0) / 2.0;
        SampleMetrics {
            nll_sum: labels as f64 * 2.5 * (1.0 + rise * wobble),
            label_tokens: labels,
            kl_sum_all: kl * wobble * positions as f64,
            kl_sum_label: 1.5 * kl * wobble * labels as f64,
            positions,
            top1_agree_all: positions - (changed * wobble * positions as f64).round() as usize,
            top1_agree_label: labels - (changed * wobble * labels as f64).round() as usize,
        }
    };
    let base: Vec<SampleMetrics> = (0..EVAL_SAMPLES).map(|i| sample(i, 0.0, 0.0, 0.0)).collect();
    let recipe: Vec<SampleMetrics> = (0..EVAL_SAMPLES).map(|i| sample(i, kl_per_token, rise, changed)).collect();
    let overall = summarize(&recipe, &base, &Bootstrap { resamples: 300, seed: 0 }).unwrap();
    (recipe, overall)
}

fn recipe_result(name: &str, kind: &str, predicted: Option<f64>, m: &Manifest, quantized: usize) -> RecipeResult {
    // Measured KL follows the prediction, with a deterministic wobble in rank.
    let all = m.summary.objective_all_quantized;
    let kl = predicted.map_or(4e-3, |p| 1e-3 * (p / all).powf(0.8) * (1.0 + 0.3 * (name.len() % 3) as f64));
    let (per_sample, overall) = measured(kl, 20.0 * kl, 3.0 * kl);
    let layers: Vec<QuantizedLayer> = m
        .layers
        .iter()
        .take(quantized * m.layers.len() / m.groups.len().max(1))
        .map(|l| QuantizedLayer { name: l.name.clone(), format: "FP8".into() })
        .collect();
    RecipeResult {
        name: name.into(),
        kind: kind.into(),
        source: Some("manifest.json".into()),
        effective_bits: 16.0 - quantized as f64 * 8.0 / m.groups.len() as f64,
        predicted_objective: predicted,
        groups_quantized: quantized,
        layers_quantized: layers.len(),
        quantized_layers: layers,
        per_sample,
        overall,
    }
}

fn evaluation_of(m: &Manifest, recipes: Vec<RecipeResult>) -> Artifact<Evaluation> {
    let samples = (0..EVAL_SAMPLES)
        .map(|i| EvalSample { index: i, id: format!("s{i}"), num_tokens: 100 + 10 * i, num_label_tokens: 20 + i })
        .collect();
    let payload = Evaluation {
        model: m.summary.model.clone(),
        dtype: "f32".into(),
        as_scored: false,
        samples,
        recipes,
        confidence: EvalConfidence { method: "bootstrap".into(), resamples: 300, seed: 0, level: 0.95 },
    };
    Artifact::new("evaluate", Provenance::default(), payload)
}

/// The unquantized model, everything quantized, the manifest's recipe, three frontier points and
/// a checkpoint without scores.
fn evaluation(m: &Manifest) -> Artifact<Evaluation> {
    let s = &m.summary;
    let mut recipes = vec![
        recipe_result("unquantized", "unquantized", Some(0.0), m, 0),
        recipe_result("all FP8", "all-quantized", Some(s.objective_all_quantized), m, s.groups_total),
        recipe_result("chosen", "chosen", Some(s.objective), m, s.groups_quantized),
    ];
    let points: Vec<_> = m.frontier.points.iter().filter(|p| p.kind == "grid" && p.objective > 0.0).collect();
    for p in [points[0], points[points.len() / 2], points[points.len() - 1]] {
        let name = format!("frontier {:.2} bits", p.budget_bits);
        recipes.push(recipe_result(&name, "frontier", Some(p.objective), m, p.quantized_groups));
    }
    recipes.push(recipe_result("ckpt | odd", "checkpoint", None, m, 3));
    // Recipes without measured change have exactly the unquantized model's figures.
    let (per_sample, overall) = measured(0.0, 0.0, 0.0);
    recipes[0].per_sample = per_sample;
    recipes[0].overall = overall;
    evaluation_of(m, recipes)
}

/// Spearman's ρ written out independently: ranks by counting (ties averaged), then Pearson.
fn spearman_by_counting(x: &[f64], y: &[f64]) -> f64 {
    let rank = |v: &[f64], i: usize| {
        let below = v.iter().filter(|&&w| w < v[i]).count() as f64;
        let equal = v.iter().filter(|&&w| w == v[i]).count() as f64;
        below + (equal + 1.0) / 2.0
    };
    let rx: Vec<f64> = (0..x.len()).map(|i| rank(x, i)).collect();
    let ry: Vec<f64> = (0..y.len()).map(|i| rank(y, i)).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(&rx), mean(&ry));
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

fn section(md: &str) -> &str {
    md.split("## Predicted vs measured").nth(1).unwrap().split("## Exports").next().unwrap()
}

#[test]
fn evaluation_section_table_plot_and_rank_correlation() {
    let m = manifest(&small(), 7.0);
    let e = evaluation(&m.payload);
    let r = report::render_with_evaluation(&m, Some(&e), "rep", "t", report::DEFAULT_TEMPLATE).unwrap();
    let text = section(&r.markdown);
    let recipes = &e.payload.recipes;

    // One table row per recipe, the chosen one in bold, the pipe in a name escaped.
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| Recipe")).collect();
    assert_eq!(rows.len(), recipes.len(), "{text}");
    assert!(rows[2].starts_with("| **chosen** | "), "{}", rows[2]);
    assert!(rows[6].starts_with("| ckpt \\| odd | ") && rows[6].contains(" | – | "), "{}", rows[6]);
    let s = &m.payload.summary;
    assert!(rows[2].contains(&format!(" | {}/{} | ", s.groups_quantized, s.groups_total)), "{}", rows[2]);

    // The sentence on the chosen recipe, its figures read back.
    let chosen = &recipes[2].overall;
    let prefix = format!("FP8 on {} of {} groups raises the loss by ", s.groups_quantized, s.groups_total);
    let sentence = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{text}"));
    let number_after = |what: &str| -> f64 {
        sentence.split(what).nth(1).unwrap().split(' ').next().unwrap().split('–').next().unwrap().parse().unwrap()
    };
    assert!((number_after("raises the loss by ") - 100.0 * chosen.delta_nll_relative.value).abs() <= 0.05);
    assert!((number_after("95 % CI ") - 100.0 * chosen.delta_nll_relative.ci.unwrap()[0]).abs() <= 0.05);
    let changed = 100.0 * (1.0 - chosen.top1_agreement_all.value);
    assert!((number_after("changes the top-1 token at ") - changed).abs() <= 0.05, "{sentence}");
    assert!(sentence.ends_with(" % of positions."), "{sentence}");

    // Spearman over the recipes with a predicted objective.
    let with: Vec<&RecipeResult> = recipes.iter().filter(|r| r.predicted_objective.is_some()).collect();
    let x: Vec<f64> = with.iter().map(|r| r.predicted_objective.unwrap()).collect();
    let y: Vec<f64> = with.iter().map(|r| r.overall.kl_all.value).collect();
    let want = spearman_by_counting(&x, &y);
    let shown: f64 = text
        .split("measured KL per token: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!((shown - want).abs() <= 5e-4, "{shown} vs {want}");
    assert!(want > 0.5 && want < 1.0, "the test data rank-correlates imperfectly: {want}");
    assert!(text.contains(&format!("(over {} recipes with a predicted objective)", with.len())));

    // The plot: linked, well-formed, one marker per recipe with a prediction (the zero one
    // listed as not shown on a log axis), the chosen one circled.
    assert_eq!(r.svgs.len(), 4);
    let (name, svg) = &r.svgs[3];
    assert_eq!(name, "rep-predicted-vs-measured.svg");
    assert!(text.contains("](rep-predicted-vs-measured.svg)"));
    let doc = roxmltree::Document::parse(svg).unwrap();
    let markers =
        doc.descendants().filter(|n| n.has_tag_name("circle") && n.attribute("fill-opacity").is_some()).count();
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    let hidden = if texts.iter().any(|t| t.contains("1 recipe at 0 not shown")) { 1 } else { 0 };
    assert_eq!(markers + hidden, with.len(), "{texts:?}");
    assert!(texts.contains(&"chosen: chosen"));
    assert!(texts.iter().any(|t| t.contains(&format!("Spearman rank correlation {want:.3}"))), "{texts:?}");

    // Without an evaluation the report is the plain one.
    let plain = report::render(&m, "rep", "t", report::DEFAULT_TEMPLATE).unwrap();
    assert_eq!(plain, report::render_with_evaluation(&m, None, "rep", "t", report::DEFAULT_TEMPLATE).unwrap());
    assert!(!plain.markdown.contains("Predicted vs measured") && plain.svgs.len() == 3);
    assert_eq!(plain.markdown, r.markdown.replace(&format!("## Predicted vs measured{text}"), ""));

    // Fewer than 3 recipes with a prediction: no correlation.
    let two = evaluation_of(&m.payload, e.payload.recipes[..2].to_vec());
    let r = report::render_with_evaluation(&m, Some(&two), "rep", "t", report::DEFAULT_TEMPLATE).unwrap();
    assert!(section(&r.markdown).contains("measured KL per token: n/a (over 2 recipes"), "{}", r.markdown);
}

#[test]
fn evaluation_cli_writes_the_plot_and_refuses_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(&small(), 7.0);
    let mpath = write_manifest(dir.path(), "m.json", &m, Encoding::Json);
    let epath = dir.path().join("eval.msgpack");
    std::fs::write(&epath, artifact::to_bytes(&evaluation(&m.payload), Encoding::MessagePack).unwrap()).unwrap();
    let out = dir.path().join("r.md");
    let (mp, ep, o) = (mpath.to_str().unwrap(), epath.to_str().unwrap(), out.to_str().unwrap());
    let ok = run(&["--manifest", mp, "--evaluation", ep, "-o", o, "-q"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(std::fs::read_to_string(&out).unwrap().contains("## Predicted vs measured"));
    roxmltree::Document::parse(&std::fs::read_to_string(dir.path().join("r-predicted-vs-measured.svg")).unwrap())
        .unwrap();

    let fails = |evaluation: &Path, needle: &str| {
        let out = dir.path().join("refused.md");
        let o = run(&["--manifest", mp, "--evaluation", evaluation.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("manifest-to-md: {}: ", evaluation.display())) && err.contains(needle),
            "{err}"
        );
        assert!(!out.exists() && !dir.path().join("refused-predicted-vs-measured.svg").exists());
    };
    let mut other = evaluation(&m.payload);
    other.payload.model.name = "another-model".into();
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, artifact::to_bytes(&other, Encoding::Json).unwrap()).unwrap();
    fails(&other_path, "evaluates model 'another-model'");
    fails(&mpath, "artifact kind is 'qsens.manifest', expected 'qsens.evaluation'");
    let mut nan = evaluation(&m.payload);
    nan.payload.recipes[1].overall.kl_all.value = f64::NAN;
    let nan_path = dir.path().join("nan.msgpack");
    std::fs::write(&nan_path, artifact::to_bytes(&nan, Encoding::MessagePack).unwrap()).unwrap();
    fails(&nan_path, "recipe 'all FP8': value NaN");
}
