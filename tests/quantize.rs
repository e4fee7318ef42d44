//! `quantize` (issue 10) against ModelOpt 0.47's own FP8 export of the fixture checkpoint
//! (`shared/fixtures/modelopt/export_fp8_{text,all}`): same tensors, same FP8 bytes, same scales,
//! same quantization config; our checkpoints load back and reproduce ModelOpt's fake-quant loss;
//! bad input is refused with one line and nothing written.
//!
//! The manifests are made by the pipeline itself (calib-extract → preprocess → score-layers →
//! search on the 4 reference samples, as the fixture's calibration), then given the fixture
//! recipes' formats, so amax and provenance are the real ones.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device};
use qsens::artifact::manifest::Manifest;
use qsens::artifact::{self, Artifact};
use qsens::model::loader::Checkpoint;
use qsens::model::qwen3_vl::{ForwardOptions, Keep, LogitsMode, Qwen3VL};
use qsens::model::LayerKind;
use qsens::quant::fp8;
use qsens::quant::served::{self, DequantizedWeights, RecipeLayer, ServedTap};
use qsens::quant::WeightStats;
use safetensors::SafeTensors;
use serde_json::Value;

use common::pipeline::{recipe, run, s, Pipeline};

fn quantize(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_quantize"), args)
}

fn setup(fx: &Path) -> &'static Pipeline {
    common::pipeline::shared(fx)
}

