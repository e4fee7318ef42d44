//! The search problem built from a `qsens.scores` artifact: one format per group, minimise
//! Σ score subject to Σ weighted cost ≤ (Σ weighted `NONE` cost) × bits / 16.
//!
//! Costs are made exact integers: a group of `p` weight parameters at a format of `b` effective
//! bits costs `p × b × 2^k` units, where `2^k` is the smallest power of two that makes every
//! format's bits an integer (k = 0 for FP8/NONE, 1 for 4.5-bit NVFP4). The budget for a target
//! of `t` bits is `⌊P × t × 2^k⌋` units, P the Σ params of the groups that count, computed
//! exactly from the binary value of `t`. So "achieved ≤ target" is decided without rounding.

use anyhow::{bail, ensure, Context, Result};
use globset::{GlobBuilder, GlobMatcher};

use super::solver::{self, Item, Limits, Mckp};
use crate::artifact::scores::{FormatInfo, Scores};

/// Extra `--disable` / `--exclude-cost` patterns (fnmatch-style, on group and member names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub disable: Vec<String>,
    pub exclude_cost: Vec<String>,
}

/// One group as searched.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    pub name: String,
    pub members: Vec<String>,
    pub params: u64,
    pub disabled: bool,
    pub cost_excluded: bool,
    /// The weight of its costs in the budget: 0 when cost-excluded, else 1 or the artifact's.
    pub cost_weight: f64,
    /// Per format (monotone scores, unweighted costs), from the artifact.
    pub scores: Vec<f64>,
    pub costs: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub formats: Vec<FormatInfo>,
    pub groups: Vec<GroupSpec>,
    /// Patterns (from [`Overrides`]) that matched no group.
    pub unmatched_patterns: Vec<String>,
    /// Format index allowed per group, per item of `mckp`'s class.
    allowed: Vec<Vec<usize>>,
    mckp: Mckp,
    /// `k` of the cost scale `2^k`.
    shift: u32,
    /// Σ weighted params of the groups that count, each weight scaled by `weight_scale`.
    counted_params: u128,
    /// Σ weighted NONE cost in units (`counted_params × 16 × 2^k`).
    denominator: u128,
    /// The common denominator of the cost weights: weights are `w × weight_scale` integers.
    weight_scale: u128,
}

/// A chosen format per group and what it achieves.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Format index per group.
    pub choice: Vec<usize>,
    /// Σ group score of the choice (in group order).
    pub objective: f64,
    pub effective_bits: f64,
    /// Σ weighted cost in the artifact's units (params × bits / 16).
    pub cost: f64,
    pub proved: bool,
    pub lower_bound: f64,
    pub lp_bound: f64,
    pub initial_incumbent: f64,
    pub stats: solver::Stats,
}

/// What a given choice scores and costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub objective: f64,
    pub effective_bits: f64,
    pub cost: f64,
}

/// `(m, e)` with `x = m × 2^e`, `m` odd (or zero), for a finite non-negative `x`.
fn dyadic(x: f64) -> (u64, i32) {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (mut m, mut e) = if exp == 0 { (frac, -1074) } else { (frac | (1u64 << 52), exp - 1075) };
    if m == 0 {
        return (0, 0);
    }
    let tz = m.trailing_zeros();
    m >>= tz;
    e += tz as i32;
    (m, e)
}

/// `⌊a × x × 2^k⌋` exactly, for a finite non-negative `x`.
fn scaled_floor(a: u128, x: f64, k: u32) -> Result<u128> {
    let (m, e) = dyadic(x);
    let prod = a.checked_mul(m as u128).context("budget overflows 128 bits")?;
    let shift = e + k as i32;
    Ok(if shift >= 0 {
        prod.checked_shl(shift as u32).filter(|v| v >> shift == prod).context("budget overflows 128 bits")?
    } else if -shift >= 128 {
        0
    } else {
        prod >> (-shift) as u32
    })
}

fn compile(patterns: &[String]) -> Result<Vec<GlobMatcher>> {
    patterns
        .iter()
        .map(|p| {
            GlobBuilder::new(p)
                .literal_separator(false)
                .backslash_escape(false)
                .build()
                .map(|g| g.compile_matcher())
                .with_context(|| format!("invalid pattern '{p}'"))
        })
        .collect()
}

