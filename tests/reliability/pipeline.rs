//! The pipeline as `make report` runs it, on the demo set: kill -9 at random points and rerun
//! (the result must equal an uninterrupted run's, byte for byte, and no stage may ever see a
//! half-written file), and determinism (two runs, byte-identical outputs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qsens::artifact::calibration::CalibrationSet;
use qsens::artifact::inputs::ModelInputs;
use qsens::artifact::manifest::Manifest;
use qsens::artifact::scores::Scores;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::args;
use crate::support::*;

/// Random kill points per kill test (the acceptance criterion).
const KILL_POINTS: usize = 20;

// ---- score-layers ------------------------------------------------------------------------------

/// Inputs of all nine demo images (several samples, so that kills land between samples), made
/// once per test process: the kill tests run in parallel and only read them.
fn nine_inputs() -> PathBuf {
    static INPUTS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    INPUTS
        .get_or_init(|| {
            let dir = scratch("kill-inputs");
            let demo = demo();
            let db = dir.join("calibration.db");
            let calib = dir.join("calibration.msgpack");
            let inputs = dir.join("inputs.msgpack");
            ok("calib-extract", &args!["--from-coco", s(&demo.join("captions.json")), "--db", s(&db), "-q"]);
            ok("calib-extract", &args!["--db", s(&db), "--image-root", s(&demo.join("images")), "-o", s(&calib)]);
            ok("preprocess", &args!["--calibration", s(&calib), "--model", s(&demo.join("model")), "-o", s(&inputs)]);
            inputs
        })
        .clone()
}

