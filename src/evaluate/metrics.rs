//! What a recipe measurably does to the next-token distributions: per sample
//! ([`sample_metrics`]: NLL on the labels, KL from the unquantized model, top-1 agreement) and
//! pooled over samples with paired bootstrap intervals ([`summarize`]).
//!
//! Per sample, the logits are `[L, vocab]` (vocab 151 936 for Qwen3-VL), so [`sample_metrics`]
//! works with candle ops on the logits' own device, a block of rows at a time
//! (≤ [`BLOCK_LOGITS`] logits, so a temporary stays at 64 MiB whatever L is), and moves only
//! per-row results to the host; the unquantized log-probabilities, computed once per sample for
//! every recipe ([`Reference`]), stay on the device: `L · vocab` f64 (1.2 GB at L = 1000).
//! On a CUDA device (f32 logits, feature `cuda`) one kernel does all of it per recipe
//! (`kernels/metrics.cu`, the same definitions in f64; sums in another order, so figures agree
//! with the candle-op path to ~1e-12 relative, and identical logits still give a KL of 0).
//! Everything is computed in f64 from the given logits:
//! log-softmax `x − max − log Σ exp(x − max)`, `KL_t = Σ_i p_i (log p_i − log q_i)` and the NLL
//! `−log q[label]`. f64 keeps KL honest where it matters: a recipe's per-token KL is often
//! 1e-4–1e-6, below what an f32 log-probability difference resolves. Identical logits give
//! identical log-probabilities, hence a KL of exactly 0.
//!
//! Pooling follows `crate::artifact::evaluation`: Σ of the per-sample sums over Σ of the counts;
//! intervals are 95 % percentile bootstrap intervals over samples on the draws of
//! [`confidence::resample_counts`], the same for every recipe with the same number of samples,
//! so a recipe's difference from the unquantized model is paired.

use anyhow::{bail, ensure};
use candle_core::{DType, Result, Tensor, D};

use crate::artifact::evaluation::{Estimate, Metrics, SampleMetrics};
use crate::search::confidence::{self, Bootstrap, SCORE_LEVEL};

/// HF's `ignore_index`: label positions with this value carry no loss.
pub const IGNORE_INDEX: i32 = -100;

/// Logits per block of rows in [`sample_metrics`] (2²³: 64 MiB in f64, 55 rows of Qwen3-VL's
/// vocabulary); a block makes about six temporaries of this size.
pub const BLOCK_LOGITS: usize = 1 << 23;

/// One sample's metrics of `logits` (a recipe) against `base_logits` (the unquantized model),
/// both `[L, vocab]` on the same device (any float dtype; computed in f64). `labels` has length L,
/// [`IGNORE_INDEX`] where no loss is taken; with HF's shift, row `t − 1` predicts `labels[t]`
/// (the last row predicts nothing, `labels[0]` is never predicted).
///
/// Top-1 is the first maximal index of a row (ties go to the lowest token id, as `torch.argmax`);
/// candle's own CUDA argmax does not promise that, so it is computed as the minimum index
/// among the entries equal to the row maximum. Errors on mismatched shapes, a label outside the
/// vocabulary, or non-finite results (NaN or infinite logits). Several recipes against one
/// unquantized forward: [`Reference`], which does the unquantized half of the work once.
pub fn sample_metrics(base_logits: &Tensor, logits: &Tensor, labels: &[i32]) -> Result<SampleMetrics> {
    sample_metrics_in_blocks(base_logits, logits, labels, BLOCK_LOGITS)
}

/// [`sample_metrics`] with `block_logits` logits per block (tests use small blocks to cross
/// block boundaries on small inputs).
pub fn sample_metrics_in_blocks(
    base_logits: &Tensor,
    logits: &Tensor,
    labels: &[i32],
    block_logits: usize,
) -> Result<SampleMetrics> {
    Reference::in_blocks(base_logits, labels, block_logits)?.metrics(logits)
}

/// The unquantized model's side of one sample, computed once and compared with each recipe's
/// logits ([`Reference::metrics`]): per block of rows the log-probabilities (f64, on the logits'
/// device) and the top-1 tokens, and the token each row is scored on.
pub struct Reference {
    rows: usize,
    vocab: usize,
    /// targets[r]: the token row r is scored on (HF's shift), if any.
    targets: Vec<Option<u32>>,
    rows_of: ReferenceRows,
}

/// How the unquantized side is kept: log-probabilities per block of rows for the candle-op path,
/// or, for f32 logits on a CUDA device, the logits themselves for the one-kernel path
/// (`super::cuda`, the same definitions).
enum ReferenceRows {
    Blocks(Vec<ReferenceBlock>),
    #[cfg(feature = "cuda")]
    Kernel(Tensor),
}

