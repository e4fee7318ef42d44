//! The fuzz targets: one `#[test]` each (they run in parallel with the rest of the suite).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use qsens::artifact::calibration::CalibrationSet;
use qsens::artifact::inputs::ModelInputs;
use qsens::artifact::manifest::{Manifest, ScoresSource};
use qsens::artifact::scores::Scores;
use qsens::artifact::{self, Artifact, Encoding, Location, Provenance};
use qsens::cli::Reporter;
use qsens::model::qwen3_vl::{Config as ModelConfig, ForwardOptions, Keep, LogitsMode, Qwen3VL};
use qsens::model::NoTap;
use qsens::preprocess::config::PreprocessorConfig;
use serde_json::Value;

use super::fuzz;
use super::mutate::{self, apply_bytes, apply_tree, byte_mut, tree_mut, ByteMut, Plan, Seeds, TreeMut};
use crate::support::*;

/// msgpack and JSON encodings of an artifact file.
fn both_encodings<P: artifact::Payload>(path: &Path) -> Vec<Vec<u8>> {
    let a: Artifact<P> = read(path);
    vec![artifact::to_bytes(&a, Encoding::MessagePack).unwrap(), artifact::to_bytes(&a, Encoding::Json).unwrap()]
}

fn plans() -> impl Strategy<Value = Plan> {
    mutate::plan(true)
}

fn model() -> &'static Qwen3VL {
    static M: OnceLock<Qwen3VL> = OnceLock::new();
    M.get_or_init(|| Qwen3VL::load(&demo().join("model"), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap())
}

fn processor() -> &'static qsens::preprocess::Processor {
    static P: OnceLock<qsens::preprocess::Processor> = OnceLock::new();
    P.get_or_init(|| qsens::preprocess::Processor::from_model_dir(&demo().join("model")).unwrap())
}

fn source() -> ScoresSource {
    ScoresSource {
        path: "fuzz".into(),
        digest: "sha256:0".into(),
        tool: "fuzz".into(),
        tool_version: "0".into(),
        provenance: Provenance::default(),
    }
}

// ---- artifacts --------------------------------------------------------------------------------

/// `qsens.calibration` → preprocess every sample (images from the demo folder, as
/// `--image-root` would).
#[test]
fn fuzz_calibration() {
    let seeds = Seeds::new(both_encodings::<CalibrationSet>(&small_base().calibration));
    let images = demo().join("images");
    let p = processor();
    fuzz("calibration", plans(), |plan| {
        let Ok(a) = artifact::from_bytes::<CalibrationSet>(&seeds.make(plan)) else { return false };
        a.payload.samples.iter().take(4).all(|s| p.sample(s, &images).is_ok())
    });
}

/// `qsens.model-inputs` → the checks score-layers makes, then forward and backward of the
/// tiny model on the first samples (gradient and kl_div logits modes).
#[test]
fn fuzz_model_inputs() {
    let seeds = Seeds::new(both_encodings::<ModelInputs>(&small_base().inputs));
    let typed: ModelInputs = artifact::from_bytes::<ModelInputs>(&seeds.bytes[0]).unwrap().payload;
    let m = model();
    let input = prop_oneof![plans().prop_map(Err), input_edits().prop_map(Ok)];
    fuzz("model_inputs", input, |input| {
        let inputs = match input {
            Err(plan) => match artifact::from_bytes::<ModelInputs>(&seeds.make(plan)) {
                Ok(a) => a.payload,
                Err(_) => return false,
            },
            Ok(edits) => edits.apply(&typed),
        };
        if qsens::score::validate_inputs(&inputs, m, qsens::score::Method::Gradient).is_err() {
            return false;
        }
        let mut ok = true;
        for s in inputs.samples.iter().take(2) {
            let Ok(input) = qsens::score::model_input(s, &inputs) else { return false };
            let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
            match m.forward(&input, &mut NoTap, &opts) {
                Ok(fwd) => ok &= m.backward(&fwd, &mut NoTap).is_ok(),
                Err(_) => ok = false,
            }
            let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Resume, trace: false };
            if let Ok(fwd) = m.forward(&input, &mut NoTap, &opts) {
                ok &= m.forward_from(&fwd, 5, &mut NoTap).is_ok();
            }
        }
        ok
    });
}

