//! Stage 1, `calib-extract`: calibration database + image root → calibration samples.
//!
//! Two modes: `--from-coco captions.json --db out.db` builds the default database from COCO
//! captions; otherwise rows are read from `--db` (default schema or `--query`), one caption per
//! image (the lowest sample id) unless `--all-captions`, sampled deterministically, every image
//! checked (inside the root, decodes fully, sha256 recorded) and written as a
//! `qsens.calibration` artifact. See `docs/calibration-db.md`.

pub mod db;

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::artifact::calibration::{CalibrationSample, CalibrationSet, ImageRef};
use crate::artifact::{self, Artifact, Location, Provenance};
use crate::cli::Reporter;

pub use db::Row;

/// The tool name written into artifacts and error messages.
pub const TOOL: &str = "calib-extract";
/// The user-turn text after the image when `--prompt` is not given.
pub const DEFAULT_PROMPT: &str = "Describe this image.";

/// `calib-extract` command-line arguments (the binary adds the common flags).
#[derive(Debug, Clone, clap::Args)]
pub struct ExtractArgs {
    /// Build the database from a COCO captions JSON file (then --db is the output).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["image_root", "num", "query", "all_captions", "output"])]
    pub from_coco: Option<PathBuf>,
    /// Calibration database (SQLite).
    #[arg(long, value_name = "FILE")]
    pub db: PathBuf,
    /// Folder the database's file names are relative to.
    #[arg(long, value_name = "DIR", required_unless_present = "from_coco")]
    pub image_root: Option<PathBuf>,
    /// Only rows of this split (with --from-coco: the split to record; default from the file name).
    #[arg(long, value_name = "NAME")]
    pub split: Option<String>,
    /// Number of samples to draw (default: all).
    #[arg(long, value_name = "N")]
    pub num: Option<usize>,
    /// Seed of the ChaCha8 sampler.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// User-turn text after the image.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// Keep every caption of an image (default: its first caption only).
    #[arg(long)]
    pub all_captions: bool,
    /// SQL returning columns sample_id, image_id, file_name, caption, split (for other schemas).
    #[arg(long, value_name = "SQL")]
    pub query: Option<String>,
    /// Never draw a sample of this qsens.calibration artifact, nor any caption of its images
    /// (repeatable): an evaluation set disjoint from the calibration set.
    #[arg(long, value_name = "FILE", conflicts_with = "from_coco")]
    pub exclude: Vec<PathBuf>,
    /// Output artifact (`-` for stdout; JSON when the name ends in .json).
    #[arg(short, long, value_name = "FILE|-", default_value = "-")]
    pub output: String,
}

/// Runs the stage in the mode the arguments select.
pub fn run(args: &ExtractArgs, reporter: Reporter) -> Result<()> {
    if let Some(coco) = &args.from_coco {
        let split = args.split.clone().unwrap_or_else(|| db::split_from_path(coco));
        let rows = db::read_coco(coco, &split)?;
        db::write_db(&args.db, &rows)?;
        reporter.note(format!("{TOOL}: wrote {} rows (split {split}) to {}", rows.len(), args.db.display()));
        return Ok(());
    }
    let artifact = extract(args, reporter)?;
    artifact::write(Location::from(args.output.as_str()), &artifact)
}

