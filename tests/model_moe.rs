//! Qwen3-VL-MoE (issue 15) on the tiny mixture-of-experts checkpoint (`fixtures/qwen3-vl-moe-tiny`,
//! released 30B-A3B layout) against HF transformers 5.24 (`fixtures/reference_moe`, f32, sdpa
//! attention, grouped_mm experts):
//!
//! - every stored intermediate within 1e-5 relative error (‖Δ‖/‖ref‖) and 1e-4 max absolute
//!   error, the experts HF chose, the loss within 1e-5 relative;
//! - the hand-written backward through router and experts against central finite differences
//!   (f64), for the whole model and for one MoE block alone;
//! - a checkpoint with a missing or misshapen expert tensor, or top-k > experts, refused with one
//!   line naming the file and the fault, exit 2;
//! - the pipeline's binaries on it (score-layers, search, quantize, evaluate) against ModelOpt's
//!   runs (`fixtures/modelopt_moe`).
//!
//! The near tie. HF's smallest gap between the 2nd and 3rd router probability is 2.3e-6 (sample
//! 01, layer 2, position 50). The chosen experts are compared before any tensor after them, and
//! the match must not be luck: at every position HF's gap must exceed twice our largest router
//! probability error on that sample, so no rounding of ours could have picked another expert.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};
use qsens::model::qwen3_vl::moe::{ExpertsAmax, SparseMoeBlock};
use qsens::model::qwen3_vl::{expected_layers, ForwardOptions, Keep, LogitsMode, Qwen3VL};
use qsens::model::{LayerId, Linear, NoTap, Tap};
use qsens::quant::sensitivity::gradient_score;
use qsens::quant::{Format, Fp8PerTensor, GroupingRules, WeightStats};
use qsens::report::evaluation::spearman;
use qsens::score::calibrate::{weight_stats, AmaxTap};
use qsens::score::gradient::{GradientTap, LayerQuant};
use qsens::score::kl::GroupQuantTap;
use qsens::score::kl::KlBase;
use qsens::search::reference::{compare, ModelOptRun};
use qsens::search::{Overrides, Problem};
use rand::SeedableRng;
use rand_distr::Distribution;

use common::qwen::{errors, input_from_reference, label_token_nll, reference_moe, MOE_TINY, SAMPLES};

const REL: f64 = 1e-5;
const ABS: f64 = 1e-4;
/// Sparse layers of the fixture (`mlp_only_layers: [1]`).
const MOE_LAYERS: [usize; 2] = [0, 2];

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Row-wise softmax of `[L, E]` logits, in f64.
fn softmax_rows(logits: &Tensor) -> Vec<Vec<f64>> {
    let e = logits.dim(logits.rank() - 1).unwrap();
    f64s(logits)
        .chunks(e)
        .map(|row| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = row.iter().map(|z| (z - m).exp()).collect();
            let s: f64 = ex.iter().sum();
            ex.into_iter().map(|v| v / s).collect()
        })
        .collect()
}

/// Gap between the k-th and (k+1)-th largest probability of a row.
fn topk_gap(p: &[f64], k: usize) -> f64 {
    let mut sorted = p.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[k - 1] - sorted[k]
}

#[test]
fn moe_matches_hf_reference_f32() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let cfg = model.config().clone();
    assert_eq!(model.num_parameters(), 9_987_072, "the README's parameter count");
    assert_eq!(model.layers(), expected_layers(&cfg).as_slice());
    // No quantizable Linear inside a sparse block; the dense layer keeps its three.
    let names: Vec<&str> = model.layers().iter().map(|l| l.name.as_str()).collect();
    assert!(!names.iter().any(|n| n.contains("layers.0.mlp") || n.contains("layers.2.mlp")), "{names:?}");
    assert!(names.contains(&"model.language_model.layers.1.mlp.down_proj"));
    assert_eq!(names.len(), 35);
    let k = cfg.text_config.num_experts_per_tok.unwrap();

    let mut failures = Vec::new();
    let mut worst: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    let mut tightest = (f64::INFINITY, String::new());
    for s in 0..SAMPLES {
        let r = reference_moe(&fx, s);
        let input = input_from_reference(&r);
        let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Nothing, trace: true };
        let fwd = model.forward(&input, &mut NoTap, &opts).unwrap();
        let tr = &fwd.trace;

        // 1. The same experts, decided by more than our numerical error.
        for i in MOE_LAYERS {
            let ours_ids = tr[&format!("router_topk_ids_{i}")].to_dtype(DType::I64).unwrap();
            let theirs_ids = &r[&format!("router_topk_ids_{i}")];
            let ours_ids: Vec<i64> = ours_ids.flatten_all().unwrap().to_vec1().unwrap();
            let theirs_ids: Vec<i64> = theirs_ids.flatten_all().unwrap().to_vec1().unwrap();
            let differ: Vec<usize> = (0..ours_ids.len() / k)
                .filter(|&t| ours_ids[t * k..(t + 1) * k] != theirs_ids[t * k..(t + 1) * k])
                .collect();
            assert!(differ.is_empty(), "sample {s} layer {i}: other experts at positions {differ:?}");
            let ours_p = softmax_rows(&tr[&format!("router_logits_{i}")]);
            let theirs_p = softmax_rows(&r[&format!("router_logits_{i}")]);
            let p_err =
                ours_p.iter().flatten().zip(theirs_p.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            let (pos, gap) =
                theirs_p.iter().map(|p| topk_gap(p, k)).enumerate().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
            let ours_gap = topk_gap(&ours_p[pos], k);
            eprintln!(
                "sample {s} layer {i}: smallest HF gap {gap:.3e} at position {pos} (ours {ours_gap:.3e}), \
                 max router prob error {p_err:.2e}"
            );
            assert!(gap > 2.0 * p_err, "sample {s} layer {i}: gap {gap:.3e} at {pos} within our error {p_err:.2e}");
            if gap / p_err < tightest.0 {
                tightest =
                    (gap / p_err, format!("sample {s} layer {i} position {pos}: gap {gap:.3e}, error {p_err:.2e}"));
            }
            if s == 1 && i == 2 {
                // The README's near tie is where it says, and ours falls the same way.
                assert_eq!(pos, 50);
                assert!((2.0e-6..2.5e-6).contains(&gap), "{gap}");
                assert!(ours_gap > 0.0 && (ours_gap - gap).abs() < gap / 2.0, "ours {ours_gap} vs HF {gap}");
            }
        }

        // 2. Every stored intermediate.
        let mut check = |name: &str, ours: &Tensor, theirs: &Tensor| {
            let theirs = theirs.reshape(ours.shape()).unwrap();
            let (rel, abs) = errors(ours, &theirs);
            let key = name.split('#').next().unwrap().to_string();
            let w = worst.entry(key).or_insert((0.0, 0.0));
            w.0 = w.0.max(rel);
            w.1 = w.1.max(abs);
            if !(rel <= REL && abs <= ABS) {
                failures.push(format!("sample {s} {name}: rel {rel:.3e} abs {abs:.3e}"));
            }
        };
        let mut names = vec!["vision_patch_embed".to_string(), "vision_block_in_0".to_string()];
        names.extend((0..cfg.vision_config.depth - 1).map(|i| format!("vision_block_out_{i}")));
        names.extend(["vision_last_hidden".to_string(), "image_embeds".to_string()]);
        names.extend((0..cfg.vision_config.deepstack_visual_indexes.len()).map(|i| format!("deepstack_{i}")));
        for i in 0..cfg.text_config.num_hidden_layers {
            names.extend([format!("text_layer_in_{i}"), format!("mlp_in_{i}"), format!("mlp_out_{i}")]);
        }
        for i in MOE_LAYERS {
            names.extend([format!("router_logits_{i}"), format!("router_topk_weights_{i}")]);
        }
        names.extend(["text_final_norm_in".to_string(), "text_final_hidden".to_string()]);
        for name in &names {
            let ours = tr.get(name).unwrap_or_else(|| panic!("trace lacks {name}"));
            check(name, ours, &r[name]);
        }
        assert!(!tr.contains_key("router_logits_1"), "layer 1 is dense");
        // Logits (untied lm_head): the stored columns and the log-sum-exp over the vocabulary.
        let logits = fwd.logits.as_ref().unwrap();
        let cols = r["logit_col_ids"].to_dtype(DType::U32).unwrap();
        check("logits_cols", &logits.index_select(&cols, 1).unwrap(), &r["logits_cols"]);
        let lse = logits.log_sum_exp(1).unwrap();
        check("logsumexp", &lse, &r["logsumexp"]);
        let nll = label_token_nll(logits, &lse, input.labels.as_ref().unwrap());
        check("label_token_nll", &nll, &r["label_token_nll"]);
        let loss = Tensor::new(fwd.loss.unwrap(), &Device::Cpu).unwrap();
        check("loss", &loss, &r["loss"]);
    }
    eprintln!("worst over samples (rel, abs):");
    for (name, (rel, abs)) in &worst {
        eprintln!("  {name:24} {rel:.2e} {abs:.2e}");
    }
    eprintln!("tightest expert choice: {} (gap / error = {:.1})", tightest.1, tightest.0);
    assert!(failures.is_empty(), "out of tolerance:\n{}", failures.join("\n"));
}