/// Value edits of typed model inputs that keep lengths consistent: token ids and labels within
/// the vocabulary, any position ids, any pixel bytes.
#[derive(Debug, Clone)]
struct InputEdits {
    ids: Vec<(Index, Index, u32)>,
    labels: Vec<(Index, Index, i32)>,
    positions: Vec<(Index, usize, Index, i64)>,
    pixels: Vec<(Index, Index, u8)>,
}

impl InputEdits {
    fn apply(&self, base: &ModelInputs) -> ModelInputs {
        let mut m = base.clone();
        let n = m.samples.len();
        for (s, i, v) in &self.ids {
            let ids = &mut m.samples[s.index(n)].input_ids;
            let k = i.index(ids.len());
            ids[k] = *v;
        }
        for (s, i, v) in &self.labels {
            let labels = &mut m.samples[s.index(n)].labels;
            let k = i.index(labels.len());
            labels[k] = *v;
        }
        for (s, axis, i, v) in &self.positions {
            let p = &mut m.samples[s.index(n)].position_ids[*axis];
            let k = i.index(p.len());
            p[k] = *v;
        }
        for (s, i, v) in &self.pixels {
            if let Some(img) = m.samples[s.index(n)].images.first_mut() {
                let k = i.index(img.rgb.len());
                img.rgb[k] = *v;
            }
        }
        m
    }
}

fn input_edits() -> impl Strategy<Value = InputEdits> {
    let id = prop_oneof![0u32..512, prop::sample::select(vec![449u32, 450, 451, 452, 453, 511])];
    let label = prop_oneof![Just(-100i32), 0i32..512];
    let pos = prop_oneof![-5i64..300, prop::sample::select(vec![i64::MIN, i64::MAX, -1, 1 << 40, 1 << 24])];
    (
        prop::collection::vec((any::<Index>(), any::<Index>(), id), 0..4),
        prop::collection::vec((any::<Index>(), any::<Index>(), label), 0..6),
        prop::collection::vec((any::<Index>(), 0usize..3, any::<Index>(), pos), 0..8),
        prop::collection::vec((any::<Index>(), any::<Index>(), any::<u8>()), 0..8),
    )
        .prop_map(|(ids, labels, positions, pixels)| InputEdits { ids, labels, positions, pixels })
}

/// `qsens.scores` → the whole search (validation, solver, frontier, bootstrap, exports), and
/// the resume / merge checks of score-layers.
#[test]
fn fuzz_scores() {
    let mut bytes = both_encodings::<Scores>(&small_base().scores);
    let spec = qsens::search::synthetic::SyntheticSpec {
        vision_blocks: 2,
        deepstack: 1,
        text_layers: 2,
        formats: 4,
        samples: 5,
        seed: 1,
        ragged: true,
    };
    let synthetic = Artifact::new("fuzz", Provenance::default(), qsens::search::synthetic::scores(&spec));
    bytes.push(artifact::to_bytes(&synthetic, Encoding::MessagePack).unwrap());
    bytes.push(artifact::to_bytes(&synthetic, Encoding::Json).unwrap());
    let seeds = Seeds::new(bytes);
    let typed: Vec<Scores> = seeds.bytes.iter().step_by(2).map(|b| artifact::from_bytes(b).unwrap().payload).collect();
    let input = prop_oneof![plans().prop_map(ScoresInput::Bytes), typed_edits().prop_map(ScoresInput::Typed)];
    let strategy = (input, prop::sample::select(vec![4.5, 8.0, 9.75, 12.0, 15.99, 16.0, 0.1]));
    fuzz("scores", strategy, |(input, bits)| {
        let a = match input {
            ScoresInput::Bytes(plan) => match artifact::from_bytes::<Scores>(&seeds.make(plan)) {
                Ok(a) => a,
                Err(_) => return false,
            },
            ScoresInput::Typed(edits) => {
                Artifact::new("fuzz", Provenance::default(), edits.apply(&typed[edits.seed.index(typed.len())]))
            }
        };
        if qsens::score::state::check_consistent(&a.payload).is_ok() {
            let mut s = a.payload.clone();
            qsens::score::state::recompute_totals(&mut s);
            let _ = qsens::score::state::merge_shards(vec![(Location::Std, a.clone())]);
        }
        let mut settings = qsens::search::Settings::new(*bits);
        settings.bootstrap.resamples = 20;
        settings.overrides.exclude_cost = vec!["*lm_head*".into()];
        qsens::search::build_manifest(&a.payload, source(), &settings, Reporter::silent()).is_ok()
    });
}

