//! ModelOpt's `kl_div` score: `Σ_positions KL(P_unquantized ‖ P_group-quantized)`, with only
//! one group quantized at a time. ModelOpt runs a full forward per group and format; we restart
//! each one from the cached activation at the group's first layer, up to `lm_head`'s input
//! (`Qwen3VL::forward_from_hidden`).
//!
//! The KL itself is the other large cost: the logits are `[L, vocab]` (vocab 151 936), and the
//! op-by-op form (`log_softmax`, `exp`, `−`, `×`, `sum`) allocates and walks several such
//! temporaries per group and format. [`KlBase`] prepares the unquantized distribution once per
//! sample; on the CPU, [`KlBase::kl_sum_linear`] then applies `lm_head` one vocabulary slice at a
//! time (the slice's logits stay in cache, no `[L, vocab]` tensor is made) and folds each slice
//! into a per-row running state (online log-sum-exp), rows in parallel:
//!
//! ```text
//! KL_t = Σ_i p_i (log p_i − log q_i) = (Σ_i p_i x_i − Σ_i p_i z_i) + (lse(z) − lse(x))·s_t,
//!        s_t = Σ_i p_i
//! ```
//!
//! with `x`, `z` the base and new logits and `p_i` the base probabilities (exact f64 softmax,
//! rounded to f32; the same values weight both sides). `lse` and the dots of both sides are
//! summed by the same kernel over the same slices, so unchanged logits give exactly 0; partial
//! sums are f32 over 32 terms per lane, then f64, which leaves ~1e-9 relative in a row's `lse`
//! (far below what f32 logits resolve). Every sum has a fixed order, so the result does not
//! depend on the thread count or on whether the AVX2 kernels ran. Other devices and dtypes use
//! the candle-op path ([`log_softmax`], [`kl_sum`]).

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, D};
use rayon::prelude::*;

use crate::model::linear::matmul;
use crate::model::qwen3_vl::Qwen3VL;
use crate::model::{LayerId, Linear, Tap};

use super::gradient::LayerQuant;
use super::kl_fused::FusedBase;

/// Replaces the outputs of the active group's layers with their fake-quantized outputs.
pub struct GroupQuantTap<'a> {
    pub quant: &'a LayerQuant<'a>,
    /// Layer ids of the active group.
    pub members: &'a [LayerId],
    /// Active format index.
    pub format: usize,
}

impl Tap for GroupQuantTap<'_> {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.members.contains(&id) {
            return Ok(None);
        }
        self.quant.quantized_output(id, self.format, linear, x).map(Some)
    }
}

/// Each packed sample's `Σ_rows KL(P ‖ P_q)` (f64 `[samples]`) for one group and format, from the final hidden state of the group's
/// re-forward (`Qwen3VL::forward_from_hidden`): `lm_head` is applied here, fake-quantized when
/// it is in the group, as the model's tap would.
pub fn head_kl(
    model: &Qwen3VL,
    quant: &LayerQuant,
    members: &[LayerId],
    format: usize,
    base: &KlBase,
    hidden: &Tensor,
) -> Result<Tensor> {
    let head = model.lm_head_id();
    let linear = model.linear(head);
    if members.contains(&head) {
        let (xq, wq) = quant.quantized_operands(head, format, linear, hidden)?;
        base.sample_kls_linear(&xq, &wq, linear.bias())
    } else {
        base.sample_kls_linear(hidden, linear.weight(), linear.bias())
    }
}

/// log-softmax over the last dim, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `Σ exp(lp) (lp − lq)` over all positions and classes (torch's `kl_div(lq, lp, log_target=True,
/// reduction="sum")`), as an f32 scalar tensor.
pub fn kl_sum(log_p: &Tensor, log_q: &Tensor) -> Result<Tensor> {
    kl_terms(log_p, log_q)?.sum_all()
}

/// The terms `exp(lp) (lp − lq)` that [`kl_sum`] adds up.
fn kl_terms(log_p: &Tensor, log_q: &Tensor) -> Result<Tensor> {
    log_p.exp()? * (log_p - log_q)?
}

/// What [`KlBase::kl_rows_linear_sliced`] gives: per-row KL, or the logits to compare.
enum RowsOr {
    Rows(Vec<f64>),
    Logits(Tensor),
}

/// One input's unquantized next-token distributions, prepared once for every group and format.
pub struct KlBase {
    inner: Base,
    /// The rows `(start, len)` of each packed sample (one entry of every row when not packed).
    samples: Vec<(usize, usize)>,
}

