//! The bad-input corpus: every stage binary run against inputs made broken on purpose, each
//! generated here in a scratch folder from the demo set's good files.
//!
//! A refusal must be: exit status 2 (not a panic's 101, not a signal), exactly one line on
//! stderr, `<tool>: ` first, naming the file (or tensor / field) and the fault, no `panicked`,
//! nothing on stdout, and nothing (no output, no temporary) in the output folder. CMYK and
//! 16-bit images are valid inputs: they are in the corpus to prove they are accepted.
//!
//! `cargo test --test reliability corpus -- --nocapture` prints the per-stage table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qsens::artifact::calibration::{CalibrationSet, ImageRef};
use qsens::artifact::inputs::ModelInputs;
use qsens::artifact::manifest::Manifest;
use qsens::artifact::scores::Scores;
use qsens::artifact::{self, Artifact, Encoding, Payload};

use crate::args;
use crate::support::*;

/// Bad inputs tried per stage; the test fails if a list shrinks (or grows) unnoticed.
const EXPECTED: [(&str, usize, usize); 5] = [
    // (stage, refused, accepted)
    ("calib-extract", 45, 5),
    ("preprocess", 44, 5),
    ("score-layers", 66, 1),
    ("search", 32, 0),
    ("manifest-to-md", 19, 2),
];

/// The cases of one stage and what became of them.
struct Stage {
    tool: &'static str,
    root: PathBuf,
    n: usize,
    refused: usize,
    accepted: usize,
    failures: Vec<String>,
}

impl Stage {
    fn new(tool: &'static str) -> Self {
        Stage { tool, root: scratch(&format!("corpus-{tool}")), n: 0, refused: 0, accepted: 0, failures: Vec::new() }
    }

    /// A fresh folder for a case's inputs.
    fn dir(&mut self, name: &str) -> PathBuf {
        let d = self.root.join(format!("in-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A new empty output folder; `{out}` in the arguments stands for it.
    fn out_dir(&mut self) -> PathBuf {
        self.n += 1;
        let d = self.root.join(format!("out-{:03}", self.n));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn args(out: &Path, args: &[String]) -> Vec<String> {
        args.iter().map(|a| a.replace("{out}", &s(out))).collect()
    }

    /// Runs the stage on a bad input and checks the refusal contract.
    fn refuse(&mut self, what: &str, args: Vec<String>, expect: &[&str]) {
        let out = self.out_dir();
        let args = Self::args(&out, &args);
        let o = run(self.tool, &args);
        self.refused += 1;
        if std::env::var_os("QSENS_CORPUS_VERBOSE").is_some() {
            eprintln!("[{what}] {}", String::from_utf8_lossy(&o.stderr).trim_end());
        }
        if let Err(e) = check_refusal(self.tool, &o, &out, expect) {
            self.failures.push(format!("{} / {what}: {e}\n    args: {args:?}", self.tool));
        }
    }

    /// Runs the stage on an unusual but valid input: it must succeed and write its output.
    fn accept(&mut self, what: &str, args: Vec<String>) {
        let out = self.out_dir();
        let args = Self::args(&out, &args);
        let o = run(self.tool, &args);
        self.accepted += 1;
        let stderr = String::from_utf8_lossy(&o.stderr);
        let written = std::fs::read_dir(&out).unwrap().count();
        if !o.status.success() || stderr.contains("panicked") || written == 0 {
            self.failures.push(format!(
                "{} / {what}: expected success with output, got {:?}, {written} files: {stderr}",
                self.tool,
                o.status.code()
            ));
        }
    }
}

/// How one artifact kind is broken by [`Stage::refuse_reader_faults`]. The bytes differ per kind on
/// purpose, so that each reader meets another truncation point and another garbage.
struct ReaderFaults<'a> {
    /// Case-label prefix ("calibration").
    label: &'static str,
    good: &'a Path,
    /// An artifact of another kind, and that kind.
    other: (&'a Path, &'static str),
    /// Extension of the missing, empty and truncated files ("msgpack" or "json").
    ext: &'static str,
    /// How many of the good file's bytes "truncated" keeps.
    keep: fn(usize) -> usize,
    /// A garbage file: name and bytes.
    garbage: (&'static str, &'static [u8]),
    /// An unsupported schema version, and the encoding it is written in.
    version: (u32, Encoding),
    /// A payload with a field of the wrong type, e.g. `{"image_root": 3}`.
    bad_payload: &'static str,
}

impl Stage {
    /// The faults every artifact reader refuses, each with its own case: missing, 0 bytes,
    /// truncated, garbage, another kind, another schema version, a malformed payload. `run` gives
    /// the stage's arguments for reading the artifact at a path.
    fn refuse_reader_faults<P: Payload>(&mut self, dir: &Path, f: &ReaderFaults, run: &dyn Fn(&Path) -> Vec<String>) {
        let file = |name: &str, b: &[u8]| -> PathBuf {
            let p = dir.join(name);
            std::fs::write(&p, b).unwrap();
            p
        };
        let (label, ext, kind) = (f.label, f.ext, P::KIND);
        let p = dir.join(format!("missing.{ext}"));
        self.refuse(&format!("{label} missing"), run(&p), &[&s(&p), "No such file"]);
        let p = file(&format!("empty.{ext}"), b"");
        self.refuse(&format!("{label} 0 bytes"), run(&p), &[&s(&p), "empty file, not a qsens artifact"]);
        let bytes = std::fs::read(f.good).unwrap();
        let p = file(&format!("cut.{ext}"), &bytes[..(f.keep)(bytes.len())]);
        self.refuse(&format!("{label} truncated"), run(&p), &[&s(&p), "not a qsens artifact"]);
        let p = file(f.garbage.0, f.garbage.1);
        self.refuse(&format!("{label} garbage"), run(&p), &[&s(&p), "not a qsens artifact"]);
        let (other, other_kind) = f.other;
        let p = dir.join(other.file_name().unwrap());
        std::fs::copy(other, &p).unwrap();
        let want = format!("artifact kind is '{other_kind}', expected '{kind}'");
        self.refuse(&format!("{label} of the wrong kind"), run(&p), &[&s(&p), &want]);
        let (version, encoding) = f.version;
        let mut a: Artifact<P> = read(f.good);
        a.schema_version = version;
        let p = dir.join(format!("v{version}.{}", if encoding == Encoding::Json { "json" } else { "msgpack" }));
        write_as(&p, &a, encoding);
        let want = format!("schema version {version} is not supported");
        self.refuse(&format!("{label} of another schema version"), run(&p), &[&s(&p), &want]);
        let malformed = format!(
            r#"{{"kind": "{kind}", "schema_version": {}, "tool": "x", "tool_version": "0",
            "provenance": {{"sources": [], "parameters": {{}}}}, "payload": {}}}"#,
            P::VERSION,
            f.bad_payload
        );
        let p = file("malformed.json", malformed.as_bytes());
        let want = format!("malformed '{kind}' payload");
        self.refuse(&format!("{label} with a malformed payload"), run(&p), &[&s(&p), &want]);
    }
}

fn check_refusal(tool: &str, o: &std::process::Output, out: &Path, expect: &[&str]) -> Result<(), String> {
    let stderr = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(2) {
        return Err(format!("exit status {:?} (expected 2); stderr: {stderr}", o.status));
    }
    if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
        return Err(format!("panic: {stderr}"));
    }
    let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
    if line.is_empty() || line.contains('\n') {
        return Err(format!("stderr is not exactly one line: {stderr:?}"));
    }
    if !line.starts_with(&format!("{tool}: ")) {
        return Err(format!("stderr does not start with '{tool}: ': {line}"));
    }
    for want in expect {
        if !line.contains(want) {
            return Err(format!("stderr lacks '{want}': {line}"));
        }
    }
    if !o.stdout.is_empty() {
        return Err(format!("stdout is not empty: {:?}", String::from_utf8_lossy(&o.stdout)));
    }
    let left: Vec<String> = walk_names(out);
    if !left.is_empty() {
        return Err(format!("left behind in the output folder: {left:?}; stderr: {line}"));
    }
    Ok(())
}

