//! The demo images: small procedural drawings with captions that describe them, and the COCO
//! captions file that lists them.
//!
//! Every pixel is computed with integer arithmetic and `f32` `+ - * /` only (no `sin`, `exp`, ...
//! whose last bit depends on the platform's libm), and the encoders (`image`'s JPEG and PNG) are
//! deterministic, so the bytes are the same on every machine for a given `Cargo.lock`.
//!
//! The set mirrors the edge cases of the real pipeline (see `shared/fixtures/README.md`): a
//! grayscale (L) JPEG, an RGBA PNG whose transparent pixels hide black RGB values (HF composites
//! onto white), a 40×30 image that `smart_resize` must scale *up* to `min_pixels`, images large
//! enough to be scaled *down* to `max_pixels`, a 208×144 image whose sides are odd multiples of 16
//! (Python's `round` rounds 6.5 and 4.5 to even, Rust's `f64::round` away from zero), a panorama
//! and a portrait.

use std::io::Cursor;

use anyhow::{Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use serde::Serialize;

/// JPEG quality of the demo JPEGs (the fixture photos use 90 too).
pub const JPEG_QUALITY: u8 = 90;

/// File format of a demo image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
}

/// Colour type the file is stored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 8-bit RGB.
    Rgb,
    /// 8-bit grayscale.
    L,
    /// 8-bit RGBA with real transparency.
    Rgba,
}

/// One demo image: what it is, how it is stored, and its two captions.
#[derive(Debug, Clone, Copy)]
pub struct DemoImage {
    /// COCO image id; the file name is the id zero-padded to 12 digits, as in COCO.
    pub id: i64,
    pub width: u32,
    pub height: u32,
    pub format: Format,
    pub mode: Mode,
    /// Two captions, in annotation-id order (`id*10+1`, `id*10+2`).
    pub captions: [&'static str; 2],
    /// Why the image is in the set (edge case or plain scene).
    pub note: &'static str,
    draw: fn(&mut Canvas),
}

impl DemoImage {
    pub fn file_name(&self) -> String {
        let ext = match self.format {
            Format::Jpeg => "jpg",
            Format::Png => "png",
        };
        format!("{:012}.{ext}", self.id)
    }

    /// The RGBA drawing before conversion to the stored colour type.
    pub fn render(&self) -> Canvas {
        let mut canvas = Canvas::new(self.width, self.height, [0, 0, 0, 255]);
        (self.draw)(&mut canvas);
        canvas
    }

    /// The encoded file bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let canvas = self.render();
        let (data, color) = match self.mode {
            Mode::Rgb => {
                (canvas.px.iter().flat_map(|p| [p[0], p[1], p[2]]).collect::<Vec<u8>>(), ExtendedColorType::Rgb8)
            }
            Mode::L => (canvas.px.iter().map(|p| p[0]).collect(), ExtendedColorType::L8),
            Mode::Rgba => (canvas.px.iter().flatten().copied().collect(), ExtendedColorType::Rgba8),
        };
        let mut out = Vec::new();
        let result = match self.format {
            Format::Jpeg => JpegEncoder::new_with_quality(Cursor::new(&mut out), JPEG_QUALITY).write_image(
                &data,
                self.width,
                self.height,
                color,
            ),
            Format::Png => PngEncoder::new(Cursor::new(&mut out)).write_image(&data, self.width, self.height, color),
        };
        result.with_context(|| format!("encoding demo image {}", self.file_name()))?;
        Ok(out)
    }
}

/// An RGBA raster with 4×4-supersampled shape filling.
#[derive(Debug, Clone)]
pub struct Canvas {
    pub width: u32,
    pub height: u32,
    /// Row-major pixels.
    pub px: Vec<[u8; 4]>,
}

type Rgba = [u8; 4];

const fn rgb(r: u8, g: u8, b: u8) -> Rgba {
    [r, g, b, 255]
}

impl Canvas {
    fn new(width: u32, height: u32, fill: Rgba) -> Self {
        Canvas { width, height, px: vec![fill; (width * height) as usize] }
    }

