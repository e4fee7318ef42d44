//! Exact multiple-choice knapsack: pick one item per class, minimise Σ score subject to
//! Σ cost ≤ capacity.
//!
//! Costs are integers (the caller scales them so that they are exact). Scores are `f64`, summed
//! exactly: they are converted to 128-bit fixed point with a resolution of 2⁻¹²⁰ of the largest
//! possible total (far below `f64` resolution), so sums do not depend on the order of addition,
//! ties are exact, and a reported objective is the exact sum rounded once to `f64` (hence
//! monotone: a better solution never reports a larger objective).
//!
//! The algorithm is a dynamic program over the classes that keeps, after each class, the partial
//! solutions that are not dominated (no other partial solution is at most as costly and at most
//! as bad), pruned by a bound: a partial solution is dropped when its score plus the LP
//! relaxation of the remaining classes (the greedy over each class's lower convex hull, Sinha &
//! Zoltners 1979) at the remaining capacity exceeds a threshold no lower than the optimum. Both
//! rules keep at least one optimal solution, so the surviving solution with the lowest score is
//! optimal: the proof is the run itself. To keep the number of partial solutions small:
//! - the threshold starts just above the LP bound and grows (×8 from the LP bound) up to the
//!   rounded-and-improved LP solution, the incumbent; a pass whose best solution is within its
//!   threshold is optimal, a pass that finds none proves the optimum lies above it;
//! - items whose Lagrangian reduced cost (with the LP's critical rate λ) exceeds the threshold's
//!   distance to the LP bound are left out of the pass: no solution within the threshold uses
//!   them (Σ reduced costs ≤ score − LP bound for every feasible solution);
//! - classes are processed most certain first (largest reduced-cost margin between their two
//!   best items), so the undecided ones multiply partial solutions only in the last stages.
//!
//! If a stage would keep more than [`Limits::max_states`] partial solutions (or more than its
//! share of [`Limits::max_total_states`], which bounds a pass's memory), the ones with the best
//! bound are kept and the result is reported as feasible with a lower bound instead.
//!
//! Ties: dominance keeps the cheaper of two equal-score partial solutions, and within a class an
//! item is dropped when a cheaper one scores no worse (between equal-cost, equal-score items the
//! one listed last is kept, i.e. the format with more bits). The bounds are computed in `f64`
//! and loosened by a relative 1e-9, so their rounding can only keep more partial solutions.

use std::cmp::Ordering;

/// One choice of a class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Item {
    pub cost: u128,
    pub score: f64,
}

/// A multiple-choice knapsack instance (each class non-empty, scores finite).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mckp {
    pub classes: Vec<Vec<Item>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most partial solutions kept after one class before the search gives up proving optimality.
    pub max_states: usize,
    /// Most partial solutions kept over all classes of a pass (each is remembered to rebuild the
    /// solution, 8 bytes): bounds a pass's memory whatever the instance (16 Mi → 128 MiB).
    pub max_total_states: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_states: 1 << 20, max_total_states: 1 << 24 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Dynamic-programming passes (thresholds tried).
    pub passes: u32,
    pub generated: u64,
    pub pruned_by_bound: u64,
    pub pruned_by_dominance: u64,
    pub max_kept: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Item index per class.
    pub choice: Vec<usize>,
    pub cost: u128,
    /// Σ chosen scores (exact, rounded once).
    pub score: f64,
    /// True when `score` is proved minimal.
    pub proved: bool,
    /// A lower bound on the optimum (`score` when proved).
    pub lower_bound: f64,
    /// The LP relaxation's value at the capacity.
    pub lp_bound: f64,
    /// Score of the starting incumbent (rounded and improved LP solution).
    pub initial_incumbent: f64,
    pub stats: Stats,
}

/// Exact fixed-point scores: `value = units × 2^exp`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fixed {
    exp: i32,
}

