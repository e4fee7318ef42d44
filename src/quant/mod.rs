//! Quantization numerics and layer grouping: the one home of FP8 arithmetic, of the format
//! abstraction and of the rules that decide which layers share a format.
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod format;
pub mod fp8;
pub mod groups;
pub mod mx;
pub mod nvfp4;
pub mod sensitivity;
pub mod served;

pub use format::{format_by_name, Format, Fp8PerTensor, WeightStats, NONE, NONE_BITS};
pub use groups::{Group, GroupingRules, NamePatterns};
