//! The chosen recipe in other tools' formats (documented in `docs/manifest.md`).
//!
//! - ModelOpt 0.47: the `{"quant_cfg": [...], "algorithm": "max"}` dict that `mtq.quantize`
//!   takes, shaped like `mtq.get_auto_quantize_config`'s: deny all, then per quantized module
//!   its `input_quantizer` and `weight_quantizer` with the format's attributes and its
//!   `output_quantizer` disabled.
//! - compressed-tensors (vLLM): `quantization_config` with one config group per quantized
//!   format, targets = exact module names, `ignore` = every other scored layer. Fused q/k/v and
//!   gate/up are one search group, so they always share a format, as vLLM requires.
//! - llama.cpp: `llama-quantize --tensor-type` entries (anchored regex = GGML type) for the text
//!   model's tensors. FP8 has no GGUF type: `q8_0` (8-bit ints, one scale per 32 weights) is the
//!   nearest and is marked approximate.

use serde_json::{json, Value};

use crate::artifact::manifest::{GgufTypeMap, LlamaCppExport};

use super::naming;
use super::problem::normalize_format_name;

/// One quantizable layer and the format its group got.
#[derive(Debug, Clone)]
pub struct LayerChoice<'a> {
    pub name: &'a str,
    pub format: &'a str,
}

fn is_none(format: &str) -> bool {
    normalize_format_name(format) == "NONE"
}