impl Fixed {
    /// The scale for an instance: Σ over classes of the largest |score| stays below 2¹²⁰ units.
    fn for_instance(m: &Mckp) -> Fixed {
        let max_total: f64 = m.classes.iter().map(|c| c.iter().map(|it| it.score.abs()).fold(0.0, f64::max)).sum();
        if max_total == 0.0 || !max_total.is_finite() {
            return Fixed { exp: -1074 };
        }
        // 2^(e-1) ≤ max_total < 2^e.
        let e = max_total.log2().floor() as i32 + 1;
        Fixed { exp: (e - 120).max(-1074) }
    }

    fn units(&self, x: f64) -> i128 {
        if x == 0.0 {
            return 0;
        }
        let bits = x.abs().to_bits();
        let be = ((bits >> 52) & 0x7ff) as i32;
        let frac = (bits & ((1u64 << 52) - 1)) as i128;
        let (m, e) = if be == 0 { (frac, -1074) } else { (frac | (1i128 << 52), be - 1075) };
        let shift = e - self.exp;
        let u = if shift >= 0 {
            m << shift
        } else if -shift > 60 {
            0
        } else {
            // Round half to even.
            let s = -shift;
            let q = m >> s;
            let r = m - (q << s);
            let half = 1i128 << (s - 1);
            if r > half || (r == half && q & 1 == 1) {
                q + 1
            } else {
                q
            }
        };
        if x < 0.0 {
            -u
        } else {
            u
        }
    }

    fn value(&self, units: i128) -> f64 {
        // i128 → f64 rounds to nearest once; scaling by an exact power of two keeps it exact.
        let pow2 = if self.exp >= -1022 {
            f64::from_bits(((self.exp + 1023) as u64) << 52)
        } else {
            f64::from_bits(1u64 << (self.exp + 1074))
        };
        (units as f64) * pow2
    }
}

/// A class after preprocessing: the non-dominated items sorted by cost (scores strictly
/// decreasing), and the indices (into `items`) of its lower convex hull.
#[derive(Debug, Clone)]
struct Prepared {
    items: Vec<PItem>,
    hull: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
struct PItem {
    cost: u128,
    units: i128,
    score: f64,
    orig: usize,
}

/// One hull edge of one class: moving class `class` from hull vertex `pos` to `pos + 1`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    class: usize,
    pos: usize,
    dcost: u128,
    /// Score decrease (> 0).
    gain: f64,
    /// Gain per unit cost.
    rate: f64,
}

/// The LP relaxation of a set of classes, as a function of the capacity.
struct Relaxation {
    base_cost: u128,
    base_score: f64,
    /// Prefix sums over the segments in rate order: `cum_cost[t]`, `cum_gain[t]` for the first
    /// `t` segments (both start with 0).
    cum_cost: Vec<u128>,
    cum_gain: Vec<f64>,
    segments: Vec<Segment>,
}

impl Relaxation {
    /// LP optimum with `capacity`; `None` if even the cheapest items do not fit.
    fn value(&self, capacity: u128) -> Option<f64> {
        let extra = capacity.checked_sub(self.base_cost)?;
        // Number of whole segments that fit.
        let t = self.cum_cost.partition_point(|&c| c <= extra) - 1;
        let mut gain = self.cum_gain[t];
        if let Some(seg) = self.segments.get(t) {
            let left = extra - self.cum_cost[t];
            gain += seg.gain * (left as f64 / seg.dcost as f64);
        }
        Some(self.base_score - gain)
    }

    /// The rate of the segment the LP stops in (the LP dual λ; 0 if every segment fits).
    fn critical_rate(&self, capacity: u128) -> f64 {
        let extra = capacity.saturating_sub(self.base_cost);
        let t = self.cum_cost.partition_point(|&c| c <= extra) - 1;
        self.segments.get(t).map_or(0.0, |s| s.rate)
    }
}

struct Prepro {
    fixed: Fixed,
    classes: Vec<Prepared>,
    /// All hull segments, best rate first (ties: class, then position).
    segments: Vec<Segment>,
    /// Scale for the pruning tolerance: Σ over classes of the largest |score|.
    magnitude: f64,
}

