//! Qwen3-VL configuration, as HF `configuration_qwen3_vl.py` reads `config.json`.
//!
//! Two spellings of the same thing are accepted: the released (transformers 4.57) layout with
//! `text_config.rope_scaling {mrope_section, mrope_interleaved, rope_type}` + `text_config.rope_theta`
//! and `torch_dtype`, and the transformers-5 layout with `text_config.rope_parameters {rope_theta,
//! mrope_section, ...}` and `dtype`. Field names are the HF keys verbatim.
//!
//! The mixture-of-experts variant (`model_type: "qwen3_vl_moe"`, HF `configuration_qwen3_vl_moe.py`,
//! e.g. Qwen3-VL-30B-A3B) adds the expert keys to `text_config`; transformers 5 spells
//! `num_experts` as `num_local_experts`.

use serde::Deserialize;

fn default_image_token_id() -> u32 {
    151655
}
fn default_video_token_id() -> u32 {
    151656
}
fn default_vision_start_token_id() -> u32 {
    151652
}
fn default_vision_end_token_id() -> u32 {
    151653
}
fn default_silu() -> String {
    "silu".to_string()
}
fn default_gelu_tanh() -> String {
    "gelu_pytorch_tanh".to_string()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    128000
}

/// `text_config.rope_scaling` (released layout) or `text_config.rope_parameters` (transformers 5).
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
pub struct RopeConfig {
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Older spelling of `rope_type` (Qwen2-VL: `"type": "mrope"`).
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
    #[serde(default)]
    pub mrope_interleaved: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (HF backward compatibility).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    /// Not used for any allocation (there is no KV cache); kept for completeness.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeConfig>,
    #[serde(default)]
    pub rope_parameters: Option<RopeConfig>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// Experts per sparse MoE layer (MoE only).
    #[serde(default, alias = "num_local_experts")]
    pub num_experts: Option<usize>,
    /// Experts each token is routed to (top-k; MoE only).
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    /// Width of one expert's SwiGLU (MoE only); dense layers use `intermediate_size`.
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    /// Every `decoder_sparse_step`-th layer is sparse (HF: `(i + 1) % step == 0`).
    #[serde(default = "default_sparse_step")]
    pub decoder_sparse_step: usize,
    /// Layers that keep the dense MLP.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Renormalise the top-k router probabilities to sum 1. transformers 5.24 does not read this
    /// key and always renormalises; vLLM follows it. Released MoE configs say `true`.
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
}

fn default_sparse_step() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    #[serde(default = "default_gelu_tanh")]
    pub hidden_act: String,
    pub intermediate_size: usize,
    pub num_heads: usize,
    #[serde(default = "default_in_channels", alias = "in_chans")]
    pub in_channels: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_merge_size")]
    pub spatial_merge_size: usize,
    #[serde(default = "default_temporal_patch_size")]
    pub temporal_patch_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    #[serde(default)]
    pub deepstack_visual_indexes: Vec<usize>,
}

fn default_in_channels() -> usize {
    3
}
fn default_patch_size() -> usize {
    16
}
fn default_merge_size() -> usize {
    2
}
fn default_temporal_patch_size() -> usize {
    2
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    #[serde(default = "default_image_token_id")]
    pub image_token_id: u32,
    #[serde(default = "default_video_token_id")]
    pub video_token_id: u32,
    #[serde(default = "default_vision_start_token_id")]
    pub vision_start_token_id: u32,
    #[serde(default = "default_vision_end_token_id")]
    pub vision_end_token_id: u32,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
}

