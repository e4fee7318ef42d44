//! qsens: per-layer quantization sensitivity for vision-language models.
//!
//! The pipeline, one module per stage, each reading and writing an [`artifact`]:
//! 1. `calib` (`calib-extract`): SQLite calibration DB + image root → calibration samples.
//! 2. `preprocess` (`preprocess`): samples + HF checkpoint → model inputs, exactly as HF.
//! 3. `score` (`score-layers`): checkpoint + inputs → per-layer sensitivity scores.
//! 4. `search` (`search`): scores → per-layer formats under a bit budget → manifest.
//! 5. `report` (`manifest-to-md`): manifest → Markdown report with SVG plots.
//!
//! Shared homes: [`artifact`] (the schemas), [`model`] (Qwen3-VL forward and backward),
//! `quant` (FP8 numerics, formats, layer grouping), [`cli`] (flags, exit codes, progress).
pub mod artifact;
pub mod cli;
pub mod model;
pub mod report;
pub mod search;