fn read_manifest(path: &Path) -> Artifact<Manifest> {
    artifact::read(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

fn manifest_with(setup: &Pipeline, modules: &HashSet<String>, name: &str) -> PathBuf {
    setup.manifest_with(modules, name)
}

fn fixture_manifest(fx: &Path, which: &str) -> PathBuf {
    setup(fx).fixture_manifest(fx, which)
}

/// `quantize` into a fresh directory; returns it.
fn quantize_ok(fx: &Path, manifest: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let st = setup(fx);
    let out = st.dir.path().join(name);
    let mut args = vec!["-q", "--model", s(&st.model), "--manifest", s(manifest), "-o", s(&out), "--force"];
    args.extend_from_slice(extra);
    let o = quantize(&args);
    assert!(o.status.success(), "quantize {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    out
}

fn dtype_name(d: safetensors::Dtype) -> &'static str {
    match d {
        safetensors::Dtype::F32 => "float32",
        safetensors::Dtype::F8_E4M3 => "float8_e4m3fn",
        safetensors::Dtype::BF16 => "bfloat16",
        safetensors::Dtype::U8 => "uint8",
        _ => "other",
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// `v` without its `producer` key (the one place ours and ModelOpt's legitimately differ).
fn without_producer(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("producer");
    v
}

fn f32_of(view: &safetensors::tensor::TensorView) -> f32 {
    f32::from_le_bytes(view.data()[..4].try_into().unwrap())
}

fn check_modelopt_parity(which: &str) {
    let fx = fixtures_or_skip!();
    let manifest = fixture_manifest(&fx, which);
    let mut extra = vec!["--layout", "modelopt"];
    if which == "all" {
        extra.push("--skip-vllm-checks");
    }
    let out = quantize_ok(&fx, &manifest, &format!("modelopt-{which}"), &extra);
    let theirs_dir = fx.join(format!("modelopt/export_fp8_{which}"));

    // Tensor names, dtypes and shapes: those of ModelOpt's export.
    let ours_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let listing = json(&theirs_dir.join("export_listing.json"));
    let listing = listing.as_object().unwrap();
    let mut our_names: Vec<String> = ours.names().into_iter().map(String::from).collect();
    our_names.sort();
    let their_names: Vec<String> = listing.keys().cloned().collect();
    assert_eq!(our_names, their_names, "tensor names");
    for (name, entry) in listing {
        let t = ours.tensor(name).unwrap();
        assert_eq!(dtype_name(t.dtype()), entry["dtype"].as_str().unwrap(), "{name} dtype");
        let shape: Vec<usize> =
            entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape(), shape.as_slice(), "{name} shape");
    }

    // FP8 bytes and scales against ModelOpt's, every other tensor against the input checkpoint.
    let theirs_bytes = std::fs::read(theirs_dir.join("quantized_tensors.safetensors")).unwrap();
    let theirs = SafeTensors::deserialize(&theirs_bytes).unwrap();
    let input_bytes = std::fs::read(fx.join("qwen3-vl-tiny/model.safetensors")).unwrap();
    let input = SafeTensors::deserialize(&input_bytes).unwrap();
    let (mut codes, mut differing, mut worst_scale) = (0usize, 0usize, 0f64);
    for name in &our_names {
        let t = ours.tensor(name).unwrap();
        match theirs.tensor(name) {
            Ok(r) if t.dtype() == safetensors::Dtype::F8_E4M3 => {
                codes += t.data().len();
                for (a, b) in t.data().iter().zip(r.data()) {
                    if a != b {
                        differing += 1;
                        // Only a last-bit amax difference could move a code, and by one step.
                        assert!((*a as i32 - *b as i32).abs() <= 1, "{name}: codes {a:#04x} vs {b:#04x}");
                    }
                }
            }
            Ok(r) => {
                let (a, b) = (f32_of(&t) as f64, f32_of(&r) as f64);
                let rel = (a - b).abs() / b.abs();
                worst_scale = worst_scale.max(rel);
                assert!(rel <= 1e-6, "{name}: {a:e} vs ModelOpt {b:e} ({rel:e} relative)");
            }
            Err(_) => assert_eq!(t.data(), input.tensor(name).unwrap().data(), "{name} differs from the input"),
        }
    }
    eprintln!(
        "export_fp8_{which}: {} tensors, {codes} FP8 codes, {differing} differ from ModelOpt's; scales within {worst_scale:.2e} relative",
        our_names.len()
    );
    assert!(codes > 0);
    assert_eq!(differing, 0, "FP8 codes differing from ModelOpt's");

    // The quantization configs, apart from the producer.
    let ours_hf = json(&out.join("hf_quant_config.json"));
    assert_eq!(ours_hf["producer"]["name"], "qsens");
    assert_eq!(without_producer(ours_hf), without_producer(json(&theirs_dir.join("hf_quant_config.json"))));
    let ours_qc = json(&out.join("config.json"))["quantization_config"].clone();
    let theirs_qc = json(&theirs_dir.join("config.json"))["quantization_config"].clone();
    assert_eq!(without_producer(ours_qc), without_producer(theirs_qc));

    // config.json is the input's plus quantization_config; the other files are copied unchanged.
    let mut config = json(&out.join("config.json"));
    config.as_object_mut().unwrap().remove("quantization_config");
    assert_eq!(config, json(&fx.join("qwen3-vl-tiny/config.json")));
    for f in ["tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fx.join("qwen3-vl-tiny").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn modelopt_layout_equals_modelopt_export_text() {
    check_modelopt_parity("text");
}

#[test]
fn modelopt_layout_equals_modelopt_export_all() {
    check_modelopt_parity("all");
}

/// Issue 12: a mixed NVFP4 / W4A16_NVFP4 / FP8 recipe written as ModelOpt 0.47's exporter writes
/// it (`tests/data/modelopt_export_nvfp4/`, made on an H200 by
/// `scripts/reference/modelopt_export_nvfp4.py`): same tensors, the same packed E2M1 codes, E4M3
/// block scales and FP8 codes, the same per-tensor scales, the same MIXED_PRECISION config.
#[test]
fn nvfp4_mixed_recipe_equals_modelopt_export() {
    let fx = fixtures_or_skip!();
    let theirs_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/modelopt_export_nvfp4");
    let recipe = json(&theirs_dir.join("recipe.json"));
    let choice: HashMap<String, String> = recipe["modules"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let manifest =
        setup(&fx).manifest_with_formats(&["NVFP4", "W4A16_NVFP4", "FP8"], &choice, "manifest-nvfp4-mixed.json");
    // The default layout is ModelOpt's: vLLM's MIXED_PRECISION loader quantizes vision layers too.
    let out = quantize_ok(&fx, &manifest, "modelopt-nvfp4-mixed", &[]);

    let ours_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let listing = json(&theirs_dir.join("export_listing.json"));
    let listing = listing.as_object().unwrap();
    let mut our_names: Vec<String> = ours.names().into_iter().map(String::from).collect();
    our_names.sort();
    assert_eq!(our_names, listing.keys().cloned().collect::<Vec<_>>(), "tensor names");
    for (name, entry) in listing {
        let t = ours.tensor(name).unwrap();
        assert_eq!(dtype_name(t.dtype()), entry["dtype"].as_str().unwrap(), "{name} dtype");
        let shape: Vec<usize> =
            entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape(), shape.as_slice(), "{name} shape");
    }

    let theirs_bytes = std::fs::read(theirs_dir.join("quantized_tensors.safetensors")).unwrap();
    let theirs = SafeTensors::deserialize(&theirs_bytes).unwrap();
    let input_bytes = std::fs::read(fx.join("qwen3-vl-tiny/model.safetensors")).unwrap();
    let input = SafeTensors::deserialize(&input_bytes).unwrap();
    let (mut bytes, mut differing, mut scales, mut exact_scales, mut worst_scale) = (0usize, 0usize, 0, 0, 0f64);
    for name in &our_names {
        let t = ours.tensor(name).unwrap();
        let Ok(r) = theirs.tensor(name) else {
            assert_eq!(t.data(), input.tensor(name).unwrap().data(), "{name} differs from the input");
            continue;
        };
        if t.shape().is_empty() {
            let (a, b) = (f32_of(&t), f32_of(&r));
            let rel = (a as f64 - b as f64).abs() / (b as f64).abs();
            scales += 1;
            exact_scales += usize::from(a == b);
            worst_scale = worst_scale.max(rel);
            assert!(rel <= 1e-6, "{name}: {a:e} vs ModelOpt {b:e} ({rel:e} relative)");
            // NVFP4's global weight scale depends on the weights alone, through GPU arithmetic
            // qsens follows: bit for bit.
            if name.ends_with(".weight_scale_2") {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}: {a:e} vs ModelOpt {b:e}");
            }
        } else {
            bytes += t.data().len();
            let d = t.data().iter().zip(r.data()).filter(|(a, b)| a != b).count();
            differing += d;
            assert_eq!(d, 0, "{name}: {d} of {} bytes differ from ModelOpt's", t.data().len());
        }
    }
    eprintln!(
        "modelopt_export_nvfp4: {} tensors; {bytes} bytes of E2M1 codes, E4M3 block scales and FP8 codes, {differing} \
         differ from ModelOpt's; {scales} per-tensor scales, {exact_scales} bit-identical, the rest within \
         {worst_scale:.2e} relative",
        our_names.len()
    );
    assert!(bytes > 0);

    let ours_hf = json(&out.join("hf_quant_config.json"));
    assert_eq!(without_producer(ours_hf), without_producer(json(&theirs_dir.join("hf_quant_config.json"))));
    let ours_qc = json(&out.join("config.json"))["quantization_config"].clone();
    let theirs_qc = json(&theirs_dir.join("config.json"))["quantization_config"].clone();
    assert_eq!(without_producer(ours_qc), without_producer(theirs_qc));

    // Read back (NVFP4 weights decoded, inputs quantized with their static scales), the
    // checkpoint computes its manifest's served plan exactly. ModelOpt's fake-quant losses are
    // printed: they were taken before export (each fused shard with its own amax, weights
    // fake-quantized by ModelOpt's kernel rather than its exporter's arithmetic), and this tiny
    // model's loss moves with single rounding flips (see the FP8 round trip below).
    let planned = planned_losses(&fx, &manifest);
    let got = served_losses(&fx, &out);
    let modelopt = recipe["fake_quant_loss_per_sample"].as_array().unwrap();
    for (k, (g, p)) in got.iter().zip(&planned).enumerate() {
        let e = modelopt[k].as_f64().unwrap();
        eprintln!(
            "nvfp4 mixed sample {k}: loss {g:.7}; ModelOpt fake quant {e:.7} ({:.1e} relative)",
            (g - e).abs() / e
        );
        assert_eq!(g, p, "sample {k}: checkpoint {g} vs served plan {p}");
    }
}

/// Loss per reference sample of the served checkpoint in `dir`, loaded as qsens loads it: FP8
/// weights dequantized with their scales, static input scales applied by the tap.
fn served_losses(fx: &Path, dir: &Path) -> Vec<f64> {
    let model = Qwen3VL::load(dir, DType::F32, &Device::Cpu).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    let (_, mut tap) = served::from_checkpoint(&model, &ck).unwrap();
    assert!(tap.num_quantized_inputs() > 0);
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Nothing, trace: false };
    (0..common::qwen::SAMPLES)
        .map(|k| {
            let input = common::qwen::input_from_reference(&common::qwen::reference(fx, k));
            model.forward(&input, &mut tap, &opts).unwrap().loss.unwrap() as f64
        })
        .collect()
}

/// Loss per reference sample of the unquantized fixture model run as the plan of `manifest` serves
/// it (weights fake-quantized with the writer's arithmetic): what `evaluate` measures.
fn planned_losses(fx: &Path, manifest: &Path) -> Vec<f64> {
    let model = Qwen3VL::load(&fx.join("qwen3-vl-tiny"), DType::F32, &Device::Cpu).unwrap();
    let m = read_manifest(manifest).payload;
    let layers: Vec<RecipeLayer> = m
        .layers
        .iter()
        .map(|l| {
            let id = model.layer_id(&l.name).unwrap();
            RecipeLayer {
                name: l.name.clone(),
                kind: if l.kind == "patch_embed" { LayerKind::PatchEmbed } else { LayerKind::Linear },
                format: l.chosen.clone(),
                input_amax: l.input_amax as f32,
                weight_amax: WeightStats::of(model.linear(id).weight()).unwrap().amax,
            }
        })
        .collect();
    let plan = served::plan(&layers, true, false).unwrap();
    let mut tap = ServedTap::from_plan(&plan, &model, &mut DequantizedWeights::default()).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Nothing, trace: false };
    (0..common::qwen::SAMPLES)
        .map(|k| {
            let input = common::qwen::input_from_reference(&common::qwen::reference(fx, k));
            model.forward(&input, &mut tap, &opts).unwrap().loss.unwrap() as f64
        })
        .collect()
}

/// Our checkpoints, read back (FP8 weights dequantized, static input scales applied), compute
/// exactly the served plan of their manifest, in both layouts.
///
/// Against `recipe.json`'s ModelOpt fake-quant losses the figures are printed, not asserted to
/// 1e-5: that loss moves by ~1e-4 when the quantized layers' inputs move by one part in 10⁷ (a few
/// activations cross an E4M3 rounding boundary), and our activations agree with HF's to ~1e-7,
/// not bit for bit. `scripts/check_fake_quant_hf.py` shows the recipe itself is understood: HF
/// with ModelOpt's arithmetic in forward hooks reproduces `recipe.json` exactly
/// (docs/quantize.md, "Round trip").
#[test]
fn both_layouts_load_back_and_compute_the_served_plan() {
    let fx = fixtures_or_skip!();
    for which in ["text", "all"] {
        let (_, modelopt) = recipe(&fx, which);
        let manifest = fixture_manifest(&fx, which);
        let planned = planned_losses(&fx, &manifest);
        for layout in ["modelopt", "compressed-tensors"] {
            let out = quantize_ok(
                &fx,
                &manifest,
                &format!("rt-{which}-{layout}"),
                &["--layout", layout, "--skip-vllm-checks"],
            );
            let got = served_losses(&fx, &out);
            for (k, ((g, p), e)) in got.iter().zip(&planned).zip(&modelopt).enumerate() {
                eprintln!(
                    "{which} {layout} sample {k}: loss {g:.7}; ModelOpt fake quant {e:.7} ({:.1e} relative)",
                    (g - e).abs() / e.abs()
                );
                assert_eq!(g, p, "{which} {layout} sample {k}: checkpoint {g} vs served plan {p}");
            }
        }
    }
}

/// HF transformers + compressed-tensors 0.20 loaded our compressed-tensors checkpoint of a
/// fixture recipe (`scripts/check_compressed_tensors.py`, output committed in tests/data): it
/// found every FP8 layer, decompressed them and quantizes their inputs; its logits are compared
/// with our dequantized forward's. `weights_sha256` pins the tensors that depend on the weights
/// alone (the FP8 weights and weight scales, the copied tensors); the input scales come from
/// calibrated activations, whose last bits follow the CPU's matmul kernels (AVX2 and AVX-512 sum
/// in different orders), so they are only required to be there, one per FP8 layer. Returns the
/// worst relative difference of the logits, of the log-sum-exp and of the loss over the samples.
fn hf_compressed_tensors_against_ours(
    which: &str,
    reference: &str,
    weights_sha256: &str,
    fp8_layers: usize,
) -> Option<(f64, f64, f64)> {
    let fx = common::fixtures()?;
    let manifest = fixture_manifest(&fx, which);
    let out = quantize_ok(&fx, &manifest, &format!("ct-hf-{which}"), &["--layout", "compressed-tensors"]);
    let reference = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(reference);
    let bytes = std::fs::read(&reference).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let ours = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&ours).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut input_scales = 0;
    for name in &names {
        if name.ends_with(".input_scale") {
            input_scales += 1;
            continue;
        }
        let t = st.tensor(name).unwrap();
        sha2::Digest::update(&mut hasher, format!("{name} {:?} {:?}\n", t.dtype(), t.shape()).as_bytes());
        sha2::Digest::update(&mut hasher, t.data());
    }
    assert_eq!(hex::encode(sha2::Digest::finalize(hasher)), weights_sha256, "{which}");
    assert_eq!(input_scales, fp8_layers);
    assert_eq!(meta["quantizes_inputs"], "true");
    assert_eq!(meta["fp8_modules"], fp8_layers.to_string());
    assert_eq!(meta["weight_dtypes"], "torch.float8_e4m3fn");
    let hf = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    let cols = hf["logit_col_ids"].to_dtype(DType::U32).unwrap();

    let model = Qwen3VL::load(&out, DType::F32, &Device::Cpu).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let (_, mut tap) = served::from_checkpoint(&model, &ck).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Nothing, trace: false };
    let (mut worst, mut worst_lse, mut worst_loss) = (0f64, 0f64, 0f64);
    for (k, name) in meta["samples"].split(',').enumerate() {
        let index: usize = name.trim_start_matches("sample_").trim_end_matches(".safetensors").parse().unwrap();
        let input = common::qwen::input_from_reference(&common::qwen::reference(&fx, index));
        let fwd = model.forward(&input, &mut tap, &opts).unwrap();
        let loss = fwd.loss.unwrap() as f64;
        let hf_loss = hf[&format!("s{k}.loss")].to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let rel_loss = (loss - hf_loss).abs() / hf_loss;
        let logits = fwd.logits.unwrap();
        let ours_cols = logits.index_select(&cols, 1).unwrap();
        let lse = logits.exp().unwrap().sum(1).unwrap().log().unwrap();
        let (rel, max) = common::qwen::errors(&ours_cols, &hf[&format!("s{k}.logits_cols")]);
        let (rel_lse, _) = common::qwen::errors(&lse, &hf[&format!("s{k}.logsumexp")]);
        eprintln!(
            "{which} sample {index}: logits {rel:.2e} relative (max |Δ| {max:.2e}), logsumexp {rel_lse:.2e}, \
             loss {loss:.7} vs HF {hf_loss:.7} ({rel_loss:.1e})"
        );
        assert!(rel.is_finite() && rel_lse.is_finite() && rel_loss.is_finite());
        worst = worst.max(rel);
        worst_lse = worst_lse.max(rel_lse);
        worst_loss = worst_loss.max(rel_loss);
    }
    Some((worst, worst_lse, worst_loss))
}

