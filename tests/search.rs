//! `search`: ModelOpt parity on the fixture scores, solver exactness, frontier, exports, CLI.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use proptest::prelude::*;
use qsens::artifact::manifest::Manifest;
use qsens::artifact::scores::Scores;
use qsens::artifact::{self, Artifact, Encoding, Provenance};
use qsens::cli::Reporter;
use qsens::search::reference::{compare, ModelOptRun};
use qsens::search::solver::{self, Limits};
use qsens::search::synthetic::{self, SyntheticSpec};
use qsens::search::{build_manifest, Overrides, Problem, Settings};

const RUNS: [&str; 4] = [
    "autoquant_gradient.json",
    "autoquant_gradient_lmhead_cost_excluded.json",
    "autoquant_kl_div.json",
    "autoquant_kl_div_lmhead_cost_excluded.json",
];

/// Weight shapes `[out, in]` of the tiny checkpoint (from the safetensors header; lm_head is tied
/// to the embedding; the Conv3d patch embed is flattened to `[out, C·T·P·P]`).
fn tiny_shapes(fixtures: &Path) -> BTreeMap<String, [u64; 2]> {
    let bytes = std::fs::read(fixtures.join("qwen3-vl-tiny/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut shapes = BTreeMap::new();
    for (key, v) in header.as_object().unwrap() {
        let Some(module) = key.strip_suffix(".weight") else { continue };
        let dims: Vec<u64> = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        if dims.len() >= 2 {
            shapes.insert(module.to_string(), [dims[0], dims[1..].iter().product()]);
        }
    }
    let embed = shapes["model.language_model.embed_tokens"];
    shapes.entry("lm_head".into()).or_insert(embed);
    shapes
}

fn modelopt_run(fixtures: &Path, file: &str) -> ModelOptRun {
    ModelOptRun::from_json(&std::fs::read(fixtures.join("modelopt").join(file)).unwrap()).unwrap()
}

fn source() -> qsens::artifact::manifest::ScoresSource {
    qsens::artifact::manifest::ScoresSource {
        path: "test".into(),
        digest: "sha256:0".into(),
        tool: "test".into(),
        tool_version: "0".into(),
        provenance: Provenance::default(),
    }
}

#[test]
fn modelopt_fixtures_our_optimum_is_never_worse() {
    let fixtures = fixtures_or_skip!();
    let shapes = tiny_shapes(&fixtures);
    eprintln!("run                                          target  ModelOpt obj (bits, groups)         ours obj (bits, groups)");
    for file in RUNS {
        let run = modelopt_run(&fixtures, file);
        let scores = run.to_scores(&shapes).unwrap();
        let problem = Problem::from_scores(&scores, &Overrides::default()).unwrap();
        // ModelOpt's cost denominator (Σ weighted NONE cost) is reproduced exactly.
        assert_eq!(problem.cost_denominator(), run.cost_denominator, "{file}");
        // Everything at FP8 is the floor: 7.99 bits is impossible, and the error says 8.
        let err = format!("{:#}", problem.solve(7.99, &Limits::default()).unwrap_err());
        assert!(err.contains("the smallest achievable is 8.0000"), "{err}");
        for t in &run.targets {
            let c = compare(&problem, t.effective_bits_target, &t.recipe).unwrap();
            // The reference recipe evaluated by us gives ModelOpt's own numbers.
            assert_eq!(c.reference_bits, t.effective_bits_achieved, "{file} @ {}", t.effective_bits_target);
            assert!((c.reference_objective - t.total_score).abs() <= 1e-12 * t.total_score.abs(), "{file}");
            assert_eq!(c.reference_quantized, t.quantized_groups.len());
            assert!(c.ours_objective <= c.reference_objective && c.ours_bits <= t.effective_bits_target);
            assert!(c.ours_proved);
            // An independent exact algorithm agrees: the best Pareto point within the budget.
            let cap = problem.capacity(t.effective_bits_target).unwrap();
            let front = solver::pareto_frontier(problem.mckp(), cap, 1 << 20, |_, _| false).unwrap();
            assert_eq!(front.last().unwrap().score, c.ours_objective, "{file}");
            eprintln!(
                "{file:44} {:5}  {:.10e} ({:.3}, {:2}/32)  {:.10e} ({:.3}, {:2}/32)",
                t.effective_bits_target,
                c.reference_objective,
                c.reference_bits,
                c.reference_quantized,
                c.ours_objective,
                c.ours_bits,
                c.ours_quantized
            );
        }
    }
}

#[test]
fn lmhead_cost_excluded_reproduces_modelopt_achieved_bits() {
    let fixtures = fixtures_or_skip!();
    let shapes = tiny_shapes(&fixtures);
    let run = modelopt_run(&fixtures, "autoquant_gradient_lmhead_cost_excluded.json");
    let problem = Problem::from_scores(&run.to_scores(&shapes).unwrap(), &Overrides::default()).unwrap();
    let t = &run.targets[0];
    assert_eq!(t.effective_bits_target, 8.5);
    let c = compare(&problem, 8.5, &t.recipe).unwrap();
    assert_eq!(c.reference_bits, 8.5);
    assert_eq!(c.reference_quantized, 27);
    // The same problem from the plain run's scores with `--exclude-cost '*lm_head*'`.
    let plain = modelopt_run(&fixtures, "autoquant_gradient.json").to_scores(&shapes).unwrap();
    let ov = Overrides { exclude_cost: vec!["*lm_head*".into()], ..Overrides::default() };
    let via_flag = Problem::from_scores(&plain, &ov).unwrap();
    assert_eq!(via_flag.cost_denominator(), 294912.0);
    for t in &run.targets {
        let a = problem.solve(t.effective_bits_target, &Limits::default()).unwrap();
        let b = via_flag.solve(t.effective_bits_target, &Limits::default()).unwrap();
        assert_eq!((a.choice, a.objective, a.effective_bits), (b.choice, b.objective, b.effective_bits));
    }
}

#[test]
fn disable_keeps_groups_unquantized_but_counting() {
    let fixtures = fixtures_or_skip!();
    let shapes = tiny_shapes(&fixtures);
    let scores = modelopt_run(&fixtures, "autoquant_kl_div.json").to_scores(&shapes).unwrap();
    // A member name (k_proj) disables its whole fused group.
    let ov = Overrides {
        disable: vec!["*layers.1.self_attn.k_proj".into(), "*visual.blocks.0.*".into()],
        ..Overrides::default()
    };
    let p = Problem::from_scores(&scores, &ov).unwrap();
    let r = p.solve(8.5, &Limits::default()).unwrap();
    for (g, &f) in p.groups.iter().zip(&r.choice) {
        if g.name.ends_with("layers.1.self_attn.q_proj") || g.name.contains("visual.blocks.0.") {
            assert!(g.disabled && f == p.none_index(), "{}", g.name);
        }
    }
    assert_eq!(p.groups.iter().filter(|g| g.disabled).count(), 5);
    assert!(p.min_effective_bits() > 8.0);
    assert_eq!(p.cost_denominator(), 10018816.0);
}

#[test]
fn modelopt_fixture_frontier_is_monotone_and_marks_the_choice() {
    let fixtures = fixtures_or_skip!();
    let shapes = tiny_shapes(&fixtures);
    for file in RUNS {
        let scores = modelopt_run(&fixtures, file).to_scores(&shapes).unwrap();
        let mut settings = Settings::new(10.0);
        settings.frontier.exhaustive = true;
        let m = build_manifest(&scores, source(), &settings, Reporter::silent()).unwrap();
        let f = &m.frontier;
        assert!(f.exhaustive, "{file}: the tiny model's exact frontier is small");
        for w in f.points.windows(2) {
            assert!(w[0].budget_bits < w[1].budget_bits, "{file}");
            assert!(w[1].objective <= w[0].objective, "{file}: {:?} then {:?}", w[0], w[1]);
        }
        for p in &f.points {
            assert!(p.effective_bits <= p.budget_bits && p.proved, "{file}: {p:?}");
        }
        let c = &f.points[f.chosen];
        assert_eq!(c.kind, "chosen");
        assert_eq!((c.budget_bits, c.objective), (10.0, m.summary.objective));
        // Every grid point equals a fresh solve at its budget.
        let p = Problem::from_scores(&scores, &Overrides::default()).unwrap();
        for g in f.points.iter().filter(|p| p.kind == "grid").step_by(7) {
            assert_eq!(p.solve(g.budget_bits, &Limits::default()).unwrap().objective, g.objective, "{file}");
        }
    }
}

/// Random small scores artifacts through the whole problem construction (bit scaling, disabled
/// and cost-excluded groups), checked against brute force.
fn random_scores(seed: u64, groups: usize, formats: usize) -> Scores {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let spec =
        SyntheticSpec { vision_blocks: 1, deepstack: 1, text_layers: 1, formats, samples: 2, seed, ragged: true };
    let mut s = synthetic::scores(&spec);
    s.groups.truncate(groups);
    let keep: Vec<String> = s.groups.iter().flat_map(|g| g.members.clone()).collect();
    s.layers.retain(|l| keep.contains(&l.name));
    for (i, g) in s.groups.iter_mut().enumerate() {
        g.disabled = rng.random_range(0..8) == 0;
        // At least one group counts toward the budget.
        g.cost_excluded = i > 0 && rng.random_range(0..8) == 0;
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn problem_solutions_match_brute_force(seed in 0u64..1_000_000, groups in 1usize..8, formats in 2usize..=4, bits in 3.0f64..17.0) {
        let scores = random_scores(seed, groups, formats);
        let p = Problem::from_scores(&scores, &Overrides::default()).unwrap();
        let cap = p.capacity(bits).unwrap();
        let exact = solver::brute_force(p.mckp(), cap);
        match (p.solve(bits, &Limits::default()), exact) {
            (Ok(r), Some((_, _, best))) => {
                prop_assert_eq!(r.objective, best);
                prop_assert!(r.effective_bits <= bits && r.proved);
                let e = p.evaluate(&r.choice).unwrap();
                prop_assert_eq!((e.objective, e.effective_bits), (r.objective, r.effective_bits));
            }
            (Err(e), None) => {
                let msg = format!("{e:#}");
                prop_assert!(msg.contains("smallest achievable"), "{}", msg);
            }
            (r, e) => prop_assert!(false, "solver {:?} vs brute force {:?}", r.map(|r| r.objective), e),
        }
    }
}

#[test]
fn synthetic_250_groups_6_formats_is_fast_and_proved() {
    for ragged in [false, true] {
        let spec = SyntheticSpec { ragged, samples: 8, ..SyntheticSpec::qwen3_vl_250() };
        let scores = synthetic::scores(&spec);
        let p = Problem::from_scores(&scores, &Overrides::default()).unwrap();
        assert_eq!((p.groups.len(), p.formats.len()), (250, 6));
        for bits in [4.6, 5.0, 6.0, 7.3, 8.0, 10.0, 12.5, 15.0] {
            let t = Instant::now();
            let r = p.solve(bits, &Limits::default()).unwrap();
            let dt = t.elapsed();
            eprintln!(
                "ragged={ragged} bits={bits:5}: {:>9.3} ms, objective {:.6e}, lp {:.6e}, incumbent {:.6e}, states kept ≤ {}, generated {}",
                dt.as_secs_f64() * 1e3,
                r.objective,
                r.lp_bound,
                r.initial_incumbent,
                r.stats.max_kept,
                r.stats.generated
            );
            assert!(r.proved && r.effective_bits <= bits);
            assert!(r.lp_bound <= r.objective + 1e-12 * r.objective.abs());
            assert!(dt.as_secs_f64() < 10.0, "solve took {dt:?}");
        }
    }
}

#[test]
fn synthetic_frontier_is_monotone() {
    let spec = SyntheticSpec { samples: 4, ..SyntheticSpec::qwen3_vl_250() };
    let scores = synthetic::scores(&spec);
    let t = Instant::now();
    let m = build_manifest(&scores, source(), &Settings::new(6.0), Reporter::silent()).unwrap();
    eprintln!("250×6 manifest (frontier with {} points, bootstrap): {:?}", m.frontier.points.len(), t.elapsed());
    for w in m.frontier.points.windows(2) {
        assert!(w[1].objective <= w[0].objective && w[0].budget_bits < w[1].budget_bits);
    }
    assert!(m.frontier.points.iter().all(|p| p.proved));
}

// ---- CLI ----

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_search")
}

fn write_scores(dir: &Path, name: &str, scores: &Scores, enc: Encoding) -> PathBuf {
    let a = Artifact::new("test", Provenance::default(), scores.clone());
    let path = dir.join(name);
    std::fs::write(&path, artifact::to_bytes(&a, enc).unwrap()).unwrap();
    path
}

fn small_scores() -> Scores {
    synthetic::scores(&SyntheticSpec {
        vision_blocks: 2,
        deepstack: 1,
        text_layers: 2,
        formats: 3,
        samples: 5,
        seed: 1,
        ragged: false,
    })
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(exe()).args(args).output().unwrap()
}

#[test]
fn cli_writes_a_deterministic_manifest_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let scores = write_scores(dir.path(), "scores.msgpack", &small_scores(), Encoding::MessagePack);
    let out1 = dir.path().join("m1.json");
    let out2 = dir.path().join("m2.json");
    let ex = dir.path().join("exports");
    for out in [&out1, &out2] {
        let o = run(&[
            "--scores",
            scores.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--effective-bits",
            "7",
            "--export-dir",
            ex.to_str().unwrap(),
            "-q",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let a = std::fs::read(&out1).unwrap();
    assert_eq!(a, std::fs::read(&out2).unwrap());
    let m: Artifact<Manifest> = artifact::from_bytes(&a).unwrap();
    assert_eq!(m.kind, "qsens.manifest");
    assert!(m.payload.summary.achieved_effective_bits <= 7.0);
    assert_eq!(m.payload.summary.solver.status, "optimal");
    assert_eq!(m.payload.summary.solver.gap, 0.0);
    assert_eq!(m.provenance.sources[0].role, "scores");
    // The synthetic formats (NVFP4, MXFP6) have no export mapping: nothing is written, and the
    // notes say why.
    assert!(m.payload.exports.modelopt.is_none() && !ex.join("modelopt_quant_cfg.json").exists());
    assert!(m.payload.exports.notes.iter().any(|n| n.contains("no ModelOpt config for format")));
}

#[test]
fn cli_fp8_exports_on_the_modelopt_fixture() {
    let fixtures = fixtures_or_skip!();
    let shapes = tiny_shapes(&fixtures);
    let scores = modelopt_run(&fixtures, "autoquant_gradient_lmhead_cost_excluded.json").to_scores(&shapes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_scores(dir.path(), "scores.json", &scores, Encoding::Json);
    let ex = dir.path().join("ex");
    let out = dir.path().join("m.json");
    let o = run(&[
        "--scores",
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--effective-bits",
        "8.5",
        "--export-dir",
        ex.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ex.join("modelopt_quant_cfg.json")).unwrap()).unwrap();
    let entries = cfg["quant_cfg"].as_array().unwrap();
    assert_eq!(entries[0]["quantizer_name"], "*");
    let m: Artifact<Manifest> = artifact::read(out.as_path()).unwrap();
    let quantized_layers: usize = m.payload.groups.iter().filter(|g| g.chosen == "FP8").map(|g| g.members.len()).sum();
    assert_eq!(entries.len(), 1 + 3 * quantized_layers);
    let ct: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ex.join("compressed_tensors_quantization_config.json")).unwrap())
            .unwrap();
    let targets = ct["config_groups"]["group_0"]["targets"].as_array().unwrap().len();
    assert_eq!(targets + ct["ignore"].as_array().unwrap().len(), 41);
    // Fused q/k/v share a format in every export.
    for l in [0, 1, 2] {
        let q = format!("model.language_model.layers.{l}.self_attn.q_proj");
        let k = format!("model.language_model.layers.{l}.self_attn.k_proj");
        let ignored = |n: &str| ct["ignore"].as_array().unwrap().iter().any(|x| x == n);
        assert_eq!(ignored(&q), ignored(&k));
    }
    let types = std::fs::read_to_string(ex.join("llama_cpp_tensor_types.txt")).unwrap();
    assert_eq!(types.lines().count(), 3 * 7 + 1 + 1);
    assert!(types.contains(r"^output\.weight$=bf16"));
}

#[test]
fn cli_impossible_budget_states_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let scores = write_scores(dir.path(), "s.json", &small_scores(), Encoding::Json);
    let out = dir.path().join("m.json");
    let o = run(&["--scores", scores.to_str().unwrap(), "-o", out.to_str().unwrap(), "--effective-bits", "3"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("search: ") && err.contains("smallest achievable is 4.5000"), "{err}");
    assert!(!out.exists());
}

#[test]
fn cli_bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.json");
    let ex = dir.path().join("ex");
    let check = |input: &Path, needle: &str| {
        let o = run(&[
            "--scores",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--effective-bits",
            "8",
            "--export-dir",
            ex.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(input.to_str().unwrap()) && err.contains(needle), "{err}");
        assert!(!out.exists() && !ex.exists());
    };
    // NaN (msgpack can carry it).
    let mut s = small_scores();
    s.groups[2].scores[0] = f64::NAN;
    check(&write_scores(dir.path(), "nan.msgpack", &s, Encoding::MessagePack), "score is NaN");
    let mut s = small_scores();
    s.layers[1].per_sample[0][3] = f64::INFINITY;
    check(&write_scores(dir.path(), "inf.msgpack", &s, Encoding::MessagePack), "per-sample score is inf");
    // Wrong kind: a manifest given as scores.
    let m = build_manifest(&small_scores(), source(), &Settings::new(8.0), Reporter::silent()).unwrap();
    let wrong = dir.path().join("manifest.json");
    std::fs::write(&wrong, artifact::to_bytes(&Artifact::new("t", Provenance::default(), m), Encoding::Json).unwrap())
        .unwrap();
    check(&wrong, "expected 'qsens.scores'");
    // Malformed.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, br#"{"kind": "qsens.scores", "schema_version": 1, "tool": "x", "tool_version": "0", "provenance": {"sources": [], "parameters": {}}, "payload": {"model": 3}}"#).unwrap();
    check(&bad, "malformed 'qsens.scores' payload");
}

/// Timing of the whole frontier grid on the 250 × 6 synthetic instances (run with `--ignored`).
#[test]
#[ignore]
fn bench_frontier_grid_250x6() {
    for ragged in [false, true] {
        let scores = synthetic::scores(&SyntheticSpec { ragged, samples: 8, ..SyntheticSpec::qwen3_vl_250() });
        let p = Problem::from_scores(&scores, &Overrides::default()).unwrap();
        let (mut total, mut worst, mut worst_bits, mut count) = (0.0, 0.0, 0.0, 0);
        let mut k = (p.min_effective_bits() / 0.05).ceil() as i64;
        while k as f64 * 0.05 <= 16.0 {
            let bits = k as f64 * 0.05;
            let t = Instant::now();
            let r = p.solve(bits, &Limits::default()).unwrap();
            let dt = t.elapsed().as_secs_f64();
            assert!(r.proved);
            total += dt;
            count += 1;
            if dt > worst {
                (worst, worst_bits) = (dt, bits);
            }
            k += 1;
        }
        eprintln!(
            "ragged={ragged}: {count} budgets, total {:.3} s, mean {:.2} ms, worst {:.1} ms at {worst_bits:.2} bits",
            total,
            1e3 * total / count as f64,
            1e3 * worst
        );
    }
}
