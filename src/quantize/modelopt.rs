//! ModelOpt's unified HF checkpoint format (what `modelopt.torch.export.export_hf_checkpoint`
//! writes for an FP8 recipe), read by vLLM's `modelopt` quantization method:
//! - `hf_quant_config.json`: `{"producer", "quantization": {"quant_algo": "FP8",
//!   "kv_cache_quant_algo": null, "exclude_modules": [...]}}`;
//! - the same, converted, as `config.json`'s `quantization_config` (`quant_method: "modelopt"`);
//! - per FP8 layer: `weight` float8_e4m3fn, `weight_scale` and `input_scale` float32 0-d.
//!
//! `exclude_modules` is ModelOpt's prefix-wildcard summary of the unquantized modules (ModelOpt
//! 0.47 `export/quant_utils.py`, `_prefix_wildcard_summarize_exclude_modules`), reproduced here
//! so that the file equals ModelOpt's own.

use std::collections::BTreeSet;

use serde_json::{json, Value};

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

/// `hf_quant_config.json` for an FP8 recipe.
pub fn hf_quant_config(exclude_modules: &[String], producer: Value) -> Value {
    json!({
        "producer": producer,
        "quantization": {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": null,
            "exclude_modules": exclude_modules,
        }
    })
}

/// `config.json`'s `quantization_config`: ModelOpt's conversion of `hf_quant_config.json`
/// (`export/convert_hf_config.py`, `convert_hf_quant_config_format`) for FP8.
pub fn quantization_config(exclude_modules: &[String], producer: Value) -> Value {
    json!({
        "config_groups": {
            "group_0": {
                "input_activations": {"dynamic": false, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": false, "num_bits": 8, "type": "float"},
                "targets": ["Linear"],
            }
        },
        "ignore": exclude_modules,
        "quant_algo": "FP8",
        "producer": producer,
        "quant_method": "modelopt",
    })
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