enum Base {
    /// f32 logits on the CPU: the fused kernel's inputs.
    Cpu(CpuBase),
    /// Any other device or dtype: log-probabilities for the candle-op path.
    Ops(Tensor),
    /// A CUDA device: the fused per-row sums of `kl_fused`.
    Fused(FusedBase),
}

/// `p` (f32-rounded probabilities, row-major `[rows, vocab]`), per row `s = Σ p` (f64, of the
/// rounded `p`), and the base logits' own running sums, made by the very code (same slices) that
/// folds the new logits, so that unchanged logits give exactly 0.
struct CpuBase {
    rows: usize,
    vocab: usize,
    /// Per packed sample: its rows `(start, len)` and its vocabulary entries per slice (a
    /// sample's own, as if it were alone, so packing does not change its sums).
    slices: Vec<((usize, usize), usize)>,
    p: Vec<f32>,
    s: Vec<f64>,
    base: Vec<RowState>,
}

impl KlBase {
    /// Prepares the base distribution from the unquantized logits `[L, vocab]`.
    pub fn new(logits: &Tensor) -> Result<KlBase> {
        let rows = logits.dim(0)?;
        Self::packed(logits, vec![(0, rows)])
    }

    /// [`KlBase::new`] for the logits of packed samples, whose rows `(start, len)` are `samples`.
    pub fn packed(logits: &Tensor, samples: Vec<(usize, usize)>) -> Result<KlBase> {
        let (rows, vocab) = logits.dims2()?;
        let mut next = 0;
        for &(start, len) in &samples {
            if start != next {
                candle_core::bail!("kl: samples {samples:?} do not split the {rows} rows of the logits");
            }
            next += len;
        }
        if next != rows {
            candle_core::bail!("kl: samples {samples:?} do not split the {rows} rows of the logits");
        }
        if logits.device().is_cuda() {
            return Self::fused(logits, samples);
        }
        if !(matches!(logits.device(), Device::Cpu) && logits.dtype() == DType::F32 && vocab > 0) {
            return Ok(KlBase { inner: Base::Ops(log_softmax(logits)?), samples });
        }
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
            candle_core::bail!("kl: base logits must be contiguous f32 on the CPU");
        };
        let x = &data[start..end];
        let mut p = vec![0f32; rows * vocab];
        let s = x.par_chunks(vocab).zip(p.par_chunks_mut(vocab)).map(|(x, p)| base_row(x, p)).collect();
        let slices = samples.iter().map(|&(start, len)| ((start, len), slice_width(len, vocab))).collect();
        let mut base = CpuBase { rows, vocab, slices, p, s, base: Vec::new() };
        base.base = base.fold_whole(x)?;
        Ok(KlBase { inner: Base::Cpu(base), samples })
    }

    /// The base of the fused path (what a CUDA device gets; on the CPU, for tests).
    pub fn fused(logits: &Tensor, samples: Vec<(usize, usize)>) -> Result<KlBase> {
        Ok(KlBase { inner: Base::Fused(FusedBase::new(logits, log_softmax(logits)?.exp()?)?), samples })
    }

    /// Each packed sample's `Σ_rows KL(P ‖ softmax(logits))`, f64 `[samples]` on the logits'
    /// device (no host sync off the CPU). One sample's is [`KlBase::kl_sum`]'s number.
    pub fn sample_kls(&self, logits: &Tensor) -> Result<Tensor> {
        match &self.inner {
            Base::Fused(base) => {
                let rows = base.kl_rows(logits)?;
                let sums = self
                    .samples
                    .iter()
                    .map(|&(start, len)| rows.narrow(0, start, len)?.sum_all())
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&sums, 0)
            }
            Base::Cpu(base) => self.sample_sums(&base.kl_rows_of(logits)?),
            Base::Ops(log_p) => {
                let terms = kl_terms(log_p, &log_softmax(logits)?)?;
                let sums = self
                    .samples
                    .iter()
                    .map(|&(start, len)| terms.narrow(0, start, len)?.sum_all())
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&sums, 0)?.to_dtype(DType::F64)
            }
        }
    }

    /// [`KlBase::sample_kls`] of the logits `x Wᵀ + b`, made as [`KlBase::kl_sum_linear`] makes them.
    pub fn sample_kls_linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let rows = self.kl_rows_linear_sliced(x, w, bias, None)?;
        match rows {
            RowsOr::Rows(rows) => self.sample_sums(&rows),
            RowsOr::Logits(logits) => self.sample_kls(&logits),
        }
    }

    /// Each packed sample's sum of the per-row KLs of the CPU path (f64 `[samples]`), added in
    /// row order as one sample alone adds them.
    fn sample_sums(&self, rows: &[f64]) -> Result<Tensor> {
        let sums: Vec<f64> =
            self.samples.iter().map(|&(start, len)| rows[start..start + len].iter().fold(0.0, |a, b| a + b)).collect();
        Tensor::new(sums, &Device::Cpu)
    }

    /// `Σ_rows KL(P ‖ softmax(logits))` for new logits of the same shape, as an f64 scalar tensor
    /// on the logits' device (no host sync on the candle-op path).
    pub fn kl_sum(&self, logits: &Tensor) -> Result<Tensor> {
        match &self.inner {
            Base::Cpu(base) => {
                let rows = base.kl_rows_of(logits)?;
                Tensor::new(rows.iter().fold(0.0, |a, b| a + b), &Device::Cpu)
            }
            Base::Ops(log_p) => kl_sum(log_p, &log_softmax(logits)?)?.to_dtype(DType::F64),
            Base::Fused(base) => base.kl_rows(logits)?.sum_all(),
        }
    }

    /// [`KlBase::kl_sum`] of the logits `x Wᵀ + b` (`x` `[L, in]`, `w` `[vocab, in]`). On the CPU
    /// they are made one vocabulary slice at a time (about 8 MiB of f32) and folded
    /// into per-row running sums, so no `[L, vocab]` tensor is allocated and each slice is read
    /// back from cache.
    pub fn kl_sum_linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.kl_sum_linear_sliced(x, w, bias, None)
    }

    /// `width`: vocabulary entries per slice (default: each sample's own).
    fn kl_sum_linear_sliced(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        width: Option<usize>,
    ) -> Result<Tensor> {
        match self.kl_rows_linear_sliced(x, w, bias, width)? {
            RowsOr::Rows(rows) => Tensor::new(rows.iter().fold(0.0, |a, b| a + b), &Device::Cpu),
            RowsOr::Logits(logits) => self.kl_sum(&logits),
        }
    }

    /// Per-row KL of the logits `x Wᵀ + b` on the CPU path (made a vocabulary slice at a time);
    /// elsewhere the whole logits, for the candle-op path.
    fn kl_rows_linear_sliced(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        width: Option<usize>,
    ) -> Result<RowsOr> {
        let logits = |x: &Tensor, w: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
            // Rounded as the model's Linear forward rounds the base logits.
            let y = matmul(x, &w.t()?)?;
            let y = match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            y.to_dtype(if y.dtype() == DType::F64 { DType::F64 } else { DType::F32 })
        };
        let base = match &self.inner {
            Base::Cpu(base) if matches!(x.device(), Device::Cpu) => base,
            // The fused kernel reads bf16 logits as they are (the base's f32 copies hold the
            // same values).
            Base::Fused(_) => {
                let y = matmul(x, &w.t()?)?;
                return Ok(RowsOr::Logits(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }));
            }
            _ => return Ok(RowsOr::Logits(logits(x, w, bias)?)),
        };
        let (rows, _) = x.dims2()?;
        let (vocab, _) = w.dims2()?;
        if rows != base.rows || vocab != base.vocab {
            candle_core::bail!("kl: logits would be [{rows}, {vocab}], the base is [{}, {}]", base.rows, base.vocab);
        }
        let mut state = vec![RowState::default(); rows];
        // Sample by sample, so each sample's logits are made and folded as if it were alone.
        for &((start, len), own) in &base.slices {
            let x = x.narrow(0, start, len)?;
            let width = width.unwrap_or(own);
            for v0 in (0..vocab).step_by(width) {
                let n = width.min(vocab - v0);
                let b = bias.map(|b| b.narrow(0, v0, n)).transpose()?;
                let z = logits(&x, &w.narrow(0, v0, n)?, b.as_ref())?.to_dtype(DType::F32)?.contiguous()?;
                let (storage, layout) = z.storage_and_layout();
                let (Storage::Cpu(CpuStorage::F32(data)), Some((zs, ze))) = (&*storage, layout.contiguous_offsets())
                else {
                    candle_core::bail!("kl: logits must be contiguous f32 on the CPU");
                };
                base.fold(&data[zs..ze], n, 0, v0, n, start, &mut state[start..start + len]);
            }
        }
        Ok(RowsOr::Rows(base.finish(&state)))
    }

    /// Per-row `KL(P_t ‖ softmax(z_t))` (CPU f32 base only; for tests and diagnostics).
    pub fn kl_rows(&self, logits: &Tensor) -> Result<Vec<f64>> {
        match &self.inner {
            Base::Cpu(base) => base.kl_rows_of(logits),
            Base::Ops(_) | Base::Fused(_) => candle_core::bail!("kl_rows: the base is not on the CPU in f32"),
        }
    }
}

