//! `evaluate::metrics::sample_metrics` against a plain f64 computation (full softmax per row,
//! written out here), on random logits of odd sizes and on the real vocabulary with the
//! fixture's label layout; and against HF's own loss on the fixture's full logits.
mod common;

use candle_core::{DType, Device, Tensor};
use qsens::artifact::evaluation::SampleMetrics;
use qsens::evaluate::metrics::{sample_metrics, sample_metrics_in_blocks, IGNORE_INDEX};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Per-row log-softmax in f64, first maximal index, KL and NLL, summed as `SampleMetrics`.
fn brute_force(base: &[f32], logits: &[f32], vocab: usize, labels: &[i32]) -> SampleMetrics {
    let rows = labels.len();
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        row.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    };
    let argmax = |row: &[f32]| -> usize {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best
    };
    let mut m = SampleMetrics {
        nll_sum: 0.0,
        label_tokens: 0,
        kl_sum_all: 0.0,
        kl_sum_label: 0.0,
        positions: rows,
        top1_agree_all: 0,
        top1_agree_label: 0,
    };
    for r in 0..rows {
        let (x, z) = (&base[r * vocab..(r + 1) * vocab], &logits[r * vocab..(r + 1) * vocab]);
        let (lp, lq) = (log_softmax(x), log_softmax(z));
        let kl: f64 = lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum();
        let agree = argmax(x) == argmax(z);
        m.kl_sum_all += kl;
        m.top1_agree_all += agree as usize;
        if r + 1 < rows && labels[r + 1] != IGNORE_INDEX {
            m.nll_sum -= lq[labels[r + 1] as usize];
            m.label_tokens += 1;
            m.kl_sum_label += kl;
            m.top1_agree_label += agree as usize;
        }
    }
    m
}

fn assert_close(got: &SampleMetrics, want: &SampleMetrics, rel: f64, what: &str) {
    let counts = |m: &SampleMetrics| (m.label_tokens, m.positions, m.top1_agree_all, m.top1_agree_label);
    assert_eq!(counts(got), counts(want), "{what}: counts");
    for (name, g, w) in [
        ("nll_sum", got.nll_sum, want.nll_sum),
        ("kl_sum_all", got.kl_sum_all, want.kl_sum_all),
        ("kl_sum_label", got.kl_sum_label, want.kl_sum_label),
    ] {
        assert!((g - w).abs() <= rel * w.abs().max(1e-300), "{what}: {name} {g} vs {w}");
    }
}

fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let d = Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| d.sample(rng)).collect()
}

fn tensor(v: &[f32], rows: usize, vocab: usize) -> Tensor {
    Tensor::from_slice(v, (rows, vocab), &Device::Cpu).unwrap()
}

#[test]
fn random_logits_match_the_plain_computation() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (rows, vocab) in [(1, 1), (2, 5), (7, 13), (37, 1001)] {
        let mut base = normal(&mut rng, rows * vocab, 2.0);
        let noise = normal(&mut rng, rows * vocab, 0.3);
        let mut logits: Vec<f32> = base.iter().zip(&noise).map(|(a, b)| a + b).collect();
        if vocab >= 13 {
            // Ties: row 1 has its maximum twice in both (agree on the first), row 2 twice in
            // the base and once, at the second place, in the recipe (disagree).
            for i in [vocab + 3, vocab + 9, 2 * vocab + 3, 2 * vocab + 9] {
                base[i] = 50.0;
            }
            for (i, v) in [(vocab + 3, 50.0), (vocab + 9, 50.0), (2 * vocab + 3, 49.0), (2 * vocab + 9, 50.0)] {
                logits[i] = v;
            }
        }
        // Labels: ignored prompt, then caption tokens to the end; labels[0] is never scored.
        let labels: Vec<i32> = (0..rows)
            .map(|t| if t == 0 || t > rows / 3 { rng.random_range(0..vocab as i32) } else { IGNORE_INDEX })
            .collect();
        let want = brute_force(&base, &logits, vocab, &labels);
        let (x, z) = (tensor(&base, rows, vocab), tensor(&logits, rows, vocab));
        let what = format!("{rows}x{vocab}");
        assert_close(&sample_metrics(&x, &z, &labels).unwrap(), &want, 1e-12, &what);
        // Blocks of 2 rows and of one row (crossing block boundaries), and f64 logits.
        for block in [2 * vocab + 1, 1] {
            assert_close(&sample_metrics_in_blocks(&x, &z, &labels, block).unwrap(), &want, 1e-12, &what);
        }
        let (x64, z64) = (x.to_dtype(DType::F64).unwrap(), z.to_dtype(DType::F64).unwrap());
        assert_close(&sample_metrics(&x64, &z64, &labels).unwrap(), &want, 1e-12, &what);
        if vocab >= 13 {
            assert!(want.top1_agree_all < rows, "the tie of row 2 disagrees");
        }

        // Identical logits: KL exactly 0, every top-1 agrees.
        let same = sample_metrics(&x, &x, &labels).unwrap();
        assert_eq!((same.kl_sum_all, same.kl_sum_label), (0.0, 0.0), "{what}");
        assert_eq!((same.top1_agree_all, same.top1_agree_label), (rows, same.label_tokens));
        assert_eq!(same.label_tokens, labels[1..].iter().filter(|&&l| l != IGNORE_INDEX).count());
    }
}

