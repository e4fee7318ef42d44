//! Stage 2, `preprocess`: calibration samples + HF checkpoint → model inputs, exactly as HF's
//! `Qwen3VLProcessor` (transformers 5, torchvision backend) makes them.
//!
//! Per sample: messages `[user: [image…, prompt], assistant: caption]` rendered with the
//! checkpoint's chat template (`add_generation_prompt=False`); each `<|image_pad|>` expanded to
//! `t·h·w / merge²` tokens; tokenized with `tokenizer.json`; labels on the caption and the
//! `<|im_end|>` closing it; MRoPE positions as `get_rope_index`. Images are decoded and converted
//! as Pillow + `convert_to_rgb` ([`decode`]), resized by `smart_resize` + torchvision's uint8
//! bicubic antialias kernel ([`resize`]) and stored as bytes; [`pixel_values`] expands them.

pub mod chat;
pub mod config;
pub mod decode;
pub mod patches;
pub mod resize;
pub mod sequence;

use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use crate::artifact::calibration::{CalibrationSample, CalibrationSet};
use crate::artifact::inputs::{ImagePixels, ModelInputs, ProcessorSettings, SampleInputs, SpecialTokens};
use crate::artifact::{self, Artifact, Location, Provenance};
use crate::cli::Reporter;

pub use chat::{ChatTemplate, Message};
pub use decode::{decode_rgb, RgbImage};
pub use patches::{check_image, pixel_values};
pub use resize::{resize_bicubic_aa, smart_resize};

/// The tool name written into artifacts and error messages.
pub const TOOL: &str = "preprocess";

/// The processor of one checkpoint: image settings, tokenizer, chat template, special tokens.
pub struct Processor {
    settings: ProcessorSettings,
    special: SpecialTokens,
    video_token: u32,
    image_pad: String,
    tokenizer: tokenizers::Tokenizer,
    template: ChatTemplate,
    /// The file the chat template came from (named in rendering errors).
    template_path: PathBuf,
    preprocessor_config: config::PreprocessorConfig,
}

