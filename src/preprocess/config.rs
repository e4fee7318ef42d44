//! The checkpoint files the processor needs: `preprocessor_config.json`, `config.json` and the
//! chat template, resolved the way HF's `AutoProcessor` resolves them.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::artifact::inputs::ProcessorSettings;

/// HF `Qwen2VLImageProcessor` class defaults, used for keys a config omits.
pub const DEFAULT_PATCH_SIZE: u32 = 14;
pub const DEFAULT_TEMPORAL_PATCH_SIZE: u32 = 2;
pub const DEFAULT_MERGE_SIZE: u32 = 2;
pub const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
pub const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// Upper bounds on the patch geometry (Qwen-VL uses 14 or 16, merge 2, temporal 2).
pub const MAX_PATCH_SIZE: u32 = 1024;
pub const MAX_MERGE_SIZE: u32 = 64;
/// Largest image after resizing that `min_pixels` may ask for: Pillow's decompression-bomb
/// limit, which bounds the decoded images too.
pub const MAX_RESIZED_PIXELS: u64 = 2 * super::decode::MAX_IMAGE_PIXELS;
/// `PILImageResampling.BICUBIC`.
const BICUBIC: u32 = 3;

/// `preprocessor_config.json`, keys as HF spells them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PreprocessorConfig {
    pub size: Option<SizeConfig>,
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    pub patch_size: Option<u32>,
    pub temporal_patch_size: Option<u32>,
    pub merge_size: Option<u32>,
    pub image_mean: Option<Vec<f64>>,
    pub image_std: Option<Vec<f64>>,
    pub rescale_factor: Option<f64>,
    pub do_resize: Option<bool>,
    pub do_rescale: Option<bool>,
    pub do_normalize: Option<bool>,
    pub do_convert_rgb: Option<bool>,
    pub resample: Option<u32>,
}

/// `size`: `{shortest_edge, longest_edge}` (pixel counts, despite the names) or the older
/// `{min_pixels, max_pixels}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SizeConfig {
    pub shortest_edge: Option<u64>,
    pub longest_edge: Option<u64>,
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

impl PreprocessorConfig {
    /// Resolves the settings. Precedence (HF `__init__` + call kwargs): the overrides given here
    /// (CLI `--min-pixels/--max-pixels`), then top-level `min_pixels/max_pixels`, then `size`.
    /// Refuses settings this implementation does not reproduce.
    pub fn resolve(&self, min_override: Option<u64>, max_override: Option<u64>) -> Result<ProcessorSettings> {
        for (name, value, want) in [
            ("do_resize", self.do_resize, true),
            ("do_rescale", self.do_rescale, true),
            ("do_normalize", self.do_normalize, true),
            ("do_convert_rgb", self.do_convert_rgb, true),
        ] {
            if value.is_some_and(|v| v != want) {
                bail!("{name} = {} is not supported (only the Qwen-VL default {want})", !want);
            }
        }
        if let Some(r) = self.resample {
            if r != BICUBIC {
                bail!("resample = {r} is not supported (only 3 = bicubic)");
            }
        }
        let size = self.size.clone().unwrap_or_default();
        let min_pixels =
            min_override.or(self.min_pixels).or(size.shortest_edge).or(size.min_pixels).unwrap_or(DEFAULT_MIN_PIXELS);
        let max_pixels =
            max_override.or(self.max_pixels).or(size.longest_edge).or(size.max_pixels).unwrap_or(DEFAULT_MAX_PIXELS);
        if min_pixels == 0 || min_pixels > max_pixels {
            bail!("min_pixels {min_pixels} and max_pixels {max_pixels} do not form a valid range");
        }
        let three = |name: &str, v: &Option<Vec<f64>>, default: [f64; 3]| -> Result<[f64; 3]> {
            match v {
                None => Ok(default),
                Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
                Some(v) if v.len() == 1 => Ok([v[0]; 3]),
                Some(v) => bail!("{name} has {} values, expected 3", v.len()),
            }
        };
        let settings = ProcessorSettings {
            patch_size: self.patch_size.unwrap_or(DEFAULT_PATCH_SIZE),
            temporal_patch_size: self.temporal_patch_size.unwrap_or(DEFAULT_TEMPORAL_PATCH_SIZE),
            merge_size: self.merge_size.unwrap_or(DEFAULT_MERGE_SIZE),
            min_pixels,
            max_pixels,
            rescale_factor: self.rescale_factor.unwrap_or(1.0 / 255.0),
            image_mean: three("image_mean", &self.image_mean, OPENAI_CLIP_MEAN)?,
            image_std: three("image_std", &self.image_std, OPENAI_CLIP_STD)?,
        };
        if settings.patch_size == 0 || settings.merge_size == 0 || settings.temporal_patch_size == 0 {
            bail!("patch_size, merge_size and temporal_patch_size must be positive");
        }
        // Absurd sizes would overflow the patch arithmetic or allocate without bound.
        for (name, v, max) in [
            ("patch_size", settings.patch_size, MAX_PATCH_SIZE),
            ("merge_size", settings.merge_size, MAX_MERGE_SIZE),
            ("temporal_patch_size", settings.temporal_patch_size, MAX_MERGE_SIZE),
        ] {
            if v > max {
                bail!("{name} = {v} is out of range (at most {max})");
            }
        }
        if min_pixels > MAX_RESIZED_PIXELS {
            bail!(
                "min_pixels {min_pixels} would upscale every image beyond {MAX_RESIZED_PIXELS} pixels \
                 (the decompression-bomb limit)"
            );
        }
        let values = settings.image_mean.iter().chain(&settings.image_std).chain([&settings.rescale_factor]);
        if values.into_iter().any(|v| !v.is_finite()) {
            bail!("image_mean, image_std and rescale_factor must be finite numbers");
        }
        if settings.image_std.contains(&0.0) || settings.rescale_factor == 0.0 {
            bail!("image_std and rescale_factor must be non-zero");
        }
        Ok(settings)
    }
}

