//! `qsens.calibration`: the calibration sample list written by `calib-extract`.

use serde::{Deserialize, Serialize};

use super::Payload;

/// Calibration samples: image + caption pairs with the prompt the user turn carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSet {
    /// Image root as given to `calib-extract`; image paths below are relative to it.
    pub image_root: String,
    pub samples: Vec<CalibrationSample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSample {
    /// Stable identifier, unique within the set (the DB row's sample id).
    pub id: String,
    /// Dataset split (`train2017`, `val2017`, ...).
    pub split: String,
    /// Images of the user turn, in message order (usually one).
    pub images: Vec<ImageRef>,
    /// User-turn text that follows the images.
    pub prompt: String,
    /// Assistant turn: the reference caption (the loss is taken on it).
    pub caption: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// COCO image id (or the DB's image id).
    pub image_id: i64,
    /// Path relative to the image root, `/`-separated.
    pub path: String,
    /// `sha256:<hex>` of the file bytes, checked again by `preprocess`.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
}

impl Payload for CalibrationSet {
    const KIND: &'static str = "qsens.calibration";
    const VERSION: u32 = 1;
}
