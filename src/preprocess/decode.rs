//! Image decoding and RGB conversion exactly as HF's processor sees an image: `PIL.Image.open`
//! followed by `transformers.image_transforms.convert_to_rgb`.
//!
//! `convert_to_rgb` returns RGB images unchanged and sends every other mode through
//! `convert("RGBA")` and `Image.alpha_composite` onto opaque white, then `convert("RGB")`. What
//! that means per source (each pinned by the fixtures' `converted_rgb_sha256`):
//! - JPEG: decoded by libjpeg-turbo (islow IDCT, fancy upsampling); we link the same decoder
//!   (MozJPEG's copy of it, built without SIMD, whose output is defined to be identical).
//!   Grayscale replicates; CMYK is stored Adobe-inverted and Pillow's `cmyk2rgb` applies.
//! - PNG 8-bit: L replicates, RGBA/LA/palette-with-alpha composite onto white.
//! - PNG 16-bit: Pillow opens RGB/RGBA/LA as 8-bit keeping the MSB (`v >> 8`); grayscale is
//!   mode `I;16`, whose RGB conversion *clips* to 255 instead of scaling.
//! - Other formats (BMP, GIF, WebP, TIFF) go through the `image` crate and the same rules; they
//!   are not pinned by a reference.
//!
//! The decompression-bomb guard mirrors Pillow: more than `2 × 89,478,485` pixels is an error.

use std::io::Cursor;

use anyhow::{anyhow, bail, Context, Result};
use image::{DynamicImage, ImageFormat};

/// Pillow's `Image.MAX_IMAGE_PIXELS`; twice this is a `DecompressionBombError`.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// An 8-bit RGB image, row-major, `height × width × 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Decodes an image file's bytes and converts it to RGB as `convert_to_rgb(PIL.Image.open(f))`.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        bail!("empty file (0 bytes), not an image");
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes);
    }
    let format = image::guess_format(bytes).map_err(|_| anyhow!("not an image (unrecognised file format)"))?;
    decode_other(bytes, format)
}

/// Errors when `width × height` exceeds Pillow's decompression-bomb limit.
pub fn check_bomb(width: u64, height: u64) -> Result<()> {
    let pixels = width * height;
    if pixels > 2 * MAX_IMAGE_PIXELS {
        bail!(
            "image size {width}×{height} = {pixels} pixels exceeds the limit of {} pixels \
             (decompression-bomb guard, as Pillow)",
            2 * MAX_IMAGE_PIXELS
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// JPEG via libjpeg

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage> {
    // libjpeg reports fatal errors by unwinding out of `error_exit` (with `resume_unwind`, so no
    // panic hook runs); catch it here and turn it into an error. (This needs `panic = "unwind"`,
    // the default; with `abort` a corrupt JPEG would abort the process.)
    let result = std::panic::catch_unwind(|| decode_jpeg_unwinding(bytes));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg failed".to_string());
            Err(anyhow!("corrupt JPEG: {msg}"))
        }
    }
}

fn decode_jpeg_unwinding(bytes: &[u8]) -> Result<RgbImage> {
    use mozjpeg_sys::J_COLOR_SPACE::{JCS_YCbCr, JCS_CMYK, JCS_GRAYSCALE, JCS_RGB, JCS_YCCK};

    let dec = mozjpeg::Decompress::with_err(strict_error_mgr()).from_mem(bytes).context("corrupt JPEG")?;
    let (w, h) = (dec.width() as u32, dec.height() as u32);
    check_bomb(w as u64, h as u64)?;
    let rgb = match dec.color_space() {
        JCS_GRAYSCALE => {
            let mut started = dec.grayscale().context("corrupt JPEG")?;
            let luma: Vec<u8> = started.read_scanlines().context("corrupt JPEG")?;
            started.finish().context("corrupt JPEG")?;
            luma.iter().flat_map(|&v| [v, v, v]).collect()
        }
        JCS_CMYK | JCS_YCCK => {
            let mut started = dec.to_colorspace(JCS_CMYK).context("corrupt JPEG")?;
            let cmyk: Vec<u8> = started.read_scanlines().context("corrupt JPEG")?;
            started.finish().context("corrupt JPEG")?;
            cmyk_inverted_to_rgb(&cmyk)
        }
        JCS_RGB | JCS_YCbCr => {
            let mut started = dec.rgb().context("corrupt JPEG")?;
            let rgb: Vec<u8> = started.read_scanlines().context("corrupt JPEG")?;
            started.finish().context("corrupt JPEG")?;
            rgb
        }
        other => bail!("unsupported JPEG colour space {other:?}"),
    };
    if rgb.len() != (w as usize) * (h as usize) * 3 {
        bail!("corrupt JPEG: decoded {} bytes, expected {w}×{h}×3", rgb.len());
    }
    Ok(RgbImage { width: w, height: h, data: rgb })
}

/// libjpeg's standard error manager, except that fatal errors unwind with their message and the
/// "premature end of JPEG file" warning is fatal too: Pillow refuses truncated JPEGs ("image file
/// is truncated"), while libjpeg alone would pad them with grey. Other warnings (e.g. extraneous
/// bytes before a marker) are ignored, as Pillow ignores them.
fn strict_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    // SAFETY: `jpeg_error_mgr` is a plain C struct for which all-zero is a valid starting state;
    // `jpeg_std_error` fills in the standard handlers and message tables.
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(unwind_error_exit);
    err.emit_message = Some(emit_message);
    err
}

