//! Bootstrap confidence for scores and ranks.
//!
//! The scored samples are resampled with replacement (`resamples` times, from a ChaCha8 stream
//! seeded with `seed`, so the result is deterministic); every entity (group or layer) is
//! re-totalled on the same resample, which is what makes rank intervals meaningful. A total is
//! Σ count(sample) × contribution(sample), summed in sample order; for groups the totals are
//! then made monotone across formats like the point estimate. Intervals are percentile
//! intervals with linear interpolation between order statistics (numpy's default).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap { resamples: 1000, seed: 0 }
    }
}

/// Level of score intervals and of rank intervals.
pub const SCORE_LEVEL: f64 = 0.95;
pub const RANK_LEVEL: f64 = 0.90;

/// Intervals of one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityIntervals {
    /// Per format: `[low, high]` of the total.
    pub per_format: Vec<[f64; 2]>,
    /// `[low, high]` of the rank by the reference format's total (1 = largest).
    pub rank: [usize; 2],
}

/// The `q`-quantile of sorted values, linear interpolation (numpy "linear").
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 1 {
        return sorted[0];
    }
    let h = (n - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The central `level` percentile interval of `values` (sorted in place, which must be
/// non-empty): the `(1 − level)/2` and `(1 + level)/2` quantiles, numpy's linear interpolation.
pub fn percentile_interval(values: &mut [f64], level: f64) -> [f64; 2] {
    values.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    [quantile(values, alpha), quantile(values, 1.0 - alpha)]
}

/// The bootstrap draws: for each of `settings.resamples` resamples of `n` samples drawn with
/// replacement (ChaCha8 seeded with `settings.seed`), how often each sample was drawn, as
/// `[resample][sample]`. The same `n` and settings give the same draws wherever they are used,
/// so every recipe `evaluate` measures (and every group `search` scores) is resampled alike.
pub fn resample_counts(n: usize, settings: &Bootstrap) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    (0..settings.resamples)
        .map(|_| {
            let mut w = vec![0u32; n];
            for _ in 0..n {
                w[rng.random_range(0..n)] += 1;
            }
            w
        })
        .collect()
}

/// Ranks (1-based, largest first, ties by index) of `values`.
pub fn ranks_desc(values: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    let mut rank = vec![0; values.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r + 1;
    }
    rank
}

/// Bootstrap intervals for entities given as `[format][sample]` contributions (all with the
/// same number of samples ≥ 1). `monotone` applies the running minimum across formats.
pub fn intervals(
    entities: &[&[Vec<f64>]],
    reference: usize,
    monotone: bool,
    settings: &Bootstrap,
) -> Vec<EntityIntervals> {
    let Some(first) = entities.first() else { return Vec::new() };
    let n = first.first().map_or(0, |row| row.len());
    assert!(n > 0 && settings.resamples > 0, "bootstrap needs samples and resamples");
    let b = settings.resamples;
    let counts = resample_counts(n, settings);
    // totals[e][f][r]
    let totals: Vec<Vec<Vec<f64>>> = entities
        .par_iter()
        .map(|ps| {
            let mut per_format: Vec<Vec<f64>> = ps
                .iter()
                .map(|row| {
                    counts.iter().map(|w| w.iter().zip(row).fold(0.0, |acc, (&c, &x)| acc + c as f64 * x)).collect()
                })
                .collect();
            if monotone {
                for f in 1..per_format.len() {
                    let (done, rest) = per_format.split_at_mut(f);
                    for (x, &prev) in rest[0].iter_mut().zip(&done[f - 1]) {
                        *x = x.min(prev);
                    }
                }
            }
            per_format
        })
        .collect();
    let mut rank_samples: Vec<Vec<usize>> = vec![Vec::with_capacity(b); entities.len()];
    let mut column = vec![0.0; entities.len()];
    for r in 0..b {
        for (e, t) in totals.iter().enumerate() {
            column[e] = t[reference][r];
        }
        for (e, rank) in ranks_desc(&column).into_iter().enumerate() {
            rank_samples[e].push(rank);
        }
    }
    let rank_alpha = (1.0 - RANK_LEVEL) / 2.0;
    totals
        .into_iter()
        .zip(rank_samples)
        .map(|(per_format, mut ranks)| {
            let per_format = per_format.into_iter().map(|mut v| percentile_interval(&mut v, SCORE_LEVEL)).collect();
            ranks.sort_unstable();
            let lo = ranks[((b - 1) as f64 * rank_alpha).floor() as usize];
            let hi = ranks[((b - 1) as f64 * (1.0 - rank_alpha)).ceil() as usize];
            EntityIntervals { per_format, rank: [lo, hi] }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert_eq!(quantile(&v, 0.5), 2.5);
    }

    #[test]
    fn single_sample_gives_point_intervals() {
        let a = vec![vec![3.0], vec![0.0]];
        let b = vec![vec![1.0], vec![0.0]];
        let out = intervals(&[&a, &b], 0, true, &Bootstrap::default());
        assert_eq!(out[0].per_format[0], [3.0, 3.0]);
        assert_eq!(out[0].rank, [1, 1]);
        assert_eq!(out[1].rank, [2, 2]);
    }

    #[test]
    fn deterministic_and_contains_the_estimate() {
        let a = vec![vec![1.0, 2.0, 3.0, 10.0, 0.5], vec![0.0; 5]];
        let b = vec![vec![2.0, 2.0, 2.0, 2.0, 2.0], vec![0.0; 5]];
        let s = Bootstrap::default();
        let x = intervals(&[&a, &b], 0, true, &s);
        assert_eq!(x, intervals(&[&a, &b], 0, true, &s));
        let [lo, hi] = x[0].per_format[0];
        assert!(lo <= 16.5 && 16.5 <= hi && lo < hi);
        assert_eq!(x[1].per_format[0], [10.0, 10.0]);
        assert!(x[0].rank[0] == 1 && x[0].rank[1] == 2);
    }
}
