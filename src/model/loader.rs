//! Memory-mapped HF safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`.
//!
//! Tensors are read on demand by HF name, checked against the shape the model expects and cast to
//! the dtype chosen at load. A missing or misshaped tensor is an error that names the tensor and
//! the file it was looked up in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{bail, DType, Device, Result, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    file: std::fs::File,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    meta: Metadata,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    location: HashMap<String, usize>,
    /// The index json of a sharded checkpoint (named in errors).
    index: Option<PathBuf>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("shards", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.location.len())
            .finish()
    }
}

/// Opens and checks one safetensors file. `populate` maps every page up front (one pass in the
/// kernel instead of ~2M page faults while a 9 GB model uploads); without it only the header is
/// read, for callers that stream tensors with [`Checkpoint::read_raw`] and must not hold the
/// whole file in memory.
fn open_shard(path: &Path, populate: bool) -> Result<Shard> {
    let file = std::fs::File::open(path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: the checkpoint is treated as read-only for the lifetime of the map; like every
    // mmap-based loader (candle, safetensors) we rely on nobody truncating it meanwhile.
    let mut options = memmap2::MmapOptions::new();
    if populate {
        options.populate();
    }
    let mmap = unsafe { options.map(&file) }
        .map_err(|e| candle_core::Error::Msg(format!("cannot map {}: {e}", path.display())))?;
    let (header_len, meta) = SafeTensors::read_metadata(&mmap[..])
        .map_err(|e| candle_core::Error::Msg(format!("{} is not a valid safetensors file: {e}", path.display())))?;
    Ok(Shard { path: path.to_path_buf(), file, mmap, data_start: 8 + header_len, meta })
}

fn candle_dtype(dt: StDtype) -> Option<DType> {
    Some(match dt {
        StDtype::F64 => DType::F64,
        StDtype::F32 => DType::F32,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I64 => DType::I64,
        StDtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (sharded) if present, else `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    /// Opens a checkpoint for streaming: headers only, tensors read one at a time with
    /// [`Checkpoint::read_raw`] (memory stays at one tensor, whatever the checkpoint's size).
    pub fn open_streaming(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    fn open_with(dir: &Path, populate: bool) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", index_path.display())))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| candle_core::Error::Msg(format!("{} is not valid JSON: {e}", index_path.display())))?;
            let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
                bail!("{} has no `weight_map` object", index_path.display())
            };
            let mut shards = Vec::new();
            let mut file_ix: HashMap<String, usize> = HashMap::new();
            let mut location = HashMap::new();
            let mut names: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            for (name, file) in names {
                let Some(file) = file.as_str() else {
                    bail!("{}: weight_map entry for `{name}` is not a string", index_path.display())
                };
                let ix = match file_ix.get(file) {
                    Some(&ix) => ix,
                    None => {
                        shards.push(open_shard(&dir.join(file), populate)?);
                        file_ix.insert(file.to_string(), shards.len() - 1);
                        shards.len() - 1
                    }
                };
                location.insert(name.clone(), ix);
            }
            Ok(Checkpoint { shards, location, index: Some(index_path) })
        } else {
            let path = dir.join(SINGLE_FILE);
            if !path.is_file() {
                bail!("no {} or {} in {}", SINGLE_FILE, INDEX_FILE, dir.display())
            }
            let shard = open_shard(&path, populate)?;
            let location = shard.meta.tensors().into_keys().map(|k| (k, 0)).collect();
            Ok(Checkpoint { shards: vec![shard], location, index: None })
        }
    }

    /// Whether the checkpoint lists tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Every tensor: name, stored dtype and shape, sorted by name.
    pub fn tensors(&self) -> Vec<(&str, StDtype, &[usize])> {
        let mut out: Vec<(&str, StDtype, &[usize])> = self
            .location
            .iter()
            .filter_map(|(name, &ix)| {
                self.shards[ix].meta.info(name).map(|i| (name.as_str(), i.dtype, i.shape.as_slice()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        out
    }

    /// The files the checkpoint is made of (the shards, or the single file).
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The stored bytes of tensor `name` (little-endian, its own dtype), read from the file
    /// (not through the map, so nothing stays resident after the caller drops them).
    pub fn read_raw(&self, name: &str) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (shard, start, end) = self.locate(name)?;
        let mut buf = vec![0u8; end - start];
        shard
            .file
            .read_exact_at(&mut buf, start as u64)
            .map_err(|e| candle_core::Error::Msg(format!("reading `{name}` from {}: {e}", shard.path.display())))?;
        Ok(buf)
    }

    /// The shard of tensor `name` and the range of its bytes in the shard's file.
    fn locate(&self, name: &str) -> Result<(&Shard, usize, usize)> {
        let Some(&ix) = self.location.get(name) else {
            bail!("tensor `{name}` is missing from {}", self.where_listed())
        };
        let shard = &self.shards[ix];
        let Some(info) = shard.meta.info(name) else {
            bail!("tensor `{name}` is listed in {} but missing from {}", self.where_listed(), shard.path.display())
        };
        let (start, end) = info.data_offsets;
        let (start, end) = (shard.data_start + start, shard.data_start + end);
        if end > shard.mmap.len() {
            bail!("tensor `{name}` in {} ends past the end of the file (truncated?)", shard.path.display())
        }
        Ok((shard, start, end))
    }

    /// Where tensor `name`'s bytes lie: its file, their offset in it and their length (for copies
    /// the kernel makes file to file).
    pub fn byte_range(&self, name: &str) -> Result<(&std::fs::File, u64, usize)> {
        let (shard, start, end) = self.locate(name)?;
        Ok((&shard.file, start as u64, end - start))
    }

    /// Calls `f` with tensor `name`'s stored bytes, read through the map without a copy; then
    /// tells the kernel the process no longer needs those pages, so they leave its resident set
    /// (they stay in the page cache) and a pass over a whole checkpoint stays small.
    pub fn with_mapped<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let (shard, start, end) = self.locate(name)?;
        let out = f(&shard.mmap[start..end]);
        // SAFETY: nothing borrows the range any more, and the map is a read-only map of a file
        // treated as read-only: dropped pages fault back in with the same bytes.
        let _ = unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        Ok(out)
    }

    /// Where a lookup of an unlisted tensor was made, for error messages.
    fn where_listed(&self) -> String {
        match &self.index {
            Some(p) => p.display().to_string(),
            None => self.shards[0].path.display().to_string(),
        }
    }

    /// Tensor `name`, checked to have shape `shape`, as `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(&ix) = self.location.get(name) else {
            bail!("tensor `{name}` is missing from {}", self.where_listed())
        };
        let shard = &self.shards[ix];
        let Some(info) = shard.meta.info(name) else {
            bail!(
                "tensor `{name}` is listed in {} for {} but missing from that file",
                self.where_listed(),
                shard.path.display()
            )
        };
        if info.dtype == StDtype::U8 && shape.len() == 2 {
            return self.nvfp4_weight(name, shape, dtype, device);
        }
        if info.shape != shape {
            bail!("tensor `{name}` in {} has shape {:?}, expected {:?}", shard.path.display(), info.shape, shape)
        }
        let Some(src_dtype) = candle_dtype(info.dtype).filter(|d| d.is_float()) else {
            bail!("tensor `{name}` in {} has unsupported dtype {:?}", shard.path.display(), info.dtype)
        };
        let (start, end) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .filter(|b| b.len() == shape.iter().product::<usize>() * src_dtype.size_in_bytes());
        let Some(bytes) = bytes else {
            bail!("tensor `{name}` in {} has inconsistent data offsets", shard.path.display())
        };
        if src_dtype == DType::F8E4M3 {
            // An FP8 checkpoint (qsens `quantize`, ModelOpt, llm-compressor): W = e4m3 · weight_scale,
            // dequantized in f32 as the serving kernels apply the scale, then cast.
            let Some(scale_name) = name.strip_suffix(".weight").map(|p| format!("{p}.weight_scale")) else {
                bail!("tensor `{name}` in {} is FP8 but is not a `.weight`", shard.path.display())
            };
            let Some(scale) = self.scalar_f32(&scale_name)? else {
                bail!("tensor `{name}` in {} is FP8 but `{scale_name}` is missing", shard.path.display())
            };
            let codes = Tensor::from_raw_buffer(bytes, src_dtype, shape, &Device::Cpu)?.to_dtype(DType::F32)?;
            let scale = Tensor::new(scale, &Device::Cpu)?;
            return codes.broadcast_mul(&scale)?.to_device(device)?.to_dtype(dtype);
        }
        // Upload in the stored dtype, convert on the target device.
        Tensor::from_raw_buffer(bytes, src_dtype, shape, device)?.to_dtype(dtype)
    }

    /// An NVFP4 weight of logical shape `[rows, cols]` as ModelOpt's exporter (and qsens
    /// `quantize`) stores it — `weight` uint8 `[rows, cols/2]` of E2M1 pairs, `weight_scale`
    /// E4M3 `[rows, cols/16]`, `weight_scale_2` f32 — dequantized as a serving kernel applies it.
    fn nvfp4_weight(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (rows, cols) = (shape[0], shape[1]);
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        let Some(weight_scale_2) = self.scalar_f32(&format!("{prefix}.weight_scale_2"))? else {
            bail!("tensor `{name}` is uint8 but `{prefix}.weight_scale_2` is missing (not an NVFP4 weight?)")
        };
        let raw = |n: &str, want: [usize; 2], dtype: StDtype| -> Result<Vec<u8>> {
            let ix = self.location.get(n).copied();
            let info = ix.and_then(|ix| self.shards[ix].meta.info(n).map(|i| (ix, i)));
            let Some((ix, info)) = info else { bail!("NVFP4 tensor `{n}` is missing from {}", self.where_listed()) };
            if info.dtype != dtype || info.shape != want {
                bail!(
                    "NVFP4 tensor `{n}` in {} is {:?} {:?}, expected {dtype:?} {want:?}",
                    self.shards[ix].path.display(),
                    info.dtype,
                    info.shape
                )
            }
            self.read_raw(n)
        };
        if cols % crate::quant::nvfp4::BLOCK_SIZE != 0 {
            bail!("tensor `{name}`: {cols} columns are not NVFP4 blocks of 16")
        }
        let packed = crate::quant::nvfp4::PackedWeight {
            packed: raw(name, [rows, cols / 2], StDtype::U8)?,
            block_scales: raw(&format!("{prefix}.weight_scale"), [rows, cols / 16], StDtype::F8_E4M3)?,
        };
        let values = crate::quant::nvfp4::decode_weight(&packed, cols, weight_scale_2);
        Tensor::from_vec(values, (rows, cols), &Device::Cpu)?.to_device(device)?.to_dtype(dtype)
    }

    /// A one-element tensor (shape `[]` or `[1]`, any float dtype) as f32, e.g. a per-tensor
    /// `weight_scale` or `input_scale`; `None` when the checkpoint does not list it.
    pub fn scalar_f32(&self, name: &str) -> Result<Option<f32>> {
        let Some(&ix) = self.location.get(name) else { return Ok(None) };
        let shard = &self.shards[ix];
        let Some(info) = shard.meta.info(name) else {
            bail!("tensor `{name}` is listed in {} but missing from {}", self.where_listed(), shard.path.display())
        };
        if info.shape.iter().product::<usize>() != 1 {
            bail!("tensor `{name}` in {} has shape {:?}, expected one element", shard.path.display(), info.shape)
        }
        let Some(src_dtype) = candle_dtype(info.dtype).filter(|d| d.is_float()) else {
            bail!("tensor `{name}` in {} has unsupported dtype {:?}", shard.path.display(), info.dtype)
        };
        let (start, end) = info.data_offsets;
        let Some(bytes) = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .filter(|b| b.len() == src_dtype.size_in_bytes())
        else {
            bail!("tensor `{name}` in {} has inconsistent data offsets", shard.path.display())
        };
        let value = Tensor::from_raw_buffer(bytes, src_dtype, &[1], &Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(Some(value.to_vec1::<f32>()?[0]))
    }
}
