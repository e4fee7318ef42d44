//! `preprocess` against HF's Qwen3-VL processor outputs (`shared/fixtures/reference`), plus the
//! CLI contract (determinism, artifact size, bad inputs).
//!
//! Reference tensors were made by transformers 5.24.0 / torchvision 0.29.2 / Pillow 13.0.0 on the
//! qwen3-vl-tiny checkpoint (see the fixtures' README). Token-level tensors must match exactly;
//! pixel values within max |Δ| ≤ 2e-2 and mean |Δ| ≤ 2e-3 (we also count differing u8 values,
//! expected 0, and compare the sha256 of the f32 `pixel_values`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use qsens::artifact::calibration::{CalibrationSample, CalibrationSet, ImageRef};
use qsens::artifact::inputs::{ImagePixels, ModelInputs, ProcessorSettings};
use qsens::artifact::{self, Artifact, Provenance};
use qsens::preprocess::{self, pixel_values, Processor};
use safetensors::SafeTensors;
use sha2::Digest;

fn i64s(st: &SafeTensors, key: &str) -> Vec<i64> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The same patch layout with the identity map, i.e. the u8 values HF's `pixel_values` encode.
fn patch_u8(img: &ImagePixels, s: &ProcessorSettings) -> Vec<u8> {
    let id = ProcessorSettings { rescale_factor: 1.0, image_mean: [0.0; 3], image_std: [1.0; 3], ..s.clone() };
    pixel_values(img, &id).into_iter().map(|v| v as u8).collect()
}

struct PixelStats {
    max_abs: f32,
    mean_abs: f64,
    u8_diffs: usize,
}

fn pixel_stats(ours: &ImagePixels, reference_u8_patches: &[u8], s: &ProcessorSettings) -> PixelStats {
    let ours_u8 = patch_u8(ours, s);
    assert_eq!(ours_u8.len(), reference_u8_patches.len(), "pixel_values size");
    let pv = pixel_values(ours, s);
    let (mut max_abs, mut sum) = (0f32, 0f64);
    for (a, &r) in pv.iter().zip(reference_u8_patches) {
        let d = (a - (r as f32 - 127.5f32) / 127.5f32).abs();
        max_abs = max_abs.max(d);
        sum += d as f64;
    }
    let u8_diffs = ours_u8.iter().zip(reference_u8_patches).filter(|(a, b)| a != b).count();
    PixelStats { max_abs, mean_abs: sum / pv.len() as f64, u8_diffs }
}

fn assert_pixels_close(label: &str, st: &PixelStats) {
    eprintln!(
        "{label}: pixel_values max|Δ| {:.3e}, mean|Δ| {:.3e}, differing u8 {}",
        st.max_abs, st.mean_abs, st.u8_diffs
    );
    assert!(st.max_abs <= 2e-2, "{label}: max |Δ| {}", st.max_abs);
    assert!(st.mean_abs <= 2e-3, "{label}: mean |Δ| {}", st.mean_abs);
}

fn image_ref(images: &Path, file: &str, image_id: i64) -> ImageRef {
    let bytes = std::fs::read(images.join(file)).unwrap();
    let rgb = preprocess::decode_rgb(&bytes).unwrap();
    ImageRef {
        image_id,
        path: file.into(),
        sha256: artifact::sha256_bytes(&bytes),
        width: rgb.width,
        height: rgb.height,
    }
}

