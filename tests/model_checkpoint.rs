//! Loading: the Qwen3-VL-4B architecture (random weights at reduced width, written as a sharded
//! checkpoint with an untied lm_head) runs forward and backward; the layer list a config implies;
//! load errors name the tensor and the file.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use qsens::model::qwen3_vl::{expected_layers, Config, ForwardOptions, Input, Keep, LogitsMode, Qwen3VL};
use qsens::model::{LayerId, LayerKind, Linear, NoTap, Tap, Tower};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde_json::{json, Value};

fn bench_config_path() -> PathBuf {
    let fx = std::env::var_os("QSENS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    fx.join("../bench/qwen3-vl-4b-instruct.config.json")
}

/// The real 4B config (`shared/bench/`), when present.
fn real_4b() -> Option<Value> {
    let p = bench_config_path();
    match std::fs::read_to_string(&p) {
        Ok(s) => Some(serde_json::from_str(&s).unwrap()),
        Err(_) => {
            common::fixtures()?;
            panic!("{} is missing", p.display())
        }
    }
}

/// The 4B architecture at reduced width: same layer structure and options (3 deepstack mergers
/// fed by early/middle/late blocks, GQA 2:1, q width ≠ hidden, mrope_section ÷4), small vocab.
fn reduced(real: &Value, text_layers: usize) -> Value {
    let mut c = real.clone();
    let t = c["text_config"].as_object_mut().unwrap();
    for (k, v) in [
        ("vocab_size", json!(300)),
        ("hidden_size", json!(64)),
        ("intermediate_size", json!(96)),
        ("num_hidden_layers", json!(text_layers)),
        ("num_attention_heads", json!(4)),
        ("num_key_value_heads", json!(2)),
        ("head_dim", json!(32)),
        ("tie_word_embeddings", json!(false)),
    ] {
        t.insert(k.into(), v);
    }
    t.get_mut("rope_scaling").unwrap()["mrope_section"] = json!([6, 5, 5]);
    let v = c["vision_config"].as_object_mut().unwrap();
    for (k, val) in [
        ("depth", json!(5)),
        ("hidden_size", json!(32)),
        ("intermediate_size", json!(64)),
        ("num_heads", json!(2)),
        ("out_hidden_size", json!(64)),
        ("num_position_embeddings", json!(36)),
        ("deepstack_visual_indexes", json!([1, 2, 4])),
    ] {
        v.insert(k.into(), val);
    }
    let top = c.as_object_mut().unwrap();
    for (k, val) in [
        ("tie_word_embeddings", json!(false)),
        ("image_token_id", json!(290)),
        ("video_token_id", json!(291)),
        ("vision_start_token_id", json!(288)),
        ("vision_end_token_id", json!(289)),
    ] {
        top.insert(k.into(), val);
    }
    c
}

/// Every tensor of an HF Qwen3-VL checkpoint for `cfg` (independent of the loader's list).
fn hf_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let v = &cfg.vision_config;
    let t = &cfg.text_config;
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |n: String, s: &[usize]| out.push((n, s.to_vec()));
    let (vd, vi, md) = (v.hidden_size, v.intermediate_size, v.merged_dim());
    let (p, tp) = (v.patch_size, v.temporal_patch_size);
    add("model.visual.patch_embed.proj.weight".into(), &[vd, v.in_channels, tp, p, p]);
    add("model.visual.patch_embed.proj.bias".into(), &[vd]);
    add("model.visual.pos_embed.weight".into(), &[v.num_position_embeddings, vd]);
    let lin = |add: &mut dyn FnMut(String, &[usize]), n: String, i: usize, o: usize, bias: bool| {
        add(format!("{n}.weight"), &[o, i]);
        if bias {
            add(format!("{n}.bias"), &[o]);
        }
    };
    for b in 0..v.depth {
        let pre = format!("model.visual.blocks.{b}");
        for nm in ["norm1", "norm2"] {
            add(format!("{pre}.{nm}.weight"), &[vd]);
            add(format!("{pre}.{nm}.bias"), &[vd]);
        }
        lin(&mut add, format!("{pre}.attn.qkv"), vd, 3 * vd, true);
        lin(&mut add, format!("{pre}.attn.proj"), vd, vd, true);
        lin(&mut add, format!("{pre}.mlp.linear_fc1"), vd, vi, true);
        lin(&mut add, format!("{pre}.mlp.linear_fc2"), vi, vd, true);
    }
    let mut mergers = vec![("model.visual.merger".to_string(), vd)];
    for k in 0..v.deepstack_visual_indexes.len() {
        mergers.push((format!("model.visual.deepstack_merger_list.{k}"), md));
    }
    for (pre, nd) in mergers {
        add(format!("{pre}.norm.weight"), &[nd]);
        add(format!("{pre}.norm.bias"), &[nd]);
        lin(&mut add, format!("{pre}.linear_fc1"), md, md, true);
        lin(&mut add, format!("{pre}.linear_fc2"), md, v.out_hidden_size, true);
    }
    let (d, hd, ti) = (t.hidden_size, t.head_dim(), t.intermediate_size);
    let (qd, kvd) = (t.num_attention_heads * hd, t.num_key_value_heads() * hd);
    add("model.language_model.embed_tokens.weight".into(), &[t.vocab_size, d]);
    for l in 0..t.num_hidden_layers {
        let pre = format!("model.language_model.layers.{l}");
        lin(&mut add, format!("{pre}.self_attn.q_proj"), d, qd, t.attention_bias);
        lin(&mut add, format!("{pre}.self_attn.k_proj"), d, kvd, t.attention_bias);
        lin(&mut add, format!("{pre}.self_attn.v_proj"), d, kvd, t.attention_bias);
        lin(&mut add, format!("{pre}.self_attn.o_proj"), qd, d, t.attention_bias);
        add(format!("{pre}.self_attn.q_norm.weight"), &[hd]);
        add(format!("{pre}.self_attn.k_norm.weight"), &[hd]);
        lin(&mut add, format!("{pre}.mlp.gate_proj"), d, ti, false);
        lin(&mut add, format!("{pre}.mlp.up_proj"), d, ti, false);
        lin(&mut add, format!("{pre}.mlp.down_proj"), ti, d, false);
        add(format!("{pre}.input_layernorm.weight"), &[d]);
        add(format!("{pre}.post_attention_layernorm.weight"), &[d]);
    }
    add("model.language_model.norm.weight".into(), &[d]);
    if !cfg.tie_word_embeddings() {
        add("lm_head.weight".into(), &[t.vocab_size, d]);
    }
    out
}

