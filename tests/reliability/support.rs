//! What the reliability tests share: the binaries, the generated demo set, one baseline run of
//! the pipeline on it, and small file-crafting helpers (safetensors, SQLite, images).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use qsens::artifact::{self, Artifact, Encoding, Payload};

#[allow(dead_code)]
pub const STAGES: [&str; 5] = ["calib-extract", "preprocess", "score-layers", "search", "manifest-to-md"];

/// Path of a stage binary (built by cargo for the integration tests).
pub fn bin(tool: &str) -> &'static str {
    match tool {
        "calib-extract" => env!("CARGO_BIN_EXE_calib-extract"),
        "preprocess" => env!("CARGO_BIN_EXE_preprocess"),
        "score-layers" => env!("CARGO_BIN_EXE_score-layers"),
        "search" => env!("CARGO_BIN_EXE_search"),
        "manifest-to-md" => env!("CARGO_BIN_EXE_manifest-to-md"),
        other => panic!("no binary {other}"),
    }
}

/// Folder of the binaries (the Makefile's `BIN_DIR`).
pub fn bin_dir() -> PathBuf {
    Path::new(bin("search")).parent().unwrap().to_path_buf()
}

/// Runs a stage with `args`, stdin closed.
pub fn run(tool: &str, args: &[String]) -> Output {
    Command::new(bin(tool))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

/// Runs a stage that must succeed.
pub fn ok(tool: &str, args: &[String]) -> Output {
    let o = run(tool, args);
    assert!(o.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// `&[&str]`-ish to owned args.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(::std::string::ToString::to_string(&$a)),*] };
}

pub fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 test path").to_string()
}

/// A scratch folder under cargo's per-target temporary directory (cleared first).
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The demo set (images, captions, tiny model), generated once per test process.
pub fn demo() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reliability").join("demo");
        qsens::demo::write_demo_set(&dir).expect("demo set");
        dir
    })
}

/// One uninterrupted run of the pipeline on three demo samples: the good inputs the bad ones
/// are made from.
pub struct Base {
    pub db: PathBuf,
    pub calibration: PathBuf,
    pub inputs: PathBuf,
    pub scores: PathBuf,
    pub manifest: PathBuf,
}

pub fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| build_base("base", 3, &[]))
}

/// The same on two samples with images of at most 4096 pixels: small seeds for fuzzing.
pub fn small_base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| build_base("small-base", 2, &args!["--max-pixels", 4096]))
}

fn build_base(name: &str, num: usize, preprocess_args: &[String]) -> Base {
    let demo = demo();
    let dir = scratch(name);
    let b = Base {
        db: dir.join("calibration.db"),
        calibration: dir.join("calibration.msgpack"),
        inputs: dir.join("inputs.msgpack"),
        scores: dir.join("scores.msgpack"),
        manifest: dir.join("manifest.json"),
    };
    let model = demo.join("model");
    ok("calib-extract", &args!["--from-coco", s(&demo.join("captions.json")), "--db", s(&b.db), "-q"]);
    ok(
        "calib-extract",
        &args!["--db", s(&b.db), "--image-root", s(&demo.join("images")), "--num", num, "-o", s(&b.calibration)],
    );
    let mut a = args!["--calibration", s(&b.calibration), "--model", s(&model), "-o", s(&b.inputs)];
    a.extend(preprocess_args.iter().cloned());
    ok("preprocess", &a);
    ok(
        "score-layers",
        &args!["--model", s(&model), "--inputs", s(&b.inputs), "--exclude-cost", "*lm_head*", "-q", "-o", s(&b.scores)],
    );
    ok(
        "search",
        &args![
            "--scores",
            s(&b.scores),
            "--effective-bits",
            12,
            "--exclude-cost",
            "*lm_head*",
            "--bootstrap",
            100,
            "-q",
            "-o",
            s(&b.manifest)
        ],
    );
    b
}

pub fn read<P: Payload>(path: &Path) -> Artifact<P> {
    artifact::read(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// Writes an artifact in the given encoding (whatever the file name says).
pub fn write_as<P: Payload>(path: &Path, a: &Artifact<P>, enc: Encoding) {
    std::fs::write(path, artifact::to_bytes(a, enc).unwrap()).unwrap();
}

/// Copies every file of `from` into a new folder `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Every file below `dir` (relative `/`-separated path → bytes), sorted.
pub fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A named pipe at `path` (`mkfifo`).
pub fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success(), "mkfifo {}", path.display());
}

// ---- safetensors ------------------------------------------------------------------------------

/// One tensor of a safetensors file: name, dtype (`F32`, ...), shape, raw bytes.
#[derive(Debug, Clone)]
pub struct StTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses a (valid) safetensors file, tensors in data order.
pub fn st_read(bytes: &[u8]) -> Vec<StTensor> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out: Vec<(usize, StTensor)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let off: Vec<usize> =
                v["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let t = StTensor {
                name: k.clone(),
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect(),
                data: data[off[0]..off[1]].to_vec(),
            };
            (off[0], t)
        })
        .collect();
    out.sort_by_key(|(o, _)| *o);
    out.into_iter().map(|(_, t)| t).collect()
}

/// Serializes tensors (in the given order) as a safetensors file.
pub fn st_write(tensors: &[StTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for t in tensors {
        out.extend(&t.data);
    }
    out
}

// ---- images -----------------------------------------------------------------------------------

/// A CMYK JPEG as Adobe writes them (what Pillow opens as mode CMYK).
pub fn cmyk_jpeg(w: usize, h: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        for x in 0..w {
            data.extend([(x * 255 / w) as u8, (y * 255 / h) as u8, 128, 200]);
        }
    }
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
    c.set_size(w, h);
    c.set_quality(90.0);
    let mut started = c.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&data).unwrap();
    started.finish().unwrap()
}

/// A 16-bit PNG (`L16`, `La16`, `Rgb16` or `Rgba16`).
pub fn png16(w: u32, h: u32, color: image::ExtendedColorType) -> Vec<u8> {
    use image::ImageEncoder;
    let channels = color.channel_count() as usize;
    let samples: Vec<u16> = (0..(w * h) as usize * channels).map(|i| ((i * 7919) % 65536) as u16 | 0x0101).collect();
    let bytes: Vec<u8> = samples.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(&bytes, w, h, color).unwrap();
    out
}

/// An 8-bit RGB JPEG.
pub fn rgb_jpeg(w: u32, h: u32) -> Vec<u8> {
    let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut out).encode(&data, w, h, image::ExtendedColorType::Rgb8).unwrap();
    out
}

/// A PNG whose header claims `w × h` pixels, with an empty IDAT (a decompression bomb's header).
pub fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
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
    png
}

/// A real JPEG whose SOF0 is patched to claim `w × h` pixels.
pub fn jpeg_bomb(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = rgb_jpeg(16, 16);
    let sof = jpeg.windows(2).position(|x| x == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}
