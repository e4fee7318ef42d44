//! The hand-written backward against central finite differences (f64), the resumable forward
//! (`forward_from`) against full forwards, and bf16 end to end. Tiny checkpoint, CPU.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use qsens::model::qwen3_vl::{Forward, ForwardOptions, Input, Keep, LogitsMode, Qwen3VL};
use qsens::model::{LayerId, Linear, NoTap, Tap};
use rand::SeedableRng;
use rand_distr::Distribution;

use common::qwen::{errors, input_from_reference, max_abs_diff, reference, TINY};

/// The smallest reference sample (L = 161, 504 patches).
const SAMPLE: usize = 2;

fn randn_like(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// Records every backward call; optionally adds `eps · dir` to one layer's output in the forward.
#[derive(Default)]
struct Probe {
    target: Option<(LayerId, f64, Tensor)>,
    forward_rows: HashMap<LayerId, usize>,
    dy: HashMap<LayerId, Tensor>,
    order: Vec<LayerId>,
    max_y_err: f64,
}

impl Tap for Probe {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        self.forward_rows.insert(id, x.dim(0)?);
        match &self.target {
            Some((t, eps, dir)) if *t == id => Ok(Some((linear.forward(x)? + (dir * *eps)?)?)),
            _ => Ok(None),
        }
    }

    fn backward(&mut self, id: LayerId, linear: &Linear, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<()> {
        let (rows, inf) = x.dims2()?;
        assert_eq!(inf, linear.weight().dim(1)?);
        assert_eq!(y.dims(), &[rows, linear.weight().dim(0)?]);
        assert_eq!(dy.dims(), y.dims());
        self.max_y_err = self.max_y_err.max(max_abs_diff(y, &linear.forward(x)?));
        self.dy.insert(id, dy.clone());
        self.order.push(id);
        Ok(())
    }
}

fn loss_f64(fwd: &Forward) -> f64 {
    fwd.loss_tensor().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn sample_input() -> Option<Input> {
    let fx = common::fixtures()?;
    Some(input_from_reference(&reference(&fx, SAMPLE)))
}

#[test]
fn backward_matches_finite_differences_f64() {
    let fx = fixtures_or_skip!();
    let input = sample_input().unwrap();
    let model = Qwen3VL::load(&fx.join(TINY), DType::F64, &Device::Cpu).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    let mut probe = Probe::default();
    let fwd = model.forward(&input, &mut probe, &opts).unwrap();
    model.backward(&fwd, &mut probe).unwrap();
    // Every layer once, in reverse, with y = linear(x).
    let n = model.layers().len();
    let mut seen = probe.order.clone();
    seen.sort();
    assert_eq!(seen, (0..n).collect::<Vec<_>>(), "each layer exactly once");
    assert_eq!(probe.order[0], model.lm_head_id());
    assert_eq!(*probe.order.last().unwrap(), 0, "patch embed last");
    assert!(probe.max_y_err == 0.0, "y must be the plain output, off by {}", probe.max_y_err);
    let lm_rows = probe.forward_rows[&model.lm_head_id()];
    assert_eq!(lm_rows, fwd.logits.as_ref().unwrap().dim(0).unwrap());

    let names = [
        "model.visual.patch_embed.proj",
        "model.visual.blocks.0.attn.qkv",
        "model.visual.blocks.1.attn.proj",
        "model.visual.blocks.2.mlp.linear_fc1",
        "model.visual.merger.linear_fc2",
        "model.visual.deepstack_merger_list.0.linear_fc1",
        "model.visual.deepstack_merger_list.1.linear_fc2",
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.1.self_attn.k_proj",
        "model.language_model.layers.1.self_attn.v_proj",
        "model.language_model.layers.2.self_attn.o_proj",
        "model.language_model.layers.0.mlp.gate_proj",
        "model.language_model.layers.2.mlp.down_proj",
        "lm_head",
    ];
    let eps = 1e-4;
    let plain = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Nothing, trace: false };
    let mut failures = Vec::new();
    for (seed, name) in names.iter().enumerate() {
        let id = model.layer_id(name).unwrap();
        let dy = &probe.dy[&id];
        let u = randn_like(dy.dims(), DType::F64, seed as u64 + 1);
        let analytic = (dy * &u).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let mut l = [0.0; 2];
        for (i, sign) in [1.0, -1.0].into_iter().enumerate() {
            let mut tap = Probe { target: Some((id, sign * eps, u.clone())), ..Default::default() };
            l[i] = loss_f64(&model.forward(&input, &mut tap, &plain).unwrap());
        }
        let fd = (l[0] - l[1]) / (2.0 * eps);
        let rel = (fd - analytic).abs() / analytic.abs();
        eprintln!("{name:50} <dy,u> {analytic:+.6e}  fd {fd:+.6e}  rel {rel:.2e}");
        if rel.is_nan() || rel > 1e-3 {
            failures.push(format!("{name}: analytic {analytic} fd {fd} rel {rel}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn forward_from_reproduces_and_follows_perturbations() {
    let fx = fixtures_or_skip!();
    let input = sample_input().unwrap();
    let model = Qwen3VL::load(&fx.join(TINY), DType::F32, &Device::Cpu).unwrap();
    let all = |keep| ForwardOptions { logits: LogitsMode::All, keep, trace: false };
    let fwd = model.forward(&input, &mut NoTap, &all(Keep::Resume)).unwrap();
    let logits = fwd.logits.as_ref().unwrap();
    let starts = [
        "model.visual.patch_embed.proj",
        "model.visual.blocks.0.attn.qkv",
        "model.visual.blocks.1.mlp.linear_fc2",
        "model.visual.blocks.2.attn.proj",
        "model.visual.merger.linear_fc1",
        "model.visual.deepstack_merger_list.0.linear_fc1",
        "model.visual.deepstack_merger_list.1.linear_fc2",
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.1.mlp.up_proj",
        "model.language_model.layers.2.self_attn.o_proj",
        "lm_head",
    ];
    for name in starts {
        let id = model.layer_id(name).unwrap();
        let again = model.forward_from(&fwd, id, &mut NoTap).unwrap();
        assert_eq!(again.dims(), logits.dims());
        assert_eq!(max_abs_diff(&again, logits), 0.0, "no-op restart at {name} is not bit-exact");
    }

    /// Scales one layer's output (a deterministic stand-in for fake quantization).
    struct Perturb(LayerId);
    impl Tap for Perturb {
        fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
            if id == self.0 {
                Ok(Some(linear.forward(x)?.affine(1.05, 0.01)?))
            } else {
                Ok(None)
            }
        }
    }
    for name in starts {
        let id = model.layer_id(name).unwrap();
        let full = model.forward(&input, &mut Perturb(id), &all(Keep::Nothing)).unwrap();
        let full = full.logits.unwrap();
        let resumed = model.forward_from(&fwd, id, &mut Perturb(id)).unwrap();
        assert!(max_abs_diff(&full, logits) > 0.0, "perturbing {name} changed nothing");
        assert_eq!(max_abs_diff(&resumed, &full), 0.0, "restart at {name} differs from a full forward");
        // forward_from_hidden stops at lm_head's input and does not ask the tap about lm_head.
        let hidden = model.forward_from_hidden(&fwd, id, &mut Perturb(id)).unwrap();
        let head = model.linear(model.lm_head_id()).forward(&hidden).unwrap();
        let expected = if id == model.lm_head_id() { logits } else { &resumed };
        assert_eq!(max_abs_diff(&head, expected), 0.0, "forward_from_hidden at {name}");
    }
}

#[test]
fn logits_modes_and_lm_head_rows() {
    let fx = fixtures_or_skip!();
    let input = sample_input().unwrap();
    let model = Qwen3VL::load(&fx.join(TINY), DType::F32, &Device::Cpu).unwrap();
    let lm = model.lm_head_id();
    let l = input.input_ids.len();
    let n_labels = input.labels.as_ref().unwrap().iter().skip(1).filter(|&&y| y != -100).count();
    let run = |mode| {
        let mut p = Probe::default();
        let f = model.forward(&input, &mut p, &ForwardOptions { logits: mode, keep: Keep::Nothing, trace: false });
        (f.unwrap(), p.forward_rows[&lm])
    };
    let (none, rows) = run(LogitsMode::None);
    assert!(none.logits.is_none() && none.loss.is_none());
    assert_eq!(rows, l, "calibration sees every row of lm_head's input");
    let (lab, rows) = run(LogitsMode::LabelPositions);
    assert_eq!(rows, n_labels);
    assert_eq!(lab.logits.as_ref().unwrap().dims(), &[n_labels, 151936]);
    let (all, rows) = run(LogitsMode::All);
    assert_eq!(rows, l);
    // Same loss either way (same rows, same arithmetic).
    assert_eq!(lab.loss.unwrap(), all.loss.unwrap());
    let r = reference(&fx, SAMPLE);
    let expected = r["loss"].to_scalar::<f32>().unwrap();
    assert!((lab.loss.unwrap() - expected).abs() <= 1e-4 * expected.abs());
}

#[test]
fn bf16_runs_forward_and_backward() {
    let fx = fixtures_or_skip!();
    let input = sample_input().unwrap();
    let f32m = Qwen3VL::load(&fx.join(TINY), DType::F32, &Device::Cpu).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Backward, trace: false };
    let reference = f32m.forward(&input, &mut NoTap, &opts).unwrap();
    let mut p32 = Probe::default();
    f32m.backward(&reference, &mut p32).unwrap();
    drop(f32m);
    let model = Qwen3VL::load(&fx.join(TINY), DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(model.dtype(), DType::BF16);
    let fwd = model.forward(&input, &mut NoTap, &opts).unwrap();
    let (rel, _) = errors(fwd.logits.as_ref().unwrap(), reference.logits.as_ref().unwrap());
    eprintln!("bf16 vs f32 logits: rel {rel:.3e}; loss {} vs {}", fwd.loss.unwrap(), reference.loss.unwrap());
    assert!(rel <= 2e-2, "bf16 logits off by {rel}");
    let mut probe = Probe::default();
    model.backward(&fwd, &mut probe).unwrap();
    assert_eq!(probe.order.len(), model.layers().len());
    // Gradients are finite and point the same way as in f32.
    for (id, dy) in &probe.dy {
        assert_eq!(dy.dtype(), DType::BF16);
        let (rel, _) = errors(dy, &p32.dy[id]);
        let name = &model.layers()[*id].name;
        assert!(rel.is_finite() && rel < 0.25, "{name}: bf16 dy rel error {rel}");
    }
}