/// The block alone on HF's own `mlp_in`: no upstream error, so any difference is the block's.
#[test]
fn moe_block_on_hf_inputs_f32() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    assert!(model.moe_block(1).is_none(), "layer 1 is dense");
    let mut worst = [0.0f64; 3];
    for s in 0..SAMPLES {
        let r = reference_moe(&fx, s);
        for i in MOE_LAYERS {
            let block = model.moe_block(i).unwrap();
            let x = r[&format!("mlp_in_{i}")].squeeze(0).unwrap();
            let (out, routing, _) = block.forward(&x, false).unwrap();
            let ids = routing.ids.to_dtype(DType::I64).unwrap();
            let their_ids = &r[&format!("router_topk_ids_{i}")];
            assert_eq!(
                ids.flatten_all().unwrap().to_vec1::<i64>().unwrap(),
                their_ids.flatten_all().unwrap().to_vec1::<i64>().unwrap(),
                "sample {s} layer {i}"
            );
            for (j, (ours, name)) in
                [(&routing.logits, "router_logits"), (&routing.weights, "router_topk_weights"), (&out, "mlp_out")]
                    .into_iter()
                    .enumerate()
            {
                let theirs = r[&format!("{name}_{i}")].reshape(ours.shape()).unwrap();
                let (rel, abs) = errors(ours, &theirs);
                worst[j] = worst[j].max(abs);
                assert!(rel <= REL && abs <= ABS, "sample {s} {name}_{i}: rel {rel:.3e} abs {abs:.3e}");
            }
            // Weights are a distribution over the chosen experts.
            let sums = f64s(&routing.weights.sum(1).unwrap());
            assert!(sums.iter().all(|v| (v - 1.0).abs() < 1e-6), "{sums:?}");
        }
    }
    eprintln!(
        "max |Δ| on HF inputs: router_logits {:.2e}, weights {:.2e}, mlp_out {:.2e}",
        worst[0], worst[1], worst[2]
    );
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
}

/// One block, f64: ⟨∂⟨out, g⟩/∂x, u⟩ against the central difference along `u`.
#[test]
fn moe_block_backward_matches_finite_differences_f64() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F64, &Device::Cpu).unwrap();
    let r = reference_moe(&fx, 2);
    for i in MOE_LAYERS {
        let block = model.moe_block(i).unwrap();
        let x = r[&format!("mlp_in_{i}")].squeeze(0).unwrap().to_dtype(DType::F64).unwrap();
        let (out, routing, saved) = block.forward(&x, true).unwrap();
        let g = randn(out.dims(), 10 + i as u64);
        let dx = block.backward(saved.as_ref().unwrap(), &g).unwrap();
        let eps = 1e-6;
        for seed in 0..3u64 {
            let u = randn(x.dims(), 100 * i as u64 + seed);
            let f = |sign: f64| {
                let xp = (&x + (&u * (sign * eps)).unwrap()).unwrap();
                let (o, rt, _) = block.forward(&xp, false).unwrap();
                // Finite differences only mean something where the choice of experts holds.
                assert_eq!(
                    f64s(&rt.ids.to_dtype(DType::F64).unwrap()),
                    f64s(&routing.ids.to_dtype(DType::F64).unwrap())
                );
                dot(&o, &g)
            };
            let fd = (f(1.0) - f(-1.0)) / (2.0 * eps);
            let analytic = dot(&dx, &u);
            let rel = (fd - analytic).abs() / analytic.abs();
            eprintln!("layer {i} direction {seed}: analytic {analytic:+.9e} fd {fd:+.9e} rel {rel:.2e}");
            assert!(rel < 1e-6, "layer {i}: analytic {analytic} fd {fd} rel {rel}");
        }
    }
}

/// Adds `eps · dir` to one layer's output; records ∂loss/∂output of every layer.
#[derive(Default)]
struct Probe {
    target: Option<(LayerId, f64, Tensor)>,
    dy: std::collections::HashMap<LayerId, Tensor>,
}

impl Tap for Probe {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match &self.target {
            Some((t, eps, dir)) if *t == id => Ok(Some((linear.forward(x)? + (dir * *eps)?)?)),
            _ => Ok(None),
        }
    }

    fn backward(&mut self, id: LayerId, _: &Linear, _: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<()> {
        self.dy.insert(id, dy.clone());
        Ok(())
    }
}

