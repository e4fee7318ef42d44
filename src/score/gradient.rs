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
        let xq = match self.format_calibration(id, f) {
            Some(FormatCalibration { smoothing: Some(s), input_amax }) => {
                self.formats[f].quantize_input(&x.broadcast_mul(&s.input)?, *input_amax)?
            }
            Some(FormatCalibration { smoothing: None, input_amax }) => {
                self.formats[f].quantize_input(x, *input_amax)?
            }
            None => self.formats[f].quantize_input(x, self.input_amax[id])?,
        };
        Ok((xq, self.weight(id, f, linear)?))
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
            let yq = self.quant.quantized_output(id, f, linear, x)?;
            let s = quant::sensitivity::gradient_score(dy, y, &yq)?;
            self.scores[id][f] = Some(match self.scores[id][f].take() {
                Some(prev) => (prev + s)?,
                None => s,
            });
        }
        Ok(())
    }
}