/// ModelOpt quantizer attributes of a format: `(weight, input)`, `None` for a disabled input
/// quantizer. Copied from ModelOpt 0.47's presets (`modelopt_recipes/configs/ptq/presets/model`);
/// integer `block_sizes` keys are JSON strings here and must be turned back into ints before
/// `mtq.quantize` (docs/manifest.md shows the line).
fn modelopt_attributes(format: &str) -> Option<(Value, Option<Value>)> {
    let fp8 = json!({"num_bits": [4, 3], "axis": null});
    Some(match normalize_format_name(format).as_str() {
        "FP8" => (fp8.clone(), Some(fp8)),
        "FP8_PER_CHANNEL_PER_TOKEN" => (
            json!({"num_bits": [4, 3], "axis": 0}),
            Some(json!({"num_bits": [4, 3], "axis": null, "type": "dynamic", "block_sizes": {"-1": null}})),
        ),
        "FP8_2D_BLOCKWISE_WEIGHT_ONLY" => {
            (json!({"num_bits": [4, 3], "axis": null, "block_sizes": {"-1": 128, "-2": 128}}), None)
        }
        // SmoothQuant's smoothing is per layer; the quantizers are INT8's (the note says so).
        "INT8" | "INT8_SMOOTHQUANT" => (json!({"num_bits": 8, "axis": 0}), Some(json!({"num_bits": 8, "axis": null}))),
        "INT4_BLOCKWISE_WEIGHT_ONLY" | "INT4_AWQ" => {
            (json!({"num_bits": 4, "block_sizes": {"-1": 128, "type": "static"}}), None)
        }
        // configs/numerics/nvfp4 and mxfp8 / mxfp4 (dynamic blocks; NVFP4's global amax is calibrated).
        "NVFP4" | "NVFP4_AWQ_LITE" => {
            let nvfp4 = json!({"num_bits": [2, 1], "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}, "effective_bits": 4.5});
            (nvfp4.clone(), Some(nvfp4))
        }
        "W4A16_NVFP4" => {
            (json!({"num_bits": [2, 1], "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}}), None)
        }
        "MXFP8" => {
            let mx = json!({"num_bits": [4, 3], "block_sizes": {"-1": 32, "type": "dynamic", "scale_bits": [8, 0]}});
            (mx.clone(), Some(mx))
        }
        "MXFP4" => {
            let mx = json!({"num_bits": [2, 1], "block_sizes": {"-1": 32, "type": "dynamic", "scale_bits": [8, 0]}});
            (mx.clone(), Some(mx))
        }
        // A SequentialQuantizer: the list is applied in order.
        "W4A8_AWQ_BETA" => (
            json!([{"num_bits": 4, "block_sizes": {"-1": 128, "type": "static"}}, {"num_bits": [4, 3], "axis": null}]),
            Some(json!({"num_bits": [4, 3], "axis": null})),
        ),
        _ => return None,
    })
}

/// compressed-tensors arguments (llm-compressor's `QuantizationArgs`) of one quantizer.
fn ct_args(num_bits: u32, kind: &str, strategy: &str, dynamic: bool, group_size: Option<u32>, observer: &str) -> Value {
    json!({
        "num_bits": num_bits,
        "type": kind,
        "strategy": strategy,
        "symmetric": true,
        "dynamic": dynamic,
        "group_size": group_size,
        "block_structure": null,
        "actorder": null,
        "observer": observer,
        "observer_kwargs": {}
    })
}

/// compressed-tensors `(weights, input_activations, format)` of a format.
fn compressed_tensors_scheme(format: &str) -> Option<(Value, Value, &'static str)> {
    Some(match normalize_format_name(format).as_str() {
        "FP8" => (
            ct_args(8, "float", "tensor", false, None, "minmax"),
            ct_args(8, "float", "tensor", false, None, "minmax"),
            "float-quantized",
        ),
        "FP8_PER_CHANNEL_PER_TOKEN" => (
            ct_args(8, "float", "channel", false, None, "minmax"),
            ct_args(8, "float", "token", true, None, "memoryless"),
            "float-quantized",
        ),
        "INT8" => (
            ct_args(8, "int", "channel", false, None, "minmax"),
            ct_args(8, "int", "tensor", false, None, "minmax"),
            "int-quantized",
        ),
        "INT4_BLOCKWISE_WEIGHT_ONLY" | "INT4_AWQ" => {
            (ct_args(4, "int", "group", false, Some(128), "minmax"), Value::Null, "pack-quantized")
        }
        _ => return None,
    })
}

/// GGUF type of a format and whether it is only the nearest one.
fn gguf_type(format: &str) -> Option<(&'static str, bool)> {
    match normalize_format_name(format).as_str() {
        "NONE" => Some(("bf16", false)),
        "FP8" | "FP8_PER_CHANNEL_PER_TOKEN" | "FP8_2D_BLOCKWISE_WEIGHT_ONLY" | "INT8" | "INT8_SMOOTHQUANT" => {
            Some(("q8_0", true))
        }
        "INT4_BLOCKWISE_WEIGHT_ONLY" | "INT4_AWQ" => Some(("q4_0", true)),
        _ => None,
    }
}

/// ModelOpt `mtq.quantize` config; `Err` names a format without a ModelOpt mapping.
pub fn modelopt(layers: &[LayerChoice]) -> Result<Value, String> {
    let mut quant_cfg = vec![json!({"quantizer_name": "*", "enable": false})];
    for l in layers.iter().filter(|l| !is_none(l.format)) {
        let (weight, input) = modelopt_attributes(l.format)
            .ok_or_else(|| format!("ModelOpt export: no ModelOpt config for format '{}'", l.format))?;
        if naming::experts_layer(l.name).is_some() {
            // ModelOpt's fused experts (`_QuantFusedExperts`): an input quantizer per projection
            // and a list of per-expert weight quantizers, which its name matching reaches as
            // `<proj>_weight_quantizer` (as `get_auto_quantize_config` writes them).
            for proj in ["gate_up_proj", "down_proj"] {
                let input_name = format!("{}.{proj}_input_quantizer", l.name);
                quant_cfg.push(match &input {
                    Some(attrs) => json!({"quantizer_name": input_name, "enable": true, "cfg": attrs}),
                    None => json!({"quantizer_name": input_name, "enable": false}),
                });
                let weight_name = format!("{}.{proj}_weight_quantizer", l.name);
                quant_cfg.push(json!({"quantizer_name": weight_name, "enable": true, "cfg": weight}));
            }
            continue;
        }
        match input {
            Some(attrs) => quant_cfg
                .push(json!({"quantizer_name": format!("{}.input_quantizer", l.name), "enable": true, "cfg": attrs})),
            None => quant_cfg.push(json!({"quantizer_name": format!("{}.input_quantizer", l.name), "enable": false})),
        }
        quant_cfg
            .push(json!({"quantizer_name": format!("{}.weight_quantizer", l.name), "enable": true, "cfg": weight}));
        quant_cfg.push(json!({"quantizer_name": format!("{}.output_quantizer", l.name), "enable": false}));
    }
    Ok(json!({"quant_cfg": quant_cfg, "algorithm": "max"}))
}

/// compressed-tensors `quantization_config`; `Err` names a format without a mapping.
pub fn compressed_tensors(layers: &[LayerChoice]) -> Result<Value, String> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    let mut ignore = Vec::new();
    for l in layers {
        // A sparse layer's experts are per-expert Linear modules to llm-compressor and vLLM
        // (`mlp.experts.<e>.{gate,up,down}_proj`): one anchored pattern names them all.
        let target = match naming::experts_layer(l.name) {
            Some(_) => format!(r"re:^{}\.\d+\.(gate|up|down)_proj$", l.name.replace('.', r"\.")),
            None => l.name.to_string(),
        };
        if is_none(l.format) {
            ignore.push(target);
            continue;
        }
        let key = normalize_format_name(l.format);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, targets)) => targets.push(target),
            None => groups.push((key, vec![target])),
        }
    }
    let mut config_groups = serde_json::Map::new();
    let mut formats = Vec::new();
    for (i, (format, targets)) in groups.iter().enumerate() {
        let (weights, inputs, ct_format) = compressed_tensors_scheme(format)
            .ok_or_else(|| format!("compressed-tensors export: no scheme for format '{format}'"))?;
        formats.push(ct_format);
        config_groups.insert(
            format!("group_{i}"),
            json!({"targets": targets, "weights": weights, "input_activations": inputs, "output_activations": null,
                   "format": ct_format}),
        );
    }
    // One compression format for the model, or "mixed-precision" with one per group.
    formats.sort_unstable();
    formats.dedup();
    let format = match formats.as_slice() {
        [one] => *one,
        [] => "float-quantized",
        _ => "mixed-precision",
    };
    Ok(json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "global_compression_ratio": null,
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": null
    }))
}