#[test]
fn bad_inputs_are_errors() {
    let x = tensor(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 2, 3);
    let err = |r: candle_core::Result<SampleMetrics>| r.unwrap_err().to_string();
    assert!(err(sample_metrics(&x, &tensor(&[0.0; 4], 2, 2), &[0, 1])).contains("logits are [2, 2]"));
    assert!(err(sample_metrics(&x, &x, &[0])).contains("1 labels for 2 positions"));
    assert!(err(sample_metrics(&x, &x, &[0, 3])).contains("label 3 at position 1 is outside"));
    assert!(err(sample_metrics(&x, &x, &[0, -5])).contains("label -5"));
    let nan = tensor(&[0.0, f32::NAN, 2.0, 3.0, 4.0, 5.0], 2, 3);
    assert!(err(sample_metrics(&x, &nan, &[0, 1])).contains("non-finite"));
}

/// The fixture's label layout on the real vocabulary: full logits rebuilt from HF's final
/// hidden state and the tied embedding (HF's loss checks them), then a perturbed copy.
#[test]
fn fixture_logits_match_hf_loss_and_the_plain_computation() {
    let fx = fixtures_or_skip!();
    let reference = candle_core::safetensors::load(fx.join("reference/sample_00.safetensors"), &Device::Cpu).unwrap();
    let weights = candle_core::safetensors::load(fx.join("qwen3-vl-tiny/model.safetensors"), &Device::Cpu).unwrap();
    let hidden = reference["text_final_hidden"].squeeze(0).unwrap();
    let embed = &weights["model.language_model.embed_tokens.weight"];
    let base = hidden.matmul(&embed.t().unwrap()).unwrap();
    let (rows, vocab) = base.dims2().unwrap();
    assert_eq!(vocab, 151_936);
    let labels: Vec<i32> =
        reference["labels"].squeeze(0).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|l| l as i32).collect();
    assert_eq!(labels.len(), rows);

    // The rebuilt logits are HF's (fixture columns, atol 1e-4 as the fixtures suggest).
    let cols: Vec<u32> = reference["logit_col_ids"].to_vec1::<i64>().unwrap().into_iter().map(|c| c as u32).collect();
    let cols = Tensor::new(cols.as_slice(), &Device::Cpu).unwrap();
    let diff = (base.index_select(&cols, 1).unwrap() - reference["logits_cols"].squeeze(0).unwrap()).unwrap();
    let max_diff = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max_diff <= 1e-4, "logits differ from HF's by {max_diff}");

    // Unquantized against itself: HF's loss and per-token NLL, no KL, full agreement.
    let same = sample_metrics(&base, &base, &labels).unwrap();
    let hf_nll = reference["label_token_nll"].to_vec1::<f32>().unwrap();
    let hf_loss = reference["loss"].to_scalar::<f32>().unwrap() as f64;
    assert_eq!(same.label_tokens, hf_nll.len());
    let hf_sum: f64 = hf_nll.iter().map(|&v| v as f64).sum();
    assert!((same.nll_sum - hf_sum).abs() <= 1e-4 * hf_sum, "NLL sum {} vs HF {hf_sum}", same.nll_sum);
    let loss = same.nll_sum / same.label_tokens as f64;
    assert!((loss - hf_loss).abs() <= 1e-5 * hf_loss, "loss {loss} vs HF {hf_loss}");
    assert_eq!((same.kl_sum_all, same.kl_sum_label), (0.0, 0.0));
    assert_eq!((same.positions, same.top1_agree_all, same.top1_agree_label), (rows, rows, same.label_tokens));

    // A perturbed copy against the plain f64 computation.
    let base_v = base.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let noise = normal(&mut rng, rows * vocab, 0.05);
    let logits_v: Vec<f32> = base_v.iter().zip(&noise).map(|(a, b)| a + b).collect();
    let want = brute_force(&base_v, &logits_v, vocab, &labels);
    let got = sample_metrics(&base, &tensor(&logits_v, rows, vocab), &labels).unwrap();
    assert_close(&got, &want, 1e-10, "sample_00");
    assert!(got.top1_agree_all < rows && got.kl_sum_all > 0.0, "the perturbation changes something: {got:?}");
}
