//! Calibration over the calibration samples, quantization off: every quantizable layer's input
//! amax (ModelOpt's `max` algorithm), each weight's statistics, and AWQ-lite's two passes for
//! the formats that smooth (`quant::awq`).

use candle_core::{DType, Device, Result, Tensor};

use crate::model::{LayerId, Linear, Tap};
use crate::quant::{self, awq, fp8, Format, WeightStats};

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

/// Per-channel input statistics of every searched layer, gathered on the device with no host
/// copy: the max |x| per channel (SmoothQuant's per-channel input amax, and the input amax
/// AWQ-lite keeps for smoothing) and, for AWQ-lite's first pass, the sum over calibration batches
/// of each batch's mean |x| per channel.
pub struct AwqCacheTap {
    /// Per layer: `None` for layers not searched.
    pub layers: Vec<Option<AwqCache>>,
    /// Whether to gather AWQ-lite's activation means too (SmoothQuant needs only the amax).
    pub act_scales: bool,
    /// The input of the last layer seen (q, k and v share theirs, as do gate and up).
    last_input: Option<candle_core::TensorId>,
}

/// What [`AwqCacheTap`] gathers for one layer (f32 `[cols]` tensors on the model's device).
#[derive(Debug, Clone, Default)]
pub struct AwqCache {
    channel_amax: Option<Tensor>,
    act_sum: Option<Tensor>,
    steps: usize,
    /// Bytes of the inputs this layer does not share with the layer before it, over all batches:
    /// what AWQ-lite's search pass keeps for it on the device.
    pub own_input_bytes: usize,
}

impl AwqCache {
    /// The max |x| per input channel (empty if no batch reached the layer).
    pub fn channel_amax(&self) -> Result<Vec<f32>> {
        self.channel_amax.as_ref().map_or(Ok(Vec::new()), |t| t.to_vec1::<f32>())
    }

    /// AWQ-lite's averaged activation scale (`None` if no batch reached the layer).
    pub fn act_scale(&self) -> Result<Option<Vec<f32>>> {
        let Some(sum) = &self.act_sum else { return Ok(None) };
        Ok(Some(sum.to_vec1::<f32>()?.iter().map(|s| s / self.steps.max(1) as f32).collect()))
    }
}

impl AwqCacheTap {
    pub fn new(searched: impl Fn(LayerId) -> bool, num_layers: usize, act_scales: bool) -> Self {
        let layers = (0..num_layers).map(|id| searched(id).then(AwqCache::default)).collect();
        AwqCacheTap { layers, act_scales, last_input: None }
    }
}

impl Tap for AwqCacheTap {
    fn forward(&mut self, id: LayerId, _linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        let shared = self.last_input.replace(x.id()) == Some(x.id());
        if let Some(cache) = &mut self.layers[id] {
            if !shared {
                cache.own_input_bytes += x.elem_count() * x.dtype().size_in_bytes();
            }
            let cols = x.dims().last().copied().unwrap_or(1);
            let abs_x = x.to_dtype(DType::F32)?.reshape(((), cols))?.abs()?;
            let amax = abs_x.max(0)?;
            cache.channel_amax = Some(match &cache.channel_amax {
                Some(m) => m.maximum(&amax)?,
                None => amax,
            });
            if self.act_scales {
                let mean = awq::act_scale_of(&abs_x)?;
                cache.act_sum = Some(match &cache.act_sum {
                    Some(sum) => (sum + mean)?,
                    None => mean,
                });
            }
            cache.steps += 1;
        }
        Ok(None)
    }
}

