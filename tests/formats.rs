//! Formats beyond FP8 (issue 12) against ModelOpt 0.47's own numbers, from
//! `tests/data/modelopt_formats/` (made on an H200 by `scripts/reference/make_modelopt_formats.sh`;
//! its README describes every tensor):
//! - fake quantization bit for bit on ModelOpt's reference matrices (zeros, ties, subnormals,
//!   saturation, amax 0, magnitudes up to f32 max), f32 and bf16;
//! - multi-format auto_quantize on the fixture: per-format scores, AWQ-lite's α, and our optimum
//!   against ModelOpt's recipes.

mod common;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::pipeline::{ok, s, shared};
use common::{median, spearman};
use qsens::artifact::scores::Scores;
use qsens::artifact::{self, Artifact};
use qsens::quant::{format_by_name, Format, WeightStats};
use qsens::search::reference::{compare, ModelOptRun};
use qsens::search::{Overrides, Problem};
use safetensors::SafeTensors;
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/modelopt_formats")
}

/// `tests/data/modelopt_smoothquant`: the same script's INT8_SMOOTHQUANT run (ModelOpt on the CPU).
fn smoothquant_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/modelopt_smoothquant")
}

/// A `*.safetensors.xz` of the reference folder, decompressed.
fn read_xz(name: &str) -> Vec<u8> {
    let path = data_dir().join(name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut BufReader::new(file), &mut out).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    out
}

/// A JSON file of the reference folder. Python's `json` writes non-finite floats as bare
/// `Infinity` / `NaN` (in the CPU-vs-GPU records); they read as null here.
fn json(name: &str) -> Value {
    json_in(&data_dir(), name)
}

fn json_in(dir: &Path, name: &str) -> Value {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text.replace(": -Infinity", ": null").replace(": Infinity", ": null").replace(": NaN", ": null");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A stored F32 or BF16 tensor as a candle tensor of the same dtype.
fn tensor(st: &SafeTensors, name: &str) -> Tensor {
    let view = st.tensor(name).unwrap_or_else(|e| panic!("tensor {name}: {e}"));
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::BF16 => DType::BF16,
        other => panic!("tensor {name}: dtype {other:?}"),
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu).unwrap()
}

/// Bit patterns of a float tensor (f32 or bf16), for exact comparison; every NaN is one pattern
/// (ModelOpt's kernels do not promise NaN payloads).
fn bits(t: &Tensor) -> Vec<u32> {
    let f32_bits = |v: f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
    match t.dtype() {
        DType::F32 => t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32_bits).collect(),
        DType::BF16 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .into_iter()
            .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() as u32 })
            .collect(),
        other => panic!("dtype {other:?}"),
    }
}

/// Which of our formats reproduces each ModelOpt config's quantizers here (the AWQ configs were
/// run with `algorithm: max`, so INT4_AWQ's weight quantizer is the plain INT4 block one).
const FAKE_QUANT: &[(&str, &str, bool)] = &[
    // (ModelOpt config, our format, input quantizer enabled)
    ("FP8_DEFAULT_CFG", "FP8", true),
    ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN", true),
    ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_2D_BLOCKWISE_WEIGHT_ONLY", false),
    ("INT8_DEFAULT_CFG", "INT8", true),
    ("INT4_AWQ_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY", false),
    ("W4A8_AWQ_BETA_CFG", "W4A8_AWQ_BETA", true),
    ("NVFP4_DEFAULT_CFG", "NVFP4", true),
    ("W4A16_NVFP4_CFG", "W4A16_NVFP4", false),
    ("MXFP8_DEFAULT_CFG", "MXFP8", true),
    ("MXFP4_DEFAULT_CFG", "MXFP4", true),
];