/// HF `Qwen3VLTextConfig.default_theta`, used when no `rope_theta` is given anywhere.
pub const DEFAULT_ROPE_THETA: f64 = 500000.0;
/// HF `Qwen3VLTextRotaryEmbedding`: `rope_parameters.get("mrope_section", [24, 20, 20])`.
pub const DEFAULT_MROPE_SECTION: [usize; 3] = [24, 20, 20];

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The rope dict in force: transformers-5 `rope_parameters` wins over released `rope_scaling`.
    fn rope(&self) -> Option<&RopeConfig> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .or(self.rope_scaling.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    pub fn rope_type(&self) -> &str {
        self.rope().and_then(|r| r.rope_type.as_deref().or(r.type_.as_deref())).unwrap_or("default")
    }

    pub fn mrope_section(&self) -> Vec<usize> {
        self.rope().and_then(|r| r.mrope_section.clone()).unwrap_or_else(|| DEFAULT_MROPE_SECTION.to_vec())
    }

    pub fn mrope_interleaved(&self) -> Option<bool> {
        self.rope().and_then(|r| r.mrope_interleaved)
    }
}

/// Sizes of one sparse MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    pub experts: usize,
    pub top_k: usize,
    pub intermediate: usize,
    pub norm_topk_prob: bool,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Elements of one flattened `(C, T, P, P)` patch: the patch embedding's `in_features`.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Side of the square learned position-embedding grid.
    pub fn num_grid_per_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }

    /// Width of a merged token before the merger MLP: `hidden * merge²`.
    pub fn merged_dim(&self) -> usize {
        self.hidden_size * self.spatial_merge_size * self.spatial_merge_size
    }
}