fn prepare(m: &Mckp) -> Prepro {
    let fixed = Fixed::for_instance(m);
    let mut classes = Vec::with_capacity(m.classes.len());
    let mut magnitude = 0.0f64;
    for items in &m.classes {
        assert!(!items.is_empty(), "every class needs at least one item");
        magnitude += items.iter().map(|it| it.score.abs()).fold(0.0, f64::max);
        let mut sorted: Vec<PItem> = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let units = fixed.units(it.score);
                PItem { cost: it.cost, units, score: fixed.value(units), orig: i }
            })
            .collect();
        // Cost ascending, score ascending, later index first (more bits wins a full tie).
        sorted.sort_by(|a, b| a.cost.cmp(&b.cost).then(a.units.cmp(&b.units)).then(b.orig.cmp(&a.orig)));
        let mut kept: Vec<PItem> = Vec::with_capacity(sorted.len());
        for it in sorted {
            if kept.last().is_none_or(|last| it.units < last.units) {
                kept.push(it);
            }
        }
        let hull = lower_hull(&kept);
        classes.push(Prepared { items: kept, hull });
    }
    let mut segments = Vec::new();
    for (c, p) in classes.iter().enumerate() {
        let mut prev_rate = f64::INFINITY;
        for pos in 0..p.hull.len().saturating_sub(1) {
            let a = p.items[p.hull[pos]];
            let b = p.items[p.hull[pos + 1]];
            let dcost = b.cost - a.cost;
            let gain = a.score - b.score;
            // Convexity makes rates decrease along a hull; clamp so rounding cannot reorder them.
            let rate = (gain / dcost as f64).min(prev_rate);
            prev_rate = rate;
            segments.push(Segment { class: c, pos, dcost, gain, rate });
        }
    }
    segments.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(a.class.cmp(&b.class)).then(a.pos.cmp(&b.pos)));
    Prepro { fixed, classes, segments, magnitude }
}

/// Lower convex hull of points sorted by cost with strictly decreasing score.
fn lower_hull(items: &[PItem]) -> Vec<usize> {
    let mut hull: Vec<usize> = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        while hull.len() >= 2 {
            let o = items[hull[hull.len() - 2]];
            let a = items[hull[hull.len() - 1]];
            let b = items[i];
            let cross = (a.cost - o.cost) as f64 * (b.score - o.score) - (a.score - o.score) * (b.cost - o.cost) as f64;
            if cross <= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(i);
    }
    hull
}

impl Prepro {
    /// The LP relaxation of the classes for which `include` is true.
    fn relaxation(&self, include: impl Fn(usize) -> bool) -> Relaxation {
        let mut base_cost = 0u128;
        let mut base_score = 0.0;
        for (c, p) in self.classes.iter().enumerate() {
            if include(c) {
                base_cost += p.items[0].cost;
                base_score += p.items[0].score;
            }
        }
        let segments: Vec<Segment> = self.segments.iter().filter(|s| include(s.class)).copied().collect();
        let mut cum_cost = Vec::with_capacity(segments.len() + 1);
        let mut cum_gain = Vec::with_capacity(segments.len() + 1);
        let (mut c, mut g) = (0u128, 0.0);
        cum_cost.push(0);
        cum_gain.push(0.0);
        for s in &segments {
            c += s.dcost;
            g += s.gain;
            cum_cost.push(c);
            cum_gain.push(g);
        }
        Relaxation { base_cost, base_score, cum_cost, cum_gain, segments }
    }

    fn min_cost(&self) -> u128 {
        self.classes.iter().map(|p| p.items[0].cost).sum()
    }

    /// Prepared-item index per class → (cost, exact score units).
    fn evaluate(&self, pick: &[usize]) -> (u128, i128) {
        let mut cost = 0u128;
        let mut units = 0i128;
        for (p, &i) in self.classes.iter().zip(pick) {
            cost += p.items[i].cost;
            units += p.items[i].units;
        }
        (cost, units)
    }