fn walk_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.file_name().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk_names(&e.path()).into_iter().map(|n| format!("{}/{n}", e.file_name().to_string_lossy())));
        }
    }
    out
}

#[test]
fn corpus() {
    let _ = base(); // build the good inputs once, before the threads
    let stages: Vec<Stage> = std::thread::scope(|scope| {
        let handles = [
            scope.spawn(calib_extract),
            scope.spawn(preprocess),
            scope.spawn(score_layers),
            scope.spawn(search),
            scope.spawn(manifest_to_md),
        ];
        handles.into_iter().map(|h| h.join().expect("corpus builder panicked")).collect()
    });

    eprintln!("\nbad-input corpus (refused: exit 2, one line naming file and fault, no output)");
    eprintln!("{:<16} {:>8} {:>9} {:>7}", "stage", "refused", "accepted", "failed");
    let mut failures = Vec::new();
    let mut counts = BTreeMap::new();
    for st in &stages {
        eprintln!("{:<16} {:>8} {:>9} {:>7}", st.tool, st.refused, st.accepted, st.failures.len());
        counts.insert(st.tool, (st.refused, st.accepted));
        failures.extend(st.failures.iter().cloned());
    }
    let total: usize = stages.iter().map(|s| s.refused + s.accepted).sum();
    eprintln!(
        "{:<16} {:>8} {:>9} {:>7}",
        "total",
        total - stages.iter().map(|s| s.accepted).sum::<usize>(),
        stages.iter().map(|s| s.accepted).sum::<usize>(),
        failures.len()
    );
    assert!(failures.is_empty(), "{} corpus cases failed:\n{}", failures.len(), failures.join("\n"));
    for (tool, refused, accepted) in EXPECTED {
        assert_eq!(counts[tool], (refused, accepted), "{tool}: the number of corpus cases changed");
    }
}

// ---- calib-extract ----------------------------------------------------------------------------