impl CpuBase {
    fn kl_rows_of(&self, logits: &Tensor) -> Result<Vec<f64>> {
        if logits.dims() != [self.rows, self.vocab] {
            candle_core::bail!("kl: logits {:?}, base [{}, {}]", logits.dims(), self.rows, self.vocab);
        }
        let z = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.finish(&self.fold_whole(&z)?))
    }

    /// Folds whole-vocabulary logits (`[rows, vocab]` row-major) slice by slice.
    fn fold_whole(&self, z: &[f32]) -> Result<Vec<RowState>> {
        if z.len() != self.rows * self.vocab {
            candle_core::bail!("kl: {} logits, base [{}, {}]", z.len(), self.rows, self.vocab);
        }
        let mut state = vec![RowState::default(); self.rows];
        for &((start, len), width) in &self.slices {
            for v0 in (0..self.vocab).step_by(width) {
                let n = width.min(self.vocab - v0);
                let rows = &z[start * self.vocab..(start + len) * self.vocab];
                self.fold(rows, self.vocab, v0, v0, n, start, &mut state[start..start + len]);
            }
        }
        Ok(state)
    }

    /// Folds vocabulary entries `v0..v0 + n` into the states of rows `row0..`; row `row0 + r`'s
    /// logits are `z[r·stride + col0..][..n]`.
    #[allow(clippy::too_many_arguments)]
    fn fold(&self, z: &[f32], stride: usize, col0: usize, v0: usize, n: usize, row0: usize, state: &mut [RowState]) {
        let simd = simd();
        state.par_iter_mut().enumerate().with_min_len(4).for_each(|(r, st)| {
            st.update(&z[r * stride + col0..][..n], &self.p[(row0 + r) * self.vocab + v0..][..n], simd);
        });
    }

    /// `KL_t = Σ p (x − lse_x) − Σ p (z − lse_z) = (Σ p x − Σ p z) + (lse_z − lse_x)·s` per row.
    fn finish(&self, state: &[RowState]) -> Vec<f64> {
        state
            .iter()
            .zip(&self.base)
            .zip(&self.s)
            .map(|((z, x), &s)| (x.dot - z.dot) + (z.lse() - x.lse()) * s)
            .collect()
    }
}

