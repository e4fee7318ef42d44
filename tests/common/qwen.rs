//! Qwen3-VL helpers for the model tests: reference samples as `Input`, tensor comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qsens::model::qwen3_vl::Input;

pub const TINY: &str = "qwen3-vl-tiny";
/// The mixture-of-experts checkpoint (released Qwen3-VL-30B-A3B layout).
pub const MOE_TINY: &str = "qwen3-vl-moe-tiny";
pub const SAMPLES: usize = 4;

/// Reference tensors of `reference/sample_{k:02}.safetensors`.
pub fn reference(fixtures: &Path, k: usize) -> HashMap<String, Tensor> {
    reference_in(fixtures, "reference", k)
}

/// Reference tensors of `reference_moe/sample_{k:02}.safetensors` (HF on [`MOE_TINY`]).
pub fn reference_moe(fixtures: &Path, k: usize) -> HashMap<String, Tensor> {
    reference_in(fixtures, "reference_moe", k)
}

fn reference_in(fixtures: &Path, folder: &str, k: usize) -> HashMap<String, Tensor> {
    let path = fixtures.join(format!("{folder}/sample_{k:02}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

/// The model input of a reference sample, built as the fixture README prescribes:
/// `pixel_values = (f32(u8) − 127.5f32) / 127.5f32`.
pub fn input_from_reference(r: &HashMap<String, Tensor>) -> Input {
    let ids = i64s(&r["input_ids"]);
    let l = ids.len();
    let pos = i64s(&r["position_ids"]);
    let labels: Vec<i32> = i64s(&r["labels"]).into_iter().map(|x| x as i32).collect();
    let u8s = &r["pixel_values_u8"];
    let (n, k) = u8s.dims2().unwrap();
    let px: Vec<f32> = u8s
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .into_iter()
        .map(|v| (v as f32 - 127.5f32) / 127.5f32)
        .collect();
    let grid = i64s(&r["image_grid_thw"]);
    Input {
        input_ids: ids.into_iter().map(|x| x as u32).collect(),
        position_ids: [pos[..l].to_vec(), pos[l..2 * l].to_vec(), pos[2 * l..].to_vec()],
        labels: Some(labels),
        pixel_values: Tensor::from_vec(px, (n, k), &Device::Cpu).unwrap(),
        grid_thw: grid.chunks(3).map(|c| [c[0] as u32, c[1] as u32, c[2] as u32]).collect(),
        packed: Vec::new(),
    }
}

/// `(‖a − b‖ / ‖b‖, max |a − b|)` in f64.
pub fn errors(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (&a - &b).unwrap();
    let num = d.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let max = d.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    (if den > 0.0 { num / den } else { num }, max)
}

/// Max |a − b| (0 means bit-identical for finite values).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    errors(a, b).1
}

/// Per-label NLL as HF's reference stores it: row `t − 1` of `logits` (`[L, vocab]`, with its
/// per-row log-sum-exp `lse`) predicts `labels[t]`; positions labelled -100 are skipped.
pub fn label_token_nll(logits: &Tensor, lse: &Tensor, labels: &[i32]) -> Tensor {
    let (rows, tgts): (Vec<u32>, Vec<u32>) =
        (1..labels.len()).filter(|&t| labels[t] != -100).map(|t| ((t - 1) as u32, labels[t] as u32)).unzip();
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, &Device::Cpu).unwrap();
    let tgts = Tensor::from_vec(tgts, (n, 1), &Device::Cpu).unwrap();
    (lse.index_select(&rows, 0).unwrap()
        - logits.index_select(&rows, 0).unwrap().gather(&tgts, 1).unwrap().squeeze(1).unwrap())
    .unwrap()
}
