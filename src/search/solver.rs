//! Exact multiple-choice knapsack: pick one item per class, minimise Σ score subject to
//! Σ cost ≤ capacity.
//!
//! Costs are integers (the caller scales them so that they are exact), scores are `f64`.
//!
//! The algorithm is a dynamic program over the classes (in the given order) that keeps, after
//! each class, the partial solutions that are not dominated (no other partial solution is at
//! most as costly and at most as bad), pruned by a bound: a partial solution is dropped when its
//! score plus the LP relaxation of the remaining classes (the greedy over each class's lower
//! convex hull, Sinha & Zoltners 1979) at the remaining capacity exceeds the best complete
//! solution known (the rounded-and-improved LP solution). Both rules keep at least one optimal
//! solution, so the survivor with the lowest score is optimal: the proof is the run itself. If a
//! stage would keep more than [`Limits::max_states`] partial solutions, the ones with the best
//! bound are kept and the result is reported as feasible with a lower bound instead.
//!
//! Ties: dominance keeps the cheaper of two equal-score partial solutions, and within a class
//! an item is dropped when a cheaper one scores no worse (between equal-cost, equal-score items
//! the one listed last is kept, i.e. the format with more bits).
//!
//! Floating point: scores are summed in class order everywhere (dynamic program, incumbent,
//! [`Mckp::score_of`]), so the reported objective is exactly the sum of the chosen items in class
//! order, and dominance (monotone under rounding) never drops a solution whose sum is lower.
//! Bound pruning is loosened by a relative 1e-9 so that rounding in the LP bound cannot drop an
//! optimal solution.

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_states: 1 << 20 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
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
    /// Σ chosen scores in class order.
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

/// A class after preprocessing: the non-dominated items sorted by cost (scores strictly
/// decreasing), and the indices (into `items`) of its lower convex hull.
#[derive(Debug, Clone)]
struct Prepared {
    /// `(cost, score, original index)`.
    items: Vec<(u128, f64, usize)>,
    hull: Vec<usize>,
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

/// The LP relaxation of a set of classes (a suffix), as a function of the capacity.
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
}

struct Prepro {
    classes: Vec<Prepared>,
    /// All hull segments, best rate first (ties: class, then position).
    segments: Vec<Segment>,
    /// Scale for the pruning tolerance: Σ over classes of the largest |score|.
    magnitude: f64,
}

fn prepare(m: &Mckp) -> Prepro {
    let mut classes = Vec::with_capacity(m.classes.len());
    let mut magnitude = 0.0f64;
    for items in &m.classes {
        assert!(!items.is_empty(), "every class needs at least one item");
        magnitude += items.iter().map(|it| it.score.abs()).fold(0.0, f64::max);
        let mut sorted: Vec<(u128, f64, usize)> =
            items.iter().enumerate().map(|(i, it)| (it.cost, it.score, i)).collect();
        // Cost ascending, score ascending, later index first (more bits wins a full tie).
        sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(b.2.cmp(&a.2)));
        let mut kept: Vec<(u128, f64, usize)> = Vec::with_capacity(sorted.len());
        for it in sorted {
            if kept.last().is_none_or(|last| it.1 < last.1) {
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
            let dcost = b.0 - a.0;
            let gain = a.1 - b.1;
            // Convexity makes rates decrease along a hull; clamp so rounding cannot reorder them.
            let rate = (gain / dcost as f64).min(prev_rate);
            prev_rate = rate;
            segments.push(Segment { class: c, pos, dcost, gain, rate });
        }
    }
    segments.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(a.class.cmp(&b.class)).then(a.pos.cmp(&b.pos)));
    Prepro { classes, segments, magnitude }
}

