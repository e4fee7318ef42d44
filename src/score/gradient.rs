//! ModelOpt's gradient score: for every layer and format,
//! `Σ (∂L/∂Y ⊙ (Y_q − Y))²` where `Y_q` is the layer's output with only that layer
//! fake-quantized (input and weight) on the unquantized input. One forward and one backward per
//! sample give every layer's ∂L/∂Y; `Y_q` is computed in the backward, right where ∂L/∂Y arrives,
//! so nothing extra is kept from the forward.

use candle_core::{DType, Device, Result, Tensor};

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

    /// Each packed sample's `gradient_score` of layer `id` in format `f` (f32 `[samples]`), the
    /// fake-quantized output made whole or, for a large weight, `row_slice` output rows at a
    /// time (the score is a sum over output columns: the same terms, a slice at a time).
    #[allow(clippy::too_many_arguments)]
    fn gradient_scores(
        &self,
        id: LayerId,
        f: usize,
        linear: &Linear,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        samples: &[(usize, usize)],
    ) -> Result<Tensor> {
        let Some(slice) = self.row_slice(id, f, linear) else {
            return sample_scores(dy, y, &self.quantized_output(id, f, linear, x)?, samples);
        };
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
            let s = sample_scores(&dy.narrow(1, start, n)?, &y.narrow(1, start, n)?, &yq, samples)?;
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

/// `gradient_score` of each packed sample's rows `(start, len)` (f32 `[samples]`; 0 for a sample
/// with no rows here, e.g. the vision layers of a sample without an image). An input that is not
/// packed is one sample of every row.
fn sample_scores(dy: &Tensor, y: &Tensor, yq: &Tensor, samples: &[(usize, usize)]) -> Result<Tensor> {
    if let [(0, len)] = samples {
        if *len == dy.dim(0)? {
            return quant::sensitivity::gradient_score(dy, y, yq)?.reshape(1);
        }
    }
    let scores = samples
        .iter()
        .map(|&(start, len)| match len {
            0 => Tensor::zeros((), DType::F32, dy.device()),
            _ => quant::sensitivity::gradient_score(
                &dy.narrow(0, start, len)?,
                &y.narrow(0, start, len)?,
                &yq.narrow(0, start, len)?,
            ),
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&scores, 0)
}

/// Accumulates the gradient scores of one input's samples (several when the input packs several
/// samples), per layer and format, as f32 `[samples]` tensors on the device.
pub struct GradientTap<'a> {
    quant: &'a LayerQuant<'a>,
    /// Per layer: the rows `(start, len)` of each sample in its input and output.
    rows: Vec<Vec<(usize, usize)>>,
    samples: usize,
    scores: Vec<Vec<Option<Tensor>>>,
}

impl<'a> GradientTap<'a> {
    /// A tap for an input of one sample.
    pub fn new(quant: &'a LayerQuant<'a>, num_layers: usize) -> Self {
        Self::packed(quant, vec![Vec::new(); num_layers])
    }

    /// A tap for packed samples: `rows[layer]` are each sample's rows of that layer (as
    /// `Qwen3VL::sample_rows` gives them); an empty entry means one sample of every row.
    pub fn packed(quant: &'a LayerQuant<'a>, rows: Vec<Vec<(usize, usize)>>) -> Self {
        let samples = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let scores = vec![vec![None; quant.formats.len()]; rows.len()];
        GradientTap { quant, rows, samples, scores }
    }

    /// Moves the scores to the host, one sync: `[sample][layer][format]` (0 for skipped layers).
    pub fn finish(self) -> Result<Vec<Vec<Vec<f64>>>> {
        let flat: Vec<Tensor> = self.scores.iter().flatten().flatten().cloned().collect();
        let values = if flat.is_empty() { Vec::new() } else { Tensor::cat(&flat, 0)?.to_vec1::<f32>()? };
        let mut values = values.chunks_exact(self.samples);
        let mut out = vec![vec![vec![0.0; self.quant.formats.len()]; self.scores.len()]; self.samples];
        for (id, per_format) in self.scores.iter().enumerate() {
            for (f, s) in per_format.iter().enumerate() {
                if s.is_none() {
                    continue;
                }
                let v =
                    values.next().ok_or_else(|| candle_core::Error::Msg("gradient scores: too few values".into()))?;
                for (sample, &v) in v.iter().enumerate() {
                    out[sample][id][f] = f64::from(v);
                }
            }
        }
        Ok(out)
    }
}

impl Tap for GradientTap<'_> {
    fn backward(&mut self, id: LayerId, linear: &Linear, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<()> {
        if self.quant.skip[id] {
            return Ok(());
        }
        let whole = [(0, dy.dim(0)?)];
        let rows = match self.rows[id].as_slice() {
            [] => &whole[..],
            rows => rows,
        };
        if rows.len() != self.samples {
            candle_core::bail!("gradient tap: layer {id} has rows for {} samples, not {}", rows.len(), self.samples)
        }
        for f in 0..self.quant.formats.len() {
            let s = self.quant.gradient_scores(id, f, linear, x, y, dy, rows)?;
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
        let sliced = tap.finish()?[0][0][0];
        let whole = quant::sensitivity::gradient_score(&dy, &y, &quant.quantized_output(0, 0, &linear, &x)?)?
            .to_scalar::<f32>()? as f64;
        assert!(whole > 0.0);
        assert!((sliced - whole).abs() <= 1e-6 * whole, "sliced {sliced} whole {whole}");
        Ok(())
    }

    /// Packed samples get the scores of their own rows, 0 where a sample has no rows, and the
    /// same values as scoring each sample alone.
    #[test]
    fn packed_rows_score_per_sample() -> Result<()> {
        let dev = Device::Cpu;
        let (cols, rows) = (24, 16);
        let w = Tensor::randn(0f32, 0.2, (rows, cols), &dev)?;
        let linear = Linear::new(w.clone(), None);
        let formats: Vec<Box<dyn Format>> = vec![Box::new(Fp8PerTensor)];
        let weight_stats = [WeightStats::of(&w)?];
        let x = Tensor::randn(0f32, 1.0, (9, cols), &dev)?;
        let input_amax = [quant::fp8::amax(&x)?.to_scalar::<f32>()?];
        let quant = LayerQuant {
            formats: &formats,
            input_amax: &input_amax,
            weight_stats: &weight_stats,
            format_calibration: Vec::new(),
            skip: &[false],
            cached_weights: None,
        };
        let y = linear.forward(&x)?;
        let dy = Tensor::randn(0f32, 1e-2, (9, rows), &dev)?;
        let segments = vec![(0, 4), (4, 0), (4, 5)];
        let mut tap = GradientTap::packed(&quant, vec![segments.clone()]);
        tap.backward(0, &linear, &x, &y, &dy)?;
        let packed = tap.finish()?;
        assert_eq!(packed.len(), 3);
        assert_eq!(packed[1][0][0], 0.0);
        for (sample, &(start, len)) in segments.iter().enumerate().filter(|(_, s)| s.1 > 0) {
            let mut alone = GradientTap::new(&quant, 1);
            let part = |t: &Tensor| t.narrow(0, start, len);
            alone.backward(0, &linear, &part(&x)?, &part(&y)?, &part(&dy)?)?;
            let want = alone.finish()?[0][0][0];
            assert!(want > 0.0);
            assert_eq!(packed[sample][0][0], want, "sample {sample}");
        }
        Ok(())
    }
}
