//! AWQ-lite, as ModelOpt 0.47 calibrates the `*_AWQ*` formats (`model_calib.awq_lite`): a
//! per-input-channel smoothing scale `s` that moves quantization difficulty from the weight to
//! the input, chosen per layer from a grid of exponents α:
//!
//! ```text
//! act_scale[c]    = mean over calibration batches of (mean over tokens of |x[:, c]|)
//! weight_scale[c] = mean over output rows of |W[r, c]| / (max |W| of c's block in row r + tiny)
//! s(α)            = clamp(act_scale^α / (weight_scale^(1−α) + tiny), 1e-4, 1e4)
//! s(α)           /= sqrt(max s(α) · min s(α))
//! loss(α)         = Σ over calibration batches of mean((x/s · Q(W·s)ᵀ − x·Wᵀ)²)
//! ```
//! with α ∈ {0, 0.1, …, 1} (f32 values of `torch.arange(0, 1.1, 0.1)`), the input quantizer
//! off during the search, and the plain output passed on to the next layer. The best α gives
//! the layer's smoothing, which the scored (and served) layer then computes as
//! `Q_in(x · p) · Q_w(W · (1/p))ᵀ` with `p = 1/s(α*)` (ModelOpt's
//! `apply_pre_quant_scale_and_smooth`: `p` in f32, its reciprocal in f32, both cast to the
//! weight dtype), the weight's block amax recalibrated on `W · (1/p)` and, when the input is
//! quantized, its amax = max over channels of (per-channel input amax · p).
//!
//! The arithmetic is f32 like ModelOpt's; sums over tokens are ordered differently from
//! torch's, so a layer whose two best α lose within ~1e-7 of each other can choose differently.

use candle_core::{DType, Result, Tensor};

use super::host;

/// The α grid of `awq_lite(alpha_step=0.1)`: `torch.arange(0, 1.1, 0.1)` in f32.
pub fn alphas() -> Vec<f32> {
    (0..11).map(|i| (i as f64 * 0.1) as f32).collect()
}

/// `torch.finfo(torch.float32).tiny`.
const TINY: f32 = f32::MIN_POSITIVE;

/// `weight_scale[c]` of a weight `[rows, cols]` (row-major) with quantization blocks of `block`
/// along the input dimension (`None`: the whole row).
pub fn weight_scale(weight: &[f32], cols: usize, block: Option<usize>) -> Vec<f32> {
    let block = block.unwrap_or(cols).max(1);
    let rows = weight.len() / cols;
    let mut sum = vec![0f32; cols];
    for row in weight.chunks(cols) {
        for (b, chunk) in row.chunks(block).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, v) in chunk.iter().enumerate() {
                sum[b * block + j] += v.abs() / (amax + TINY);
            }
        }
    }
    sum.iter().map(|s| s / rows as f32).collect()
}

/// [`weight_scale`] of a weight tensor `[rows, cols]`, computed on its own device in f32: the
/// same elementwise arithmetic, the sum over rows in row order (candle's CPU reduction adds rows
/// in order, as the slice version does), so on the CPU the two agree bit for bit. A last block
/// shorter than `block` goes through the slice version.
pub fn weight_scale_of(weight: &Tensor, block: Option<usize>) -> Result<Vec<f32>> {
    let (rows, cols) = weight.dims2()?;
    let block = block.unwrap_or(cols).max(1);
    if cols % block != 0 {
        return Ok(weight_scale(&host::to_f32_vec(weight)?, cols, Some(block)));
    }
    let w = weight.to_dtype(DType::F32)?.abs()?.reshape((rows, cols / block, block))?;
    let ratio = w.broadcast_div(&w.max_keepdim(2)?.affine(1.0, TINY as f64)?)?;
    let sum = ratio.reshape((rows, cols))?.sum(0)?.to_vec1::<f32>()?;
    Ok(sum.iter().map(|s| s / rows as f32).collect())
}

/// AWQ's activation scale of one batch, the mean |x| per channel, from `|x|` given as f32
/// `[tokens, cols]`, on its own device (no host copy; on the CPU it equals the definition in the
/// tests, a sum over tokens in order, bit for bit).
pub fn act_scale_of(abs_x: &Tensor) -> Result<Tensor> {
    let tokens = abs_x.dim(0)?.max(1);
    abs_x.sum(0)?.broadcast_div(&Tensor::new(tokens as f32, abs_x.device())?)
}

/// `get_scale`: the smoothing scale `s(α)` from the activation and weight scales.
pub fn scale(act_scale: &[f32], weight_scale: &[f32], alpha: f32) -> Vec<f32> {
    let beta = (1.0 - alpha as f64) as f32;
    let s: Vec<f32> = act_scale
        .iter()
        .zip(weight_scale)
        .map(|(&x, &w)| (x.powf(alpha) / (w.powf(beta) + TINY)).clamp(1e-4, 1e4))
        .collect();
    let max = s.iter().fold(f32::MIN, |m, &v| m.max(v));
    let min = s.iter().fold(f32::MAX, |m, &v| m.min(v));
    let norm = (max * min).sqrt();
    s.iter().map(|v| v / norm).collect()
}