/// The only values that differ, each explained (docs/formats.md): ModelOpt's NVFP4 kernel is
/// Triton, whose f32 `/` is PTX `div.full.f32`, an approximate division built on the GPU's
/// approximate reciprocal; qsens computes it as `a · RN(1/b)`, which agrees on every other
/// NVFP4 value. These 3 are E2M1 ties (|x|/scale = 3.5 in exact arithmetic: x = −2.8246095e37 in
/// three blocks of the extreme bf16 matrix) that the GPU's reciprocal puts on the other side.
/// The W4A16 weight is the same tensor as the NVFP4 weight.
const KNOWN_DIFFERENCES: &[(&str, usize)] =
    &[("NVFP4_DEFAULT_CFG/weight/bf16/ye", 3), ("W4A16_NVFP4_CFG/weight/bf16/ye", 3)];

/// Our output for one stored case: the weight quantizer calibrated on the matrix itself, the
/// input quantizer with the amax ModelOpt's was calibrated to.
fn ours(format: &dyn Format, quantizer: &str, x: &Tensor, input_amax: f32) -> Tensor {
    match quantizer {
        "weight" => format.quantize_weight(x, &WeightStats::of(x).unwrap()).unwrap(),
        _ => format.quantize_input(x, input_amax).unwrap(),
    }
}

#[test]
fn fake_quant_is_modelopts_bit_for_bit() {
    let summary = json("fake_quant.json");
    let inputs_bytes = read_xz("inputs.safetensors.xz");
    let inputs = SafeTensors::deserialize(&inputs_bytes).unwrap();
    // Every config's outputs: an output equal to one stored earlier is stored once, under the
    // first config's key (`stored.<key>.same_as`).
    let files: BTreeMap<&str, Vec<u8>> =
        FAKE_QUANT.iter().map(|&(cfg, _, _)| (cfg, read_xz(&format!("{cfg}.safetensors.xz")))).collect();
    let (mut total, mut cases) = (0usize, 0usize);
    for &(cfg, name, has_input) in FAKE_QUANT {
        let format = format_by_name(name).unwrap();
        let input_amax = summary["calib_amax"][cfg].as_f64().map_or(0.0, |a| a as f32);
        let quantizers: &[&str] = if has_input { &["weight", "input"] } else { &["weight"] };
        for quantizer in quantizers {
            for dtype in ["f32", "bf16"] {
                cases += 1;
                for (matrix, out) in [("x", "y"), ("xe", "ye")] {
                    let key = format!("{cfg}/{quantizer}/{dtype}/{out}");
                    let stored = match summary["formats"][cfg]["stored"][&key]["same_as"].as_str() {
                        Some(other) => other.to_string(),
                        None => key.clone(),
                    };
                    let owner = stored.split('/').next().unwrap();
                    let file = files.get(owner).unwrap_or_else(|| panic!("{key}: no outputs of {owner}"));
                    let theirs = tensor(&SafeTensors::deserialize(file).unwrap(), &stored);
                    let x = tensor(&inputs, &format!("{matrix}/{dtype}"));
                    let mine = ours(format.as_ref(), quantizer, &x, input_amax);
                    assert_eq!(mine.dtype(), theirs.dtype(), "{key}");
                    let (a, b) = (bits(&mine), bits(&theirs));
                    let differing = a.iter().zip(&b).filter(|(p, q)| p != q).count();
                    eprintln!("{key:58} {:>9} values, {differing} differ", a.len());
                    let known = KNOWN_DIFFERENCES.iter().find(|k| k.0 == key).map_or(0, |k| k.1);
                    assert_eq!(differing, known, "{key}: {differing} of {} values differ from ModelOpt's", a.len());
                    total += a.len();
                }
            }
        }
    }
    // ≥ 1 M values per format, quantizer and dtype (the main matrix), plus the extreme one.
    assert_eq!(total, cases * ((1 << 20) + (1 << 17)), "compared {total} values in {cases} cases");
}

/// Our multi-format run on the fixture against ModelOpt's `autoquant_<tag>.json`.
fn assert_auto_quantize_parity(tag: &str, formats: &[&str], awq_alpha_share: f64) {
    let fx = fixtures_or_skip!();
    let reference = json(&format!("autoquant_{tag}.json"));
    assert_auto_quantize_parity_with(&fx, &reference, tag, formats, awq_alpha_share, &[4.8, 6.0, 8.0]);
}

