//! `qsens.model-inputs`: model inputs exactly as HF's Qwen3-VL processor makes them, written by
//! `preprocess`.
//!
//! Pixels are stored compactly and exactly: each image as the RGB bytes after conversion and
//! resizing (before rescale/normalize), which is what HF's processor turns into `pixel_values`
//! with a fixed affine map and a patch reshuffle. `crate::preprocess` expands them on load
//! (`SampleInputs::pixel_values`). 128 COCO samples stay in the tens of MB instead of GB of f32.

use serde::{Deserialize, Serialize};

use super::Payload;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInputs {
    /// The resolved image-processor settings the pixels were made with.
    pub processor: ProcessorSettings,
    /// Special token ids used to build the sequences.
    pub special_tokens: SpecialTokens,
    pub samples: Vec<SampleInputs>,
}

/// Image-processor settings after resolving `preprocessor_config.json` and the CLI overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessorSettings {
    pub patch_size: u32,
    pub temporal_patch_size: u32,
    pub merge_size: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub rescale_factor: f64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub image_pad: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    pub im_start: u32,
    pub im_end: u32,
}

/// One calibration sample, ready for the model (batch size 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleInputs {
    /// The calibration sample id it was made from.
    pub id: String,
    /// The rendered chat text (before `<|image_pad|>` expansion), for humans and debugging.
    pub text: String,
    pub input_ids: Vec<u32>,
    /// -100 everywhere except the assistant caption tokens and the `<|im_end|>` closing them.
    pub labels: Vec<i32>,
    pub attention_mask: Vec<u8>,
    /// 1 on image-pad tokens, 0 elsewhere (2 would be video).
    pub mm_token_type_ids: Vec<u8>,
    /// MRoPE position ids, `[3][L]` (temporal, height, width), as `get_rope_index` makes them.
    pub position_ids: Vec<Vec<i64>>,
    /// `max(position_ids) + 1 - L`.
    pub rope_delta: i64,
    /// Images in the order their `<|image_pad|>` runs appear.
    pub images: Vec<ImagePixels>,
}

/// One image after RGB conversion and resize (before rescale and normalize).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePixels {
    /// `(t, h, w)` in patches, as HF's `image_grid_thw`.
    pub grid_thw: [u32; 3],
    pub height: u32,
    pub width: u32,
    /// `height × width × 3` bytes, row-major RGB.
    #[serde(with = "serde_bytes")]
    pub rgb: Vec<u8>,
}

impl Payload for ModelInputs {
    const KIND: &'static str = "qsens.model-inputs";
    const VERSION: u32 = 1;
}
