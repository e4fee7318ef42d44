//! ModelOpt's unified HF checkpoint format (what `modelopt.torch.export.export_hf_checkpoint`
//! writes), read by vLLM's `modelopt`, `modelopt_fp4` and `modelopt_mixed` quantization methods:
//! - `hf_quant_config.json`: with one format `{"producer", "quantization": {"quant_algo": "FP8",
//!   "kv_cache_quant_algo": null, "exclude_modules": [...]}}` (NVFP4 adds `group_size`); with
//!   several, `quant_algo: "MIXED_PRECISION"` and `quantized_layers: {module: {"quant_algo",
//!   "group_size"?}}` instead of `exclude_modules` (ModelOpt 0.47 `export/quant_utils.py`,
//!   `process_layer_quant_config`);
//! - the same, converted, as `config.json`'s `quantization_config` (`quant_method: "modelopt"`;
//!   `export/convert_hf_config.py`, `convert_hf_quant_config_format`);
//! - per FP8 layer: `weight` float8_e4m3fn, `weight_scale` and `input_scale` float32 0-d; per
//!   NVFP4 layer: `weight` uint8 (two E2M1 codes per byte), `weight_scale` float8_e4m3fn per
//!   16-block, `weight_scale_2` and `input_scale` float32 0-d (W4A16_NVFP4: no `input_scale`).
//!
//! `exclude_modules` is ModelOpt's prefix-wildcard summary of the unquantized modules
//! (`_prefix_wildcard_summarize_exclude_modules`), reproduced here so that the file equals
//! ModelOpt's own.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::quant::served::ServedFormat;

/// ModelOpt's summary of `unquantized` module names by prefix wildcards (`name*`, or `name.*`
/// for a prefix that is itself a module) that match no `quantized` module, sorted.
pub fn exclude_summary(unquantized: &[String], quantized: &[String]) -> Vec<String> {
    // Every prefix wildcard of a quantized module (and its exact name) is forbidden.
    let mut negative: BTreeSet<String> = BTreeSet::new();
    for name in quantized {
        negative.insert(name.clone());
        for i in 0..=name.len() {
            if name.is_char_boundary(i) {
                negative.insert(format!("{}*", &name[..i]));
            }
        }
    }
    let mut summary: BTreeSet<String> = BTreeSet::new();
    for name in unquantized {
        // Candidates from the shortest prefix: at each dot `prefix*`, then {prefix, prefix.*};
        // finally the name itself.
        let mut candidates: Vec<Vec<String>> = Vec::new();
        for (i, ch) in name.char_indices() {
            if ch == '.' {
                candidates.push(vec![format!("{}*", &name[..i])]);
                candidates.push(vec![name[..i].to_string(), format!("{}.*", &name[..i])]);
            }
        }
        candidates.push(vec![name.clone()]);
        let mut chosen: Vec<String> = Vec::new();
        for wildcards in candidates {
            if wildcards.iter().any(|w| negative.contains(w)) {
                continue;
            }
            if wildcards.iter().all(|w| summary.contains(w)) {
                chosen.clear();
                break;
            }
            chosen = wildcards;
            break;
        }
        // The pair {prefix, prefix.*} is written as `prefix.*` alone.
        if let [a, b] = chosen.as_slice() {
            if *b == format!("{a}.*") {
                summary.insert(b.clone());
                continue;
            }
        }
        summary.extend(chosen);
    }
    summary.into_iter().collect()
}

/// A layer's entry in `quantized_layers` (and the key its config group is made by).
fn layer_config(format: ServedFormat) -> Value {
    let mut c = Map::new();
    c.insert("quant_algo".into(), format.quant_algo().into());
    if let Some(g) = format.group_size() {
        c.insert("group_size".into(), g.into());
    }
    Value::Object(c)
}

/// A compressed-tensors style config group for a format (`_quant_algo_to_group_config`).
fn group_config(format: ServedFormat) -> Map<String, Value> {
    let side = |bits: u32| {
        let mut c = json!({"dynamic": false, "num_bits": bits, "type": "float"});
        if let Some(g) = format.group_size() {
            c["group_size"] = g.into();
        }
        c
    };
    let bits = if format == ServedFormat::Fp8 { 8 } else { 4 };
    let mut group = Map::new();
    if format.quantizes_input() {
        group.insert("input_activations".into(), side(bits));
    }
    group.insert("weights".into(), side(bits));
    group
}

