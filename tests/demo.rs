//! The generated demo set: reproducible, and in the layout the real pipeline reads.
//!
//! The expected checkpoint contents are derived here from `config.json` alone, by a rule that is
//! first checked against the fixture checkpoint (saved by HF transformers), so the demo is held
//! to HF's naming, not to the generator's own list.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Value};

/// The demo set, generated once per test binary into a temporary folder.
fn demo_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        qsens::demo::write_demo_set(dir.path()).unwrap();
        dir
    })
    .path()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `relative path -> sha256` of every file under `root`.
fn digests(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                out.insert(rel, qsens::artifact::sha256_file(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn generating_twice_gives_identical_bytes() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = std::time::Instant::now();
    let first = qsens::demo::write_demo_set(a.path()).unwrap();
    eprintln!("write_demo_set: {:.2} s (test profile)", start.elapsed().as_secs_f64());
    assert!(first.iter().all(|w| w.changed));
    qsens::demo::write_demo_set(b.path()).unwrap();
    let (da, db) = (digests(a.path()), digests(b.path()));
    assert_eq!(da, db);
    assert_eq!(da.len(), first.len(), "no stray files (temporary files are renamed away)");

    // A second run into the same folder rewrites nothing and leaves the bytes alone.
    let second = qsens::demo::write_demo_set(a.path()).unwrap();
    assert!(
        second.iter().all(|w| !w.changed),
        "second run changed {:?}",
        second.iter().filter(|w| w.changed).collect::<Vec<_>>()
    );
    assert_eq!(digests(a.path()), da);
    assert_eq!(first, second.into_iter().map(|w| qsens::demo::Written { changed: true, ..w }).collect::<Vec<_>>());

    // A damaged file is repaired by the next run.
    std::fs::write(a.path().join("model/config.json"), b"{}").unwrap();
    let third = qsens::demo::write_demo_set(a.path()).unwrap();
    assert_eq!(third.iter().filter(|w| w.changed).map(|w| w.path.as_str()).collect::<Vec<_>>(), ["model/config.json"]);
    assert_eq!(digests(a.path()), da);

    // The README lists every other file with its digest.
    let readme = std::fs::read_to_string(a.path().join("README.md")).unwrap();
    for (path, digest) in &da {
        if path != "README.md" {
            assert!(readme.contains(&format!("| {path} |")), "README misses {path}");
            assert!(readme.contains(digest.trim_start_matches("sha256:")), "README has a stale digest for {path}");
        }
    }
}

#[test]
fn layout_is_the_documented_one() {
    let files: Vec<String> = digests(demo_dir()).into_keys().collect();
    let mut expected: Vec<String> = [
        "README.md",
        "captions.json",
        "model/chat_template.jinja",
        "model/config.json",
        "model/generation_config.json",
        "model/merges.txt",
        "model/model.safetensors",
        "model/preprocessor_config.json",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "model/video_preprocessor_config.json",
        "model/vocab.json",
    ]
    .map(String::from)
    .to_vec();
    expected.extend(qsens::demo::demo_images().iter().map(|im| format!("images/{}", im.file_name())));
    expected.sort();
    assert_eq!(files, expected);
}

// ---- tokenizer ----

#[test]
fn tokenizer_loads_and_its_special_tokens_match_the_config() {
    let model = demo_dir().join("model");
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let config = read_json(&model.join("config.json"));
    let tok_config = read_json(&model.join("tokenizer_config.json"));
    let vocab_size = config["text_config"]["vocab_size"].as_u64().unwrap() as usize;

    let added = qsens::demo::tokenizer::ADDED_TOKENS;
    let n_regular = tok.get_vocab_size(false);
    assert_eq!(tok.get_vocab_size(true), n_regular + added.len());
    assert!(vocab_size >= tok.get_vocab_size(true) && vocab_size % 64 == 0, "vocab_size {vocab_size}");
    assert!(vocab_size - tok.get_vocab_size(true) < 64);

    // Every added token is one id, right after the regular vocabulary, in Qwen's order.
    for (i, (content, special)) in added.iter().enumerate() {
        let id = (n_regular + i) as u32;
        let enc = tok.encode(*content, false).unwrap();
        assert_eq!(enc.get_ids(), [id], "{content}");
        assert_eq!(tok.token_to_id(content), Some(id));
        let entry = &tok_config["added_tokens_decoder"][id.to_string()];
        assert_eq!(entry["content"], json!(content));
        assert_eq!(entry["special"], json!(special));
    }

    let id = |t: &str| json!(tok.token_to_id(t).unwrap());
    assert_eq!(config["image_token_id"], id("<|image_pad|>"));
    assert_eq!(config["video_token_id"], id("<|video_pad|>"));
    assert_eq!(config["vision_start_token_id"], id("<|vision_start|>"));
    assert_eq!(config["vision_end_token_id"], id("<|vision_end|>"));
    assert_eq!(config["text_config"]["bos_token_id"], id("<|endoftext|>"));
    assert_eq!(config["text_config"]["eos_token_id"], id("<|im_end|>"));
    let generation = read_json(&model.join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], json!([id("<|im_end|>"), id("<|endoftext|>")]));
    assert_eq!(generation["pad_token_id"], id("<|endoftext|>"));
    assert_eq!(tok_config["eos_token"], "<|im_end|>");
    assert_eq!(tok_config["pad_token"], "<|endoftext|>");
    assert!(tok_config.get("chat_template").is_none());
}

#[test]
fn tokenizer_round_trips_text() {
    let model = demo_dir().join("model");
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let n_regular = tok.get_vocab_size(false) as u32;
    let captions = read_json(&demo_dir().join("captions.json"));
    let mut texts: Vec<String> = captions["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["caption"].as_str().unwrap().to_string())
        .collect();
    texts.push("Unseen words, digits 12345, tabs\tand\r\nnewlines; ünïcödé 日本語 🙂 — it's fine.".into());
    for text in &texts {
        let enc = tok.encode(text.as_str(), false).unwrap();
        assert!(enc.get_ids().iter().all(|&id| id < n_regular), "{text}: an added token id");
        assert_eq!(&tok.decode(enc.get_ids(), false).unwrap(), text);
    }
    // The merges pay off on the captions (byte-level alone would be one token per byte).
    let first = tok.encode(texts[0].as_str(), false).unwrap();
    assert!(
        first.get_ids().len() * 2 < texts[0].len(),
        "{} tokens for {} bytes",
        first.get_ids().len(),
        texts[0].len()
    );

    // A rendered chat keeps its special tokens whole and round-trips.
    let chat = format!(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n",
        qsens::demo::PROMPT,
        texts[0]
    );
    let enc = tok.encode(chat.as_str(), false).unwrap();
    let ids = enc.get_ids();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(&ids[..2], [id("<|im_start|>"), tok.encode("user", false).unwrap().get_ids()[0]]);
    assert_eq!(ids.iter().filter(|&&i| i == id("<|image_pad|>")).count(), 1);
    assert_eq!(ids.iter().filter(|&&i| i >= n_regular).count(), 7);
    assert_eq!(tok.decode(ids, false).unwrap(), chat);
}

// ---- chat template ----

fn render(template: &str, messages: &Value, add_generation_prompt: bool, hf_whitespace: bool) -> String {
    let mut env = minijinja::Environment::new();
    if hf_whitespace {
        // transformers compiles chat templates with these two on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
    }
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", template).unwrap();
    let ctx = json!({"messages": messages, "add_generation_prompt": add_generation_prompt});
    env.get_template("chat").unwrap().render(ctx).unwrap()
}

fn sample_messages(caption: &str) -> Value {
    json!([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qsens::demo::PROMPT}]},
        {"role": "assistant", "content": caption},
    ])
}

