//! Expansion of stored resized RGB bytes into HF's `pixel_values` (rescale + normalize +
//! temporal duplication + patch flattening).

use anyhow::{bail, Result};

use crate::artifact::inputs::{ImagePixels, ProcessorSettings, SampleInputs};

impl SampleInputs {
    /// HF's `pixel_values` for the whole sample: every image's [`pixel_values`] rows concatenated
    /// in token order, `[Σ t·h·w, C·T·P·P]` row-major.
    pub fn pixel_values(&self, settings: &ProcessorSettings) -> Vec<f32> {
        let mut out = Vec::new();
        for image in &self.images {
            out.extend(pixel_values(image, settings));
        }
        out
    }

    /// HF's `image_grid_thw`: one `(t, h, w)` per image, in token order.
    pub fn image_grid_thw(&self) -> Vec<[u32; 3]> {
        self.images.iter().map(|i| i.grid_thw).collect()
    }
}

/// HF's `pixel_values` rows for one image: `[grid_t·grid_h·grid_w, C·T·P·P]`, row-major.
///
/// Layout (`image_processing_qwen2_vl`): the frame is repeated `temporal_patch_size` times, viewed
/// as `(gt, T, C, gh/M, M, P, gw/M, M, P)` and permuted to rows `(gt, gh/M, gw/M, M, M)` and
/// columns `(C, T, P, P)`; so rows walk the image in merge-block order (each block's `M×M`
/// patches consecutive) and a row holds channel-major, then temporal, then patch-pixel values.
///
/// Values: HF fuses rescale and normalize into `(x − mean/r) / (std/r)` on f32 tensors, with
/// `mean/r` and `std/r` computed as f32 (`tensor(mean) * (1/r)`); for mean = std = 0.5 and
/// r = 1/255 this is bit-exactly `(u8 − 127.5f) / 127.5f`.
///
/// Panics if the image is inconsistent with `settings` (see [`check_image`], which the loaders
/// call first).
pub fn pixel_values(image: &ImagePixels, settings: &ProcessorSettings) -> Vec<f32> {
    if let Err(e) = check_image(image, settings) {
        panic!("pixel_values: {e:#}");
    }
    let p = settings.patch_size as usize;
    let m = settings.merge_size as usize;
    let t = settings.temporal_patch_size as usize;
    let [gt, gh, gw] = image.grid_thw.map(|v| v as usize);
    let width = image.width as usize;
    let lut = normalization_lut(settings);
    let cols = 3 * t * p * p;
    let mut out = vec![0f32; gt * gh * gw * cols];
    let mut row = 0;
    for _ in 0..gt {
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let dst = &mut out[row * cols..(row + 1) * cols];
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for py in 0..p {
                                let src = &image.rgb[((y0 + py) * width + x0) * 3..];
                                for px in 0..p {
                                    let v = lut[c][src[px * 3 + c] as usize];
                                    for tt in 0..t {
                                        dst[((c * t + tt) * p + py) * p + px] = v;
                                    }
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
    }
    out
}

/// Checks that an image's grid, size and byte count agree with the processor settings.
pub fn check_image(image: &ImagePixels, settings: &ProcessorSettings) -> Result<()> {
    let p = settings.patch_size;
    let m = settings.merge_size;
    let [gt, gh, gw] = image.grid_thw;
    if p == 0 || m == 0 || settings.temporal_patch_size == 0 {
        bail!("processor settings have a zero patch, merge or temporal size");
    }
    if gt != 1 {
        bail!("image grid_t is {gt}; a still image has grid_t = 1");
    }
    // In u64: a crafted grid times the patch size must not overflow.
    let (gh64, gw64, p64) = (gh as u64, gw as u64, p as u64);
    if gh64 * p64 != image.height as u64 || gw64 * p64 != image.width as u64 || gh % m != 0 || gw % m != 0 {
        bail!(
            "image grid {:?} does not match its size {}×{} (patch {p}, merge {m})",
            image.grid_thw,
            image.width,
            image.height
        );
    }
    if image.rgb.len() != image.height as usize * image.width as usize * 3 {
        bail!("image has {} RGB bytes, expected {}×{}×3", image.rgb.len(), image.width, image.height);
    }
    Ok(())
}

/// `lut[c][u8]` = the normalised f32 value of byte `u8` in channel `c`.
pub fn normalization_lut(settings: &ProcessorSettings) -> [[f32; 256]; 3] {
    let inv_rescale = (1.0 / settings.rescale_factor) as f32;
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        let mean = settings.image_mean[c] as f32 * inv_rescale;
        let std = settings.image_std[c] as f32 * inv_rescale;
        for (v, out) in table.iter_mut().enumerate() {
            *out = (v as f32 - mean) / std;
        }
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ProcessorSettings {
        ProcessorSettings {
            patch_size: 2,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 0,
            max_pixels: u64::MAX,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }

    #[test]
    fn half_half_normalisation_is_bit_exact() {
        let lut = normalization_lut(&settings());
        for (v, got) in lut[1].iter().enumerate() {
            assert_eq!(got.to_bits(), ((v as f32 - 127.5f32) / 127.5f32).to_bits());
        }
    }

    #[test]
    fn layout_follows_hf_permutation() {
        // 4×8 image (grid 2×4, patch 2, merge 2): pixel value encodes (y, x, c).
        let (h, w) = (4usize, 8usize);
        let rgb: Vec<u8> = (0..h * w * 3).map(|i| i as u8).collect();
        let img = ImagePixels { grid_thw: [1, 2, 4], height: h as u32, width: w as u32, rgb: rgb.clone() };
        let s = ProcessorSettings { rescale_factor: 1.0, image_mean: [0.0; 3], image_std: [1.0; 3], ..settings() };
        let pv = pixel_values(&img, &s);
        let cols = 3 * 2 * 2 * 2;
        assert_eq!(pv.len(), 8 * cols);
        // Reference by the definition: reshape(gt,T,C,gh/M,M,P,gw/M,M,P).permute(0,3,6,4,7,2,1,5,8).
        let (p, m) = (2, 2);
        let mut row = 0;
        for bh in 0..1 {
            for bw in 0..2 {
                for mh in 0..m {
                    for mw in 0..m {
                        for c in 0..3 {
                            for t in 0..2 {
                                for py in 0..p {
                                    for px in 0..p {
                                        let y = (bh * m + mh) * p + py;
                                        let x = (bw * m + mw) * p + px;
                                        let col = ((c * 2 + t) * p + py) * p + px;
                                        assert_eq!(pv[row * cols + col], rgb[(y * w + x) * 3 + c] as f32);
                                    }
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
    }
}