/// Running `(max, Σ exp(z − max), Σ p·z)` of one row over the vocabulary slices seen so far.
#[derive(Debug, Clone, Copy)]
struct RowState {
    max: f32,
    sum_exp: f64,
    dot: f64,
}

impl Default for RowState {
    fn default() -> Self {
        RowState { max: f32::NEG_INFINITY, sum_exp: 0.0, dot: 0.0 }
    }
}

impl RowState {
    fn update(&mut self, z: &[f32], p: &[f32], simd: bool) {
        let (m, sum_exp, dot) = slice(z, p, self.max, simd);
        let rescale = if self.sum_exp == 0.0 { 0.0 } else { (f64::from(self.max) - f64::from(m)).exp() };
        self.sum_exp = self.sum_exp * rescale + sum_exp;
        self.dot += dot;
        self.max = m;
    }

    /// `max + ln Σ exp(z − max)` (NaN when not finite).
    fn lse(&self) -> f64 {
        if !self.max.is_finite() {
            return f64::NAN;
        }
        f64::from(self.max) + self.sum_exp.ln()
    }
}

/// Size of a logits slice in [`KlBase::kl_sum_linear`]: with the matching probabilities it fits a
/// typical L3 cache, and it is below glibc's largest mmap threshold, so slices reuse heap memory.
const SLICE_BYTES: usize = 8 << 20;

/// Vocabulary entries per slice for `rows` rows: about [`SLICE_BYTES`] of f32 logits, a whole
/// number of the row kernels' blocks.
fn slice_width(rows: usize, vocab: usize) -> usize {
    let unit = LANES * BLOCK;
    ((SLICE_BYTES / (4 * rows.max(1))) / unit * unit).clamp(unit, vocab.max(unit))
}

/// Lanes of the row kernels' accumulators (fixed, so the summation order is too).
const LANES: usize = 16;
/// Terms each lane sums in f32 before the partial sum goes into an f64 accumulator.
const BLOCK: usize = 32;

/// `exp(x)` in f32 for `x ≤ 0` (arguments below −87 give exp(−87)): Cody–Waite reduction
/// `x = n ln2 + r`, `|r| ≤ ln2/2`, and a degree-7 Taylor polynomial (truncation < 6e-9 relative),
/// so the result is within ~2 ulp of the true value. Branch-free; `avx2::exp8` is the same on 8 lanes.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    poly * f32::from_bits(((k + 127) as u32) << 23)
}