/// [`assert_auto_quantize_parity`] against a given reference, objective checked at `target_bits`;
/// returns our scores.
fn assert_auto_quantize_parity_with(
    fx: &Path,
    reference: &Value,
    tag: &str,
    formats: &[&str],
    awq_alpha_share: f64,
    target_bits: &[f64],
) -> Scores {
    let p = shared(fx);
    let out = p.dir.path().join(format!("{tag}.msgpack"));
    let mut args = vec!["-q", "--model", s(&p.model), "--inputs", s(&p.inputs), "-o", s(&out)];
    for f in formats {
        args.extend(["--format", f]);
    }
    ok(env!("CARGO_BIN_EXE_score-layers"), &args);
    let ours: Artifact<Scores> = artifact::read(out.as_path()).unwrap();
    let ours = ours.payload;
    let run = ModelOptRun::from_json(&serde_json::to_vec(reference).unwrap()).unwrap();

    // Per format: Spearman ≥ 0.99 and median relative difference ≤ 5 % over the groups.
    assert_eq!(ours.formats.len(), formats.len() + 1);
    for (f, info) in ours.formats[..formats.len()].iter().enumerate() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for g in &run.groups {
            let mine = ours.groups.iter().find(|o| o.members == g.modules).expect("same groups");
            let theirs = g.formats.iter().position(|n| n.starts_with(formats[f])).expect("format in the reference");
            a.push(mine.scores[f]);
            b.push(g.scores[theirs]);
        }
        let rho = spearman(&a, &b);
        let rel: Vec<f64> =
            a.iter().zip(&b).map(|(x, y)| if *y == 0.0 { (x - y).abs() } else { (x - y).abs() / y.abs() }).collect();
        let med = median(rel);
        eprintln!(
            "{tag} {:>12}: {} groups, Spearman {rho:.5}, median relative difference {med:.2e}",
            info.name,
            a.len()
        );
        assert!(rho >= 0.99 && med <= 0.05, "{tag} {}: Spearman {rho}, median {med}", info.name);
    }

    // AWQ-lite: the same α as ModelOpt on (at least) the given share of layers.
    if let Some(awq) = reference["awq_lite"].as_array() {
        let theirs: BTreeMap<&str, f64> =
            awq.iter().map(|a| (a["module"].as_str().unwrap(), a["best_alpha"].as_f64().unwrap())).collect();
        let mut same = 0;
        for l in &ours.layers {
            let Some(alpha) = theirs.get(l.name.as_str()) else { continue };
            let mine = l.format_calibration.iter().flatten().find_map(|c| c.alpha);
            same += usize::from(mine == Some(*alpha));
            if mine != Some(*alpha) {
                eprintln!("  {}: α {mine:?}, ModelOpt's {alpha}", l.name);
            }
        }
        eprintln!("{tag}: AWQ α equal to ModelOpt's on {same} of {} layers", theirs.len());
        assert!(same as f64 >= awq_alpha_share * theirs.len() as f64, "{tag}: α equal on {same} of {}", theirs.len());
    }

    // Our optimum is no worse than ModelOpt's recipe on the same (our) scores, within budget.
    let problem = Problem::from_scores(&ours, &Overrides::default()).unwrap();
    let targets: Vec<_> = run.targets.iter().filter(|t| target_bits.contains(&t.effective_bits_target)).collect();
    assert_eq!(targets.len(), target_bits.len(), "{tag}: the reference re-solves at {target_bits:?} bits");
    for t in targets {
        let c = compare(&problem, t.effective_bits_target, &t.recipe).unwrap_or_else(|e| panic!("{tag}: {e:#}"));
        eprintln!(
            "{tag} @ {}: ours {:.6e} ({:.3} bits), ModelOpt's recipe on our scores {:.6e} ({:.3} bits)",
            t.effective_bits_target, c.ours_objective, c.ours_bits, c.reference_objective, c.reference_bits
        );
    }
    ours
}

