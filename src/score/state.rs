//! Turning per-sample contributions into a `qsens.scores` artifact, and back: resuming from a
//! partial artifact and merging shards.
//!
//! A run's state *is* a scores artifact: the samples scored so far with their per-sample
//! contributions and the calibrated amax. Totals are always recomputed from the per-sample
//! contributions in sample order, so an interrupted-and-resumed run, a merge of shards, and an
//! uninterrupted run produce byte-identical artifacts.

use anyhow::{bail, ensure, Context, Result};

use crate::artifact::scores::{GroupScores, LayerScores, SampleSummary, Scores};
use crate::artifact::{Artifact, Location, Provenance};

/// Recomputes every group's totals from the per-sample contributions.
///
/// For methods with per-layer contributions (gradient), a group's per-sample contribution is the
/// sum of its members' (in member order); for group-level methods (kl_div) the group's own
/// per-sample values are kept. Totals sum samples in order, then are made monotone across formats
/// (fewest bits first, each score the min of itself and the previous one; NONE = 0), as ModelOpt.
pub fn recompute_totals(scores: &mut Scores) {
    let num_formats = scores.formats.len();
    let num_samples = scores.samples.len();
    let per_layer = scores.has_layer_contributions();
    let layer_index: std::collections::HashMap<&str, &LayerScores> =
        scores.layers.iter().map(|l| (l.name.as_str(), l)).collect();
    for group in &mut scores.groups {
        if group.disabled {
            group.per_sample = vec![Vec::new(); num_formats];
            group.scores = vec![0.0; num_formats];
            continue;
        }
        if per_layer {
            let members: Vec<&LayerScores> = group.members.iter().map(|m| layer_index[m.as_str()]).collect();
            group.per_sample = (0..num_formats)
                .map(|f| {
                    (0..num_samples)
                        .map(|k| {
                            members.iter().fold(0.0, |acc, l| acc + l.per_sample[f].get(k).copied().unwrap_or(0.0))
                        })
                        .collect()
                })
                .collect();
        }
        let mut prev = f64::INFINITY;
        group.scores = (0..num_formats)
            .map(|f| {
                let total = group.per_sample.get(f).map_or(0.0, |v| v.iter().fold(0.0, |a, b| a + b));
                let s = total.min(prev);
                prev = s;
                s
            })
            .collect();
    }
}

/// Appends one scored sample: per-layer contributions `[layer][format]` (gradient) or per-group
/// contributions `[group][format]` (kl_div), keeping samples sorted by index.
pub fn push_sample(
    scores: &mut Scores,
    sample: SampleSummary,
    layer_values: Option<&[Vec<f64>]>,
    group_values: Option<&[Vec<f64>]>,
) {
    let pos = scores.samples.partition_point(|s| s.index < sample.index);
    scores.samples.insert(pos, sample);
    if let Some(values) = layer_values {
        for (layer, v) in scores.layers.iter_mut().zip(values) {
            for (f, x) in v.iter().enumerate() {
                layer.per_sample[f].insert(pos, *x);
            }
        }
    }
    if let Some(values) = group_values {
        for (group, v) in scores.groups.iter_mut().zip(values) {
            if group.disabled {
                continue;
            }
            for (f, x) in v.iter().enumerate() {
                group.per_sample[f].insert(pos, *x);
            }
        }
    }
}

/// Checks that a saved state was made by the same run (same inputs, model and settings).
pub fn check_resumable(state: &Artifact<Scores>, provenance: &Provenance, location: &Location) -> Result<()> {
    if state.provenance != *provenance {
        let diff = describe_difference(&state.provenance, "saved", provenance, "this run");
        bail!("{location}: saved state comes from a different run ({diff})");
    }
    check_consistent(&state.payload).with_context(|| format!("{location}"))
}

