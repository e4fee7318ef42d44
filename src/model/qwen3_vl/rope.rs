//! Position encodings of Qwen3-VL, computed once per sample on the host from the (host-side) grid
//! and position ids, then uploaded:
//! - text: interleaved MRoPE cos/sin (HF `Qwen3VLTextRotaryEmbedding.forward` +
//!   `apply_interleaved_mrope`);
//! - vision: 2-D rotary cos/sin (HF `Qwen3VLVisionModel.rot_pos_emb`) and the bilinear
//!   interpolation of the learned position table (HF `fast_pos_embed_interpolate`, with its
//!   merge-block reordering folded into the row order);
//! - `cu_seqlens` as `(start, len)` segments.
//!
//! HF computes the frequencies in f32; so do we, with `pow`/`cos`/`sin` evaluated in f64 and rounded
//! once (torch's vectorized f32 versions are within an ulp of that). The model rotates with the
//! fused kernels (`fused::qk_norm_rope`, `fused::vision_qkv_rope`: `x·cos + rotate_half(x)·sin`,
//! HF's formula term by term, fused with the layout change); their op-chain references use
//! candle's rope kernel ([`CosSin::apply_thd`]). The backward is the inverse rotation (`−sin`).

use candle_core::{DType, Device, Result, Tensor};

/// `1 / base^(2i/dim)` for `i < dim/2`, in f32 as torch computes it.
pub fn inv_freq(dim: usize, base: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            let p = (base as f32 as f64).powf(e as f64) as f32;
            1.0f32 / p
        })
        .collect()
}

/// cos/sin tables `[rows, half]` (the halves of HF's `cat((freqs, freqs))` are equal, candle's
/// rope takes one half). `angles` holds f32 angles row-major.
pub struct CosSin {
    pub cos: Tensor,
    pub sin: Tensor,
    /// `−sin`, for the inverse rotation in backward.
    pub neg_sin: Tensor,
}

impl CosSin {
    fn from_angles(angles: &[f32], rows: usize, half: usize, dtype: DType, device: &Device) -> Result<Self> {
        // f32 values as HF (cos of an f32 angle, rounded to f32); f64 models keep full precision.
        let wide = dtype == DType::F64;
        let f = |g: fn(f64) -> f64| -> Vec<f64> {
            angles
                .iter()
                .map(|&a| {
                    let v = g(a as f64);
                    if wide {
                        v
                    } else {
                        v as f32 as f64
                    }
                })
                .collect()
        };
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            if wide {
                Tensor::from_vec(v, (rows, half), device)
            } else {
                Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<f32>>(), (rows, half), device)?
                    .to_dtype(dtype)
            }
        };
        let cos = mk(f(f64::cos))?;
        let sin = mk(f(f64::sin))?;
        let neg_sin = sin.neg()?;
        Ok(CosSin { cos, sin, neg_sin })
    }

    /// Rotates `x` laid out `[1, T, H, d]` (contiguous).
    pub fn apply_thd(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_thd(x, &self.cos, &self.sin)
    }

    /// Inverse rotation of `dy` laid out `[1, H, T, d]` (contiguous): the backward of a rotation.
    pub fn unapply_htd(&self, dy: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(dy, &self.cos, &self.neg_sin)
    }
}

/// Frequency index `i < head_dim/2` → which of (t, h, w) it reads, per HF `apply_interleaved_mrope`:
/// H at `1, 4, …  < 3·sec[1]`, W at `2, 5, … < 3·sec[2]`, T elsewhere.
pub fn mrope_axis(i: usize, section: &[usize]) -> usize {
    if i % 3 == 1 && i < 3 * section[1] {
        1
    } else if i % 3 == 2 && i < 3 * section[2] {
        2
    } else {
        0
    }
}

