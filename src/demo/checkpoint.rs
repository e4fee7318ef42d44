//! The demo checkpoint: a tiny Qwen3-VL with seeded random weights, in the released HF layout.
//!
//! Files and key names follow the released Qwen3-VL-Instruct repositories (transformers 4.57
//! layout: `text_config.rope_scaling`, `torch_dtype`); the tensor names and shapes are those
//! `Qwen3VLForConditionalGeneration` saves (`model.visual.*`, `model.language_model.*`, no
//! `lm_head.weight` since the embeddings are tied).
//!
//! Weights: one ChaCha8 generator seeded with [`SEED`] visits the parameters in HF's
//! `named_modules()` order and draws standard normals (`rand_distr::StandardNormal`):
//! Linear/Conv weights N(0,1)/√fan_in, every bias 0.1·N(0,1), LayerNorm/RMSNorm weights
//! 1 + 0.1·N(0,1), `embed_tokens` N(0,1)/√hidden (it is also the lm_head), `pos_embed` N(0,1).

use std::collections::HashMap;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use super::tokenizer::DemoTokenizer;

/// Seed of the weight generator.
pub const SEED: u64 = 0;

/// The chat template (ours; renders like Qwen3-VL-Instruct's for system/user/assistant turns).
pub const CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// Smallest and largest image area in pixels (`size.shortest_edge`, `size.longest_edge`):
/// 4 to 64 merged image tokens per image (one token covers 32×32 pixels).
pub const MIN_PIXELS: u32 = 4096;
pub const MAX_PIXELS: u32 = 65536;

/// Model dimensions (the `config.json` values).
#[derive(Debug, Clone, PartialEq)]
pub struct Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// T, H, W frequency counts; they sum to `head_dim / 2`.
    pub mrope_section: [usize; 3],
    pub rope_theta: f64,
    pub vision_depth: usize,
    pub vision_hidden: usize,
    pub vision_heads: usize,
    pub vision_intermediate: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    /// A square number: the learned position grid is √n × √n, interpolated to each image.
    pub num_position_embeddings: usize,
    pub deepstack_indexes: Vec<usize>,
}

impl Dims {
    /// The demo model: 4 text layers of width 64, a 4-block ViT of width 32. It differs on
    /// purpose from the test fixture (3 layers, head_dim 32, an 8×8 position grid), so code that
    /// hard-codes the fixture's sizes fails on the demo. The 12×12 position grid is larger than
    /// the demo's smallest images' patch grids (interpolated down) and smaller than the largest.
    pub fn demo() -> Self {
        Dims {
            hidden: 64,
            intermediate: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            mrope_section: [4, 2, 2],
            rope_theta: 5_000_000.0,
            vision_depth: 4,
            vision_hidden: 32,
            vision_heads: 2,
            vision_intermediate: 64,
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
            num_position_embeddings: 144,
            deepstack_indexes: vec![1, 2],
        }
    }
}

/// `vocab_size`: the tokenizer's size rounded up to a multiple of 64 (the real model pads too:
/// 151669 tokens, 151936 rows). The padding rows are never produced by the tokenizer.
pub fn vocab_size(tokenizer: &DemoTokenizer) -> usize {
    tokenizer.len().div_ceil(64) * 64
}

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Linear/Conv weight: N(0,1)/√fan_in.
    Weight { fan_in: usize },
    /// 0.1·N(0,1).
    Bias,
    /// 1 + 0.1·N(0,1).
    Norm,
    /// N(0,1)/√hidden.
    Embed { hidden: usize },
    /// N(0,1).
    Normal,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Every tensor of the checkpoint, in HF `named_modules()` / parameter registration order.