/// Checks the artifact's numbers: finite, consistent shapes, costs = params × bits / 16.
pub fn validate(scores: &Scores) -> Result<()> {
    let nf = scores.formats.len();
    ensure!(nf > 0, "no formats");
    // The solver stores an item index in a byte.
    ensure!(nf <= 64, "{nf} formats; at most 64 are supported");
    let last = &scores.formats[nf - 1];
    ensure!(last.name.eq_ignore_ascii_case("NONE"), "the last format is '{}', expected 'NONE'", last.name);
    let mut prev = 0.0;
    for f in &scores.formats {
        ensure!(
            f.effective_bits.is_finite() && f.effective_bits > 0.0 && f.effective_bits <= 16.0,
            "format '{}' has effective bits {}, expected a number in (0, 16]",
            f.name,
            f.effective_bits
        );
        ensure!(f.effective_bits >= prev, "formats are not ordered by effective bits ('{}')", f.name);
        prev = f.effective_bits;
    }
    ensure!(!scores.groups.is_empty(), "no groups");
    let ns = scores.samples.len();
    let mut names = std::collections::HashSet::new();
    for g in &scores.groups {
        ensure!(names.insert(g.name.as_str()), "group '{}' appears twice", g.name);
        ensure!(g.scores.len() == nf, "group '{}' has {} scores for {nf} formats", g.name, g.scores.len());
        ensure!(g.costs.len() == nf, "group '{}' has {} costs for {nf} formats", g.name, g.costs.len());
        for (j, f) in scores.formats.iter().enumerate() {
            let (s, c) = (g.scores[j], g.costs[j]);
            ensure!(s.is_finite(), "group '{}', format '{}': score is {s}", g.name, f.name);
            ensure!(c.is_finite(), "group '{}', format '{}': cost is {c}", g.name, f.name);
            let want = g.params as f64 * f.effective_bits / 16.0;
            ensure!(
                (c - want).abs() <= 1e-9 * want.abs().max(1.0),
                "group '{}', format '{}': cost {c} is not params × bits / 16 = {want}",
                g.name,
                f.name
            );
        }
        check_per_sample(&g.per_sample, nf, ns).with_context(|| format!("group '{}'", g.name))?;
    }
    // The solver sums scores exactly in fixed point: their total must be a finite number.
    let total = scores.groups.iter().flat_map(|g| &g.scores).fold(0.0, |a: f64, s| a + s.abs());
    ensure!(total.is_finite(), "the scores add up to more than the largest float; they cannot be compared");
    let mut layer_names = std::collections::HashSet::new();
    for l in &scores.layers {
        ensure!(layer_names.insert(l.name.as_str()), "layer '{}' appears twice", l.name);
        ensure!(names.contains(l.group.as_str()), "layer '{}' names unknown group '{}'", l.name, l.group);
        ensure!(l.input_amax.is_finite() && l.weight_amax.is_finite(), "layer '{}': amax is not finite", l.name);
        check_per_sample(&l.per_sample, nf, ns).with_context(|| format!("layer '{}'", l.name))?;
    }
    Ok(())
}

fn check_per_sample(per_sample: &[Vec<f64>], nf: usize, ns: usize) -> Result<()> {
    if per_sample.is_empty() {
        return Ok(());
    }
    ensure!(per_sample.len() == nf, "per-sample scores for {} formats, expected {nf}", per_sample.len());
    for row in per_sample {
        ensure!(row.len() == ns, "per-sample scores for {} samples, expected {ns}", row.len());
        if let Some(v) = row.iter().find(|v| !v.is_finite()) {
            bail!("per-sample score is {v}");
        }
        // A bootstrap resample weights one sample up to `ns` times.
        let total = row.iter().fold(0.0, |a: f64, v| a + v.abs()) * ns as f64;
        ensure!(total.is_finite(), "per-sample scores add up to more than the largest float");
    }
    Ok(())
}