/// The whole model, f64: the gradient at layers before, between and after the sparse blocks
/// (so through one or both of them) against central differences of the loss.
#[test]
fn backward_through_experts_matches_finite_differences_f64() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F64, &Device::Cpu).unwrap();
    let input = input_from_reference(&reference_moe(&fx, 2));
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    let mut probe = Probe::default();
    let fwd = model.forward(&input, &mut probe, &opts).unwrap();
    model.backward(&fwd, &mut probe).unwrap();
    assert_eq!(probe.dy.len(), model.layers().len(), "every layer once");
    let plain = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Nothing, trace: false };
    let names = [
        "model.visual.blocks.0.attn.qkv",
        "model.visual.deepstack_merger_list.0.linear_fc2",
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.self_attn.o_proj",
        "model.language_model.layers.1.mlp.down_proj",
        "model.language_model.layers.2.self_attn.v_proj",
    ];
    let eps = 1e-5;
    let mut failures = Vec::new();
    for (seed, name) in names.iter().enumerate() {
        let id = model.layer_id(name).unwrap();
        let dy = &probe.dy[&id];
        let u = randn(dy.dims(), seed as u64 + 1);
        let analytic = dot(dy, &u);
        let mut l = [0.0; 2];
        for (j, sign) in [1.0, -1.0].into_iter().enumerate() {
            let mut tap = Probe { target: Some((id, sign * eps, u.clone())), ..Default::default() };
            let f = model.forward(&input, &mut tap, &plain).unwrap();
            l[j] = f.loss_tensor().unwrap().to_scalar::<f64>().unwrap();
        }
        let fd = (l[0] - l[1]) / (2.0 * eps);
        let rel = (fd - analytic).abs() / analytic.abs();
        eprintln!("{name:50} <dy,u> {analytic:+.9e}  fd {fd:+.9e}  rel {rel:.2e}");
        if rel.is_nan() || rel > 1e-5 {
            failures.push(format!("{name}: analytic {analytic} fd {fd} rel {rel}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run_ok(bin: &str, args: &[&str]) {
    let o = Command::new(bin).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{bin} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A copy of the MoE checkpoint folder with `edit` applied to its tensors and `config` to its
/// config.json.
fn broken_checkpoint(
    fx: &Path,
    dir: &Path,
    edit: impl Fn(&mut std::collections::HashMap<String, Tensor>),
    config: impl Fn(&mut serde_json::Value),
) -> PathBuf {
    let src = fx.join(MOE_TINY);
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap();
        if name != "model.safetensors" && name != "config.json" {
            std::fs::copy(&p, dir.join(name)).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

#[test]
fn bad_moe_checkpoints_are_refused_with_one_line() {
    let fx = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    // Valid inputs (one sample) so that the failure is the checkpoint's.
    let db = tmp.path().join("calib.db");
    let calib = tmp.path().join("calib.json");
    let inputs = tmp.path().join("inputs.msgpack");
    run_ok(
        env!("CARGO_BIN_EXE_calib-extract"),
        &["-q", "--from-coco", s(&fx.join("coco/captions.json")), "--db", s(&db)],
    );
    let query = "SELECT sample_id, image_id, file_name, caption, split FROM samples WHERE image_id <= 1";
    run_ok(
        env!("CARGO_BIN_EXE_calib-extract"),
        &["-q", "--db", s(&db), "--image-root", s(&fx.join("images")), "--query", query, "-o", s(&calib)],
    );
    let model = fx.join(MOE_TINY);
    let pre = ["-q", "--calibration", s(&calib), "--model", s(&model), "--max-pixels", "262144", "-o", s(&inputs)];
    run_ok(env!("CARGO_BIN_EXE_preprocess"), &pre);

    let down = "model.language_model.layers.2.mlp.experts.down_proj";
    let gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj";
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "missing expert tensor",
            broken_checkpoint(&fx, &tmp.path().join("missing"), |t| drop(t.remove(down)), |_| {}),
            vec![down, "model.safetensors", "missing"],
        ),
        (
            // transformers' in-memory layout [E, 2I, H] instead of the released [E, H, 2I]
            "transposed experts",
            broken_checkpoint(
                &fx,
                &tmp.path().join("transposed"),
                |t| {
                    let w = t[gate_up].transpose(1, 2).unwrap().contiguous().unwrap();
                    t.insert(gate_up.to_string(), w);
                },
                |_| {},
            ),
            vec![gate_up, "model.safetensors", "[8, 96, 32]", "[8, 32, 96]"],
        ),
        (
            "top-k > experts",
            broken_checkpoint(
                &fx,
                &tmp.path().join("topk"),
                |_| {},
                |c| c["text_config"]["num_experts_per_tok"] = serde_json::json!(9),
            ),
            vec!["config.json", "num_experts_per_tok = 9 exceeds num_experts = 8"],
        ),
        (
            // ModelOpt's AWQ-lite over fused experts is not reproduced: refused, not approximated.
            "AWQ format on the experts",
            model.clone(),
            vec![MOE_TINY, "NVFP4_AWQ_LITE", "routed experts", "max-calibrated"],
        ),
    ];
    for (what, dir, needles) in cases {
        let out = tmp.path().join("scores.msgpack");
        let format = if what.starts_with("AWQ") { "NVFP4_AWQ_LITE" } else { "FP8" };
        let o = Command::new(env!("CARGO_BIN_EXE_score-layers"))
            .args(["--model", s(&dir), "--inputs", s(&inputs), "--format", format, "-o", s(&out)])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("{what}: {}", err.trim_end());
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line: {err}");
        assert!(err.starts_with("score-layers: "), "{what}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
        }
        assert!(!out.exists(), "{what}: nothing written");
    }
}

/// The experts' FP8 calibration (weights, then the 4 reference samples), per sparse layer.
fn calibrate_experts(fx: &Path, model: &Qwen3VL) -> Vec<ExpertsAmax> {
    let mut amax: Vec<_> = MOE_LAYERS.iter().map(|&i| model.moe_block(i).unwrap().weight_amax().unwrap()).collect();
    let opts = ForwardOptions { logits: LogitsMode::None, keep: Keep::Nothing, trace: true };
    for s in 0..SAMPLES {
        let input = input_from_reference(&reference_moe(fx, s));
        let fwd = model.forward(&input, &mut NoTap, &opts).unwrap();
        for (a, &i) in amax.iter_mut().zip(&MOE_LAYERS) {
            model.moe_block(i).unwrap().observe(&fwd.trace[&format!("mlp_in_{i}")], a).unwrap();
        }
    }
    amax
}

/// FP8 calibration of the fused experts against ModelOpt 0.47 (`modelopt_moe/autoquant_gradient.json`,
/// `calibrated_amax_per_recipe`, the 4 reference samples): one input amax per projection per layer,
/// one weight amax per expert (gate and up share it), experts no token reached included.
#[test]
fn experts_amax_match_modelopt() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let path = fx.join("modelopt_moe/autoquant_gradient.json");
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cal = &run["calibrated_amax_per_recipe"]["FP8_DEFAULT_CFG(effective-bits: 8.0)"];
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("reference_moe/index.json")).unwrap()).unwrap();

    let amax = calibrate_experts(&fx, &model);
    let opts = ForwardOptions { logits: LogitsMode::None, keep: Keep::Nothing, trace: true };
    let mut worst = (0.0f64, String::new());
    let mut check = |name: String, ours: f32| {
        let theirs = cal[&name].as_f64().unwrap_or_else(|| panic!("{name} not in {}", path.display()));
        let rel = (ours as f64 - theirs).abs() / theirs;
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        assert!(rel <= 1e-6, "{name}: ours {ours} ModelOpt {theirs} rel {rel:.2e}");
    };
    for (a, &i) in amax.iter().zip(&MOE_LAYERS) {
        let p = format!("model.language_model.layers.{i}.mlp.experts");
        check(format!("{p}.gate_up_proj_input_quantizer"), a.gate_up_input);
        check(format!("{p}.down_proj_input_quantizer"), a.down_input);
        for e in 0..8 {
            check(format!("{p}.gate_up_proj_weight_quantizers.{e}"), a.gate_up_weight[e]);
            check(format!("{p}.down_proj_weight_quantizers.{e}"), a.down_weight[e]);
        }
        // Token slots per expert = HF's routing counts summed over the samples.
        let hf: Vec<u64> = (0..8)
            .map(|e| {
                index["samples"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["expert_token_counts"][i.to_string()][e].as_u64().unwrap())
                    .sum()
            })
            .collect();
        assert_eq!(a.tokens_routed, hf, "layer {i}");
    }
    assert_eq!(amax[0].tokens_routed[4], 3, "the README's nearly idle expert");
    // An expert no token reaches still has its weight amax: layer 2, expert 3 on sample 01 alone.
    let block = model.moe_block(2).unwrap();
    let mut one = block.weight_amax().unwrap();
    let fwd = model.forward(&input_from_reference(&reference_moe(&fx, 1)), &mut NoTap, &opts).unwrap();
    block.observe(&fwd.trace["mlp_in_2"], &mut one).unwrap();
    assert_eq!(one.tokens_routed[3], 0);
    assert_eq!((one.gate_up_weight[3], one.down_weight[3]), (amax[1].gate_up_weight[3], amax[1].down_weight[3]));
    eprintln!("worst amax: {} rel {:.2e}", worst.1, worst.0);
}

/// ModelOpt's gradient score of each layer's experts group (`modelopt_moe/autoquant_gradient.json`):
/// One sample's gradient score of a sparse block's experts: `Σ (∂L/∂Y ⊙ (Y_fp8 − Y))²` with the
/// block's experts fake-quantized at their calibrated amax (`amax`, one entry per MoE layer).
fn expert_gradient_score(
    block: &SparseMoeBlock,
    amax: &[ExpertsAmax],
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<f64> {
    let slot = MOE_LAYERS.iter().position(|&i| i == block.layer()).unwrap();
    let yq = block.forward_quantized(x, &Fp8PerTensor, &amax[slot])?;
    Ok(gradient_score(dy, y, &yq)?.to_scalar::<f32>()? as f64)
}

/// `Σ (∂L/∂Y ⊙ (Y_fp8 − Y))²` on the whole block's output `Y` (already routing-weighted), with
/// only that block's experts fake-quantized and the router on the unquantized input.
#[test]
fn experts_gradient_scores_match_modelopt() {
    struct ExpertScores<'a> {
        amax: &'a [ExpertsAmax],
        scores: std::collections::BTreeMap<usize, f64>,
    }
    impl Tap for ExpertScores<'_> {
        fn moe_backward(
            &mut self,
            block: &SparseMoeBlock,
            x: &Tensor,
            y: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<()> {
            *self.scores.entry(block.layer()).or_default() += expert_gradient_score(block, self.amax, x, y, dy)?;
            Ok(())
        }
    }
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let amax = calibrate_experts(&fx, &model);
    let mut tap = ExpertScores { amax: &amax, scores: Default::default() };
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    for s in 0..SAMPLES {
        let input = input_from_reference(&reference_moe(&fx, s));
        let fwd = model.forward(&input, &mut tap, &opts).unwrap();
        model.backward(&fwd, &mut tap).unwrap();
    }
    let path = fx.join("modelopt_moe/autoquant_gradient.json");
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for i in MOE_LAYERS {
        let name = format!("model.language_model.layers.{i}.mlp.experts");
        let group = run["groups"].as_array().unwrap().iter().find(|g| g["group"] == name.as_str()).unwrap();
        assert_eq!(group["formats"][0], "FP8_DEFAULT_CFG(effective-bits: 8.0)");
        let theirs = group["scores"][0].as_f64().unwrap();
        let ours = tap.scores[&i];
        let rel = (ours - theirs).abs() / theirs;
        eprintln!("{name}: ours {ours:.6e} ModelOpt {theirs:.6e} rel {rel:.2e}");
        assert!(rel <= 0.05, "{name}: ours {ours} ModelOpt {theirs} rel {rel}");
    }
}

/// ModelOpt's kl_div score of each layer's experts group (`modelopt_moe/autoquant_kl_div.json`):
/// `Σ_positions KL(P ‖ Q)` with only that block's experts fake-quantized, summed over the samples.
#[test]
fn experts_kl_scores_match_modelopt() {
    struct QuantizeExperts<'a> {
        layer: usize,
        amax: &'a ExpertsAmax,
    }
    impl Tap for QuantizeExperts<'_> {
        fn moe_forward(&mut self, block: &SparseMoeBlock, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
            if block.layer() != self.layer {
                return Ok(None);
            }
            block.forward_quantized(x, &Fp8PerTensor, self.amax).map(Some)
        }
    }
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let amax = calibrate_experts(&fx, &model);
    let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Nothing, trace: false };
    let mut ours = [0.0f64; 2];
    for s in 0..SAMPLES {
        let input = input_from_reference(&reference_moe(&fx, s));
        let base = model.forward(&input, &mut NoTap, &opts).unwrap().logits.unwrap();
        let base = KlBase::new(&base).unwrap();
        for (slot, &i) in MOE_LAYERS.iter().enumerate() {
            let mut tap = QuantizeExperts { layer: i, amax: &amax[slot] };
            let logits = model.forward(&input, &mut tap, &opts).unwrap().logits.unwrap();
            ours[slot] += base.kl_sum(&logits).unwrap().to_scalar::<f64>().unwrap();
        }
    }
    let path = fx.join("modelopt_moe/autoquant_kl_div.json");
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (slot, &i) in MOE_LAYERS.iter().enumerate() {
        let name = format!("model.language_model.layers.{i}.mlp.experts");
        let group = run["groups"].as_array().unwrap().iter().find(|g| g["group"] == name.as_str()).unwrap();
        let theirs = group["scores"][0].as_f64().unwrap();
        let rel = (ours[slot] - theirs).abs() / theirs;
        eprintln!("{name}: ours {:.6e} ModelOpt {theirs:.6e} rel {rel:.2e}", ours[slot]);
        assert!(rel <= 0.05, "{name}: ours {} ModelOpt {theirs} rel {rel}", ours[slot]);
    }
}