#[test]
fn chat_template_renders_the_qwen3_vl_text() {
    let template = std::fs::read_to_string(demo_dir().join("model/chat_template.jinja")).unwrap();
    let caption = "A red circle in the middle of a plain blue background.";
    let expected = format!(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n\
         <|im_start|>assistant\n{caption}<|im_end|>\n"
    );
    for hf_whitespace in [true, false] {
        assert_eq!(render(&template, &sample_messages(caption), false, hf_whitespace), expected);
        let prompt_only = json!([sample_messages(caption)[0]]);
        assert_eq!(
            render(&template, &prompt_only, true, hf_whitespace),
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}

#[test]
fn chat_template_matches_the_fixture_render() {
    let fixtures = fixtures_or_skip!();
    let template = std::fs::read_to_string(demo_dir().join("model/chat_template.jinja")).unwrap();
    let index = read_json(&fixtures.join("reference/index.json"));
    for sample in index["samples"].as_array().unwrap() {
        let messages = sample_messages(sample["caption"].as_str().unwrap());
        assert_eq!(render(&template, &messages, false, true), sample["rendered_text"].as_str().unwrap());
    }
}

#[test]
fn chat_template_agrees_with_qwens_on_its_subset() {
    let fixtures = fixtures_or_skip!();
    let ours = std::fs::read_to_string(demo_dir().join("model/chat_template.jinja")).unwrap();
    let qwen = std::fs::read_to_string(fixtures.join("qwen3-vl-tiny/chat_template.jinja")).unwrap();
    let conversations = [
        sample_messages("A caption."),
        json!([{"role": "user", "content": "Just text."}]),
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": "a.jpg"},
                {"type": "text", "text": " and "}, {"image_url": "b.png"}, {"type": "video"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "They differ."}, {"type": "image"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
        ]),
        json!([
            {"role": "system", "content": [{"type": "text", "text": "Sys "}, {"type": "text", "text": "list."}]},
            {"role": "user", "content": []},
        ]),
    ];
    for messages in &conversations {
        for add_generation_prompt in [false, true] {
            for add_vision_id in [false, true] {
                let ctx = |t: &str| {
                    let mut env = minijinja::Environment::new();
                    env.set_trim_blocks(true);
                    env.set_lstrip_blocks(true);
                    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                    env.add_template("chat", t).unwrap();
                    let ctx = json!({"messages": messages, "add_generation_prompt": add_generation_prompt,
                        "add_vision_id": add_vision_id});
                    env.get_template("chat").unwrap().render(ctx).unwrap()
                };
                assert_eq!(ctx(&ours), ctx(&qwen), "{messages} gen={add_generation_prompt} vision_id={add_vision_id}");
            }
        }
    }
}

// ---- checkpoint ----

/// `name -> (dtype, shape)` from a safetensors header (the data is not read).
fn safetensors_header(path: &Path) -> (BTreeMap<String, (String, Vec<usize>)>, Value) {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).unwrap();
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header).unwrap();
    let header: BTreeMap<String, Value> = serde_json::from_slice(&header).unwrap();
    let mut metadata = Value::Null;
    let mut tensors = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            metadata = info;
            continue;
        }
        let shape = info["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        tensors.insert(name, (info["dtype"].as_str().unwrap().to_string(), shape));
    }
    (tensors, metadata)
}

