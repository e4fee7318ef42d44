//! qsens: per-layer quantization sensitivity for vision-language models.
//!
//! The pipeline, one module per stage, each reading and writing an [`artifact`]:
//! 1. [`calib`] (`calib-extract`): SQLite calibration DB + image root → calibration samples.
//! 2. [`preprocess`] (`preprocess`): samples + HF checkpoint → model inputs, exactly as HF.
//! 3. [`score`] (`score-layers`): checkpoint + inputs → per-layer sensitivity scores.
//! 4. [`search`] (`search`): scores → per-layer formats under a bit budget → manifest.
//! 5. [`report`] (`manifest-to-md`): manifest → Markdown report with SVG plots.
//! 6. [`quantize`] (`quantize`): checkpoint + manifest → a quantized checkpoint vLLM serves.
//!
//! [`evaluate`] measures what recipes really do (loss, KL, top-1 agreement on held-out samples);
//! `manifest-to-md --evaluation` sets that beside the prediction.
//!
//! Shared homes: [`artifact`] (the schemas), [`model`] (Qwen3-VL forward and backward),
//! [`quant`] (FP8 numerics, formats, layer grouping), [`cli`] (flags, exit codes, progress),
//! [`device`] (`--device`, GPU memory limit, out-of-memory errors), and [`demo`] (the generated
//! demo set: images, captions and a tiny checkpoint).
pub mod artifact;
pub mod calib;
pub mod cli;
pub mod demo;
pub mod device;
pub mod evaluate;
pub mod model;
pub mod preprocess;
pub mod quant;
pub mod quantize;
pub mod report;
pub mod score;
pub mod search;