#[test]
fn calibration_samples_match_hf() {
    let fx = fixtures_or_skip!();
    let index = json(&fx.join("reference/index.json"));
    let processor = Processor::from_model_dir(&fx.join("qwen3-vl-tiny"))
        .unwrap()
        .with_pixel_limits(Some(65536), Some(262144))
        .unwrap();
    let s = processor.settings().clone();
    for entry in index["samples"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        let buf = std::fs::read(fx.join("reference").join(file)).unwrap();
        let st = SafeTensors::deserialize(&buf).unwrap();
        let images: Vec<ImageRef> = entry["image_files"]
            .as_array()
            .unwrap()
            .iter()
            .zip(entry["image_ids"].as_array().unwrap())
            .map(|(f, id)| image_ref(&fx.join("images"), f.as_str().unwrap(), id.as_i64().unwrap()))
            .collect();
        let sample = CalibrationSample {
            id: file.into(),
            split: "fixture".into(),
            images,
            prompt: entry["prompt"].as_str().unwrap().into(),
            caption: entry["caption"].as_str().unwrap().into(),
        };
        let got = processor.sample(&sample, &fx.join("images")).unwrap();

        assert_eq!(got.text, entry["rendered_text"].as_str().unwrap(), "{file}: rendered text");
        let ids: Vec<i64> = got.input_ids.iter().map(|&v| v as i64).collect();
        assert_eq!(ids, i64s(&st, "input_ids"), "{file}: input_ids");
        let labels: Vec<i64> = got.labels.iter().map(|&v| v as i64).collect();
        assert_eq!(labels, i64s(&st, "labels"), "{file}: labels");
        let mask: Vec<i64> = got.attention_mask.iter().map(|&v| v as i64).collect();
        assert_eq!(mask, i64s(&st, "attention_mask"), "{file}: attention_mask");
        let mm: Vec<i64> = got.mm_token_type_ids.iter().map(|&v| v as i64).collect();
        assert_eq!(mm, i64s(&st, "mm_token_type_ids"), "{file}: mm_token_type_ids");
        let grids: Vec<i64> = got.images.iter().flat_map(|i| i.grid_thw.map(|v| v as i64)).collect();
        assert_eq!(grids, i64s(&st, "image_grid_thw"), "{file}: image_grid_thw");
        let pos: Vec<i64> = got.position_ids.concat();
        assert_eq!(pos, i64s(&st, "position_ids"), "{file}: position_ids");
        assert_eq!(vec![got.rope_delta], i64s(&st, "rope_deltas"), "{file}: rope_deltas");

        assert_eq!(got.pixel_values(&s), pixel_values(&got.images[0], &s));
        let reference = st.tensor("pixel_values_u8").unwrap();
        let stats = pixel_stats(&got.images[0], reference.data(), &s);
        assert_pixels_close(file, &stats);
        let f32_bytes: Vec<u8> = pixel_values(&got.images[0], &s).iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&f32_bytes)),
            entry["pixel_values_f32_sha256"].as_str().unwrap(),
            "{file}: sha256 of f32 pixel_values"
        );
    }
}

#[test]
fn processor_defaults_match_hf_on_all_images() {
    let fx = fixtures_or_skip!();
    let meta = json(&fx.join("reference/processor_default.json"));
    let buf = std::fs::read(fx.join("reference/processor_default.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let processor = Processor::from_model_dir(&fx.join("qwen3-vl-tiny")).unwrap();
    let s = processor.settings().clone();
    assert_eq!((s.min_pixels, s.max_pixels, s.patch_size), (65536, 16777216, 16));
    let prompt = meta["prompt"].as_str().unwrap();
    let mut total_diffs = 0;
    for (file, info) in meta["images"].as_object().unwrap() {
        let n: u32 = file[..12].parse().unwrap();
        let key = format!("img{n:02}");
        let bytes = std::fs::read(fx.join("images").join(file)).unwrap();

        let rgb = preprocess::decode_rgb(&bytes).unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&rgb.data)),
            info["converted_rgb_sha256"].as_str().unwrap(),
            "{file}: RGB conversion ({})",
            info["conversion_rule"]
        );
        if let Ok(conv) = st.tensor(&format!("{key}.converted_rgb_u8")) {
            assert_eq!(rgb.data, conv.data(), "{file}: converted RGB");
        }

        let img = processor.image(&bytes).unwrap();
        let grid: Vec<i64> = img.grid_thw.iter().map(|&v| v as i64).collect();
        assert_eq!(grid, i64s(&st, &format!("{key}.image_grid_thw")), "{file}: grid");
        let reference = st.tensor(&format!("{key}.resized_u8")).unwrap();
        assert_eq!(reference.shape(), &[img.height as usize, img.width as usize, 3], "{file}: resized shape");
        let diffs = img.rgb.iter().zip(reference.data()).filter(|(a, b)| a != b).count();
        total_diffs += diffs;

        let ref_img = ImagePixels { rgb: reference.data().to_vec(), ..img.clone() };
        let stats = pixel_stats(&img, &patch_u8(&ref_img, &s), &s);
        assert_eq!(stats.u8_diffs, diffs);
        assert_pixels_close(file, &stats);
        let f32_bytes: Vec<u8> = pixel_values(&img, &s).iter().flat_map(|v| v.to_le_bytes()).collect();
        let sha_ok = hex::encode(sha2::Sha256::digest(&f32_bytes)) == info["pixel_values_f32_sha256"].as_str().unwrap();
        eprintln!("{file}: resized u8 differing from HF: {diffs}; f32 pixel_values sha256 equal: {sha_ok}");
        // Stricter than the tolerance above: the decoder and resize are bit-exact ports.
        assert_eq!(diffs, 0, "{file}: resized u8 values differ from HF");
        assert!(sha_ok, "{file}: f32 pixel_values differ from HF's bits");

        let got = processor.prompt(file, vec![img], prompt).unwrap();
        let ids: Vec<i64> = got.input_ids.iter().map(|&v| v as i64).collect();
        assert_eq!(ids, i64s(&st, &format!("{key}.input_ids")), "{file}: input_ids");
        assert_eq!(
            got.mm_token_type_ids.iter().map(|&v| v as u64).sum::<u64>(),
            info["mm_token_type_ids_sum"].as_u64().unwrap()
        );
    }
    eprintln!("total resized u8 values differing from HF: {total_diffs}");
}

