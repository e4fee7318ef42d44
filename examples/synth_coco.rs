//! Writes N synthetic photo-like JPEGs and a COCO captions JSON for benchmarks:
//! `cargo run --release --example synth_coco -- OUT_DIR N WIDTH HEIGHT`.
//!
//! Each image is a smooth colour field with edges and deterministic noise (xorshift), encoded at
//! quality 90 with 4:2:0 chroma (the `image` crate's encoder), so decoding exercises the same
//! paths as COCO photos. Two captions per image, as in COCO.

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: synth_coco OUT_DIR N WIDTH HEIGHT");
        std::process::exit(2);
    }
    let out = std::path::PathBuf::from(&args[1]);
    let n: u32 = args[2].parse().expect("N");
    let (w, h): (u32, u32) = (args[3].parse().expect("WIDTH"), args[4].parse().expect("HEIGHT"));
    std::fs::create_dir_all(out.join("images")).expect("create output dir");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..n {
        let (fx, fy, phase) = (1.0 + (i % 7) as f32, 1.0 + (i % 5) as f32, i as f32 * 0.37);
        let mut px = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
                let edge = if (u * 4.0 + v * 3.0 + phase).fract() < 0.5 { 40.0 } else { 0.0 };
                let noise = (next() % 17) as f32 - 8.0;
                let r = 128.0 + 90.0 * (std::f32::consts::TAU * fx * u + phase).sin() + edge + noise;
                let g = 128.0 + 90.0 * (std::f32::consts::TAU * fy * v - phase).cos() - edge + noise;
                let b = 128.0 + 60.0 * (std::f32::consts::TAU * (u + v) * 2.0).sin() + noise;
                px.extend([r, g, b].map(|c| c.clamp(0.0, 255.0) as u8));
            }
        }
        let name = format!("{:012}.jpg", i + 1);
        let file = std::fs::File::create(out.join("images").join(&name)).expect("create image");
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 90);
        enc.encode(&px, w, h, image::ExtendedColorType::Rgb8).expect("encode JPEG");
        images.push(serde_json::json!({"id": i + 1, "file_name": name, "width": w, "height": h}));
        for k in 0..2 {
            annotations.push(serde_json::json!({
                "id": (i + 1) * 10 + k,
                "image_id": i + 1,
                "caption": format!("A synthetic picture number {} with colourful stripes, variant {}.", i + 1, k),
            }));
        }
    }
    let json = serde_json::json!({"info": {}, "licenses": [], "images": images, "annotations": annotations});
    let mut f = std::fs::File::create(out.join("captions_synth.json")).expect("create json");
    f.write_all(serde_json::to_string(&json).expect("json").as_bytes()).expect("write json");
}