/// The tensors a `Qwen3VLForConditionalGeneration` checkpoint with this `config.json` holds,
/// following HF's module names (tied embeddings: no `lm_head.weight`).
fn expected_tensors(config: &Value) -> BTreeMap<String, Vec<usize>> {
    let (t, v) = (&config["text_config"], &config["vision_config"]);
    let n = |c: &Value, key: &str| c[key].as_u64().unwrap_or_else(|| panic!("config: {key}")) as usize;
    let mut out = BTreeMap::new();
    let mut add = |name: String, shape: &[usize]| assert!(out.insert(name, shape.to_vec()).is_none());

    let (vh, vi) = (n(v, "hidden_size"), n(v, "intermediate_size"));
    let (ps, tps, m) = (n(v, "patch_size"), n(v, "temporal_patch_size"), n(v, "spatial_merge_size"));
    let (out_h, merged) = (n(v, "out_hidden_size"), vh * m * m);
    add("model.visual.patch_embed.proj.weight".into(), &[vh, n(v, "in_channels"), tps, ps, ps]);
    add("model.visual.patch_embed.proj.bias".into(), &[vh]);
    add("model.visual.pos_embed.weight".into(), &[n(v, "num_position_embeddings"), vh]);
    for i in 0..n(v, "depth") {
        let b = format!("model.visual.blocks.{i}");
        for (module, shape) in [
            ("norm1", [vh, 0]),
            ("norm2", [vh, 0]),
            ("attn.qkv", [3 * vh, vh]),
            ("attn.proj", [vh, vh]),
            ("mlp.linear_fc1", [vi, vh]),
            ("mlp.linear_fc2", [vh, vi]),
        ] {
            let w: &[usize] = if shape[1] == 0 { &shape[..1] } else { &shape };
            add(format!("{b}.{module}.weight"), w);
            add(format!("{b}.{module}.bias"), &shape[..1]);
        }
    }
    let deepstack = v["deepstack_visual_indexes"].as_array().unwrap().len();
    let mergers = std::iter::once(("model.visual.merger".to_string(), vh))
        .chain((0..deepstack).map(|j| (format!("model.visual.deepstack_merger_list.{j}"), merged)));
    for (prefix, norm) in mergers {
        add(format!("{prefix}.norm.weight"), &[norm]);
        add(format!("{prefix}.norm.bias"), &[norm]);
        add(format!("{prefix}.linear_fc1.weight"), &[merged, merged]);
        add(format!("{prefix}.linear_fc1.bias"), &[merged]);
        add(format!("{prefix}.linear_fc2.weight"), &[out_h, merged]);
        add(format!("{prefix}.linear_fc2.bias"), &[out_h]);
    }

    let (h, inter, hd) = (n(t, "hidden_size"), n(t, "intermediate_size"), n(t, "head_dim"));
    let (q, kv) = (n(t, "num_attention_heads") * hd, n(t, "num_key_value_heads") * hd);
    assert_eq!(config["tie_word_embeddings"], json!(true), "this rule knows tied checkpoints only");
    add("model.language_model.embed_tokens.weight".into(), &[n(t, "vocab_size"), h]);
    add("model.language_model.norm.weight".into(), &[h]);
    for i in 0..n(t, "num_hidden_layers") {
        let l = format!("model.language_model.layers.{i}");
        add(format!("{l}.input_layernorm.weight"), &[h]);
        add(format!("{l}.post_attention_layernorm.weight"), &[h]);
        add(format!("{l}.self_attn.q_proj.weight"), &[q, h]);
        add(format!("{l}.self_attn.k_proj.weight"), &[kv, h]);
        add(format!("{l}.self_attn.v_proj.weight"), &[kv, h]);
        add(format!("{l}.self_attn.o_proj.weight"), &[h, q]);
        add(format!("{l}.self_attn.q_norm.weight"), &[hd]);
        add(format!("{l}.self_attn.k_norm.weight"), &[hd]);
        add(format!("{l}.mlp.gate_proj.weight"), &[inter, h]);
        add(format!("{l}.mlp.up_proj.weight"), &[inter, h]);
        add(format!("{l}.mlp.down_proj.weight"), &[h, inter]);
    }
    out
}