impl Problem {
    /// Builds the problem; the artifact is validated first.
    pub fn from_scores(scores: &Scores, overrides: &Overrides) -> Result<Problem> {
        validate(scores)?;
        let disable = compile(&overrides.disable)?;
        let exclude = compile(&overrides.exclude_cost)?;
        let mut used_disable = vec![false; disable.len()];
        let mut used_exclude = vec![false; exclude.len()];
        let matches = |g: &crate::artifact::scores::GroupScores, pats: &[GlobMatcher], used: &mut [bool]| {
            let mut any = false;
            for (p, u) in pats.iter().zip(used.iter_mut()) {
                if p.is_match(&g.name) || g.members.iter().any(|m| p.is_match(m)) {
                    *u = true;
                    any = true;
                }
            }
            any
        };

        let nf = scores.formats.len();
        let none = nf - 1;
        let mut shift = 0u32;
        let mut units = Vec::with_capacity(nf);
        for f in &scores.formats {
            let (_, e) = dyadic(f.effective_bits);
            shift = shift.max((-e).max(0) as u32);
        }
        ensure!(shift <= 64, "format effective bits need more than 64 binary digits");
        for f in &scores.formats {
            units.push(scaled_floor(1, f.effective_bits, shift)?);
        }
        let none_units = scaled_floor(1, 16.0, shift)?;

        // Cost weights as integers over their least common denominator, so that the budget stays
        // exact with fractional (active_moe) weights.
        let gcd = |mut a: u128, mut b: u128| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let mut weight_scale = 1u128;
        for g in &scores.groups {
            if let Some(w) = g.cost_weight {
                ensure!(
                    w.numerator > 0 && w.denominator > 0,
                    "group '{}': cost weight {}/{} is not positive",
                    g.name,
                    w.numerator,
                    w.denominator
                );
                let d = w.denominator as u128;
                weight_scale = (weight_scale / gcd(weight_scale, d))
                    .checked_mul(d)
                    .context("the cost weights' common denominator overflows")?;
            }
        }
        let mut groups = Vec::with_capacity(scores.groups.len());
        let mut allowed = Vec::with_capacity(scores.groups.len());
        let mut classes = Vec::with_capacity(scores.groups.len());
        let mut counted_params = 0u128;
        // Σ over groups of the dearest item: every sum the solver forms stays below it, so
        // checking it here rules out overflow there.
        let mut max_total = 0u128;
        // The manifest reports Σ params as a u64.
        let mut all_params = 0u64;
        let overflow = || anyhow::anyhow!("the costs (params × bits) overflow 128-bit arithmetic; params are absurd");
        for g in &scores.groups {
            let disabled = g.disabled | matches(g, &disable, &mut used_disable);
            let cost_excluded = g.cost_excluded | matches(g, &exclude, &mut used_exclude);
            let formats: Vec<usize> = if disabled { vec![none] } else { (0..nf).collect() };
            let weight = match (cost_excluded, g.cost_weight) {
                (true, _) => 0,
                (false, None) => weight_scale,
                (false, Some(w)) => w.numerator as u128 * (weight_scale / w.denominator as u128),
            };
            counted_params = counted_params.checked_add(weight * g.params as u128).ok_or_else(overflow)?;
            all_params = all_params.checked_add(g.params).ok_or_else(overflow)?;
            let items: Vec<Item> = formats
                .iter()
                .map(|&j| {
                    let cost = (weight * g.params as u128).checked_mul(units[j]).ok_or_else(overflow)?;
                    Ok(Item { cost, score: g.scores[j] })
                })
                .collect::<Result<_>>()?;
            let dearest = items.iter().map(|it| it.cost).max().unwrap_or(0);
            max_total = max_total.checked_add(dearest).ok_or_else(overflow)?;
            classes.push(items);
            allowed.push(formats);
            groups.push(GroupSpec {
                name: g.name.clone(),
                members: g.members.clone(),
                params: g.params,
                disabled,
                cost_excluded,
                cost_weight: weight as f64 / weight_scale as f64,
                scores: g.scores.clone(),
                costs: g.costs.clone(),
            });
        }
        ensure!(counted_params > 0, "no group counts toward the budget (all are cost-excluded or empty)");
        let unmatched_patterns = overrides
            .disable
            .iter()
            .zip(&used_disable)
            .chain(overrides.exclude_cost.iter().zip(&used_exclude))
            .filter(|(_, &u)| !u)
            .map(|(p, _)| p.clone())
            .collect();
        Ok(Problem {
            formats: scores.formats.clone(),
            groups,
            unmatched_patterns,
            allowed,
            mckp: Mckp { classes },
            shift,
            counted_params,
            denominator: counted_params.checked_mul(none_units).ok_or_else(overflow)?,
            weight_scale,
        })
    }

    /// Index of `NONE` in `formats`.
    pub fn none_index(&self) -> usize {
        self.formats.len() - 1
    }

    /// The knapsack instance (one class per group, one item per allowed format).
    pub fn mckp(&self) -> &Mckp {
        &self.mckp
    }

