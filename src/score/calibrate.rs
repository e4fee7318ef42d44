//! Max calibration: every quantizable layer's input amax over the calibration samples, with
//! quantization off (ModelOpt's `max` algorithm), and each weight's statistics.

use candle_core::{DType, Device, Result, Tensor};

use crate::model::{LayerId, Linear, Tap};
use crate::quant::{fp8, WeightStats};

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