    fn set(&mut self, x: u32, y: u32, c: Rgba) {
        self.px[(y * self.width + x) as usize] = c;
    }

    fn fill(&mut self, c: Rgba) {
        self.px.iter_mut().for_each(|p| *p = c);
    }

    /// Paints `c` over the pixels whose area lies inside the shape, blending by coverage
    /// (16 sub-samples per pixel). `inside` takes continuous coordinates (pixel centres at +0.5).
    fn paint(&mut self, c: Rgba, inside: impl Fn(f32, f32) -> bool) {
        for y in 0..self.height {
            for x in 0..self.width {
                let mut k = 0u32;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let fx = x as f32 + (sx as f32 + 0.5) / 4.0;
                        let fy = y as f32 + (sy as f32 + 0.5) / 4.0;
                        k += u32::from(inside(fx, fy));
                    }
                }
                if k > 0 {
                    let p = &mut self.px[(y * self.width + x) as usize];
                    for ch in 0..4 {
                        p[ch] = ((u32::from(c[ch]) * k + u32::from(p[ch]) * (16 - k) + 8) / 16) as u8;
                    }
                }
            }
        }
    }

    fn circle(&mut self, c: Rgba, cx: f32, cy: f32, r: f32) {
        self.paint(c, |x, y| (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r);
    }

    fn ellipse(&mut self, c: Rgba, cx: f32, cy: f32, rx: f32, ry: f32) {
        self.paint(c, |x, y| {
            let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
            dx * dx + dy * dy <= 1.0
        });
    }

    fn rect(&mut self, c: Rgba, x0: f32, y0: f32, x1: f32, y1: f32) {
        self.paint(c, |x, y| x >= x0 && x < x1 && y >= y0 && y < y1);
    }
}

fn red_circle(c: &mut Canvas) {
    c.fill(rgb(30, 60, 200));
    c.circle(rgb(220, 30, 30), 160.0, 120.0, 70.0);
}

fn sun_and_hills(c: &mut Canvas) {
    c.fill(rgb(135, 206, 235));
    c.circle(rgb(255, 215, 0), 310.0, 70.0, 38.0);
    c.ellipse(rgb(60, 160, 60), 110.0, 330.0, 200.0, 130.0);
    c.ellipse(rgb(40, 130, 40), 320.0, 350.0, 190.0, 120.0);
}

fn checkerboard(c: &mut Canvas) {
    let cell = c.width / 8;
    for y in 0..c.height {
        for x in 0..c.width {
            let white = (x / cell + y / cell) % 2 == 0;
            c.set(x, y, if white { rgb(255, 255, 255) } else { rgb(0, 0, 0) });
        }
    }
}

fn gray_gradient(c: &mut Canvas) {
    let w = c.width - 1;
    for y in 0..c.height {
        for x in 0..c.width {
            let v = ((255 * x + w / 2) / w) as u8;
            c.set(x, y, rgb(v, v, v));
        }
    }
}

/// Transparent background (with black RGB under it), an opaque orange square, and a green bar
/// whose alpha ramps from 0 on the left to 255 on the right.
fn orange_square_rgba(c: &mut Canvas) {
    c.fill([0, 0, 0, 0]);
    c.rect(rgb(255, 140, 0), 80.0, 25.0, 160.0, 105.0);
    let (x0, x1) = (20, 220);
    for y in 130..160 {
        for x in x0..x1 {
            let a = ((255 * (x - x0) + (x1 - x0 - 1) / 2) / (x1 - x0 - 1)) as u8;
            c.set(x, y, [0, 128, 0, a]);
        }
    }
}

fn tiny_purple_square(c: &mut Canvas) {
    c.fill(rgb(255, 255, 255));
    c.rect(rgb(128, 0, 128), 12.0, 7.0, 28.0, 23.0);
}

