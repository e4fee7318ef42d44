//! The artifact contract shared by every stage.
//!
//! Each stage reads and writes one self-describing artifact: a header (kind, schema version, the
//! tool and its version, provenance) and a payload. The payload types live in the submodules, one
//! per artifact kind, so that this folder is the whole schema (documented in `docs/artifacts.md`).
//!
//! Encoding: MessagePack with field names (`rmp_serde::to_vec_named`) by default, JSON when the
//! path ends in `.json`. Readers sniff the encoding from the first byte, so a stage can read
//! either from a file or from stdin (`-`). Writes are atomic: the bytes are fully serialized
//! first, then written to a temporary file beside the target and renamed over it, so no reader
//! ever sees a half-written artifact.

pub mod calibration;
pub mod evaluation;
pub mod inputs;
pub mod manifest;
pub mod scores;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A payload type that can be stored as an artifact.
pub trait Payload: Serialize + DeserializeOwned {
    /// Globally unique kind, e.g. `qsens.calibration`.
    const KIND: &'static str;
    /// Schema version of this payload; bumped on any incompatible change.
    const VERSION: u32;
}

/// One input an artifact was made from, identified by a content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// What the input was used as (`calibration-db`, `tokenizer`, `weights`, `inputs`, ...).
    pub role: String,
    /// The path as given on the command line (or `-` for stdin).
    pub path: String,
    /// `<algorithm>:<hex>`, e.g. `sha256:ab12...` or `blake3:...`.
    pub digest: String,
}

/// Where an artifact came from: its inputs and the parameters that shaped it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub sources: Vec<Source>,
    /// Parameters that change the output (seed, prompt, budget, ...), as strings.
    pub parameters: BTreeMap<String, String>,
}

impl Provenance {
    pub fn source(&mut self, role: &str, path: impl fmt::Display, digest: String) -> &mut Self {
        self.sources.push(Source { role: role.to_string(), path: path.to_string(), digest });
        self
    }

    pub fn param(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.parameters.insert(key.to_string(), value.to_string());
        self
    }

    /// The digest recorded for `role`, if any.
    pub fn digest_of(&self, role: &str) -> Option<&str> {
        self.sources.iter().find(|s| s.role == role).map(|s| s.digest.as_str())
    }
}

/// Artifact header: everything except the payload (read first to check kind and version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub kind: String,
    pub schema_version: u32,
    /// The binary that wrote it (`calib-extract`, `preprocess`, ...).
    pub tool: String,
    pub tool_version: String,
    pub provenance: Provenance,
}

/// A complete artifact: the header fields, then `payload`, as one map. (The fields are spelled
/// out rather than `#[serde(flatten)]`ed from [`Header`]: flatten buffers the whole payload.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact<P> {
    pub kind: String,
    pub schema_version: u32,
    pub tool: String,
    pub tool_version: String,
    pub provenance: Provenance,
    pub payload: P,
}

impl<P: Payload> Artifact<P> {
    pub fn new(tool: &str, provenance: Provenance, payload: P) -> Self {
        Artifact {
            kind: P::KIND.to_string(),
            schema_version: P::VERSION,
            tool: tool.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            provenance,
            payload,
        }
    }
}

/// A file path, or `-` for stdin/stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Std,
    File(PathBuf),
}