fn libjpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    // SAFETY: `err` is the manager installed above; `format_message` writes at most 80 bytes
    // (JMSG_LENGTH_MAX) into the buffer. The binding declares the buffer as `&[u8; 80]` although
    // C writes to it, so it is passed through a raw pointer.
    unsafe {
        let err = &*cinfo.err;
        let mut buffer = [0u8; 80];
        if let Some(format) = err.format_message {
            let ptr = buffer.as_mut_ptr() as *const [u8; 80];
            format(cinfo, &*ptr);
        }
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        let msg = String::from_utf8_lossy(&buffer[..end]).into_owned();
        if msg.is_empty() {
            format!("libjpeg error code {}", err.msg_code)
        } else {
            msg
        }
    }
}

extern "C-unwind" fn unwind_error_exit(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    let msg = libjpeg_message(cinfo);
    std::panic::resume_unwind(Box::new(msg));
}

extern "C-unwind" fn emit_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: std::os::raw::c_int) {
    // SAFETY: `err` points to the manager installed by `strict_error_mgr`.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF as std::os::raw::c_int {
        std::panic::resume_unwind(Box::new("image file is truncated (premature end of JPEG data)".to_string()));
    }
    if level < 0 {
        // SAFETY: as above.
        unsafe { (*cinfo.err).num_warnings += 1 };
    }
}

/// Pillow decodes CMYK JPEGs with raw mode `CMYK;I` (Adobe stores inverted ink values), then
/// `cmyk2rgb`: `nk = 255 − K; R = clip(nk − nk·C/255)` with Pillow's rounding `MULDIV255`.
fn cmyk_inverted_to_rgb(stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() / 4 * 3);
    for px in stored.chunks_exact(4) {
        let [c, m, y, k] = [255 - px[0], 255 - px[1], 255 - px[2], 255 - px[3]].map(i32::from);
        let nk = 255 - k;
        for ink in [c, m, y] {
            out.push((nk - muldiv255(ink, nk)).clamp(0, 255) as u8);
        }
    }
    out
}

/// Pillow's `MULDIV255(a, b)`: `a·b/255` rounded, as `((t >> 8) + t) >> 8` with `t = a·b + 128`.
fn muldiv255(a: i32, b: i32) -> i32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

// ---------------------------------------------------------------------------------------------
// PNG and the rest via the `image` crate

fn decode_other(bytes: &[u8], format: ImageFormat) -> Result<RgbImage> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.no_limits();
    let (w, h) = reader.into_dimensions().map_err(|e| anyhow!("corrupt {format:?} image: {e}"))?;
    check_bomb(w as u64, h as u64)?;
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let img = reader.decode().map_err(|e| anyhow!("corrupt {format:?} image: {e}"))?;
    Ok(pillow_convert_to_rgb(img))
}