/// AWQ-lite's second pass for one format: per searched layer and α, the summed loss of the
/// smoothed, weight-quantized layer against the plain one (the plain output flows on).
///
/// The forwards only keep each searched layer's inputs on the device (a clone shares the tensor,
/// so q/k/v keep one copy); [`AwqSearchTap::search`] then quantizes each layer's smoothed weight
/// once per α and runs it on all kept inputs at once, instead of once per α and sample. The
/// losses are those of ModelOpt's per-batch loop, summed over samples in the same order. To bound
/// the memory the kept inputs take, a caller searches the layers in chunks ([`budget_chunks`]),
/// one pass of forwards per chunk.
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
        let weight_scale = awq::weight_scale_of(weight, block)?;
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

    /// Per α: the smoothed weight quantized once and run on the kept inputs in one matmul per group
    /// of samples (rows concatenated in sample order; [`SEARCH_GROUP_BYTES`] bounds a group), then
    /// each sample's loss, the mean over its rows as ModelOpt's per-batch `mse_loss`; the inputs
    /// are released after. The losses stay on the device until the layer is done, then are summed
    /// on the host in the order of ModelOpt's loop.
    fn search(&mut self, format: &dyn Format, linear: &Linear) -> Result<()> {
        if self.inputs.is_empty() {
            return Ok(());
        }
        let (out_features, cols) = linear.weight().dims2()?;
        let rows: Vec<usize> = self.inputs.iter().map(|x| x.elem_count() / cols).collect();
        let row_bytes = out_features * DType::F32.size_in_bytes();
        let sample_bytes: Vec<usize> = rows.iter().map(|n| n * row_bytes).collect();
        let groups = budget_chunks(&sample_bytes, SEARCH_GROUP_BYTES);
        let flat: Vec<Tensor> = self.inputs.drain(..).map(|x| x.reshape(((), cols))).collect::<Result<_>>()?;
        let batches: Vec<Tensor> = groups.iter().map(|g| Tensor::cat(&flat[g.clone()], 0)).collect::<Result<_>>()?;
        drop(flat);
        // The unquantized outputs are kept when they fit in one group, else recomputed per α.
        let plain = if groups.len() == 1 { Some(linear.forward(&batches[0])?) } else { None };
        // Every α's smoothed-weight amax (the weight quantizer recalibrates it) in one device sync,
        // from the column maxima: with s > 0 and rounding monotone, max |round(W·s)| over a column
        // is round(max |W| · s), so this equals fp8::amax of the smoothed weight bit for bit.
        let smoothed = |a: usize| linear.weight().broadcast_mul(&self.weight_scales[a]);
        let column_amax = linear.weight().abs()?.max(0)?;
        let amax: Vec<Tensor> =
            self.weight_scales.iter().map(|s| smoothed_weight_amax(&column_amax, s)).collect::<Result<_>>()?;
        let amax = Tensor::stack(&amax, 0)?.to_vec1::<f32>()?;
        let mut losses = Vec::with_capacity(self.losses.len() * groups.len());
        for (a, &amax) in amax.iter().enumerate() {
            let wq = format.quantize_weight(&smoothed(a)?, &WeightStats { amax })?;
            for (x, group) in batches.iter().zip(&groups) {
                let out = linear.forward_with(&x.broadcast_mul(&self.input_scales[a])?, &wq)?;
                let squared = match &plain {
                    Some(plain) => (out - plain)?,
                    None => (out - linear.forward(x)?)?,
                }
                .to_dtype(DType::F32)?
                .sqr()?;
                losses.push(per_sample_means(&squared, &rows[group.clone()])?);
            }
        }
        let losses = Tensor::cat(&losses, 0)?.to_vec1::<f32>()?;
        for (total, per_sample) in self.losses.iter_mut().zip(losses.chunks(rows.len())) {
            for loss in per_sample {
                *total += loss;
            }
        }
        Ok(())
    }
}

/// `fp8::amax` of a weight smoothed by the positive per-column `scale` (both in the weight's
/// dtype), from the weight's column maxima `column_amax = max_r |W[r, c]|`: an f32 scalar.
fn smoothed_weight_amax(column_amax: &Tensor, scale: &Tensor) -> Result<Tensor> {
    (column_amax * scale)?.max(0)?.to_dtype(DType::F32)
}

/// The most bytes one group of AWQ-lite's search may take for its f32 squared errors: all of a
/// layer's samples go in one matmul, except for very wide outputs (the lm_head's 151,936 columns
/// would take gigabytes for 8 samples at once).
pub const SEARCH_GROUP_BYTES: usize = 256 << 20;