impl Config {
    pub fn from_json_str(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// Whether `lm_head` shares `embed_tokens`' weight. The text config's value governs (as in
    /// transformers' `get_text_config().tie_word_embeddings`), then the top level; HF's default is
    /// untied.
    pub fn tie_word_embeddings(&self) -> bool {
        self.text_config.tie_word_embeddings.or(self.tie_word_embeddings).unwrap_or(false)
    }

    /// The checkpoint's declared dtype (`dtype` or `torch_dtype`), if any.
    pub fn declared_dtype(&self) -> Option<&str> {
        self.dtype
            .as_deref()
            .or(self.torch_dtype.as_deref())
            .or(self.text_config.dtype.as_deref())
            .or(self.text_config.torch_dtype.as_deref())
    }

    /// Whether this is the mixture-of-experts model (`qwen3_vl_moe`; without a `model_type`,
    /// whether `text_config` names experts).
    pub fn is_moe(&self) -> bool {
        match self.model_type.as_deref() {
            Some(mt) => mt == "qwen3_vl_moe",
            None => self.text_config.num_experts.is_some_and(|e| e > 0),
        }
    }

    /// The expert layout when decoder layer `i` is a sparse MoE block (HF
    /// `Qwen3VLMoeTextDecoderLayer`: not in `mlp_only_layers`, experts > 0 and
    /// `(i + 1) % decoder_sparse_step == 0`); `None` for a dense MLP.
    pub fn moe_layer(&self, i: usize) -> Option<MoeShape> {
        let t = &self.text_config;
        let experts = t.num_experts.filter(|&e| e > 0 && self.is_moe())?;
        if t.mlp_only_layers.contains(&i) || t.decoder_sparse_step == 0 || (i + 1) % t.decoder_sparse_step != 0 {
            return None;
        }
        Some(MoeShape {
            experts,
            top_k: t.num_experts_per_tok?,
            intermediate: t.moe_intermediate_size?,
            norm_topk_prob: t.norm_topk_prob.unwrap_or(true),
        })
    }

    /// Refuses what this implementation does not reproduce, with a message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        self.validate_sizes()?;
        if let Some(mt) = self.model_type.as_deref() {
            if mt != "qwen3_vl" && mt != "qwen3_vl_moe" {
                return Err(format!("model_type `{mt}` is not supported (expected `qwen3_vl` or `qwen3_vl_moe`)"));
            }
        }
        if self.is_moe() {
            self.validate_moe()?;
        }
        if t.hidden_act != "silu" {
            return Err(format!("text_config.hidden_act `{}` is not supported (only `silu`)", t.hidden_act));
        }
        if v.hidden_act != "gelu_pytorch_tanh" {
            return Err(format!(
                "vision_config.hidden_act `{}` is not supported (only `gelu_pytorch_tanh`)",
                v.hidden_act
            ));
        }
        match t.rope_type() {
            "default" | "mrope" => {}
            other => return Err(format!("rope_type `{other}` is not supported (only `default`)")),
        }
        if t.mrope_interleaved() == Some(false) {
            return Err("mrope_interleaved = false (chunked MRoPE) is not supported; Qwen3-VL interleaves".into());
        }
        let hd = t.head_dim();
        if hd % 2 != 0 {
            return Err(format!("text head_dim {hd} must be even"));
        }
        let sec = t.mrope_section();
        if sec.len() != 3 {
            return Err(format!("mrope_section {sec:?} must have 3 entries"));
        }
        if sec.iter().sum::<usize>() != hd / 2 {
            return Err(format!("mrope_section {sec:?} must sum to head_dim/2 = {}", hd / 2));
        }
        let kv = t.num_key_value_heads();
        if kv == 0 || t.num_attention_heads % kv != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                t.num_attention_heads
            ));
        }
        if v.num_heads == 0 || v.hidden_size % v.num_heads != 0 {
            return Err(format!("vision hidden_size {} not divisible by num_heads {}", v.hidden_size, v.num_heads));
        }
        if v.head_dim() % 4 != 0 {
            return Err(format!("vision head_dim {} must be a multiple of 4 (2-D rotary)", v.head_dim()));
        }
        let side = v.num_grid_per_side();
        if side * side != v.num_position_embeddings || side < 1 {
            return Err(format!("num_position_embeddings {} is not a perfect square", v.num_position_embeddings));
        }
        if v.spatial_merge_size == 0 {
            return Err("spatial_merge_size must be positive".into());
        }
        for &i in &v.deepstack_visual_indexes {
            if i >= v.depth {
                return Err(format!(
                    "deepstack_visual_indexes {:?} has an index >= vision depth {}",
                    v.deepstack_visual_indexes, v.depth
                ));
            }
        }
        let mut sorted = v.deepstack_visual_indexes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != v.deepstack_visual_indexes.len() {
            return Err(format!("deepstack_visual_indexes {:?} has duplicates", v.deepstack_visual_indexes));
        }
        Ok(())
    }

    /// The expert keys a sparse layer needs, in range; top-k at most the number of experts.
    fn validate_moe(&self) -> Result<(), String> {
        let t = &self.text_config;
        let required = [
            ("text_config.num_experts", t.num_experts),
            ("text_config.num_experts_per_tok", t.num_experts_per_tok),
            ("text_config.moe_intermediate_size", t.moe_intermediate_size),
        ];
        for (name, value) in required {
            match value {
                None => return Err(format!("{name} is missing (required for qwen3_vl_moe)")),
                Some(v) if v == 0 || v > MAX_DIM => {
                    return Err(format!("{name} = {v} is out of range (1 to {MAX_DIM})"))
                }
                Some(_) => {}
            }
        }
        let (experts, top_k) = (t.num_experts.unwrap_or(0), t.num_experts_per_tok.unwrap_or(0));
        if top_k > experts {
            return Err(format!("text_config.num_experts_per_tok = {top_k} exceeds num_experts = {experts}"));
        }
        if t.decoder_sparse_step == 0 {
            return Err("text_config.decoder_sparse_step = 0 is out of range (at least 1)".into());
        }
        Ok(())
    }

    /// Every size within sane bounds (so no derived size overflows and nothing absurd is
    /// allocated), positive where a zero would divide or make empty tensors, and the numbers
    /// finite. Runs before anything else looks at the sizes.
    fn validate_sizes(&self) -> Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let sizes = [
            ("text_config.vocab_size", t.vocab_size, MAX_DIM),
            ("text_config.hidden_size", t.hidden_size, MAX_DIM),
            ("text_config.intermediate_size", t.intermediate_size, MAX_DIM),
            ("text_config.num_attention_heads", t.num_attention_heads, MAX_DIM),
            ("text_config.num_key_value_heads", t.num_key_value_heads(), MAX_DIM),
            ("vision_config.hidden_size", v.hidden_size, MAX_DIM),
            ("vision_config.intermediate_size", v.intermediate_size, MAX_DIM),
            ("vision_config.num_heads", v.num_heads, MAX_DIM),
            ("vision_config.out_hidden_size", v.out_hidden_size, MAX_DIM),
            ("vision_config.num_position_embeddings", v.num_position_embeddings, MAX_DIM),
            ("vision_config.in_channels", v.in_channels, MAX_CHANNELS),
            ("vision_config.patch_size", v.patch_size, MAX_PATCH),
            ("vision_config.temporal_patch_size", v.temporal_patch_size, MAX_MERGE),
            ("vision_config.spatial_merge_size", v.spatial_merge_size, MAX_MERGE),
        ];
        for (name, value, max) in sizes {
            if value == 0 || value > max {
                return Err(format!("{name} = {value} is out of range (1 to {max})"));
            }
        }
        let layers = [("text_config.num_hidden_layers", t.num_hidden_layers), ("vision_config.depth", v.depth)];
        for (name, value) in layers {
            if value > MAX_LAYERS {
                return Err(format!("{name} = {value} is out of range (at most {MAX_LAYERS})"));
            }
        }
        match t.head_dim {
            Some(hd) if hd == 0 || hd > MAX_DIM => {
                return Err(format!("text_config.head_dim = {hd} is out of range (1 to {MAX_DIM})"))
            }
            None if t.hidden_size % t.num_attention_heads != 0 => {
                return Err(format!(
                    "text_config.hidden_size {} is not divisible by num_attention_heads {} \
                     and no head_dim is given",
                    t.hidden_size, t.num_attention_heads
                ))
            }
            _ => {}
        }
        if let Some(&s) = t.mrope_section().iter().find(|&&s| s > MAX_DIM) {
            return Err(format!("mrope_section entry {s} is out of range"));
        }
        if !(t.rms_norm_eps.is_finite() && t.rms_norm_eps >= 0.0) {
            return Err(format!("text_config.rms_norm_eps = {} must be a finite number >= 0", t.rms_norm_eps));
        }
        let theta = t.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta = {theta} must be a finite positive number"));
        }
        Ok(())
    }
}

