//! Stage `evaluate`: measured loss, KL and top-1 agreement of quantization recipes on held-out
//! samples.

pub mod metrics;