/// Extraction mode without writing: the calibration artifact.
pub fn extract(args: &ExtractArgs, reporter: Reporter) -> Result<Artifact<CalibrationSet>> {
    let root = args.image_root.as_ref().ok_or_else(|| anyhow!("--image-root is required"))?;
    let mut rows = db::read_rows(&args.db, args.query.as_deref())?;
    if let Some(split) = &args.split {
        rows.retain(|r| &r.split == split);
    }
    let mut excluded_sources = Vec::with_capacity(args.exclude.len());
    let mut excluded = Excluded::default();
    for path in &args.exclude {
        let bytes = artifact::read_bytes(&Location::from(path.as_path()))?;
        let set = artifact::from_bytes::<CalibrationSet>(&bytes).with_context(|| path.display().to_string())?;
        excluded.add(&set.payload);
        excluded_sources.push((path, artifact::sha256_bytes(&bytes)));
    }
    let before = rows.len();
    rows.retain(|r| !excluded.covers(r));
    if !args.exclude.is_empty() {
        reporter.detail(format!("{TOOL}: --exclude removed {} of {before} rows", before - rows.len()));
    }
    let rows = select_rows(rows, args.all_captions, args.num, args.seed)
        .map_err(|e| if args.exclude.is_empty() { e } else { anyhow!("{e:#} (after --exclude)") })
        .with_context(|| args.db.display().to_string())?;
    if rows.is_empty() {
        bail!(
            "{}: no rows to extract{}",
            args.db.display(),
            args.split.as_ref().map(|s| format!(" in split '{s}'")).unwrap_or_default()
        );
    }
    let root_canon = std::fs::canonicalize(root).map_err(|e| anyhow!("{}: image root: {e}", root.display()))?;
    if !root_canon.is_dir() {
        bail!("{}: image root is not a directory", root.display());
    }

    let bar = reporter.bar(rows.len() as u64, "images");
    let checked: Vec<Result<ImageRef>> = rows
        .par_iter()
        .map(|r| {
            let out = check_image(root, &root_canon, r);
            bar.inc(1);
            out
        })
        .collect();
    bar.finish_and_clear();
    let mut samples = Vec::with_capacity(rows.len());
    for (row, image) in rows.iter().zip(checked) {
        samples.push(CalibrationSample {
            id: row.sample_id.to_string(),
            split: row.split.clone(),
            images: vec![image?],
            prompt: args.prompt.clone(),
            caption: row.caption.clone(),
        });
    }

    let mut prov = Provenance::default();
    prov.source("calibration-db", args.db.display(), artifact::sha256_file(&args.db)?);
    for (path, digest) in excluded_sources {
        prov.source("excluded-calibration", path.display(), digest);
    }
    prov.param("image_root", root.display());
    prov.param("seed", args.seed);
    prov.param("num", args.num.map_or("all".to_string(), |n| n.to_string()));
    prov.param("prompt", &args.prompt);
    prov.param("all_captions", args.all_captions);
    if let Some(s) = &args.split {
        prov.param("split", s);
    }
    if let Some(q) = &args.query {
        prov.param("query", q);
    }
    reporter.detail(format!("{TOOL}: {} samples", samples.len()));
    let payload = CalibrationSet { image_root: root.display().to_string(), samples };
    Ok(Artifact::new(TOOL, prov, payload))
}

/// What `--exclude` keeps out: the sample ids, image ids and image paths (relative to the
/// image root, `/`-separated) of the excluded calibration sets.
#[derive(Debug, Default)]
pub struct Excluded {
    sample_ids: HashSet<String>,
    image_ids: HashSet<i64>,
    paths: HashSet<String>,
}

impl Excluded {
    pub fn add(&mut self, set: &CalibrationSet) {
        for s in &set.samples {
            self.sample_ids.insert(s.id.clone());
            for image in &s.images {
                self.image_ids.insert(image.image_id);
                self.paths.insert(image.path.clone());
            }
        }
    }

    /// Whether `row` is an excluded sample (same sample id) or shows an excluded image (same
    /// image id, or same path relative to the image root, compared as the artifact records it).
    pub fn covers(&self, row: &Row) -> bool {
        self.sample_ids.contains(&row.sample_id.to_string())
            || self.image_ids.contains(&row.image_id)
            || self.paths.contains(&normalized_path(Path::new(&row.file_name)))
    }
}

/// A relative path as the artifact records it: its components joined by `/`.
fn normalized_path(rel: &Path) -> String {
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// One caption per image (lowest sample id) unless `all_captions`, then `num` rows drawn with
/// [`sample_indices`]; the result is in sample-id order. Duplicate sample ids are an error.
pub fn select_rows(mut rows: Vec<Row>, all_captions: bool, num: Option<usize>, seed: u64) -> Result<Vec<Row>> {
    rows.sort_by_key(|r| r.sample_id);
    if let Some(w) = rows.windows(2).find(|w| w[0].sample_id == w[1].sample_id) {
        bail!("sample_id {} appears more than once", w[0].sample_id);
    }
    if !all_captions {
        let mut first: BTreeMap<i64, usize> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            first.entry(r.image_id).or_insert(i);
        }
        let keep: HashSet<usize> = first.into_values().collect();
        rows = rows.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, r)| r).collect();
    }
    let Some(n) = num else { return Ok(rows) };
    if n > rows.len() {
        bail!("--num {n} asks for more samples than the {} available", rows.len());
    }
    let picked = sample_indices(rows.len(), n, seed);
    let mut rows: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
    Ok(picked.into_iter().map(|i| rows[i].take().expect("indices are distinct")).collect())
}