#[derive(Debug, Clone)]
enum ScoresInput {
    Bytes(Plan),
    Typed(ScoreEdits),
}

/// Edits of a typed scores artifact that keep it valid (costs follow params and bits), so
/// that the solver, the frontier and the bootstrap see unusual but acceptable instances.
#[derive(Debug, Clone)]
struct ScoreEdits {
    seed: Index,
    scores: Vec<(Index, Index, f64)>,
    params: Vec<(Index, u64)>,
    flags: Vec<(Index, bool, bool)>,
    bits: Option<(Index, f64)>,
}

impl ScoreEdits {
    fn apply(&self, base: &Scores) -> Scores {
        let mut s = base.clone();
        let (ng, nf) = (s.groups.len(), s.formats.len());
        for (g, f, v) in &self.scores {
            s.groups[g.index(ng)].scores[f.index(nf)] = *v;
        }
        for (g, p) in &self.params {
            s.groups[g.index(ng)].params = *p;
        }
        for (g, disabled, excluded) in &self.flags {
            let g = &mut s.groups[g.index(ng)];
            (g.disabled, g.cost_excluded) = (*disabled, *excluded);
        }
        if let Some((f, b)) = self.bits {
            let f = f.index(nf.saturating_sub(1).max(1)); // not NONE
            s.formats[f].effective_bits = b;
            s.formats.sort_by(|a, b| a.effective_bits.total_cmp(&b.effective_bits));
        }
        for g in &mut s.groups {
            g.costs = s.formats.iter().map(|f| g.params as f64 * f.effective_bits / 16.0).collect();
        }
        s
    }
}

fn typed_edits() -> impl Strategy<Value = ScoreEdits> {
    let value = prop_oneof![
        4 => 0.0f64..1e3,
        1 => prop::sample::select(vec![0.0, -0.0, -1.0, 1e-300, 1e300, 5e-324, 1e150, f64::MAX / 4.0]),
        1 => -1e3f64..0.0,
    ];
    let params = prop_oneof![0u64..1_000_000, prop::sample::select(vec![0u64, 1, 1 << 40, u64::MAX / 64])];
    let bits = prop_oneof![0.001f64..16.0, prop::sample::select(vec![4.5, 8.0, 8.25, 16.0, 1e-3, 15.999999])];
    (
        any::<Index>(),
        prop::collection::vec((any::<Index>(), any::<Index>(), value), 0..20),
        prop::collection::vec((any::<Index>(), params), 0..6),
        prop::collection::vec((any::<Index>(), any::<bool>(), any::<bool>()), 0..6),
        prop::option::of((any::<Index>(), bits)),
    )
        .prop_map(|(seed, scores, params, flags, bits)| ScoreEdits { seed, scores, params, flags, bits })
}

/// `qsens.manifest` → validation and the full render (Markdown template and SVG plots).
#[test]
fn fuzz_manifest() {
    let seeds = Seeds::new(both_encodings::<Manifest>(&small_base().manifest));
    fuzz("manifest", plans(), |plan| {
        let Ok(a) = artifact::from_bytes::<Manifest>(&seeds.make(plan)) else { return false };
        if qsens::report::validate(&a.payload).is_err() {
            return false;
        }
        qsens::report::render(&a, "report", "report.md.j2", qsens::report::DEFAULT_TEMPLATE).is_ok()
    });
}

// ---- config parsers ---------------------------------------------------------------------------

fn json_edit(bytes: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(bytes).unwrap();
    f(&mut v);
    serde_json::to_vec_pretty(&v).unwrap()
}