/// Whether the AVX2 kernels can run here (the check is cached by std).
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `acc[k] = max(acc[k], c[k])` over the whole chunks of `z` (NaN ignored).
#[inline(always)]
fn max_chunks_scalar(z: &[f32], acc: &mut [f32; LANES]) {
    for c in z.chunks_exact(LANES) {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
}

/// max over a row (NaN ignored; a NaN still reaches the result through the dot product).
fn row_max(z: &[f32], simd: bool) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let full = z.len() / LANES * LANES;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2.
        unsafe { avx2::max_chunks(&z[..full], &mut acc) };
    } else {
        max_chunks_scalar(&z[..full], &mut acc);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = simd;
        max_chunks_scalar(&z[..full], &mut acc);
    }
    for (k, &v) in z[full..].iter().enumerate() {
        acc[k] = if v > acc[k] { v } else { acc[k] };
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Adds a block's f32 lane sums into the f64 accumulators.
#[inline(always)]
fn flush(se: &mut [f64; LANES], dot: &mut [f64; LANES], se32: &[f32; LANES], dot32: &[f32; LANES]) {
    for k in 0..LANES {
        se[k] += f64::from(se32[k]);
        dot[k] += f64::from(dot32[k]);
    }
}

/// The whole blocks of [`row_sums`], one lane per `k mod LANES`.
#[inline(always)]
fn sum_blocks_scalar(z: &[f32], p: &[f32], m: f32, se: &mut [f64; LANES], dot: &mut [f64; LANES]) {
    for (zb, pb) in z.chunks_exact(LANES * BLOCK).zip(p.chunks_exact(LANES * BLOCK)) {
        let (mut se32, mut dot32) = ([0f32; LANES], [0f32; LANES]);
        for (zc, pc) in zb.chunks_exact(LANES).zip(pb.chunks_exact(LANES)) {
            for k in 0..LANES {
                se32[k] += exp_f32(zc[k] - m);
                dot32[k] += pc[k] * zc[k];
            }
        }
        flush(se, dot, &se32, &dot32);
    }
}

/// `(Σ exp(z − m), Σ p·z)` over a row. Each lane sums [`BLOCK`] terms in f32 (sub-block error
/// ~1e-7 relative, of random sign), then the partial sums are added in f64.
fn row_sums(z: &[f32], p: &[f32], m: f32, simd: bool) -> (f64, f64) {
    let mut se = [0f64; LANES];
    let mut dot = [0f64; LANES];
    let full = z.len() / (LANES * BLOCK) * (LANES * BLOCK);
    let (zf, pf) = (&z[..full], &p[..full]);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2.
        unsafe { avx2::sum_blocks(zf, pf, m, &mut se, &mut dot) };
    } else {
        sum_blocks_scalar(zf, pf, m, &mut se, &mut dot);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = simd;
        sum_blocks_scalar(zf, pf, m, &mut se, &mut dot);
    }
    let (mut se32, mut dot32) = ([0f32; LANES], [0f32; LANES]);
    for (i, (&zv, &pv)) in z[full..].iter().zip(&p[full..]).enumerate() {
        se32[i % LANES] += exp_f32(zv - m);
        dot32[i % LANES] += pv * zv;
    }
    flush(&mut se, &mut dot, &se32, &dot32);
    (se.iter().fold(0.0, |a, b| a + b), dot.iter().fold(0.0, |a, b| a + b))
}

/// One slice of a row: the running max after it (at least `prev_max`), then `Σ exp(z − max)` and
/// `Σ p·z` over the slice (NaN dot when the max is not finite). The AVX2 kernels do exactly the
/// scalar code's operations lane by lane (no contraction to FMA, same summation order), so the
/// result has the same bits on every machine.
fn slice(z: &[f32], p: &[f32], prev_max: f32, simd: bool) -> (f32, f64, f64) {
    let m = row_max(z, simd);
    let m = if m > prev_max { m } else { prev_max };
    if !m.is_finite() {
        return (m, 0.0, f64::NAN);
    }
    let (sum_exp, dot) = row_sums(z, p, m, simd);
    (m, sum_exp, dot)
}

