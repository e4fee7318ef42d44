//! A deterministic synthetic `qsens.scores` artifact shaped like Qwen3-VL (real layer names,
//! shapes and grouping, made-up scores), for tests, benchmarks and demos of `search` and
//! `manifest-to-md` without a scoring run.
//!
//! Scores: each layer gets a log-normal sensitivity (spanning several decades, larger near the
//! ends of each tower), a per-format factor that halves about every 0.7 bits, and per-sample
//! contributions with a heavy-ish tail; groups sum their members, made monotone like ModelOpt.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, LogNormal};

use crate::artifact::scores::{FormatInfo, GroupScores, LayerScores, ModelSummary, SampleSummary, Scores};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    pub vision_blocks: usize,
    pub deepstack: usize,
    pub text_layers: usize,
    /// 2..=6 formats (the last is NONE).
    pub formats: usize,
    pub samples: usize,
    pub seed: u64,
    /// Perturb every shape by a few units so that costs share no common factor (hard case for
    /// the solver; unrealistic).
    pub ragged: bool,
}

impl SyntheticSpec {
    /// 27 ViT blocks, 3 deepstack mergers, 33 decoder layers: 250 groups; 6 formats.
    pub fn qwen3_vl_250() -> Self {
        SyntheticSpec {
            vision_blocks: 27,
            deepstack: 3,
            text_layers: 33,
            formats: 6,
            samples: 32,
            seed: 0,
            ragged: false,
        }
    }

    /// Number of groups this spec gives.
    pub fn groups(&self) -> usize {
        1 + 4 * self.vision_blocks + 2 + 2 * self.deepstack + 4 * self.text_layers + 1
    }
}

const FORMATS: [(&str, f64, &str); 6] = [
    ("NVFP4", 4.5, "fp4 e2m1, fp8 scale per 16"),
    ("MXFP6", 6.25, "fp6 e2m3, e8m0 scale per 32"),
    ("FP8", 8.0, "fp8 e4m3, per-tensor, max calibration"),
    ("MXFP8", 8.25, "fp8 e4m3, e8m0 scale per 32"),
    ("INT12", 12.0, "synthetic 12-bit"),
    ("NONE", 16.0, "unquantized"),
];