/// `config.json` → parse, validate, the layer list, and preprocess's reading of the token ids.
#[test]
fn fuzz_model_config() {
    let demo_cfg = std::fs::read(demo().join("model/config.json")).unwrap();
    // The transformers-5 spelling: rope_parameters with rope_theta inside, `dtype`.
    let tf5 = json_edit(&demo_cfg, |v| {
        let t = v["text_config"].as_object_mut().unwrap();
        let mut rope = t.remove("rope_scaling").unwrap();
        rope["rope_theta"] = t.remove("rope_theta").unwrap();
        t.insert("rope_parameters".into(), rope);
        let top = v.as_object_mut().unwrap();
        let dtype = top.remove("torch_dtype").unwrap();
        top.insert("dtype".into(), dtype);
    });
    let seeds = Seeds::new(vec![demo_cfg, tf5]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    fuzz("model_config", mutate::plan(false), |plan| {
        let bytes = seeds.make(plan);
        std::fs::write(&path, &bytes).unwrap();
        let _ = qsens::preprocess::config::read_vision_token_ids(&path);
        let Ok(text) = std::str::from_utf8(&bytes) else { return false };
        let Ok(cfg) = ModelConfig::from_json_str(text) else { return false };
        if cfg.validate().is_err() {
            return false;
        }
        let layers = qsens::model::qwen3_vl::expected_layers(&cfg);
        let _ = (cfg.text_config.rope_theta(), cfg.text_config.mrope_section(), cfg.declared_dtype());
        let _: u64 = layers.iter().map(|l| l.params()).sum();
        true
    });
}

/// `preprocessor_config.json` → resolve (with and without CLI overrides), `smart_resize` of
/// several image sizes, and for small results the resize and `pixel_values`.
#[test]
fn fuzz_preprocessor_config() {
    let demo_pp = std::fs::read(demo().join("model/preprocessor_config.json")).unwrap();
    let hf = br#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258,
        0.27577711], "rescale_factor": 0.00392156862745098, "do_resize": true, "resample": 3}"#
        .to_vec();
    let seeds = Seeds::new(vec![demo_pp, hf]);
    let src = qsens::preprocess::RgbImage { width: 37, height: 23, data: (0..37 * 23 * 3).map(|i| i as u8).collect() };
    let overrides = prop::option::of(prop::sample::select(vec![0u64, 1, 3136, 65_536, 1 << 40, u64::MAX]));
    fuzz("preprocessor_config", (mutate::plan(false), overrides.clone(), overrides), |(plan, min, max)| {
        let Ok(cfg) = serde_json::from_slice::<PreprocessorConfig>(&seeds.make(plan)) else { return false };
        let Ok(s) = cfg.resolve(*min, *max) else { return false };
        let factor = s.patch_size * s.merge_size;
        for (h, w) in [(1u32, 1u32), (23, 37), (480, 640), (2, 399), (20_000, 8_000)] {
            let Ok((rh, rw)) = qsens::preprocess::smart_resize(h, w, factor, s.min_pixels, s.max_pixels) else {
                continue;
            };
            if (h, w) == (23, 37) && (rh as u64) * (rw as u64) <= 1 << 20 {
                let resized = qsens::preprocess::resize_bicubic_aa(&src, rh, rw);
                let image = qsens::artifact::inputs::ImagePixels {
                    grid_thw: [1, rh / s.patch_size, rw / s.patch_size],
                    height: rh,
                    width: rw,
                    rgb: resized.data,
                };
                if qsens::preprocess::check_image(&image, &s).is_ok() {
                    let _ = qsens::preprocess::pixel_values(&image, &s);
                }
            }
        }
        true
    });
}

/// `tokenizer_config.json` (chat template and special tokens) → lookup, compile and render of
/// a demo conversation.
#[test]
fn fuzz_tokenizer_config() {
    let tc = std::fs::read(demo().join("model/tokenizer_config.json")).unwrap();
    let template = std::fs::read_to_string(demo().join("model/chat_template.jinja")).unwrap();
    let with_string = json_edit(&tc, |v| v["chat_template"] = template.clone().into());
    let with_list = json_edit(&tc, |v| {
        v["chat_template"] =
            serde_json::json!([{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]);
    });
    let seeds = Seeds::new(vec![with_string, with_list]);
    let dir = tempfile::tempdir().unwrap();
    let user = qsens::preprocess::Message::user(&["a.jpg".to_string()], "Describe this image.");
    let messages = [user, qsens::preprocess::Message::assistant("A red circle.")];
    fuzz("tokenizer_config", mutate::plan(false), |plan| {
        std::fs::write(dir.path().join("tokenizer_config.json"), seeds.make(plan)).unwrap();
        let Ok((source, _)) = qsens::preprocess::config::find_chat_template(dir.path()) else { return false };
        let Ok(special) = qsens::preprocess::config::template_special_tokens(dir.path()) else { return false };
        let Ok(t) = qsens::preprocess::ChatTemplate::new(&source, special) else { return false };
        t.render(&messages, false).is_ok() && t.render(&messages[..1], true).is_ok()
    });
}

// ---- safetensors ------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum StPlan {
    /// Mutate the header: as a JSON tree, then byte-wise within the header; `length` replaces
    /// the header length prefix; `cut` truncates the file.
    Header { tree: Vec<TreeMut>, bytes: Vec<ByteMut>, length: Option<u64>, cut: Option<Index> },
    /// A sharded checkpoint whose index JSON is mutated.
    Index { tree: Vec<TreeMut>, bytes: Vec<ByteMut> },
}