/// The α with the smallest summed loss, `losses` in [`alphas`] order (the first on ties, as
/// Python's `min` over the dict in α order).
pub fn best_alpha(losses: &[f32]) -> Option<f32> {
    let (mut best, mut best_loss) = (None, f32::INFINITY);
    for (a, &l) in alphas().iter().zip(losses) {
        if l < best_loss {
            best = Some(*a);
            best_loss = l;
        }
    }
    best
}

/// The smoothing a layer is scored and served with: `p` multiplies the input, `1/p` the
/// weight, both already cast to the weight dtype's values (returned here in f32).
#[derive(Debug, Clone, PartialEq)]
pub struct Smoothing {
    pub alpha: f32,
    /// `p = 1/s(α*)` per input channel (the input quantizer's `pre_quant_scale`).
    pub input_scale: Vec<f32>,
    /// `1/p` per input channel (the weight quantizer's `pre_quant_scale`).
    pub weight_scale: Vec<f32>,
}

impl Smoothing {
    /// `apply_pre_quant_scale_and_smooth(module, 1/best_scale)`; `round` casts a value to the
    /// weight dtype (identity for f32).
    pub fn new(alpha: f32, best_scale: &[f32], round: impl Fn(f32) -> f32) -> Self {
        Self::from_pre_quant_scale(alpha, best_scale.iter().map(|s| 1.0 / s).collect(), round)
    }

    /// `apply_pre_quant_scale_and_smooth(module, p)` for a pre-quant scale `p` in f32 (SmoothQuant
    /// passes its own, [`super::smoothquant::pre_quant_scale`]).
    pub fn from_pre_quant_scale(alpha: f32, p: Vec<f32>, round: impl Fn(f32) -> f32) -> Self {
        Smoothing {
            alpha,
            weight_scale: p.iter().map(|v| round(1.0 / v)).collect(),
            input_scale: p.into_iter().map(round).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: mean |x| per channel of one batch `[tokens, cols]`, tokens summed in order.
    fn act_scale(x: &[f32], cols: usize) -> Vec<f32> {
        let tokens = (x.len() / cols).max(1);
        let mut sum = vec![0f32; cols];
        for row in x.chunks(cols) {
            for (s, v) in sum.iter_mut().zip(row) {
                *s += v.abs();
            }
        }
        sum.iter().map(|s| s / tokens as f32).collect()
    }

    #[test]
    fn alpha_grid_is_torch_arange_in_f32() {
        let a = alphas();
        assert_eq!(a.len(), 11);
        assert_eq!(a[1] as f64, 0.10000000149011612);
        assert_eq!(a[7] as f64, 0.699999988079071);
        assert_eq!(a[10], 1.0);
    }

    #[test]
    fn scales_follow_the_definition() {
        // weight [2, 2], one block per row: |W|/rowmax = [[1, .5], [.25, 1]] → mean [.625, .75].
        let ws = weight_scale(&[2.0, -1.0, 0.5, 2.0], 2, None);
        assert_eq!(ws, [0.625, 0.75]);
        let xs = act_scale(&[1.0, -2.0, 3.0, 0.0], 2);
        assert_eq!(xs, [2.0, 1.0]);
        // α = 0: s = 1/w, normalized by sqrt(max·min).
        let s = scale(&xs, &ws, 0.0);
        let raw = [1.0 / 0.625f32, 1.0 / 0.75f32];
        let norm = (raw[0] * raw[1]).sqrt();
        assert_eq!(s, [raw[0] / norm, raw[1] / norm]);
        // α = 1: s = x (w^0 = 1).
        let s = scale(&xs, &ws, 1.0);
        let norm = (2.0f32 * 1.0).sqrt();
        assert_eq!(s, [2.0 / norm, 1.0 / norm]);
    }

    #[test]
    fn tensor_statistics_equal_the_slice_definitions_bit_for_bit() {
        // Values spread over many binades, so a different summation order would show.
        let (rows, cols) = (37, 48);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let u = ((i as u64 * 2654435761) % 1000003) as f32 / 1000003.0 - 0.5;
                u * 10f32.powi((i % 7) as i32 - 3)
            })
            .collect();
        let t = Tensor::from_vec(values.clone(), (rows, cols), &candle_core::Device::Cpu).unwrap();
        for block in [None, Some(16), Some(5)] {
            let want = weight_scale(&values, cols, block.or(Some(cols)));
            assert_eq!(weight_scale_of(&t, block).unwrap(), want, "block {block:?}");
        }
        let got = act_scale_of(&t.abs().unwrap()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, act_scale(&values, cols));
    }

    #[test]
    fn best_alpha_takes_the_first_minimum() {
        assert_eq!(best_alpha(&[3.0, 1.0, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]), Some(alphas()[1]));
        assert_eq!(best_alpha(&[f32::NAN; 11]), None);
    }
}