fn calib_extract() -> Stage {
    let mut c = Stage::new("calib-extract");
    let demo = demo();
    let images = demo.join("images");
    let good_db = &base().db;

    // --from-coco: the captions JSON.
    let d = c.dir("coco");
    let coco = |c: &mut Stage, what: &str, name: &str, bytes: Option<&[u8]>, expect: &str| {
        let p = d.join(name);
        if let Some(b) = bytes {
            std::fs::write(&p, b).unwrap();
        }
        c.refuse(what, args!["--from-coco", s(&p), "--db", "{out}/c.db"], &[&s(&p), expect]);
    };
    let captions = std::fs::read(demo.join("captions.json")).unwrap();
    coco(&mut c, "COCO JSON missing", "captions_missing.json", None, "No such file");
    coco(&mut c, "COCO JSON 0 bytes", "captions_empty.json", Some(b""), "malformed COCO captions JSON");
    coco(&mut c, "COCO JSON truncated", "captions_cut.json", Some(&captions[..captions.len() / 2]), "malformed COCO");
    coco(
        &mut c,
        "COCO JSON wrong types",
        "captions_types.json",
        Some(br#"{"images": [{"id": "one", "file_name": "a.jpg"}], "annotations": []}"#),
        "malformed COCO captions JSON",
    );
    coco(
        &mut c,
        "COCO JSON missing field",
        "captions_field.json",
        Some(br#"{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1}]}"#),
        "missing field `caption`",
    );
    coco(
        &mut c,
        "COCO JSON dangling image id",
        "captions_dangling.json",
        Some(br#"{"images": [], "annotations": [{"id": 1, "image_id": 5, "caption": "x"}]}"#),
        "not in `images`",
    );
    coco(
        &mut c,
        "COCO JSON duplicate annotation id",
        "captions_dup.json",
        Some(br#"{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 1, "image_id": 1, "caption": "y"}]}"#),
        "appears twice",
    );
    coco(
        &mut c,
        "COCO JSON duplicate image id",
        "captions_dupimg.json",
        Some(br#"{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}"#),
        "image id 1 appears twice",
    );
    coco(&mut c, "COCO JSON is a list", "captions_list.json", Some(b"[1, 2, 3]"), "malformed COCO captions JSON");

    // The database.
    let d = c.dir("db");
    let extract = |db: &Path| args!["--db", s(db), "--image-root", s(&images), "-o", "{out}/c.msgpack"];
    let sql_db = |name: &str, sql: &str| -> PathBuf {
        let p = d.join(name);
        let conn = rusqlite::Connection::open(&p).unwrap();
        conn.execute_batch(sql).unwrap();
        p
    };
    let schema = qsens::calib::db::SCHEMA;
    let db = d.join("missing.db");
    c.refuse("DB missing", extract(&db), &[&s(&db), "No such file"]);
    let db = d.join("empty.db");
    std::fs::write(&db, b"").unwrap();
    c.refuse("DB 0 bytes", extract(&db), &[&s(&db), "empty file"]);
    let db = d.join("garbage.db");
    std::fs::write(&db, b"this is not sqlite, just some text that is long enough to be read").unwrap();
    c.refuse("DB not SQLite", extract(&db), &[&s(&db), "not a database"]);
    let good = std::fs::read(good_db).unwrap();
    let db = d.join("header-only.db");
    std::fs::write(&db, &good[..100]).unwrap();
    c.refuse("DB truncated to its header", extract(&db), &[&s(&db), "malformed"]);
    let db = d.join("corrupt.db");
    let mut bad = good.clone();
    for b in &mut bad[4096..8192] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bad).unwrap();
    c.refuse("DB with a corrupt page", extract(&db), &[&s(&db), "malformed"]);
    let db = d.join("locked.db");
    std::fs::copy(good_db, &db).unwrap();
    {
        let lock = rusqlite::Connection::open(&db).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE; UPDATE samples SET caption = caption;").unwrap();
        c.refuse("DB locked by a writer", extract(&db), &[&s(&db), "database is locked"]);
        lock.execute_batch("ROLLBACK").unwrap();
    }
    let db = sql_db("no-table.db", "CREATE TABLE other (x INTEGER);");
    c.refuse("DB without the samples table", extract(&db), &[&s(&db), "no such table: samples"]);
    let db = sql_db(
        "text-id.db",
        "CREATE TABLE samples (sample_id, image_id, file_name, caption, split);
         INSERT INTO samples VALUES ('eleven', 1, '000000000001.jpg', 'c', 's');",
    );
    c.refuse("DB sample_id of type TEXT", extract(&db), &[&s(&db), "column 'sample_id'", "Invalid column type Text"]);
    let db = sql_db(
        "real-image-id.db",
        "CREATE TABLE samples (sample_id, image_id, file_name, caption, split);
         INSERT INTO samples VALUES (1, 1.5, '000000000001.jpg', 'c', 's');",
    );
    c.refuse("DB image_id of type REAL", extract(&db), &[&s(&db), "column 'image_id'", "Invalid column type Real"]);
    let db = sql_db(
        "null-file.db",
        "CREATE TABLE samples (sample_id, image_id, file_name, caption, split);
         INSERT INTO samples VALUES (1, 1, NULL, 'c', 's');",
    );
    c.refuse("DB NULL file_name", extract(&db), &[&s(&db), "column 'file_name'", "Null"]);
    let db = sql_db(
        "int-file.db",
        "CREATE TABLE samples (sample_id, image_id, file_name, caption, split);
         INSERT INTO samples VALUES (1, 1, 42, 'c', 's');",
    );
    c.refuse("DB file_name of type INTEGER", extract(&db), &[&s(&db), "column 'file_name'", "Integer"]);
    let db = sql_db(
        "blob-caption.db",
        "CREATE TABLE samples (sample_id, image_id, file_name, caption, split);
         INSERT INTO samples VALUES (1, 1, '000000000001.jpg', x'00ff', 's');",
    );
    c.refuse("DB caption of type BLOB", extract(&db), &[&s(&db), "column 'caption'", "Blob"]);
    let db = sql_db(
        "utf8.db",
        "CREATE TABLE samples (sample_id, image_id, file_name, caption, split);
         INSERT INTO samples VALUES (1, 1, '000000000001.jpg', CAST(x'fffe' AS TEXT), 's');",
    );
    c.refuse("DB caption not UTF-8", extract(&db), &[&s(&db), "column 'caption'"]);
    let db = sql_db("no-rows.db", schema);
    c.refuse("DB with no rows (empty calibration set)", extract(&db), &[&s(&db), "no rows to extract"]);
    let mut a = extract(good_db);
    a.extend(args!["--split", "val2017"]);
    c.refuse("split with no rows (empty calibration set)", a, &[&s(good_db), "no rows to extract in split 'val2017'"]);
    let mut a = extract(good_db);
    a.extend(args!["--query", "SELECT sample_id AS id, image_id, file_name, caption, split FROM samples"]);
    c.refuse("query without a required column", a, &[&s(good_db), "no column named 'sample_id'"]);
    let mut a = extract(good_db);
    a.extend(args!["--query", "SELEKT * FROM samples"]);
    c.refuse("query with a syntax error", a, &[&s(good_db), "syntax error"]);
    let mut a = extract(good_db);
    a.extend(args!["--query", "SELECT * FROM samples UNION ALL SELECT * FROM samples"]);
    c.refuse("query with duplicate sample ids", a, &[&s(good_db), "appears more than once"]);
    let mut a = extract(good_db);
    a.extend(args!["--num", 1000]);
    c.refuse("--num beyond the available rows", a, &[&s(good_db), "asks for more samples than the 9 available"]);

    // Images: a root with one good image and bad ones; one DB per bad row.
    let root = c.dir("root");
    let outside = c.dir("outside");
    std::fs::copy(images.join("000000000001.jpg"), root.join("good.jpg")).unwrap();
    std::fs::copy(images.join("000000000001.jpg"), outside.join("secret.jpg")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.jpg"), root.join("link.jpg")).unwrap();
    std::fs::create_dir(root.join("folder.jpg")).unwrap();
    mkfifo(&root.join("fifo.jpg"));
    let jpeg = std::fs::read(images.join("000000000002.jpg")).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("zero.jpg", Vec::new()),
        ("truncated.jpg", jpeg[..jpeg.len() / 2].to_vec()),
        ("garbled.jpg", {
            let mut g = jpeg.clone();
            for b in &mut g[300..] {
                *b = 0x5A;
            }
            g
        }),
        ("text.png", b"\x89PNG\r\n\x1a\nnot really a png".to_vec()),
        ("notes.txt", b"plain text, not an image".to_vec()),
        ("bomb.png", png_bomb(20_000, 20_000)),
        ("bomb.jpg", jpeg_bomb(60_000, 60_000)),
        ("zero-width.png", png_bomb(0, 16)),
    ];
    for (name, bytes) in &files {
        std::fs::write(root.join(name), bytes).unwrap();
    }
    let mut k = 0;
    let mut image_case = |c: &mut Stage, what: &str, file: &str, expect: &str| {
        k += 1;
        let db = d.join(format!("image-{k}.db"));
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(schema).unwrap();
        conn.execute("INSERT INTO samples VALUES (1, 1, 'good.jpg', 'fine', 's'), (2, 2, ?1, 'bad', 's')", [file])
            .unwrap();
        let shown = root.join(file);
        c.refuse(what, args!["--db", s(&db), "--image-root", s(&root), "-o", "{out}/c.msgpack"], &[&s(&shown), expect]);
    };
    image_case(
        &mut c,
        "image path escaping the root (../)",
        "../outside/secret.jpg",
        "not a relative path inside the image root",
    );
    image_case(&mut c, "image path absolute", "/etc/hostname", "not a relative path inside the image root");
    image_case(&mut c, "image path empty", "", "not a relative path inside the image root");
    image_case(&mut c, "image symlink escaping the root", "link.jpg", "outside the image root");
    image_case(&mut c, "image missing", "nope.jpg", "No such file");
    image_case(&mut c, "image is a folder", "folder.jpg", "not a regular file");
    image_case(&mut c, "image is a FIFO (would block forever)", "fifo.jpg", "not a regular file");
    image_case(&mut c, "image 0 bytes", "zero.jpg", "empty file (0 bytes)");
    image_case(&mut c, "JPEG truncated", "truncated.jpg", "truncated");
    image_case(&mut c, "JPEG garbled", "garbled.jpg", "corrupt JPEG");
    image_case(&mut c, "PNG garbage", "text.png", "corrupt Png image");
    image_case(&mut c, "not an image", "notes.txt", "not an image");
    image_case(&mut c, "PNG decompression bomb", "bomb.png", "decompression-bomb");
    image_case(&mut c, "JPEG decompression bomb", "bomb.jpg", "decompression-bomb");
    image_case(&mut c, "PNG of zero width", "zero-width.png", "corrupt Png image");
    let missing_root = d.join("no-such-root");
    c.refuse(
        "image root missing",
        args!["--db", s(good_db), "--image-root", s(&missing_root), "-o", "{out}/c.msgpack"],
        &[&s(&missing_root), "image root"],
    );
    c.refuse(
        "image root is a file",
        args!["--db", s(good_db), "--image-root", s(&root.join("good.jpg")), "-o", "{out}/c.msgpack"],
        &[&s(&root.join("good.jpg")), "not a directory"],
    );

    // Valid but unusual images: accepted and converted like Pillow.
    let ok_root = c.dir("unusual");
    let unusual: Vec<(&str, Vec<u8>)> = vec![
        ("cmyk.jpg", cmyk_jpeg(64, 48)),
        ("gray16.png", png16(40, 64, image::ExtendedColorType::L16)),
        ("graya16.png", png16(40, 64, image::ExtendedColorType::La16)),
        ("rgb16.png", png16(64, 40, image::ExtendedColorType::Rgb16)),
        ("rgba16.png", png16(64, 40, image::ExtendedColorType::Rgba16)),
    ];
    for (i, (name, bytes)) in unusual.iter().enumerate() {
        std::fs::write(ok_root.join(name), bytes).unwrap();
        let db = d.join(format!("unusual-{i}.db"));
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(schema).unwrap();
        conn.execute("INSERT INTO samples VALUES (1, 1, ?1, 'an unusual image', 's')", [name]).unwrap();
        c.accept(name, args!["--db", s(&db), "--image-root", s(&ok_root), "-o", "{out}/c.msgpack"]);
    }
    c
}

// ---- preprocess -------------------------------------------------------------------------------

/// A calibration artifact of one sample per image file under `root` (sha256 and size recorded as
/// calib-extract would).
fn calibration_of(root: &Path, files: &[&str]) -> Artifact<CalibrationSet> {
    let mut a: Artifact<CalibrationSet> = read(&base().calibration);
    let template = a.payload.samples[0].clone();
    a.payload.image_root = s(root);
    a.payload.samples = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let p = root.join(f);
            let bytes = if p.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
            let (width, height) = qsens::preprocess::decode_rgb(&bytes).map(|r| (r.width, r.height)).unwrap_or((1, 1));
            let mut sample = template.clone();
            sample.id = format!("{}", i + 1);
            sample.images = vec![ImageRef {
                image_id: i as i64 + 1,
                path: f.to_string(),
                sha256: artifact::sha256_bytes(&bytes),
                width,
                height,
            }];
            sample
        })
        .collect();
    a
}

fn preprocess() -> Stage {
    let mut c = Stage::new("preprocess");
    let demo = demo();
    let model = demo.join("model");
    let good = &base().calibration;
    let pp = |cal: &Path, model: &Path| args!["--calibration", s(cal), "--model", s(model), "-o", "{out}/i.msgpack"];

    // The calibration artifact itself.
    let d = c.dir("calibration");
    let faults = ReaderFaults {
        label: "calibration",
        good,
        other: (&base().scores, "qsens.scores"),
        ext: "msgpack",
        keep: |n| n / 2,
        garbage: ("garbage.msgpack", b"\x93\x01\x02\x03 garbage"),
        version: (99, Encoding::Json),
        bad_payload: r#"{"image_root": 3}"#,
    };
    c.refuse_reader_faults::<CalibrationSet>(&d, &faults, &|p| pp(p, &model));
    let mut a: Artifact<CalibrationSet> = read(good);
    a.payload.samples.clear();
    let p = d.join("no-samples.msgpack");
    write_as(&p, &a, Encoding::MessagePack);
    c.refuse("empty calibration set", pp(&p, &model), &[&s(&p), "no samples"]);
    c.refuse("calibration from empty stdin", pp(Path::new("-"), &model), &["preprocess: -: empty file"]);

    // Image references.
    let root = c.dir("root");
    let images = demo.join("images");
    copy_dir(&images, &root);
    let sub = root.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let jpeg = std::fs::read(images.join("000000000002.jpg")).unwrap();
    std::fs::write(root.join("zero.jpg"), b"").unwrap();
    std::fs::write(root.join("bomb.png"), png_bomb(30_000, 20_000)).unwrap();
    std::fs::write(root.join("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    let image_case = |c: &mut Stage, what: &str, a: Artifact<CalibrationSet>, expect: &[&str]| {
        let p = d.join(format!("{}.msgpack", what.replace(' ', "-").replace('/', "")));
        write_as(&p, &a, Encoding::MessagePack);
        let mut e = vec![s(&p)];
        e.extend(expect.iter().map(|x| x.to_string()));
        let e: Vec<&str> = e.iter().map(String::as_str).collect();
        c.refuse(what, pp(&p, &model), &e[1..]);
    };
    let mut a = calibration_of(&root, &["000000000001.jpg"]);
    a.payload.image_root = s(&sub);
    a.payload.samples[0].images[0].path = "../000000000001.jpg".into();
    image_case(
        &mut c,
        "image path escaping the root (../)",
        a,
        &["sub/../000000000001.jpg", "not a relative path inside the image root"],
    );
    let mut a = calibration_of(&root, &["000000000001.jpg"]);
    a.payload.samples[0].images[0].path = s(&root.join("000000000001.jpg"));
    image_case(&mut c, "image path absolute", a, &["not a relative path inside the image root"]);
    let mut a = calibration_of(&root, &["000000000001.jpg"]);
    a.payload.samples[0].images[0].sha256 = artifact::sha256_bytes(b"something else");
    image_case(
        &mut c,
        "image changed since calib-extract",
        a,
        &["000000000001.jpg: image changed since calib-extract"],
    );
    let a = calibration_of(&root, &["nope.jpg"]);
    image_case(&mut c, "image missing", a, &["nope.jpg", "No such file"]);
    std::os::unix::fs::symlink("/dev/zero", root.join("endless.jpg")).unwrap();
    let a = calibration_of(&root, &["endless.jpg"]);
    image_case(&mut c, "image linked to /dev/zero (would never end)", a, &["endless.jpg: not a regular file"]);
    mkfifo(&root.join("fifo.jpg"));
    let a = calibration_of(&root, &["fifo.jpg"]);
    image_case(&mut c, "image is a FIFO (would block forever)", a, &["fifo.jpg: not a regular file"]);
    let a = calibration_of(&root, &["zero.jpg"]);
    image_case(&mut c, "image 0 bytes", a, &["zero.jpg", "empty file (0 bytes)"]);
    let a = calibration_of(&root, &["bomb.png"]);
    image_case(&mut c, "PNG decompression bomb", a, &["bomb.png", "decompression-bomb"]);
    let a = calibration_of(&root, &["truncated.jpg"]);
    image_case(&mut c, "JPEG truncated", a, &["truncated.jpg", "truncated"]);

    // The checkpoint's processor files.
    let d = c.dir("models");
    let mut k = 0;
    let mut model_case = |c: &mut Stage, what: &str, edit: &dyn Fn(&Path), expect: &[&str]| {
        k += 1;
        let m = d.join(format!("model-{k}"));
        copy_dir(&model, &m);
        edit(&m);
        let expect: Vec<String> = expect.iter().map(|e| e.replace("{model}", &s(&m))).collect();
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        c.refuse(what, pp(good, &m), &expect);
    };
    let json_edit = |file: &'static str, f: fn(&mut serde_json::Value)| {
        move |m: &Path| {
            let p = m.join(file);
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        }
    };
    let nodir = d.join("no-such-model");
    c.refuse("model folder missing", pp(good, &nodir), &[&s(&nodir), "not a model directory"]);
    model_case(
        &mut c,
        "config.json missing",
        &|m| std::fs::remove_file(m.join("config.json")).unwrap(),
        &["{model}/config.json", "No such file"],
    );
    model_case(
        &mut c,
        "config.json malformed",
        &|m| std::fs::write(m.join("config.json"), b"{\"image_token_id\": ").unwrap(),
        &["{model}/config.json", "malformed JSON"],
    );
    model_case(
        &mut c,
        "config.json 0 bytes",
        &|m| std::fs::write(m.join("config.json"), b"").unwrap(),
        &["{model}/config.json", "malformed JSON"],
    );
    model_case(
        &mut c,
        "config.json image_token_id negative",
        &json_edit("config.json", |v| v["image_token_id"] = (-5).into()),
        &["{model}/config.json", "invalid value"],
    );
    model_case(
        &mut c,
        "config.json spatial_merge_size disagrees",
        &json_edit("config.json", |v| v["vision_config"]["spatial_merge_size"] = 4.into()),
        &["{model}/config.json", "differs from merge_size"],
    );
    model_case(
        &mut c,
        "config.json image_token_id not in the tokenizer",
        &json_edit("config.json", |v| v["image_token_id"] = 999_999.into()),
        &["{model}/tokenizer.json", "image_token_id 999999 is not in the tokenizer"],
    );
    let pre = "{model}/preprocessor_config.json";
    model_case(
        &mut c,
        "preprocessor_config.json missing",
        &|m| std::fs::remove_file(m.join("preprocessor_config.json")).unwrap(),
        &[pre, "No such file"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json patch_size 0",
        &json_edit("preprocessor_config.json", |v| v["patch_size"] = 0.into()),
        &[pre, "must be positive"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json merge_size 2^32-1",
        &json_edit("preprocessor_config.json", |v| v["merge_size"] = 4_294_967_295u64.into()),
        &[pre, "merge_size = 4294967295 is out of range"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json min_pixels above max_pixels",
        &json_edit("preprocessor_config.json", |v| v["size"]["shortest_edge"] = 1_000_000.into()),
        &[pre, "do not form a valid range"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json min_pixels 10^15",
        &json_edit("preprocessor_config.json", |v| {
            v["size"]["shortest_edge"] = 1_000_000_000_000_000u64.into();
            v["size"]["longest_edge"] = u64::MAX.into();
        }),
        &[pre, "decompression-bomb limit"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json image_std zero",
        &json_edit("preprocessor_config.json", |v| v["image_std"] = serde_json::json!([0.0, 0.0, 0.0])),
        &[pre, "must be non-zero"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json image_mean of 2 values",
        &json_edit("preprocessor_config.json", |v| v["image_mean"] = serde_json::json!([0.5, 0.5])),
        &[pre, "image_mean has 2 values"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json do_normalize false",
        &json_edit("preprocessor_config.json", |v| v["do_normalize"] = false.into()),
        &[pre, "do_normalize = false is not supported"],
    );
    model_case(
        &mut c,
        "preprocessor_config.json patch_size a string",
        &json_edit("preprocessor_config.json", |v| v["patch_size"] = "sixteen".into()),
        &[pre, "malformed JSON"],
    );
    let tok = "{model}/tokenizer.json";
    model_case(
        &mut c,
        "tokenizer.json missing",
        &|m| std::fs::remove_file(m.join("tokenizer.json")).unwrap(),
        &[tok, "cannot load tokenizer"],
    );
    model_case(
        &mut c,
        "tokenizer.json garbage",
        &|m| std::fs::write(m.join("tokenizer.json"), b"{ not json").unwrap(),
        &[tok, "cannot load tokenizer"],
    );
    model_case(
        &mut c,
        "tokenizer.json without <|im_start|>",
        &|m| {
            let p = m.join("tokenizer.json");
            let t = std::fs::read_to_string(&p).unwrap().replace("<|im_start|>", "<|im_begin|>");
            std::fs::write(&p, t).unwrap();
        },
        &[tok, "no <|im_start|> token"],
    );
    model_case(
        &mut c,
        "no chat template",
        &|m| std::fs::remove_file(m.join("chat_template.jinja")).unwrap(),
        &["{model}: no chat template"],
    );
    model_case(
        &mut c,
        "chat template syntax error",
        &|m| std::fs::write(m.join("chat_template.jinja"), "{% for m in messages %}{{ m.role }").unwrap(),
        &["{model}/chat_template.jinja", "invalid chat template"],
    );
    model_case(
        &mut c,
        "chat template raising an exception",
        &|m| std::fs::write(m.join("chat_template.jinja"), "{{ raise_exception('no images please') }}").unwrap(),
        &["{model}/chat_template.jinja", "no images please"],
    );
    model_case(
        &mut c,
        "tokenizer_config.json malformed",
        &|m| std::fs::write(m.join("tokenizer_config.json"), b"{\"bos_token\": [").unwrap(),
        &["{model}/tokenizer_config.json", "malformed JSON"],
    );
    model_case(
        &mut c,
        "chat_template.json with a non-string template",
        &|m| {
            std::fs::remove_file(m.join("chat_template.jinja")).unwrap();
            std::fs::write(m.join("chat_template.json"), br#"{"chat_template": 42}"#).unwrap();
        },
        &["{model}: no chat template"],
    );
    let mut a = pp(good, &model);
    a.extend(args!["--min-pixels", 0]);
    c.refuse("--min-pixels 0", a, &["min_pixels 0", "valid range"]);
    let mut a = pp(good, &model);
    a.extend(args!["--max-pixels", 100]);
    c.refuse("--max-pixels below min_pixels", a, &["max_pixels 100", "valid range"]);

    // Valid but unusual images: accepted, converted like Pillow.
    let root = c.dir("unusual");
    let unusual: Vec<(&str, Vec<u8>)> = vec![
        ("cmyk.jpg", cmyk_jpeg(64, 48)),
        ("gray16.png", png16(40, 64, image::ExtendedColorType::L16)),
        ("graya16.png", png16(40, 64, image::ExtendedColorType::La16)),
        ("rgb16.png", png16(64, 40, image::ExtendedColorType::Rgb16)),
        ("rgba16.png", png16(64, 40, image::ExtendedColorType::Rgba16)),
    ];
    for (name, bytes) in &unusual {
        std::fs::write(root.join(name), bytes).unwrap();
        let p = d.join(format!("{name}.msgpack"));
        write_as(&p, &calibration_of(&root, &[name]), Encoding::MessagePack);
        c.accept(name, pp(&p, &model));
    }
    c
}

// ---- score-layers -----------------------------------------------------------------------------

fn score_layers() -> Stage {
    let mut c = Stage::new("score-layers");
    let demo = demo();
    let model = demo.join("model");
    let good = &base().inputs;
    let sl =
        |model: &Path, inputs: &Path| args!["--model", s(model), "--inputs", s(inputs), "-q", "-o", "{out}/s.msgpack"];

    // The model-inputs artifact.
    let d = c.dir("inputs");
    let faults = ReaderFaults {
        label: "inputs",
        good,
        other: (&base().calibration, "qsens.calibration"),
        ext: "msgpack",
        keep: |n| n * 2 / 3,
        garbage: ("garbage.msgpack", &[0xde, 0xff, 0xff, 0x00, 0x01]),
        version: (2, Encoding::MessagePack),
        bad_payload: r#"{"samples": "none"}"#,
    };
    c.refuse_reader_faults::<ModelInputs>(&d, &faults, &|p| sl(&model, p));
    let mut k = 0;
    let mut inputs_case = |c: &mut Stage, what: &str, edit: &dyn Fn(&mut ModelInputs), expect: &[&str]| {
        k += 1;
        let mut a: Artifact<ModelInputs> = read(good);
        edit(&mut a.payload);
        let p = d.join(format!("edited-{k}.msgpack"));
        write_as(&p, &a, Encoding::MessagePack);
        let mut e = vec![s(&p)];
        e.extend(expect.iter().map(|x| x.to_string()));
        let e: Vec<&str> = e.iter().map(String::as_str).collect();
        c.refuse(what, sl(&model, &p), &e);
    };
    inputs_case(&mut c, "no samples (empty calibration set)", &|m| m.samples.clear(), &["no samples"]);
    inputs_case(
        &mut c,
        "a sample without label tokens",
        &|m| m.samples[1].labels.iter_mut().for_each(|l| *l = -100),
        &["sample 1", "no label tokens"],
    );
    inputs_case(
        &mut c,
        "a token id outside the vocabulary",
        &|m| m.samples[0].input_ids[3] = 100_000,
        &["sample 0", "input id 100000"],
    );
    inputs_case(
        &mut c,
        "a label outside the vocabulary",
        &|m| *m.samples[0].labels.last_mut().unwrap() = 7777,
        &["label 7777"],
    );
    inputs_case(
        &mut c,
        "labels shorter than input_ids",
        &|m| {
            m.samples[2].labels.pop();
        },
        &["sample 2", "labels has length"],
    );
    inputs_case(&mut c, "empty input_ids", &|m| m.samples[0].input_ids.clear(), &["input_ids is empty"]);
    inputs_case(
        &mut c,
        "position_ids with 2 rows",
        &|m| {
            m.samples[0].position_ids.pop();
        },
        &["position_ids is not [3]"],
    );
    inputs_case(
        &mut c,
        "image bytes shorter than its size",
        &|m| m.samples[0].images[0].rgb.truncate(10),
        &["sample 0", "RGB bytes"],
    );
    inputs_case(
        &mut c,
        "image grid disagreeing with its size",
        &|m| m.samples[0].images[0].grid_thw[1] += 2,
        &["does not match its size"],
    );
    inputs_case(
        &mut c,
        "image grid of 2^28 patches (times the patch size overflows u32)",
        &|m| m.samples[0].images[0].grid_thw[1] = 1 << 28,
        &["does not match its size"],
    );
    inputs_case(&mut c, "image grid_t 0", &|m| m.samples[0].images[0].grid_thw[0] = 0, &["grid_t is 0"]);
    inputs_case(
        &mut c,
        "one image token too few",
        &|m| {
            let pad = m.special_tokens.image_pad;
            let s = &mut m.samples[0];
            let at = s.input_ids.iter().position(|&t| t == pad).unwrap();
            s.input_ids[at] = 5;
        },
        &["image tokens in input_ids"],
    );
    inputs_case(
        &mut c,
        "processor patch size disagreeing with the model",
        &|m| m.processor.patch_size = 14,
        &["processor patch_size is 14"],
    );
    inputs_case(&mut c, "processor merge size 0", &|m| m.processor.merge_size = 0, &["merge_size is 0"]);
    inputs_case(
        &mut c,
        "image token id disagreeing with the model",
        &|m| m.special_tokens.image_pad = 3,
        &["image token id is 3"],
    );

    // The checkpoint: config.json and the safetensors files.
    let d = c.dir("models");
    let st_bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let tensors = st_read(&st_bytes);
    let mut k = 0;
    let mut model_case = |c: &mut Stage, what: &str, edit: &dyn Fn(&Path), expect: &[&str]| {
        k += 1;
        let m = d.join(format!("model-{k}"));
        copy_dir(&model, &m);
        edit(&m);
        let expect: Vec<String> = expect.iter().map(|e| e.replace("{model}", &s(&m))).collect();
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        c.refuse(what, sl(&m, good), &expect);
    };
    let config = |f: fn(&mut serde_json::Value)| {
        move |m: &Path| {
            let p = m.join("config.json");
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        }
    };
    let cfg = "{model}/config.json";
    let nodir = d.join("no-such-model");
    c.refuse("model folder missing", sl(&nodir, good), &[&s(&nodir), "No such file"]);
    model_case(
        &mut c,
        "config.json missing",
        &|m| std::fs::remove_file(m.join("config.json")).unwrap(),
        &[cfg, "No such file"],
    );
    model_case(
        &mut c,
        "config.json malformed",
        &|m| std::fs::write(m.join("config.json"), b"{\"text_config\": {").unwrap(),
        &[cfg, "EOF"],
    );
    model_case(&mut c, "config.json 0 bytes", &|m| std::fs::write(m.join("config.json"), b"").unwrap(), &[cfg, "EOF"]);
    model_case(
        &mut c,
        "config.json without text_config",
        &config(|v| drop(v.as_object_mut().unwrap().remove("text_config"))),
        &[cfg, "missing field `text_config`"],
    );
    model_case(
        &mut c,
        "config.json without hidden_size",
        &config(|v| drop(v["text_config"].as_object_mut().unwrap().remove("hidden_size"))),
        &[cfg, "missing field `hidden_size`"],
    );
    model_case(
        &mut c,
        "config.json zero attention heads",
        &config(|v| {
            v["text_config"]["num_attention_heads"] = 0.into();
            drop(v["text_config"].as_object_mut().unwrap().remove("head_dim"));
        }),
        &[cfg, "num_attention_heads = 0"],
    );
    model_case(
        &mut c,
        "config.json hidden_size not divisible by the heads",
        &config(|v| {
            v["text_config"]["num_attention_heads"] = 3.into();
            drop(v["text_config"].as_object_mut().unwrap().remove("head_dim"));
        }),
        &[cfg, "not divisible by num_attention_heads 3"],
    );
    model_case(
        &mut c,
        "config.json vocab_size 10^12",
        &config(|v| v["text_config"]["vocab_size"] = 1_000_000_000_000u64.into()),
        &[cfg, "vocab_size = 1000000000000 is out of range"],
    );
    model_case(
        &mut c,
        "config.json 2^40 layers",
        &config(|v| v["text_config"]["num_hidden_layers"] = (1u64 << 40).into()),
        &[cfg, "num_hidden_layers"],
    );
    model_case(
        &mut c,
        "config.json vision num_heads 0",
        &config(|v| v["vision_config"]["num_heads"] = 0.into()),
        &[cfg, "num_heads = 0"],
    );
    model_case(
        &mut c,
        "config.json patch_size 2^63",
        &config(|v| v["vision_config"]["patch_size"] = (1u64 << 63).into()),
        &[cfg, "patch_size"],
    );
    model_case(
        &mut c,
        "config.json hidden_size a string",
        &config(|v| v["text_config"]["hidden_size"] = "64".into()),
        &[cfg, "invalid type: string"],
    );
    model_case(
        &mut c,
        "config.json depth negative",
        &config(|v| v["vision_config"]["depth"] = (-1).into()),
        &[cfg, "invalid value"],
    );
    model_case(
        &mut c,
        "config.json another model type",
        &config(|v| v["model_type"] = "llama".into()),
        &[cfg, "model_type `llama` is not supported"],
    );
    model_case(
        &mut c,
        "config.json rope_type yarn",
        &config(|v| v["text_config"]["rope_scaling"]["rope_type"] = "yarn".into()),
        &[cfg, "rope_type `yarn`"],
    );
    model_case(
        &mut c,
        "config.json deepstack index beyond the depth",
        &config(|v| v["vision_config"]["deepstack_visual_indexes"] = serde_json::json!([1, 9])),
        &[cfg, "deepstack_visual_indexes"],
    );
    let st = "{model}/model.safetensors";
    let write_st = |m: &Path, b: &[u8]| std::fs::write(m.join("model.safetensors"), b).unwrap();
    model_case(
        &mut c,
        "safetensors missing",
        &|m| std::fs::remove_file(m.join("model.safetensors")).unwrap(),
        &["{model}: no .safetensors weights"],
    );
    model_case(&mut c, "safetensors 0 bytes", &|m| write_st(m, b""), &[st, "not a valid safetensors file"]);
    model_case(
        &mut c,
        "safetensors of 4 bytes",
        &|m| write_st(m, b"\x10\0\0\0"),
        &[st, "not a valid safetensors file"],
    );
    model_case(
        &mut c,
        "safetensors header truncated",
        &|m| {
            let mut b = 4096u64.to_le_bytes().to_vec();
            b.extend(br#"{"model.visual.pos_embed.weight": {"dtype": "F32", "#);
            write_st(m, &b)
        },
        &[st, "not a valid safetensors file"],
    );
    model_case(
        &mut c,
        "safetensors header length 2^40 (oversized)",
        &|m| {
            let mut b = (1u64 << 40).to_le_bytes().to_vec();
            b.extend(b"{}");
            write_st(m, &b)
        },
        &[st, "not a valid safetensors file: header too large"],
    );
    model_case(
        &mut c,
        "safetensors header length u64::MAX",
        &|m| {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend(b"{}");
            write_st(m, &b)
        },
        &[st, "not a valid safetensors file"],
    );
    model_case(
        &mut c,
        "safetensors header not JSON",
        &|m| {
            let mut b = 16u64.to_le_bytes().to_vec();
            b.extend(b"not json at all!");
            write_st(m, &b)
        },
        &[st, "not a valid safetensors file"],
    );
    model_case(
        &mut c,
        "safetensors data truncated",
        &|m| write_st(m, &st_bytes[..st_bytes.len() - 1000]),
        &[st, "not a valid safetensors file"],
    );
    model_case(
        &mut c,
        "safetensors offsets overlapping",
        &|m| {
            let n = u64::from_le_bytes(st_bytes[..8].try_into().unwrap()) as usize;
            let h = String::from_utf8(st_bytes[8..8 + n].to_vec()).unwrap();
            let h = h.replacen("\"data_offsets\":[0,", "\"data_offsets\":[4,", 1);
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend(h.as_bytes());
            b.extend(&st_bytes[8 + n..]);
            write_st(m, &b)
        },
        &[st, "not a valid safetensors file"],
    );
    let edited = |f: fn(&mut Vec<StTensor>)| {
        let mut t = tensors.clone();
        f(&mut t);
        st_write(&t)
    };
    let wrong_dtype = edited(|t| {
        let x = t.iter_mut().find(|x| x.name == "model.visual.blocks.0.attn.qkv.weight").unwrap();
        x.dtype = "I32".into();
    });
    model_case(
        &mut c,
        "a tensor of the wrong dtype",
        &|m| write_st(m, &wrong_dtype),
        &[st, "tensor `model.visual.blocks.0.attn.qkv.weight`", "unsupported dtype I32"],
    );
    let wrong_shape = edited(|t| {
        let x = t.iter_mut().find(|x| x.name == "model.visual.blocks.0.attn.qkv.weight").unwrap();
        x.shape.reverse();
    });
    model_case(
        &mut c,
        "a tensor of the wrong shape",
        &|m| write_st(m, &wrong_shape),
        &[st, "tensor `model.visual.blocks.0.attn.qkv.weight`", "has shape [32, 96], expected [96, 32]"],
    );
    let missing_tensor = edited(|t| t.retain(|x| x.name != "model.language_model.norm.weight"));
    model_case(
        &mut c,
        "a tensor missing",
        &|m| write_st(m, &missing_tensor),
        &[st, "tensor `model.language_model.norm.weight` is missing"],
    );
    // Sharded checkpoints: an index and two shards.
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let shard = |m: &Path, index: &serde_json::Value| {
        std::fs::remove_file(m.join("model.safetensors")).unwrap();
        std::fs::write(m.join("model-00001-of-00002.safetensors"), st_write(first)).unwrap();
        std::fs::write(m.join("model.safetensors.index.json"), serde_json::to_vec(index).unwrap()).unwrap();
    };
    let weight_map = |second_file: &str| -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for t in first {
            map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
        }
        for t in second {
            map.insert(t.name.clone(), second_file.into());
        }
        serde_json::json!({"metadata": {}, "weight_map": map})
    };
    model_case(
        &mut c,
        "a shard named by the index is missing",
        &|m| shard(m, &weight_map("model-00002-of-00002.safetensors")),
        &["{model}/model-00002-of-00002.safetensors", "No such file"],
    );
    model_case(
        &mut c,
        "the index lists a tensor its shard lacks",
        &|m| shard(m, &weight_map("model-00001-of-00002.safetensors")),
        &["listed in {model}/model.safetensors.index.json", "missing from that file"],
    );
    model_case(
        &mut c,
        "the index is malformed JSON",
        &|m| {
            shard(m, &weight_map("x"));
            std::fs::write(m.join("model.safetensors.index.json"), b"{\"weight_map\": {").unwrap();
        },
        &["{model}/model.safetensors.index.json is not valid JSON"],
    );
    model_case(
        &mut c,
        "the index has no weight_map",
        &|m| shard(m, &serde_json::json!({"metadata": {}})),
        &["{model}/model.safetensors.index.json has no `weight_map`"],
    );
    model_case(
        &mut c,
        "the index maps a tensor to a number",
        &|m| shard(m, &serde_json::json!({"weight_map": {"model.visual.pos_embed.weight": 3}})),
        &["model.safetensors.index.json: weight_map entry for `model.visual.pos_embed.weight` is not a string"],
    );

    // --merge of shard artifacts.
    let d = c.dir("merge");
    let scores: Artifact<Scores> = read(&base().scores);
    let merge = |files: &[&Path]| {
        let mut a = args!["--merge"];
        a.extend(files.iter().map(|f| s(f)));
        a.extend(args!["-q", "-o", "{out}/merged.msgpack"]);
        a
    };
    let p = d.join("garbage.msgpack");
    std::fs::write(&p, b"\x01\x02").unwrap();
    c.refuse("merge: a shard is garbage", merge(&[&p]), &[&s(&p), "not a qsens artifact"]);
    let mut bad = scores.clone();
    bad.payload.layers[4].per_sample[0].pop();
    let p = d.join("ragged.msgpack");
    write_as(&p, &bad, Encoding::MessagePack);
    c.refuse("merge: a shard with a ragged per-sample table", merge(&[&p]), &[&s(&p), "per-sample table"]);
    let mut bad = scores.clone();
    bad.payload.groups[0].members.push("no.such.layer".into());
    let p = d.join("member.msgpack");
    write_as(&p, &bad, Encoding::MessagePack);
    c.refuse("merge: a group member that is no layer", merge(&[&p]), &[&s(&p), "a member is not a layer"]);
    let p1 = d.join("one.msgpack");
    write_as(&p1, &scores, Encoding::MessagePack);
    c.refuse("merge: the same shard twice", merge(&[&p1, &p1]), &[&s(&p1), "also in another shard"]);
    let mut other = scores.clone();
    other.provenance.param("method", "kl_div");
    let p2 = d.join("other-run.msgpack");
    write_as(&p2, &other, Encoding::MessagePack);
    c.refuse("merge: shards of different runs", merge(&[&p1, &p2]), &[&s(&p2), "not a shard of the same run"]);
    let mut part = scores.clone();
    part.payload.samples.pop();
    part.payload.layers.iter_mut().for_each(|l| {
        l.per_sample.iter_mut().for_each(|r| {
            r.pop();
        })
    });
    part.payload.groups.iter_mut().for_each(|g| {
        g.per_sample.iter_mut().for_each(|r| {
            r.pop();
        })
    });
    let p = d.join("partial.msgpack");
    write_as(&p, &part, Encoding::MessagePack);
    c.refuse("merge: a shard missing", merge(&[&p]), &["a shard is missing"]);
    // An absurd sample count (found by fuzzing: the error message used to list every missing
    // index, 2^62 of them, until the machine ran out of memory).
    let mut absurd = scores.clone();
    absurd.payload.num_inputs = 1 << 62;
    let p = d.join("absurd-count.msgpack");
    write_as(&p, &absurd, Encoding::MessagePack);
    c.refuse(
        "merge: a shard of 2^62 samples",
        merge(&[&p]),
        &["a shard is missing", &format!("({} in all)", (1usize << 62) - scores.payload.samples.len())],
    );

    // Options.
    let mut a = sl(&model, good);
    a.extend(args!["--dtype", "int4"]);
    c.refuse("--dtype unknown", a, &["unsupported dtype 'int4'"]);
    let mut a = sl(&model, good);
    a.extend(args!["--device", "tpu"]);
    c.refuse("--device unknown", a, &["unknown device 'tpu'"]);
    let mut a = sl(&model, good);
    a.extend(args!["--format", "FP3"]);
    c.refuse("--format unknown", a, &["unknown quantization format 'FP3'"]);

    // A garbage state file with --resume is not an error: the run starts over.
    let mut a = sl(&model, good);
    a.extend(args!["--resume", "--state", s(&d.join("garbage.msgpack"))]);
    c.accept("--resume from a garbage state starts over", a);
    c
}

// ---- search -----------------------------------------------------------------------------------

fn search() -> Stage {
    let mut c = Stage::new("search");
    let good = &base().scores;
    let se = |scores: &Path| {
        args![
            "--scores",
            s(scores),
            "--effective-bits",
            12,
            "-q",
            "--export-dir",
            "{out}/recipes",
            "-o",
            "{out}/m.json"
        ]
    };
    let d = c.dir("scores");
    let faults = ReaderFaults {
        label: "scores",
        good,
        other: (&base().manifest, "qsens.manifest"),
        ext: "msgpack",
        keep: |n| n - 7,
        garbage: ("garbage.json", b"{{{{"),
        version: (0, Encoding::Json),
        bad_payload: r#"{"model": 3}"#,
    };
    c.refuse_reader_faults::<Scores>(&d, &faults, &|p| se(p));
    let file = |name: &str, b: &[u8]| -> PathBuf {
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    // Deep nesting must be an error, not a stack overflow (an abort).
    let mut deep = vec![0x86];
    for (k, v) in [("kind", "qsens.scores"), ("tool", "x"), ("tool_version", "0")] {
        deep.push(0xa0 | k.len() as u8);
        deep.extend(k.as_bytes());
        deep.push(0xa0 | v.len() as u8);
        deep.extend(v.as_bytes());
    }
    deep.extend(b"\xaeschema_version\x01\xaaprovenance\x82\xa7sources\x90\xaaparameters\x80\xa7payload");
    deep.extend(std::iter::repeat_n(0x91u8, 200_000));
    let p = file("deep.msgpack", &deep);
    c.refuse("msgpack nested 200000 levels deep", se(&p), &[&s(&p), "depth limit exceeded"]);
    let mut deep = br#"{"kind": "qsens.scores", "schema_version": 1, "tool": "x", "tool_version": "0", "provenance": {"sources": [], "parameters": {}}, "payload": "#.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 200_000));
    deep.extend(std::iter::repeat_n(b']', 200_000));
    deep.push(b'}');
    let p = file("deep.json", &deep);
    c.refuse("JSON nested 200000 levels deep", se(&p), &[&s(&p), "malformed 'qsens.scores' payload"]);
    let mut k = 0;
    let mut case = |c: &mut Stage, what: &str, edit: &dyn Fn(&mut Scores), expect: &[&str]| {
        k += 1;
        let mut a: Artifact<Scores> = read(good);
        edit(&mut a.payload);
        let p = d.join(format!("edited-{k}.msgpack"));
        write_as(&p, &a, Encoding::MessagePack);
        let mut e = vec![s(&p)];
        e.extend(expect.iter().map(|x| x.to_string()));
        let e: Vec<&str> = e.iter().map(String::as_str).collect();
        c.refuse(what, se(&p), &e);
    };
    case(&mut c, "NaN score", &|x| x.groups[2].scores[0] = f64::NAN, &["score is NaN"]);
    case(&mut c, "+Inf score", &|x| x.groups[5].scores[0] = f64::INFINITY, &["score is inf"]);
    case(&mut c, "NaN per-sample score", &|x| x.layers[1].per_sample[0][1] = f64::NAN, &["per-sample score is NaN"]);
    case(&mut c, "-Inf cost", &|x| x.groups[0].costs[1] = f64::NEG_INFINITY, &["cost is -inf"]);
    case(&mut c, "NaN input amax", &|x| x.layers[3].input_amax = f64::NAN, &["amax is not finite"]);
    case(&mut c, "NaN effective bits", &|x| x.formats[0].effective_bits = f64::NAN, &["effective bits NaN"]);
    case(&mut c, "effective bits above 16", &|x| x.formats[0].effective_bits = 17.0, &["effective bits 17"]);
    case(&mut c, "no groups", &|x| x.groups.clear(), &["no groups"]);
    case(&mut c, "no formats", &|x| x.formats.clear(), &["no formats"]);
    case(&mut c, "last format not NONE", &|x| x.formats.last_mut().unwrap().name = "FP16".into(), &["expected 'NONE'"]);
    case(
        &mut c,
        "a layer in an unknown group",
        &|x| x.layers[0].group = "nowhere".into(),
        &["unknown group 'nowhere'"],
    );
    case(&mut c, "a cost disagreeing with params", &|x| x.groups[1].costs[0] *= 2.0, &["is not params × bits / 16"]);
    case(
        &mut c,
        "a group twice",
        &|x| {
            let g = x.groups[0].clone();
            x.groups.push(g)
        },
        &["appears twice"],
    );
    case(
        &mut c,
        "params of 2^64-1 (cost overflow)",
        &|x| {
            // Bits of 2^-10 + 2^-62 need a 2^62 cost scale: 2^64 params × 2^66 units overflow.
            x.formats[0].effective_bits = 2f64.powi(-10) + 2f64.powi(-62);
            for g in &mut x.groups {
                g.params = u64::MAX;
                g.costs = x.formats.iter().map(|f| u64::MAX as f64 * f.effective_bits / 16.0).collect();
            }
        },
        &["overflow"],
    );
    case(
        &mut c,
        "finite scores whose sum overflows",
        &|x| {
            x.groups[0].scores[0] = f64::MAX;
            x.groups[1].scores[0] = f64::MAX;
        },
        &["add up to more than the largest float"],
    );
    case(
        &mut c,
        "a per-sample row too short",
        &|x| {
            x.groups[0].per_sample[0].pop();
        },
        &["per-sample scores for"],
    );
    case(
        &mut c,
        "scores for fewer formats",
        &|x| {
            x.groups[3].scores.pop();
        },
        &["scores for 2 formats"],
    );
    let mut a = se(good);
    a[3] = "NaN".into();
    c.refuse("--effective-bits NaN", a, &["effective bits must be a positive number, got NaN"]);
    let mut a = se(good);
    a[3] = "inf".into();
    c.refuse("--effective-bits inf", a, &["effective bits must be a positive number"]);
    let mut a = se(good);
    a[2] = "--effective-bits=-1".into();
    a.remove(3);
    c.refuse("--effective-bits negative", a, &["effective bits must be a positive number, got -1"]);
    let mut a = se(good);
    a[3] = "2".into();
    c.refuse("--effective-bits below the smallest achievable", a, &["effective bits 2 is not achievable"]);
    let mut a = se(good);
    a.extend(args!["--disable", "[unclosed"]);
    c.refuse("--disable with an invalid pattern", a, &["invalid pattern '[unclosed'"]);
    let mut a = se(good);
    a.extend(args!["--bootstrap", 0]);
    c.refuse("--bootstrap 0", a, &["bootstrap resamples must be positive"]);
    c
}

// ---- manifest-to-md ---------------------------------------------------------------------------

fn manifest_to_md() -> Stage {
    let mut c = Stage::new("manifest-to-md");
    let good = &base().manifest;
    let mm = |m: &Path| args!["--manifest", s(m), "-q", "-o", "{out}/report.md"];
    let d = c.dir("manifests");
    let faults = ReaderFaults {
        label: "manifest",
        good,
        other: (&base().scores, "qsens.scores"),
        ext: "json",
        keep: |n| n / 2,
        garbage: ("garbage.msgpack", &[0x81, 0xa1, b'x', 0xc1]),
        version: (7, Encoding::Json),
        bad_payload: r#"{"summary": []}"#,
    };
    c.refuse_reader_faults::<Manifest>(&d, &faults, &|p| mm(p));
    let mut k = 0;
    let mut case = |c: &mut Stage, what: &str, edit: &dyn Fn(&mut Manifest), expect: &[&str]| {
        k += 1;
        let mut a: Artifact<Manifest> = read(good);
        edit(&mut a.payload);
        let p = d.join(format!("edited-{k}.msgpack"));
        write_as(&p, &a, Encoding::MessagePack);
        let mut e = vec![s(&p)];
        e.extend(expect.iter().map(|x| x.to_string()));
        let e: Vec<&str> = e.iter().map(String::as_str).collect();
        c.refuse(what, mm(&p), &e);
    };
    case(&mut c, "NaN group score", &|m| m.groups[2].scores[0] = f64::NAN, &["group", "value NaN"]);
    case(&mut c, "Inf objective", &|m| m.summary.objective = f64::INFINITY, &["summary.objective is inf"]);
    case(&mut c, "NaN layer score", &|m| m.layers[0].sensitivity = Some(f64::NAN), &["layer", "value NaN"]);
    case(&mut c, "NaN layer interval", &|m| m.layers[0].ci = Some([0.0, f64::NAN]), &["interval"]);
    case(&mut c, "frontier without points", &|m| m.frontier.points.clear(), &["frontier has no chosen point"]);
    case(&mut c, "frontier choice out of range", &|m| m.frontier.chosen = 10_000, &["frontier has no chosen point"]);
    case(&mut c, "NaN frontier point", &|m| m.frontier.points[0].objective = f64::NAN, &["frontier point"]);
    let tpl = c.dir("templates");
    let t = tpl.join("syntax.j2");
    std::fs::write(&t, "{% for x in %}").unwrap();
    let mut a = mm(good);
    a.extend(args!["--template", s(&t)]);
    c.refuse("template syntax error", a, &[&s(&t), "syntax error"]);
    let t = tpl.join("undefined.j2");
    std::fs::write(&t, "{{ no_such_thing.field }}").unwrap();
    let mut a = mm(good);
    a.extend(args!["--template", s(&t)]);
    c.refuse("template using an undefined value", a, &[&s(&t), "undefined"]);
    let t = tpl.join("missing.j2");
    let mut a = mm(good);
    a.extend(args!["--template", s(&t)]);
    c.refuse("template missing", a, &[&s(&t), "No such file"]);
    let t = tpl.join("binary.j2");
    std::fs::write(&t, [0xff, 0xfe, 0x00]).unwrap();
    let mut a = mm(good);
    a.extend(args!["--template", s(&t)]);
    c.refuse("template not UTF-8", a, &[&s(&t), "UTF-8"]);
    c.refuse("report to stdout", args!["--manifest", s(good), "-o", "-"], &["needs a file path"]);

    // Extreme but finite values: rendered (they used to overflow or hang the plots).
    let mut a: Artifact<Manifest> = read(good);
    a.payload.layers[0].block = Some(1_000_000_000_000_000_000);
    let p = d.join("huge-block.msgpack");
    write_as(&p, &a, Encoding::MessagePack);
    c.accept("a layer block index of 10^18", mm(&p));
    let mut a: Artifact<Manifest> = read(good);
    for (i, l) in a.payload.layers.iter_mut().enumerate() {
        l.sensitivity = Some(if i % 2 == 0 { f64::MAX } else { 5e-324 });
    }
    a.payload.groups[0].params = u64::MAX;
    a.payload.groups[1].params = u64::MAX;
    let p = d.join("extreme-values.msgpack");
    write_as(&p, &a, Encoding::MessagePack);
    c.accept("scores of f64::MAX and 5e-324, params of 2^64-1", mm(&p));
    c
}