/// Lower convex hull of points sorted by cost with strictly decreasing score.
fn lower_hull(items: &[(u128, f64, usize)]) -> Vec<usize> {
    let mut hull: Vec<usize> = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        while hull.len() >= 2 {
            let o = items[hull[hull.len() - 2]];
            let a = items[hull[hull.len() - 1]];
            let b = items[i];
            let cross = (a.0 - o.0) as f64 * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0) as f64;
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
    /// The LP relaxation of classes `from..`.
    fn relaxation(&self, from: usize) -> Relaxation {
        let mut base_cost = 0u128;
        let mut base_score = 0.0;
        for p in &self.classes[from..] {
            base_cost += p.items[0].0;
            base_score += p.items[0].1;
        }
        let segments: Vec<Segment> = self.segments.iter().filter(|s| s.class >= from).copied().collect();
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
        self.classes.iter().map(|p| p.items[0].0).sum()
    }

    /// Prepared-item index per class → (cost, score summed in class order).
    fn evaluate(&self, pick: &[usize]) -> (u128, f64) {
        let mut cost = 0u128;
        let mut score = 0.0;
        for (p, &i) in self.classes.iter().zip(pick) {
            cost += p.items[i].0;
            score += p.items[i].1;
        }
        (cost, score)
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
        let mut pick: Vec<usize> =
            self.classes.iter().zip(&hull_pos).map(|(p, &h)| p.hull[h]).collect();
        for _ in 0..4 * self.classes.len() + 16 {
            let mut best: Option<(f64, usize, usize)> = None;
            for (c, p) in self.classes.iter().enumerate() {
                let (cur_cost, cur_score, _) = p.items[pick[c]];
                for (i, &(cost, score, _)) in p.items.iter().enumerate() {
                    let gain = cur_score - score;
                    let fits = cost <= cur_cost || cost - cur_cost <= left;
                    if gain > 0.0 && fits && best.is_none_or(|b| gain > b.0) {
                        best = Some((gain, c, i));
                    }
                }
            }
            let Some((_, c, i)) = best else { break };
            let p = &self.classes[c];
            left = left + p.items[pick[c]].0 - p.items[i].0;
            pick[c] = i;
        }
        pick
    }
}

/// One partial solution: its cost, score, and where it came from.
#[derive(Debug, Clone, Copy)]
struct State {
    cost: u128,
    score: f64,
    bound: f64,
    parent: u32,
    item: u8,
}

/// Smallest Σ cost over all choices.
pub fn min_cost(m: &Mckp) -> u128 {
    m.classes.iter().map(|items| items.iter().map(|it| it.cost).min().unwrap_or(0)).sum()
}

impl Mckp {
    /// Σ cost and Σ score (in class order) of a choice of item indices.
    pub fn score_of(&self, choice: &[usize]) -> (u128, f64) {
        let mut cost = 0u128;
        let mut score = 0.0;
        for (items, &i) in self.classes.iter().zip(choice) {
            cost += items[i].cost;
            score += items[i].score;
        }
        (cost, score)
    }
}