    /// Format index of item `item` of group `group`'s class.
    pub fn format_of(&self, group: usize, item: usize) -> usize {
        self.allowed[group][item]
    }

    /// Largest allowed Σ cost in units for a budget of `bits`.
    pub fn capacity(&self, bits: f64) -> Result<u128> {
        ensure!(bits.is_finite() && bits > 0.0, "effective bits must be a positive number, got {bits}");
        scaled_floor(self.counted_params, bits, self.shift)
    }

    /// Effective bits of a cost in units (ModelOpt's `16 × cost / denominator`).
    pub fn bits_of_units(&self, units: u128) -> f64 {
        units as f64 / self.denominator as f64 * 16.0
    }

    /// A cost in units expressed in the artifact's cost unit (params × bits / 16).
    pub fn cost_of_units(&self, units: u128) -> f64 {
        units as f64 / (16u128 << self.shift) as f64 / self.weight_scale as f64
    }

    /// Σ weighted NONE cost in the artifact's unit (ModelOpt's `cost_denominator`).
    pub fn cost_denominator(&self) -> f64 {
        self.cost_of_units(self.denominator)
    }

    /// Smallest achievable effective bits.
    pub fn min_effective_bits(&self) -> f64 {
        self.bits_of_units(solver::min_cost(&self.mckp))
    }

    /// Effective bits with every group at NONE.
    pub fn max_effective_bits(&self) -> f64 {
        let units: u128 = self.mckp.classes.iter().map(|c| c.last().map_or(0, |it| it.cost)).sum();
        self.bits_of_units(units)
    }

    /// The optimal recipe for a budget of `bits`; an error naming the smallest achievable
    /// effective bits when the budget is impossible.
    pub fn solve(&self, bits: f64, limits: &Limits) -> Result<Recipe> {
        let cap = self.capacity(bits)?;
        self.solve_units(cap, limits).with_context(|| {
            let min = self.min_effective_bits();
            format!(
                "effective bits {bits} is not achievable: the smallest achievable is {:.4} ({min}), \
                 with every searchable group at its fewest-bits format",
                (min * 1e4).ceil() / 1e4
            )
        })
    }

    /// The optimal recipe for a capacity in units; `None` when nothing fits.
    pub fn solve_units(&self, capacity: u128, limits: &Limits) -> Option<Recipe> {
        let s = solver::solve(&self.mckp, capacity, limits)?;
        let choice: Vec<usize> = s.choice.iter().enumerate().map(|(g, &i)| self.allowed[g][i]).collect();
        Some(Recipe {
            choice,
            objective: s.score,
            effective_bits: self.bits_of_units(s.cost),
            cost: self.cost_of_units(s.cost),
            proved: s.proved,
            lower_bound: s.lower_bound,
            lp_bound: s.lp_bound,
            initial_incumbent: s.initial_incumbent,
            stats: s.stats,
        })
    }

    /// Objective and effective bits of a format index per group (e.g. another tool's recipe).
    pub fn evaluate(&self, choice: &[usize]) -> Result<Evaluation> {
        ensure!(choice.len() == self.groups.len(), "{} choices for {} groups", choice.len(), self.groups.len());
        let mut items = Vec::with_capacity(choice.len());
        for (g, &f) in choice.iter().enumerate() {
            let item = self.allowed[g].iter().position(|&a| a == f).with_context(|| {
                format!("group '{}' may not take format {}", self.groups[g].name, self.format_name(f))
            })?;
            items.push(item);
        }
        let (units, objective) = self.mckp.score_of(&items);
        Ok(Evaluation { objective, effective_bits: self.bits_of_units(units), cost: self.cost_of_units(units) })
    }

    /// Units of a format index per group (for frontier bookkeeping).
    pub fn units_of(&self, choice: &[usize]) -> u128 {
        choice
            .iter()
            .enumerate()
            .map(|(g, &f)| {
                let item = self.allowed[g].iter().position(|&a| a == f).unwrap_or(0);
                self.mckp.classes[g][item].cost
            })
            .sum()
    }

    pub fn format_name(&self, f: usize) -> &str {
        self.formats.get(f).map_or("?", |x| x.name.as_str())
    }

