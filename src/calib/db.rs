//! The calibration database: SQLite, one table `samples` (see `docs/calibration-db.md`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;

/// The default schema. `file_name` is relative to the image root, `/`-separated.
pub const SCHEMA: &str = "CREATE TABLE samples (
    sample_id INTEGER PRIMARY KEY,
    image_id  INTEGER NOT NULL,
    file_name TEXT    NOT NULL,
    caption   TEXT    NOT NULL,
    split     TEXT    NOT NULL
);
CREATE INDEX samples_image_id ON samples (image_id);";

/// The default extraction query; `--query` replaces it (same column names required).
pub const DEFAULT_QUERY: &str = "SELECT sample_id, image_id, file_name, caption, split FROM samples";

/// Columns every query must return, by name.
pub const COLUMNS: [&str; 5] = ["sample_id", "image_id", "file_name", "caption", "split"];

/// One row of the (default or `--query`) result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub sample_id: i64,
    pub image_id: i64,
    pub file_name: String,
    pub caption: String,
    pub split: String,
}

#[derive(Deserialize)]
struct CocoCaptions {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: i64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    id: i64,
    image_id: i64,
    caption: String,
}

/// The split name a COCO captions file implies: its stem without `captions_`
/// (`captions_train2017.json` → `train2017`).
pub fn split_from_path(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.strip_prefix("captions_").map(str::to_string).unwrap_or(stem)
}

/// Reads COCO captions JSON into rows (`sample_id` = annotation id), sorted by sample id.
/// Errors name the file.
pub fn read_coco(path: &Path, split: &str) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!(e)).with_context(|| path.display().to_string())?;
    let coco: CocoCaptions = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("malformed COCO captions JSON: {e}"))
        .with_context(|| path.display().to_string())?;
    let mut files: HashMap<i64, &str> = HashMap::with_capacity(coco.images.len());
    for img in &coco.images {
        if files.insert(img.id, &img.file_name).is_some() {
            bail!("{}: malformed COCO captions JSON: image id {} appears twice", path.display(), img.id);
        }
    }
    let mut rows = Vec::with_capacity(coco.annotations.len());
    for a in &coco.annotations {
        let Some(file_name) = files.get(&a.image_id) else {
            bail!(
                "{}: malformed COCO captions JSON: annotation {} refers to image {}, which is not in `images`",
                path.display(),
                a.id,
                a.image_id
            );
        };
        rows.push(Row {
            sample_id: a.id,
            image_id: a.image_id,
            file_name: file_name.to_string(),
            caption: a.caption.clone(),
            split: split.to_string(),
        });
    }
    rows.sort_by_key(|r| r.sample_id);
    if let Some(w) = rows.windows(2).find(|w| w[0].sample_id == w[1].sample_id) {
        bail!("{}: malformed COCO captions JSON: annotation id {} appears twice", path.display(), w[0].sample_id);
    }
    Ok(rows)
}

/// Writes `rows` into a new database at `db`, atomically: a temporary file beside it is filled,
/// closed and renamed over `db`, so a reader never sees a half-built database.
pub fn write_db(db: &Path, rows: &[Row]) -> Result<()> {
    let tmp = crate::artifact::temp_file_beside(db).with_context(|| db.display().to_string())?;
    let fail = |e: rusqlite::Error| anyhow!("{}: writing the database: {e}", db.display());
    {
        let mut conn = Connection::open(tmp.path()).map_err(fail)?;
        conn.execute_batch(SCHEMA).map_err(fail)?;
        let tx = conn.transaction().map_err(fail)?;
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO samples (sample_id, image_id, file_name, caption, split) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(fail)?;
            for r in rows {
                stmt.execute(rusqlite::params![r.sample_id, r.image_id, r.file_name, r.caption, r.split])
                    .map_err(fail)?;
            }
        }
        tx.commit().map_err(fail)?;
        conn.close().map_err(|(_, e)| fail(e))?;
    }
    // tempfile creates 0600 files; a database is an ordinary shared input.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| db.display().to_string())?;
    }
    tmp.as_file().sync_all().with_context(|| db.display().to_string())?;
    tmp.persist(db).map_err(|e| anyhow!("{}: {}", db.display(), e.error))?;
    crate::artifact::remove_stale_temporaries(db);
    Ok(())
}

/// Runs `query` (default [`DEFAULT_QUERY`]) on a database opened read-only and maps the result
/// columns by name. Errors name the database.
pub fn read_rows(db: &Path, query: Option<&str>) -> Result<Vec<Row>> {
    let named = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            anyhow!("{}: {e} (another connection holds a write lock on it; gave up after waiting 5 s)", db.display())
        }
        _ => anyhow!("{}: {e}", db.display()),
    };
    match std::fs::metadata(db) {
        Err(e) => return Err(anyhow!("{}: {e}", db.display())),
        Ok(m) if !m.is_file() => bail!("{}: not a file", db.display()),
        Ok(m) if m.len() == 0 => bail!("{}: empty file, not an SQLite database", db.display()),
        Ok(_) => {}
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(named)?;
    let sql = query.unwrap_or(DEFAULT_QUERY);
    let mut stmt = conn.prepare(sql).map_err(named)?;
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let mut idx = [0usize; 5];
    for (slot, want) in idx.iter_mut().zip(COLUMNS) {
        *slot = names.iter().position(|n| n == want).ok_or_else(|| {
            anyhow!(
                "{}: the query returns no column named '{want}' (it returns: {}); every query must return {}",
                db.display(),
                names.join(", "),
                COLUMNS.join(", ")
            )
        })?;
    }
    let mut rows = stmt.query([]).map_err(named)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(named)? {
        let get_i = |i: usize| -> Result<i64> {
            r.get::<_, i64>(idx[i]).map_err(|e| anyhow!("{}: column '{}': {e}", db.display(), COLUMNS[i]))
        };
        let get_s = |i: usize| -> Result<String> {
            r.get::<_, String>(idx[i]).map_err(|e| anyhow!("{}: column '{}': {e}", db.display(), COLUMNS[i]))
        };
        out.push(Row {
            sample_id: get_i(0)?,
            image_id: get_i(1)?,
            file_name: get_s(2)?,
            caption: get_s(3)?,
            split: get_s(4)?,
        });
    }
    Ok(out)
}