/// The token ids `config.json` defines for vision placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionTokenIds {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// `vision_config.spatial_merge_size`, when present.
    pub spatial_merge_size: Option<u32>,
}

#[derive(Deserialize)]
struct ConfigJson {
    image_token_id: Option<u32>,
    video_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    vision_end_token_id: Option<u32>,
    vision_config: Option<VisionConfigJson>,
}

#[derive(Deserialize)]
struct VisionConfigJson {
    spatial_merge_size: Option<u32>,
}

/// Reads `config.json` (Qwen3-VL defaults for missing ids, as HF's `Qwen3VLConfig`).
pub fn read_vision_token_ids(path: &Path) -> Result<VisionTokenIds> {
    let c: ConfigJson = read_json(path)?;
    Ok(VisionTokenIds {
        image_token_id: c.image_token_id.unwrap_or(151655),
        video_token_id: c.video_token_id.unwrap_or(151656),
        vision_start_token_id: c.vision_start_token_id.unwrap_or(151652),
        vision_end_token_id: c.vision_end_token_id.unwrap_or(151653),
        spatial_merge_size: c.vision_config.and_then(|v| v.spatial_merge_size),
    })
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!(e)).with_context(|| path.display().to_string())?;
    serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("malformed JSON: {e}"))
        .with_context(|| path.display().to_string())
}

/// The chat template: `chat_template.jinja`, else `chat_template.json`'s `chat_template`, else
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}` of which
/// `default` is taken). Returns the template and the file it came from.
pub fn find_chat_template(dir: &Path) -> Result<(String, std::path::PathBuf)> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).with_context(|| jinja.display().to_string())?;
        return Ok((text, jinja));
    }
    for name in ["chat_template.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let v: serde_json::Value = read_json(&path)?;
        match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => return Ok((s.clone(), path)),
            Some(serde_json::Value::Array(list)) => {
                let default = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                if let Some(s) = default.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    return Ok((s.to_string(), path));
                }
            }
            _ => {}
        }
    }
    bail!(
        "{}: no chat template (looked for chat_template.jinja, chat_template.json and tokenizer_config.json's chat_template)",
        dir.display()
    )
}

/// Special-token strings from `tokenizer_config.json` that templates may reference
/// (`bos_token`, `eos_token`, `pad_token`, `unk_token`), each a string or an AddedToken object.
pub fn template_special_tokens(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = read_json(&path)?;
    let mut out = Vec::new();
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        let s = match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj @ serde_json::Value::Object(_)) => obj.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        if let Some(s) = s {
            out.push((key.to_string(), s));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> PreprocessorConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn size_forms_and_overrides() {
        let released = parse(
            r#"{"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#,
        );
        let s = released.resolve(None, None).unwrap();
        assert_eq!((s.min_pixels, s.max_pixels, s.patch_size, s.merge_size), (65536, 16777216, 16, 2));
        let s = released.resolve(Some(1024), Some(262144)).unwrap();
        assert_eq!((s.min_pixels, s.max_pixels), (1024, 262144));

        let old =
            parse(r#"{"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 1, "longest_edge": 2}}"#);
        let s = old.resolve(None, None).unwrap();
        assert_eq!((s.min_pixels, s.max_pixels, s.patch_size), (3136, 12845056, 14));
        assert_eq!(s.image_mean, OPENAI_CLIP_MEAN);

        let legacy_size = parse(r#"{"size": {"min_pixels": 100, "max_pixels": 200}}"#);
        assert_eq!(legacy_size.resolve(None, None).unwrap().max_pixels, 200);

        assert!(parse(r#"{"do_normalize": false}"#).resolve(None, None).is_err());
        assert!(parse(r#"{"resample": 2}"#).resolve(None, None).is_err());
        assert!(parse("{}").resolve(Some(10), Some(5)).is_err());
        assert!(parse(r#"{"merge_size": 4294967295}"#).resolve(None, None).is_err());
        assert!(parse(r#"{"patch_size": 65536}"#).resolve(None, None).is_err());
        assert!(parse("{}").resolve(Some(1_000_000_000_000_000), Some(u64::MAX)).is_err());
        let inf_std = PreprocessorConfig { image_std: Some(vec![0.5, f64::INFINITY, 0.5]), ..Default::default() };
        assert!(inf_std.resolve(None, None).is_err());
    }

    #[test]
    fn chat_template_lookup_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(find_chat_template(d).is_err());
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"}], "eos_token": {"content": "<e>"}, "bos_token": null}"#,
        )
        .unwrap();
        assert_eq!(find_chat_template(d).unwrap().0, "D");
        assert_eq!(template_special_tokens(d).unwrap(), vec![("eos_token".to_string(), "<e>".to_string())]);
        std::fs::write(d.join("chat_template.json"), r#"{"chat_template": "J"}"#).unwrap();
        assert_eq!(find_chat_template(d).unwrap().0, "J");
        std::fs::write(d.join("chat_template.jinja"), "K").unwrap();
        assert_eq!(find_chat_template(d).unwrap().0, "K");
    }
}
