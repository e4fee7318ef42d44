//! SmoothQuant, as ModelOpt 0.47 calibrates `INT8_SMOOTHQUANT_CFG` (`model_calib.smoothquant`,
//! `alpha = 1.0` by `SmoothQuantCalibConfig`'s default): the input quantizer is calibrated per
//! channel (max |x[:, c]| over every calibration token), then per linear layer
//!
//! ```text
//! w[c]   = max over output rows of |W[r, c]|          (in the weight dtype)
//! p[c]   = w[c]^(1−α) / a[c]^α                         (f32; a = per-channel input amax)
//! p[c]   = 1 where a[c] ≤ 2^-31, only if min p ≤ 2^-31  (ModelOpt's zero-channel mask, as written)
//! p      = clamp(p, 1e-4, 1e4)
//! ```
//! and `p` becomes the layer's `pre_quant_scale` (`apply_pre_quant_scale_and_smooth`, shared with
//! AWQ: [`Smoothing`]): the layer is scored as `Q_in(x · p) · Q_w(W · (1/p))ᵀ`, its per-tensor
//! input amax = max over channels of `a[c] · p[c]`, its per-channel weight amax recalibrated on
//! `W · (1/p)`. With α = 1, `p = 1/a`: every smoothed input channel has amax 1. Layers that are
//! not linear (the patch embedding's convolution) are not smoothed and keep the plain max
//! calibration, as in ModelOpt.

pub use super::awq::Smoothing;

/// ModelOpt's default migration strength for `INT8_SMOOTHQUANT_CFG`.
pub const DEFAULT_ALPHA: f32 = 1.0;

/// `max |W[r, c]|` over rows `r` of a `[rows, cols]` weight tensor, `|W|.amax(dim=0)`, in f32,
/// reduced on the weight's own device (a max does not depend on the order it is taken in, so
/// every device gives the same values).
pub fn weight_channel_amax_of(weight: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    weight.to_dtype(candle_core::DType::F32)?.abs()?.max(0)?.to_vec1::<f32>()
}

/// The pre-quant scale `p` of a layer from its per-channel input amax and weight amax (the
/// latter in the weight dtype's values), ModelOpt's arithmetic: both powers in f32 (exact for
/// α = 1: `w^0 = 1`, `a^1 = a`), the mask, the clamp.
pub fn pre_quant_scale(act_amax: &[f32], weight_amax: &[f32], alpha: f32) -> Vec<f32> {
    // Python's `1 - alpha` is a double; torch's pow takes it as the exponent.
    let beta = (1.0 - alpha as f64) as f32;
    let mut p: Vec<f32> = act_amax.iter().zip(weight_amax).map(|(&a, &w)| w.powf(beta) / a.powf(alpha)).collect();
    let epsilon = 1.0 / (1u64 << 31) as f32;
    if p.iter().fold(f32::INFINITY, |m, &v| m.min(v)) <= epsilon {
        for (v, &a) in p.iter_mut().zip(act_amax) {
            if a <= epsilon {
                *v = 1.0;
            }
        }
    }
    // torch.clamp keeps NaN; f32::clamp does too.
    p.iter().map(|v| v.clamp(1e-4, 1e4)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, on a row-major `[rows, cols]` slice.
    fn weight_channel_amax(weight: &[f32], cols: usize) -> Vec<f32> {
        let mut amax = vec![0f32; cols];
        for row in weight.chunks(cols) {
            for (m, v) in amax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        amax
    }

    #[test]
    fn tensor_weight_channel_amax_equals_the_slice_version() {
        let values: Vec<f32> = (0..7 * 5).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let t = candle_core::Tensor::from_vec(values.clone(), (7, 5), &candle_core::Device::Cpu).unwrap();
        assert_eq!(weight_channel_amax_of(&t).unwrap(), weight_channel_amax(&values, 5));
    }

    #[test]
    fn alpha_one_gives_the_reciprocal_input_amax_clamped() {
        // a = [2, 0.5, 0 (never seen), 1e-6]: p = 1/a, 1/0 = inf clamps to 1e4, 1e6 clamps to 1e4.
        let p = pre_quant_scale(&[2.0, 0.5, 0.0, 1e-6], &[3.0, 1.0, 1.0, 1.0], 1.0);
        assert_eq!(p, [0.5, 2.0, 1e4, 1e4]);
        // The mask only applies when some p is ≤ 2^-31 (an input amax ≥ 2^31 here).
        let p = pre_quant_scale(&[4e9, 0.0], &[1.0, 1.0], 1.0);
        assert_eq!(p, [1e-4, 1.0]);
    }

    #[test]
    fn alpha_half_balances_weight_and_input() {
        // p = sqrt(w) / sqrt(a): w = 4, a = 16 → 0.5.
        assert_eq!(pre_quant_scale(&[16.0], &[4.0], 0.5), [0.5]);
        assert_eq!(weight_channel_amax(&[1.0, -3.0, -2.0, 0.5], 2), [2.0, 3.0]);
    }
}
