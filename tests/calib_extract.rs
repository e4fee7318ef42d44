//! `calib-extract`: COCO JSON → DB → calibration artifact, determinism, `--query`, and the
//! error contract (exit 2, one line `calib-extract: <path>: <fault>`, no output, no panic).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qsens::artifact::calibration::CalibrationSet;
use qsens::artifact::{self, Artifact};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_calib-extract")).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(o.status.success(), "{:?}: {}", args, String::from_utf8_lossy(&o.stderr));
    o
}

fn build_db(fx: &Path, dir: &Path) -> PathBuf {
    let db = dir.join("coco.db");
    ok(&["--from-coco", s(&fx.join("coco/captions.json")), "--db", s(&db), "-q"]);
    db
}

fn read(path: &Path) -> Artifact<CalibrationSet> {
    artifact::read(path).unwrap()
}

#[test]
fn coco_round_trip() {
    let fx = fixtures_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let db = build_db(&fx, dir.path());
    // Atomic build: nothing but the database is left in the folder.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("coco.db")]);

    let out = dir.path().join("calib.msgpack");
    let images = fx.join("images");
    ok(&["--db", s(&db), "--image-root", s(&images), "-o", s(&out), "-q"]);
    let a = read(&out);
    assert_eq!(a.kind, "qsens.calibration");
    assert_eq!(a.tool, "calib-extract");

    let coco: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.join("coco/captions.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.join("manifest.json")).unwrap()).unwrap();
    let manifest_text = manifest.to_string();
    let set = &a.payload;
    assert_eq!(set.samples.len(), 13, "one sample per image");
    for sample in &set.samples {
        let img = &sample.images[0];
        // The first caption = the lowest annotation id of that image.
        let first = coco["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["image_id"].as_i64() == Some(img.image_id))
            .min_by_key(|x| x["id"].as_i64().unwrap())
            .unwrap();
        assert_eq!(sample.id, first["id"].as_i64().unwrap().to_string());
        assert_eq!(sample.caption, first["caption"].as_str().unwrap());
        assert_eq!(sample.split, "captions", "split from the file stem");
        assert_eq!(sample.prompt, "Describe this image.");
        let bytes = std::fs::read(images.join(&img.path)).unwrap();
        assert_eq!(img.sha256, artifact::sha256_bytes(&bytes));
        assert!(manifest_text.contains(img.sha256.trim_start_matches("sha256:")), "{} not in manifest", img.path);
    }
    let sizes: Vec<(u32, u32)> = set.samples.iter().map(|s| (s.images[0].width, s.images[0].height)).collect();
    assert!(sizes.contains(&(1000, 872)) && sizes.contains(&(40, 30)) && sizes.contains(&(1200, 200)));
    let ids: Vec<i64> = set.samples.iter().map(|s| s.id.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sample-id order");
    assert!(a.provenance.digest_of("calibration-db").unwrap().starts_with("sha256:"));

    // The artifact feeds preprocess as is (the whole pipeline of the first two stages).
    let inputs = dir.path().join("inputs.msgpack");
    let o = Command::new(env!("CARGO_BIN_EXE_preprocess"))
        .args(["--calibration", s(&out), "--model", s(&fx.join("qwen3-vl-tiny")), "-o", s(&inputs), "-q"])
        .args(["--max-pixels", "262144"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inputs: Artifact<qsens::artifact::inputs::ModelInputs> = artifact::read(inputs.as_path()).unwrap();
    let ids: Vec<&str> = inputs.payload.samples.iter().map(|s| s.id.as_str()).collect();
    let want: Vec<&str> = set.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, want);
    for s in &inputs.payload.samples {
        assert!(s.labels.iter().filter(|&&l| l != -100).count() > 3, "sample {} has no caption labels", s.id);
    }

    // --all-captions keeps both captions of every image.
    let all = dir.path().join("all.json");
    ok(&["--db", s(&db), "--image-root", s(&images), "--all-captions", "-o", s(&all), "-q"]);
    assert_eq!(read(&all).payload.samples.len(), 26);
}

#[test]
fn sampling_is_deterministic() {
    let fx = fixtures_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let db = build_db(&fx, dir.path());
    // Building the database is deterministic too (the artifact records its digest).
    let again = dir.path().join("again.db");
    ok(&["--from-coco", s(&fx.join("coco/captions.json")), "--db", s(&again), "-q"]);
    assert_eq!(std::fs::read(&db).unwrap(), std::fs::read(&again).unwrap(), "two DB builds differ");
    let images = fx.join("images");
    let draw = |seed: &str, name: &str| {
        let out = dir.path().join(name);
        ok(&[
            "--db",
            s(&db),
            "--image-root",
            s(&images),
            "--num",
            "5",
            "--seed",
            seed,
            "--split",
            "captions",
            "-o",
            s(&out),
            "-q",
        ]);
        std::fs::read(out).unwrap()
    };
    let a = draw("7", "a.msgpack");
    assert_eq!(a, draw("7", "b.msgpack"), "same seed, same bytes");
    let c = draw("8", "c.msgpack");
    let ids = |b: &[u8]| -> Vec<String> {
        artifact::from_bytes::<CalibrationSet>(b).unwrap().payload.samples.iter().map(|s| s.id.clone()).collect()
    };
    assert_eq!(ids(&a).len(), 5);
    assert_ne!(ids(&a), ids(&c), "another seed draws other samples");
    // Stdout output is the same artifact.
    let o = ok(&["--db", s(&db), "--image-root", s(&images), "--num", "5", "--seed", "7", "--split", "captions", "-q"]);
    assert_eq!(o.stdout, a);
}

#[test]
fn query_maps_another_schema() {
    let fx = fixtures_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE pics (pid INTEGER, path TEXT);
             CREATE TABLE caps (cid INTEGER, pic INTEGER, txt TEXT);
             INSERT INTO pics VALUES (3, '000000000003.jpg'), (7, '000000000007.jpg');
             INSERT INTO caps VALUES (100, 3, 'a cat'), (101, 7, 'a camera man'), (102, 3, 'still a cat');",
        )
        .unwrap();
    }
    let q = "SELECT c.cid AS sample_id, p.pid AS image_id, p.path AS file_name, c.txt AS caption, 'val' AS split \
             FROM caps c JOIN pics p ON p.pid = c.pic";
    let out = dir.path().join("q.json");
    ok(&[
        "--db",
        s(&db),
        "--image-root",
        s(&fx.join("images")),
        "--query",
        q,
        "--prompt",
        "What is this?",
        "-o",
        s(&out),
        "-q",
    ]);
    let a = read(&out);
    let got: Vec<(String, String, String)> =
        a.payload.samples.iter().map(|s| (s.id.clone(), s.caption.clone(), s.prompt.clone())).collect();
    assert_eq!(
        got,
        vec![
            ("100".into(), "a cat".into(), "What is this?".into()),
            ("101".into(), "a camera man".into(), "What is this?".into())
        ]
    );
    assert_eq!(a.provenance.parameters["query"], q);

    // A query without the required columns is refused with the list of what it returned.
    let o = run(&["--db", s(&db), "--image-root", s(&fx.join("images")), "--query", "SELECT pid FROM pics"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("no column named 'sample_id'") && err.contains("returns: pid"), "{err}");
}

#[test]
fn exclude_draws_a_set_disjoint_in_samples_and_images() {
    let fx = fixtures_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let db = build_db(&fx, dir.path());
    let images = fx.join("images");
    let calib = dir.path().join("calib.json");
    ok(&["--db", s(&db), "--image-root", s(&images), "--num", "5", "--seed", "1", "-o", s(&calib), "-q"]);
    // Every caption of the remaining images, so that any caption of a calibration image would show.
    let eval = dir.path().join("eval.json");
    ok(&["--db", s(&db), "--image-root", s(&images), "--all-captions", "--exclude", s(&calib), "-o", s(&eval), "-q"]);
    let (c, e) = (read(&calib).payload, read(&eval).payload);
    let ids = |set: &CalibrationSet| -> Vec<String> { set.samples.iter().map(|x| x.id.clone()).collect() };
    let image_ids = |set: &CalibrationSet| -> std::collections::BTreeSet<i64> {
        set.samples.iter().map(|x| x.images[0].image_id).collect()
    };
    assert_eq!(c.samples.len(), 5);
    assert_eq!(e.samples.len(), 2 * (13 - 5), "both captions of each of the other 8 images");
    assert!(ids(&e).iter().all(|id| !ids(&c).contains(id)));
    assert!(image_ids(&e).is_disjoint(&image_ids(&c)));
    assert_eq!(image_ids(&e).union(&image_ids(&c)).count(), 13, "nothing else is left out");
    let digest = artifact::sha256_bytes(&std::fs::read(&calib).unwrap());
    assert_eq!(read(&eval).provenance.digest_of("excluded-calibration"), Some(digest.as_str()));

    // Repeatable: a second exclusion removes its images too.
    let second = dir.path().join("second.json");
    ok(&["--db", s(&db), "--image-root", s(&images), "--num", "3", "--exclude", s(&calib), "-o", s(&second), "-q"]);
    let third = dir.path().join("third.json");
    ok(&[
        "--db",
        s(&db),
        "--image-root",
        s(&images),
        "--exclude",
        s(&calib),
        "--exclude",
        s(&second),
        "-o",
        s(&third),
        "-q",
    ]);
    let (second, third) = (read(&second).payload, read(&third).payload);
    assert_eq!(third.samples.len(), 13 - 5 - 3);
    assert!(image_ids(&third).is_disjoint(&image_ids(&c).union(&image_ids(&second)).copied().collect()));

    // The same image under other ids (another query over the same files) is still excluded, by path.
    let q = "SELECT sample_id + 1000 AS sample_id, image_id + 1000 AS image_id, file_name, caption, split FROM samples";
    let renamed = dir.path().join("renamed.json");
    ok(&["--db", s(&db), "--image-root", s(&images), "--query", q, "--exclude", s(&calib), "-o", s(&renamed), "-q"]);
    let paths = |set: &CalibrationSet| -> std::collections::BTreeSet<String> {
        set.samples.iter().map(|x| x.images[0].path.clone()).collect()
    };
    let renamed = read(&renamed).payload;
    assert_eq!(renamed.samples.len(), 8);
    assert!(paths(&renamed).is_disjoint(&paths(&c)));

    // Too few left for --num, and an --exclude that is not a calibration artifact: errors.
    let out = dir.path().join("none.json");
    assert_fails(
        &["--db", s(&db), "--image-root", s(&images), "--num", "9", "--exclude", s(&calib), "-o", s(&out)],
        &out,
        &db,
        "--num 9 asks for more samples than the 8 available (after --exclude)",
    );
    assert_fails(
        &["--db", s(&db), "--image-root", s(&images), "--exclude", s(&db), "-o", s(&out)],
        &out,
        &db,
        "not a qsens artifact",
    );
}

/// Runs a failing extraction and checks the error contract.
fn assert_fails(args: &[&str], out: &Path, path_in_msg: &Path, fault: &str) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "exactly one line: {err}");
    let prefix = format!("calib-extract: {}: ", path_in_msg.display());
    assert!(err.starts_with(&prefix), "expected prefix '{prefix}' in: {err}");
    assert!(err.contains(fault), "expected '{fault}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "output left behind");
    assert!(o.stdout.is_empty());
}

#[test]
fn bad_inputs() {
    let fx = fixtures_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.msgpack");
    let o = s(&out);

    // Missing DB.
    let missing = d.join("missing.db");
    assert_fails(&["--db", s(&missing), "--image-root", s(d), "-o", o], &out, &missing, "No such file");

    // A DB without the table.
    let empty_db = d.join("empty.db");
    rusqlite::Connection::open(&empty_db).unwrap().execute_batch("CREATE TABLE other (x INTEGER);").unwrap();
    assert_fails(&["--db", s(&empty_db), "--image-root", s(d), "-o", o], &out, &empty_db, "no such table: samples");

    // Not a database at all.
    let not_db = d.join("not.db");
    std::fs::write(&not_db, b"this is not sqlite, just some text that is long enough").unwrap();
    assert_fails(&["--db", s(&not_db), "--image-root", s(d), "-o", o], &out, &not_db, "not a database");

    // Image problems: a root with one good image and broken ones.
    let root = d.join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::copy(fx.join("images/000000000009.jpg"), root.join("good.jpg")).unwrap();
    std::fs::write(root.join("zero.jpg"), b"").unwrap();
    let jpeg = std::fs::read(fx.join("images/000000000003.jpg")).unwrap();
    std::fs::write(root.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let mut garbled = jpeg.clone();
    for b in garbled[200..].iter_mut() {
        *b = 0x5A;
    }
    std::fs::write(root.join("garbled.jpg"), &garbled).unwrap();
    std::fs::write(root.join("text.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let case = |name: &str, file: &str| -> PathBuf {
        let db = d.join(format!("{name}.db"));
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(qsens::calib::db::SCHEMA).unwrap();
        c.execute("INSERT INTO samples VALUES (1, 1, 'good.jpg', 'fine', 'x'), (2, 2, ?1, 'bad', 'x')", [file])
            .unwrap();
        db
    };
    let r = s(&root);
    let db = case("missing-image", "nope.jpg");
    assert_fails(&["--db", s(&db), "--image-root", r, "-o", o], &out, &root.join("nope.jpg"), "No such file");
    let db = case("zero", "zero.jpg");
    assert_fails(&["--db", s(&db), "--image-root", r, "-o", o], &out, &root.join("zero.jpg"), "empty file (0 bytes)");
    let db = case("truncated", "truncated.jpg");
    assert_fails(&["--db", s(&db), "--image-root", r, "-o", o], &out, &root.join("truncated.jpg"), "truncated");
    let db = case("garbled", "garbled.jpg");
    assert_fails(&["--db", s(&db), "--image-root", r, "-o", o], &out, &root.join("garbled.jpg"), "corrupt JPEG");
    let db = case("badpng", "text.png");
    assert_fails(&["--db", s(&db), "--image-root", r, "-o", o], &out, &root.join("text.png"), "corrupt Png image");
    let db = case("escape", "../good.jpg");
    assert_fails(
        &["--db", s(&db), "--image-root", r, "-o", o],
        &out,
        &root.join("../good.jpg"),
        "not a relative path inside",
    );

    // Malformed and unreadable COCO JSON: no database is created.
    let bad_json = d.join("captions_bad.json");
    std::fs::write(&bad_json, br#"{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1}]}"#).unwrap();
    let new_db = d.join("new.db");
    assert_fails(
        &["--from-coco", s(&bad_json), "--db", s(&new_db)],
        &new_db,
        &bad_json,
        "malformed COCO captions JSON",
    );
    let dangling = d.join("captions_dangling.json");
    std::fs::write(&dangling, br#"{"images": [], "annotations": [{"id": 1, "image_id": 5, "caption": "x"}]}"#).unwrap();
    assert_fails(&["--from-coco", s(&dangling), "--db", s(&new_db)], &new_db, &dangling, "not in `images`");
    let nowhere = d.join("captions_nowhere.json");
    assert_fails(&["--from-coco", s(&nowhere), "--db", s(&new_db)], &new_db, &nowhere, "No such file");
    let names: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "temporary left behind: {names:?}");
}