/// The mean of each sample's rows of `squared` (`rows[i]` rows for sample i, in order), as an f32
/// vector on its device. On the CPU each mean is `mean_all` of the sample's rows, in order, as a
/// per-sample loop would sum them; on a GPU the rows are summed first in one kernel (a reduction
/// of everything to one value runs on a single thread block there), then each sample's row sums.
fn per_sample_means(squared: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let cols = squared.dim(1)?;
    let row_sums = if squared.device().is_cpu() { None } else { Some(squared.sum(1)?) };
    let mut means = Vec::with_capacity(rows.len());
    let mut first = 0;
    for &n in rows {
        means.push(match &row_sums {
            None => squared.narrow(0, first, n)?.mean_all()?,
            Some(sums) => (sums.narrow(0, first, n)?.sum_all()? / (n * cols) as f64)?,
        });
        first += n;
    }
    Tensor::stack(&means, 0)
}

/// Splits items of `item_bytes[i]` bytes into consecutive chunks of at most `budget` bytes. A
/// chunk holds at least one item with bytes, whatever its size, and an item of 0 bytes stays in
/// its predecessor's chunk. Used for the layers of AWQ-lite's search pass (their kept inputs, 0
/// for a layer sharing its predecessor's input: one pass of forwards per chunk) and for the
/// samples of one layer's search ([`SEARCH_GROUP_BYTES`]: one matmul per chunk).
pub fn budget_chunks(item_bytes: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &b) in item_bytes.iter().enumerate() {
        if b > 0 && bytes > 0 && bytes + b > budget {
            chunks.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += b;
    }
    if start < item_bytes.len() {
        chunks.push(start..item_bytes.len());
    }
    chunks
}

impl<'a> AwqSearchTap<'a> {
    pub fn new(format: &'a dyn Format, searches: Vec<Option<AwqFormatSearch>>, quantized: Vec<Option<f32>>) -> Self {
        AwqSearchTap { format, searches, quantized }
    }

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

#[cfg(test)]
mod tests {
    use super::budget_chunks;

    #[test]
    fn smoothed_weight_amax_from_column_maxima_equals_the_amax_of_the_smoothed_weight() {
        use candle_core::{DType, Device, Tensor};
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for seed in 0..4u64 {
                let values = |n: usize, scale: f32| -> Vec<f32> {
                    (0..n)
                        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000003) as f32 / 1000003.0 - 0.3) * scale)
                        .collect()
                };
                let w =
                    Tensor::from_vec(values(37 * 24, 3.0), (37, 24), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let s: Vec<f32> = values(24, 1.0).iter().map(|v| v.abs() * 40.0 + 1e-4).collect();
                let s = Tensor::from_vec(s, 24, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let full = crate::quant::fp8::amax(&w.broadcast_mul(&s).unwrap()).unwrap().to_scalar::<f32>().unwrap();
                let column_amax = w.abs().unwrap().max(0).unwrap();
                let from_columns = super::smoothed_weight_amax(&column_amax, &s).unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(from_columns, full, "{dtype:?} seed {seed}");
            }
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a list of one group, not the range's values
    fn sample_groups_stay_within_the_budget_with_at_least_one_sample() {
        // Samples of 10, 10, 10 (then 10, 30, 10) rows of 4 bytes.
        assert_eq!(budget_chunks(&[40, 40, 40], 1000), [0..3]);
        assert_eq!(budget_chunks(&[40, 40, 40], 80), [0..2, 2..3]);
        assert_eq!(budget_chunks(&[40, 120, 40], 80), [0..1, 1..2, 2..3]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a list of one chunk, not the range's values
    fn search_chunks_stay_within_the_budget_and_keep_shared_inputs_together() {
        // Layers 1 and 2 share layer 0's input; layer 5 is not searched.
        let bytes = [40, 0, 0, 30, 50, 0, 20, 90];
        assert_eq!(budget_chunks(&bytes, 100), [0..4, 4..7, 7..8]);
        // A layer over the budget gets a chunk of its own; everything fits in one big budget.
        assert_eq!(budget_chunks(&bytes, 10), [0..3, 3..4, 4..6, 6..7, 7..8]);
        assert_eq!(budget_chunks(&bytes, 1000), [0..8]);
        assert_eq!(budget_chunks(&[], 10), Vec::<std::ops::Range<usize>>::new());
    }
}
