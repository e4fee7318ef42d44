//! Where does score-layers spend its time? Times the phases of scoring one sample (or the first
//! PACK samples packed into one forward, as `--batch-tokens` packs them), and — with device syncs
//! at every tap — the model segments between consecutive quantizable layers.
//!
//! cargo run --release [--features cuda] --example profile_scoring -- MODEL_DIR INPUTS DEVICE DTYPE [REPS [PACK]]
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use qsens::artifact::{self, inputs::ModelInputs};
use qsens::model::qwen3_vl::{ForwardOptions, Keep, LogitsMode, Qwen3VL};
use qsens::model::{LayerId, Linear, NoTap, Tap};
use qsens::quant::{format_by_name, Format, WeightStats};
use qsens::score::calibrate::AmaxTap;
use qsens::score::gradient::{GradientTap, LayerQuant};

/// Synchronizes at every tap call and attributes the time since the previous call to the
/// segment ending at this layer (forward) or starting after it (backward).
struct SegmentTimer<'a> {
    device: &'a Device,
    last: Instant,
    segments: BTreeMap<String, f64>,
    names: Vec<String>,
    backward: bool,
}

impl SegmentTimer<'_> {
    fn mark(&mut self, id: LayerId) -> candle_core::Result<()> {
        self.device.synchronize()?;
        let now = Instant::now();
        let kind = segment_kind(&self.names[id]);
        let key = format!("{} {}", if self.backward { "bwd" } else { "fwd" }, kind);
        *self.segments.entry(key).or_default() += now.duration_since(self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }
}

fn segment_kind(name: &str) -> String {
    // Collapse the layer index: model.language_model.layers.3.mlp.down_proj -> text mlp.down_proj
    let parts: Vec<&str> = name.split('.').collect();
    if let Some(i) = parts.iter().position(|p| p.parse::<usize>().is_ok()) {
        let tower = if name.contains("visual") { "vision" } else { "text" };
        format!("{tower} {}", parts[i + 1..].join("."))
    } else {
        name.to_string()
    }
}

impl Tap for SegmentTimer<'_> {
    fn forward(&mut self, id: LayerId, _l: &Linear, _x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.mark(id)?;
        Ok(None)
    }
    fn backward(
        &mut self,
        id: LayerId,
        _l: &Linear,
        _x: &Tensor,
        _y: &Tensor,
        _dy: &Tensor,
    ) -> candle_core::Result<()> {
        self.mark(id)
    }
}