fn rainbow_stripes(c: &mut Canvas) {
    const COLORS: [Rgba; 6] =
        [rgb(230, 0, 0), rgb(255, 140, 0), rgb(255, 220, 0), rgb(0, 170, 0), rgb(0, 80, 220), rgb(130, 0, 160)];
    for y in 0..c.height {
        for x in 0..c.width {
            c.set(x, y, COLORS[(x * 6 / c.width) as usize]);
        }
    }
}

fn traffic_light(c: &mut Canvas) {
    c.fill(rgb(170, 210, 240));
    c.rect(rgb(90, 90, 90), 54.0, 150.0, 66.0, 200.0);
    c.rect(rgb(50, 50, 50), 30.0, 10.0, 90.0, 160.0);
    c.circle(rgb(230, 20, 20), 60.0, 40.0, 18.0);
    c.circle(rgb(250, 200, 0), 60.0, 85.0, 18.0);
    c.circle(rgb(20, 200, 60), 60.0, 130.0, 18.0);
}

fn night_sky(c: &mut Canvas) {
    const NAVY: Rgba = rgb(10, 20, 60);
    const STARS: [(f32, f32); 12] = [
        (18.0, 14.0),
        (41.0, 50.0),
        (67.0, 25.0),
        (90.0, 60.0),
        (112.0, 11.0),
        (136.0, 40.0),
        (158.0, 20.0),
        (181.0, 56.0),
        (203.0, 31.0),
        (226.0, 12.0),
        (244.0, 47.0),
        (262.0, 23.0),
    ];
    c.fill(NAVY);
    for (x, y) in STARS {
        c.circle(rgb(255, 255, 255), x, y, 2.0);
    }
    c.circle(rgb(250, 240, 180), 300.0, 36.0, 24.0);
    c.circle(NAVY, 311.0, 30.0, 22.0);
}

/// The demo images, in id order.
pub fn demo_images() -> Vec<DemoImage> {
    vec![
        DemoImage {
            id: 1,
            width: 320,
            height: 240,
            format: Format::Jpeg,
            mode: Mode::Rgb,
            captions: [
                "A red circle in the middle of a plain blue background.",
                "A bright red disk centered on a solid blue field.",
            ],
            note: "scene; 320×256 after rounding is above max_pixels: scaled down to 288×192",
            draw: red_circle,
        },
        DemoImage {
            id: 2,
            width: 400,
            height: 300,
            format: Format::Jpeg,
            mode: Mode::Rgb,
            captions: [
                "A yellow sun shines in a light blue sky above two rolling green hills.",
                "A simple landscape drawing with green hills and a yellow sun in the upper right.",
            ],
            note: "scene; scaled down to 288×192",
            draw: sun_and_hills,
        },
        DemoImage {
            id: 3,
            width: 256,
            height: 256,
            format: Format::Png,
            mode: Mode::Rgb,
            captions: [
                "A black and white checkerboard with eight rows of eight squares.",
                "A chessboard pattern of alternating black and white squares.",
            ],
            note: "RGB PNG, sharp edges; rounds to exactly max_pixels (64 tokens): the `>` boundary",
            draw: checkerboard,
        },
        DemoImage {
            id: 4,
            width: 300,
            height: 200,
            format: Format::Jpeg,
            mode: Mode::L,
            captions: [
                "A grayscale gradient that fades from black on the left to white on the right.",
                "A smooth horizontal ramp of gray tones, dark on the left and light on the right.",
            ],
            note: "edge: grayscale (L) JPEG, replicated to 3 channels",
            draw: gray_gradient,
        },
        DemoImage {
            id: 5,
            width: 240,
            height: 180,
            format: Format::Png,
            mode: Mode::Rgba,
            captions: [
                "An orange square above a green bar that fades in from left to right, on a transparent background.",
                "A cut-out orange square and a green stripe that becomes more solid toward the right.",
            ],
            note: "edge: RGBA PNG, transparent pixels are black underneath (composite onto white)",
            draw: orange_square_rgba,
        },
        DemoImage {
            id: 6,
            width: 40,
            height: 30,
            format: Format::Jpeg,
            mode: Mode::Rgb,
            captions: [
                "A small purple square in the center of a white background.",
                "A tiny picture of a purple square on white.",
            ],
            note: "edge: tiny, scaled up past min_pixels to 96×64",
            draw: tiny_purple_square,
        },
        DemoImage {
            id: 7,
            width: 208,
            height: 144,
            format: Format::Png,
            mode: Mode::Rgb,
            captions: [
                "Six vertical stripes in rainbow colors: red, orange, yellow, green, blue and purple.",
                "A rainbow of colored vertical bands from red on the left to purple on the right.",
            ],
            note: "edge: 208/32 = 6.5 and 144/32 = 4.5, Python rounds half to even: 192×128",
            draw: rainbow_stripes,
        },
        DemoImage {
            id: 8,
            width: 120,
            height: 200,
            format: Format::Jpeg,
            mode: Mode::Rgb,
            captions: [
                "A traffic light with red, yellow and green lamps on a dark gray housing against a light blue sky.",
                "A vertical traffic signal with its red light on top and its green light at the bottom.",
            ],
            note: "scene; portrait",
            draw: traffic_light,
        },
        DemoImage {
            id: 9,
            width: 360,
            height: 72,
            format: Format::Jpeg,
            mode: Mode::Rgb,
            captions: [
                "A wide strip of dark blue night sky with small white stars and a pale crescent moon on the right.",
                "A panoramic night scene of scattered white stars and a yellowish crescent moon.",
            ],
            note: "edge: panorama (5:1)",
            draw: night_sky,
        },
    ]
}

