//! `smart_resize` and the bicubic antialiased resize of HF's torchvision image-processor backend.
//!
//! HF resizes a `uint8` CHW tensor with `torchvision.transforms.v2.functional.resize(...,
//! BICUBIC, antialias=True)`. On CPU torchvision keeps uint8 (`_do_native_uint8_resize_on_cpu`)
//! and calls `_upsample_bicubic2d_aa`, i.e. PyTorch's `UpSampleKernel.cpp` /
//! `UpSampleKernelAVXAntialias.h`: Pillow's separable convolution with Keys' cubic (a = −0.5),
//! support widened by the scale when downsampling, weights normalised in f64 then quantised to
//! int16 with a per-pass precision, a horizontal pass (skipped when the width is unchanged) into a
//! clamped uint8 buffer, then a vertical pass. This module reproduces that integer arithmetic
//! bit for bit.

use anyhow::{bail, Result};

use super::decode::RgbImage;

/// HF's `smart_resize` (`models/qwen2_vl/image_processing_qwen2_vl.py`): the `(height, width)`
/// closest to the input, both multiples of `factor`, with `min_pixels ≤ h·w ≤ max_pixels`.
/// Python semantics: true division in f64, `round` ties to even, `floor`/`ceil` in f64.
pub fn smart_resize(height: u32, width: u32, factor: u32, min_pixels: u64, max_pixels: u64) -> Result<(u32, u32)> {
    if height == 0 || width == 0 {
        bail!("image has a zero dimension ({width}×{height})");
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        bail!("absolute aspect ratio must be smaller than 200, got {ratio} ({width}×{height}); HF refuses it too");
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((height as u64 * width as u64) as f64 / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (height as u64 * width as u64) as f64).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < 1.0 || w_bar < 1.0 || h_bar > u32::MAX as f64 || w_bar > u32::MAX as f64 {
        bail!("smart_resize of {width}×{height} gives an unusable size {w_bar}×{h_bar}");
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// Resizes an RGB image to `out_h × out_w` exactly as torchvision's uint8 bicubic antialiased
/// path on CPU. Identity when the size is unchanged (torchvision returns the input as is).
pub fn resize_bicubic_aa(src: &RgbImage, out_h: u32, out_w: u32) -> RgbImage {
    const C: usize = 3;
    let (in_w, in_h) = (src.width as usize, src.height as usize);
    let (out_w_, out_h_) = (out_w as usize, out_h as usize);
    let mut data = src.data.clone();
    let mut cur_w = in_w;
    if out_w_ != in_w {
        let k = Kernel::new(in_w, out_w_);
        let mut out = vec![0u8; in_h * out_w_ * C];
        for y in 0..in_h {
            let row = &data[y * in_w * C..(y + 1) * in_w * C];
            let orow = &mut out[y * out_w_ * C..(y + 1) * out_w_ * C];
            for x in 0..out_w_ {
                let (xmin, ws) = k.taps(x);
                let mut acc = [k.round; C];
                for (j, &wt) in ws.iter().enumerate() {
                    let p = &row[(xmin + j) * C..(xmin + j) * C + C];
                    for c in 0..C {
                        acc[c] += wt as i32 * p[c] as i32;
                    }
                }
                for c in 0..C {
                    orow[x * C + c] = k.finish(acc[c]);
                }
            }
        }
        data = out;
        cur_w = out_w_;
    }
    if out_h_ != in_h {
        let k = Kernel::new(in_h, out_h_);
        let stride = cur_w * C;
        let mut out = vec![0u8; out_h_ * stride];
        let mut acc = vec![0i32; stride];
        for y in 0..out_h_ {
            let (ymin, ws) = k.taps(y);
            acc.fill(k.round);
            for (j, &wt) in ws.iter().enumerate() {
                let row = &data[(ymin + j) * stride..(ymin + j + 1) * stride];
                let wt = wt as i32;
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += wt * p as i32;
                }
            }
            for (o, &a) in out[y * stride..(y + 1) * stride].iter_mut().zip(&acc) {
                *o = k.finish(a);
            }
        }
        data = out;
    }
    RgbImage { width: out_w, height: out_h, data }
}

/// Per-output-index taps of one pass: `HelperInterpBase::_compute_index_ranges_int16_weights`
/// with `HelperInterpCubic::aa_filter<double, true>`.
struct Kernel {
    xmin: Vec<usize>,
    xsize: Vec<usize>,
    /// `max_interp_size` int16 weights per output index.
    weights: Vec<i16>,
    max_interp_size: usize,
    precision: u32,
    round: i32,
}

impl Kernel {
    fn new(input_size: usize, output_size: usize) -> Self {
        const INTERP_SIZE: f64 = 4.0;
        // area_pixel_compute_scale(align_corners=false, no scale given) = in / out.
        let scale = input_size as f64 / output_size as f64;
        let support = if scale >= 1.0 { (INTERP_SIZE * 0.5) * scale } else { INTERP_SIZE * 0.5 };
        let max_interp_size = (support.ceil() as usize) * 2 + 1;
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };

        let mut xmin = Vec::with_capacity(output_size);
        let mut xsize = Vec::with_capacity(output_size);
        let mut wf = vec![0f64; output_size * max_interp_size];
        let mut wt_max = 0f64;
        for i in 0..output_size {
            let center = scale * (i as f64 + 0.5);
            // C++ `static_cast<int64_t>` truncates toward zero.
            let lo = ((center - support + 0.5) as i64).max(0);
            let hi = ((center + support + 0.5) as i64).min(input_size as i64);
            let size = (hi - lo).clamp(0, max_interp_size as i64) as usize;
            let w = &mut wf[i * max_interp_size..(i + 1) * max_interp_size];
            let mut total = 0f64;
            for (j, wj) in w.iter_mut().enumerate().take(size) {
                let x = ((j as i64 + lo) as f64 - center + 0.5) * invscale;
                *wj = keys_cubic(x);
                total += *wj;
            }
            if total != 0.0 {
                for wj in w.iter_mut().take(size) {
                    *wj /= total;
                    wt_max = wt_max.max(*wj);
                }
            }
            xmin.push(lo as usize);
            xsize.push(size);
        }
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + wt_max * (1i64 << (precision + 1)) as f64) as i32;
            if next >= (1 << 15) {
                break;
            }
            precision += 1;
        }
        let weights = wf
            .iter()
            .map(|&w| {
                let v = w * (1i64 << precision) as f64;
                (if v < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 }) as i16
            })
            .collect();
        Kernel { xmin, xsize, weights, max_interp_size, precision, round: 1 << (precision - 1) }
    }

    fn taps(&self, i: usize) -> (usize, &[i16]) {
        let w = &self.weights[i * self.max_interp_size..i * self.max_interp_size + self.xsize[i]];
        (self.xmin[i], w)
    }

    fn finish(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Keys' cubic convolution kernel with a = −0.5 (PyTorch's antialias bicubic, as Pillow).
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_hf_examples() {
        // Values from the reference fixtures (factor 32).
        let d = (65536, 16_777_216);
        assert_eq!(smart_resize(30, 40, 32, d.0, d.1).unwrap(), (224, 320));
        assert_eq!(smart_resize(200, 1200, 32, d.0, d.1).unwrap(), (192, 1216));
        assert_eq!(smart_resize(872, 1000, 32, d.0, d.1).unwrap(), (864, 992));
        assert_eq!(smart_resize(427, 640, 32, d.0, d.1).unwrap(), (416, 640));
        let s = (65536, 262_144);
        assert_eq!(smart_resize(400, 600, 32, s.0, s.1).unwrap(), (384, 608));
        assert_eq!(smart_resize(300, 451, 32, s.0, s.1).unwrap(), (288, 448));
        assert_eq!(smart_resize(427, 640, 32, s.0, s.1).unwrap(), (416, 608));
        // Banker's rounding: 48/32 = 1.5 → 2, 80/32 = 2.5 → 2.
        assert_eq!(smart_resize(48, 80, 32, 1, u64::MAX).unwrap(), (64, 64));
        assert!(smart_resize(10, 2010, 32, d.0, d.1).is_err());
        assert!(smart_resize(10, 2000, 32, d.0, d.1).is_ok());
    }

    #[test]
    fn same_size_is_identity_and_constant_stays_constant() {
        let img = RgbImage { width: 7, height: 5, data: (0..105).map(|v| v as u8).collect() };
        assert_eq!(resize_bicubic_aa(&img, 5, 7), img);
        let flat = RgbImage { width: 50, height: 30, data: vec![77; 50 * 30 * 3] };
        for (h, w) in [(64, 96), (13, 17), (30, 96), (64, 50)] {
            let out = resize_bicubic_aa(&flat, h, w);
            assert_eq!((out.height, out.width), (h, w));
            assert!(out.data.iter().all(|&v| v == 77), "{h}x{w}");
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(1000, 992), (451, 448), (30, 224), (1200, 1216), (640, 320)] {
            let k = Kernel::new(i, o);
            for x in 0..o {
                let s: i32 = k.taps(x).1.iter().map(|&w| w as i32).sum();
                assert!((s - (1 << k.precision)).abs() <= k.max_interp_size as i32, "{i}->{o} at {x}: {s}");
            }
        }
    }
}