impl Processor {
    /// Loads `tokenizer.json`, the chat template, `preprocessor_config.json` and `config.json`
    /// from an HF checkpoint directory. Errors name the file at fault.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a model directory (no such directory)", dir.display());
        }
        let pp_path = dir.join("preprocessor_config.json");
        let preprocessor_config: config::PreprocessorConfig = config::read_json(&pp_path)?;
        let settings = preprocessor_config.resolve(None, None).with_context(|| pp_path.display().to_string())?;
        let ids = config::read_vision_token_ids(&dir.join("config.json"))?;
        if let Some(m) = ids.spatial_merge_size {
            if m != settings.merge_size {
                bail!(
                    "{}: vision_config.spatial_merge_size {m} differs from merge_size {} in preprocessor_config.json",
                    dir.join("config.json").display(),
                    settings.merge_size
                );
            }
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tok_path.display()))?;
        let token = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| anyhow!("{}: the tokenizer has no {name} token", tok_path.display()))
        };
        let special = SpecialTokens {
            image_pad: ids.image_token_id,
            vision_start: ids.vision_start_token_id,
            vision_end: ids.vision_end_token_id,
            im_start: token("<|im_start|>")?,
            im_end: token("<|im_end|>")?,
        };
        let image_pad = tokenizer.id_to_token(ids.image_token_id).ok_or_else(|| {
            anyhow!("{}: image_token_id {} is not in the tokenizer", tok_path.display(), ids.image_token_id)
        })?;
        let (source, template_path) = config::find_chat_template(dir)?;
        let template = ChatTemplate::new(&source, config::template_special_tokens(dir)?)
            .with_context(|| template_path.display().to_string())?;
        Ok(Processor {
            settings,
            special,
            video_token: ids.video_token_id,
            image_pad,
            tokenizer,
            template,
            template_path,
            preprocessor_config,
        })
    }

    /// Overrides `min_pixels` / `max_pixels` (HF's `images_kwargs={"size": {...}}`).
    pub fn with_pixel_limits(mut self, min_pixels: Option<u64>, max_pixels: Option<u64>) -> Result<Self> {
        self.settings = self.preprocessor_config.resolve(min_pixels, max_pixels)?;
        Ok(self)
    }

    pub fn settings(&self) -> &ProcessorSettings {
        &self.settings
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Decodes, converts and resizes one image file's bytes (HF image processor before
    /// rescale/normalize).
    pub fn image(&self, bytes: &[u8]) -> Result<ImagePixels> {
        let rgb = decode_rgb(bytes)?;
        self.image_from_rgb(&rgb)
    }

    /// Resizes an already converted RGB image.
    pub fn image_from_rgb(&self, rgb: &RgbImage) -> Result<ImagePixels> {
        let s = &self.settings;
        let (h, w) = smart_resize(rgb.height, rgb.width, s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)?;
        let resized = resize_bicubic_aa(rgb, h, w);
        Ok(ImagePixels { grid_thw: [1, h / s.patch_size, w / s.patch_size], height: h, width: w, rgb: resized.data })
    }

    /// One calibration sample, reading its images below `image_root` and re-checking their
    /// sha256 against the calibration artifact.
    pub fn sample(&self, sample: &CalibrationSample, image_root: &Path) -> Result<SampleInputs> {
        let mut images = Vec::with_capacity(sample.images.len());
        for r in &sample.images {
            let rel = Path::new(&r.path);
            let inside =
                !r.path.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside {
                bail!(
                    "{}: image path '{}' is not a relative path inside the image root",
                    image_root.join(rel).display(),
                    r.path
                );
            }
            let path = image_root.join(rel);
            // Only regular files: a FIFO would block the read forever, a device never end it.
            let meta = std::fs::metadata(&path).map_err(|e| anyhow!(e)).with_context(|| path.display().to_string())?;
            if !meta.is_file() {
                bail!("{}: not a regular file (a directory, device or pipe)", path.display());
            }
            let bytes = std::fs::read(&path).map_err(|e| anyhow!(e)).with_context(|| path.display().to_string())?;
            let digest = artifact::sha256_bytes(&bytes);
            if digest != r.sha256 {
                bail!(
                    "{}: image changed since calib-extract (sha256 is {digest}, the calibration artifact records {})",
                    path.display(),
                    r.sha256
                );
            }
            images.push(self.image(&bytes).with_context(|| path.display().to_string())?);
        }
        self.sample_with_images(sample, images)
    }

    /// One calibration sample from already processed images (no file access): messages
    /// `[user: [images…, prompt], assistant: caption]`, `add_generation_prompt=False`, labels on
    /// the caption and its closing `<|im_end|>`.
    pub fn sample_with_images(&self, sample: &CalibrationSample, images: Vec<ImagePixels>) -> Result<SampleInputs> {
        let refs: Vec<String> = sample.images.iter().map(|r| r.path.clone()).collect();
        let user = Message::user(&refs, &sample.prompt);
        let template = || self.template_path.display().to_string();
        let prefix = self.template.render(std::slice::from_ref(&user), true).with_context(template)?;
        let full = self.template.render(&[user, Message::assistant(&sample.caption)], false).with_context(template)?;
        if !full.starts_with(&prefix) {
            bail!(
                "{}: the chat template renders the user turn differently with and without the assistant answer",
                template()
            );
        }
        let Some(rel) = full[prefix.len()..].find(&sample.caption) else {
            bail!("{}: the rendered chat does not contain the caption verbatim", template());
        };
        let counts = self.token_counts(&images);
        let prefix_expanded = sequence::expand_image_pads(&prefix, &self.image_pad, &counts)?;
        let start = prefix_expanded.len() + rel;
        let span = (start, start + sample.caption.len());
        let mut inputs = self.encode(&sample.id, full, &images, &counts, Some(span))?;
        inputs.images = images;
        Ok(inputs)
    }

    /// The processor-only path: `[images…, text]` as one user turn with
    /// `add_generation_prompt=True`; labels are all −100.
    pub fn prompt(&self, id: &str, images: Vec<ImagePixels>, text: &str) -> Result<SampleInputs> {
        let refs: Vec<String> = (0..images.len()).map(|i| format!("image{i}")).collect();
        let rendered = self
            .template
            .render(&[Message::user(&refs, text)], true)
            .with_context(|| self.template_path.display().to_string())?;
        let counts = self.token_counts(&images);
        let mut inputs = self.encode(id, rendered, &images, &counts, None)?;
        inputs.images = images;
        Ok(inputs)
    }

    fn token_counts(&self, images: &[ImagePixels]) -> Vec<usize> {
        let m2 = (self.settings.merge_size * self.settings.merge_size) as usize;
        images.iter().map(|i| i.grid_thw.iter().map(|&v| v as usize).product::<usize>() / m2).collect()
    }

    fn encode(
        &self,
        id: &str,
        text: String,
        images: &[ImagePixels],
        counts: &[usize],
        answer: Option<(usize, usize)>,
    ) -> Result<SampleInputs> {
        for img in images {
            check_image(img, &self.settings)?;
        }
        let expanded = sequence::expand_image_pads(&text, &self.image_pad, counts)?;
        let enc = self.tokenizer.encode(expanded.as_str(), true).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let ids = enc.get_ids().to_vec();
        let labels = match answer {
            Some(span) => sequence::answer_labels(&ids, enc.get_offsets(), span, self.special.im_end)?,
            None => vec![-100; ids.len()],
        };
        let grids: Vec<[u32; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let (position_ids, rope_delta) = sequence::rope_index(
            &ids,
            &grids,
            self.settings.merge_size,
            self.special.image_pad,
            self.video_token,
            self.special.vision_start,
        )?;
        Ok(SampleInputs {
            id: id.to_string(),
            text,
            attention_mask: vec![1; ids.len()],
            mm_token_type_ids: sequence::mm_token_type_ids(&ids, self.special.image_pad, self.video_token),
            labels,
            position_ids,
            rope_delta,
            input_ids: ids,
            images: Vec::new(),
        })
    }
}

/// `preprocess` command-line arguments (the binary adds the common flags).
#[derive(Debug, Clone, clap::Args)]
pub struct PreprocessArgs {
    /// Calibration artifact written by calib-extract (`-` for stdin).
    #[arg(long, value_name = "FILE|-")]
    pub calibration: String,
    /// HF checkpoint directory (tokenizer.json, chat template, preprocessor_config.json, config.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Output artifact (`-` for stdout; JSON when the name ends in .json).
    #[arg(short, long, value_name = "FILE|-", default_value = "-")]
    pub output: String,
    /// Override the processor's min_pixels (HF size.shortest_edge).
    #[arg(long, value_name = "N")]
    pub min_pixels: Option<u64>,
    /// Override the processor's max_pixels (HF size.longest_edge).
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<u64>,
    /// Image root to use instead of the one recorded in the calibration artifact.
    #[arg(long, value_name = "DIR")]
    pub image_root: Option<PathBuf>,
}

/// Runs the stage: reads the calibration artifact, processes every sample (in parallel, output in
/// input order) and writes the model-inputs artifact atomically.
pub fn run(args: &PreprocessArgs, reporter: Reporter) -> Result<()> {
    let artifact = build(args, reporter)?;
    artifact::write(Location::from(args.output.as_str()), &artifact)
}

/// Everything [`run`] does except writing: the model-inputs artifact.
pub fn build(args: &PreprocessArgs, reporter: Reporter) -> Result<Artifact<ModelInputs>> {
    let calib_loc = Location::from(args.calibration.as_str());
    let calib_bytes = artifact::read_bytes(&calib_loc)?;
    let calib: Artifact<CalibrationSet> = artifact::from_bytes(&calib_bytes).with_context(|| calib_loc.to_string())?;
    if calib.payload.samples.is_empty() {
        bail!("{calib_loc}: the calibration set has no samples (nothing to preprocess)");
    }
    let calib_digest = artifact::sha256_bytes(&calib_bytes);
    drop(calib_bytes);
    let processor = Processor::from_model_dir(&args.model)?
        .with_pixel_limits(args.min_pixels, args.max_pixels)
        .with_context(|| args.model.join("preprocessor_config.json").display().to_string())?;
    let root = args.image_root.clone().unwrap_or_else(|| PathBuf::from(&calib.payload.image_root));
    let set = &calib.payload;
    reporter.detail(format!("preprocess: {} samples, settings {:?}", set.samples.len(), processor.settings()));

    let bar = reporter.bar(set.samples.len() as u64, "preprocess");
    let results: Vec<Result<SampleInputs>> = set
        .samples
        .par_iter()
        .map(|s| {
            let r = processor.sample(s, &root).with_context(|| format!("sample {}", s.id));
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();
    let samples = results.into_iter().collect::<Result<Vec<_>>>().map_err(move_path_first)?;

    let mut prov = Provenance::default();
    prov.source("calibration", &calib_loc, calib_digest);
    for name in ["tokenizer.json", "preprocessor_config.json", "config.json"] {
        let p = args.model.join(name);
        prov.source(name.trim_end_matches(".json"), p.display(), artifact::sha256_file(&p)?);
    }
    let (_, template_path) = config::find_chat_template(&args.model)?;
    prov.source("chat-template", template_path.display(), artifact::sha256_file(&template_path)?);
    prov.param("image_root", root.display());
    if let Some(v) = args.min_pixels {
        prov.param("min_pixels", v);
    }
    if let Some(v) = args.max_pixels {
        prov.param("max_pixels", v);
    }
    let payload = ModelInputs {
        processor: processor.settings().clone(),
        special_tokens: processor.special_tokens().clone(),
        samples,
    };
    Ok(Artifact::new(TOOL, prov, payload))
}

/// Per-sample errors read "sample N: <path>: fault"; put the file first, as the CLI contract
/// wants the line to start with the file at fault.
fn move_path_first(err: anyhow::Error) -> anyhow::Error {
    let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
    if chain.len() >= 2 && chain[0].starts_with("sample ") {
        let rest = chain[1..].join(": ");
        return anyhow!("{rest} ({})", chain[0]);
    }
    err
}
