//! What a Qwen3-VL module name says: tower, block index, projection kind (the plot series),
//! and its GGUF tensor name where llama.cpp's text model has one.
//!
//! HF names (transformers ≥ 4.57 layout): `model.visual.patch_embed.proj`,
//! `model.visual.blocks.{i}.attn.{qkv,proj}`, `model.visual.blocks.{i}.mlp.linear_fc{1,2}`,
//! `model.visual.merger.linear_fc{1,2}`, `model.visual.deepstack_merger_list.{k}.linear_fc{1,2}`,
//! `model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj`,
//! `model.language_model.layers.{i}.mlp.{gate,up,down}_proj`, `lm_head`.

/// Classification of one module name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerClass {
    /// `vision`, `text` or `lm_head`.
    pub tower: &'static str,
    /// Index of the ViT block / decoder layer, or of the deepstack merger.
    pub block: Option<usize>,
    /// Projection kind, e.g. `q`, `gate`, `qkv`, `fc1`, `merger.fc1`, `deepstack.fc2`.
    pub series: String,
}

fn index_after(parts: &[&str], key: &str) -> Option<usize> {
    parts.iter().position(|p| *p == key).and_then(|i| parts.get(i + 1)).and_then(|s| s.parse().ok())
}

/// Tower of a module name (used when the scores do not say).
pub fn tower_of(name: &str) -> &'static str {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.contains(&"visual") || parts.contains(&"vision_tower") {
        "vision"
    } else if parts.last() == Some(&"lm_head") {
        "lm_head"
    } else {
        "text"
    }
}

pub fn classify(name: &str) -> LayerClass {
    let parts: Vec<&str> = name.split('.').collect();
    let last = parts.last().copied().unwrap_or(name);
    let tower = tower_of(name);
    let short = |s: &str| -> String {
        match s {
            "linear_fc1" => "fc1".into(),
            "linear_fc2" => "fc2".into(),
            other => other.strip_suffix("_proj").unwrap_or(other).to_string(),
        }
    };
    match tower {
        "lm_head" => LayerClass { tower, block: None, series: "lm_head".into() },
        "vision" => {
            if parts.contains(&"patch_embed") {
                LayerClass { tower, block: None, series: "patch_embed".into() }
            } else if let Some(k) = index_after(&parts, "deepstack_merger_list") {
                LayerClass { tower, block: Some(k), series: format!("deepstack.{}", short(last)) }
            } else if parts.contains(&"merger") {
                LayerClass { tower, block: None, series: format!("merger.{}", short(last)) }
            } else {
                LayerClass { tower, block: index_after(&parts, "blocks"), series: short(last) }
            }
        }
        _ => LayerClass { tower, block: index_after(&parts, "layers"), series: short(last) },
    }
}

/// Series of a group: its members' series joined by `/` (`q/k/v`, `gate/up`).
pub fn group_series(members: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    for m in members {
        let s = classify(m).series;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.join("/")
}

/// GGUF tensor name of a text-model weight (`blk.{i}.attn_q.weight`, `output.weight`), or
/// `None` where llama.cpp's text model file has none (the vision tower goes to the mmproj file).
pub fn gguf_name(name: &str) -> Option<String> {
    gguf_names(name).and_then(|names| (names.len() == 1).then(|| names[0].clone()))
}

/// The GGUF tensor names of a layer: one for a Linear, three for a sparse layer's experts
/// (llama.cpp stores each projection of all experts as one 3-D tensor, `blk.N.ffn_*_exps`).
pub fn gguf_names(name: &str) -> Option<Vec<String>> {
    if let Some(block) = experts_layer(name) {
        return Some(["gate", "up", "down"].iter().map(|p| format!("blk.{block}.ffn_{p}_exps.weight")).collect());
    }
    gguf_linear_name(name).map(|n| vec![n])
}

/// The decoder layer of a sparse layer's experts module (`model.language_model.layers.N.mlp.experts`).
pub fn experts_layer(name: &str) -> Option<usize> {
    name.strip_prefix("model.language_model.layers.")?.strip_suffix(".mlp.experts")?.parse().ok()
}

fn gguf_linear_name(name: &str) -> Option<String> {
    let c = classify(name);
    match c.tower {
        "lm_head" => Some("output.weight".into()),
        "text" => {
            let block = c.block?;
            let kind = match c.series.as_str() {
                "q" => "attn_q",
                "k" => "attn_k",
                "v" => "attn_v",
                "o" => "attn_output",
                "gate" => "ffn_gate",
                "up" => "ffn_up",
                "down" => "ffn_down",
                _ => return None,
            };
            Some(format!("blk.{block}.{kind}.weight"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_qwen3_vl_names() {
        let c = classify("model.language_model.layers.12.self_attn.q_proj");
        assert_eq!((c.tower, c.block, c.series.as_str()), ("text", Some(12), "q"));
        let c = classify("model.visual.blocks.3.mlp.linear_fc2");
        assert_eq!((c.tower, c.block, c.series.as_str()), ("vision", Some(3), "fc2"));
        let c = classify("model.visual.deepstack_merger_list.1.linear_fc1");
        assert_eq!((c.tower, c.block, c.series.as_str()), ("vision", Some(1), "deepstack.fc1"));
        assert_eq!(classify("model.visual.merger.linear_fc2").series, "merger.fc2");
        assert_eq!(classify("model.visual.patch_embed.proj").series, "patch_embed");
        assert_eq!(classify("lm_head").tower, "lm_head");
        assert_eq!(group_series(&["a.layers.0.mlp.gate_proj".into(), "a.layers.0.mlp.up_proj".into()]), "gate/up");
    }

    #[test]
    fn gguf_names() {
        assert_eq!(
            gguf_name("model.language_model.layers.0.self_attn.o_proj").as_deref(),
            Some("blk.0.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.language_model.layers.35.mlp.down_proj").as_deref(),
            Some("blk.35.ffn_down.weight")
        );
        assert_eq!(gguf_name("lm_head").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.visual.blocks.0.attn.qkv"), None);
    }
}