    /// A good feasible solution: the LP solution rounded down, then greedily improved by single
    /// moves that fit (largest score decrease first).
    fn incumbent(&self, capacity: u128) -> Vec<usize> {
        let mut hull_pos = vec![0usize; self.classes.len()];
        let mut left = capacity - self.min_cost();
        for s in &self.segments {
            if s.dcost > left {
                break;
            }
            left -= s.dcost;
            hull_pos[s.class] = s.pos + 1;
        }
        let mut pick: Vec<usize> = self.classes.iter().zip(&hull_pos).map(|(p, &h)| p.hull[h]).collect();
        for _ in 0..4 * self.classes.len() + 16 {
            let mut best: Option<(i128, usize, usize)> = None;
            for (c, p) in self.classes.iter().enumerate() {
                let cur = p.items[pick[c]];
                for (i, it) in p.items.iter().enumerate() {
                    let gain = cur.units - it.units;
                    let fits = it.cost <= cur.cost || it.cost - cur.cost <= left;
                    if gain > 0 && fits && best.is_none_or(|b| gain > b.0) {
                        best = Some((gain, c, i));
                    }
                }
            }
            let Some((_, c, i)) = best else { break };
            let p = &self.classes[c];
            left = left + p.items[pick[c]].cost - p.items[i].cost;
            pick[c] = i;
        }
        pick
    }
}

/// One partial solution: its cost, exact score, bound, and where it came from.
#[derive(Debug, Clone, Copy)]
struct State {
    cost: u128,
    units: i128,
    bound: f64,
    parent: u32,
    item: u8,
}

/// Smallest Σ cost over all choices.
pub fn min_cost(m: &Mckp) -> u128 {
    m.classes.iter().map(|items| items.iter().map(|it| it.cost).min().unwrap_or(0)).sum()
}

impl Mckp {
    /// Σ cost and Σ score (exact, rounded once; the solver's own arithmetic) of a choice.
    pub fn score_of(&self, choice: &[usize]) -> (u128, f64) {
        let fixed = Fixed::for_instance(self);
        let mut cost = 0u128;
        let mut units = 0i128;
        for (items, &i) in self.classes.iter().zip(choice) {
            cost += items[i].cost;
            units += fixed.units(items[i].score);
        }
        (cost, fixed.value(units))
    }
}