/// Issue 10, acceptance 3, on the `text` recipe (12 FP8 layers; reference made on the CPU build
/// machine with torch 2.11, transformers 5.17, compressed-tensors 0.20). HF found and decompressed
/// the 12 FP8 layers and quantizes their inputs (asserted above). The figures are printed, not
/// asserted to 1e-5: samples 0, 2 and 3 give HF's loss within 8e-8 and the log-sum-exp of every
/// position within 5e-8, sample 1 differs by 2.1e-5 in the loss (4e-3 in some logits): one E4M3
/// rounding of an activation falls the other way in HF's run (ModelOpt's own fake-quant loss of
/// that sample, 12.5457878, is ours within 1e-7), as on the `all` recipe below (docs/quantize.md).
#[test]
fn hf_compressed_tensors_logits_of_the_text_recipe() {
    hf_compressed_tensors_against_ours(
        "text",
        "hf_compressed_tensors_text.safetensors",
        "8c890ca411c4637c49b385e58a9d80906438863b83dc8037afcf0e58bf0cd6d0",
        12,
    );
}

/// The `all` recipe (30 FP8 layers, 18 of them vision; reference made on the GPU machine): printed,
/// not asserted to 1e-5: one flipped E4M3 rounding of an activation (ours and torch's agree to
/// ~1e-6 in the vision tower, not bit for bit) moves this tiny random model's logits by far more
/// (docs/quantize.md).
#[test]
fn hf_compressed_tensors_logits_of_the_all_recipe() {
    hf_compressed_tensors_against_ours(
        "all",
        "hf_compressed_tensors.safetensors",
        "3a112be49c63682643a437865c96bd09ca08e1bc6e84fa644d410321df153c82",
        30,
    );
}