    /// Index of a format by name (case-insensitive; ModelOpt's `FP8_DEFAULT_CFG(...)` spelling
    /// is accepted too).
    pub fn format_index(&self, name: &str) -> Option<usize> {
        let want = normalize_format_name(name);
        self.formats.iter().position(|f| normalize_format_name(&f.name) == want)
    }
}

/// `FP8_DEFAULT_CFG(effective-bits: 8.0)` → `FP8`, `none` → `NONE`.
pub fn normalize_format_name(name: &str) -> String {
    let base = name.split('(').next().unwrap_or(name).trim().to_ascii_uppercase();
    let base = base.strip_suffix("_CFG").unwrap_or(&base);
    let base = base.strip_suffix("_DEFAULT").unwrap_or(base);
    base.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fractional cost weights (active_moe) against a brute force over every choice, in f64:
    /// the denominator, the effective bits and cost of each choice, and the optimum per budget.
    #[test]
    fn fractional_cost_weights_match_a_brute_force() {
        use crate::artifact::scores::CostWeight;
        let spec = crate::search::synthetic::SyntheticSpec {
            vision_blocks: 1,
            deepstack: 0,
            text_layers: 1,
            formats: 2,
            samples: 2,
            seed: 3,
            ragged: false,
        };
        let mut scores = crate::search::synthetic::scores(&spec);
        let weights: Vec<Option<CostWeight>> = (0..scores.groups.len())
            .map(|g| match g % 3 {
                0 => Some(CostWeight::new(8, 128)),
                1 => Some(CostWeight::new(3, 6)),
                _ => None,
            })
            .collect();
        for (g, w) in scores.groups.iter_mut().zip(&weights) {
            g.cost_weight = *w;
        }
        let p = Problem::from_scores(&scores, &Overrides::default()).unwrap();
        let w = |g: usize| weights[g].map_or(1.0, |w| w.value());
        let nf = scores.formats.len();
        let denominator: f64 = scores.groups.iter().enumerate().map(|(g, x)| w(g) * x.costs[nf - 1]).sum();
        assert_eq!(p.cost_denominator(), denominator);
        let n = scores.groups.len();
        assert!(nf.pow(n as u32) <= 1 << 16, "brute force stays small");
        let all: Vec<Vec<usize>> = (0..nf.pow(n as u32))
            .map(|mut k| {
                (0..n)
                    .map(|_| {
                        let f = k % nf;
                        k /= nf;
                        f
                    })
                    .collect()
            })
            .collect();
        let cost = |c: &[usize]| c.iter().enumerate().map(|(g, &f)| w(g) * scores.groups[g].costs[f]).sum::<f64>();
        for c in all.iter().step_by(7) {
            let e = p.evaluate(c).unwrap();
            assert!((e.cost - cost(c)).abs() <= 1e-9 * cost(c), "{c:?}");
            assert!((e.effective_bits - 16.0 * cost(c) / denominator).abs() < 1e-12);
        }
        for bits in [8.2, 9.0, 11.5, 14.0] {
            let best = all
                .iter()
                .filter(|c| 16.0 * cost(c) / denominator <= bits + 1e-12)
                .map(|c| p.evaluate(c).unwrap().objective)
                .fold(f64::INFINITY, f64::min);
            let r = p.solve(bits, &Limits::default()).unwrap();
            assert!(r.effective_bits <= bits, "{bits}");
            assert!((r.objective - best).abs() <= 1e-12 * best.max(1e-300), "{bits}: {} vs {best}", r.objective);
        }
    }

    #[test]
    fn dyadic_and_scaled_floor_are_exact() {
        assert_eq!(dyadic(8.5), (17, -1));
        assert_eq!(dyadic(16.0), (1, 4));
        assert_eq!(scaled_floor(3, 8.5, 1).unwrap(), 51);
        assert_eq!(scaled_floor(3, 8.5, 0).unwrap(), 25);
        // 0.1 is slightly above 1/10 in binary: ⌊10 × 0.1⌋ = 1.
        assert_eq!(scaled_floor(10, 0.1, 0).unwrap(), 1);
        assert_eq!(scaled_floor(294912, 8.5, 0).unwrap(), 2506752);
    }

    #[test]
    fn format_names_normalize() {
        assert_eq!(normalize_format_name("FP8_DEFAULT_CFG(effective-bits: 8.0)"), "FP8");
        assert_eq!(normalize_format_name("NONE(effective-bits: 16.0)"), "NONE");
        assert_eq!(normalize_format_name("nvfp4"), "NVFP4");
    }
}
