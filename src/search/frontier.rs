//! The frontier: minimum objective as a function of the effective-bits budget, from the same
//! scores (no rescoring).
//!
//! Points come from three exact sources: the optimum at every grid budget (`step` apart, from
//! the smallest achievable bits to 16), every vertex of the LP relaxation's frontier (integral,
//! hence optimal for a budget equal to its own bits: these are the breakpoints the LP sees,
//! ≤ Σ hull edges of them), and, when asked and small enough, the exhaustive Pareto set (every
//! breakpoint). All are optima for their budget, so the merged list is non-increasing in the
//! budget; the only float effect is that two different optimal recipes can sum to values one
//! rounding apart, which the merge resolves by carrying the better recipe forward (it is
//! feasible for every larger budget).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::problem::{Problem, Recipe};
use super::solver::{self, Limits};
use crate::artifact::manifest::{Frontier, FrontierPoint};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrontierOptions {
    /// Grid step in bits.
    pub step: f64,
    /// Also enumerate the exact Pareto set (kept when it has at most `max_pareto_points`).
    pub exhaustive: bool,
    pub max_pareto_points: usize,
    pub limits: Limits,
}

impl Default for FrontierOptions {
    fn default() -> Self {
        FrontierOptions { step: 0.05, exhaustive: false, max_pareto_points: 20_000, limits: Limits::default() }
    }
}

fn quantized(problem: &Problem, choice: &[usize]) -> usize {
    choice.iter().filter(|&&f| f != problem.none_index()).count()
}

/// Groups per format (in the problem's format order) of a recipe.
fn mix(problem: &Problem, choice: &[usize]) -> Vec<usize> {
    let mut counts = vec![0; problem.none_index() + 1];
    for &f in choice {
        counts[f] += 1;
    }
    counts
}

/// Kind priority when two points answer the same budget.
fn priority(kind: &str) -> u8 {
    match kind {
        "chosen" => 0,
        "grid" => 1,
        "pareto" => 2,
        _ => 3,
    }
}

/// Builds the frontier around the chosen recipe (for `target_bits`).
pub fn frontier(problem: &Problem, target_bits: f64, chosen: &Recipe, opts: &FrontierOptions) -> Result<Frontier> {
    ensure!(opts.step.is_finite() && opts.step > 0.0, "the sweep step must be a positive number, got {}", opts.step);
    let min_units = solver::min_cost(problem.mckp());
    let min_bits = problem.bits_of_units(min_units);
    let first = (min_bits / opts.step).ceil() as i64;
    let last = (16.0 / opts.step).floor() as i64;
    ensure!(last - first < 100_000, "the sweep step {} gives too many grid points", opts.step);
    let mut budgets: Vec<(f64, u128)> = vec![(min_bits, min_units)];
    for k in first..=last {
        let bits = k as f64 * opts.step;
        let cap = problem.capacity(bits)?;
        if bits > min_bits && cap >= min_units {
            budgets.push((bits, cap));
        }
    }
    if min_bits < 16.0 {
        budgets.push((16.0, problem.capacity(16.0)?));
    }

    let grid: Vec<FrontierPoint> = budgets
        .par_iter()
        .map(|&(bits, cap)| {
            let r = problem.solve_units(cap, &opts.limits).expect("capacity ≥ minimum cost");
            FrontierPoint {
                budget_bits: bits,
                effective_bits: r.effective_bits,
                objective: r.objective,
                quantized_groups: quantized(problem, &r.choice),
                groups_per_format: mix(problem, &r.choice),
                kind: "grid".into(),
                proved: r.proved,
            }
        })
        .collect();

    let mut points = grid;
    points.push(FrontierPoint {
        budget_bits: target_bits,
        effective_bits: chosen.effective_bits,
        objective: chosen.objective,
        quantized_groups: quantized(problem, &chosen.choice),
        groups_per_format: mix(problem, &chosen.choice),
        kind: "chosen".into(),
        proved: chosen.proved,
    });
    for h in solver::hull_points(problem.mckp()) {
        let choice: Vec<usize> = h.choice.iter().enumerate().map(|(g, &i)| problem.format_of(g, i)).collect();
        let bits = problem.bits_of_units(h.cost);
        points.push(FrontierPoint {
            budget_bits: bits,
            effective_bits: bits,
            objective: h.score,
            quantized_groups: quantized(problem, &choice),
            groups_per_format: mix(problem, &choice),
            kind: "hull".into(),
            proved: true,
        });
    }
    let mut pareto_points = None;
    if opts.exhaustive {
        let cap = problem.capacity(16.0)?.max(min_units);
        let none = problem.none_index();
        let counted = |g: usize, i: usize| problem.format_of(g, i) != none;
        if let Some(front) = solver::pareto_frontier(problem.mckp(), cap, opts.max_pareto_points * 4, counted) {
            pareto_points = Some(front.len());
            if front.len() <= opts.max_pareto_points {
                for p in front {
                    let bits = problem.bits_of_units(p.cost);
                    points.push(FrontierPoint {
                        budget_bits: bits,
                        effective_bits: bits,
                        objective: p.score,
                        quantized_groups: p.counted,
                        groups_per_format: Vec::new(),
                        kind: "pareto".into(),
                        proved: true,
                    });
                }
            }
        }
    }

    points.sort_by(|a, b| a.budget_bits.total_cmp(&b.budget_bits).then(priority(&a.kind).cmp(&priority(&b.kind))));
    points.dedup_by(|later, earlier| later.budget_bits == earlier.budget_bits);
    // Carry the best recipe forward (see the module doc).
    for i in 1..points.len() {
        let prev = points[i - 1].clone();
        let p = &mut points[i];
        if p.objective > prev.objective {
            p.effective_bits = prev.effective_bits;
            p.objective = prev.objective;
            p.quantized_groups = prev.quantized_groups;
            p.proved &= prev.proved;
        }
    }
    let chosen_idx = points.iter().position(|p| p.kind == "chosen").expect("chosen point is kept");
    let exhaustive = opts.exhaustive && pareto_points.is_some_and(|n| n <= opts.max_pareto_points);
    Ok(Frontier { step: opts.step, exhaustive, pareto_points, points, chosen: chosen_idx })
}