fn timed<T>(device: &Device, reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64 * 1e3)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model_dir, inputs, device, dtype) = (&args[1], &args[2], &args[3], &args[4]);
    let reps: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let pack: usize = args.get(6).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let device = qsens::device::parse_device(device)?;
    let dtype = qsens::score::parse_dtype(dtype)?;
    let t = Instant::now();
    let model = Qwen3VL::load(model_dir.as_ref(), dtype, &device)?;
    device.synchronize()?;
    println!("load: {:.2} s", t.elapsed().as_secs_f64());
    let inputs: ModelInputs = artifact::read::<ModelInputs>(inputs.as_str())?.payload;
    anyhow::ensure!(pack >= 1 && inputs.samples.len() >= pack, "PACK {pack}: the inputs hold {}", inputs.samples.len());
    let parts = inputs.samples[..pack]
        .iter()
        .map(|sample| qsens::score::model_input(sample, &inputs))
        .collect::<Result<Vec<_>>>()?;
    let input = qsens::model::qwen3_vl::Input::pack(&parts).context("packing the samples")?;
    let n = model.layers().len();
    let names: Vec<String> = model.layers().iter().map(|l| l.name.clone()).collect();

    let formats: Vec<Box<dyn Format>> = vec![format_by_name("FP8")?];
    let stats: Vec<WeightStats> =
        (0..n).map(|i| WeightStats::of(model.linear(i).weight())).collect::<candle_core::Result<_>>()?;
    let amax = vec![4.0f32; n];
    let skip = vec![false; n];
    let quant = LayerQuant {
        formats: &formats,
        input_amax: &amax,
        weight_stats: &stats,
        format_calibration: Vec::new(),
        skip: &skip,
        cached_weights: None,
    };

    let calib = ForwardOptions { logits: LogitsMode::None, keep: Keep::Nothing, trace: false };
    let train = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    println!(
        "{pack} sample(s) in one forward: L = {}, image rows = {}",
        input.input_ids.len(),
        input.pixel_values.dims()[0]
    );
    println!(
        "forward (no logits, plain):        {:8.1} ms",
        timed(&device, reps, || Ok(model.forward(&input, &mut NoTap, &calib)?))?
    );
    println!(
        "forward (no logits, amax tap):     {:8.1} ms",
        timed(&device, reps, || {
            let mut tap = AmaxTap::new(n, &device)?;
            model.forward(&input, &mut tap, &calib)?;
            Ok(tap.finish()?)
        })?
    );
    println!(
        "forward (label logits, keep):      {:8.1} ms",
        timed(&device, reps, || Ok(model.forward(&input, &mut NoTap, &train)?))?
    );
    let fwd = model.forward(&input, &mut NoTap, &train)?;
    let rows = (0..n).map(|id| Ok(model.sample_rows(&fwd, id)?.to_vec())).collect::<candle_core::Result<Vec<_>>>()?;
    println!(
        "backward (no tap):                 {:8.1} ms",
        timed(&device, reps, || Ok(model.backward(&fwd, &mut NoTap)?))?
    );
    println!(
        "backward (gradient scores):        {:8.1} ms",
        timed(&device, reps, || {
            let mut tap = GradientTap::packed(&quant, rows.clone());
            model.backward(&fwd, &mut tap)?;
            Ok(tap.finish()?)
        })?
    );

    // Micro-benchmarks of the per-layer scoring ops on a text MLP-sized tensor.
    let id = model.layer_id("model.language_model.layers.0.mlp.down_proj").unwrap_or(n - 2);
    let lin = model.linear(id);
    let rows = input.input_ids.len();
    let x = Tensor::randn(0f32, 1.0, (rows, lin.weight().dims()[1]), &device)?.to_dtype(dtype)?;
    let y = lin.forward(&x)?;
    println!("micro ({}, x {:?}, w {:?}):", names[id], x.dims(), lin.weight().dims());
    println!("  matmul                           {:8.3} ms", timed(&device, 20, || Ok(lin.forward(&x)?))?);
    println!("  amax(x)                          {:8.3} ms", timed(&device, 20, || Ok(qsens::quant::fp8::amax(&x)?))?);
    println!(
        "  fake-quant x                     {:8.3} ms",
        timed(&device, 20, || Ok(qsens::quant::fp8::fake_quant_tensor(&x, 3.0)?))?
    );
    println!(
        "  fake-quant w                     {:8.3} ms",
        timed(&device, 20, || Ok(formats[0].quantize_weight(lin.weight(), &stats[id])?))?
    );
    println!(
        "  quantized output                 {:8.3} ms",
        timed(&device, 20, || Ok(quant.quantized_output(id, 0, lin, &x)?))?
    );
    println!(
        "  gradient score (given yq)        {:8.3} ms",
        timed(&device, 20, || Ok(qsens::quant::sensitivity::gradient_score(&y, &y, &y)?))?
    );

    // Segment profile (syncs at each tap: absolute numbers inflate, the split is what matters).
    for backward in [false, true] {
        let mut timer = SegmentTimer {
            device: &device,
            last: Instant::now(),
            segments: BTreeMap::new(),
            names: names.clone(),
            backward,
        };
        if backward {
            let fwd = model.forward(&input, &mut NoTap, &train)?;
            device.synchronize()?;
            timer.last = Instant::now();
            model.backward(&fwd, &mut timer)?;
        } else {
            model.forward(&input, &mut timer, &train)?;
        }
        device.synchronize()?;
        let mut segs: Vec<(String, f64)> = timer.segments.into_iter().collect();
        segs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = segs.iter().map(|s| s.1).sum();
        println!("{} segments (total {:.1} ms, synced):", if backward { "backward" } else { "forward" }, total * 1e3);
        for (k, v) in segs.iter().take(12) {
            println!("  {:40} {:8.2} ms", k, v * 1e3);
        }
    }
    Ok(())
}