#[test]
fn int4_awq_int8_fp8_match_modelopt_on_the_cpu() {
    // ModelOpt's CPU run is computed like ours (f32 on the CPU): α must agree everywhere.
    assert_auto_quantize_parity("int4awq_int8_fp8_cpu", &["INT4_AWQ", "INT8", "FP8"], 1.0);
}

#[test]
fn int4_awq_int8_fp8_match_modelopt_on_the_gpu() {
    assert_auto_quantize_parity("int4awq_int8_fp8", &["INT4_AWQ", "INT8", "FP8"], 0.95);
}

#[test]
fn nvfp4_fp8_match_modelopt() {
    assert_auto_quantize_parity("nvfp4_fp8", &["NVFP4", "FP8"], 0.95);
}

#[test]
fn nvfp4_awq_lite_fp8_match_modelopt() {
    assert_auto_quantize_parity("nvfp4awqlite_fp8", &["NVFP4_AWQ_LITE", "FP8"], 0.95);
}

/// INT8_SMOOTHQUANT (ModelOpt on the CPU, `tests/data/modelopt_smoothquant/`, made by
/// `scripts/reference/modelopt_formats.py --device cpu --part B --runs int8sq_fp8`): scores as
/// the other formats, and every smoothed layer's pre-quant scale and input amax as ModelOpt's
/// SmoothQuant calibration left them in the search state, within 1e-5 relative: with α = 1 the
/// scale is 1/(per-channel input amax), and activations match HF's within the model's 1e-5 parity
/// tolerance (tests/model_reference.rs), ~1e-6 in the vision tower.
#[test]
fn int8_smoothquant_fp8_match_modelopt_on_the_cpu() {
    let fx = fixtures_or_skip!();
    let reference = json_in(&smoothquant_dir(), "autoquant_int8sq_fp8.json");
    let ours = assert_auto_quantize_parity_with(
        &fx,
        &reference,
        "int8sq_fp8",
        &["INT8_SMOOTHQUANT", "FP8"],
        1.0,
        &[8.0, 10.0],
    );
    let bytes = std::fs::read(smoothquant_dir().join("autoquant_int8sq_fp8.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let recipe = "INT8_SMOOTHQUANT_CFG(effective-bits: 8.0)";
    let calibrated = &reference["calibrated_amax_per_recipe"][recipe];
    let (mut smoothed, mut worst_scale, mut worst_amax) = (0, 0f64, 0f64);
    for l in &ours.layers {
        let Some(theirs) = calibrated.get(format!("{}.input_quantizer", l.name)) else { continue };
        let mine = l.format_calibration[0].as_ref().unwrap_or_else(|| panic!("{}: no calibration record", l.name));
        let amax = theirs["amax"].as_f64().unwrap();
        let rel = (mine.input_amax - amax).abs() / amax;
        worst_amax = worst_amax.max(rel);
        assert!(rel <= 1e-5, "{}: input amax {} vs ModelOpt {amax}", l.name, mine.input_amax);
        let Some(key) = theirs["pre_quant_scale"]["tensor"].as_str() else {
            // Not smoothed by ModelOpt (the patch embedding's convolution): not by us either.
            assert!(mine.input_scale.is_empty(), "{}: smoothed, ModelOpt did not", l.name);
            continue;
        };
        let p = tensor(&st, key).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(mine.method, "smoothquant", "{}", l.name);
        assert_eq!(mine.input_scale.len(), p.len(), "{}", l.name);
        for (c, (a, b)) in mine.input_scale.iter().zip(&p).enumerate() {
            let rel = ((a - b).abs() / b.abs()) as f64;
            worst_scale = worst_scale.max(rel);
            assert!(rel <= 1e-5, "{} channel {c}: pre-quant scale {a} vs ModelOpt {b}", l.name);
        }
        smoothed += 1;
    }
    eprintln!(
        "int8sq_fp8: {smoothed} layers smoothed as ModelOpt; pre-quant scales within {worst_scale:.1e}, input amax \
         within {worst_amax:.1e} relative"
    );
    assert!(smoothed >= 20, "only {smoothed} smoothed layers compared");
}
