//! ModelOpt's gradient score: for every layer and format,
//! `Σ (∂L/∂Y ⊙ (Y_q − Y))²` where `Y_q` is the layer's output with only that layer
//! fake-quantized (input and weight) on the unquantized input. One forward and one backward per
//! sample give every layer's ∂L/∂Y; `Y_q` is computed in the backward, right where ∂L/∂Y arrives,
//! so nothing extra is kept from the forward.

use candle_core::{Device, Result, Tensor};

use crate::model::{LayerId, Linear, Tap};
use crate::quant::{self, Format, WeightStats};

/// Per-layer quantization state shared by the scoring taps.
pub struct LayerQuant<'a> {
    pub formats: &'a [Box<dyn Format>],
    pub input_amax: &'a [f32],
    pub weight_stats: &'a [WeightStats],
    /// Per layer, per format: the format's own calibration (AWQ), when it has one; empty when
    /// no format has one.
    pub format_calibration: Vec<Vec<Option<FormatCalibration>>>,
    /// Layers that are not scored (disabled groups).
    pub skip: &'a [bool],
    /// Fake-quantized weights per layer and format, when caching them fits in memory.
    pub cached_weights: Option<Vec<Vec<Tensor>>>,
}

/// A layer's calibration in one format, on the device: the smoothing, if any, and the input
/// amax.
pub struct FormatCalibration {
    pub smoothing: Option<Smoothing>,
    pub input_amax: f32,
}

/// `x · input`, `W · weight` (per input channel, in the layer's dtype), and the statistics of
/// the smoothed weight, whose amax the weight quantizer is recalibrated on (computed once here,
/// not per sample: it would cost a device sync per layer and sample).
pub struct Smoothing {
    pub input: Tensor,
    pub weight: Tensor,
    pub weight_stats: WeightStats,
}

impl FormatCalibration {
    /// From the artifact's record, for the layer whose weight is `weight`.
    pub fn new(c: &crate::artifact::scores::FormatCalibration, weight: &Tensor) -> Result<Self> {
        let vector = |v: &[f32]| Tensor::new(v, &Device::Cpu)?.to_dtype(weight.dtype())?.to_device(weight.device());
        let smoothing = match c.input_scale.is_empty() {
            true => None,
            false => {
                let w = vector(&c.weight_scale)?;
                let weight_stats = WeightStats::of(&weight.broadcast_mul(&w)?)?;
                Some(Smoothing { input: vector(&c.input_scale)?, weight: w, weight_stats })
            }
        };
        Ok(FormatCalibration { smoothing, input_amax: c.input_amax as f32 })
    }
}

impl LayerQuant<'_> {
    fn format_calibration(&self, id: LayerId, f: usize) -> Option<&FormatCalibration> {
        self.format_calibration.get(id).and_then(|c| c.get(f)).and_then(Option::as_ref)
    }

    /// The fake-quantized weight of layer `id` in format `f`.
    pub fn weight(&self, id: LayerId, f: usize, linear: &Linear) -> Result<Tensor> {
        if let Some(cache) = &self.cached_weights {
            return Ok(cache[id][f].clone());
        }
        self.quantize_weight(id, f, linear)
    }

    fn quantize_weight(&self, id: LayerId, f: usize, linear: &Linear) -> Result<Tensor> {
        let format = self.formats[f].as_ref();
        match self.format_calibration(id, f).and_then(|c| c.smoothing.as_ref()) {
            // The weight quantizer's amax is recalibrated on the smoothed weight.
            Some(s) => quant::format::quantize_weight_as(
                format,
                &linear.weight().broadcast_mul(&s.weight)?,
                &s.weight_stats,
                linear.checkpoint_shape(),
            ),
            None => quant::format::quantize_weight_as(
                format,
                linear.weight(),
                &self.weight_stats[id],
                linear.checkpoint_shape(),
            ),
        }
    }

    /// The layer's output with its input and weight fake-quantized in format `f`.
    pub fn quantized_output(&self, id: LayerId, f: usize, linear: &Linear, x: &Tensor) -> Result<Tensor> {
        let (xq, wq) = self.quantized_operands(id, f, linear, x)?;
        linear.forward_with(&xq, &wq)
    }

    /// The fake-quantized input and weight of layer `id` in format `f` (for callers that apply
    /// the layer themselves).
    pub fn quantized_operands(&self, id: LayerId, f: usize, linear: &Linear, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.quantized_input(id, f, x)?, self.weight(id, f, linear)?))
    }

    /// The fake-quantized input of layer `id` in format `f`.
    pub fn quantized_input(&self, id: LayerId, f: usize, x: &Tensor) -> Result<Tensor> {
        match self.format_calibration(id, f) {
            Some(FormatCalibration { smoothing: Some(s), input_amax }) => {
                self.formats[f].quantize_input(&x.broadcast_mul(&s.input)?, *input_amax)
            }
            Some(FormatCalibration { smoothing: None, input_amax }) => self.formats[f].quantize_input(x, *input_amax),
            None => self.formats[f].quantize_input(x, self.input_amax[id]),
        }
    }

    /// Output rows per slice when layer `id`'s fake-quantized weight in format `f` is large
    /// enough to be worth making a slice at a time (an `lm_head` is 0.6–1.2 GiB in bf16, made
    /// while every activation the backward needs is held), `None` to make it whole.
    fn row_slice(&self, id: LayerId, f: usize, linear: &Linear) -> Option<usize> {
        let w = linear.weight();
        let whole = w.elem_count() * w.dtype().size_in_bytes();
        let (rows, cols) = w.dims2().ok()?;
        let plain = w.dims() == linear.checkpoint_shape() && self.format_calibration(id, f).is_none();
        if whole <= WEIGHT_SLICE_BYTES
            || !plain
            || self.cached_weights.is_some()
            || !self.formats[f].weight_rows_independent()
        {
            return None;
        }
        Some((WEIGHT_SLICE_BYTES / (cols * w.dtype().size_in_bytes())).clamp(1, rows))
    }

    /// `gradient_score` of layer `id` in format `f`, made `slice` output rows at a time: the score
    /// is a sum over output columns, so the same terms, a slice of them at a time.
    #[allow(clippy::too_many_arguments)]
    fn sliced_gradient_score(
        &self,
        id: LayerId,
        f: usize,
        linear: &Linear,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        slice: usize,
    ) -> Result<Tensor> {
        let xq = self.quantized_input(id, f, x)?;
        let rows = linear.weight().dim(0)?;
        let mut total: Option<Tensor> = None;
        for start in (0..rows).step_by(slice) {
            let n = slice.min(rows - start);
            let part = Linear::new(
                linear.weight().narrow(0, start, n)?,
                linear.bias().map(|b| b.narrow(0, start, n)).transpose()?,
            );
            let wq = self.formats[f].quantize_weight(part.weight(), &self.weight_stats[id])?;
            let yq = part.forward_with(&xq, &wq)?;
            let s = quant::sensitivity::gradient_score(&dy.narrow(1, start, n)?, &y.narrow(1, start, n)?, &yq)?;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg(format!("layer {id}: a weight without rows")))
    }

    /// Fake-quantizes every weight once (CPU runs, where memory is plentiful and the weights
    /// would otherwise be re-quantized for every sample).
    pub fn cache_weights(&mut self, linears: &[&Linear]) -> Result<()> {
        let cache = linears
            .iter()
            .enumerate()
            .map(|(id, l)| (0..self.formats.len()).map(|f| self.quantize_weight(id, f, l)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        self.cached_weights = Some(cache);
        Ok(())
    }
}

/// The largest fake-quantized weight the gradient method makes at once (see `row_slice`).
const WEIGHT_SLICE_BYTES: usize = 64 << 20;

/// Accumulates one sample's gradient scores, `[layer][format]`, as f32 scalars on the device.
pub struct GradientTap<'a> {
    quant: &'a LayerQuant<'a>,
    scores: Vec<Vec<Option<Tensor>>>,
}