/// The synthetic artifact.
pub fn scores(spec: &SyntheticSpec) -> Scores {
    assert!((2..=6).contains(&spec.formats) && spec.samples > 0);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    // Keep NONE and the lowest-bit formats first.
    let picked: Vec<(&str, f64, &str)> = FORMATS[..spec.formats - 1].iter().chain(&FORMATS[5..]).copied().collect();
    let formats: Vec<FormatInfo> = picked
        .iter()
        .map(|&(name, bits, how)| FormatInfo {
            name: name.into(),
            effective_bits: bits,
            weight: how.into(),
            input: if name == "NONE" { "unquantized".into() } else { how.into() },
            modelopt_bits: None,
        })
        .collect();

    // (group name, [(member, tower, kind, [out, in])]).
    type Member = (String, &'static str, &'static str, [u64; 2]);
    let mut groups: Vec<(String, Vec<Member>)> = Vec::new();
    let (vh, vi) = (1152u64, 4304u64);
    let v = "model.visual";
    groups.push((
        format!("{v}.patch_embed.proj"),
        vec![(format!("{v}.patch_embed.proj"), "vision", "patch_embed", [vh, 1536])],
    ));
    for b in 0..spec.vision_blocks {
        for (name, shape) in [
            ("attn.qkv", [3 * vh, vh]),
            ("attn.proj", [vh, vh]),
            ("mlp.linear_fc1", [vi, vh]),
            ("mlp.linear_fc2", [vh, vi]),
        ] {
            let n = format!("{v}.blocks.{b}.{name}");
            groups.push((n.clone(), vec![(n, "vision", "linear", shape)]));
        }
    }
    let (th, ti, kv) = (4096u64, 12288u64, 1024u64);
    let merged = 4 * vh;
    for prefix in std::iter::once(format!("{v}.merger"))
        .chain((0..spec.deepstack).map(|k| format!("{v}.deepstack_merger_list.{k}")))
    {
        for (name, shape) in [("linear_fc1", [merged, merged]), ("linear_fc2", [th, merged])] {
            let n = format!("{prefix}.{name}");
            groups.push((n.clone(), vec![(n, "vision", "linear", shape)]));
        }
    }
    let t = "model.language_model.layers";
    for l in 0..spec.text_layers {
        let m = |s: &str, shape| (format!("{t}.{l}.{s}"), "text", "linear", shape);
        groups.push((
            format!("{t}.{l}.self_attn.q_proj"),
            vec![m("self_attn.q_proj", [th, th]), m("self_attn.k_proj", [kv, th]), m("self_attn.v_proj", [kv, th])],
        ));
        groups.push((format!("{t}.{l}.self_attn.o_proj"), vec![m("self_attn.o_proj", [th, th])]));
        groups.push((format!("{t}.{l}.mlp.gate_proj"), vec![m("mlp.gate_proj", [ti, th]), m("mlp.up_proj", [ti, th])]));
        groups.push((format!("{t}.{l}.mlp.down_proj"), vec![m("mlp.down_proj", [th, ti])]));
    }
    groups.push(("lm_head".into(), vec![("lm_head".into(), "lm_head", "linear", [151_936, th])]));

    let lognormal = LogNormal::new(0.0, 1.6).expect("valid");
    let tail = Gamma::new(0.7, 1.0 / 0.7).expect("valid");
    let ns = spec.samples;
    let nf = formats.len();
    let mut layers = Vec::new();
    let mut out_groups = Vec::new();
    for (gname, members) in &groups {
        let mut g_ps = vec![vec![0.0; ns]; nf];
        let mut g_params = 0;
        let mut names = Vec::new();
        for (name, tower, kind, shape) in members {
            let mut shape = *shape;
            if spec.ragged {
                shape[0] += rng.random_range(0..7);
                shape[1] += rng.random_range(0..5);
            }
            let params = shape[0] * shape[1];
            let depth = crate::search::naming::classify(name).block.unwrap_or(0) as f64;
            let ends = 1.0 + 3.0 * (-depth / 2.0).exp();
            let base = 1e-4 * lognormal.sample(&mut rng) * ends * (params as f64 / 1e7).sqrt();
            let sample_w: Vec<f64> = (0..ns).map(|_| tail.sample(&mut rng)).collect();
            let mut per_sample = Vec::with_capacity(nf);
            for (f, fmt) in formats.iter().enumerate() {
                let row: Vec<f64> = if fmt.name == "NONE" {
                    vec![0.0; ns]
                } else {
                    let factor = (-(fmt.effective_bits - 4.5) / 0.7).exp2() * rng.random_range(0.8..1.25);
                    sample_w.iter().map(|w| base * factor * w / ns as f64).collect()
                };
                for (acc, x) in g_ps[f].iter_mut().zip(&row) {
                    *acc += x;
                }
                per_sample.push(row);
            }
            g_params += params;
            names.push(name.clone());
            layers.push(LayerScores {
                name: name.clone(),
                group: gname.clone(),
                tower: tower.to_string(),
                kind: kind.to_string(),
                shape,
                params,
                input_amax: rng.random_range(1.0..50.0),
                weight_amax: rng.random_range(0.05..2.0),
                per_sample,
                format_calibration: Vec::new(),
                experts: None,
            });
        }
        let mut scores: Vec<f64> = g_ps.iter().map(|row| row.iter().sum()).collect();
        for f in 1..nf {
            scores[f] = scores[f].min(scores[f - 1]);
        }
        out_groups.push(GroupScores {
            name: gname.clone(),
            members: names,
            params: g_params,
            costs: formats.iter().map(|f| g_params as f64 * f.effective_bits / 16.0).collect(),
            scores,
            per_sample: g_ps,
            disabled: false,
            cost_excluded: false,
            cost_weight: None,
        });
    }
    Scores {
        model: ModelSummary {
            name: "synthetic-qwen3-vl".into(),
            architecture: "Qwen3VLForConditionalGeneration".into(),
            num_parameters: layers.iter().map(|l| l.params).sum(),
        },
        method: "gradient".into(),
        dtype: "bf16".into(),
        formats,
        samples: (0..ns)
            .map(|i| SampleSummary {
                index: i,
                id: format!("synthetic-{i:04}"),
                num_tokens: 300,
                num_image_tokens: 256,
                num_label_tokens: 12,
                loss: Some(2.0),
            })
            .collect(),
        num_inputs: ns,
        calibration_samples: (0..ns.min(8)).collect(),
        layers,
        groups: out_groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_250_has_250_groups_and_is_valid() {
        let spec = SyntheticSpec::qwen3_vl_250();
        let s = scores(&SyntheticSpec { samples: 4, ..spec });
        assert_eq!(s.groups.len(), 250);
        assert_eq!(spec.groups(), 250);
        assert_eq!(s.formats.len(), 6);
        crate::search::problem::validate(&s).unwrap();
        assert_eq!(s, scores(&SyntheticSpec { samples: 4, ..spec }));
    }
}
