//! llm-compressor's `float-quantized` compressed-tensors format, read by vLLM's
//! `compressed-tensors` quantization method and by HF transformers with the `compressed-tensors`
//! package:
//! - `config.json`'s `quantization_config` (plus a `producer` key with qsens' provenance): one config group (FP8 E4M3 weights with a per-tensor
//!   scale, static per-tensor FP8 inputs) targeting `Linear`, and `ignore` naming every Linear
//!   that stays unquantized by its exact checkpoint name;
//! - per FP8 layer: `weight` float8_e4m3fn, `weight_scale` and `input_scale` of shape `[1]` in
//!   the model's dtype (llm-compressor's convention; the FP8 codes are computed with the scale as
//!   stored, so dequantizing gives exactly what was meant).

use serde_json::{json, Value};

/// The quantization arguments of FP8 E4M3, per tensor, static (weights and inputs alike). Only
/// keys of compressed-tensors' `QuantizationArgs`: it refuses unknown ones (`extra="forbid"`).
fn fp8_tensor_args() -> Value {
    json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "tensor", "dynamic": false})
}

/// `config.json`'s `quantization_config`. `ignore`: the unquantized Linear modules by their HF
/// checkpoint names, in model order (vLLM maps them through the model's `hf_to_vllm_mapper`; HF
/// matches them as they are). `quantization_status: "compressed"` is what makes HF decompress the
/// FP8 weights with their scales. `producer` (provenance) is a top-level key compressed-tensors'
/// `QuantizationConfig` ignores (`extra="ignore"`), as vLLM does.
pub fn quantization_config(ignore: &[String], producer: Value) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": fp8_tensor_args(),
                "input_activations": fp8_tensor_args(),
                "output_activations": null,
                "format": "float-quantized"
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": null,
        "producer": producer
    })
}