#[test]
fn compressed_tensors_layout_ignores_every_unquantized_linear() {
    let fx = fixtures_or_skip!();
    let (modules, _) = recipe(&fx, "all");
    let manifest = fixture_manifest(&fx, "all");
    let out = quantize_ok(&fx, &manifest, "ct-all", &[]);
    let config = json(&out.join("config.json"));
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "float-quantized");
    assert_eq!(qc["quantization_status"], "compressed");
    assert!(!out.join("hf_quant_config.json").exists());
    let m = read_manifest(&manifest).payload;
    let expected: Vec<String> =
        m.layers.iter().filter(|l| l.kind == "linear" && !modules.contains(&l.name)).map(|l| l.name.clone()).collect();
    let ignore: Vec<String> = qc["ignore"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    assert_eq!(ignore, expected);
    assert!(ignore.contains(&"lm_head".to_string()));
    // Scales are [1] in the model dtype (f32 here), and the patch embedding stays unquantized.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let scale = st.tensor("model.visual.blocks.0.attn.qkv.weight_scale").unwrap();
    assert_eq!((scale.dtype(), scale.shape()), (safetensors::Dtype::F32, &[1usize][..]));
    assert_eq!(st.tensor("model.visual.patch_embed.proj.weight").unwrap().dtype(), safetensors::Dtype::F32);
    // Provenance rides in the config's producer, which loaders ignore.
    let prov = &qc["producer"];
    assert_eq!(prov["layout"], "compressed-tensors");
    assert_eq!(prov["scores"], Value::String(m.scores_source.digest.clone()));
}