fn st_plan() -> impl Strategy<Value = StPlan> {
    let length = prop::option::weighted(
        0.2,
        prop_oneof![prop::sample::select(vec![0u64, 1, 7, 8, 100_000_001, 1 << 40, u64::MAX]), 0u64..4096],
    );
    prop_oneof![
        4 => (
            prop::collection::vec(tree_mut(), 0..5),
            prop::collection::vec(byte_mut(), 0..3),
            length,
            prop::option::weighted(0.1, any::<Index>())
        )
            .prop_map(|(tree, bytes, length, cut)| StPlan::Header { tree, bytes, length, cut }),
        1 => (prop::collection::vec(tree_mut(), 1..5), prop::collection::vec(byte_mut(), 0..2))
            .prop_map(|(tree, bytes)| StPlan::Index { tree, bytes }),
    ]
}

/// `model.safetensors` headers and the shard index → the loader (every tensor read, checked and
/// converted), then one text-only forward of what loaded.
#[test]
fn fuzz_safetensors() {
    let model_dir = demo().join("model");
    let file = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let data = file[8 + n..].to_vec();
    let tensors = st_read(&file);
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let shards = [st_write(first), st_write(second)];
    let mut map = serde_json::Map::new();
    for (k, part) in [first, second].iter().enumerate() {
        for t in *part {
            map.insert(t.name.clone(), format!("model-0000{}-of-00002.safetensors", k + 1).into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": data.len()}, "weight_map": map});
    let inputs: Artifact<ModelInputs> = read(&small_base().inputs);
    let text_input = {
        let mut s = inputs.payload.samples[0].clone();
        let keep: Vec<usize> =
            (0..s.input_ids.len()).filter(|&i| s.mm_token_type_ids[i] == 0 && s.input_ids[i] < 400).collect();
        s.input_ids = keep.iter().map(|&i| s.input_ids[i]).collect();
        s.labels = keep.iter().map(|&i| s.labels[i]).collect();
        s.position_ids = vec![(0..keep.len() as i64).collect(); 3];
        s.images.clear();
        let mut p = inputs.payload.clone();
        p.samples = vec![s.clone()];
        qsens::score::model_input(&s, &p).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::copy(model_dir.join("config.json"), d.join("config.json")).unwrap();
    fuzz("safetensors", st_plan(), |plan| {
        for f in std::fs::read_dir(&d).unwrap() {
            let p: PathBuf = f.unwrap().path();
            if p.file_name().unwrap() != "config.json" {
                std::fs::remove_file(p).unwrap();
            }
        }
        match plan {
            StPlan::Header { tree, bytes, length, cut } => {
                let mut h = header.clone();
                apply_tree(&mut h, tree);
                let mut hb = serde_json::to_vec(&h).unwrap();
                apply_bytes(&mut hb, bytes, None);
                let mut out = length.unwrap_or(hb.len() as u64).to_le_bytes().to_vec();
                out.extend(&hb);
                out.extend(&data);
                if let Some(c) = cut {
                    out.truncate(c.index(out.len() + 1));
                }
                std::fs::write(d.join("model.safetensors"), out).unwrap();
            }
            StPlan::Index { tree, bytes } => {
                let mut v = index.clone();
                apply_tree(&mut v, tree);
                let mut b = serde_json::to_vec(&v).unwrap();
                apply_bytes(&mut b, bytes, None);
                std::fs::write(d.join("model.safetensors.index.json"), b).unwrap();
                for (k, s) in shards.iter().enumerate() {
                    std::fs::write(d.join(format!("model-0000{}-of-00002.safetensors", k + 1)), s).unwrap();
                }
            }
        }
        let Ok(m) = Qwen3VL::load(&d, candle_core::DType::F32, &candle_core::Device::Cpu) else { return false };
        m.forward(&text_input, &mut NoTap, &ForwardOptions::default()).is_ok()
    });
}

// ---- SQLite and COCO --------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Sql {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

fn sql_value() -> impl Strategy<Value = Sql> {
    prop_oneof![
        1 => Just(Sql::Null),
        4 => prop_oneof![any::<i64>(), 0i64..20, prop::sample::select(vec![i64::MIN, i64::MAX, -1])].prop_map(Sql::Int),
        1 => any::<f64>().prop_map(Sql::Real),
        4 => prop_oneof![
            "[a-z0-9_./]{0,16}".boxed(),
            prop::sample::select(vec!["000000000001.jpg", "../000000000001.jpg", "/etc/hostname", "", "x"]).prop_map(String::from).boxed(),
        ]
        .prop_map(Sql::Text),
        1 => prop::collection::vec(any::<u8>(), 0..8).prop_map(Sql::Blob),
    ]
}

#[derive(Debug, Clone)]
enum DbPlan {
    /// A `samples` table with these declared column types and rows.
    Rows { types: [&'static str; 5], rows: Vec<[Sql; 5]>, all_captions: bool, num: Option<usize>, seed: u64 },
    /// The demo DB with a mutated query.
    Query(Vec<ByteMut>),
    /// The demo DB file mutated byte-wise.
    File(Vec<ByteMut>),
}

fn db_plan() -> impl Strategy<Value = DbPlan> {
    let ty = prop::sample::select(vec!["INTEGER", "TEXT", "REAL", "BLOB", "", "ANY"]);
    let types = [ty.clone(), ty.clone(), ty.clone(), ty.clone(), ty];
    prop_oneof![
        3 => (types, prop::collection::vec([sql_value(), sql_value(), sql_value(), sql_value(), sql_value()], 0..12),
              any::<bool>(), prop::option::of(0usize..14), any::<u64>())
            .prop_map(|(types, rows, all_captions, num, seed)| DbPlan::Rows { types, rows, all_captions, num, seed }),
        1 => prop::collection::vec(byte_mut(), 1..4).prop_map(DbPlan::Query),
        1 => prop::collection::vec(byte_mut(), 1..6).prop_map(DbPlan::File),
    ]
}

/// The calibration DB: rows of any type through the default query, mutated queries, mutated
/// database files → `read_rows` and the sampling of `select_rows`.
#[test]
fn fuzz_sqlite() {
    let good_db = std::fs::read(&small_base().db).unwrap();
    let dir = tempfile::tempdir().unwrap();
    fuzz("sqlite", db_plan(), |plan| {
        let db = dir.path().join("fuzz.db");
        let _ = std::fs::remove_file(&db);
        let mut query = None;
        let (all_captions, num, seed) = match plan {
            DbPlan::Rows { types, rows, all_captions, num, seed } => {
                let conn = rusqlite::Connection::open(&db).unwrap();
                conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = MEMORY; BEGIN").unwrap();
                let cols: Vec<String> =
                    qsens::calib::db::COLUMNS.iter().zip(types).map(|(c, t)| format!("{c} {t}")).collect();
                conn.execute_batch(&format!("CREATE TABLE samples ({})", cols.join(", "))).unwrap();
                for r in rows {
                    let vals: Vec<rusqlite::types::Value> = r
                        .iter()
                        .map(|v| match v {
                            Sql::Null => rusqlite::types::Value::Null,
                            Sql::Int(i) => rusqlite::types::Value::Integer(*i),
                            Sql::Real(f) => rusqlite::types::Value::Real(*f),
                            Sql::Text(s) => rusqlite::types::Value::Text(s.clone()),
                            Sql::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
                        })
                        .collect();
                    conn.execute("INSERT INTO samples VALUES (?1, ?2, ?3, ?4, ?5)", rusqlite::params_from_iter(vals))
                        .unwrap();
                }
                conn.execute_batch("COMMIT").unwrap();
                (*all_captions, *num, *seed)
            }
            DbPlan::Query(muts) => {
                std::fs::write(&db, &good_db).unwrap();
                let mut q = qsens::calib::db::DEFAULT_QUERY.as_bytes().to_vec();
                apply_bytes(&mut q, muts, None);
                query = Some(String::from_utf8_lossy(&q).into_owned());
                (false, Some(2), 0)
            }
            DbPlan::File(muts) => {
                let mut b = good_db.clone();
                apply_bytes(&mut b, muts, None);
                std::fs::write(&db, b).unwrap();
                (false, Some(2), 0)
            }
        };
        let Ok(rows) = qsens::calib::db::read_rows(&db, query.as_deref()) else { return false };
        qsens::calib::select_rows(rows, all_captions, num, seed).is_ok()
    });
}

/// COCO captions JSON → `read_coco`, the DB build, and reading it back.
#[test]
fn fuzz_coco_captions() {
    let captions = std::fs::read(demo().join("captions.json")).unwrap();
    let seeds = Seeds::new(vec![captions]);
    let dir = tempfile::tempdir().unwrap();
    let (json, db) = (dir.path().join("captions_fuzz.json"), dir.path().join("coco.db"));
    fuzz("coco_captions", mutate::plan(false), |plan| {
        std::fs::write(&json, seeds.make(plan)).unwrap();
        let Ok(rows) = qsens::calib::db::read_coco(&json, "fuzz") else { return false };
        if qsens::calib::db::write_db(&db, &rows).is_err() {
            return false;
        }
        let back = qsens::calib::db::read_rows(&db, None).expect("a DB we just wrote reads back");
        assert_eq!(back, rows, "COCO rows round-trip through the DB");
        true
    });
}

// ---- images -----------------------------------------------------------------------------------

/// Encodes a small gradient image in `format`.
fn encoded(format: image::ImageFormat, color: image::ColorType) -> Vec<u8> {
    let (w, h) = (40u32, 24u32);
    let img = image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
        image::Rgba([(x * 6) as u8, (y * 10) as u8, ((x + y) * 3) as u8, 255 - (x * 5) as u8])
    }));
    let img = match color {
        image::ColorType::L8 => image::DynamicImage::ImageLuma8(img.to_luma8()),
        image::ColorType::Rgb8 => image::DynamicImage::ImageRgb8(img.to_rgb8()),
        image::ColorType::Rgb16 => image::DynamicImage::ImageRgb16(img.to_rgb16()),
        _ => img,
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Image files (every format calib-extract and preprocess accept: JPEG incl. CMYK and
/// grayscale, PNG 8/16-bit with and without alpha, GIF, BMP, WebP, TIFF) → the decoder with its
/// decompression-bomb guard, the Pillow conversion, `smart_resize` and the resize.
#[test]
fn fuzz_images() {
    use image::{ColorType as C, ImageFormat as F};
    let mut seeds: Vec<Vec<u8>> = ["000000000001.jpg", "000000000003.png", "000000000005.png", "000000000007.png"]
        .iter()
        .map(|f| std::fs::read(demo().join("images").join(f)).unwrap())
        .collect();
    seeds.push(cmyk_jpeg(24, 16));
    seeds.push(png16(20, 12, image::ExtendedColorType::Rgba16));
    seeds.push(png16(20, 12, image::ExtendedColorType::L16));
    for (f, c) in [(F::Jpeg, C::L8), (F::Gif, C::Rgba8), (F::Bmp, C::Rgb8), (F::WebP, C::Rgba8), (F::Tiff, C::Rgb16)] {
        seeds.push(encoded(f, c));
    }
    let seeds = Seeds::new(seeds);
    fuzz("images", mutate::byte_plan(), |plan| {
        let Ok(rgb) = qsens::preprocess::decode_rgb(&seeds.make(plan)) else { return false };
        assert_eq!(rgb.data.len(), rgb.width as usize * rgb.height as usize * 3, "decoded size");
        let Ok((h, w)) = qsens::preprocess::smart_resize(rgb.height, rgb.width, 32, 1024, 16384) else { return false };
        let _ = qsens::preprocess::resize_bicubic_aa(&rgb, h, w);
        true
    });
}