/// Text MRoPE cos/sin `[L, head_dim/2]` in `dtype` (HF casts cos/sin to the model dtype).
pub fn text_cos_sin(
    positions: &[Vec<i64>; 3],
    head_dim: usize,
    theta: f64,
    section: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<CosSin> {
    let inv = inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let l = positions[0].len();
    let axes: Vec<usize> = (0..half).map(|i| mrope_axis(i, section)).collect();
    // Position-major: angle (p, i) = position of frequency i's axis × inv_freq[i].
    let angles: Vec<f32> = (0..l)
        .flat_map(|p| axes.iter().zip(&inv).map(move |(&axis, &freq)| positions[axis][p] as f32 * freq))
        .collect();
    CosSin::from_angles(&angles, l, half, dtype, device)
}

/// `(row, col)` of every patch in HF's vision order: per image, per frame, merge blocks
/// row-major, then the `merge × merge` patches inside a block row-major.
pub fn vision_patch_coords(grid_thw: &[[u32; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grid_thw {
        let (h, w) = (h as usize, w as usize);
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for ih in 0..merge {
                        for iw in 0..merge {
                            out.push((bh * merge + ih, bw * merge + iw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Vision 2-D rotary cos/sin `[N, head_dim/2]` (HF `rot_pos_emb`; computed in f32, kept in
/// `dtype` = the accumulation dtype since HF rotates q/k in f32).
pub fn vision_cos_sin(coords: &[(usize, usize)], head_dim: usize, dtype: DType, device: &Device) -> Result<CosSin> {
    // Qwen3VLVisionRotaryEmbedding(head_dim // 2, theta=10000).
    let inv = inv_freq(head_dim / 2, 10000.0);
    let q = inv.len();
    let half = head_dim / 2;
    let mut angles = Vec::with_capacity(coords.len() * half);
    for &(r, c) in coords {
        angles.extend(inv.iter().map(|&f| r as f32 * f));
        angles.extend(inv.iter().map(|&f| c as f32 * f));
    }
    debug_assert_eq!(2 * q, half);
    CosSin::from_angles(&angles, coords.len(), half, dtype, device)
}

/// `torch.linspace(start, end, steps)` in f32 (ATen's CPU formula: from the start for the first
/// half, from the end for the second).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 }).collect()
}

/// Bilinear interpolation tables of HF `fast_pos_embed_interpolate` for every patch, already in
/// the reordered (merge-block) row order: for corner `k` of 4, `idx[k][n]` into the `side²`
/// table and its weight `w[k][n]` (f32).
pub fn pos_interp_tables(grid_thw: &[[u32; 3]], side: usize, merge: usize) -> ([Vec<u32>; 4], [Vec<f32>; 4]) {
    let mut idx: [Vec<u32>; 4] = Default::default();
    let mut wts: [Vec<f32>; 4] = Default::default();
    let last = (side - 1) as f32;
    for &[t, h, w] in grid_thw {
        let (h, w) = (h as usize, w as usize);
        let hs = linspace_f32(0.0, last, h);
        let ws = linspace_f32(0.0, last, w);
        let split = |v: &[f32]| -> Vec<(usize, usize, f32)> {
            v.iter()
                .map(|&x| {
                    let fl = x as i32 as usize; // `.int()` truncates
                    let ce = (fl + 1).min(side - 1);
                    (fl, ce, x - fl as f32)
                })
                .collect()
        };
        let (hs, ws) = (split(&hs), split(&ws));
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for ih in 0..merge {
                        for iw in 0..merge {
                            let (hf, hc, dh) = hs[bh * merge + ih];
                            let (wf, wc, dw) = ws[bw * merge + iw];
                            let corners = [
                                (hf * side + wf, (1.0 - dh) * (1.0 - dw)),
                                (hf * side + wc, (1.0 - dh) * dw),
                                (hc * side + wf, dh * (1.0 - dw)),
                                (hc * side + wc, dh * dw),
                            ];
                            for (k, (i, wt)) in corners.into_iter().enumerate() {
                                idx[k].push(i as u32);
                                wts[k].push(wt);
                            }
                        }
                    }
                }
            }
        }
    }
    (idx, wts)
}

/// HF `cu_seqlens` as `(start, len)`: one attention segment per frame (`h·w` patches each).
pub fn vision_segments(grid_thw: &[[u32; 3]]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for &[t, h, w] in grid_thw {
        for _ in 0..t {
            let n = (h * w) as usize;
            out.push((start, n));
            start += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_mrope_layout() {
        // head_dim 128, [24, 20, 20]: T at 0,3,..,57 and 60..63; H at 1,4,..,58; W at 2,5,..,59.
        let sec = [24, 20, 20];
        let axes: Vec<usize> = (0..64).map(|i| mrope_axis(i, &sec)).collect();
        assert_eq!(axes.iter().filter(|&&a| a == 0).count(), 24);
        assert_eq!(axes.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(axes.iter().filter(|&&a| a == 2).count(), 20);
        assert_eq!(&axes[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(&axes[60..], &[0, 0, 0, 0]);
        // tiny: head_dim 32, [6, 5, 5]
        let axes: Vec<usize> = (0..16).map(|i| mrope_axis(i, &[6, 5, 5])).collect();
        assert_eq!(axes, vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn linspace_matches_torch_endpoints() {
        let v = linspace_f32(0.0, 7.0, 32);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[31], 7.0);
        assert_eq!(linspace_f32(0.0, 7.0, 15)[7], 3.5);
        assert_eq!(linspace_f32(0.0, 7.0, 1), vec![0.0]);
    }

    #[test]
    fn patch_order_groups_merge_blocks() {
        let c = vision_patch_coords(&[[1, 2, 4]], 2);
        assert_eq!(c, vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
        assert_eq!(vision_segments(&[[2, 2, 4], [1, 4, 4]]), vec![(0, 8), (8, 8), (16, 16)]);
    }

    #[test]
    fn interpolation_weights_sum_to_one() {
        let (idx, w) = pos_interp_tables(&[[1, 6, 10]], 8, 2);
        for n in 0..60 {
            let s: f32 = (0..4).map(|k| w[k][n]).sum();
            assert!((s - 1.0).abs() < 1e-6);
            assert!((0..4).all(|k| idx[k][n] < 64));
        }
        // First patch is the table's corner, last patch of the first merge block is row 1 col 1.
        assert_eq!(idx[0][0], 0);
        assert_eq!(w[0][0], 1.0);
    }
}