/// Escapes a GGUF tensor name for an anchored `std::regex` (ECMAScript) pattern.
fn anchored(name: &str) -> String {
    let mut out = String::from("^");
    for ch in name.chars() {
        if "\\^$.|?*+()[]{}".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('$');
    out
}

/// llama.cpp `--tensor-type` entries; `Err` names a format without a GGUF type.
pub fn llama_cpp(layers: &[LayerChoice]) -> Result<LlamaCppExport, String> {
    let mut tensor_types = Vec::new();
    let mut unmapped = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for l in layers {
        let Some(gguf_names) = naming::gguf_names(l.name) else {
            unmapped.push(l.name.to_string());
            continue;
        };
        let (ty, _) =
            gguf_type(l.format).ok_or_else(|| format!("llama.cpp export: no GGUF type for format '{}'", l.format))?;
        let key = normalize_format_name(l.format);
        if !used.contains(&key) {
            used.push(key);
        }
        for gguf in gguf_names {
            tensor_types.push(format!("{}={ty}", anchored(&gguf)));
        }
    }
    // The token embedding is not searched: keep it unquantized.
    tensor_types.push(format!("{}=bf16", anchored("token_embd.weight")));
    if !used.iter().any(|k| k == "NONE") {
        used.push("NONE".into());
    }
    let type_map = used
        .iter()
        .map(|f| {
            let (ty, approximate) = gguf_type(f).expect("checked above");
            GgufTypeMap { format: f.clone(), gguf_type: ty.to_string(), approximate }
        })
        .collect();
    Ok(LlamaCppExport { base_type: "Q8_0".into(), tensor_types, type_map, unmapped })
}

/// The `llama-quantize` arguments, one `--tensor-type` per line, shell-quoted.
pub fn llama_cpp_args(export: &LlamaCppExport) -> String {
    let mut out = String::new();
    for t in &export.tensor_types {
        out.push_str(&format!("--tensor-type '{t}'\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<LayerChoice<'static>> {
        vec![
            LayerChoice { name: "model.visual.blocks.0.attn.qkv", format: "FP8" },
            LayerChoice { name: "model.language_model.layers.0.self_attn.q_proj", format: "FP8" },
            LayerChoice { name: "model.language_model.layers.0.self_attn.k_proj", format: "FP8" },
            LayerChoice { name: "model.language_model.layers.0.mlp.down_proj", format: "NONE" },
            LayerChoice { name: "lm_head", format: "NONE" },
        ]
    }

    #[test]
    fn modelopt_config_denies_all_then_enables_chosen_modules() {
        let cfg = modelopt(&layers()).unwrap();
        let entries = cfg["quant_cfg"].as_array().unwrap();
        assert_eq!(entries[0], json!({"quantizer_name": "*", "enable": false}));
        assert_eq!(entries.len(), 1 + 3 * 3);
        assert_eq!(entries[1]["quantizer_name"], "model.visual.blocks.0.attn.qkv.input_quantizer");
        assert_eq!(entries[2]["cfg"]["num_bits"], json!([4, 3]));
        assert_eq!(entries[3]["enable"], false);
        assert_eq!(cfg["algorithm"], "max");
        // Weight-only formats disable the input quantizer; smoothed formats get their quantizers
        // (the smoothing itself is per layer, in the scores artifact); an unknown format is refused.
        let int4 = modelopt(&[LayerChoice { name: "x", format: "INT4_AWQ" }]).unwrap();
        assert_eq!(int4["quant_cfg"][1], json!({"quantizer_name": "x.input_quantizer", "enable": false}));
        assert_eq!(int4["quant_cfg"][2]["cfg"]["block_sizes"], json!({"-1": 128, "type": "static"}));
        let nvfp4 = modelopt(&[LayerChoice { name: "x", format: "NVFP4_DEFAULT_CFG" }]).unwrap();
        assert_eq!(nvfp4["quant_cfg"][1]["cfg"]["block_sizes"]["-1"], 16);
        let sq = modelopt(&[LayerChoice { name: "x", format: "INT8_SMOOTHQUANT" }]).unwrap();
        assert_eq!(sq["quant_cfg"][2]["cfg"], json!({"num_bits": 8, "axis": 0}));
        assert!(modelopt(&[LayerChoice { name: "x", format: "INT2_MAGIC" }]).is_err());
    }

    #[test]
    fn compressed_tensors_targets_and_ignores() {
        let cfg = compressed_tensors(&layers()).unwrap();
        let g = &cfg["config_groups"]["group_0"];
        assert_eq!(g["targets"].as_array().unwrap().len(), 3);
        assert_eq!(g["weights"]["type"], "float");
        assert_eq!(cfg["ignore"], json!(["model.language_model.layers.0.mlp.down_proj", "lm_head"]));
    }

    #[test]
    fn llama_cpp_lines() {
        let e = llama_cpp(&layers()).unwrap();
        assert_eq!(e.unmapped, vec!["model.visual.blocks.0.attn.qkv"]);
        assert_eq!(e.tensor_types[0], r"^blk\.0\.attn_q\.weight$=q8_0");
        assert_eq!(e.tensor_types[3], r"^output\.weight$=bf16");
        assert!(e.type_map.iter().any(|m| m.format == "FP8" && m.approximate));
        assert!(llama_cpp_args(&e).starts_with(r"--tensor-type '^blk\.0\.attn_q\.weight$=q8_0'"));
    }
}