impl<'a> GradientTap<'a> {
    pub fn new(quant: &'a LayerQuant<'a>, num_layers: usize) -> Self {
        GradientTap { quant, scores: vec![vec![None; quant.formats.len()]; num_layers] }
    }

    /// Moves the scores to the host: `[layer][format]` (0 for skipped layers), one sync.
    pub fn finish(self) -> Result<Vec<Vec<f64>>> {
        let num_formats = self.quant.formats.len();
        let flat: Vec<Tensor> = self.scores.iter().flatten().flatten().cloned().collect();
        let values = if flat.is_empty() { Vec::new() } else { Tensor::stack(&flat, 0)?.to_vec1::<f32>()? };
        let mut values = values.into_iter();
        Ok(self
            .scores
            .iter()
            .map(|per_format| {
                per_format
                    .iter()
                    .map(|s| if s.is_some() { values.next().map_or(0.0, f64::from) } else { 0.0 })
                    .collect::<Vec<_>>()
            })
            .inspect(|v| debug_assert_eq!(v.len(), num_formats))
            .collect())
    }
}

impl Tap for GradientTap<'_> {
    fn backward(&mut self, id: LayerId, linear: &Linear, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<()> {
        if self.quant.skip[id] {
            return Ok(());
        }
        for f in 0..self.quant.formats.len() {
            let s = match self.quant.row_slice(id, f, linear) {
                None => quant::sensitivity::gradient_score(dy, y, &self.quant.quantized_output(id, f, linear, x)?)?,
                Some(slice) => self.quant.sliced_gradient_score(id, f, linear, x, y, dy, slice)?,
            };
            self.scores[id][f] = Some(match self.scores[id][f].take() {
                Some(prev) => (prev + s)?,
                None => s,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Fp8PerTensor;

    /// A weight above `WEIGHT_SLICE_BYTES` is scored a slice of rows at a time; the score is
    /// the one of the whole fake-quantized weight.
    #[test]
    fn a_large_weight_scored_in_row_slices_scores_as_the_whole_weight() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols, tokens) = (4500, 4096, 3); // 70 MiB of f32: two slices of 4,096 and 404 rows
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (tokens, cols), &dev)?;
        let dy = Tensor::randn(0f32, 1e-3, (tokens, rows), &dev)?;
        let bias = Tensor::randn(0f32, 0.1, rows, &dev)?;
        let linear = Linear::new(w.clone(), Some(bias));
        let y = linear.forward(&x)?;
        let formats: Vec<Box<dyn Format>> = vec![Box::new(Fp8PerTensor)];
        let input_amax = [quant::fp8::amax(&x)?.to_scalar::<f32>()?];
        let weight_stats = [WeightStats::of(&w)?];
        let quant = LayerQuant {
            formats: &formats,
            input_amax: &input_amax,
            weight_stats: &weight_stats,
            format_calibration: Vec::new(),
            skip: &[false],
            cached_weights: None,
        };
        assert_eq!(quant.row_slice(0, 0, &linear), Some(4096));
        let mut tap = GradientTap::new(&quant, 1);
        tap.backward(0, &linear, &x, &y, &dy)?;
        let sliced = tap.finish()?[0][0];
        let whole = quant::sensitivity::gradient_score(&dy, &y, &quant.quantized_output(0, 0, &linear, &x)?)?
            .to_scalar::<f32>()? as f64;
        assert!(whole > 0.0);
        assert!((sliced - whole).abs() <= 1e-6 * whole, "sliced {sliced} whole {whole}");
        Ok(())
    }
}