/// Hand-vectorized AVX2 builds of the whole-chunk loops (explicit intrinsics, so they are fast in
/// the unoptimized test profile too).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{flush, BLOCK, LANES};

    const _: () = assert!(LANES == 16);

    /// `exp_f32` on 8 lanes, operation for operation.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn exp8(x: __m256) -> __m256 {
        const MAGIC: f32 = 12_582_912.0;
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let magic = _mm256_set1_ps(MAGIC);
        let t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), magic);
        let n = _mm256_sub_ps(t, magic);
        let k = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(MAGIC.to_bits() as i32));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693_359_4))),
            _mm256_mul_ps(n, _mm256_set1_ps(-2.121_944_4e-4)),
        );
        let mut q = _mm256_mul_ps(r, _mm256_set1_ps(1.0 / 5040.0));
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0] {
            q = _mm256_mul_ps(r, _mm256_add_ps(_mm256_set1_ps(c), q));
        }
        let poly = _mm256_add_ps(_mm256_set1_ps(1.0), q);
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, _mm256_set1_epi32(127))));
        _mm256_mul_ps(poly, scale)
    }

    /// `max_chunks_scalar`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn max_chunks(z: &[f32], acc: &mut [f32; LANES]) {
        let mut a0 = _mm256_loadu_ps(acc.as_ptr());
        let mut a1 = _mm256_loadu_ps(acc.as_ptr().add(8));
        for c in z.chunks_exact(LANES) {
            // max_ps(c, a) = c > a ? c : a, NaN in c ignored: the scalar code's select.
            a0 = _mm256_max_ps(_mm256_loadu_ps(c.as_ptr()), a0);
            a1 = _mm256_max_ps(_mm256_loadu_ps(c.as_ptr().add(8)), a1);
        }
        _mm256_storeu_ps(acc.as_mut_ptr(), a0);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), a1);
    }

    /// `sum_blocks_scalar`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sum_blocks(z: &[f32], p: &[f32], m: f32, se: &mut [f64; LANES], dot: &mut [f64; LANES]) {
        let mv = _mm256_set1_ps(m);
        for (zb, pb) in z.chunks_exact(LANES * BLOCK).zip(p.chunks_exact(LANES * BLOCK)) {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut d0, mut d1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for (zc, pc) in zb.chunks_exact(LANES).zip(pb.chunks_exact(LANES)) {
                let z0 = _mm256_loadu_ps(zc.as_ptr());
                let z1 = _mm256_loadu_ps(zc.as_ptr().add(8));
                s0 = _mm256_add_ps(s0, exp8(_mm256_sub_ps(z0, mv)));
                s1 = _mm256_add_ps(s1, exp8(_mm256_sub_ps(z1, mv)));
                d0 = _mm256_add_ps(d0, _mm256_mul_ps(_mm256_loadu_ps(pc.as_ptr()), z0));
                d1 = _mm256_add_ps(d1, _mm256_mul_ps(_mm256_loadu_ps(pc.as_ptr().add(8)), z1));
            }
            let (mut se32, mut dot32) = ([0f32; LANES], [0f32; LANES]);
            _mm256_storeu_ps(se32.as_mut_ptr(), s0);
            _mm256_storeu_ps(se32.as_mut_ptr().add(8), s1);
            _mm256_storeu_ps(dot32.as_mut_ptr(), d0);
            _mm256_storeu_ps(dot32.as_mut_ptr().add(8), d1);
            flush(se, dot, &se32, &dot32);
        }
    }
}