/// Solves the instance exactly (see the module doc); `None` when no choice fits `capacity`.
pub fn solve(m: &Mckp, capacity: u128, limits: &Limits) -> Option<Solution> {
    let pre = prepare(m);
    if pre.min_cost() > capacity {
        return None;
    }
    let n = pre.classes.len();
    let root = pre.relaxation(|_| true);
    let lp_bound = root.value(capacity).expect("min cost fits");
    let start = pre.incumbent(capacity);
    let upper = pre.fixed.value(pre.evaluate(&start).1);
    let initial_incumbent = upper;
    let tol = 1e-9 * (upper.abs().max(pre.magnitude)) + f64::MIN_POSITIVE;

    // Lagrangian reduced costs at the LP's critical rate, and the processing order.
    let lambda = root.critical_rate(capacity);
    let mut rc_scale = pre.magnitude;
    let reduced: Vec<Vec<f64>> = pre
        .classes
        .iter()
        .map(|p| {
            let lag: Vec<f64> = p.items.iter().map(|it| it.score + lambda * it.cost as f64).collect();
            let best = lag.iter().copied().fold(f64::INFINITY, f64::min);
            rc_scale += lag.iter().map(|x| x.abs()).fold(0.0, f64::max);
            lag.iter().map(|x| x - best).collect()
        })
        .collect();
    let rc_tol = 1e-9 * rc_scale + f64::MIN_POSITIVE;
    let margin = |c: usize| -> f64 {
        let mut v = reduced[c].clone();
        v.sort_by(f64::total_cmp);
        v.get(1).copied().unwrap_or(f64::INFINITY)
    };
    let margins: Vec<f64> = (0..n).map(margin).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| margins[b].total_cmp(&margins[a]).then(a.cmp(&b)));

    let mut stats = Stats::default();
    // The optimum is proved to be above this (passes that found nothing and dropped nothing).
    let mut floor = lp_bound;
    let gap = upper - lp_bound;
    let mut trial = if gap > tol { lp_bound + gap / 256.0 } else { upper };
    let (pick, dropped_bound) = loop {
        let last = trial >= upper;
        let threshold = trial.min(upper);
        let slack = threshold - lp_bound + tol + rc_tol;
        let items: Vec<Vec<usize>> =
            (0..n).map(|c| (0..pre.classes[c].items.len()).filter(|&i| reduced[c][i] <= slack).collect()).collect();
        stats.passes += 1;
        let pass = dp_pass(&pre, &order, &items, capacity, threshold, tol, limits, &mut stats);
        if let Some(pick) = pass.pick {
            if pre.fixed.value(pre.evaluate(&pick).1) <= threshold {
                break (pick, pass.dropped_bound);
            }
        }
        if last {
            // Only reachable when the state limit dropped the better solutions.
            break (start, pass.dropped_bound);
        }
        if pass.dropped_bound == f64::INFINITY {
            floor = floor.max(threshold);
        }
        trial = lp_bound + (trial - lp_bound) * 8.0;
    };
    let (cost, units) = pre.evaluate(&pick);
    let score = pre.fixed.value(units);
    let proved = score <= dropped_bound;
    let lower_bound = if proved { score } else { dropped_bound.max(floor).min(score) };
    let choice = pick.iter().zip(&pre.classes).map(|(&i, p)| p.items[i].orig).collect();
    Some(Solution { choice, cost, score, proved, lower_bound, lp_bound, initial_incumbent, stats })
}

/// One dynamic-programming pass: the best complete solution (prepared item per class) whose
/// partial bounds all stay within `threshold + tol`, and the lowest bound of any partial
/// solution dropped by the state limit (∞ if none).
struct Pass {
    pick: Option<Vec<usize>>,
    dropped_bound: f64,
}