impl Location {
    pub fn is_json(&self) -> bool {
        matches!(self, Location::File(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")))
    }
}

impl From<&str> for Location {
    fn from(s: &str) -> Self {
        if s == "-" {
            Location::Std
        } else {
            Location::File(PathBuf::from(s))
        }
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Self {
        if p.as_os_str() == "-" {
            Location::Std
        } else {
            Location::File(p.to_path_buf())
        }
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Self {
        Location::from(p.as_path())
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Std => f.write_str("-"),
            Location::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Encoding of an artifact's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    MessagePack,
    Json,
}

impl Encoding {
    /// JSON starts with `{` (after optional whitespace); a msgpack artifact starts with a map
    /// marker (0x80..=0x8f, 0xde, 0xdf), and `{` (0x7b) is never one.
    pub fn sniff(bytes: &[u8]) -> Encoding {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Encoding::Json,
            _ => Encoding::MessagePack,
        }
    }
}

/// Serializes an artifact to bytes in the given encoding.
pub fn to_bytes<P: Payload>(artifact: &Artifact<P>, encoding: Encoding) -> Result<Vec<u8>> {
    Ok(match encoding {
        Encoding::MessagePack => rmp_serde::to_vec_named(artifact)?,
        Encoding::Json => {
            let mut v = serde_json::to_vec_pretty(artifact)?;
            v.push(b'\n');
            v
        }
    })
}

/// Parses an artifact from bytes, checking kind and schema version first so that the error
/// names the real problem rather than a missing field deep inside the payload.
pub fn from_bytes<P: Payload>(bytes: &[u8]) -> Result<Artifact<P>> {
    if bytes.is_empty() {
        bail!("empty file, not a qsens artifact");
    }
    let encoding = Encoding::sniff(bytes);
    let header: Header = decode(bytes, encoding).context("not a qsens artifact (no valid header)")?;
    if header.kind != P::KIND {
        bail!("artifact kind is '{}', expected '{}'", header.kind, P::KIND);
    }
    if header.schema_version != P::VERSION {
        bail!(
            "'{}' schema version {} is not supported (this qsens {} reads version {})",
            header.kind,
            header.schema_version,
            env!("CARGO_PKG_VERSION"),
            P::VERSION
        );
    }
    decode(bytes, encoding).with_context(|| format!("malformed '{}' payload", P::KIND))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], encoding: Encoding) -> Result<T> {
    Ok(match encoding {
        Encoding::MessagePack => rmp_serde::from_slice(bytes)?,
        Encoding::Json => serde_json::from_slice(bytes)?,
    })
}

/// Reads all bytes from a file or stdin.
pub fn read_bytes(location: &Location) -> Result<Vec<u8>> {
    match location {
        Location::Std => {
            let mut buf = Vec::new();
            std::io::stdin().lock().read_to_end(&mut buf).context("reading stdin")?;
            Ok(buf)
        }
        Location::File(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
    }
}

/// Reads and validates an artifact. Errors name the location.
pub fn read<P: Payload>(location: impl Into<Location>) -> Result<Artifact<P>> {
    let location = location.into();
    let bytes = read_bytes(&location)?;
    from_bytes(&bytes).with_context(|| format!("{location}"))
}

/// Writes an artifact atomically (msgpack, or JSON for `.json` paths; msgpack on stdout).
pub fn write<P: Payload>(location: impl Into<Location>, artifact: &Artifact<P>) -> Result<()> {
    let location = location.into();
    let encoding = if location.is_json() { Encoding::Json } else { Encoding::MessagePack };
    let bytes = to_bytes(artifact, encoding).with_context(|| format!("encoding {location}"))?;
    write_bytes_atomic(&location, &bytes)
}

/// Writes bytes to stdout, or to a file via a temporary sibling and a rename.
pub fn write_bytes_atomic(location: &Location, bytes: &[u8]) -> Result<()> {
    match location {
        Location::Std => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes).context("writing stdout")?;
            out.flush().context("writing stdout")
        }
        Location::File(path) => write_file_atomic(path, bytes),
    }
}

/// Atomically replaces `path` with `bytes`. The temporary file lives in the same directory (so
/// the rename cannot cross file systems) and is removed if anything fails; temporaries that
/// killed writers left beside `path` are removed after the rename (see [`temp_file_beside`]).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_file_beside(path)?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    // tempfile creates 0600 files; artifacts are ordinary files (rw-r--r--).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tmp.as_file().sync_all().with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("writing {}", path.display()))?;
    remove_stale_temporaries(path);
    Ok(())
}

/// A new temporary file beside `path` (its directory is created if needed), named
/// `.<file name>.<pid>.<random>.tmp`: hidden, never read by any stage, and removed on drop. A
/// writer killed with SIGKILL cannot remove it; the pid in the name lets the next successful
/// write of the same path recognise it as stale ([`remove_stale_temporaries`]).
pub fn temp_file_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    tempfile::Builder::new()
        .prefix(&format!(".{}.{}.", file_name(path), std::process::id()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Removes the temporaries (files, or `quantize`'s directories; and SQLite `-journal` companions)
/// of writes to `path` whose writer
/// process no longer runs: what a write interrupted by SIGKILL leaves. Best effort: errors are
/// ignored, and where process liveness cannot be told (not Linux) nothing is removed.
pub fn remove_stale_temporaries(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(".{}.", file_name(path));
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some((pid, rest)) = name.strip_prefix(&prefix).and_then(|r| r.split_once('.')) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !rest.contains(".tmp") || pid == std::process::id() || process_may_run(pid) {
            continue;
        }
        // A directory is a checkpoint `quantize` was writing.
        let _ = if entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
    }
}

/// False only when `pid` certainly does not run (no `/proc/<pid>`, or a zombie).
fn process_may_run(pid: u32) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last ')'.
        Ok(stat) => {
            let state = stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next());
            state.is_none_or(|s| s != 'Z' && s != 'X')
        }
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Digests of the checkpoint files that determine the model: `config.json` (role `model-config`,
/// sha256) and every `*.safetensors` file (role `model-weights`, blake3), in file-name order.
pub fn model_provenance(dir: &Path, prov: &mut Provenance) -> Result<()> {
    let config = dir.join("config.json");
    prov.source("model-config", config.display(), sha256_file(&config)?);
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    weights.sort();
    ensure!(!weights.is_empty(), "{}: no .safetensors weights", dir.display());
    for w in weights {
        prov.source("model-weights", w.display(), blake3_file(&w)?);
    }
    Ok(())
}

/// `sha256:<hex>` of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// `blake3:<hex>` of a (possibly multi-GB) file, memory-mapped and hashed on all cores: model
/// weights are hashed on every run, and sha256 of 9 GB would cost tens of seconds.
pub fn blake3_file(path: &Path) -> Result<String> {
    // Hashed through a sliding 256 MiB map on all cores: the digest of the whole file, while only
    // one window of it is mapped at a time (a whole-file map would count the file in the process's
    // resident memory).
    const WINDOW: u64 = 256 << 20;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0;
    while offset < len {
        let n = WINDOW.min(len - offset);
        // SAFETY: read-only view of a file we do not modify; unmapped before the next window.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(n as usize).map(&file) }
            .with_context(|| format!("hashing {}", path.display()))?;
        hasher.update_rayon(&map);
        offset += n;
    }
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Demo {
        values: Vec<u32>,
    }
    impl Payload for Demo {
        const KIND: &'static str = "qsens.test-demo";
        const VERSION: u32 = 3;
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Other {
        values: Vec<u32>,
    }
    impl Payload for Other {
        const KIND: &'static str = "qsens.test-other";
        const VERSION: u32 = 3;
    }

    fn demo() -> Artifact<Demo> {
        let mut prov = Provenance::default();
        prov.source("db", "a.db", sha256_bytes(b"abc")).param("seed", 7);
        Artifact::new("unit-test", prov, Demo { values: vec![1, 2, 300] })
    }

    #[test]
    fn round_trips_in_both_encodings() {
        for enc in [Encoding::MessagePack, Encoding::Json] {
            let bytes = to_bytes(&demo(), enc).unwrap();
            assert_eq!(Encoding::sniff(&bytes), enc);
            let back: Artifact<Demo> = from_bytes(&bytes).unwrap();
            assert_eq!(back, demo());
        }
    }

    #[test]
    fn rejects_wrong_kind_and_version() {
        let bytes = to_bytes(&demo(), Encoding::MessagePack).unwrap();
        let err = from_bytes::<Other>(&bytes).unwrap_err().to_string();
        assert!(err.contains("'qsens.test-demo', expected 'qsens.test-other'"), "{err}");

        let mut a = demo();
        a.schema_version = 9;
        let bytes = to_bytes(&a, Encoding::Json).unwrap();
        let err = format!("{:#}", from_bytes::<Demo>(&bytes).unwrap_err());
        assert!(err.contains("schema version 9"), "{err}");
    }

    #[test]
    fn rejects_truncated_and_empty() {
        let bytes = to_bytes(&demo(), Encoding::MessagePack).unwrap();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(from_bytes::<Demo>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn sha256_known_vector() {
        assert_eq!(sha256_bytes(b"abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.json");
        write(path.as_path(), &demo()).unwrap();
        let back: Artifact<Demo> = read(path.as_path()).unwrap();
        assert_eq!(back, demo());
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.json")]);
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        // pid 0 never names a user process; our own pid is alive; other names are not ours.
        let keep = [".out.json.%SELF%.abc.tmp", ".other.json.0.abc.tmp", "out.json.0.abc.tmp"];
        let pid = std::process::id().to_string();
        let keep: Vec<String> = keep.iter().map(|k| k.replace("%SELF%", &pid)).collect();
        let stale = [".out.json.0.abc.tmp", ".out.json.0.abc.tmp-journal"];
        for name in keep.iter().map(String::as_str).chain(stale) {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        write(path.as_path(), &demo()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = keep.clone();
        want.push("out.json".into());
        want.sort();
        assert_eq!(names, want);
    }
}