/// Bounds on config sizes: generous (Qwen3-VL-235B has hidden 4096, vocab 151936, 94 layers),
/// yet small enough that no derived size (`heads × head_dim`, `hidden × merge²`, a weight's
/// element count) overflows.
pub const MAX_DIM: usize = 1 << 24;
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_CHANNELS: usize = 16;
pub const MAX_PATCH: usize = 1024;
pub const MAX_MERGE: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    const RELEASED: &str = r#"{
      "architectures": ["Qwen3VLForConditionalGeneration"],
      "image_token_id": 151655, "model_type": "qwen3_vl",
      "text_config": {
        "attention_bias": false, "dtype": "float32", "head_dim": 32, "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": 4, "num_hidden_layers": 3,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": true, "mrope_section": [6, 5, 5], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": true, "vocab_size": 151936
      },
      "tie_word_embeddings": true, "torch_dtype": "float32",
      "video_token_id": 151656,
      "vision_config": {
        "deepstack_visual_indexes": [0, 1], "depth": 3, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32, "in_channels": 3, "intermediate_size": 64, "model_type": "qwen3_vl",
        "num_heads": 2, "num_position_embeddings": 64, "out_hidden_size": 64, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2
      },
      "vision_end_token_id": 151653, "vision_start_token_id": 151652
    }"#;

    const TF5: &str = r#"{
      "model_type": "qwen3_vl", "dtype": "bfloat16",
      "text_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": [6, 5, 5], "mrope_interleaved": true}
      },
      "vision_config": {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_chans": 3,
        "out_hidden_size": 64, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]
      }
    }"#;

    /// `qwen3-vl-moe-tiny/config.json` (the released Qwen3-VL-30B-A3B key tree, tiny sizes).
    const RELEASED_MOE: &str = r#"{
      "architectures": ["Qwen3VLMoeForConditionalGeneration"],
      "image_token_id": 151655, "model_type": "qwen3_vl_moe",
      "text_config": {
        "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "dtype": "float32", "eos_token_id": 151645, "head_dim": 32,
        "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 128,
        "max_position_embeddings": 262144, "mlp_only_layers": [1], "model_type": "qwen3_vl_moe_text",
        "moe_intermediate_size": 48, "norm_topk_prob": true, "num_attention_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": true, "mrope_section": [6, 5, 5], "rope_type": "default"},
        "rope_theta": 5000000, "use_cache": true, "vocab_size": 151936
      },
      "tie_word_embeddings": false, "transformers_version": "5.24.0", "video_token_id": 151656,
      "vision_config": {
        "deepstack_visual_indexes": [0, 1], "depth": 3, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64,
        "model_type": "qwen3_vl_moe", "num_heads": 2, "num_position_embeddings": 64,
        "out_hidden_size": 32, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2
      },
      "vision_end_token_id": 151653, "vision_start_token_id": 151652
    }"#;

    /// transformers-5 spelling (as its `save_pretrained` writes it): `num_local_experts`,
    /// `rope_parameters`, no `norm_topk_prob`, every other layer sparse.
    const TF5_MOE: &str = r#"{
      "model_type": "qwen3_vl_moe", "dtype": "bfloat16",
      "text_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000, "decoder_sparse_step": 2,
        "num_local_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 24,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": [6, 5, 5], "mrope_interleaved": true}
      },
      "vision_config": {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
        "out_hidden_size": 64, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]
      }
    }"#;

    #[test]
    fn parses_released_moe_layout() {
        let c = Config::from_json_str(RELEASED_MOE).unwrap();
        c.validate().unwrap();
        assert!(c.is_moe());
        assert!(!c.tie_word_embeddings());
        assert_eq!(c.text_config.rope_theta(), 5_000_000.0);
        assert_eq!(c.text_config.mrope_section(), vec![6, 5, 5]);
        let sparse = MoeShape { experts: 8, top_k: 2, intermediate: 48, norm_topk_prob: true };
        assert_eq!(c.moe_layer(0), Some(sparse));
        assert_eq!(c.moe_layer(1), None, "mlp_only_layers keeps layer 1 dense");
        assert_eq!(c.moe_layer(2), Some(sparse));
    }

    #[test]
    fn parses_transformers5_moe_layout() {
        let c = Config::from_json_str(TF5_MOE).unwrap();
        c.validate().unwrap();
        assert!(c.is_moe());
        assert_eq!(c.text_config.rope_theta(), 1_000_000.0);
        assert_eq!(c.text_config.num_experts, Some(16), "num_local_experts is num_experts");
        let sparse = MoeShape { experts: 16, top_k: 4, intermediate: 24, norm_topk_prob: true };
        let layers: Vec<_> = (0..4).map(|i| c.moe_layer(i)).collect();
        assert_eq!(layers, vec![None, Some(sparse), None, Some(sparse)], "(i + 1) % decoder_sparse_step");
        // The dense model never has experts, whatever its text_config says.
        let dense = Config::from_json_str(&TF5_MOE.replace("qwen3_vl_moe", "qwen3_vl")).unwrap();
        assert!(!dense.is_moe());
        assert_eq!(dense.moe_layer(1), None);
    }

    #[test]
    fn rejects_bad_moe_settings() {
        let mut c = Config::from_json_str(RELEASED_MOE).unwrap();
        c.text_config.num_experts_per_tok = Some(9);
        assert_eq!(c.validate().unwrap_err(), "text_config.num_experts_per_tok = 9 exceeds num_experts = 8");

        let mut c = Config::from_json_str(RELEASED_MOE).unwrap();
        c.text_config.moe_intermediate_size = None;
        assert!(c.validate().unwrap_err().contains("moe_intermediate_size is missing"));

        let mut c = Config::from_json_str(RELEASED_MOE).unwrap();
        c.text_config.num_experts = Some(0);
        assert!(c.validate().unwrap_err().contains("num_experts = 0"));

        let mut c = Config::from_json_str(RELEASED_MOE).unwrap();
        c.text_config.decoder_sparse_step = 0;
        assert!(c.validate().unwrap_err().contains("decoder_sparse_step"));

        let mut c = Config::from_json_str(RELEASED_MOE).unwrap();
        c.model_type = Some("qwen3_moe".into());
        assert!(c.validate().unwrap_err().contains("qwen3_moe"));
    }

    #[test]
    fn parses_released_layout() {
        let c = Config::from_json_str(RELEASED).unwrap();
        c.validate().unwrap();
        assert_eq!(c.text_config.rope_theta(), 5_000_000.0);
        assert_eq!(c.text_config.mrope_section(), vec![6, 5, 5]);
        assert_eq!(c.text_config.mrope_interleaved(), Some(true));
        assert_eq!(c.text_config.head_dim(), 32);
        assert_eq!(c.text_config.num_key_value_heads(), 2);
        assert!(c.tie_word_embeddings());
        assert_eq!(c.declared_dtype(), Some("float32"));
        assert_eq!(c.vision_config.num_grid_per_side(), 8);
        assert_eq!(c.vision_config.patch_dim(), 1536);
        assert_eq!(c.image_token_id, 151655);
    }

    #[test]
    fn parses_transformers5_layout() {
        let c = Config::from_json_str(TF5).unwrap();
        c.validate().unwrap();
        assert_eq!(c.text_config.rope_theta(), 1_000_000.0);
        assert_eq!(c.text_config.mrope_section(), vec![6, 5, 5]);
        assert!(!c.tie_word_embeddings(), "HF default is untied");
        assert_eq!(c.declared_dtype(), Some("bfloat16"));
        assert_eq!(c.vision_config.in_channels, 3);
        assert_eq!(c.vision_config.hidden_act, "gelu_pytorch_tanh");
        assert_eq!(c.text_config.hidden_act, "silu");
        assert_eq!(c.image_token_id, 151655);
        assert_eq!(c.text_config.rms_norm_eps, 1e-6);
    }

    #[test]
    fn rejects_unsupported() {
        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.rope_scaling.as_mut().unwrap().rope_type = Some("yarn".into());
        assert!(c.validate().unwrap_err().contains("yarn"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.rope_scaling.as_mut().unwrap().mrope_section = Some(vec![8, 5, 5]);
        assert!(c.validate().unwrap_err().contains("mrope_section"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.hidden_act = "gelu".into();
        assert!(c.validate().unwrap_err().contains("hidden_act"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.vision_config.deepstack_visual_indexes = vec![0, 3];
        assert!(c.validate().unwrap_err().contains("deepstack"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.rope_scaling.as_mut().unwrap().mrope_interleaved = Some(false);
        assert!(c.validate().unwrap_err().contains("mrope_interleaved"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.vision_config.deepstack_visual_indexes = vec![0, 1, 0];
        assert!(c.validate().unwrap_err().contains("duplicates"));
    }

    #[test]
    fn rejects_absurd_sizes_without_panicking() {
        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.num_attention_heads = 0;
        c.text_config.head_dim = None;
        assert!(c.validate().unwrap_err().contains("num_attention_heads = 0"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.head_dim = None;
        c.text_config.hidden_size = 66;
        assert!(c.validate().unwrap_err().contains("not divisible"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.vocab_size = 1_000_000_000_000;
        assert!(c.validate().unwrap_err().contains("vocab_size"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.vision_config.spatial_merge_size = usize::MAX;
        assert!(c.validate().unwrap_err().contains("spatial_merge_size"));

        let mut c = Config::from_json_str(RELEASED).unwrap();
        c.text_config.rope_scaling.as_mut().unwrap().mrope_section = Some(vec![usize::MAX, 2, 2]);
        assert!(c.validate().unwrap_err().contains("mrope_section"));
    }
}