#[test]
fn fuse_scales_gives_fused_shards_the_largest_scale() {
    let fx = fixtures_or_skip!();
    let manifest = fixture_manifest(&fx, "text");
    let own = quantize_ok(&fx, &manifest, "own-scales", &[]);
    let fused = quantize_ok(&fx, &manifest, "fused-scales", &["--fuse-scales"]);
    let read = |dir: &Path| -> HashMap<String, (f32, Vec<u8>)> {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        st.names()
            .into_iter()
            .filter(|n| n.ends_with(".weight_scale"))
            .map(|n| {
                let w = n.replace(".weight_scale", ".weight");
                (w.clone(), (f32_of(&st.tensor(n).unwrap()), st.tensor(&w).unwrap().data().to_vec()))
            })
            .collect()
    };
    let (own, fused) = (read(&own), read(&fused));
    let input = Checkpoint::open(&fx.join("qwen3-vl-tiny")).unwrap();
    for layer in 0..3 {
        let p = format!("model.language_model.layers.{layer}.self_attn");
        let names: Vec<String> = ["q", "k", "v"].iter().map(|x| format!("{p}.{x}_proj.weight")).collect();
        let largest = names.iter().map(|n| own[n].0).fold(0f32, f32::max);
        for n in &names {
            assert_eq!(fused[n].0, largest, "{n}");
            // The codes are the weight quantized with the shared scale.
            let shape: Vec<usize> = input.tensors().into_iter().find(|t| t.0 == n).unwrap().2.to_vec();
            let w = input.get(n, &shape, DType::F32, &Device::Cpu).unwrap();
            let codes = fp8::quantize_to_e4m3(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), largest);
            assert_eq!(codes, fused[n].1, "{n}");
        }
    }
}

