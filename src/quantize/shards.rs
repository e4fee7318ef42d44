//! Sharded safetensors output, laid out as HF's `save_pretrained` writes it: tensors split into
//! files of at most `max_shard_size` bytes in order (a tensor larger than that gets a file of its
//! own), files named `model-00001-of-0000N.safetensors` with a `model.safetensors.index.json`
//! (or a single `model.safetensors` without index), each file's tensors sorted by dtype alignment
//! then name as the safetensors library does.
//!
//! Tensors are produced one at a time by the caller and written by a second thread while the next
//! is made, so memory holds about two tensors whatever the checkpoint's size; unchanged tensors
//! are copied file to file by the kernel.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

/// One tensor of the output.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Parses HF's `max_shard_size` spelling: `5GB` (10^9), `5GiB` (2^30), `500MB`, `100KB`, or bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().with_context(|| format!("invalid size '{s}' (e.g. 5GB, 500MB, 2GiB)"))?;
    let factor: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        _ => bail!("invalid size '{s}': unknown unit '{unit}' (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    ensure!(value > 0.0 && value.is_finite(), "invalid size '{s}': must be positive");
    Ok((value * factor) as u64)
}

/// Splits tensors (in the given order) into shards as `huggingface_hub`'s
/// `split_state_dict_into_shards` does; returns indices into `tensors`.
pub fn assign(tensors: &[TensorSpec], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.byte_len() as u64;
        if size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// File names of `n` shards.
pub fn file_names(n: usize) -> Vec<String> {
    if n == 1 {
        return vec![crate::model::loader::SINGLE_FILE.to_string()];
    }
    (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect()
}

/// One tensor's bytes for [`write_file`].
pub enum Bytes<'a> {
    /// Made in memory.
    Owned(Vec<u8>),
    /// Unchanged bytes of another file, copied by the kernel (`copy_file_range`: they never
    /// enter the process's memory).
    FileRange { file: &'a std::fs::File, offset: u64, len: usize },
}

impl Bytes<'_> {
    pub fn byte_len(&self) -> usize {
        match self {
            Bytes::Owned(v) => v.len(),
            Bytes::FileRange { len, .. } => *len,
        }
    }
}

/// Writes one safetensors file: `produce` is called once per tensor, in file order, and must
/// give exactly `byte_len()` bytes. A writer thread writes each tensor while `produce` makes the
/// next, so computing and writing overlap; at most two produced tensors are in memory.
pub fn write_file<'a>(
    path: &Path,
    tensors: &[&TensorSpec],
    metadata: &HashMap<String, String>,
    mut produce: impl FnMut(&TensorSpec) -> Result<Bytes<'a>>,
) -> Result<()> {
    let mut order: Vec<&TensorSpec> = tensors.to_vec();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for t in &order {
        let n = t.byte_len();
        infos.push((
            t.name.clone(),
            TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (offset, offset + n) },
        ));
        offset += n;
    }
    let meta = Metadata::new(Some(metadata.clone()), infos).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut header = serde_json::to_string(&meta)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", path.display());
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;

    let (send, receive) = std::sync::mpsc::sync_channel::<Bytes<'a>>(1);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            for bytes in receive {
                match bytes {
                    Bytes::Owned(v) => out.write_all(&v).map_err(io)?,
                    Bytes::FileRange { file, offset, len } => {
                        use std::io::{Read, Seek};
                        out.flush().map_err(io)?;
                        let mut src = file;
                        src.seek(std::io::SeekFrom::Start(offset)).map_err(io)?;
                        let copied = std::io::copy(&mut src.take(len as u64), out.get_mut()).map_err(io)?;
                        ensure!(copied == len as u64, "writing {}: copied {copied} of {len} bytes", path.display());
                    }
                }
            }
            out.flush().map_err(io)?;
            Ok(())
        });
        let produced = (|| -> Result<()> {
            for t in order {
                let bytes = produce(t).with_context(|| format!("tensor `{}`", t.name))?;
                ensure!(
                    bytes.byte_len() == t.byte_len(),
                    "tensor `{}`: {} bytes, expected {}",
                    t.name,
                    bytes.byte_len(),
                    t.byte_len()
                );
                // A closed channel means the writer failed: its error is reported below.
                if send.send(bytes).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(send);
        let written =
            writer.join().map_err(|_| anyhow::anyhow!("writing {}: the writer thread panicked", path.display()))?;
        produced.and(written)
    })
}

/// `model.safetensors.index.json` as HF writes it (sorted keys, 2-space indent).
pub fn index_json(tensors: &[TensorSpec], shards: &[Vec<usize>], files: &[String]) -> Result<String> {
    let mut weight_map = BTreeMap::new();
    for (shard, file) in shards.iter().zip(files) {
        for &i in shard {
            weight_map.insert(tensors[i].name.clone(), file.clone());
        }
    }
    let total: u64 = tensors.iter().map(|t| t.byte_len() as u64).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    Ok(serde_json::to_string_pretty(&index)? + "\n")
}

/// The paths of the shard files in `dir`.
pub fn paths(dir: &Path, files: &[String]) -> Vec<PathBuf> {
    files.iter().map(|f| dir.join(f)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec { name: name.into(), dtype: Dtype::U8, shape: vec![n] }
    }

    #[test]
    fn sizes_parse_like_hf() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("-1GB").is_err());
    }

    #[test]
    fn shards_split_in_order_and_big_tensors_go_alone() {
        let t = [spec("a", 40), spec("b", 50), spec("c", 200), spec("d", 30), spec("e", 30), spec("f", 50)];
        // As huggingface_hub: the oversized tensor's file comes before the one being filled.
        assert_eq!(assign(&t, 100), vec![vec![2], vec![0, 1], vec![3, 4], vec![5]]);
        assert_eq!(file_names(1), vec!["model.safetensors"]);
        assert_eq!(file_names(3)[1], "model-00002-of-00003.safetensors");
    }

    #[test]
    fn written_files_read_back_with_the_safetensors_crate() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let a = TensorSpec { name: "w".into(), dtype: Dtype::F32, shape: vec![2, 2] };
        let b = TensorSpec { name: "q".into(), dtype: Dtype::F8_E4M3, shape: vec![3] };
        let path = dir.path().join("x.safetensors");
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        // `q` comes from a file range, `w` from memory.
        let source = dir.path().join("source");
        std::fs::write(&source, [9, 1, 2, 3, 9])?;
        let source = std::fs::File::open(&source)?;
        write_file(&path, &[&b, &a], &meta, |t| {
            Ok(match t.name.as_str() {
                "w" => Bytes::Owned([1f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect()),
                _ => Bytes::FileRange { file: &source, offset: 1, len: 3 },
            })
        })?;
        let bytes = std::fs::read(&path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        assert_eq!(st.tensor("q")?.data(), &[1, 2, 3]);
        assert_eq!(st.tensor("w")?.data()[4..8], 2f32.to_le_bytes());
        // Same bytes as the safetensors library's own serializer.
        let w_data: Vec<u8> = [1f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            ("w", safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 2], &w_data)?),
            ("q", safetensors::tensor::TensorView::new(Dtype::F8_E4M3, vec![3], &[1, 2, 3])?),
        ];
        assert_eq!(bytes, safetensors::serialize(views, Some(meta))?);
        Ok(())
    }
}