/// Checks the internal consistency that resuming and merging rely on: one row per format in
/// every per-sample table, one value per scored sample in every row, scored samples in
/// increasing index order below `num_inputs`, group members that are layers.
pub fn check_consistent(scores: &Scores) -> Result<()> {
    let nf = scores.formats.len();
    let ns = scores.samples.len();
    ensure!(nf > 0, "no formats");
    ensure!(
        scores.samples.windows(2).all(|w| w[0].index < w[1].index)
            && scores.samples.last().is_none_or(|s| s.index < scores.num_inputs),
        "scored samples are not in increasing index order below num_inputs {}",
        scores.num_inputs
    );
    let per_layer = scores.has_layer_contributions();
    let layers: std::collections::HashSet<&str> = scores.layers.iter().map(|l| l.name.as_str()).collect();
    ensure!(layers.len() == scores.layers.len(), "a layer name appears twice");
    for l in &scores.layers {
        let rows_ok = if per_layer { l.per_sample.len() == nf } else { l.per_sample.is_empty() };
        ensure!(
            rows_ok && l.per_sample.iter().all(|r| r.len() == ns),
            "layer '{}': per-sample table is not [{nf}][{ns}]",
            l.name
        );
    }
    for g in &scores.groups {
        ensure!(
            g.scores.len() == nf && g.costs.len() == nf,
            "group '{}': scores or costs are not one per format",
            g.name
        );
        if per_layer {
            let known = g.members.iter().all(|m| layers.contains(m.as_str()));
            ensure!(known, "group '{}': a member is not a layer", g.name);
        }
        // Group rows are filled by `push_sample` (kl_div) or `recompute_totals` (gradient);
        // disabled groups, and gradient groups before the totals, keep empty rows.
        let rows_ok = g.per_sample.len() == nf
            && g.per_sample.iter().all(|r| r.len() == ns || ((g.disabled || per_layer) && r.is_empty()));
        ensure!(rows_ok, "group '{}': per-sample table is not [{nf}][{ns}]", g.name);
    }
    Ok(())
}

/// The first difference between two provenances, naming each side (`a_name`, `b_name`).
fn describe_difference(a: &Provenance, a_name: &str, b: &Provenance, b_name: &str) -> String {
    for s in &b.sources {
        match a.sources.iter().find(|t| t.role == s.role) {
            Some(t) if t.digest != s.digest => return format!("{} differs", s.role),
            None => return format!("{} is not recorded in {a_name}", s.role),
            _ => {}
        }
    }
    for (k, v) in &b.parameters {
        if a.parameters.get(k) != Some(v) {
            return format!("parameter {k}: {a_name} {:?}, {b_name} {v:?}", a.parameters.get(k));
        }
    }
    "provenance differs".into()
}

/// Merges shard artifacts (disjoint sample subsets of one run) into one artifact equal to the
/// unsharded run's.
pub fn merge_shards(shards: Vec<(Location, Artifact<Scores>)>) -> Result<Artifact<Scores>> {
    ensure!(!shards.is_empty(), "no shards to merge");
    let strip = |p: &Provenance| {
        let mut p = p.clone();
        p.parameters.remove("shard");
        p
    };
    for (loc, shard) in &shards {
        check_consistent(&shard.payload).with_context(|| format!("{loc}"))?;
    }
    let (first_loc, first) = &shards[0];
    let provenance = strip(&first.provenance);
    let mut merged = first.clone();
    merged.provenance = provenance.clone();
    for (loc, shard) in &shards[1..] {
        if strip(&shard.provenance) != provenance {
            bail!(
                "{loc}: not a shard of the same run as {first_loc} ({})",
                describe_difference(&provenance, &first_loc.to_string(), &strip(&shard.provenance), &loc.to_string())
            );
        }
        let same_shape = shard.payload.layers.len() == merged.payload.layers.len()
            && shard.payload.groups.len() == merged.payload.groups.len()
            && shard.payload.formats == merged.payload.formats
            && shard.payload.method == merged.payload.method
            && shard.payload.num_inputs == merged.payload.num_inputs
            && shard
                .payload
                .groups
                .iter()
                .zip(&merged.payload.groups)
                .all(|(a, b)| a.name == b.name && a.members == b.members && a.disabled == b.disabled)
            && shard
                .payload
                .layers
                .iter()
                .zip(&merged.payload.layers)
                .all(|(a, b)| a.name == b.name && a.input_amax.to_bits() == b.input_amax.to_bits());
        ensure!(same_shape, "{loc}: layers or calibration differ from {first_loc}");
        let per_layer = merged.payload.has_layer_contributions();
        for (k, sample) in shard.payload.samples.iter().enumerate() {
            if merged.payload.samples.iter().any(|s| s.index == sample.index) {
                bail!("{loc}: sample {} ({}) is also in another shard", sample.index, sample.id);
            }
            let values: Vec<Vec<f64>> = if per_layer {
                shard.payload.layers.iter().map(|l| l.per_sample.iter().map(|v| v[k]).collect()).collect()
            } else {
                shard
                    .payload
                    .groups
                    .iter()
                    .map(|g| g.per_sample.iter().map(|v| v.get(k).copied().unwrap_or(0.0)).collect())
                    .collect()
            };
            let (layers, groups) =
                if per_layer { (Some(values.as_slice()), None) } else { (None, Some(values.as_slice())) };
            push_sample(&mut merged.payload, sample.clone(), layers, groups);
        }
    }
    let n = merged.payload.num_inputs;
    let got: Vec<usize> = merged.payload.samples.iter().map(|s| s.index).collect();
    if !got.iter().copied().eq(0..n) {
        bail!(
            "the shards cover {} of {n} samples (missing sample indices {}): a shard is missing",
            got.len(),
            missing_indices(&got, n)
        );
    }
    recompute_totals(&mut merged.payload);
    Ok(merged)
}