/// One base row: fills `p` with the f32-rounded softmax of `x` (exact f64 log-sum-exp) and
/// returns `Σ p` in f64 over those rounded `p`.
fn base_row(x: &[f32], p: &mut [f32]) -> f64 {
    let m = f64::from(row_max(x, simd()));
    if !m.is_finite() {
        p.fill(f32::NAN);
        return f64::NAN;
    }
    let e: Vec<f64> = x.iter().map(|&v| (f64::from(v) - m).exp()).collect();
    let sum = e.iter().fold(0.0, |a, b| a + b);
    let mut s = 0.0;
    for (&e, q) in e.iter().zip(p.iter_mut()) {
        *q = (e / sum) as f32;
        s += f64::from(*q);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random logits with a spread like a language model's.
    fn logits(rows: usize, vocab: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..rows * vocab)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                scale * (u - 0.5)
            })
            .collect()
    }

    /// KL per row in f64 straight from the definition.
    fn reference_rows(x: &[f32], z: &[f32], vocab: usize) -> Vec<f64> {
        let lsm = |r: &[f32]| {
            let m = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let lse = m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            r.iter().map(|&v| v as f64 - lse).collect::<Vec<_>>()
        };
        x.chunks(vocab)
            .zip(z.chunks(vocab))
            .map(|(a, b)| {
                let (lp, lq) = (lsm(a), lsm(b));
                lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum()
            })
            .collect()
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut bias = 0f64;
        let n = 200_000;
        for i in 0..=n {
            let x = -87.0 * i as f32 / n as f32;
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            let rel = (got - want) / want;
            worst = worst.max(rel.abs());
            bias += rel;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert!((bias / n as f64).abs() < 2e-8, "mean relative error {:e}", bias / n as f64);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 1e-37);
    }

    #[test]
    fn fused_matches_the_definition() -> Result<()> {
        let (rows, vocab) = (7, 10_007); // odd sizes exercise the lane remainders
        let x = logits(rows, vocab, 1, 12.0);
        let mut z = x.clone();
        let noise = logits(rows, vocab, 2, 0.2);
        for (a, b) in z.iter_mut().zip(&noise) {
            *a += b;
        }
        let xt = Tensor::from_slice(&x, (rows, vocab), &Device::Cpu)?;
        let zt = Tensor::from_slice(&z, (rows, vocab), &Device::Cpu)?;
        let base = KlBase::new(&xt)?;
        let got = base.kl_rows(&zt)?;
        let want = reference_rows(&x, &z, vocab);
        // The f32 partial sums of exp leave an error of ~1e-8 in each row's log-sum-exp, hence
        // in its KL: far below what f32 logits themselves resolve (6e-8 × |z| ≈ 4e-7 here).
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-7, "row: fused {g:e}, reference {w:e}");
        }
        // The total is the same number as a tensor; the candle-op path agrees to f32 accuracy.
        let total = base.kl_sum(&zt)?.to_scalar::<f64>()?;
        assert_eq!(total, got.iter().fold(0.0, |a, b| a + b));
        let ops = kl_sum(&log_softmax(&xt)?, &log_softmax(&zt)?)?.to_scalar::<f32>()? as f64;
        assert!((ops - total).abs() <= 1e-3 * total, "ops {ops:e}, fused {total:e}");
        // Identical logits: exactly zero (both sides are summed by the same code).
        let same = base.kl_rows(&xt)?;
        assert!(same.iter().all(|&v| v == 0.0), "{same:?}");
        Ok(())
    }

    #[test]
    fn sliced_head_matches_whole_logits() -> Result<()> {
        let (rows, vocab, d) = (5, 3001, 16);
        let dev = Device::Cpu;
        let h = Tensor::from_vec(logits(rows, d, 4, 2.0), (rows, d), &dev)?;
        let w = Tensor::from_vec(logits(vocab, d, 5, 1.0), (vocab, d), &dev)?;
        let bias = Tensor::from_vec(logits(1, vocab, 6, 0.5), vocab, &dev)?;
        let hq = (&h + Tensor::from_vec(logits(rows, d, 7, 0.05), (rows, d), &dev)?)?;
        let base = KlBase::new(&h.matmul(&w.t()?)?.broadcast_add(&bias)?)?;
        let whole = base.kl_sum(&hq.matmul(&w.t()?)?.broadcast_add(&bias)?)?.to_scalar::<f64>()?;
        for width in [512, 1024, 2560, 4096] {
            let sliced = base.kl_sum_linear_sliced(&hq, &w, Some(&bias), Some(width))?.to_scalar::<f64>()?;
            assert!((sliced - whole).abs() <= 1e-7 * rows as f64, "width {width}: {sliced:e} vs {whole:e}");
        }
        assert!(base.kl_sum_linear(&h, &w, Some(&bias))?.to_scalar::<f64>()?.abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn simd_kernels_give_the_scalar_bits() {
        if !simd() {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        for (n, seed) in [(16, 1), (511, 2), (512, 3), (7000, 4), (151_936, 5)] {
            let z = logits(1, n, seed, 30.0);
            let p: Vec<f32> = logits(1, n, seed + 100, 1e-4).iter().map(|v| v.abs()).collect();
            let m = row_max(&z, false);
            assert_eq!(m.to_bits(), row_max(&z, true).to_bits());
            for prev in [f32::NEG_INFINITY, m + 3.0] {
                let (a, b) = (slice(&z, &p, prev, false), slice(&z, &p, prev, true));
                assert_eq!(
                    (a.0.to_bits(), a.1.to_bits(), a.2.to_bits()),
                    (b.0.to_bits(), b.1.to_bits(), b.2.to_bits()),
                    "n {n}"
                );
            }
        }
        // Arguments near and past the clamp, zero, and NaN agree too.
        let z: Vec<f32> = (0..512).map(|i| [-90.0, -87.0, -86.9, 0.0, -0.0, -1e-30, f32::NAN, -20.5][i % 8]).collect();
        let p = vec![1e-3f32; 512];
        let (a, b) = (slice(&z, &p, 0.0, false), slice(&z, &p, 0.0, true));
        assert_eq!(a.1.to_bits(), b.1.to_bits());
        assert!(a.2.is_nan() && b.2.is_nan());
    }

    #[test]
    fn non_finite_logits_give_nan() -> Result<()> {
        let (rows, vocab) = (2, 100);
        let x = logits(rows, vocab, 3, 4.0);
        let base = KlBase::new(&Tensor::from_slice(&x, (rows, vocab), &Device::Cpu)?)?;
        let mut z = x.clone();
        z[5] = f32::NAN;
        z[150] = f32::INFINITY;
        let got = base.kl_rows(&Tensor::from_slice(&z, (rows, vocab), &Device::Cpu)?)?;
        assert!(got[0].is_nan() && got[1].is_nan(), "{got:?}");
        Ok(())
    }

    #[test]
    fn shape_mismatch_is_an_error() -> Result<()> {
        let base = KlBase::new(&Tensor::zeros((3, 50), DType::F32, &Device::Cpu)?)?;
        assert!(base.kl_sum(&Tensor::zeros((3, 51), DType::F32, &Device::Cpu)?).is_err());
        Ok(())
    }

    /// Packed samples each get the KL of their own rows, as their own base would give it, on
    /// both paths.
    #[test]
    fn packed_samples_get_their_own_kl() -> Result<()> {
        let (vocab, d) = (700, 8);
        let dev = Device::Cpu;
        let lens = [3usize, 1, 4];
        let rows: usize = lens.iter().sum();
        let h = Tensor::from_vec(logits(rows, d, 8, 2.0), (rows, d), &dev)?;
        let hq = (&h + Tensor::from_vec(logits(rows, d, 9, 0.05), (rows, d), &dev)?)?;
        let w = Tensor::from_vec(logits(vocab, d, 10, 1.0), (vocab, d), &dev)?;
        let segments = vec![(0, 3), (3, 1), (4, 4)];
        for dtype in [DType::F32, DType::F64] {
            let (h, hq, w) = (h.to_dtype(dtype)?, hq.to_dtype(dtype)?, w.to_dtype(dtype)?);
            let base_logits = h.matmul(&w.t()?)?;
            let base = KlBase::packed(&base_logits, segments.clone())?;
            let packed = base.sample_kls_linear(&hq, &w, None)?.to_vec1::<f64>()?;
            assert_eq!(packed.len(), 3);
            for (&(start, len), got) in segments.iter().zip(&packed) {
                let part = |t: &Tensor| t.narrow(0, start, len);
                let alone = KlBase::new(&part(&base_logits)?)?;
                let want = alone.kl_sum_linear(&part(&hq)?, &w, None)?.to_scalar::<f64>()?;
                assert!(want > 0.0);
                assert_eq!(*got, want, "{dtype:?} rows {start}+{len}");
            }
        }
        // On the same f32 logits, the fused path (a GPU's) and the f32 CPU path agree per sample
        // with the definition in f64. Each sums f32 exponentials: both log-sum-exps of a row may
        // be off by the exponentials' rounding (≤ 2 ulp of f32, 1.2e-7), so ≤ 2.5e-7 per row.
        let (base_logits, logits) = (h.matmul(&w.t()?)?, hq.matmul(&w.t()?)?);
        let rows = reference_rows(
            &base_logits.flatten_all()?.to_vec1::<f32>()?,
            &logits.flatten_all()?.to_vec1::<f32>()?,
            vocab,
        );
        let cpu = KlBase::packed(&base_logits, segments.clone())?.sample_kls(&logits)?.to_vec1::<f64>()?;
        let fused = KlBase::fused(&base_logits, segments.clone())?.sample_kls(&logits)?.to_vec1::<f64>()?;
        for ((c, f), &(start, len)) in cpu.iter().zip(&fused).zip(&segments) {
            let exact: f64 = rows[start..start + len].iter().sum();
            let bound = 2.5e-7 * len as f64;
            assert!((c - exact).abs() <= bound && (f - exact).abs() <= bound, "{exact:e}: cpu {c:e}, fused {f:e}");
        }
        assert!(KlBase::packed(&Tensor::zeros((4, 5), DType::F32, &dev)?, vec![(0, 2), (3, 1)]).is_err());
        assert!(KlBase::packed(&Tensor::zeros((4, 5), DType::F32, &dev)?, vec![(0, 3)]).is_err());
        Ok(())
    }
}