/// Costs as ModelOpt counts them (`params × bits / 16 × cost weight`): every expert's weights in
/// the layer's group, the router not at all; under `active_moe` the experts weigh top_k / E. The
/// denominators of the lm_head-excluded runs under both cost models, and of the plain run.
#[test]
fn experts_costs_match_modelopt() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let runs = [
        ("autoquant_gradient.json", false, false),
        ("autoquant_gradient_lmhead_cost_excluded.json", true, false),
        ("autoquant_gradient_lmhead_cost_excluded_active_moe.json", true, true),
    ];
    for (file, lm_head_excluded, active_moe) in runs {
        let path = fx.join("modelopt_moe").join(file);
        let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut denominator = 0.0;
        for layer in model.layers() {
            if !(lm_head_excluded && layer.name == "lm_head") {
                denominator += layer.params() as f64;
            }
        }
        for i in MOE_LAYERS {
            let block = model.moe_block(i).unwrap();
            let weight = if active_moe { block.active_moe_cost_weight() } else { 1.0 };
            let name = format!("model.language_model.layers.{i}.mlp.experts");
            let group = run["groups"].as_array().unwrap().iter().find(|g| g["group"] == name.as_str()).unwrap();
            let none_cost = block.expert_params() as f64 * weight;
            assert_eq!(group["cost_weight"].as_f64().unwrap(), weight, "{file} {name}");
            assert_eq!(group["uncompressed_cost"].as_f64().unwrap(), none_cost, "{file} {name}");
            let costs: Vec<f64> = group["costs"].as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).collect();
            assert_eq!(costs, vec![none_cost * 8.0 / 16.0, none_cost], "{file} {name}");
            denominator += none_cost;
        }
        assert_eq!(run["cost_denominator"].as_f64().unwrap(), denominator, "{file}");
    }
}

/// bf16 end to end, as `model_gradients` checks the dense model and with its bounds: logits
/// within 2e-2 relative of f32's, gradients finite and within 0.25 relative. bf16 rounding moves
/// a few tokens to other experts (a discrete change no tolerance describes), so the logits are
/// compared on the positions whose experts are the same in both dtypes in every sparse layer.
#[test]
fn bf16_runs_forward_and_backward() {
    let fx = fixtures_or_skip!();
    let input = input_from_reference(&reference_moe(&fx, 2));
    let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Backward, trace: true };
    let f32m = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let reference = f32m.forward(&input, &mut NoTap, &opts).unwrap();
    let mut p32 = Probe::default();
    f32m.backward(&reference, &mut p32).unwrap();
    drop(f32m);
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::BF16, &Device::Cpu).unwrap();
    let fwd = model.forward(&input, &mut NoTap, &opts).unwrap();
    let l = input.input_ids.len();
    let mut same = vec![true; l];
    for i in MOE_LAYERS {
        let key = format!("router_topk_ids_{i}");
        let ours: Vec<Vec<u32>> = fwd.trace[&key].to_vec2().unwrap();
        let theirs: Vec<Vec<u32>> = reference.trace[&key].to_vec2().unwrap();
        let moved: Vec<usize> = (0..l).filter(|&t| ours[t] != theirs[t]).collect();
        eprintln!("layer {i}: positions routed elsewhere in bf16: {moved:?}");
        moved.iter().for_each(|&t| same[t] = false);
    }
    let rows: Vec<u32> = (0..l as u32).filter(|&t| same[t as usize]).collect();
    assert!(rows.len() > l / 2, "bf16 moved most tokens to other experts");
    let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
    let pick = |f: &qsens::model::qwen3_vl::Forward| f.logits.as_ref().unwrap().index_select(&rows, 0).unwrap();
    let (rel, _) = errors(&pick(&fwd), &pick(&reference));
    eprintln!(
        "bf16 vs f32 logits on {} of {l} positions: rel {rel:.3e}; loss {} vs {}",
        rows.dim(0).unwrap(),
        fwd.loss.unwrap(),
        reference.loss.unwrap()
    );
    assert!(rel <= 2e-2, "bf16 logits off by {rel}");
    let mut probe = Probe::default();
    model.backward(&fwd, &mut probe).unwrap();
    assert_eq!(probe.dy.len(), model.layers().len());
    for (id, dy) in &probe.dy {
        assert_eq!(dy.dtype(), DType::BF16);
        let (rel, _) = errors(dy, &p32.dy[id]);
        let name = &model.layers()[*id].name;
        assert!(rel.is_finite() && rel < 0.25, "{name}: bf16 dy rel error {rel}");
    }
}

