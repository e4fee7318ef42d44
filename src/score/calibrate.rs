//! Calibration over the calibration samples, quantization off: every quantizable layer's input
//! amax (ModelOpt's `max` algorithm), each weight's statistics, and AWQ-lite's two passes for
//! the formats that smooth (`quant::awq`).

use candle_core::{DType, Device, Result, Tensor};

use crate::model::{LayerId, Linear, Tap};
use crate::quant::{self, awq, fp8, host, Format, WeightStats};

/// Records max |x| of every layer input in one f32 vector on the device: one kernel per layer,
/// no host sync until [`AmaxTap::finish`].
pub struct AmaxTap {
    amax: Tensor,
}

impl AmaxTap {
    pub fn new(num_layers: usize, device: &Device) -> Result<Self> {
        Ok(AmaxTap { amax: Tensor::zeros(num_layers, DType::F32, device)? })
    }

    /// The amax per layer (0 for a layer that never saw input).
    pub fn finish(self) -> Result<Vec<f32>> {
        self.amax.to_vec1::<f32>()
    }
}

impl Tap for AmaxTap {
    fn forward(&mut self, id: LayerId, _linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        fp8::update_amax(&self.amax, id, x)?;
        Ok(None)
    }
}

/// Weight statistics of every layer.
pub fn weight_stats(linears: &[&Linear]) -> Result<Vec<WeightStats>> {
    linears.iter().map(|l| WeightStats::of(l.weight())).collect()
}

/// AWQ-lite's first pass: per searched layer, the mean |x| per channel of every calibration
/// batch and the max |x| per channel (the input amax ModelOpt keeps for smoothing).
pub struct AwqCacheTap {
    /// Per layer: `None` for layers not searched.
    pub layers: Vec<Option<AwqCache>>,
}

/// What [`AwqCacheTap`] gathers for one layer.
#[derive(Debug, Clone, Default)]
pub struct AwqCache {
    pub search: awq::LayerSearch,
    pub channel_amax: Vec<f32>,
}

impl Tap for AwqCacheTap {
    fn forward(&mut self, id: LayerId, _linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if let Some(cache) = &mut self.layers[id] {
            let (values, cols) = (host::to_f32_vec(x)?, x.dims().last().copied().unwrap_or(1));
            cache.search.cache(&values, cols);
            if cache.channel_amax.is_empty() {
                cache.channel_amax = vec![0.0; cols];
            }
            for row in values.chunks(cols) {
                for (m, v) in cache.channel_amax.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
        }
        Ok(None)
    }
}

/// AWQ-lite's second pass for one format: per searched layer and α, the summed loss of the
/// smoothed, weight-quantized layer against the plain one (the plain output flows on).
///
/// The forwards only keep each searched layer's inputs (a clone shares the tensor, so q/k/v keep
/// one copy); [`AwqSearchTap::search`] then quantizes each layer's smoothed weight once per α and
/// runs it on every kept input, instead of once per α and sample. The losses are those of
/// ModelOpt's per-batch loop, summed over samples in the same order.
///
/// Layers ModelOpt does not wrap for the search (the patch embedding, a convolution) keep the
/// format's quantizers on during this pass: their quantized output flows on, as in ModelOpt,
/// where the whole recipe is enabled once the statistics pass has ended.
pub struct AwqSearchTap<'a> {
    pub format: &'a dyn Format,
    /// Per layer: the search (`None`: not searched).
    pub searches: Vec<Option<AwqFormatSearch>>,
    /// Per layer: quantized in the format during the pass, with this input amax.
    pub quantized: Vec<Option<f32>>,
}

/// One layer's search in one format: the weight scale of AWQ's formula, the candidate scales
/// (input multiplier `1/s`, weight multiplier `s`, per α, in the layer's dtype), the inputs seen
/// and the summed losses.
pub struct AwqFormatSearch {
    pub weight_scale: Vec<f32>,
    pub input_scales: Vec<Tensor>,
    pub weight_scales: Vec<Tensor>,
    /// The layer's input of each forward, in order.
    pub inputs: Vec<Tensor>,
    pub losses: Vec<f32>,
}

impl AwqFormatSearch {
    /// The candidates of a layer from its averaged activation scale and its weight.
    pub fn new(act_scale: &[f32], weight: &Tensor, block: Option<usize>) -> Result<Self> {
        let cols = weight.dim(1)?;
        let weight_scale = awq::weight_scale(&host::to_f32_vec(weight)?, cols, block);
        let (mut input_scales, mut weight_scales) = (Vec::new(), Vec::new());
        for alpha in awq::alphas() {
            let s = awq::scale(act_scale, &weight_scale, alpha);
            let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
            let on_device = |v: Vec<f32>| {
                Tensor::from_vec(v, cols, &Device::Cpu)?.to_dtype(weight.dtype())?.to_device(weight.device())
            };
            input_scales.push(on_device(inv)?);
            weight_scales.push(on_device(s)?);
        }
        let losses = vec![0.0; awq::alphas().len()];
        Ok(AwqFormatSearch { weight_scale, input_scales, weight_scales, inputs: Vec::new(), losses })
    }

    /// Per α: the smoothed weight quantized once, then the loss on each kept input (the sample
    /// order of the forwards); the inputs are released after.
    fn search(&mut self, format: &dyn Format, linear: &Linear) -> Result<()> {
        let plain: Vec<Tensor> = self.inputs.iter().map(|x| linear.forward(x)).collect::<Result<_>>()?;
        for a in 0..self.losses.len() {
            let ws = linear.weight().broadcast_mul(&self.weight_scales[a])?;
            let wq = format.quantize_weight(&ws, &WeightStats::of(&ws)?)?;
            for (x, plain) in self.inputs.iter().zip(&plain) {
                let xs = x.broadcast_mul(&self.input_scales[a])?;
                let out = linear.forward_with(&xs, &wq)?;
                let loss = (out - plain)?.to_dtype(DType::F32)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
                self.losses[a] += loss;
            }
        }
        self.inputs.clear();
        Ok(())
    }
}

impl AwqSearchTap<'_> {
    /// Runs every layer's search on the inputs the forwards kept (`linear(id)`: the model's layer).
    pub fn search<'m>(&mut self, linear: impl Fn(LayerId) -> &'m Linear) -> Result<()> {
        for (id, search) in self.searches.iter_mut().enumerate() {
            if let Some(search) = search {
                search.search(self.format, linear(id))?;
            }
        }
        Ok(())
    }
}

impl Tap for AwqSearchTap<'_> {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if let Some(input_amax) = self.quantized[id] {
            let stats = WeightStats::of(linear.weight())?;
            let w = quant::format::quantize_weight_as(self.format, linear.weight(), &stats, linear.checkpoint_shape())?;
            return Ok(Some(linear.forward_with(&self.format.quantize_input(x, input_amax)?, &w)?));
        }
        if let Some(search) = &mut self.searches[id] {
            search.inputs.push(x.clone());
        }
        Ok(None)
    }
}