/// `convert_to_rgb` for the pixel layouts the `image` crate produces, with Pillow's 16-bit rules.
fn pillow_convert_to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => {
            b.into_raw().chunks_exact(2).flat_map(|p| composite_on_white([p[0], p[0], p[0], p[1]])).collect()
        }
        DynamicImage::ImageRgba8(b) => {
            b.into_raw().chunks_exact(4).flat_map(|p| composite_on_white([p[0], p[1], p[2], p[3]])).collect()
        }
        // I;16: clipped, not scaled.
        DynamicImage::ImageLuma16(b) => b.into_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        // LA/RGB/RGBA 16-bit: Pillow's raw modes `*;16B` keep the most significant byte.
        DynamicImage::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let (l, a) = ((p[0] >> 8) as u8, (p[1] >> 8) as u8);
                composite_on_white([l, l, l, a])
            })
            .collect(),
        DynamicImage::ImageRgb16(b) => b.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| composite_on_white(std::array::from_fn(|i| (p[i] >> 8) as u8)))
            .collect(),
        other => {
            // Float images (OpenEXR/HDR are not enabled; TIFF can be float): 8-bit RGBA first.
            other
                .to_rgba8()
                .into_raw()
                .chunks_exact(4)
                .flat_map(|p| composite_on_white([p[0], p[1], p[2], p[3]]))
                .collect()
        }
    };
    RgbImage { width, height, data }
}

/// `Image.alpha_composite(white, rgba)` followed by `convert("RGB")`, with Pillow's integer
/// arithmetic (`AlphaComposite.c`, 7 extra bits of precision, rounded division by 255).
pub fn composite_on_white(px: [u8; 4]) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    let [r, g, b, a] = px.map(u32::from);
    if a == 0 {
        return [255, 255, 255];
    }
    let dst_a = 255u32;
    let blend = dst_a * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    let ch = |s: u32| {
        let t = s * coef1 + 255 * coef2;
        (shift_div255(t + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    };
    [ch(r), ch(g), ch(b)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_composite_is_identity() {
        for v in 0..=255u8 {
            assert_eq!(composite_on_white([v, 255 - v, v / 2, 255]), [v, 255 - v, v / 2]);
        }
        assert_eq!(composite_on_white([0, 0, 0, 0]), [255, 255, 255]);
        // Half-transparent black over white is mid grey.
        let [r, _, _] = composite_on_white([0, 0, 0, 128]);
        assert!((126..=128).contains(&r), "{r}");
    }

    #[test]
    fn cmyk_without_black_is_inverted_ink() {
        // Stored (inverted) values: C=10 → stored 245; K=0 → stored 255.
        assert_eq!(cmyk_inverted_to_rgb(&[245, 0, 128, 255]), vec![245, 0, 128]);
        // Full black ink gives black whatever the colour.
        assert_eq!(cmyk_inverted_to_rgb(&[12, 200, 7, 0]), vec![0, 0, 0]);
    }

    #[test]
    fn bomb_guard_matches_pillow() {
        assert!(check_bomb(2 * MAX_IMAGE_PIXELS, 1).is_ok());
        assert!(check_bomb(2 * MAX_IMAGE_PIXELS + 1, 1).is_err());
    }

    #[test]
    fn decompression_bombs_are_refused_before_decoding() {
        // PNG whose IHDR claims 20000×20000 (2.2× Pillow's error limit), with an empty IDAT.
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(20_000u32.to_be_bytes());
        ihdr.extend(20_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(13u32.to_be_bytes());
        png.extend(&ihdr);
        png.extend(crc32fast::hash(&ihdr).to_be_bytes());
        for chunk in [&b"IDAT"[..], &b"IEND"[..]] {
            png.extend(0u32.to_be_bytes());
            png.extend(chunk);
            png.extend(crc32fast::hash(chunk).to_be_bytes());
        }
        let err = format!("{:#}", decode_rgb(&png).unwrap_err());
        assert!(err.contains("decompression-bomb"), "{err}");

        // A real JPEG whose SOF0 is patched to 60000×60000.
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .encode(&[128u8; 16 * 16 * 3], 16, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(decode_rgb(&jpeg).unwrap().width, 16);
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let err = format!("{:#}", decode_rgb(&jpeg).unwrap_err());
        assert!(err.contains("decompression-bomb"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_rgb(b"").is_err());
        assert!(decode_rgb(b"hello world").is_err());
        assert!(decode_rgb(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F']).is_err());
    }
}