/// The first few indices of `0..n` absent from the sorted `got`, without walking all of `0..n`
/// (`n` comes from the artifact and may be absurd).
fn missing_indices(got: &[usize], n: usize) -> String {
    const SHOWN: usize = 8;
    let mut got = got.to_vec();
    got.sort_unstable();
    got.dedup();
    let mut missing = Vec::new();
    let mut next = 0;
    for &i in got.iter().chain(std::iter::once(&n)) {
        while next < i.min(n) && missing.len() < SHOWN {
            missing.push(next);
            next += 1;
        }
        next = next.max(i.saturating_add(1));
        if missing.len() == SHOWN {
            break;
        }
    }
    let total = n.saturating_sub(got.iter().filter(|&&i| i < n).count());
    let list: Vec<String> = missing.iter().map(|i| i.to_string()).collect();
    if total > missing.len() {
        format!("[{}, …] ({total} in all)", list.join(", "))
    } else {
        format!("[{}]", list.join(", "))
    }
}

impl Scores {
    /// True when every input sample has been scored.
    pub fn is_complete(&self) -> bool {
        self.samples.len() == self.num_inputs
    }

    /// Whether contributions are kept per layer (gradient) or only per group (kl_div).
    pub fn has_layer_contributions(&self) -> bool {
        self.method == "gradient"
    }
}

/// Empty group scores for a fresh run.
pub fn empty_group(
    name: String,
    members: Vec<String>,
    params: u64,
    costs: Vec<f64>,
    disabled: bool,
    cost_excluded: bool,
) -> GroupScores {
    let num_formats = costs.len();
    GroupScores {
        name,
        members,
        params,
        costs,
        scores: vec![0.0; num_formats],
        per_sample: vec![Vec::new(); num_formats],
        disabled,
        cost_excluded,
        cost_weight: None,
    }
}

#[cfg(test)]
mod tests {
    use super::missing_indices;

    #[test]
    fn missing_indices_are_listed_without_walking_an_absurd_count() {
        assert_eq!(missing_indices(&[0, 2, 4], 5), "[1, 3]");
        assert_eq!(missing_indices(&[4, 0, 2], 6), "[1, 3, 5]");
        assert_eq!(missing_indices(&[], 3), "[0, 1, 2]");
        assert_eq!(missing_indices(&[0, 1], 12), "[2, 3, 4, 5, 6, 7, 8, 9, …] (10 in all)");
        // A fuzzed num_inputs: answered at once (this used to collect every missing index).
        assert_eq!(
            missing_indices(&[0, 1, 3], usize::MAX),
            format!("[2, 4, 5, 6, 7, 8, 9, 10, …] ({} in all)", usize::MAX - 3)
        );
    }
}