/// Solves the instance exactly (see the module doc); `None` when no choice fits `capacity`.
pub fn solve(m: &Mckp, capacity: u128, limits: &Limits) -> Option<Solution> {
    let pre = prepare(m);
    if pre.min_cost() > capacity {
        return None;
    }
    let n = pre.classes.len();
    let lp_bound = pre.relaxation(0).value(capacity).expect("min cost fits");
    let start = pre.incumbent(capacity);
    let (_, initial_incumbent) = pre.evaluate(&start);
    let upper = initial_incumbent;
    let tol = 1e-9 * (upper.abs().max(pre.magnitude)) + f64::MIN_POSITIVE;

    let mut stats = Stats::default();
    let mut states = vec![State { cost: 0, score: 0.0, bound: lp_bound, parent: 0, item: 0 }];
    let mut history: Vec<Vec<(u32, u8)>> = Vec::with_capacity(n);
    // Lowest bound among partial solutions dropped by the state limit (not by proof).
    let mut dropped_bound = f64::INFINITY;
    let mut candidates: Vec<State> = Vec::new();
    for k in 0..n {
        let rest = pre.relaxation(k + 1);
        let items = &pre.classes[k].items;
        candidates.clear();
        for (pi, s) in states.iter().enumerate() {
            for (ii, &(cost, score, _)) in items.iter().enumerate() {
                stats.generated += 1;
                let cost = s.cost + cost;
                let score = s.score + score;
                let Some(rest_value) = capacity.checked_sub(cost).and_then(|left| rest.value(left)) else {
                    stats.pruned_by_bound += 1;
                    continue;
                };
                let bound = score + rest_value;
                if bound > upper + tol {
                    stats.pruned_by_bound += 1;
                    continue;
                }
                candidates.push(State { cost, score, bound, parent: pi as u32, item: ii as u8 });
            }
        }
        candidates.sort_by(|a, b| {
            a.cost.cmp(&b.cost).then(a.score.total_cmp(&b.score)).then(a.parent.cmp(&b.parent)).then(a.item.cmp(&b.item))
        });
        let mut kept: Vec<State> = Vec::with_capacity(candidates.len());
        for c in &candidates {
            if kept.last().is_none_or(|last| c.score < last.score) {
                kept.push(*c);
            } else {
                stats.pruned_by_dominance += 1;
            }
        }
        if kept.len() > limits.max_states {
            // Keep the best bounds; remember the best bound given up.
            let mut order: Vec<usize> = (0..kept.len()).collect();
            order.sort_by(|&a, &b| kept[a].bound.total_cmp(&kept[b].bound).then(a.cmp(&b)));
            let mut keep = vec![false; kept.len()];
            for &i in &order[..limits.max_states] {
                keep[i] = true;
            }
            for &i in &order[limits.max_states..] {
                dropped_bound = dropped_bound.min(kept[i].bound);
            }
            let mut i = 0;
            kept.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        stats.max_kept = stats.max_kept.max(kept.len());
        history.push(kept.iter().map(|s| (s.parent, s.item)).collect());
        states = kept;
    }

    let pick = match states.last() {
        Some(_) => {
            // Scores strictly decrease with cost, so the last state is the best.
            let mut pick = vec![0usize; n];
            let mut idx = states.len() - 1;
            for k in (0..n).rev() {
                let (parent, item) = history[k][idx];
                pick[k] = item as usize;
                idx = parent as usize;
            }
            let (_, score) = pre.evaluate(&pick);
            if score <= initial_incumbent { pick } else { start }
        }
        // Only possible when the state limit dropped every survivor.
        None => start,
    };
    let (cost, score) = pre.evaluate(&pick);
    let proved = dropped_bound == f64::INFINITY;
    let lower_bound = if proved { score } else { dropped_bound.min(score).max(lp_bound) };
    let choice = pick.iter().zip(&pre.classes).map(|(&i, p)| p.items[i].2).collect();
    Some(Solution { choice, cost, score, proved, lower_bound, lp_bound, initial_incumbent, stats })
}

/// A vertex of the LP relaxation's frontier: an integral solution that is optimal for a budget
/// equal to its own cost.
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
    let to_choice = |hp: &[usize]| -> Vec<usize> {
        pre.classes.iter().zip(hp).map(|(p, &h)| p.items[p.hull[h]].2).collect()
    };
    let point = |hp: &[usize]| {
        let pick: Vec<usize> = pre.classes.iter().zip(hp).map(|(p, &h)| p.hull[h]).collect();
        let (cost, score) = pre.evaluate(&pick);
        HullPoint { cost, score, choice: to_choice(hp) }
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
    let mut states = vec![ParetoPoint { cost: 0, score: 0.0, counted: 0 }];
    let mut rest_min: u128 = pre.min_cost();
    let mut candidates = Vec::new();
    for (k, p) in pre.classes.iter().enumerate() {
        rest_min -= p.items[0].0;
        candidates.clear();
        for s in &states {
            for &(cost, score, orig) in &p.items {
                let cost = s.cost + cost;
                if cost + rest_min > capacity {
                    continue;
                }
                let counted = s.counted + usize::from(counted(k, orig));
                candidates.push(ParetoPoint { cost, score: s.score + score, counted });
            }
        }
        candidates.sort_by(|a, b| a.cost.cmp(&b.cost).then(a.score.total_cmp(&b.score)).then(a.counted.cmp(&b.counted)));
        states.clear();
        for c in &candidates {
            if states.last().is_none_or(|last: &ParetoPoint| c.score < last.score) {
                states.push(*c);
            }
        }
        if states.len() > max_states {
            return None;
        }
    }
    Some(states)
}

/// Exhaustive search (for tests and tiny instances): the lowest score in class order, ties to
/// the lower cost, then the lexicographically smallest choice.
pub fn brute_force(m: &Mckp, capacity: u128) -> Option<(Vec<usize>, u128, f64)> {
    let n = m.classes.len();
    let mut choice = vec![0usize; n];
    let mut best: Option<(Vec<usize>, u128, f64)> = None;
    loop {
        let (cost, score) = m.score_of(&choice);
        if cost <= capacity {
            let better = match &best {
                None => true,
                Some((_, bc, bs)) => match score.total_cmp(bs) {
                    Ordering::Less => true,
                    Ordering::Equal => cost < *bc,
                    Ordering::Greater => false,
                },
            };
            if better {
                best = Some((choice.clone(), cost, score));
            }
        }
        // Next choice (odometer).
        let mut k = 0;
        loop {
            if k == n {
                return best;
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

    #[test]
    fn state_limit_gives_a_feasible_answer_with_a_valid_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let classes: Vec<Vec<Item>> = (0..12)
            .map(|_| (0..3).map(|_| Item { cost: rng.random_range(1..50), score: rng.random_range(0.0..10.0) }).collect())
            .collect();
        let m = Mckp { classes };
        let cap = 250;
        let (_, _, best) = brute_force(&m, cap).unwrap();
        let s = solve(&m, cap, &Limits { max_states: 2 }).unwrap();
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
