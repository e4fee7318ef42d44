//! Qwen3-VL forward (f32, CPU) against HF transformers outputs on the tiny checkpoint
//! (`fixtures/reference/`, made by HF 5.24 with sdpa attention; see fixtures/README.md).
//!
//! Every intermediate the reference stores must be within 1e-5 relative error (‖Δ‖/‖ref‖) and
//! 1e-4 max absolute error.

mod common;

use candle_core::{DType, Device, Tensor};
use qsens::model::qwen3_vl::{ForwardOptions, Keep, LogitsMode, Qwen3VL};
use qsens::model::NoTap;

use common::qwen::{errors, input_from_reference, label_token_nll, reference, SAMPLES, TINY};

const REL: f64 = 1e-5;
const ABS: f64 = 1e-4;

#[test]
fn tiny_matches_hf_reference_f32() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(TINY), DType::F32, &Device::Cpu).unwrap();
    let cfg = model.config().clone();
    let mut failures = Vec::new();
    let mut worst: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for k in 0..SAMPLES {
        let r = reference(&fx, k);
        let input = input_from_reference(&r);
        let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Nothing, trace: true };
        let fwd = model.forward(&input, &mut NoTap, &opts).unwrap();
        let mut check = |name: &str, ours: &Tensor, theirs: &Tensor| {
            let theirs = theirs.reshape(ours.shape()).unwrap();
            let (rel, abs) = errors(ours, &theirs);
            let key = name.split('#').next().unwrap().to_string();
            let w = worst.entry(key).or_insert((0.0, 0.0));
            w.0 = w.0.max(rel);
            w.1 = w.1.max(abs);
            eprintln!("sample {k} {name:24} rel {rel:.2e} abs {abs:.2e}");
            if !(rel <= REL && abs <= ABS) {
                failures.push(format!("sample {k} {name}: rel {rel:.3e} abs {abs:.3e}"));
            }
        };
        let tr = &fwd.trace;
        let mut names = vec!["vision_patch_embed".to_string(), "vision_block_in_0".to_string()];
        names.extend((0..cfg.vision_config.depth - 1).map(|i| format!("vision_block_out_{i}")));
        names.extend(["vision_last_hidden".to_string(), "image_embeds".to_string()]);
        names.extend((0..cfg.vision_config.deepstack_visual_indexes.len()).map(|i| format!("deepstack_{i}")));
        names.extend((0..cfg.text_config.num_hidden_layers).map(|i| format!("text_layer_in_{i}")));
        names.extend(["text_final_norm_in".to_string(), "text_final_hidden".to_string()]);
        for name in &names {
            let ours = tr.get(name).unwrap_or_else(|| panic!("trace lacks {name}"));
            check(name, ours, &r[name]);
        }
        // Logits: the stored columns and the per-position log-sum-exp over the full vocabulary.
        let logits = fwd.logits.as_ref().unwrap();
        let cols = r["logit_col_ids"].to_dtype(DType::U32).unwrap();
        check("logits_cols", &logits.index_select(&cols, 1).unwrap(), &r["logits_cols"]);
        let lse = logits.log_sum_exp(1).unwrap();
        check("logsumexp", &lse, &r["logsumexp"]);
        // Per-label NLL (row t−1 predicts labels[t]) and the mean loss.
        let nll = label_token_nll(logits, &lse, input.labels.as_ref().unwrap());
        check("label_token_nll", &nll, &r["label_token_nll"]);
        let loss = Tensor::new(fwd.loss.unwrap(), &Device::Cpu).unwrap();
        check("loss", &loss, &r["loss"]);
    }
    eprintln!("worst over samples (rel, abs):");
    for (k, (rel, abs)) in &worst {
        eprintln!("  {k:24} {rel:.2e} {abs:.2e}");
    }
    assert!(failures.is_empty(), "out of tolerance:\n{}", failures.join("\n"));
}

#[test]
fn tiny_structure_matches_modelopt_layer_list() {
    let fx = fixtures_or_skip!();
    let model = Qwen3VL::load(&fx.join(TINY), DType::F32, &Device::Cpu).unwrap();
    // HF counts the tied lm_head once: 10,023,744 (fixtures/README.md).
    assert_eq!(model.num_parameters(), 10_023_744);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("modelopt/autoquant_gradient.json")).unwrap()).unwrap();
    let modules: Vec<String> = json["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(modules.len(), 41);
    let names: Vec<&str> = model.layers().iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, modules.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    // ModelOpt's FP8 cost is the weight count; check ours against its NONE costs (16 bits → 1·numel).
    for g in json["groups"].as_array().unwrap() {
        let cost: f64 = g["uncompressed_cost"].as_f64().unwrap();
        let ours: u64 = g["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| model.layers()[model.layer_id(m.as_str().unwrap()).unwrap()].params())
            .sum();
        assert_eq!(ours as f64, cost, "{}", g["group"]);
    }
    assert_eq!(model.layers(), qsens::model::qwen3_vl::expected_layers(model.config()).as_slice());
}