#[test]
fn sharded_output_has_an_index_and_the_same_tensors() {
    let fx = fixtures_or_skip!();
    let manifest = fixture_manifest(&fx, "text");
    let single = quantize_ok(&fx, &manifest, "single", &[]);
    let sharded = quantize_ok(&fx, &manifest, "sharded", &["--max-shard-size", "1MB"]);
    let index = json(&sharded.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let files: HashSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    // The 38.9 MB embedding alone exceeds 1 MB and takes a file of its own; the rest fill 1 MB files.
    assert!(files.len() >= 2, "{files:?}");
    let embed_file = map["model.language_model.embed_tokens.weight"].as_str().unwrap();
    assert_eq!(map.values().filter(|f| f.as_str() == Some(embed_file)).count(), 1);
    assert!(files
        .iter()
        .all(|f| f.starts_with("model-0") && f.ends_with(&format!("-of-{:05}.safetensors", files.len()))));
    assert!(!sharded.join("model.safetensors").exists());
    let a = Checkpoint::open(&single).unwrap();
    let b = Checkpoint::open(&sharded).unwrap();
    let total: usize = a.tensors().iter().map(|t| t.2.iter().product::<usize>() * t.1.bitsize() / 8).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap() as usize, total);
    let (ta, tb) = (a.tensors(), b.tensors());
    assert_eq!(ta.len(), tb.len());
    for ((n, _, _), (m, _, _)) in ta.iter().zip(&tb) {
        assert_eq!(n, m);
        assert_eq!(a.read_raw(n).unwrap(), b.read_raw(m).unwrap(), "{n}");
    }
    assert_eq!(served_losses(&fx, &single), served_losses(&fx, &sharded));
}