#[allow(clippy::too_many_arguments)]
fn dp_pass(
    pre: &Prepro,
    order: &[usize],
    allowed: &[Vec<usize>],
    capacity: u128,
    threshold: f64,
    tol: f64,
    limits: &Limits,
    stats: &mut Stats,
) -> Pass {
    let n = order.len();
    let mut position = vec![0usize; n];
    for (k, &c) in order.iter().enumerate() {
        position[c] = k;
    }
    let mut states = vec![State { cost: 0, units: 0, bound: f64::NEG_INFINITY, parent: 0, item: 0 }];
    let mut history: Vec<Vec<(u32, u8)>> = Vec::with_capacity(n);
    let mut dropped_bound = f64::INFINITY;
    let mut candidates: Vec<State> = Vec::new();
    let mut total_kept = 0usize;
    for (k, &class) in order.iter().enumerate() {
        let rest = pre.relaxation(|c| position[c] > k);
        let items = &pre.classes[class].items;
        candidates.clear();
        for (pi, s) in states.iter().enumerate() {
            for &ii in &allowed[class] {
                let it = items[ii];
                stats.generated += 1;
                let cost = s.cost + it.cost;
                let units = s.units + it.units;
                let Some(rest_value) = capacity.checked_sub(cost).and_then(|left| rest.value(left)) else {
                    stats.pruned_by_bound += 1;
                    continue;
                };
                let bound = pre.fixed.value(units) + rest_value;
                if bound > threshold + tol {
                    stats.pruned_by_bound += 1;
                    continue;
                }
                candidates.push(State { cost, units, bound, parent: pi as u32, item: ii as u8 });
            }
        }
        candidates.sort_by(|a, b| {
            a.cost.cmp(&b.cost).then(a.units.cmp(&b.units)).then(a.parent.cmp(&b.parent)).then(a.item.cmp(&b.item))
        });
        let mut kept: Vec<State> = Vec::with_capacity(candidates.len());
        for c in &candidates {
            if kept.last().is_none_or(|last| c.units < last.units) {
                kept.push(*c);
            } else {
                stats.pruned_by_dominance += 1;
            }
        }
        // This stage's share of what the pass may still keep, at least one state per stage.
        let cap = limits.max_states.min((limits.max_total_states.saturating_sub(total_kept) / (n - k)).max(1));
        if kept.len() > cap {
            // Keep the best bounds; remember the best bound given up.
            let mut by_bound: Vec<usize> = (0..kept.len()).collect();
            by_bound.sort_by(|&a, &b| kept[a].bound.total_cmp(&kept[b].bound).then(a.cmp(&b)));
            let mut keep = vec![false; kept.len()];
            for &i in &by_bound[..cap] {
                keep[i] = true;
            }
            for &i in &by_bound[cap..] {
                dropped_bound = dropped_bound.min(kept[i].bound);
            }
            let mut i = 0;
            kept.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        stats.max_kept = stats.max_kept.max(kept.len());
        total_kept += kept.len();
        history.push(kept.iter().map(|s| (s.parent, s.item)).collect());
        states = kept;
        if states.is_empty() {
            return Pass { pick: None, dropped_bound };
        }
    }
    // Scores strictly decrease with cost, so the last state is the best.
    let mut pick = vec![0usize; n];
    let mut idx = states.len() - 1;
    for k in (0..n).rev() {
        let (parent, item) = history[k][idx];
        pick[order[k]] = item as usize;
        idx = parent as usize;
    }
    Pass { pick: Some(pick), dropped_bound }
}

/// A vertex of the LP relaxation's frontier: an integral solution that is optimal (up to the
/// rounding of the hull computation) for a budget equal to its own cost.
#[derive(Debug, Clone, PartialEq)]
pub struct HullPoint {
    pub cost: u128,
    pub score: f64,
    pub choice: Vec<usize>,
}

/// All vertices of the LP frontier, from the cheapest solution to the best-scoring one.
pub fn hull_points(m: &Mckp) -> Vec<HullPoint> {
    let pre = prepare(m);
    let mut hull_pos = vec![0usize; pre.classes.len()];
    let point = |hp: &[usize]| {
        let pick: Vec<usize> = pre.classes.iter().zip(hp).map(|(p, &h)| p.hull[h]).collect();
        let (cost, units) = pre.evaluate(&pick);
        let choice = pick.iter().zip(&pre.classes).map(|(&i, p)| p.items[i].orig).collect();
        HullPoint { cost, score: pre.fixed.value(units), choice }
    };
    let mut points = vec![point(&hull_pos)];
    for s in &pre.segments {
        hull_pos[s.class] = s.pos + 1;
        points.push(point(&hull_pos));
    }
    points
}

/// One point of the exact Pareto frontier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParetoPoint {
    pub cost: u128,
    pub score: f64,
    /// How many classes chose an item flagged by the caller's `counted`.
    pub counted: usize,
}

/// Every Pareto-optimal (cost, score) pair with cost ≤ `capacity` (cost ascending, score strictly
/// decreasing), or `None` if some stage would hold more than `max_states` pairs.
pub fn pareto_frontier(
    m: &Mckp,
    capacity: u128,
    max_states: usize,
    counted: impl Fn(usize, usize) -> bool,
) -> Option<Vec<ParetoPoint>> {
    let pre = prepare(m);
    // (cost, units, counted)
    let mut states: Vec<(u128, i128, usize)> = vec![(0, 0, 0)];
    let mut rest_min: u128 = pre.min_cost();
    let mut candidates = Vec::new();
    for (k, p) in pre.classes.iter().enumerate() {
        rest_min -= p.items[0].cost;
        candidates.clear();
        for s in &states {
            for it in &p.items {
                let cost = s.0 + it.cost;
                if cost + rest_min > capacity {
                    continue;
                }
                candidates.push((cost, s.1 + it.units, s.2 + usize::from(counted(k, it.orig))));
            }
        }
        candidates.sort_unstable();
        states.clear();
        for &c in &candidates {
            if states.last().is_none_or(|last: &(u128, i128, usize)| c.1 < last.1) {
                states.push(c);
            }
        }
        if states.len() > max_states {
            return None;
        }
    }
    Some(
        states
            .into_iter()
            .map(|(cost, units, counted)| ParetoPoint { cost, score: pre.fixed.value(units), counted })
            .collect(),
    )
}

