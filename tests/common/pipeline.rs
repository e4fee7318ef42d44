//! The pipeline on the fixtures, as the quantize and evaluate tests need it: inputs of the 4
//! reference samples (calib-extract → preprocess, as the fixtures' ModelOpt runs were fed), their
//! gradient scores and a searched manifest, and manifests given the fixture recipes' formats.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use qsens::artifact::manifest::Manifest;
use qsens::artifact::{self, Artifact};
use serde_json::Value;

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).stdin(Stdio::null()).output().unwrap()
}

pub fn ok(bin: &str, args: &[&str]) -> Output {
    let o = run(bin, args);
    assert!(o.status.success(), "{bin} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// Made once per test binary, in one temporary folder.
pub struct Pipeline {
    pub dir: tempfile::TempDir,
    /// The score-layers and search binaries it was made with.
    pub score_bin: String,
    pub search_bin: String,
    pub model: PathBuf,
    pub inputs: PathBuf,
    pub scores: PathBuf,
    pub manifest: PathBuf,
}

/// Runs the pipeline with the binaries `bins` = (calib-extract, preprocess, score-layers, search)
/// (each test binary passes its own `env!("CARGO_BIN_EXE_…")`).
pub fn pipeline(fx: &Path, bins: [&str; 4]) -> Pipeline {
    let [extract, preprocess, score, search] = bins;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = fx.join("qwen3-vl-tiny");
    let (db, calib, inputs) = (d.join("c.db"), d.join("calib.json"), d.join("inputs.msgpack"));
    ok(extract, &["-q", "--from-coco", s(&fx.join("coco/captions.json")), "--db", s(&db)]);
    let query = "SELECT sample_id, image_id, file_name, caption, split FROM samples WHERE image_id <= 4";
    ok(extract, &["-q", "--db", s(&db), "--image-root", s(&fx.join("images")), "--query", query, "-o", s(&calib)]);
    let sizes = ["--min-pixels", "65536", "--max-pixels", "262144"];
    let mut args = vec!["-q", "--calibration", s(&calib), "--model", s(&model), "-o", s(&inputs)];
    args.extend_from_slice(&sizes);
    ok(preprocess, &args);
    let scores = d.join("scores.msgpack");
    ok(score, &["-q", "--model", s(&model), "--inputs", s(&inputs), "-o", s(&scores)]);
    let manifest = d.join("manifest.json");
    ok(
        search,
        &["-q", "--scores", s(&scores), "--effective-bits", "10", "--exclude-cost", "*lm_head*", "-o", s(&manifest)],
    );
    Pipeline { dir, score_bin: score.into(), search_bin: search.into(), model, inputs, scores, manifest }
}

/// The pipeline of this test binary, made on first use.
pub fn shared(fx: &Path) -> &'static Pipeline {
    static PIPELINE: std::sync::OnceLock<Pipeline> = std::sync::OnceLock::new();
    PIPELINE.get_or_init(|| {
        let bins = [
            env!("CARGO_BIN_EXE_calib-extract"),
            env!("CARGO_BIN_EXE_preprocess"),
            env!("CARGO_BIN_EXE_score-layers"),
            env!("CARGO_BIN_EXE_search"),
        ];
        pipeline(fx, bins)
    })
}

/// The fixture recipe `modelopt/export_fp8_<which>`: its enabled modules and fake-quant losses.
pub fn recipe(fx: &Path, which: &str) -> (HashSet<String>, Vec<f64>) {
    let path = fx.join(format!("modelopt/export_fp8_{which}/recipe.json"));
    let r: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let modules = r["enabled_modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
    let losses = r["fake_quant_loss_per_sample"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    (modules, losses)
}

/// The manifest `searched` (with FP8 as its first format) with `modules` in FP8 and every other
/// layer NONE, written to `out`.
pub fn manifest_with(searched: &Path, modules: &HashSet<String>, out: &Path) {
    let mut m: Artifact<Manifest> = artifact::read(searched).unwrap();
    for g in &mut m.payload.groups {
        let fp8 = g.members.iter().any(|n| modules.contains(n));
        g.chosen = if fp8 { "FP8" } else { "NONE" }.into();
        g.chosen_index = usize::from(!fp8);
    }
    for l in &mut m.payload.layers {
        l.chosen = if modules.contains(&l.name) { "FP8" } else { "NONE" }.into();
    }
    artifact::write(out, &m).unwrap();
}

impl Pipeline {
    /// The searched manifest with `modules` in FP8 and every other layer NONE, written as `name`.
    pub fn manifest_with(&self, modules: &HashSet<String>, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        manifest_with(&self.manifest, modules, &path);
        path
    }

    /// A manifest scored with `formats` (score-layers `--format` each, on the same inputs) whose
    /// layers take the formats of `choice` (module → format name, every other layer NONE), its
    /// groups the format of their members; written as `name`.
    pub fn manifest_with_formats(&self, formats: &[&str], choice: &HashMap<String, String>, name: &str) -> PathBuf {
        let d = self.dir.path();
        let scores = d.join(format!("{name}.scores.msgpack"));
        let searched = d.join(format!("{name}.searched.json"));
        let mut args = vec!["-q", "--model", s(&self.model), "--inputs", s(&self.inputs), "-o", s(&scores)];
        for f in formats {
            args.extend(["--format", f]);
        }
        ok(&self.score_bin, &args);
        ok(&self.search_bin, &["-q", "--scores", s(&scores), "--effective-bits", "10", "-o", s(&searched)]);
        let mut m: Artifact<Manifest> = artifact::read(searched.as_path()).unwrap();
        let short = |f: &str| qsens::quant::format_by_name(f).unwrap().name().to_string();
        let names: Vec<String> = m.payload.formats.iter().map(|f| f.info.name.clone()).collect();
        for g in &mut m.payload.groups {
            let chosen = g.members.iter().find_map(|n| choice.get(n)).map_or("NONE".to_string(), |f| short(f));
            g.chosen_index = names.iter().position(|n| *n == chosen).unwrap_or(names.len());
            g.chosen = chosen;
        }
        for l in &mut m.payload.layers {
            l.chosen = choice.get(&l.name).map_or("NONE".to_string(), |f| short(f));
        }
        let path = d.join(name);
        artifact::write(path.as_path(), &m).unwrap();
        path
    }

    /// The searched manifest with the fixture recipe `export_fp8_<which>`'s formats.
    pub fn fixture_manifest(&self, fx: &Path, which: &str) -> PathBuf {
        self.manifest_with(&recipe(fx, which).0, &format!("manifest-{which}.json"))
    }
}