struct ReferenceBlock {
    first_row: usize,
    log_p: Tensor,
    top1: Vec<u32>,
}

impl Reference {
    /// The reference of `base_logits` `[L, vocab]` with `labels` (as [`sample_metrics`]).
    pub fn new(base_logits: &Tensor, labels: &[i32]) -> Result<Self> {
        Self::in_blocks(base_logits, labels, BLOCK_LOGITS)
    }

    fn in_blocks(base_logits: &Tensor, labels: &[i32], block_logits: usize) -> Result<Self> {
        let (rows, vocab) = base_logits.dims2()?;
        if labels.len() != rows {
            candle_core::bail!("metrics: {} labels for {rows} positions", labels.len());
        }
        let mut targets = Vec::with_capacity(rows);
        for r in 0..rows {
            targets.push(match labels.get(r + 1) {
                Some(&l) if l != IGNORE_INDEX => {
                    if l < 0 || l as usize >= vocab {
                        candle_core::bail!(
                            "metrics: label {l} at position {} is outside the vocabulary ({vocab})",
                            r + 1
                        );
                    }
                    Some(l as u32)
                }
                _ => None,
            });
        }
        #[cfg(feature = "cuda")]
        if base_logits.device().is_cuda() && base_logits.dtype() == DType::F32 {
            return Ok(Reference { rows, vocab, targets, rows_of: ReferenceRows::Kernel(base_logits.clone()) });
        }
        let block = (block_logits / vocab.max(1)).max(1);
        let mut blocks = Vec::with_capacity(rows.div_ceil(block));
        for first_row in (0..rows).step_by(block) {
            let x = base_logits.narrow(0, first_row, block.min(rows - first_row))?.to_dtype(DType::F64)?;
            blocks.push(ReferenceBlock { first_row, top1: first_argmax(&x)?, log_p: log_softmax(&x)? });
        }
        Ok(Reference { rows, vocab, targets, rows_of: ReferenceRows::Blocks(blocks) })
    }

    /// The metrics of a recipe's `logits` `[L, vocab]` against this reference.
    pub fn metrics(&self, logits: &Tensor) -> Result<SampleMetrics> {
        let (rows, vocab) = (self.rows, self.vocab);
        if logits.dims() != [rows, vocab] {
            candle_core::bail!("metrics: logits are {:?}, the unquantized logits [{rows}, {vocab}]", logits.dims());
        }
        let mut m = SampleMetrics {
            nll_sum: 0.0,
            label_tokens: 0,
            kl_sum_all: 0.0,
            kl_sum_label: 0.0,
            positions: rows,
            top1_agree_all: 0,
            top1_agree_label: 0,
        };
        let mut add_row = |r: usize, kl: f64, log_q_target: f64, agree: bool| {
            m.kl_sum_all += kl;
            m.top1_agree_all += agree as usize;
            if self.targets[r].is_some() {
                m.nll_sum -= log_q_target;
                m.label_tokens += 1;
                m.kl_sum_label += kl;
                m.top1_agree_label += agree as usize;
            }
        };
        match &self.rows_of {
            ReferenceRows::Blocks(blocks) => {
                for b in blocks {
                    let (r0, n) = (b.first_row, b.top1.len());
                    let z = logits.narrow(0, r0, n)?.to_dtype(DType::F64)?;
                    let top_z = first_argmax(&z)?;
                    let log_q = log_softmax(&z)?;
                    drop(z);
                    let kl = (b.log_p.exp()? * (&b.log_p - &log_q)?)?.sum(D::Minus1)?.to_vec1::<f64>()?;
                    let index: Vec<u32> = self.targets[r0..r0 + n].iter().map(|t| t.unwrap_or(0)).collect();
                    let index = Tensor::from_vec(index, (n, 1), log_q.device())?;
                    let log_q_target = log_q.gather(&index, 1)?.squeeze(1)?.to_vec1::<f64>()?;
                    for i in 0..n {
                        add_row(r0 + i, kl[i], log_q_target[i], b.top1[i] == top_z[i]);
                    }
                }
            }
            #[cfg(feature = "cuda")]
            ReferenceRows::Kernel(base) => {
                let targets: Vec<i32> = self.targets.iter().map(|t| t.map_or(-1, |t| t as i32)).collect();
                for (r, [kl, nll, top_p, top_q]) in
                    super::cuda::row_metrics(base, logits, &targets)?.into_iter().enumerate()
                {
                    add_row(r, kl, -nll, top_p == top_q);
                }
            }
        }
        if !(m.nll_sum.is_finite() && m.kl_sum_all.is_finite() && m.kl_sum_label.is_finite()) {
            candle_core::bail!(
                "metrics: non-finite result (NLL {}, KL {}): the logits hold NaN or infinite values",
                m.nll_sum,
                m.kl_sum_all
            );
        }
        Ok(m)
    }
}

