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