/// Every group of the MoE model scored by ModelOpt's gradient method with the library's taps (the
/// Linear layers by `score::gradient::GradientTap`, the experts by `Tap::moe_backward`), grouped
/// by ModelOpt's default rules, against `modelopt_moe/autoquant_gradient.json`: the same 30 groups,
/// Spearman ≥ 0.99 and median relative difference ≤ 5 % (the issue's bars).
#[test]
fn all_groups_gradient_scores_match_modelopt() {
    struct Both<'a> {
        linears: GradientTap<'a>,
        experts: &'a [ExpertsAmax],
        expert_scores: std::collections::BTreeMap<usize, f64>,
    }
    impl Tap for Both<'_> {
        fn backward(
            &mut self,
            id: LayerId,
            linear: &Linear,
            x: &Tensor,
            y: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<()> {
            self.linears.backward(id, linear, x, y, dy)
        }
        fn moe_backward(
            &mut self,
            block: &SparseMoeBlock,
            x: &Tensor,
            y: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<()> {
            *self.expert_scores.entry(block.layer()).or_default() +=
                expert_gradient_score(block, self.experts, x, y, dy)?;
            Ok(())
        }
    }
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let n = model.layers().len();
    let (input_amax, stats, experts) = calibrate_all(&fx, &model);
    let formats: Vec<Box<dyn Format>> = vec![Box::new(Fp8PerTensor)];
    let skip = vec![false; n];
    let quant = LayerQuant {
        formats: &formats,
        input_amax: &input_amax,
        weight_stats: &stats,
        format_calibration: Vec::new(),
        skip: &skip,
        cached_weights: None,
    };
    // 2. Scores: one forward and one backward per sample.
    let mut tap = Both { linears: GradientTap::new(&quant, n), experts: &experts, expert_scores: Default::default() };
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    for s in 0..SAMPLES {
        let input = input_from_reference(&reference_moe(&fx, s));
        let fwd = model.forward(&input, &mut tap, &opts).unwrap();
        model.backward(&fwd, &mut tap).unwrap();
    }
    let expert_scores = tap.expert_scores.clone();
    let layer_scores = tap.linears.finish().unwrap().remove(0);
    // 3. Groups: ModelOpt's rules over the Linear layers, one group per layer's experts.
    let names: Vec<&str> = model.layers().iter().map(|l| l.name.as_str()).collect();
    let mut ours: std::collections::BTreeMap<String, f64> = GroupingRules::default()
        .group(&names)
        .into_iter()
        .map(|g| (g.name, g.members.iter().map(|&m| layer_scores[m][0]).sum()))
        .collect();
    for (i, s) in expert_scores {
        ours.insert(format!("model.language_model.layers.{i}.mlp.experts"), s);
    }
    assert_close_to_modelopt(&fx, "autoquant_gradient.json", &ours);
    search_never_loses_to_modelopt(&fx, &model, "autoquant_gradient", &ours);
}

/// Calibration of the whole MoE model as `score-layers` runs it: every Linear's input amax
/// (`AmaxTap`) and weight statistics, and the experts' amax gathered inside the same forwards
/// (`experts::CalibrationTap`), held to the separate pass over the traced block inputs.
fn calibrate_all(fx: &Path, model: &Qwen3VL) -> (Vec<f32>, Vec<WeightStats>, Vec<ExpertsAmax>) {
    let n = model.layers().len();
    let mut amax_tap = AmaxTap::new(n, &Device::Cpu).unwrap();
    let blocks = qsens::score::experts::blocks(model);
    let mut tap = qsens::score::experts::CalibrationTap::new(&mut amax_tap, &blocks, &Device::Cpu).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::None, keep: Keep::Nothing, trace: false };
    for s in 0..SAMPLES {
        model.forward(&input_from_reference(&reference_moe(fx, s)), &mut tap, &opts).unwrap();
    }
    let experts: Vec<ExpertsAmax> = tap.finish().unwrap().into_iter().map(|(_, a)| a).collect();
    assert_eq!(experts, calibrate_experts(fx, model), "calibrating inside the forward = a separate pass");
    let linears: Vec<&Linear> = (0..n).map(|id| model.linear(id)).collect();
    (amax_tap.finish().unwrap(), weight_stats(&linears).unwrap(), experts)
}

/// Our FP8 group scores against a ModelOpt run's: the same 30 groups, Spearman ≥ 0.99, median
/// relative difference ≤ 5 % (the issue's bars).
fn assert_close_to_modelopt(fx: &Path, file: &str, ours: &std::collections::BTreeMap<String, f64>) {
    let path = fx.join("modelopt_moe").join(file);
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let theirs: std::collections::BTreeMap<String, f64> = run["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["group"].as_str().unwrap().to_string(), g["scores"][0].as_f64().unwrap()))
        .collect();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{file}: the same groups");
    assert_eq!(ours.len(), 30);
    let (a, b): (Vec<f64>, Vec<f64>) = ours.values().zip(theirs.values()).map(|(x, y)| (*x, *y)).unzip();
    let rho = spearman(&a, &b).unwrap();
    let mut rel: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs()).collect();
    rel.sort_by(|x, y| x.total_cmp(y));
    let median = (rel[rel.len() / 2 - 1] + rel[rel.len() / 2]) / 2.0;
    eprintln!("{file}: 30 groups, Spearman {rho:.6}, median relative difference {median:.2e}, worst {:.2e}", rel[29]);
    assert!(rho >= 0.99, "{file}: Spearman {rho}");
    assert!(median <= 0.05, "{file}: median relative difference {median}");
}

/// Issue 15's acceptance on our scores, as `score_layers` checks the dense model: at every budget
/// of ModelOpt's runs (weight cost model, with and without lm_head's cost) our optimum is no worse
/// than ModelOpt's recipe evaluated on the same scores, within the budget. The experts group costs
/// all its experts' weights (its "shape" below is that count).
fn search_never_loses_to_modelopt(
    fx: &Path,
    model: &Qwen3VL,
    stem: &str,
    ours: &std::collections::BTreeMap<String, f64>,
) {
    let mut shapes = std::collections::BTreeMap::new();
    for l in model.layers() {
        shapes.insert(l.name.clone(), [l.out_features as u64, l.in_features as u64]);
    }
    for i in MOE_LAYERS {
        let params = model.moe_block(i).unwrap().expert_params();
        shapes.insert(format!("model.language_model.layers.{i}.mlp.experts"), [params, 1]);
    }
    for file in [format!("{stem}.json"), format!("{stem}_lmhead_cost_excluded.json")] {
        let bytes = std::fs::read(fx.join("modelopt_moe").join(&file)).unwrap();
        let mut run = ModelOptRun::from_json(&bytes).unwrap();
        for g in &mut run.groups {
            g.scores = vec![ours[&g.group], 0.0];
        }
        let problem = Problem::from_scores(&run.to_scores(&shapes).unwrap(), &Overrides::default()).unwrap();
        assert_eq!(problem.cost_denominator(), run.cost_denominator, "{file}");
        for t in &run.targets {
            let c = compare(&problem, t.effective_bits_target, &t.recipe)
                .unwrap_or_else(|e| panic!("{file} @ {}: {e:#}", t.effective_bits_target));
            eprintln!(
                "{file:44} {:4}: ours {:.6e} ({:.3} bits, {:2} groups)  ModelOpt recipe {:.6e} ({:.3} bits, {:2} groups)",
                t.effective_bits_target,
                c.ours_objective,
                c.ours_bits,
                c.ours_quantized,
                c.reference_objective,
                c.reference_bits,
                c.reference_quantized
            );
        }
    }
}

/// The same 30 groups by ModelOpt's kl_div method: each group alone fake-quantized (the Linears by
/// `score::kl::GroupQuantTap`, the experts by `Tap::moe_forward`), `Σ KL(P ‖ Q)` over all positions
/// and samples, against `modelopt_moe/autoquant_kl_div.json`.
#[test]
fn all_groups_kl_scores_match_modelopt() {
    struct QuantizeGroup<'a> {
        linears: GroupQuantTap<'a>,
        experts: Option<(usize, &'a ExpertsAmax)>,
    }
    impl Tap for QuantizeGroup<'_> {
        fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
            self.linears.forward(id, linear, x)
        }
        fn moe_forward(&mut self, block: &SparseMoeBlock, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
            match self.experts {
                Some((layer, amax)) if layer == block.layer() => {
                    block.forward_quantized(x, &Fp8PerTensor, amax).map(Some)
                }
                _ => Ok(None),
            }
        }
    }
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(MOE_TINY), DType::F32, &Device::Cpu).unwrap();
    let n = model.layers().len();
    let (input_amax, stats, experts) = calibrate_all(&fx, &model);
    let formats: Vec<Box<dyn Format>> = vec![Box::new(Fp8PerTensor)];
    let skip = vec![false; n];
    let quant = LayerQuant {
        formats: &formats,
        input_amax: &input_amax,
        weight_stats: &stats,
        format_calibration: Vec::new(),
        skip: &skip,
        cached_weights: None,
    };
    let names: Vec<&str> = model.layers().iter().map(|l| l.name.as_str()).collect();
    let groups = GroupingRules::default().group(&names);
    let mut ours: std::collections::BTreeMap<String, f64> = Default::default();
    let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Nothing, trace: false };
    for s in 0..SAMPLES {
        let input = input_from_reference(&reference_moe(&fx, s));
        let base = KlBase::new(&model.forward(&input, &mut NoTap, &opts).unwrap().logits.unwrap()).unwrap();
        let mut kl = |name: String, tap: &mut QuantizeGroup| {
            let logits = model.forward(&input, tap, &opts).unwrap().logits.unwrap();
            *ours.entry(name).or_default() += base.kl_sum(&logits).unwrap().to_scalar::<f64>().unwrap();
        };
        for g in &groups {
            let linears = GroupQuantTap { quant: &quant, members: &g.members, format: 0 };
            kl(g.name.clone(), &mut QuantizeGroup { linears, experts: None });
        }
        for (slot, &i) in MOE_LAYERS.iter().enumerate() {
            let linears = GroupQuantTap { quant: &quant, members: &[], format: 0 };
            let name = format!("model.language_model.layers.{i}.mlp.experts");
            kl(name, &mut QuantizeGroup { linears, experts: Some((i, &experts[slot])) });
        }
    }
    assert_close_to_modelopt(&fx, "autoquant_kl_div.json", &ours);
    search_never_loses_to_modelopt(&fx, &model, "autoquant_kl_div", &ours);
}

