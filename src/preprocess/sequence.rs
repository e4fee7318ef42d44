//! From rendered chat text to model inputs: `<|image_pad|>` expansion, tokenization, labels,
//! `mm_token_type_ids` and the 3-D MRoPE position ids.

use anyhow::{bail, Result};

/// Replaces the `i`-th occurrence of `pad` with `counts[i]` copies of it (HF
/// `Qwen3VLProcessor.__call__`). Errors when the number of placeholders differs from the number
/// of images.
pub fn expand_image_pads(text: &str, pad: &str, counts: &[usize]) -> Result<String> {
    let found = text.matches(pad).count();
    if found != counts.len() {
        bail!("the rendered text has {found} image placeholder(s) {pad} but there are {} image(s)", counts.len());
    }
    let mut out = String::with_capacity(text.len() + counts.iter().sum::<usize>() * pad.len());
    let mut rest = text;
    for &n in counts {
        let at = rest.find(pad).expect("counted above");
        out.push_str(&rest[..at]);
        for _ in 0..n {
            out.push_str(pad);
        }
        rest = &rest[at + pad.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Labels: −100 everywhere except the tokens overlapping the byte span `[start, end)` of the
/// answer, and the `im_end` token that must follow them.
pub fn answer_labels(ids: &[u32], offsets: &[(usize, usize)], span: (usize, usize), im_end: u32) -> Result<Vec<i32>> {
    let (start, end) = span;
    let mut labels = vec![-100i32; ids.len()];
    let mut last = None;
    for (i, &(s, e)) in offsets.iter().enumerate() {
        if e > start && s < end {
            labels[i] = ids[i] as i32;
            last = Some(i);
        }
    }
    // The closing token: right after the answer (or, for an empty answer, the first token at or
    // after where it would start).
    let close = match last {
        Some(i) => i + 1,
        None => match offsets.iter().position(|&(s, _)| s >= start) {
            Some(i) => i,
            None => ids.len(),
        },
    };
    if ids.get(close) != Some(&im_end) {
        bail!("the chat template does not close the assistant answer with <|im_end|> (token {im_end}) right after it");
    }
    labels[close] = im_end as i32;
    Ok(labels)
}

/// `mm_token_type_ids`: 1 on image tokens, 2 on video tokens, 0 elsewhere.
pub fn mm_token_type_ids(ids: &[u32], image_token: u32, video_token: u32) -> Vec<u8> {
    ids.iter()
        .map(|&t| {
            if t == image_token {
                1
            } else if t == video_token {
                2
            } else {
                0
            }
        })
        .collect()
}

/// 3-D MRoPE position ids `[3][L]` and `rope_delta`, as `Qwen3VLModel.get_rope_index` computes them
/// for one sequence without padding: text runs count up on all three axes from one past the
/// previous maximum; an image block of `t × h/M × w/M` tokens takes `(t, h, w)` offsets from
/// `text_len + st_idx`; `rope_delta = max + 1 − L`.
///
/// `grids` are the images' `(t, h, w)` in patches, in the order their tokens appear. Images are
/// recognised as HF does: a `vision_start` token followed by an image token opens a block. (Videos
/// are not produced by this crate and are refused.)
pub fn rope_index(
    ids: &[u32],
    grids: &[[u32; 3]],
    merge_size: u32,
    image_token: u32,
    video_token: u32,
    vision_start: u32,
) -> Result<(Vec<Vec<i64>>, i64)> {
    let n_images = ids.windows(2).filter(|w| w[0] == vision_start && w[1] == image_token).count();
    if ids.windows(2).any(|w| w[0] == vision_start && w[1] == video_token) {
        bail!("video tokens are not supported");
    }
    if n_images != grids.len() {
        bail!("{n_images} image block(s) in the tokens but {} image grid(s)", grids.len());
    }
    let mut pos: [Vec<i64>; 3] =
        [Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len())];
    let mut max_so_far: Option<i64> = None;
    let mut st = 0usize;
    for grid in grids {
        let Some(ed) = ids[st..].iter().position(|&t| t == image_token).map(|p| p + st) else {
            bail!("fewer image tokens than images");
        };
        let (gt, gh, gw) = (grid[0] as i64, (grid[1] / merge_size) as i64, (grid[2] / merge_size) as i64);
        let text_len = (ed - st) as i64;
        let st_idx = max_so_far.map_or(0, |m| m + 1);
        for i in 0..text_len {
            for axis in &mut pos {
                axis.push(st_idx + i);
            }
        }
        let base = text_len + st_idx;
        let n = (gt * gh * gw) as usize;
        if ed + n > ids.len() || ids[ed..ed + n].iter().any(|&t| t != image_token) {
            bail!("an image block has fewer than the {n} image tokens its grid {grid:?} needs");
        }
        for t in 0..gt {
            for h in 0..gh {
                for w in 0..gw {
                    pos[0].push(base + t);
                    pos[1].push(base + h);
                    pos[2].push(base + w);
                }
            }
        }
        // Max over all three axes of everything so far.
        let block_max = base + (gt - 1).max(gh - 1).max(gw - 1).max(0);
        let text_max = if text_len > 0 { st_idx + text_len - 1 } else { i64::MIN };
        max_so_far = Some(max_so_far.unwrap_or(i64::MIN).max(text_max).max(block_max));
        st = ed + n;
    }
    if st < ids.len() {
        let st_idx = max_so_far.map_or(0, |m| m + 1);
        for i in 0..(ids.len() - st) as i64 {
            for axis in &mut pos {
                axis.push(st_idx + i);
            }
        }
    }
    let max = pos.iter().flat_map(|a| a.iter().copied()).max().unwrap_or(-1);
    let delta = max + 1 - ids.len() as i64;
    Ok((pos.into_iter().collect(), delta))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 9;
    const VS: u32 = 7;
    const VE: u32 = 8;

    #[test]
    fn expands_each_placeholder_by_its_count() {
        let t = expand_image_pads("a<p>b<p>c", "<p>", &[2, 3]).unwrap();
        assert_eq!(t, "a<p><p>b<p><p><p>c");
        assert!(expand_image_pads("a<p>b", "<p>", &[1, 1]).is_err());
    }

    #[test]
    fn rope_index_two_images_by_hand() {
        // [t0 t1 VS img×(1·2·3 → merged 1·1·… )] with merge 1 for readability:
        // text "5 6", VS, image grid (1,2,3) = 6 tokens, VE, text "4", VS, image (1,2,2), VE, "3"
        let mut ids = vec![5, 6, VS];
        ids.extend([IMG; 6]);
        ids.extend([VE, 4, VS]);
        ids.extend([IMG; 4]);
        ids.extend([VE, 3]);
        let (pos, delta) = rope_index(&ids, &[[1, 2, 3], [1, 2, 2]], 1, IMG, 99, VS).unwrap();
        // Text 0,1,2 (VS). Image 1 base 3: t=3; h=3,3,3,4,4,4; w=3,4,5,3,4,5. Max 5.
        // Then VE,4,VS at 6,7,8. Image 2 base 9: t=9; h=9,9,10,10; w=9,10,9,10. Max 10.
        // Then VE,3 at 11,12.
        assert_eq!(pos[0], vec![0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9, 9, 9, 9, 11, 12]);
        assert_eq!(pos[1], vec![0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9, 9, 10, 10, 11, 12]);
        assert_eq!(pos[2], vec![0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 9, 10, 11, 12]);
        assert_eq!(delta, 13 - ids.len() as i64);
    }

    #[test]
    fn rope_index_adjacent_images_and_merge() {
        // Two images back to back (no text between their blocks except VE VS), merge 2.
        let mut ids = vec![VS];
        ids.extend([IMG; 2]); // grid (1,2,4) → 1·1·2 tokens
        ids.extend([VE, VS]);
        ids.extend([IMG; 1]); // grid (1,2,2) → 1 token
        ids.push(VE);
        let (pos, delta) = rope_index(&ids, &[[1, 2, 4], [1, 2, 2]], 2, IMG, 99, VS).unwrap();
        assert_eq!(pos[0], vec![0, 1, 1, 3, 4, 5, 6]);
        assert_eq!(pos[2], vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(delta, 0);
        assert!(rope_index(&ids, &[[1, 2, 4]], 2, IMG, 99, VS).is_err());
    }

    #[test]
    fn labels_cover_answer_and_im_end() {
        let ids = [1, 2, 3, 4, 5, 6];
        let offsets = [(0, 2), (2, 4), (4, 7), (7, 9), (9, 19), (19, 20)];
        let labels = answer_labels(&ids, &offsets, (4, 9), 5).unwrap();
        assert_eq!(labels, vec![-100, -100, 3, 4, 5, -100]);
        assert!(answer_labels(&ids, &offsets, (2, 4), 5).is_err());
    }
}