pub fn tensor_specs(d: &Dims, vocab_size: usize) -> Vec<TensorSpec> {
    let mut s = Specs(Vec::new());
    // Vision tower (Qwen3VLVisionModel).
    let v = "model.visual";
    let (vh, ps, tps) = (d.vision_hidden, d.patch_size, d.temporal_patch_size);
    let fan_in = 3 * tps * ps * ps;
    s.push(format!("{v}.patch_embed.proj.weight"), vec![vh, 3, tps, ps, ps], Init::Weight { fan_in });
    s.push(format!("{v}.patch_embed.proj.bias"), vec![vh], Init::Bias);
    s.push(format!("{v}.pos_embed.weight"), vec![d.num_position_embeddings, vh], Init::Normal);
    for i in 0..d.vision_depth {
        let b = format!("{v}.blocks.{i}");
        s.layer_norm(&format!("{b}.norm1"), vh);
        s.layer_norm(&format!("{b}.norm2"), vh);
        s.linear(&format!("{b}.attn.qkv"), 3 * vh, vh, true);
        s.linear(&format!("{b}.attn.proj"), vh, vh, true);
        s.linear(&format!("{b}.mlp.linear_fc1"), d.vision_intermediate, vh, true);
        s.linear(&format!("{b}.mlp.linear_fc2"), vh, d.vision_intermediate, true);
    }
    // The merger normalises before the 2×2 shuffle, the deepstack mergers after it.
    let merged = vh * d.merge_size * d.merge_size;
    s.layer_norm(&format!("{v}.merger.norm"), vh);
    s.linear(&format!("{v}.merger.linear_fc1"), merged, merged, true);
    s.linear(&format!("{v}.merger.linear_fc2"), d.hidden, merged, true);
    for j in 0..d.deepstack_indexes.len() {
        let m = format!("{v}.deepstack_merger_list.{j}");
        s.layer_norm(&format!("{m}.norm"), merged);
        s.linear(&format!("{m}.linear_fc1"), merged, merged, true);
        s.linear(&format!("{m}.linear_fc2"), d.hidden, merged, true);
    }

    // Text tower (Qwen3VLTextModel).
    let t = "model.language_model";
    s.push(format!("{t}.embed_tokens.weight"), vec![vocab_size, d.hidden], Init::Embed { hidden: d.hidden });
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    for i in 0..d.layers {
        let l = format!("{t}.layers.{i}");
        s.linear(&format!("{l}.self_attn.q_proj"), q, d.hidden, false);
        s.linear(&format!("{l}.self_attn.k_proj"), kv, d.hidden, false);
        s.linear(&format!("{l}.self_attn.v_proj"), kv, d.hidden, false);
        s.linear(&format!("{l}.self_attn.o_proj"), d.hidden, q, false);
        s.push(format!("{l}.self_attn.q_norm.weight"), vec![d.head_dim], Init::Norm);
        s.push(format!("{l}.self_attn.k_norm.weight"), vec![d.head_dim], Init::Norm);
        s.linear(&format!("{l}.mlp.gate_proj"), d.intermediate, d.hidden, false);
        s.linear(&format!("{l}.mlp.up_proj"), d.intermediate, d.hidden, false);
        s.linear(&format!("{l}.mlp.down_proj"), d.hidden, d.intermediate, false);
        s.push(format!("{l}.input_layernorm.weight"), vec![d.hidden], Init::Norm);
        s.push(format!("{l}.post_attention_layernorm.weight"), vec![d.hidden], Init::Norm);
    }
    s.push(format!("{t}.norm.weight"), vec![d.hidden], Init::Norm);
    s.0
}

struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.0.push(TensorSpec { name, shape, init });
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) {
        self.push(format!("{prefix}.weight"), vec![out, inp], Init::Weight { fan_in: inp });
        if bias {
            self.push(format!("{prefix}.bias"), vec![out], Init::Bias);
        }
    }

    fn layer_norm(&mut self, prefix: &str, n: usize) {
        self.push(format!("{prefix}.weight"), vec![n], Init::Norm);
        self.push(format!("{prefix}.bias"), vec![n], Init::Bias);
    }
}