/// The 4 reference samples as `preprocess` makes them for the MoE checkpoint (the sizes of the
/// fixtures' ModelOpt runs), in `dir`.
fn moe_inputs(fx: &Path, dir: &Path) -> PathBuf {
    let (db, calib, inputs) = (dir.join("c.db"), dir.join("calib.json"), dir.join("inputs.msgpack"));
    run_ok(
        env!("CARGO_BIN_EXE_calib-extract"),
        &["-q", "--from-coco", s(&fx.join("coco/captions.json")), "--db", s(&db)],
    );
    let query = "SELECT sample_id, image_id, file_name, caption, split FROM samples WHERE image_id <= 4";
    run_ok(
        env!("CARGO_BIN_EXE_calib-extract"),
        &["-q", "--db", s(&db), "--image-root", s(&fx.join("images")), "--query", query, "-o", s(&calib)],
    );
    let model = fx.join(MOE_TINY);
    run_ok(
        env!("CARGO_BIN_EXE_preprocess"),
        &[
            "-q",
            "--calibration",
            s(&calib),
            "--model",
            s(&model),
            "--min-pixels",
            "65536",
            "--max-pixels",
            "262144",
            "-o",
            s(&inputs),
        ],
    );
    inputs
}

fn scores_of(path: &Path) -> qsens::artifact::scores::Scores {
    qsens::artifact::read::<qsens::artifact::scores::Scores>(path).unwrap().payload
}

fn fp8_scores(scores: &qsens::artifact::scores::Scores) -> std::collections::BTreeMap<String, f64> {
    scores.groups.iter().map(|g| (g.name.clone(), g.scores[0])).collect()
}

/// The MoE checkpoint's reference inputs, gradient scores and a manifest searched at 10 bits, in
/// `dir`: (model, inputs, searched manifest).
fn moe_searched(fx: &Path, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let inputs = moe_inputs(fx, dir);
    let model = fx.join(MOE_TINY);
    let scores = dir.join("scores.msgpack");
    run_ok(env!("CARGO_BIN_EXE_score-layers"), &["-q", "--model", s(&model), "--inputs", s(&inputs), "-o", s(&scores)]);
    let searched = dir.join("searched.json");
    run_ok(env!("CARGO_BIN_EXE_search"), &["-q", "--scores", s(&scores), "--effective-bits", "10", "-o", s(&searched)]);
    (model, inputs, searched)
}

/// The modules ModelOpt quantized in `modelopt_moe/export_fp8_<which>` (its `recipe.json`).
fn export_modules(fx: &Path, which: &str) -> std::collections::HashSet<String> {
    let path = fx.join(format!("modelopt_moe/export_fp8_{which}/recipe.json"));
    let recipe: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    recipe["enabled_modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect()
}

/// `score-layers` on the MoE checkpoint, end to end through the binaries, against ModelOpt 0.47:
/// the 30 groups (each sparse layer's experts one group of kind `experts`), every expert's amax
/// within 1e-6 relative and the tokens routed to it, gradient and kl_div scores within the issue's
/// bars, the same costs; then `search` under both cost models: the same cost denominators as
/// ModelOpt and, at every target of its runs, an objective no worse than its recipe's on our
/// scores, within the budget; the recipe exports name the fused experts as each engine does.
#[test]
fn score_layers_and_search_on_the_moe_checkpoint() {
    let fx = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = moe_inputs(&fx, tmp.path());
    let model = fx.join(MOE_TINY);
    let score = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["-q", "--model", s(&model), "--inputs", s(&inputs), "-o", s(&out)];
        args.extend_from_slice(extra);
        run_ok(env!("CARGO_BIN_EXE_score-layers"), &args);
        out
    };
    let modelopt = |file: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fx.join("modelopt_moe").join(file)).unwrap()).unwrap()
    };

    // Gradient: scores, calibration, costs.
    let grad = scores_of(&score("grad.msgpack", &[]));
    assert_close_to_modelopt(&fx, "autoquant_gradient.json", &fp8_scores(&grad));
    let run = modelopt("autoquant_gradient.json");
    let cal = &run["calibrated_amax_per_recipe"]["FP8_DEFAULT_CFG(effective-bits: 8.0)"];
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("reference_moe/index.json")).unwrap()).unwrap();
    let close = |name: String, ours: f64| {
        let theirs = cal[&name].as_f64().unwrap_or_else(|| panic!("{name} not in ModelOpt's calibration"));
        assert!((ours - theirs).abs() <= 1e-6 * theirs, "{name}: ours {ours}, ModelOpt {theirs}");
    };
    let experts: Vec<_> = grad.layers.iter().filter(|l| l.kind == "experts").collect();
    assert_eq!(
        experts.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["model.language_model.layers.0.mlp.experts", "model.language_model.layers.2.mlp.experts"]
    );
    for (l, i) in experts.iter().zip(MOE_LAYERS) {
        let c = l.experts.as_ref().expect("experts calibration");
        assert_eq!((c.num_experts, c.top_k, l.params, l.group.as_str()), (8, 2, 36_864, l.name.as_str()));
        close(format!("{}.gate_up_proj_input_quantizer", l.name), l.input_amax);
        close(format!("{}.down_proj_input_quantizer", l.name), c.down_input_amax);
        for e in 0..8 {
            close(format!("{}.gate_up_proj_weight_quantizers.{e}", l.name), c.gate_up_weight_amax[e]);
            close(format!("{}.down_proj_weight_quantizers.{e}", l.name), c.down_weight_amax[e]);
            let hf: u64 = index["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["expert_token_counts"][i.to_string()][e].as_u64().unwrap())
                .sum();
            assert_eq!(c.tokens_routed[e], hf, "layer {i} expert {e}: tokens routed");
        }
    }
    let costs: std::collections::BTreeMap<&str, &Vec<f64>> =
        grad.groups.iter().map(|g| (g.name.as_str(), &g.costs)).collect();
    for g in run["groups"].as_array().unwrap() {
        let theirs: Vec<f64> = g["costs"].as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).collect();
        assert_eq!(costs[g["group"].as_str().unwrap()], &theirs, "{}: costs", g["group"]);
    }

    // kl_div: each experts group alone fake-quantized, re-forwarded from its decoder layer.
    let kl = scores_of(&score("kl.msgpack", &["--method", "kl_div"]));
    assert_close_to_modelopt(&fx, "autoquant_kl_div.json", &fp8_scores(&kl));

    // search under both cost models, against every target of ModelOpt's runs.
    let active = score("active.msgpack", &["--cost-model", "active_moe", "--exclude-cost", "*lm_head*"]);
    let grad_path = tmp.path().join("grad.msgpack");
    let runs = [
        ("autoquant_gradient.json", &grad_path, None),
        ("autoquant_gradient_lmhead_cost_excluded.json", &grad_path, Some("*lm_head*")),
        ("autoquant_gradient_lmhead_cost_excluded_active_moe.json", &active, None),
    ];
    for (file, scores_path, exclude) in runs {
        let run = modelopt(file);
        let ours = fp8_scores(&scores_of(scores_path));
        for t in run["targets"].as_array().unwrap() {
            let bits = t["effective_bits_target"].as_f64().unwrap();
            let out = tmp.path().join(format!("manifest-{bits}.json"));
            let mut args = vec!["-q".to_string(), "--scores".into(), s(scores_path).into()];
            args.extend(["--effective-bits".into(), bits.to_string(), "-o".into(), s(&out).into()]);
            if let Some(p) = exclude {
                args.extend(["--exclude-cost".into(), p.into()]);
            }
            run_ok(env!("CARGO_BIN_EXE_search"), &args.iter().map(String::as_str).collect::<Vec<_>>());
            let m = qsens::artifact::read::<qsens::artifact::manifest::Manifest>(out.as_path()).unwrap().payload;
            assert_eq!(m.summary.budget.cost_denominator, run["cost_denominator"].as_f64().unwrap(), "{file}");
            let theirs: f64 = t["quantized_groups"].as_array().unwrap().iter().map(|g| ours[g.as_str().unwrap()]).sum();
            eprintln!(
                "{file:58} {bits:4}: ours {:.6e} at {:.3} bits, ModelOpt's recipe {theirs:.6e} at {:.3}",
                m.summary.objective,
                m.summary.achieved_effective_bits,
                t["effective_bits_achieved"].as_f64().unwrap()
            );
            assert!(m.summary.achieved_effective_bits <= bits, "{file} @ {bits}");
            assert!(
                m.summary.objective <= theirs * (1.0 + 1e-12),
                "{file} @ {bits}: {} > {theirs}",
                m.summary.objective
            );
            let weight = m.groups.iter().find(|g| g.name.ends_with("layers.0.mlp.experts")).unwrap().cost_weight;
            assert_eq!(weight, if file.ends_with("active_moe.json") { 0.25 } else { 1.0 }, "{file}");
        }
    }

    // The recipe exports at 8.5 bits of the active_moe run, where ModelOpt quantizes layer 0's
    // experts: ModelOpt's fused-experts quantizer names, a compressed-tensors pattern over the
    // per-expert Linears, llama.cpp's 3-D expert tensors.
    let m =
        qsens::artifact::read::<qsens::artifact::manifest::Manifest>(tmp.path().join("manifest-8.5.json").as_path())
            .unwrap()
            .payload;
    let exports = serde_json::to_value(&m.exports).unwrap();
    let chosen = |name: &str| m.groups.iter().find(|g| g.name == name).unwrap().chosen.clone();
    let layer0 = "model.language_model.layers.0.mlp.experts";
    assert_eq!(chosen(layer0), "FP8");
    let names: Vec<&str> = exports["modelopt"]["quant_cfg"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|q| q["quantizer_name"].as_str().filter(|n| n.starts_with(layer0)))
        .collect();
    assert_eq!(
        names,
        [
            "gate_up_proj_input_quantizer",
            "gate_up_proj_weight_quantizer",
            "down_proj_input_quantizer",
            "down_proj_weight_quantizer"
        ]
        .map(|q| format!("{layer0}.{q}"))
    );
    let pattern = r"re:^model\.language_model\.layers\.0\.mlp\.experts\.\d+\.(gate|up|down)_proj$";
    let ct = &exports["compressed_tensors"];
    let targets: Vec<&str> =
        ct["config_groups"]["group_0"]["targets"].as_array().unwrap().iter().filter_map(|t| t.as_str()).collect();
    assert!(targets.contains(&pattern), "{targets:?}");
    let llama = exports["llama_cpp"]["tensor_types"].to_string();
    for p in ["gate", "up", "down"] {
        assert!(llama.contains(&format!(r"^blk\\.0\\.ffn_{p}_exps\\.weight$=q8_0")), "{p}: {llama}");
    }
}