#[test]
fn two_images_in_one_message() {
    let fx = fixtures_or_skip!();
    let processor = Processor::from_model_dir(&fx.join("qwen3-vl-tiny"))
        .unwrap()
        .with_pixel_limits(Some(65536), Some(262144))
        .unwrap();
    let images = fx.join("images");
    let sample = CalibrationSample {
        id: "pair".into(),
        split: "test".into(),
        images: vec![image_ref(&images, "000000000003.jpg", 3), image_ref(&images, "000000000009.jpg", 9)],
        prompt: "Compare the two images.".into(),
        caption: "A cat, then a tiny picture.".into(),
    };
    let got = processor.sample(&sample, &images).unwrap();
    let sp = processor.special_tokens();
    assert_eq!(got.images.len(), 2);
    assert!(got
        .text
        .contains("<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Compare"));
    // Tokens per image and their order.
    let rows: u32 = got.image_grid_thw().iter().map(|g| g.iter().product::<u32>()).sum();
    assert_eq!(got.pixel_values(processor.settings()).len(), rows as usize * 3 * 2 * 16 * 16);
    let counts: Vec<usize> = got.images.iter().map(|i| i.grid_thw.iter().product::<u32>() as usize / 4).collect();
    let runs: Vec<usize> =
        got.input_ids.split(|&t| t != sp.image_pad).filter(|r| !r.is_empty()).map(|r| r.len()).collect();
    assert_eq!(runs, counts);
    // Position ids: the second block starts one past the first block's maximum + its two text
    // tokens (<|vision_end|><|vision_start|>), and each block is a (t, h, w) grid.
    let first = got.input_ids.iter().position(|&t| t == sp.image_pad).unwrap();
    let [_, h1, w1] = got.images[0].grid_thw.map(|v| v as i64 / 2);
    let base1 = got.position_ids[0][first];
    assert_eq!(base1, first as i64);
    let second = first + counts[0] + 2;
    let max1 = base1 + (h1 - 1).max(w1 - 1);
    assert_eq!(got.position_ids[0][second - 2], max1 + 1);
    assert_eq!(got.position_ids[0][second], max1 + 3);
    let [_, _, w2] = got.images[1].grid_thw.map(|v| v as i64 / 2);
    assert_eq!(got.position_ids[2][second + 1], max1 + 4);
    assert_eq!(got.position_ids[1][second + w2 as usize], max1 + 4);
    let max = got.position_ids.iter().flatten().max().unwrap();
    assert_eq!(got.rope_delta, max + 1 - got.input_ids.len() as i64);
    // Labels: the caption and the closing <|im_end|>.
    let labelled: Vec<u32> = got.labels.iter().filter(|&&l| l != -100).map(|&l| l as u32).collect();
    assert_eq!(*labelled.last().unwrap(), sp.im_end);
}

// ------------------------------------------------------------------------------------------
// CLI

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_preprocess")
}