/// `x − max − log Σ exp(x − max)` over the last dim (dtype kept).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// Per row of `[n, vocab]`, the lowest index holding the row maximum (`torch.argmax`'s rule).
fn first_argmax(x: &Tensor) -> Result<Vec<u32>> {
    let (n, vocab) = x.dims2()?;
    let is_max = x.broadcast_eq(&x.max_keepdim(D::Minus1)?)?;
    let index = Tensor::arange(0u32, vocab as u32, x.device())?.unsqueeze(0)?.broadcast_as((n, vocab))?;
    let past_end = Tensor::new(vocab as u32, x.device())?.broadcast_as((n, vocab))?;
    is_max.where_cond(&index, &past_end)?.min(D::Minus1)?.to_vec1::<u32>()
}

/// Sums of one recipe and of the unquantized model over (possibly resampled) samples.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    nll: f64,
    base_nll: f64,
    label_tokens: f64,
    kl_all: f64,
    kl_label: f64,
    positions: f64,
    agree_all: f64,
    agree_label: f64,
}

impl Totals {
    fn add(&mut self, recipe: &SampleMetrics, base: &SampleMetrics, weight: f64) {
        self.nll += weight * recipe.nll_sum;
        self.base_nll += weight * base.nll_sum;
        self.label_tokens += weight * recipe.label_tokens as f64;
        self.kl_all += weight * recipe.kl_sum_all;
        self.kl_label += weight * recipe.kl_sum_label;
        self.positions += weight * recipe.positions as f64;
        self.agree_all += weight * recipe.top1_agree_all as f64;
        self.agree_label += weight * recipe.top1_agree_label as f64;
    }

    /// The figures of [`Metrics`], in its field order. Label figures are NaN without label
    /// tokens (a resample that drew only samples without labels).
    fn figures(&self) -> [f64; FIGURES] {
        let mean_nll = self.nll / self.label_tokens;
        let base_nll = self.base_nll / self.label_tokens;
        let delta = mean_nll - base_nll;
        [
            mean_nll,
            delta,
            delta / base_nll,
            mean_nll.exp(),
            self.kl_all / self.positions,
            self.kl_label / self.label_tokens,
            self.agree_all / self.positions,
            self.agree_label / self.label_tokens,
        ]
    }
}

const FIGURES: usize = 8;
const FIGURE_NAMES: [&str; FIGURES] = [
    "mean_nll",
    "delta_nll",
    "delta_nll_relative",
    "perplexity",
    "kl_all",
    "kl_label",
    "top1_agreement_all",
    "top1_agreement_label",
];