fn assert_checkpoint_matches_config(dir: &Path) {
    let config = read_json(&dir.join("config.json"));
    let (tensors, metadata) = safetensors_header(&dir.join("model.safetensors"));
    assert_eq!(metadata, json!({"format": "pt"}));
    assert!(tensors.values().all(|(dtype, _)| dtype == "F32"));
    let actual: BTreeMap<String, Vec<usize>> = tensors.into_iter().map(|(k, (_, s))| (k, s)).collect();
    let expected = expected_tensors(&config);
    let missing: Vec<_> = expected.keys().filter(|k| !actual.contains_key(*k)).collect();
    let extra: Vec<_> = actual.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{}: missing {missing:?}, extra {extra:?}", dir.display());
    for (name, shape) in &expected {
        assert_eq!(&actual[name], shape, "{}: {name}", dir.display());
    }
}

#[test]
fn expected_tensor_rule_matches_the_hf_saved_fixture() {
    let fixtures = fixtures_or_skip!();
    assert_checkpoint_matches_config(&fixtures.join("qwen3-vl-tiny"));
}

#[test]
fn demo_checkpoint_has_exactly_the_hf_tensors() {
    let model = demo_dir().join("model");
    assert_checkpoint_matches_config(&model);

    // The weights are finite and initialised as documented (loose statistical checks).
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let values = |name: &str| -> Vec<f32> {
        let view = st.tensor(name).unwrap();
        view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let stats = |xs: &[f32]| {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    for name in st.names() {
        assert!(values(name).iter().all(|x| x.is_finite()), "{name}");
    }
    let (mean, std) = stats(&values("model.language_model.embed_tokens.weight"));
    assert!(mean.abs() < 0.01 && (std - 0.125).abs() < 0.01, "embed_tokens: mean {mean}, std {std}");
    let (mean, std) = stats(&values("model.language_model.layers.0.mlp.down_proj.weight"));
    assert!(mean.abs() < 0.01 && (std - 1.0 / 128f64.sqrt()).abs() < 0.01, "down_proj: mean {mean}, std {std}");
    let (mean, std) = stats(&values("model.visual.pos_embed.weight"));
    assert!(mean.abs() < 0.1 && (std - 1.0).abs() < 0.1, "pos_embed: mean {mean}, std {std}");
    let (mean, std) = stats(&values("model.language_model.norm.weight"));
    assert!((mean - 1.0).abs() < 0.05 && std < 0.2, "norm: mean {mean}, std {std}");
}

#[test]
fn demo_config_is_in_the_released_layout() {
    let model = demo_dir().join("model");
    let config = read_json(&model.join("config.json"));
    let t = &config["text_config"];
    let section: usize =
        t["rope_scaling"]["mrope_section"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).sum();
    assert_eq!(section * 2, t["head_dim"].as_u64().unwrap() as usize);
    assert_eq!(t["rope_scaling"]["mrope_interleaved"], json!(true));
    assert_eq!(config["vision_config"]["out_hidden_size"], t["hidden_size"]);
    let pos = config["vision_config"]["num_position_embeddings"].as_u64().unwrap();
    assert_eq!(((pos as f64).sqrt() as u64).pow(2), pos);

    // Same keys as the HF-saved fixture config, at every level.
    if let Some(fixtures) = common::fixtures() {
        let fixture = read_json(&fixtures.join("qwen3-vl-tiny/config.json"));
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&config), keys(&fixture));
        for sub in ["text_config", "vision_config"] {
            assert_eq!(keys(&config[sub]), keys(&fixture[sub]), "{sub}");
        }
        for file in [
            "preprocessor_config.json",
            "video_preprocessor_config.json",
            "generation_config.json",
            "tokenizer_config.json",
        ] {
            let (ours, theirs) = (read_json(&model.join(file)), read_json(&fixtures.join("qwen3-vl-tiny").join(file)));
            assert_eq!(keys(&ours), keys(&theirs), "{file}");
        }
    }

    let pre = read_json(&model.join("preprocessor_config.json"));
    assert_eq!(pre["size"], json!({"longest_edge": 65536, "shortest_edge": 4096}));
    assert_eq!(pre["patch_size"], config["vision_config"]["patch_size"]);
    assert_eq!(pre["merge_size"], config["vision_config"]["spatial_merge_size"]);
    assert_eq!(pre["temporal_patch_size"], config["vision_config"]["temporal_patch_size"]);
    assert_eq!(pre["processor_class"], "Qwen3VLProcessor");
}