/// A calibration artifact for some fixture images (written by the library, not the CLI, so
/// these tests do not depend on calib-extract).
fn calibration(fx: &Path, dir: &Path, files: &[&str]) -> PathBuf {
    let images = fx.join("images");
    let samples = files
        .iter()
        .enumerate()
        .map(|(i, f)| CalibrationSample {
            id: i.to_string(),
            split: "test".into(),
            images: vec![image_ref(&images, f, i as i64)],
            prompt: "Describe this image.".into(),
            caption: format!("Caption number {i}."),
        })
        .collect();
    let set = CalibrationSet { image_root: images.display().to_string(), samples };
    let path = dir.join("calib.msgpack");
    artifact::write(path.as_path(), &Artifact::new("test", Provenance::default(), set)).unwrap();
    path
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

#[test]
fn cli_is_deterministic_and_compact() {
    let fx = fixtures_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let files = ["000000000002.jpg", "000000000004.jpg", "000000000009.jpg", "000000000011.jpg"];
    let calib = calibration(&fx, dir.path(), &files);
    let model = fx.join("qwen3-vl-tiny");
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("inputs{i}.msgpack"))).collect();
    for out in &outs {
        let o = run(&[
            "--calibration",
            calib.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stderr.is_empty());
    }
    let a = std::fs::read(&outs[0]).unwrap();
    assert_eq!(a, std::fs::read(&outs[1]).unwrap(), "two runs differ");

    let inputs: Artifact<ModelInputs> = artifact::read(outs[0].as_path()).unwrap();
    assert_eq!(inputs.payload.samples.len(), files.len());

    // `--calibration -` and stdout: same payload, the provenance records the digest of stdin.
    let mut child = Command::new(bin())
        .args(["--calibration", "-", "--model", model.to_str().unwrap(), "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let calib_bytes = std::fs::read(&calib).unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&calib_bytes).unwrap();
    }
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success());
    let piped: Artifact<ModelInputs> = artifact::from_bytes(&piped.stdout).unwrap();
    assert_eq!(piped.payload, inputs.payload);
    assert_eq!(piped.provenance.digest_of("calibration"), inputs.provenance.digest_of("calibration"));
    assert!(inputs.provenance.digest_of("calibration").is_some());
    // Size: the resized RGB bytes dominate; everything else is a few bytes per token.
    let rgb: usize = inputs.payload.samples.iter().flat_map(|s| &s.images).map(|i| i.rgb.len()).sum();
    let tokens: usize = inputs.payload.samples.iter().map(|s| s.input_ids.len()).sum();
    eprintln!("artifact {} B for {} samples: {} B RGB, {} tokens", a.len(), files.len(), rgb, tokens);
    assert!(a.len() > rgb && a.len() < rgb + tokens * 40 + 64 * 1024, "{} bytes", a.len());
    // A COCO-size image (640×427 → 416×640 at default settings) costs ~0.8 MB per sample, an
    // f32 pixel_values tensor would be 2·4 = 8× that.
    let per_sample = rgb / files.len();
    assert!((100_000..2_000_000).contains(&per_sample), "{per_sample} B/sample");
}

fn assert_fails(args: &[&str], out: &Path, needle: &str) {
    let o = run(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("preprocess: "), "{stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "output left behind");
}

#[test]
fn cli_bad_inputs() {
    let fx = fixtures_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let calib = calibration(&fx, d, &["000000000009.jpg"]);
    let model = fx.join("qwen3-vl-tiny");
    let out = d.join("out.msgpack");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());

    // Wrong kind: a model-inputs artifact given as calibration.
    let wrong = d.join("wrong-kind.msgpack");
    let mi = ModelInputs {
        processor: Processor::from_model_dir(&model).unwrap().settings().clone(),
        special_tokens: Processor::from_model_dir(&model).unwrap().special_tokens().clone(),
        samples: vec![],
    };
    artifact::write(wrong.as_path(), &Artifact::new("test", Provenance::default(), mi)).unwrap();
    assert_fails(
        &["--calibration", wrong.to_str().unwrap(), "--model", m, "-o", o],
        &out,
        "wrong-kind.msgpack: artifact kind is 'qsens.model-inputs'",
    );

    // Wrong schema version.
    let mut a: Artifact<CalibrationSet> = artifact::read(calib.as_path()).unwrap();
    a.schema_version = 99;
    let v99 = d.join("v99.json");
    std::fs::write(&v99, artifact::to_bytes(&a, artifact::Encoding::Json).unwrap()).unwrap();
    assert_fails(&["--calibration", v99.to_str().unwrap(), "--model", m, "-o", o], &out, "schema version 99");

    // Truncated msgpack.
    let bytes = std::fs::read(&calib).unwrap();
    let cut = d.join("truncated.msgpack");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&["--calibration", cut.to_str().unwrap(), "--model", m, "-o", o], &out, "truncated.msgpack");

    // Unreadable tokenizer: a model dir whose tokenizer.json is garbage.
    let bad_model = d.join("bad-model");
    std::fs::create_dir(&bad_model).unwrap();
    for f in ["config.json", "preprocessor_config.json", "chat_template.jinja", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), bad_model.join(f)).unwrap();
    }
    std::fs::write(bad_model.join("tokenizer.json"), b"{ not json").unwrap();
    assert_fails(
        &["--calibration", calib.to_str().unwrap(), "--model", bad_model.to_str().unwrap(), "-o", o],
        &out,
        "tokenizer.json: cannot load tokenizer",
    );

    // An image that changed after calib-extract.
    let root = d.join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::copy(fx.join("images/000000000002.jpg"), root.join("000000000009.jpg")).unwrap();
    assert_fails(
        &["--calibration", calib.to_str().unwrap(), "--model", m, "--image-root", root.to_str().unwrap(), "-o", o],
        &out,
        "000000000009.jpg: image changed since calib-extract",
    );

    // Missing calibration file.
    assert_fails(
        &["--calibration", d.join("nope.msgpack").to_str().unwrap(), "--model", m, "-o", o],
        &out,
        "nope.msgpack",
    );
}