/// Quantized experts are written in the modelopt layout only: compressed-tensors is refused with
/// one line naming the manifest and the layer. A recipe with every expert 16-bit keeps the
/// released fused tensors, byte for byte.
#[test]
fn compressed_tensors_refuses_quantized_experts() {
    let fx = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = moe_inputs(&fx, tmp.path());
    let model = fx.join(MOE_TINY);
    let scores = tmp.path().join("scores.msgpack");
    run_ok(env!("CARGO_BIN_EXE_score-layers"), &["-q", "--model", s(&model), "--inputs", s(&inputs), "-o", s(&scores)]);
    let manifest = |name: &str, bits: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["-q", "--scores", s(&scores), "--effective-bits", bits, "--exclude-cost", "*lm_head*"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", s(&out)]);
        run_ok(env!("CARGO_BIN_EXE_search"), &args);
        out
    };
    let with_experts = manifest("fp8-experts.json", "8.5", &[]);
    let refused = |bin: &str, args: &[&str], needles: &[&str]| {
        let o = Command::new(bin).args(args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bin}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{bin}: one line: {err}");
        for n in needles {
            assert!(err.contains(n), "`{n}` not in: {err}");
        }
    };
    let out = tmp.path().join("ckpt");
    refused(
        env!("CARGO_BIN_EXE_quantize"),
        &["--model", s(&model), "--manifest", s(&with_experts), "--layout", "compressed-tensors", "-o", s(&out)],
        &["fp8-experts.json", "model.language_model.layers.0.mlp.experts", "--layout modelopt"],
    );
    assert!(!out.exists(), "nothing written");

    let dense_only = manifest("16-bit-experts.json", "12", &["--disable", "*mlp.experts"]);
    run_ok(env!("CARGO_BIN_EXE_quantize"), &["-q", "--model", s(&model), "--manifest", s(&dense_only), "-o", s(&out)]);
    let before = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let after = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for i in MOE_LAYERS {
        for t in ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"] {
            let name = format!("model.language_model.layers.{i}.{t}");
            let (a, b) = (&before[&name], &after[&name]);
            assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()), "{name}");
            let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "{name}");
        }
    }
}

/// `quantize` of the two recipes ModelOpt exported (`modelopt_moe/export_fp8_{text,all}`, both
/// with layer 2's experts in FP8) against that export: the same tensor names, dtypes and shapes
/// (every sparse layer per expert), every FP8 code equal, scales within 1e-6 relative (our
/// calibration's last bits), the unquantized experts the transposed slices of the released fused
/// tensors (computed here with candle), every other tensor the input's, the same
/// `hf_quant_config.json` and `quantization_config` apart from the producer.
#[test]
fn quantize_writes_fp8_experts_as_modelopt_exports_them() {
    let fx = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let (model, inputs, searched) = moe_searched(&fx, tmp.path());
    let json = |p: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let without_producer = |mut v: serde_json::Value| {
        v.as_object_mut().unwrap().remove("producer");
        v
    };
    let input = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    for which in ["text", "all"] {
        let theirs_dir = fx.join(format!("modelopt_moe/export_fp8_{which}"));
        let modules = export_modules(&fx, which);
        assert!(modules.contains("model.language_model.layers.2.mlp.experts"));
        let manifest = tmp.path().join(format!("manifest-{which}.json"));
        common::pipeline::manifest_with(&searched, &modules, &manifest);
        let out = tmp.path().join(format!("ckpt-{which}"));
        let mut args =
            vec!["-q", "--model", s(&model), "--manifest", s(&manifest), "--layout", "modelopt", "-o", s(&out)];
        if which == "all" {
            args.push("--skip-vllm-checks");
        }
        run_ok(env!("CARGO_BIN_EXE_quantize"), &args);

        let ours_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let ours = safetensors::SafeTensors::deserialize(&ours_bytes).unwrap();
        let listing = json(&theirs_dir.join("export_listing.json"));
        let listing = listing.as_object().unwrap();
        let mut names: Vec<String> = ours.names().into_iter().map(String::from).collect();
        names.sort();
        assert_eq!(names, listing.keys().cloned().collect::<Vec<_>>(), "{which}: tensor names");
        let theirs_bytes = std::fs::read(theirs_dir.join("quantized_tensors.safetensors")).unwrap();
        let theirs = safetensors::SafeTensors::deserialize(&theirs_bytes).unwrap();
        let input_bytes = std::fs::read(model.join("model.safetensors")).unwrap();
        let input_st = safetensors::SafeTensors::deserialize(&input_bytes).unwrap();
        let (mut codes, mut split, mut worst) = (0usize, 0usize, 0f64);
        for name in &names {
            let t = ours.tensor(name).unwrap();
            let want_dtype = listing[name]["dtype"].as_str().unwrap();
            let dtype = match t.dtype() {
                safetensors::Dtype::F32 => "float32",
                safetensors::Dtype::F8_E4M3 => "float8_e4m3fn",
                _ => "other",
            };
            assert_eq!(dtype, want_dtype, "{which}: {name} dtype");
            let shape: Vec<usize> =
                listing[name]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape(), shape.as_slice(), "{which}: {name} shape");
            match theirs.tensor(name) {
                Ok(r) if t.dtype() == safetensors::Dtype::F8_E4M3 => {
                    codes += t.data().len();
                    assert_eq!(t.data(), r.data(), "{which}: {name}: FP8 codes");
                }
                Ok(r) => {
                    let f = |v: &safetensors::tensor::TensorView| f32::from_le_bytes(v.data()[..4].try_into().unwrap());
                    let (a, b) = (f(&t) as f64, f(&r) as f64);
                    worst = worst.max((a - b).abs() / b.abs());
                    assert!((a - b).abs() <= 1e-6 * b.abs(), "{which}: {name}: {a:e} vs ModelOpt {b:e}");
                }
                Err(_) => match input_st.tensor(name) {
                    Ok(i) => assert_eq!(t.data(), i.data(), "{which}: {name} differs from the input"),
                    Err(_) => {
                        // An unquantized expert: model.language_model.layers.N.mlp.experts.E.P.weight
                        let parts: Vec<&str> = name.split('.').collect();
                        let (layer, e, proj) = (parts[3], parts[6].parse::<usize>().unwrap(), parts[7]);
                        let fused = |t: &str| {
                            input[&format!("model.language_model.layers.{layer}.mlp.experts.{t}")].get(e).unwrap()
                        };
                        let want = match proj {
                            "gate_proj" => fused("gate_up_proj").narrow(1, 0, 48).unwrap(),
                            "up_proj" => fused("gate_up_proj").narrow(1, 48, 48).unwrap(),
                            _ => fused("down_proj"),
                        };
                        let want: Vec<f32> = want.t().unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        let got: Vec<f32> =
                            t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                        assert_eq!(got, want, "{which}: {name}");
                        split += 1;
                    }
                },
            }
        }
        eprintln!("export_fp8_{which}: {} tensors, {codes} FP8 codes equal, {split} unquantized expert tensors, scales within {worst:.1e}", names.len());
        assert_eq!(split, 8 * 3, "{which}: layer 0's experts written per expert");
        assert_eq!(
            without_producer(json(&out.join("hf_quant_config.json"))),
            without_producer(json(&theirs_dir.join("hf_quant_config.json"))),
            "{which}: hf_quant_config.json"
        );
        assert_eq!(
            without_producer(json(&out.join("config.json"))["quantization_config"].clone()),
            without_producer(json(&theirs_dir.join("config.json"))["quantization_config"].clone()),
            "{which}: quantization_config"
        );
        // evaluate does not read this layout back: one line, pointing at the manifest.
        let o = Command::new(env!("CARGO_BIN_EXE_evaluate"))
            .args([
                "--model",
                s(&model),
                "--checkpoint",
                s(&out),
                "--inputs",
                s(&inputs),
                "-o",
                s(&tmp.path().join("e")),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("stored per expert") && err.contains("manifest"), "{err}");
    }
}