/// Exhaustive search (for tests and tiny instances): the lowest exact score, ties to the lower
/// cost, then the first choice in odometer order.
pub fn brute_force(m: &Mckp, capacity: u128) -> Option<(Vec<usize>, u128, f64)> {
    let fixed = Fixed::for_instance(m);
    let n = m.classes.len();
    let mut choice = vec![0usize; n];
    let mut best: Option<(Vec<usize>, u128, i128)> = None;
    loop {
        let mut cost = 0u128;
        let mut units = 0i128;
        for (items, &i) in m.classes.iter().zip(&choice) {
            cost += items[i].cost;
            units += fixed.units(items[i].score);
        }
        if cost <= capacity {
            let better = match &best {
                None => true,
                Some((_, bc, bu)) => match units.cmp(bu) {
                    Ordering::Less => true,
                    Ordering::Equal => cost < *bc,
                    Ordering::Greater => false,
                },
            };
            if better {
                best = Some((choice.clone(), cost, units));
            }
        }
        // Next choice (odometer).
        let mut k = 0;
        loop {
            if k == n {
                return best.map(|(c, cost, u)| (c, cost, fixed.value(u)));
            }
            choice[k] += 1;
            if choice[k] < m.classes[k].len() {
                break;
            }
            choice[k] = 0;
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn inst(classes: &[&[(u128, f64)]]) -> Mckp {
        Mckp {
            classes: classes.iter().map(|c| c.iter().map(|&(cost, score)| Item { cost, score }).collect()).collect(),
        }
    }

    #[test]
    fn picks_the_optimum_the_lp_rounding_misses() {
        // LP prefers the best rate (class 0), but the integer optimum spends the budget on class 1.
        let m = inst(&[&[(0, 10.0), (6, 3.0)], &[(0, 10.0), (10, 0.0)]]);
        let s = solve(&m, 10, &Limits::default()).unwrap();
        assert_eq!(s.choice, vec![0, 1]);
        assert_eq!(s.score, 10.0);
        assert!(s.proved);
        assert!(s.lp_bound <= s.score);
    }

    #[test]
    fn infeasible_is_none() {
        let m = inst(&[&[(5, 1.0), (7, 0.0)]]);
        assert!(solve(&m, 4, &Limits::default()).is_none());
        assert!(solve(&m, 5, &Limits::default()).is_some());
    }

    #[test]
    fn ties_prefer_more_bits_at_equal_cost_and_cheaper_at_equal_score() {
        // Zero-cost class (cost excluded): equal scores → the last item.
        let m = inst(&[&[(0, 0.0), (0, 0.0)]]);
        assert_eq!(solve(&m, 0, &Limits::default()).unwrap().choice, vec![1]);
        // Equal score, different cost → the cheaper.
        let m = inst(&[&[(4, 0.0), (8, 0.0)]]);
        assert_eq!(solve(&m, 100, &Limits::default()).unwrap().choice, vec![0]);
    }

    #[test]
    fn matches_brute_force_on_random_instances() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for case in 0..3000 {
            let n = rng.random_range(1..=7);
            let mut classes = Vec::new();
            for _ in 0..n {
                let m = rng.random_range(1..=4);
                let params: u128 = rng.random_range(1..=40);
                let mut items = Vec::new();
                for j in 0..m {
                    let bits: u128 = [4, 8, 12, 16][j.min(3)] + rng.random_range(0..3);
                    // Mostly monotone scores, sometimes ties and zero.
                    let score = match rng.random_range(0..10) {
                        0 => 0.0,
                        1 => 1.0,
                        _ => rng.random_range(0..1000) as f64 / 8.0,
                    };
                    items.push(Item { cost: params * bits, score });
                }
                classes.push(items);
            }
            let m = Mckp { classes };
            let total: u128 = m.classes.iter().map(|c| c.iter().map(|i| i.cost).max().unwrap()).sum();
            let cap = rng.random_range(0..=total + 5);
            let exact = brute_force(&m, cap);
            let ours = solve(&m, cap, &Limits::default());
            match (exact, ours) {
                (None, None) => {}
                (Some((_, _, best)), Some(s)) => {
                    assert_eq!(s.score, best, "case {case}: {m:?} cap {cap}");
                    assert!(s.cost <= cap);
                    assert!(s.proved);
                    assert_eq!(m.score_of(&s.choice), (s.cost, s.score));
                }
                (e, o) => panic!("case {case}: brute force {e:?}, solver {o:?}"),
            }
        }
    }

    /// 12 classes of 3 random items (costs 1..50), small enough for `brute_force`.
    fn twelve_classes(seed: u64) -> Mckp {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let classes = (0..12)
            .map(|_| {
                (0..3).map(|_| Item { cost: rng.random_range(1..50), score: rng.random_range(0.0..10.0) }).collect()
            })
            .collect();
        Mckp { classes }
    }

    #[test]
    fn state_limit_gives_a_feasible_answer_with_a_valid_bound() {
        let m = twelve_classes(3);
        let cap = 250;
        let (_, _, best) = brute_force(&m, cap).unwrap();
        let s = solve(&m, cap, &Limits { max_states: 2, ..Limits::default() }).unwrap();
        assert!(s.cost <= cap);
        assert!(s.score >= best);
        assert!(s.lower_bound <= best + 1e-12, "{} > {best}", s.lower_bound);
    }

    #[test]
    fn total_state_limit_bounds_every_stage_and_stays_valid() {
        let m = twelve_classes(5);
        let cap = 250;
        let (_, _, best) = brute_force(&m, cap).unwrap();
        let unlimited = solve(&m, cap, &Limits::default()).unwrap();
        assert!(unlimited.stats.max_kept > 1, "the instance must need more than the cap below");
        // 12 classes share 12 states: one per stage.
        let s = solve(&m, cap, &Limits { max_states: 1 << 20, max_total_states: 12 }).unwrap();
        assert_eq!(s.stats.max_kept, 1);
        assert!(s.cost <= cap);
        assert!(s.score >= best);
        assert!(s.lower_bound <= best + 1e-12, "{} > {best}", s.lower_bound);
    }

    #[test]
    fn pareto_frontier_is_every_budget_optimum() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for _ in 0..200 {
            let classes: Vec<Vec<Item>> = (0..rng.random_range(1..6))
                .map(|_| {
                    (0..rng.random_range(1..4))
                        .map(|_| Item { cost: rng.random_range(0..20), score: rng.random_range(0..50) as f64 })
                        .collect()
                })
                .collect();
            let m = Mckp { classes };
            let total: u128 = m.classes.iter().map(|c| c.iter().map(|i| i.cost).max().unwrap()).sum();
            let front = pareto_frontier(&m, total, 1 << 16, |_, _| false).unwrap();
            for w in front.windows(2) {
                assert!(w[0].cost < w[1].cost && w[0].score > w[1].score);
            }
            for p in &front {
                assert_eq!(brute_force(&m, p.cost).unwrap().2, p.score);
            }
            for h in hull_points(&m) {
                assert_eq!(brute_force(&m, h.cost).unwrap().2, h.score);
                assert_eq!(m.score_of(&h.choice), (h.cost, h.score));
            }
        }
    }
}