/// `captions.json` in the COCO captions 2017 layout.
#[derive(Debug, Serialize)]
struct CocoCaptions {
    info: CocoInfo,
    licenses: Vec<CocoLicense>,
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

#[derive(Debug, Serialize)]
struct CocoInfo {
    description: &'static str,
    url: &'static str,
    version: &'static str,
    year: u32,
    contributor: &'static str,
    date_created: &'static str,
}

#[derive(Debug, Serialize)]
struct CocoLicense {
    url: &'static str,
    id: u32,
    name: &'static str,
}

#[derive(Debug, Serialize)]
struct CocoImage {
    license: u32,
    file_name: String,
    coco_url: &'static str,
    height: u32,
    width: u32,
    date_captured: &'static str,
    flickr_url: &'static str,
    id: i64,
}

#[derive(Debug, Serialize)]
struct CocoAnnotation {
    image_id: i64,
    id: i64,
    caption: &'static str,
}

/// The bytes of `captions.json` for `images` (pretty JSON, fixed dates so that it is reproducible).
pub fn coco_captions_json(images: &[DemoImage]) -> Result<Vec<u8>> {
    let coco = CocoCaptions {
        info: CocoInfo {
            description: "qsens demo captions (COCO captions 2017 layout) for procedurally drawn images",
            url: "",
            version: "1.0",
            year: 2026,
            contributor: "qsens::demo (generated)",
            date_created: "2026/01/01",
        },
        licenses: vec![CocoLicense {
            url: "https://creativecommons.org/publicdomain/zero/1.0/",
            id: 1,
            name: "CC0 1.0 (drawn by qsens::demo)",
        }],
        images: images
            .iter()
            .map(|im| CocoImage {
                license: 1,
                file_name: im.file_name(),
                coco_url: "",
                height: im.height,
                width: im.width,
                date_captured: "2026-01-01 00:00:00",
                flickr_url: "",
                id: im.id,
            })
            .collect(),
        annotations: images
            .iter()
            .flat_map(|im| {
                im.captions.iter().zip(1..).map(|(caption, k)| CocoAnnotation {
                    image_id: im.id,
                    id: im.id * 10 + k,
                    caption,
                })
            })
            .collect(),
    };
    let mut bytes = serde_json::to_vec_pretty(&coco)?;
    bytes.push(b'\n');
    Ok(bytes)
}