/// Random weights in the fixture's style: N(0,1)/√fan_in for matrices, 1 + 0.1·N for norm
/// weights, 0.1·N for biases.
fn random_weights(specs: &[(String, Vec<usize>)], seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    specs
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let z: Vec<f32> = (0..n).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
            let norm = name.contains("norm") && name.ends_with(".weight");
            let (scale, shift) = if norm {
                (0.1, 1.0)
            } else if name.ends_with(".bias") {
                (0.1, 0.0)
            } else if name.contains("pos_embed") {
                (1.0, 0.0)
            } else {
                let fan_in: usize = shape[1..].iter().product();
                (1.0 / (fan_in as f32).sqrt(), 0.0)
            };
            let v = z.into_iter().map(|x| x * scale + shift).collect::<Vec<_>>();
            (name.clone(), Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
        })
        .collect()
}

/// Writes `config.json` and the weights, as `shards` files plus an index json when `shards > 1`.
fn write_checkpoint(dir: &Path, config: &Value, weights: &[(String, Tensor)], shards: usize) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    if shards == 1 {
        let map: HashMap<String, Tensor> = weights.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
        return;
    }
    let per = weights.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in weights.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.join(&file)).unwrap();
        for (n, _) in chunk {
            weight_map.insert(n.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A two-image input in chat layout with HF `get_rope_index` positions and labels on the tail.
fn synthetic_input(cfg: &Config) -> Input {
    let v = &cfg.vision_config;
    let m = v.spatial_merge_size as u32;
    let grids = [[1u32, 4, 6], [1, 2, 2]];
    let (img, vs, ve) = (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id);
    let mut ids = vec![5u32, 6];
    let mut pos: [Vec<i64>; 3] = Default::default();
    let push_text = |ids: &mut Vec<u32>, pos: &mut [Vec<i64>; 3], tok: u32| {
        let next = pos[0].iter().chain(&pos[1]).chain(&pos[2]).max().map_or(0, |m| m + 1);
        ids.push(tok);
        for p in pos.iter_mut() {
            p.push(next);
        }
    };
    let mut start = Vec::new();
    for &t in &ids.clone() {
        start.push(t);
    }
    ids.clear();
    for t in start {
        push_text(&mut ids, &mut pos, t);
    }
    for g in grids {
        push_text(&mut ids, &mut pos, vs);
        let base = pos[0].iter().chain(&pos[1]).chain(&pos[2]).max().unwrap() + 1;
        for hh in 0..g[1] / m {
            for ww in 0..g[2] / m {
                ids.push(img);
                pos[0].push(base);
                pos[1].push(base + hh as i64);
                pos[2].push(base + ww as i64);
            }
        }
        push_text(&mut ids, &mut pos, ve);
        push_text(&mut ids, &mut pos, 7);
    }
    for t in [9u32, 10, 11, 12, 13] {
        push_text(&mut ids, &mut pos, t);
    }
    let l = ids.len();
    let labels: Vec<i32> = (0..l).map(|i| if i + 4 >= l { ids[i] as i32 } else { -100 }).collect();
    let n: usize = grids.iter().map(|g| (g[0] * g[1] * g[2]) as usize).sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let px: Vec<f32> =
        (0..n * v.patch_dim()).map(|_| rand_distr::Uniform::new(-1f32, 1.0).unwrap().sample(&mut rng)).collect();
    Input {
        input_ids: ids,
        position_ids: pos,
        labels: Some(labels),
        pixel_values: Tensor::from_vec(px, (n, v.patch_dim()), &Device::Cpu).unwrap(),
        grid_thw: grids.to_vec(),
        packed: Vec::new(),
    }
}

#[derive(Default)]
struct Count {
    calls: Vec<LayerId>,
    zero_dy: Vec<LayerId>,
}

impl Tap for Count {
    fn backward(&mut self, id: LayerId, _: &Linear, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<()> {
        assert_eq!(x.dim(0)?, dy.dim(0)?);
        assert_eq!(y.dims(), dy.dims());
        let n = dy.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n.is_finite());
        if n == 0.0 {
            self.zero_dy.push(id);
        }
        self.calls.push(id);
        Ok(())
    }
}

#[test]
fn real_4b_config_implies_358_layers() {
    let Some(real) = real_4b() else { return };
    let cfg: Config = serde_json::from_value(real).unwrap();
    cfg.validate().unwrap();
    let layers = expected_layers(&cfg);
    // 1 patch embed + 24·4 vision + 2 merger + 3·2 deepstack + 36·7 text + lm_head.
    assert_eq!(layers.len(), 358);
    assert_eq!(layers.iter().filter(|l| l.kind == LayerKind::Linear).count(), 357);
    assert_eq!(layers.iter().filter(|l| l.kind == LayerKind::PatchEmbed).count(), 1);
    assert_eq!(layers.iter().filter(|l| l.tower == Tower::Vision).count(), 1 + 96 + 2 + 6);
    assert_eq!(layers.iter().filter(|l| l.tower == Tower::Text).count(), 252);
    let first = &layers[0];
    assert_eq!(
        (first.name.as_str(), first.in_features, first.out_features),
        ("model.visual.patch_embed.proj", 1536, 1024)
    );
    let q = layers.iter().find(|l| l.name == "model.language_model.layers.35.self_attn.q_proj").unwrap();
    assert_eq!((q.in_features, q.out_features), (2560, 4096));
    let k = layers.iter().find(|l| l.name == "model.language_model.layers.0.self_attn.k_proj").unwrap();
    assert_eq!(k.out_features, 1024);
    let ds = layers.iter().find(|l| l.name == "model.visual.deepstack_merger_list.2.linear_fc2").unwrap();
    assert_eq!((ds.in_features, ds.out_features), (4096, 2560));
    let lm = layers.last().unwrap();
    assert_eq!((lm.name.as_str(), lm.tower, lm.out_features), ("lm_head", Tower::LmHead, 151936));
    // 4.4B parameters: cost of the weights ModelOpt searches.
    let weights: u64 = layers.iter().map(|l| l.params()).sum();
    assert!(weights > 3_000_000_000, "{weights}");
}

/// The released Qwen3-VL-30B-A3B config (`shared/bench/`, released key style): every one of its 48
/// decoder layers is a sparse block of 128 experts, 8 per token, width 768 (../shared/bench/README.md),
/// and the Linear layers are the dense ones around them.
#[test]
fn real_30b_a3b_config_is_48_sparse_layers_of_128_experts() {
    let Some(_) = real_4b() else { return };
    let p = bench_config_path().with_file_name("qwen3-vl-30b-a3b-instruct.config.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let cfg: Config = serde_json::from_str(&text).unwrap();
    cfg.validate().unwrap();
    assert!(cfg.is_moe());
    let t = &cfg.text_config;
    assert_eq!(
        (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads),
        (2048, 48, 32, Some(4))
    );
    for i in 0..48 {
        let shape = cfg.moe_layer(i).unwrap_or_else(|| panic!("layer {i} is not sparse"));
        assert_eq!((shape.experts, shape.top_k, shape.intermediate, shape.norm_topk_prob), (128, 8, 768, true));
    }
    let layers = expected_layers(&cfg);
    // 1 patch embed + 27·4 vision + 2 merger + 3·2 deepstack + 48·4 attention + lm_head: no dense MLP.
    assert_eq!(layers.len(), 1 + 108 + 2 + 6 + 192 + 1);
    let text_mlp = layers.iter().filter(|l| l.name.starts_with("model.language_model.") && l.name.contains(".mlp."));
    assert_eq!(text_mlp.count(), 0, "a sparse layer listed a dense MLP");
    let q = layers.iter().find(|l| l.name == "model.language_model.layers.47.self_attn.q_proj").unwrap();
    assert_eq!((q.in_features, q.out_features), (2048, 4096));
    let lm = layers.last().unwrap();
    assert_eq!((lm.name.as_str(), lm.in_features), ("lm_head", 2048));
}

#[test]
fn reduced_4b_architecture_sharded_forward_backward() {
    let Some(real) = real_4b() else { return };
    for text_layers in [4, 2] {
        let config = reduced(&real, text_layers);
        let cfg: Config = serde_json::from_value(config.clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let weights = random_weights(&hf_tensors(&cfg), 11);
        write_checkpoint(dir.path(), &config, &weights, 3);
        assert!(dir.path().join("model.safetensors.index.json").is_file());
        let model = Qwen3VL::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.layers(), expected_layers(&cfg).as_slice());
        let expected_params: usize = weights.iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(model.num_parameters(), expected_params as u64, "untied lm_head counts");
        let lm = model.linear(model.lm_head_id()).weight();
        let embed = &weights.iter().find(|(n, _)| n == "lm_head.weight").unwrap().1;
        assert_eq!(lm.to_vec2::<f32>().unwrap(), embed.to_vec2::<f32>().unwrap(), "untied lm_head is lm_head.weight");

        let input = synthetic_input(&cfg);
        let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Backward, trace: true };
        let fwd = model.forward(&input, &mut NoTap, &opts).unwrap();
        assert!(fwd.loss.unwrap().is_finite());
        assert_eq!(fwd.trace["image_embeds"].dims(), &[7, 64]);
        let mut count = Count::default();
        model.backward(&fwd, &mut count).unwrap();
        let mut seen = count.calls.clone();
        seen.sort();
        assert_eq!(seen, (0..model.layers().len()).collect::<Vec<_>>());
        // A deepstack feature added after the last decoder layer only reaches the image rows' own
        // logits (no label there), and one beyond the decoder's depth is never added: both get a
        // zero gradient. With 4 layers every feature feeds later attention.
        let mut zero: Vec<&str> = count.zero_dy.iter().map(|&i| model.layers()[i].name.as_str()).collect();
        zero.sort();
        if text_layers == 4 {
            assert!(zero.is_empty(), "{zero:?}");
        } else {
            let ds = |k: usize, f: usize| format!("model.visual.deepstack_merger_list.{k}.linear_fc{f}");
            assert_eq!(zero, [ds(1, 1), ds(1, 2), ds(2, 1), ds(2, 2)]);
        }
        // Resume from every layer group: bit-exact.
        let res = model
            .forward(&input, &mut NoTap, &ForwardOptions { logits: LogitsMode::All, keep: Keep::Resume, trace: false })
            .unwrap();
        let logits = res.logits.as_ref().unwrap();
        for id in 0..model.layers().len() {
            let again = model.forward_from(&res, id, &mut NoTap).unwrap();
            assert_eq!(common::qwen::max_abs_diff(&again, logits), 0.0, "{}", model.layers()[id].name);
        }
    }
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", Qwen3VL::load(dir, DType::F32, &Device::Cpu).unwrap_err())
}

#[test]
fn load_errors_name_tensor_and_file() {
    let Some(real) = real_4b() else { return };
    let config = reduced(&real, 2);
    let cfg: Config = serde_json::from_value(config.clone()).unwrap();
    let weights = random_weights(&hf_tensors(&cfg), 3);

    // Missing tensor, single file.
    let dir = tempfile::tempdir().unwrap();
    let missing = "model.visual.blocks.3.attn.qkv.bias";
    let w: Vec<_> = weights.iter().filter(|(n, _)| n != missing).cloned().collect();
    write_checkpoint(dir.path(), &config, &w, 1);
    let e = load_err(dir.path());
    assert!(e.contains(missing) && e.contains("model.safetensors") && e.contains("missing"), "{e}");

    // Wrong shape, single file.
    let dir = tempfile::tempdir().unwrap();
    let bad = "model.language_model.layers.1.mlp.up_proj.weight";
    let w: Vec<_> = weights
        .iter()
        .map(|(n, t)| {
            if n == bad {
                (n.clone(), Tensor::zeros((96, 63), DType::F32, &Device::Cpu).unwrap())
            } else {
                (n.clone(), t.clone())
            }
        })
        .collect();
    write_checkpoint(dir.path(), &config, &w, 1);
    let e = load_err(dir.path());
    assert!(
        e.contains(bad) && e.contains("model.safetensors") && e.contains("[96, 63]") && e.contains("[96, 64]"),
        "{e}"
    );

    // Sharded: absent from the index, and listed in the index but absent from the shard.
    let dir = tempfile::tempdir().unwrap();
    let missing = "model.visual.deepstack_merger_list.1.norm.weight";
    let w: Vec<_> = weights.iter().filter(|(n, _)| n != missing).cloned().collect();
    write_checkpoint(dir.path(), &config, &w, 2);
    let e = load_err(dir.path());
    assert!(e.contains(missing) && e.contains("model.safetensors.index.json"), "{e}");
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"][missing] = json!("model-00002-of-00002.safetensors");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains(missing) && e.contains("model-00002-of-00002.safetensors"), "{e}");

    // Untied without lm_head.weight; unsupported rope.
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<_> = weights.iter().filter(|(n, _)| n != "lm_head.weight").cloned().collect();
    write_checkpoint(dir.path(), &config, &w, 1);
    let e = load_err(dir.path());
    assert!(e.contains("lm_head.weight"), "{e}");
    let mut yarn = config.clone();
    yarn["text_config"]["rope_scaling"]["rope_type"] = json!("yarn");
    write_checkpoint(dir.path(), &yarn, &weights, 1);
    let e = load_err(dir.path());
    assert!(e.contains("yarn") && e.contains("config.json"), "{e}");
}

/// The 4B architecture reduced to 2 text layers, with seeded random weights, loaded in f32 (the
/// folder holds the checkpoint as long as it lives).
fn two_layer_model(real: &Value, seed: u64) -> (Config, tempfile::TempDir, Qwen3VL) {
    let config = reduced(real, 2);
    let cfg: Config = serde_json::from_value(config.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config, &random_weights(&hf_tensors(&cfg), seed), 1);
    let model = Qwen3VL::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    (cfg, dir, model)
}

#[test]
fn forward_rejects_inconsistent_inputs() {
    let Some(real) = real_4b() else { return };
    let (cfg, _dir, model) = two_layer_model(&real, 5);
    let good = synthetic_input(&cfg);
    let opts = ForwardOptions::default();
    let err = |i: &Input, o: &ForwardOptions| {
        model.forward(i, &mut NoTap, o).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let mut i = good.clone();
    i.grid_thw[0] = [1, 4, 8];
    assert!(err(&i, &opts).contains("image tokens"));
    let mut i = good.clone();
    i.position_ids[1].pop();
    assert!(err(&i, &opts).contains("position_ids"));
    let mut i = good.clone();
    i.labels = None;
    assert!(err(&i, &ForwardOptions { keep: Keep::Backward, ..opts }).contains("labels"));
    // Text-only input (no image tokens, no grid) runs.
    let mut i = good.clone();
    i.input_ids.retain(|&t| t != cfg.image_token_id);
    let l = i.input_ids.len();
    i.position_ids = [(0..l as i64).collect(), (0..l as i64).collect(), (0..l as i64).collect()];
    i.labels = Some((0..l).map(|k| if k + 3 >= l { i.input_ids[k] as i32 } else { -100 }).collect());
    i.grid_thw.clear();
    i.pixel_values = Tensor::zeros((0, cfg.vision_config.patch_dim()), DType::F32, &Device::Cpu).unwrap();
    let f = model.forward(&i, &mut NoTap, &ForwardOptions { keep: Keep::Backward, ..opts }).unwrap();
    assert!(f.loss.unwrap().is_finite());
    let mut count = Count::default();
    model.backward(&f, &mut count).unwrap();
    assert!(count.calls.iter().all(|&id| model.layers()[id].tower != Tower::Vision));
    // Resuming a text-only sample from any layer, vision ones included, gives its logits again.
    let res =
        model.forward(&i, &mut NoTap, &ForwardOptions { logits: LogitsMode::All, keep: Keep::Resume, trace: false });
    let res = res.unwrap();
    for id in 0..model.layers().len() {
        let again = model.forward_from(&res, id, &mut NoTap).unwrap();
        assert_eq!(common::qwen::max_abs_diff(&again, res.logits.as_ref().unwrap()), 0.0);
    }
}

/// Replaces one layer's output (doubled) in the forward.
struct Replace(LayerId);

impl Tap for Replace {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if id != self.0 {
            return Ok(None);
        }
        Ok(Some((linear.forward(x)? * 2.0)?))
    }
}

/// The backward recomputes the vision blocks and the decoder layers' attention halves with the
/// plain layers, so a `Keep::Backward` forward refuses a tap that replaces one of their outputs
/// (its gradients would belong to another model); an MLP layer, whose activations are kept, may
/// be replaced, and without `Keep::Backward` any layer may.
#[test]
fn keep_backward_refuses_a_tap_that_replaces_a_recomputed_layer() {
    let Some(real) = real_4b() else { return };
    let (cfg, _dir, model) = two_layer_model(&real, 7);
    let input = synthetic_input(&cfg);
    let keep = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    let plain = ForwardOptions { keep: Keep::Nothing, ..keep };
    for (name, recomputed) in [
        ("model.visual.blocks.1.mlp.linear_fc1", true),
        ("model.language_model.layers.0.self_attn.v_proj", true), // not q or k: their per-head norm undoes a scaling
        ("model.language_model.layers.1.self_attn.o_proj", true),
        ("model.language_model.layers.0.mlp.gate_proj", false),
        ("model.visual.merger.linear_fc1", false),
    ] {
        let id = model.layer_id(name).unwrap();
        let kept = model.forward(&input, &mut Replace(id), &keep);
        match (recomputed, kept) {
            (true, Err(e)) => assert!(e.to_string().contains("recomputes"), "{name}: {e}"),
            (true, Ok(_)) => panic!("{name}: a replaced output of a recomputed layer was accepted"),
            (false, kept) => {
                let f = kept.unwrap_or_else(|e| panic!("{name}: {e}"));
                model.backward(&f, &mut NoTap).unwrap();
            }
        }
        let unkept = model.forward(&input, &mut Replace(id), &plain).unwrap();
        let base = model.forward(&input, &mut NoTap, &plain).unwrap();
        let (a, b) = (unkept.loss.unwrap(), base.loss.unwrap());
        assert_ne!(a, b, "{name}: replacing its output changes the loss");
    }
}