// ---- images and captions ----

#[test]
fn captions_json_is_coco_and_every_image_decodes_as_listed() {
    let dir = demo_dir();
    let coco = read_json(&dir.join("captions.json"));
    for key in ["info", "licenses", "images", "annotations"] {
        assert!(coco.get(key).is_some(), "captions.json has no '{key}'");
    }
    let images = coco["images"].as_array().unwrap();
    let annotations = coco["annotations"].as_array().unwrap();
    assert!(images.len() >= 8);
    assert_eq!(annotations.len(), 2 * images.len());

    let mut colors = Vec::new();
    let (mut jpeg, mut png) = (0, 0);
    for entry in images {
        let id = entry["id"].as_i64().unwrap();
        let file = entry["file_name"].as_str().unwrap();
        assert_eq!(file.split('.').next().unwrap(), format!("{id:012}"));
        let path: PathBuf = dir.join("images").join(file);
        let img = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            (img.width() as u64, img.height() as u64),
            (entry["width"].as_u64().unwrap(), entry["height"].as_u64().unwrap()),
            "{file}"
        );
        match image::ImageFormat::from_path(&path).unwrap() {
            image::ImageFormat::Jpeg => jpeg += 1,
            image::ImageFormat::Png => png += 1,
            other => panic!("{file}: {other:?}"),
        }
        colors.push(img.color());
        if img.color() == image::ColorType::Rgba8 {
            let alpha: Vec<u8> = img.to_rgba8().pixels().map(|p| p[3]).collect();
            assert!(alpha.contains(&0) && alpha.contains(&255) && alpha.iter().any(|&a| a > 0 && a < 255), "{file}");
        }
        let ids: Vec<i64> = annotations
            .iter()
            .filter(|a| a["image_id"].as_i64() == Some(id))
            .map(|a| {
                assert!(!a["caption"].as_str().unwrap().trim().is_empty());
                a["id"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(ids, [id * 10 + 1, id * 10 + 2], "annotation ids of image {id}");
    }
    assert!(jpeg > 0 && png > 0);
    assert!(colors.contains(&image::ColorType::L8), "a grayscale image");
    assert!(colors.contains(&image::ColorType::Rgba8), "an RGBA image");
    assert!(
        images.iter().any(|e| e["width"].as_u64().unwrap() * e["height"].as_u64().unwrap() < 32 * 32 * 4),
        "a tiny image"
    );
    assert!(
        images.iter().any(|e| e["width"].as_u64().unwrap() * e["height"].as_u64().unwrap() > 65536),
        "an image over max_pixels"
    );
}