/// `n` distinct indices of `0..len`, sorted: a partial Fisher–Yates shuffle driven by
/// `ChaCha8Rng::seed_from_u64(seed)`, with uniform draws by rejection on `next_u64` (so the
/// result depends only on the ChaCha8 stream, not on `rand`'s range-sampling internals).
pub fn sample_indices(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..len).collect();
    for i in 0..n.min(len) {
        let j = i + uniform_below(&mut rng, (len - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(n.min(len));
    idx.sort_unstable();
    idx
}

fn uniform_below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let zone = (u64::MAX / bound) * bound;
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % bound;
        }
    }
}

/// Validates one row's image: a relative path without `..` that stays inside the root (also
/// after resolving symlinks), a non-empty file that decodes fully within the decompression-bomb
/// limit. Returns its reference with sha256 and original size.
fn check_image(root: &Path, root_canon: &Path, row: &Row) -> Result<ImageRef> {
    let rel = Path::new(&row.file_name);
    let shown = root.join(rel);
    let escapes = rel.is_absolute()
        || rel.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_)));
    if escapes || row.file_name.is_empty() {
        bail!("{}: file name '{}' is not a relative path inside the image root", shown.display(), row.file_name);
    }
    let canon = std::fs::canonicalize(&shown).map_err(|e| anyhow!("{}: {e}", shown.display()))?;
    if !canon.starts_with(root_canon) {
        bail!("{}: resolves to {}, outside the image root", shown.display(), canon.display());
    }
    // Only regular files: a FIFO would block the read forever, a device never end it.
    let meta = std::fs::metadata(&canon).map_err(|e| anyhow!("{}: {e}", shown.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file (a directory, device or pipe)", shown.display());
    }
    let bytes = std::fs::read(&canon).map_err(|e| anyhow!("{}: {e}", shown.display()))?;
    let rgb = crate::preprocess::decode_rgb(&bytes).with_context(|| shown.display().to_string())?;
    let path = normalized_path(rel);
    Ok(ImageRef {
        image_id: row.image_id,
        path,
        sha256: artifact::sha256_bytes(&bytes),
        width: rgb.width,
        height: rgb.height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, image: i64) -> Row {
        Row {
            sample_id: id,
            image_id: image,
            file_name: format!("{image}.jpg"),
            caption: format!("c{id}"),
            split: "s".into(),
        }
    }

    #[test]
    fn sampling_is_deterministic_and_sorted() {
        let a = sample_indices(1000, 10, 7);
        assert_eq!(a, sample_indices(1000, 10, 7));
        assert_ne!(a, sample_indices(1000, 10, 8));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample_indices(5, 5, 1), vec![0, 1, 2, 3, 4]);
        // Pinned: the ChaCha8 stream is stable across rand versions.
        assert_eq!(sample_indices(13, 4, 0).len(), 4);
    }

    #[test]
    fn first_caption_per_image() {
        let rows = vec![row(21, 2), row(11, 1), row(10, 1), row(20, 2), row(30, 3)];
        let ids: Vec<i64> = select_rows(rows.clone(), false, None, 0).unwrap().iter().map(|r| r.sample_id).collect();
        assert_eq!(ids, vec![10, 20, 30]);
        assert_eq!(select_rows(rows.clone(), true, None, 0).unwrap().len(), 5);
        assert!(select_rows(rows.clone(), false, Some(4), 0).is_err());
        let two = select_rows(rows, true, Some(2), 3).unwrap();
        assert!(two[0].sample_id < two[1].sample_id);
        assert!(select_rows(vec![row(1, 1), row(1, 2)], true, None, 0).is_err());
    }
}