/// Draws the weights (one generator, [`tensor_specs`] order) and serializes them as
/// safetensors (F32, `{"format": "pt"}` metadata, as `save_pretrained` writes).
pub fn model_safetensors(d: &Dims, vocab_size: usize) -> Result<Vec<u8>> {
    let specs = tensor_specs(d, vocab_size);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let (scale, offset) = match spec.init {
                Init::Weight { fan_in } => (1.0 / (fan_in as f64).sqrt(), 0.0),
                Init::Bias => (0.1, 0.0),
                Init::Norm => (0.1, 1.0),
                Init::Embed { hidden } => (1.0 / (hidden as f64).sqrt(), 0.0),
                Init::Normal => (1.0, 0.0),
            };
            (0..n)
                .flat_map(|_| {
                    let z: f64 = rng.sample(StandardNormal);
                    ((offset + scale * z) as f32).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views = specs
        .iter()
        .zip(&data)
        .map(|(spec, bytes)| Ok((spec.name.as_str(), TensorView::new(Dtype::F32, spec.shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .context("building demo tensors")?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(metadata)).context("serializing demo weights")
}

fn pretty(value: &Value) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// `config.json` in the released Qwen3-VL-Instruct layout (keys sorted, as HF writes them).
pub fn config_json(d: &Dims, tokenizer: &DemoTokenizer) -> Result<Vec<u8>> {
    let id = |t: &str| tokenizer.added_id(t);
    let config = json!({
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": id("<|image_pad|>")?,
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": id("<|endoftext|>")?,
            "dtype": "float32",
            "eos_token_id": id("<|im_end|>")?,
            "head_dim": d.head_dim,
            "hidden_act": "silu",
            "hidden_size": d.hidden,
            "initializer_range": 0.02,
            "intermediate_size": d.intermediate,
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": d.heads,
            "num_hidden_layers": d.layers,
            "num_key_value_heads": d.kv_heads,
            "rms_norm_eps": 1e-6,
            "rope_scaling": {
                "mrope_interleaved": true,
                "mrope_section": d.mrope_section,
                "rope_type": "default",
            },
            "rope_theta": d.rope_theta,
            "tie_word_embeddings": true,
            "use_cache": true,
            "vocab_size": vocab_size(tokenizer),
        },
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "transformers_version": "4.57.0",
        "video_token_id": id("<|video_pad|>")?,
        "vision_config": {
            "deepstack_visual_indexes": d.deepstack_indexes,
            "depth": d.vision_depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": d.vision_hidden,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": d.vision_intermediate,
            "model_type": "qwen3_vl",
            "num_heads": d.vision_heads,
            "num_position_embeddings": d.num_position_embeddings,
            "out_hidden_size": d.hidden,
            "patch_size": d.patch_size,
            "spatial_merge_size": d.merge_size,
            "temporal_patch_size": d.temporal_patch_size,
        },
        "vision_end_token_id": id("<|vision_end|>")?,
        "vision_start_token_id": id("<|vision_start|>")?,
    });
    pretty(&config)
}

/// `preprocessor_config.json` (`Qwen2VLImageProcessorFast` keys, a small `max_pixels`).
pub fn preprocessor_config_json(d: &Dims) -> Result<Vec<u8>> {
    // A struct, not `json!`, to keep the released file's key order.
    #[derive(serde::Serialize)]
    struct Size {
        longest_edge: u32,
        shortest_edge: u32,
    }
    #[derive(serde::Serialize)]
    struct Preprocessor {
        size: Size,
        patch_size: usize,
        temporal_patch_size: usize,
        merge_size: usize,
        image_mean: [f64; 3],
        image_std: [f64; 3],
        processor_class: &'static str,
        image_processor_type: &'static str,
    }
    let p = Preprocessor {
        size: Size { longest_edge: MAX_PIXELS, shortest_edge: MIN_PIXELS },
        patch_size: d.patch_size,
        temporal_patch_size: d.temporal_patch_size,
        merge_size: d.merge_size,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
        processor_class: "Qwen3VLProcessor",
        image_processor_type: "Qwen2VLImageProcessorFast",
    };
    let mut bytes = serde_json::to_vec_pretty(&p)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// `video_preprocessor_config.json` (videos are not used; `AutoProcessor` loads it).
pub fn video_preprocessor_config_json(d: &Dims) -> Result<Vec<u8>> {
    pretty(&json!({
        "size": {"longest_edge": 4 * MAX_PIXELS, "shortest_edge": MIN_PIXELS},
        "patch_size": d.patch_size,
        "temporal_patch_size": d.temporal_patch_size,
        "merge_size": d.merge_size,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor",
    }))
}

/// `generation_config.json` (the released sampling defaults, with this tokenizer's ids).
pub fn generation_config_json(tokenizer: &DemoTokenizer) -> Result<Vec<u8>> {
    let eot = tokenizer.added_id("<|endoftext|>")?;
    pretty(&json!({
        "bos_token_id": eot,
        "do_sample": true,
        "eos_token_id": [tokenizer.added_id("<|im_end|>")?, eot],
        "pad_token_id": eot,
        "repetition_penalty": 1.0,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": "4.57.0",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mrope_section_covers_half_the_head() {
        let d = Dims::demo();
        assert_eq!(d.mrope_section.iter().sum::<usize>(), d.head_dim / 2);
        let side = (d.num_position_embeddings as f64).sqrt() as usize;
        assert_eq!(side * side, d.num_position_embeddings);
        assert!(d.deepstack_indexes.iter().all(|&i| i < d.vision_depth));
    }

    #[test]
    fn specs_have_unique_names_and_no_lm_head() {
        let specs = tensor_specs(&Dims::demo(), 384);
        let names: std::collections::BTreeSet<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), specs.len());
        assert!(!names.iter().any(|n| n.contains("lm_head")));
    }
}
