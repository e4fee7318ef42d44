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
