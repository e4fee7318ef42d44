//! Max calibration: every quantizable layer's input amax over the calibration samples, with
//! quantization off (ModelOpt's `max` algorithm), and each weight's statistics.

use candle_core::{Result, Tensor};

use crate::model::{LayerId, Linear, Tap};
use crate::quant::{fp8, WeightStats};

/// Records max |x| of every layer input, on the device, without host syncs per layer.
pub struct AmaxTap {
    amax: Vec<Option<Tensor>>,
}

impl AmaxTap {
    pub fn new(num_layers: usize) -> Self {
        AmaxTap { amax: vec![None; num_layers] }
    }

    /// The amax per layer (0 for a layer that never saw input).
    pub fn finish(self) -> Result<Vec<f32>> {
        self.amax
            .into_iter()
            .map(|a| match a {
                Some(t) => t.to_scalar::<f32>(),
                None => Ok(0.0),
            })
            .collect()
    }
}

impl Tap for AmaxTap {
    fn forward(&mut self, id: LayerId, _linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        let m = fp8::amax(x)?;
        self.amax[id] = Some(match self.amax[id].take() {
            Some(prev) => prev.maximum(&m)?,
            None => m,
        });
        Ok(None)
    }
}

/// Weight statistics of every layer.
pub fn weight_stats(linears: &[&Linear]) -> Result<Vec<WeightStats>> {
    linears.iter().map(|l| WeightStats::of(l.weight())).collect()
}