/// Runs `quantize` expecting exit 2 with one line on stderr containing every `needle`, and no
/// output directory nor temporary left behind beside the output (`-o`). The output's folder must
/// be this test's own: other tests write into the shared pipeline folder while this one runs.
fn refused(args: &[&str], needles: &[&str]) {
    let out = args.iter().position(|a| *a == "-o").map(|i| Path::new(args[i + 1])).expect("refused: no -o");
    let folder = out.parent().unwrap();
    let before: BTreeMap<String, ()> = entries(folder);
    let o = quantize(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
    assert_eq!(entries(folder), before, "{args:?} left files behind");
}

fn entries(dir: &Path) -> BTreeMap<String, ()> {
    std::fs::read_dir(dir).unwrap().map(|e| (e.unwrap().file_name().to_string_lossy().into_owned(), ())).collect()
}

/// A copy of the fixture checkpoint in `dir/name`, with `edit` applied.
fn checkpoint_copy(fx: &Path, root: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fx.join("qwen3-vl-tiny")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    edit(&dir);
    dir
}

#[test]
fn bad_input_is_refused_with_one_line_and_nothing_written() {
    let fx = fixtures_or_skip!();
    let st = setup(&fx);
    let text = fixture_manifest(&fx, "text");
    let all = fixture_manifest(&fx, "all");
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("refused");
    let o = s(&out);

    // A manifest of another model: the same layout with one weight changed.
    let other = checkpoint_copy(&fx, scratch.path(), "other", |d| {
        let p = d.join("model.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(&p, b).unwrap();
    });
    refused(
        &["--model", s(&other), "--manifest", s(&text), "-o", o],
        &["manifest-text.json", "another model", "model.safetensors"],
    );

    // Scores that are not the manifest's (another calibration: one amax differs).
    let other_scores = scratch.path().join("other-scores.msgpack");
    let mut sc: Artifact<qsens::artifact::scores::Scores> = artifact::read(st.scores.as_path()).unwrap();
    sc.payload.layers[0].input_amax *= 2.0;
    artifact::write(other_scores.as_path(), &sc).unwrap();
    refused(
        &["--model", s(&st.model), "--manifest", s(&text), "--scores", s(&other_scores), "-o", o],
        &["other-scores.msgpack", "not the scores"],
    );

    // A sharded checkpoint with a missing shard, and one with a truncated file.
    let missing = checkpoint_copy(&fx, scratch.path(), "missing", |d| {
        let ck = Checkpoint::open(d).unwrap();
        let mut map = serde_json::Map::new();
        for (i, (name, _, _)) in ck.tensors().iter().enumerate() {
            let file = if i % 2 == 0 { "model.safetensors" } else { "model-00002-of-00002.safetensors" };
            map.insert(name.to_string(), Value::String(file.into()));
        }
        std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())
            .unwrap();
    });
    refused(&["--model", s(&missing), "--manifest", s(&text), "-o", o], &["model-00002-of-00002.safetensors"]);
    let truncated = checkpoint_copy(&fx, scratch.path(), "truncated", |d| {
        let p = d.join("model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 1000]).unwrap();
    });
    refused(
        &["--model", s(&truncated), "--manifest", s(&text), "-o", o],
        &["truncated/model.safetensors", "not a valid safetensors file"],
    );

    // An existing output directory without --force.
    let existing = scratch.path().join("existing");
    std::fs::create_dir_all(&existing).unwrap();
    std::fs::write(existing.join("keep"), "x").unwrap();
    refused(&["--model", s(&st.model), "--manifest", s(&text), "-o", s(&existing)], &["existing", "--force"]);
    assert_eq!(std::fs::read(existing.join("keep")).unwrap(), b"x");

    // A manifest that splits a fused layer.
    let (mut modules, _) = recipe(&fx, "text");
    modules.remove("model.language_model.layers.0.self_attn.k_proj");
    let split = manifest_with(st, &modules, "manifest-split.json");
    refused(
        &["--model", s(&st.model), "--manifest", s(&split), "-o", o],
        &["manifest-split.json", "model.language_model.layers.0.self_attn.k_proj NONE"],
    );

    // FP8 vision layers in the modelopt layout.
    refused(
        &["--model", s(&st.model), "--manifest", s(&all), "--layout", "modelopt", "-o", o],
        &["manifest-all.json", "vision layers", "compressed-tensors"],
    );
    assert!(!out.exists());
}

#[test]
fn scores_of_the_manifest_are_accepted() {
    let fx = fixtures_or_skip!();
    let st = setup(&fx);
    let manifest = fixture_manifest(&fx, "text");
    let out = quantize_ok(&fx, &manifest, "with-scores", &["--scores", s(&st.scores)]);
    assert!(out.join("model.safetensors").is_file());
}