/// Pooled figures of a recipe (`recipe`) against the unquantized model (`base`), both per
/// sample in the same sample order, with 95 % percentile bootstrap intervals over samples.
///
/// Every figure is a ratio of pooled sums (`mean_nll = Σ nll_sum / Σ label_tokens`,
/// `kl_all = Σ kl_sum_all / Σ positions`, ...); `delta_nll` and `delta_nll_relative` use the
/// unquantized model's `mean_nll` on the same samples (and, in the bootstrap, on the same
/// resamples: `summarize(base, base, ..)` has a `delta_nll` of exactly 0 with interval `[0, 0]`).
/// Samples without label tokens count in the all-position figures only. A resample that draws
/// only such samples has no label figures and is left out of their intervals.
///
/// Intervals are `None` with fewer than 2 samples or 0 resamples. Errors (rather than NaN,
/// which a JSON artifact cannot hold) when there are no samples, no label token in any sample,
/// the two lists do not describe the same samples, or a figure is not finite (e.g. an
/// unquantized NLL of 0, which leaves the relative change undefined).
pub fn summarize(recipe: &[SampleMetrics], base: &[SampleMetrics], bootstrap: &Bootstrap) -> anyhow::Result<Metrics> {
    ensure!(!recipe.is_empty(), "no samples to summarize");
    ensure!(
        recipe.len() == base.len(),
        "{} samples for the recipe, {} for the unquantized model",
        recipe.len(),
        base.len()
    );
    for (i, (r, b)) in recipe.iter().zip(base).enumerate() {
        if r.positions != b.positions || r.label_tokens != b.label_tokens {
            bail!(
                "sample {i}: the recipe has {} positions and {} label tokens, the unquantized model {} and {}",
                r.positions,
                r.label_tokens,
                b.positions,
                b.label_tokens
            );
        }
        let sums = [r.nll_sum, r.kl_sum_all, r.kl_sum_label, b.nll_sum];
        ensure!(sums.iter().all(|v| v.is_finite()), "sample {i}: non-finite sums {sums:?}");
    }
    ensure!(recipe.iter().any(|r| r.label_tokens > 0), "no sample has a label token: the loss is undefined");

    let mut total = Totals::default();
    for (r, b) in recipe.iter().zip(base) {
        total.add(r, b, 1.0);
    }
    let values = total.figures();
    for (name, v) in FIGURE_NAMES.iter().zip(values) {
        let base_mean = total.base_nll / total.label_tokens;
        ensure!(v.is_finite(), "{name} is {v} (the unquantized model's mean NLL is {base_mean})");
    }

    let mut cis: [Option<[f64; 2]>; FIGURES] = [None; FIGURES];
    if recipe.len() >= 2 && bootstrap.resamples > 0 {
        let mut per_figure: Vec<Vec<f64>> = (0..FIGURES).map(|_| Vec::with_capacity(bootstrap.resamples)).collect();
        for counts in confidence::resample_counts(recipe.len(), bootstrap) {
            let mut t = Totals::default();
            for ((r, b), &c) in recipe.iter().zip(base).zip(&counts) {
                if c > 0 {
                    t.add(r, b, c as f64);
                }
            }
            for (column, v) in per_figure.iter_mut().zip(t.figures()) {
                if v.is_finite() {
                    column.push(v);
                }
            }
        }
        for (ci, mut column) in cis.iter_mut().zip(per_figure) {
            if !column.is_empty() {
                *ci = Some(confidence::percentile_interval(&mut column, SCORE_LEVEL));
            }
        }
    }
    let e = |i: usize| Estimate { value: values[i], ci: cis[i] };
    Ok(Metrics {
        mean_nll: e(0),
        delta_nll: e(1),
        delta_nll_relative: e(2),
        perplexity: e(3),
        kl_all: e(4),
        kl_label: e(5),
        top1_agreement_all: e(6),
        top1_agreement_label: e(7),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(
        nll_sum: f64,
        label_tokens: usize,
        kl_all: f64,
        kl_label: f64,
        positions: usize,
        agree: [usize; 2],
    ) -> SampleMetrics {
        SampleMetrics {
            nll_sum,
            label_tokens,
            kl_sum_all: kl_all,
            kl_sum_label: kl_label,
            positions,
            top1_agree_all: agree[0],
            top1_agree_label: agree[1],
        }
    }

    /// Three samples of an unquantized model and of a recipe, one without label tokens.
    fn pair() -> (Vec<SampleMetrics>, Vec<SampleMetrics>) {
        let base = vec![
            sample(20.0, 10, 0.0, 0.0, 50, [50, 10]),
            sample(0.0, 0, 0.0, 0.0, 30, [30, 0]),
            sample(66.0, 30, 0.0, 0.0, 120, [120, 30]),
        ];
        let recipe = vec![
            sample(21.0, 10, 0.5, 0.2, 50, [48, 9]),
            sample(0.0, 0, 0.6, 0.0, 30, [29, 0]),
            sample(69.0, 30, 1.8, 0.6, 120, [111, 27]),
        ];
        (recipe, base)
    }

    /// numpy's linear-interpolation quantile, written out independently.
    fn numpy_quantile(mut v: Vec<f64>, q: f64) -> f64 {
        v.sort_by(f64::total_cmp);
        let h = (v.len() - 1) as f64 * q;
        let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
        v[lo] + (h - h.floor()) * (v[hi] - v[lo])
    }

    #[test]
    fn pooled_figures_are_ratios_of_sums() {
        let (recipe, base) = pair();
        let m = summarize(&recipe, &base, &Bootstrap::default()).unwrap();
        let (nll, base_nll) = (90.0 / 40.0, 86.0 / 40.0);
        assert_eq!(m.mean_nll.value, nll);
        assert_eq!(m.delta_nll.value, nll - base_nll);
        assert_eq!(m.delta_nll_relative.value, (nll - base_nll) / base_nll);
        assert_eq!(m.perplexity.value, nll.exp());
        assert_eq!(m.kl_all.value, (0.5 + 0.6 + 1.8) / 200.0);
        assert_eq!(m.kl_label.value, (0.2 + 0.0 + 0.6) / 40.0);
        assert_eq!(m.top1_agreement_all.value, 188.0 / 200.0);
        assert_eq!(m.top1_agreement_label.value, 36.0 / 40.0);
        for e in [m.mean_nll, m.delta_nll, m.kl_all, m.kl_label, m.top1_agreement_all, m.perplexity] {
            let [lo, hi] = e.ci.unwrap();
            assert!(lo <= e.value && e.value <= hi && lo < hi, "{e:?}");
        }
    }

    #[test]
    fn bootstrap_is_paired_deterministic_and_percentile() {
        let (recipe, base) = pair();
        let settings = Bootstrap { resamples: 500, seed: 3 };
        let m = summarize(&recipe, &base, &settings).unwrap();
        assert_eq!(m, summarize(&recipe, &base, &settings).unwrap());
        // (With 3 samples both ends of most intervals are single-sample extremes, whatever the seed.)
        let other_seed = Bootstrap { resamples: 500, seed: 4 };
        assert_ne!(confidence::resample_counts(3, &settings), confidence::resample_counts(3, &other_seed));

        // The unquantized model against itself: no change, on every resample.
        let same = summarize(&base, &base, &settings).unwrap();
        assert_eq!(same.delta_nll.ci, Some([0.0, 0.0]));
        assert_eq!(same.delta_nll_relative.ci, Some([0.0, 0.0]));
        assert_eq!(same.kl_all.ci, Some([0.0, 0.0]));
        assert_eq!(same.top1_agreement_all.ci, Some([1.0, 1.0]));

        // The interval of kl_all, recomputed from the shared draws.
        let draws = confidence::resample_counts(3, &settings);
        let kl: Vec<f64> = draws
            .iter()
            .map(|c| {
                let w = |i: usize| c[i] as f64;
                (w(0) * 0.5 + w(1) * 0.6 + w(2) * 1.8) / (w(0) * 50.0 + w(1) * 30.0 + w(2) * 120.0)
            })
            .collect();
        let want = [numpy_quantile(kl.clone(), 0.025), numpy_quantile(kl, 0.975)];
        let got = m.kl_all.ci.unwrap();
        assert!((got[0] - want[0]).abs() <= 1e-15 && (got[1] - want[1]).abs() <= 1e-15, "{got:?} vs {want:?}");
        // Resamples that drew only the label-less sample have no NLL and are left out.
        let with_labels = draws.iter().filter(|c| c[0] + c[2] > 0).count();
        assert!(with_labels < 500, "the test wants some label-less resamples");
        let nll: Vec<f64> = draws
            .iter()
            .filter(|c| c[0] + c[2] > 0)
            .map(|c| (c[0] as f64 * 21.0 + c[2] as f64 * 69.0) / (c[0] as f64 * 10.0 + c[2] as f64 * 30.0))
            .collect();
        assert_eq!(m.mean_nll.ci.unwrap()[0], numpy_quantile(nll.clone(), 0.025));
        assert_eq!(m.mean_nll.ci.unwrap()[1], numpy_quantile(nll, 0.975));
    }

    #[test]
    fn no_interval_without_two_samples_or_resamples() {
        let (recipe, base) = pair();
        let one = summarize(&recipe[..1], &base[..1], &Bootstrap::default()).unwrap();
        assert_eq!(one.mean_nll, Estimate { value: 2.1, ci: None });
        let none = summarize(&recipe, &base, &Bootstrap { resamples: 0, seed: 0 }).unwrap();
        assert!(none.kl_all.ci.is_none() && none.top1_agreement_label.ci.is_none());
    }

    #[test]
    fn refuses_what_has_no_figures() {
        let (recipe, base) = pair();
        let b = Bootstrap::default();
        let err = |r: &[SampleMetrics], base: &[SampleMetrics]| summarize(r, base, &b).unwrap_err().to_string();
        assert!(err(&[], &[]).contains("no samples"));
        assert!(err(&recipe, &base[..2]).contains("3 samples for the recipe, 2"));
        assert!(err(&recipe[1..2], &base[1..2]).contains("no sample has a label token"));
        let mut shifted = recipe.clone();
        shifted[2].positions = 121;
        assert!(err(&shifted, &base).contains("sample 2"));
        let mut zero = base.clone();
        zero[0].nll_sum = 0.0;
        zero[2].nll_sum = 0.0;
        assert!(err(&recipe, &zero).contains("delta_nll_relative is inf"));
        let mut nan = recipe.clone();
        nan[0].kl_sum_all = f64::NAN;
        assert!(err(&nan, &base).contains("non-finite"));
    }
}