/// The report's expert view: calibrated on one sample, expert 4 of layer 0 gets no token (HF's
/// routing counts for that sample say so too); the report names it, and its heat map is a
/// well-formed SVG with one cell per (sparse layer, expert) and one cross, on that cell.
#[test]
fn report_shows_routing_and_flags_unreached_experts() {
    let fx = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = moe_inputs(&fx, tmp.path());
    let model = fx.join(MOE_TINY);
    let (scores, manifest, report) =
        (tmp.path().join("s.msgpack"), tmp.path().join("m.json"), tmp.path().join("report.md"));
    run_ok(
        env!("CARGO_BIN_EXE_score-layers"),
        &["-q", "--model", s(&model), "--inputs", s(&inputs), "--calib-samples", "1", "-o", s(&scores)],
    );
    let routed = scores_of(&scores).layers.iter().find(|l| l.kind == "experts").unwrap().experts.clone().unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("reference_moe/index.json")).unwrap()).unwrap();
    let hf: Vec<u64> = (0..8).map(|e| index["samples"][0]["expert_token_counts"]["0"][e].as_u64().unwrap()).collect();
    assert_eq!(routed.tokens_routed, hf, "layer 0, calibrated on sample 0");
    assert_eq!(hf[4], 0, "expert 4 of layer 0 gets no token of sample 0");
    run_ok(env!("CARGO_BIN_EXE_search"), &["-q", "--scores", s(&scores), "--effective-bits", "12", "-o", s(&manifest)]);
    run_ok(env!("CARGO_BIN_EXE_manifest-to-md"), &["-q", "--manifest", s(&manifest), "-o", s(&report)]);
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.contains("## Routed experts"), "{md}");
    assert!(md.contains("**1 expert was never reached by a calibration token**"), "{md}");
    let row = md.lines().find(|l| l.starts_with("| `model.language_model.layers.0.mlp.experts`")).unwrap();
    assert!(row.ends_with("| 4 |"), "{row}");
    assert!(md.contains("](report-experts.svg)"), "{md}");
    let svg = std::fs::read_to_string(tmp.path().join("report-experts.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let cells: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("rect") && n.has_children()).collect();
    assert_eq!(cells.len(), 2 * 8, "one cell per sparse layer and expert");
    let crosses = doc.descendants().filter(|n| n.has_tag_name("path")).count();
    assert_eq!(crosses, 1);
    let title = |n: &roxmltree::Node| {
        n.children().find(|c| c.has_tag_name("title")).and_then(|t| t.text()).unwrap().to_string()
    };
    assert_eq!(title(&cells[4]), "layer 0 expert 4: 0 pairs");
}

/// `evaluate` on the MoE checkpoint with ModelOpt's exported `text` recipe (layer 2's experts in
/// FP8 with 9 Linear layers), as scored and as served, against `fake_quant_loss_per_sample` (HF's
/// loss with exactly those modules fake-quantized by ModelOpt, `modelopt_moe/export_fp8_text`).
/// Quantization moves these losses by 6e-5 to 1.1e-3 relative from the unquantized model's; ours
/// must reproduce that move to within 3 % on every sample (the residual, 4.6e-8 to 1.7e-5
/// relative, is not traced here; on the dense model the like residual was E4M3 ties that our and
/// torch's sums round to different sides, docs/quantize.md), and the recipe's
/// served experts must count: the experts group is FP8 in the result, and the bits follow.
#[test]
fn evaluate_measures_fp8_experts_as_modelopt_fake_quantizes_them() {
    let fx = fixtures_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let (model, inputs, searched) = moe_searched(&fx, tmp.path());
    let json = |p: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let recipe = json(&fx.join("modelopt_moe/export_fp8_text/recipe.json"));
    let modules = export_modules(&fx, "text");
    let theirs: Vec<f64> =
        recipe["fake_quant_loss_per_sample"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let unquantized: Vec<f64> = json(&fx.join("modelopt_moe/autoquant_gradient.json"))["unquantized_loss_per_sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let manifest = tmp.path().join("manifest-text.json");
    common::pipeline::manifest_with(&searched, &modules, &manifest);
    for as_scored in [true, false] {
        let out = tmp.path().join(format!("evaluation-{as_scored}.json"));
        let mut args =
            vec!["-q", "--model", s(&model), "--manifest", s(&manifest), "--inputs", s(&inputs), "-o", s(&out)];
        if as_scored {
            args.push("--as-scored");
        }
        run_ok(env!("CARGO_BIN_EXE_evaluate"), &args);
        let e = json(&out);
        let chosen = e["payload"]["recipes"].as_array().unwrap().iter().find(|r| r["kind"] == "chosen").unwrap();
        let quantized: Vec<&str> =
            chosen["quantized_layers"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
        assert!(quantized.contains(&"model.language_model.layers.2.mlp.experts"), "{quantized:?}");
        assert_eq!(quantized.len(), modules.len());
        for (k, sample) in chosen["per_sample"].as_array().unwrap().iter().enumerate() {
            let ours = sample["nll_sum"].as_f64().unwrap() / sample["label_tokens"].as_f64().unwrap();
            let moved = (theirs[k] - unquantized[k]).abs();
            eprintln!(
                "as scored {as_scored}: sample {k}: ours {ours:.7}, ModelOpt {:.7} ({:.1e} relative), quantization moved it {:.1e}",
                theirs[k],
                (ours - theirs[k]).abs() / theirs[k],
                moved / unquantized[k]
            );
            assert!((ours - theirs[k]).abs() <= 0.03 * moved, "sample {k}: {ours} vs {}", theirs[k]);
        }
    }
}