/// `hf_quant_config.json` for the served layers (`quantized`: name and format, in model order)
/// and the summary of the unquantized ones.
pub fn hf_quant_config(quantized: &[(String, ServedFormat)], exclude_modules: &[String], producer: Value) -> Value {
    let mut formats: Vec<ServedFormat> = Vec::new();
    for (_, f) in quantized {
        if !formats.contains(f) {
            formats.push(*f);
        }
    }
    let mut q = Map::new();
    if let [format] = formats.as_slice() {
        q.insert("quant_algo".into(), format.quant_algo().into());
        q.insert("kv_cache_quant_algo".into(), Value::Null);
        if let Some(g) = format.group_size() {
            q.insert("group_size".into(), g.into());
        }
        q.insert("exclude_modules".into(), json!(exclude_modules));
    } else {
        q.insert("quant_algo".into(), "MIXED_PRECISION".into());
        q.insert("kv_cache_quant_algo".into(), Value::Null);
        let layers: Map<String, Value> = quantized.iter().map(|(n, f)| (n.clone(), layer_config(*f))).collect();
        q.insert("quantized_layers".into(), Value::Object(layers));
    }
    json!({"producer": producer, "quantization": q})
}

/// `config.json`'s `quantization_config`: ModelOpt's conversion of `hf_quant_config.json`.
/// `quantized` as for [`hf_quant_config`] (its order numbers the config groups of a mixed
/// recipe, as ModelOpt numbers them by first use in module order).
pub fn quantization_config(quantized: &[(String, ServedFormat)], exclude_modules: &[String], producer: Value) -> Value {
    let mut groups: Vec<(ServedFormat, Vec<String>)> = Vec::new();
    for (name, f) in quantized {
        match groups.iter_mut().find(|(g, _)| g == f) {
            Some((_, names)) => names.push(name.clone()),
            None => groups.push((*f, vec![name.clone()])),
        }
    }
    let mut config_groups = Map::new();
    let mut out = Map::new();
    if let [(format, _)] = groups.as_slice() {
        let mut g = group_config(*format);
        g.insert("targets".into(), json!(["Linear"]));
        config_groups.insert("group_0".into(), Value::Object(g));
        out.insert("config_groups".into(), Value::Object(config_groups));
        out.insert("ignore".into(), json!(exclude_modules));
        out.insert("quant_algo".into(), format.quant_algo().into());
    } else {
        for (i, (format, names)) in groups.iter().enumerate() {
            let mut g = group_config(*format);
            let mut targets = names.clone();
            targets.sort();
            g.insert("targets".into(), json!(targets));
            config_groups.insert(format!("group_{i}"), Value::Object(g));
        }
        out.insert("config_groups".into(), Value::Object(config_groups));
        let layers: Map<String, Value> = quantized.iter().map(|(n, f)| (n.clone(), layer_config(*f))).collect();
        out.insert("quantized_layers".into(), Value::Object(layers));
        // A mixed recipe has no exclude_modules: what quantized_layers does not name is unquantized.
        out.insert("ignore".into(), json!([]));
        out.insert("quant_algo".into(), "MIXED_PRECISION".into());
    }
    out.insert("producer".into(), producer);
    out.insert("quant_method".into(), "modelopt".into());
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn summarizes_by_the_shortest_prefix_no_quantized_module_has() {
        let quantized = names(&["m.layers.0.attn.q", "m.layers.0.attn.k", "m.layers.1.mlp.down"]);
        let unquantized = names(&[
            "m.vis.a",
            "m.vis.b",
            "m.layers.0.attn.o",
            "m.layers.0.mlp.up",
            "m.layers.0.mlp.down",
            "m.layers.1.mlp.up",
            "m.layers.10.mlp.up",
            "head",
        ]);
        assert_eq!(
            exclude_summary(&unquantized, &quantized),
            names(&[
                "head",
                "m.layers.0.attn.o",
                "m.layers.0.mlp*",
                "m.layers.1.mlp.up",
                // `m.layers.1*` would also match the quantized m.layers.1.mlp.down.
                "m.layers.10*",
                "m.vis*",
            ])
        );
    }

    #[test]
    fn a_module_prefix_of_another_takes_the_dot_star_form() {
        // `m.a*` is forbidden by `m.ab.x` (quantized); {m.a, m.a.*} is allowed and written `m.a.*`.
        let got = exclude_summary(&names(&["m.a.x", "m.a.y"]), &names(&["m.ab.x"]));
        assert_eq!(got, names(&["m.a.*"]));
    }
}