fn score_command(inputs: &Path, out: &Path) -> Command {
    let mut c = Command::new(bin("score-layers"));
    c.args(args!["--model", s(&demo().join("model")), "--inputs", s(inputs), "--exclude-cost", "*lm_head*"])
        .args(args!["--resume", "-q", "-o", s(out)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn finish(child: Child, what: &str) {
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Samples recorded in a state file, if it exists and parses.
fn state_samples(path: &Path) -> Option<usize> {
    let bytes = std::fs::read(path).ok()?;
    let a = qsens::artifact::from_bytes::<Scores>(&bytes)
        .unwrap_or_else(|e| panic!("{}: a state file must always be complete: {e:#}", path.display()));
    Some(a.payload.samples.len())
}

/// kill -9 of score-layers at 20 random points (half after a random delay within an
/// uninterrupted run's duration, half once the state file holds a random number of samples),
/// then `--resume`: the final artifact equals the uninterrupted run's, byte for byte, and no
/// state or temporary file is left.
#[test]
fn score_layers_killed_and_resumed() {
    let inputs = nine_inputs();
    let n: usize = qsens::artifact::read::<ModelInputs>(inputs.as_path()).unwrap().payload.samples.len();
    let dir = scratch("kill-score");
    let reference = dir.join("reference/scores.msgpack");
    let t0 = Instant::now();
    finish(score_command(&inputs, &reference).spawn().unwrap(), "uninterrupted run");
    let full = t0.elapsed();
    let want = std::fs::read(&reference).unwrap();

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut report = Vec::new();
    let mut litter = 0;
    for trial in 0..KILL_POINTS {
        let tdir = dir.join(format!("trial-{trial:02}"));
        std::fs::create_dir_all(&tdir).unwrap();
        let out = tdir.join("scores.msgpack");
        let state = tdir.join("scores.msgpack.partial");
        let mut child = score_command(&inputs, &out).spawn().unwrap();
        let how = if trial % 2 == 0 {
            let delay = full.mul_f64(rng.random_range(0.0..1.1));
            std::thread::sleep(delay);
            format!("after {:.0} ms", delay.as_secs_f64() * 1e3)
        } else {
            let k = rng.random_range(0..n);
            let deadline = Instant::now() + Duration::from_secs(60);
            while state_samples(&state).is_none_or(|done| done < k) && child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "trial {trial}: no progress");
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
            format!("once {k} samples were saved")
        };
        let exited_before = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        litter += tree(&tdir).keys().filter(|k| is_temporary(k)).count();
        // What a kill leaves is either nothing, a complete state, or the complete output.
        let saved = state_samples(&state);
        if out.exists() {
            assert_eq!(std::fs::read(&out).unwrap(), want, "trial {trial}: a visible output is always complete");
        }
        let at = match (exited_before, saved, out.exists()) {
            (true, _, _) => "after it finished".to_string(),
            (_, Some(k), _) => format!("with {k}/{n} samples saved"),
            (_, None, true) => "after the output was written".to_string(),
            (_, None, false) => "before calibration was saved".to_string(),
        };
        finish(score_command(&inputs, &out).spawn().unwrap(), &format!("trial {trial}: resumed run"));
        assert_eq!(std::fs::read(&out).unwrap(), want, "trial {trial} (killed {how}, {at}): resumed result differs");
        let left: Vec<String> =
            std::fs::read_dir(&tdir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, vec!["scores.msgpack".to_string()], "trial {trial}: files left besides the output");
        report.push(format!("  trial {trial:2}: killed {how:<28} {at}"));
    }
    eprintln!("score-layers kill -9 and --resume ({n} samples, uninterrupted run {:.2} s):", full.as_secs_f64());
    eprintln!("{}", report.join("\n"));
    eprintln!("  temporaries left by the kills (all removed by the reruns): {litter}");
    let mid = report.iter().filter(|r| r.contains("samples saved") && !r.contains(&format!("{n}/{n}"))).count();
    assert!(mid >= KILL_POINTS / 4, "too few kills landed mid-scoring ({mid}); the kill points are not spread");
}

/// One shard of two killed once it has saved a sample, then rerun with `--resume`: merged with
/// the other shard it gives the unsharded run's bytes (a cluster's retried array task).
#[test]
fn shard_killed_and_resumed_merges_like_one_run() {
    let inputs = nine_inputs();
    let dir = scratch("kill-shard");
    let whole = dir.join("whole.msgpack");
    finish(score_command(&inputs, &whole).spawn().unwrap(), "unsharded run");
    let shard = |i: usize| dir.join(format!("shard-{i}.msgpack"));
    let shard_command = |i: usize| {
        let mut c = score_command(&inputs, &shard(i));
        c.args(["--shard", &format!("{i}/2")]);
        c
    };
    finish(shard_command(0).spawn().unwrap(), "shard 0");
    let state = dir.join("shard-1.msgpack.partial");
    let mut child = shard_command(1).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while state_samples(&state).is_none_or(|done| done < 1) && child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "shard 1: no progress");
        std::thread::sleep(Duration::from_micros(200));
    }
    let killed_mid_run = child.try_wait().unwrap().is_none();
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    assert!(killed_mid_run, "shard 1 finished before it could be killed");
    finish(shard_command(1).spawn().unwrap(), "shard 1 resumed");
    let merged = dir.join("merged.msgpack");
    ok("score-layers", &args!["--merge", s(&shard(1)), s(&shard(0)), "-q", "-o", s(&merged)]);
    assert!(std::fs::read(&merged).unwrap() == std::fs::read(&whole).unwrap(), "merged shards differ from one run");
}

// ---- the whole pipeline under make ------------------------------------------------------------

/// `make all` (every stage: report with its evaluation, and the FP8 checkpoint) on the demo set in
/// `dir` (relative paths, so that two folders give identical provenance), binaries from cargo's
/// test build, no cargo invocation.
fn make_command(dir: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(dir)
        .args(["-s", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/Makefile"), "all"])
        .arg("CARGO=true")
        .arg(format!("BIN_DIR={}", s(&bin_dir())))
        .args(["DEMO_DIR=demo", "OUTPUT_DIR=out", "NUM_SAMPLES=6", "NUM_EVAL=3", "FRONTIER=2", "BITS=12"])
        .arg("EXCLUDE_COST=*lm_head*")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// A fresh run folder with the demo set linked in as `demo`.
fn run_dir(path: PathBuf) -> PathBuf {
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    std::os::unix::fs::symlink(demo(), path.join("demo")).unwrap();
    path
}

fn run_make(dir: &Path, env: &[(&str, &str)]) -> Duration {
    let t0 = Instant::now();
    let mut c = make_command(dir);
    c.envs(env.iter().copied());
    let o = c.output().unwrap();
    assert!(o.status.success(), "make in {}: {}", dir.display(), String::from_utf8_lossy(&o.stderr));
    t0.elapsed()
}

/// Every file below `out`, except temporaries, which no stage reads.
fn outputs(out: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(out).into_iter().filter(|(k, _)| !is_temporary(k)).collect()
}

fn is_temporary(rel: &str) -> bool {
    // A temporary file, or anything inside a temporary directory (quantize's checkpoint in the making).
    rel.split('/').any(|name| name.starts_with('.') && name.contains(".tmp"))
}

/// Checks what a kill left: every output visible under its final name is complete (equal to
/// the reference run's, or, for the resume state, a complete artifact).
fn check_visible(out: &Path, want: &BTreeMap<String, Vec<u8>>, trial: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for (name, bytes) in outputs(out) {
        if name.ends_with(".partial") {
            qsens::artifact::from_bytes::<Scores>(&bytes)
                .unwrap_or_else(|e| panic!("trial {trial}: {name} is not a complete artifact: {e:#}"));
        } else if name.ends_with(".settings") {
            // Make's settings stamps are rewritten in place; a partial one only causes a rerun.
        } else {
            let Some(w) = want.get(&name) else { panic!("trial {trial}: unexpected file {name}") };
            assert!(&bytes == w, "trial {trial}: {name} is visible but differs from the complete file");
        }
        seen.push(name);
    }
    seen
}

/// Kills `make report` (the whole process group: make and the stage it runs) with SIGKILL at
/// 20 random points, checks that what is visible is never half-written, reruns `make report`,
/// and compares the whole output folder with an uninterrupted run's.
#[test]
fn make_report_killed_and_rerun() {
    let dir = scratch("kill-make");
    let reference = run_dir(dir.join("reference"));
    let full = run_make(&reference, &[]);
    let want = outputs(&reference.join("out"));
    assert!(want.len() >= 14, "reference outputs: {:?}", want.keys());
    let milestones: Vec<&str> = vec![
        "calibration.db",
        "calibration.json",
        "model_inputs.msgpack",
        "fp8_autoquant_all_layers_fp8_autoquant_state.msgpack.partial",
        "fp8_autoquant_all_layers_fp8_autoquant_state.msgpack",
        "recipes/modelopt_quant_cfg.json",
        "fp8_autoquant_all_layers_fp8_quant_manifest.json",
        "evaluation.msgpack",
        "per-layer-sensitivity-sensitivity.svg",
        "checkpoint-fp8/model.safetensors",
    ];

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut report = Vec::new();
    let mut stages_hit = std::collections::BTreeSet::new();
    let mut litter = 0;
    for trial in 0..KILL_POINTS {
        let tdir = run_dir(dir.join(format!("trial-{trial:02}")));
        let out = tdir.join("out");
        let mut cmd = make_command(&tdir);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().unwrap();
        let how = if trial % 2 == 0 {
            let delay = full.mul_f64(rng.random_range(0.0..1.05));
            std::thread::sleep(delay);
            format!("after {:.0} ms", delay.as_secs_f64() * 1e3)
        } else {
            let m = milestones[rng.random_range(0..milestones.len())];
            let deadline = Instant::now() + Duration::from_secs(60);
            while !out.join(m).exists() && child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "trial {trial}: no progress");
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_micros(rng.random_range(0..5000)));
            format!("once {m} appeared")
        };
        let pgid = child.id();
        let st =
            Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status().unwrap();
        let _ = st; // the group may have exited already
        let _ = child.wait();
        let seen = check_visible(&out, &want, trial);
        litter += tree(&out).keys().filter(|k| is_temporary(k)).count();
        let last = milestones.iter().rev().find(|m| seen.iter().any(|s| s == *m)).copied().unwrap_or("nothing");
        stages_hit.insert(last);
        run_make(&tdir, &[]);
        let got = tree(&out);
        let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(extra.is_empty(), "trial {trial} (killed {how}): files beyond the reference's: {extra:?}");
        for (name, bytes) in &want {
            assert!(got.get(name) == Some(bytes), "trial {trial} (killed {how}): {name} differs after the rerun");
        }
        report.push(format!("  trial {trial:2}: killed {how:<52} latest complete: {last}"));
    }
    eprintln!("make report kill -9 and rerun (uninterrupted {:.2} s):", full.as_secs_f64());
    eprintln!("{}", report.join("\n"));
    eprintln!("  temporaries left by the kills (all removed by the reruns): {litter}");
    assert!(stages_hit.len() >= 4, "kills landed in too few stages: {stages_hit:?}");
}

/// The whole pipeline twice in two folders, the second single-threaded and scored in three
/// shards run by `make -j3` and merged (`SHARDS=3`, docs/sharding.md): every artifact, the
/// report, its SVGs and the recipes are byte-identical, and the artifacts hold no timestamp.
#[test]
fn pipeline_is_deterministic() {
    let dir = scratch("determinism");
    let (a, b) = (run_dir(dir.join("a")), run_dir(dir.join("b")));
    run_make(&a, &[]);
    run_make(&b, &[("RAYON_NUM_THREADS", "1"), ("SHARDS", "3"), ("MAKEFLAGS", "-j3")]);
    let (ta, mut tb) = (tree(&a.join("out")), tree(&b.join("out")));
    let shards: Vec<String> = tb.keys().filter(|k| k.contains(".shard-")).cloned().collect();
    assert_eq!(
        shards,
        (0..3)
            .map(|i| format!("fp8_autoquant_all_layers_fp8_autoquant_state.shard-{i}-of-3.msgpack"))
            .collect::<Vec<_>>()
    );
    tb.retain(|k, _| !k.contains(".shard-"));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "different files");
    for (name, bytes) in &ta {
        assert!(bytes == &tb[name], "{name} differs between two runs");
    }
    // Every artifact parses, and nothing in them looks like a clock reading.
    let out = a.join("out");
    let _: qsens::artifact::Artifact<CalibrationSet> = read(&out.join("calibration.json"));
    let _: qsens::artifact::Artifact<ModelInputs> = read(&out.join("model_inputs.msgpack"));
    let _: qsens::artifact::Artifact<Scores> = read(&out.join("fp8_autoquant_all_layers_fp8_autoquant_state.msgpack"));
    let _: qsens::artifact::Artifact<Manifest> = read(&out.join("fp8_autoquant_all_layers_fp8_quant_manifest.json"));
    let year =
        1970 + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 31_556_952;
    for (name, bytes) in &ta {
        let text = String::from_utf8_lossy(bytes);
        for needle in [format!("{year}-"), "timestamp".to_string(), "created_at".to_string()] {
            assert!(!text.contains(&needle), "{name} contains '{needle}'");
        }
    }
    eprintln!("determinism: {} files byte-identical across two runs", ta.len());
}
