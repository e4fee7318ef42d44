//! Layer grouping and name patterns: the one place that decides which layers share a format.
//!
//! Defaults are ModelOpt's `quant_grouping_rules`: the q/k/v projections of one attention form
//! one group and gate/up of one MLP another (inference engines fuse them, so they must share a
//! format); every other layer is alone. A rule is a regex whose first capture group is the group
//! key; the first matching rule wins. A group is named after its first member (as ModelOpt names
//! its hparams), and groups are ordered by their first member's position in the model.

use std::collections::HashMap;

use anyhow::{Context, Result};
use globset::{Glob, GlobMatcher};
use regex::Regex;

/// ModelOpt 0.47's default grouping regexes (the MoE ones are inert for dense models).
pub const DEFAULT_RULES: &[&str] = &[
    r"^(.*?)\.(q_proj|k_proj|v_proj)$",
    r"^(.*?\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$",
    r"^(.*?\.mixer\.experts)\.\d+\.(up_proj|down_proj)$",
    r"^(.*?\.mlp\.experts\.local_experts)\.\d+\.(linear_fc1|linear_fc2)$",
    r"^(.*?)\.(gate_proj|up_proj)$",
    r"^(.*?)\.(\d+\.(w1|w2|w3))$",
    r"^(.*?)\.((w1_linear|w2_linear|w3_linear)\.\d+)$",
];

/// A group of layers that take the same format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The first member's name.
    pub name: String,
    /// Indices into the layer list, in model order.
    pub members: Vec<usize>,
}

/// Grouping rules (regexes with the group key as capture group 1).
#[derive(Debug, Clone)]
pub struct GroupingRules {
    rules: Vec<Regex>,
}

impl Default for GroupingRules {
    fn default() -> Self {
        GroupingRules::new(DEFAULT_RULES.iter().copied()).expect("default grouping rules are valid")
    }
}

impl GroupingRules {
    /// Rules from regex strings; each must have a capture group.
    pub fn new<'a>(rules: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let rules = rules
            .into_iter()
            .map(|r| {
                let re = Regex::new(r).with_context(|| format!("invalid grouping rule '{r}'"))?;
                anyhow::ensure!(re.captures_len() > 1, "grouping rule '{r}' has no capture group for the group key");
                Ok(re)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GroupingRules { rules })
    }

    /// The group key of a layer name (the name itself when no rule matches).
    pub fn key<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        for re in &self.rules {
            if let Some(c) = re.captures(name) {
                if let Some(m) = c.get(1) {
                    return std::borrow::Cow::Owned(m.as_str().to_string());
                }
            }
        }
        std::borrow::Cow::Borrowed(name)
    }

    /// Groups the layers, preserving model order.
    pub fn group<S: AsRef<str>>(&self, layer_names: &[S]) -> Vec<Group> {
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        for (i, name) in layer_names.iter().enumerate() {
            let key = self.key(name.as_ref()).into_owned();
            match by_key.get(&key) {
                Some(&g) => groups[g].members.push(i),
                None => {
                    by_key.insert(key, groups.len());
                    groups.push(Group { name: name.as_ref().to_string(), members: vec![i] });
                }
            }
        }
        groups
    }
}

/// A set of fnmatch-style patterns (`*`, `?`, `[...]`; `*` also matches dots), like ModelOpt's
/// `disabled_layers` and cost `excluded_module_name_patterns`.
#[derive(Debug, Clone, Default)]
pub struct NamePatterns {
    patterns: Vec<(String, GlobMatcher)>,
}

impl NamePatterns {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                let glob = Glob::new(p).with_context(|| format!("invalid name pattern '{p}'"))?;
                Ok((p.to_string(), glob.compile_matcher()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(NamePatterns { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|(_, m)| m.is_match(name))
    }

    /// True when the group name or any member name matches (ModelOpt disables a whole group
    /// when any member matches).
    pub fn matches_group<S: AsRef<str>>(&self, group: &str, members: &[S]) -> bool {
        self.matches(group) || members.iter().any(|m| self.matches(m.as_ref()))
    }

    pub fn as_strings(&self) -> Vec<String> {
        self.patterns.iter().map(|(p, _)| p.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modelopt_default_grouping() {
        let names = [
            "model.visual.blocks.0.attn.qkv",
            "model.visual.blocks.0.mlp.linear_fc1",
            "model.language_model.layers.0.self_attn.q_proj",
            "model.language_model.layers.0.self_attn.k_proj",
            "model.language_model.layers.0.self_attn.v_proj",
            "model.language_model.layers.0.self_attn.o_proj",
            "model.language_model.layers.0.mlp.gate_proj",
            "model.language_model.layers.0.mlp.up_proj",
            "model.language_model.layers.0.mlp.down_proj",
            "lm_head",
        ];
        let groups = GroupingRules::default().group(&names);
        let got: Vec<(&str, Vec<usize>)> = groups.iter().map(|g| (g.name.as_str(), g.members.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("model.visual.blocks.0.attn.qkv", vec![0]),
                ("model.visual.blocks.0.mlp.linear_fc1", vec![1]),
                ("model.language_model.layers.0.self_attn.q_proj", vec![2, 3, 4]),
                ("model.language_model.layers.0.self_attn.o_proj", vec![5]),
                ("model.language_model.layers.0.mlp.gate_proj", vec![6, 7]),
                ("model.language_model.layers.0.mlp.down_proj", vec![8]),
                ("lm_head", vec![9]),
            ]
        );
    }

    #[test]
    fn custom_rule_and_errors() {
        let rules = GroupingRules::new([r"^(.*)\.mlp\..*$"]).unwrap();
        assert_eq!(rules.key("a.mlp.linear_fc1"), "a");
        assert!(GroupingRules::new([r"^no_group$"]).is_err());
        assert!(GroupingRules::new([r"(unclosed"]).is_err());
    }

    #[test]
    fn fnmatch_patterns_cross_dots() {
        let p = NamePatterns::new(&["*lm_head*", "*visual*"]).unwrap();
        assert!(p.matches("lm_head"));
        assert!(p.matches("model.visual.blocks.0.attn.qkv"));
        assert!(!p.matches("model.language_model.layers.0.mlp.down_proj"));
        assert!(p.matches_group("g", &["x", "model.visual.merger.linear_fc1"]));
    }
}
