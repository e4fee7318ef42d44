//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod pipeline;
pub mod qwen;

use std::path::PathBuf;

/// The shared fixtures folder (`QSENS_FIXTURES`, default `../shared/fixtures`), or `None` when it
/// is absent; then the calling test returns early after saying so on stderr. With
/// `QSENS_REQUIRE_FIXTURES=1` (set by `.ci/run`) absence is a failure instead.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("QSENS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    if std::env::var_os("QSENS_REQUIRE_FIXTURES").is_some_and(|v| v != "0" && !v.is_empty()) {
        panic!("QSENS_REQUIRE_FIXTURES is set but no fixtures were found at {}", dir.display());
    }
    eprintln!("SKIPPED: fixtures not found at {} (set QSENS_FIXTURES)", dir.display());
    None
}

/// Returns the fixtures dir or returns from the test early (skipping it) when they are absent.
#[macro_export]
macro_rules! fixtures_or_skip {
    () => {
        match common::fixtures() {
            Some(dir) => dir,
            None => return,
        }
    };
}

/// Spearman's rank correlation (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for &k in &idx[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - mean) * (y - mean)).sum();
    let va: f64 = ra.iter().map(|x| (x - mean).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mean).powi(2)).sum();
    cov / (va * vb).sqrt()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
