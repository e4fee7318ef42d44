//! Quantization numerics and layer grouping: the one home of each format's arithmetic (`fp8`,
//! `int`, AWQ smoothing in `awq`, SmoothQuant's in `smoothquant`), of the format abstraction and of the rules that decide which
//! layers share a format.
pub mod awq;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod format;
pub mod fp8;
pub mod groups;
pub mod host;
pub mod int;
pub mod mx;
pub mod nvfp4;
pub mod sensitivity;
pub mod served;
pub mod smoothquant;

pub use format::{format_by_name, Calibration, Format, Fp8PerTensor, WeightStats, KNOWN_FORMATS, NONE, NONE_BITS};
pub use groups::{Group, GroupingRules, NamePatterns};
