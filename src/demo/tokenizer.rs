//! A tiny byte-level BPE tokenizer in Qwen2's layout.
//!
//! Vocabulary: the 256 byte tokens in GPT-2's byte-to-unicode order (the order Qwen's first 256
//! ids have), then one token per merge learned from a small corpus (the demo captions and chat
//! scaffolding), then Qwen's 26 added tokens in Qwen's order (`<|endoftext|>` first). The
//! normalizer (NFC), pre-tokenizer (Qwen2's split regex, then ByteLevel without its own regex),
//! post-processor and decoder are Qwen's, so `tokenizers` and HF's `AutoTokenizer` treat it
//! exactly like the real one, only with a smaller vocabulary.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper};

/// Qwen2's pre-tokenizer split pattern (verbatim from Qwen's `tokenizer.json`).
pub const QWEN2_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen's added tokens in id order, with their `special` flag. They take the ids right after
/// the regular vocabulary, in this order, as in Qwen (151643..=151668).
pub const ADDED_TOKENS: [(&str, bool); 26] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<|object_ref_start|>", true),
    ("<|object_ref_end|>", true),
    ("<|box_start|>", true),
    ("<|box_end|>", true),
    ("<|quad_start|>", true),
    ("<|quad_end|>", true),
    ("<|vision_start|>", true),
    ("<|vision_end|>", true),
    ("<|vision_pad|>", true),
    ("<|image_pad|>", true),
    ("<|video_pad|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<|fim_prefix|>", false),
    ("<|fim_middle|>", false),
    ("<|fim_suffix|>", false),
    ("<|fim_pad|>", false),
    ("<|repo_name|>", false),
    ("<|file_sep|>", false),
    ("<tool_response>", false),
    ("</tool_response>", false),
    ("<think>", false),
    ("</think>", false),
];

/// At most this many merges are learned (fewer when no pair occurs twice any more).
pub const MAX_MERGES: usize = 224;

/// The built tokenizer: vocabulary, merges, and the files that describe it.
#[derive(Debug, Clone)]
pub struct DemoTokenizer {
    /// Regular (non-added) tokens in id order, in the byte-level alphabet.
    pub vocab: Vec<String>,
    /// Merges in rank order.
    pub merges: Vec<(String, String)>,
}

impl DemoTokenizer {
    /// Learns merges from `corpus` (each string pre-tokenized the way the tokenizer will).
    pub fn train(corpus: &[&str]) -> Result<Self> {
        let pre = pre_tokenizer()?;
        let mut words: BTreeMap<Vec<String>, u64> = BTreeMap::new();
        for text in corpus {
            let mut pts = PreTokenizedString::from(*text);
            pre.pre_tokenize(&mut pts).map_err(|e| anyhow!("pre-tokenizing the demo corpus: {e}"))?;
            for (piece, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                *words.entry(piece.chars().map(String::from).collect()).or_default() += 1;
            }
        }
        let mut words: Vec<(Vec<String>, u64)> = words.into_iter().collect();
        let mut vocab: Vec<String> = byte_alphabet().into_iter().map(String::from).collect();
        let mut merges = Vec::new();
        while merges.len() < MAX_MERGES {
            let mut pairs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
            for (symbols, count) in &words {
                for w in symbols.windows(2) {
                    *pairs.entry((&w[0], &w[1])).or_default() += count;
                }
            }
            // Most frequent pair; ties go to the smallest pair (BTreeMap order), so it is stable.
            let Some(((a, b), count)) = pairs.into_iter().fold(None, |best, (pair, n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((pair, n)),
            }) else {
                break;
            };
            if count < 2 {
                break;
            }
            let (a, b) = (a.to_string(), b.to_string());
            let merged = format!("{a}{b}");
            for (symbols, _) in &mut words {
                let mut i = 0;
                while i + 1 < symbols.len() {
                    if symbols[i] == a && symbols[i + 1] == b {
                        symbols[i] = merged.clone();
                        symbols.remove(i + 1);
                    }
                    i += 1;
                }
            }
            vocab.push(merged);
            merges.push((a, b));
        }
        Ok(DemoTokenizer { vocab, merges })
    }

    /// Number of ids the tokenizer can produce (regular vocabulary plus added tokens).
    pub fn len(&self) -> usize {
        self.vocab.len() + ADDED_TOKENS.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The id of an added token (`<|image_pad|>`, ...).
    pub fn added_id(&self, content: &str) -> Result<u32> {
        match ADDED_TOKENS.iter().position(|(c, _)| *c == content) {
            Some(i) => Ok((self.vocab.len() + i) as u32),
            None => bail!("'{content}' is not an added token"),
        }
    }

    /// `tokenizer.json`, in the field order the `tokenizers` library writes.
    pub fn tokenizer_json(&self) -> Result<Vec<u8>> {
        #[derive(Serialize)]
        struct AddedToken<'a> {
            id: usize,
            content: &'a str,
            single_word: bool,
            lstrip: bool,
            rstrip: bool,
            normalized: bool,
            special: bool,
        }
        #[derive(Serialize)]
        struct Bpe<'a> {
            r#type: &'static str,
            dropout: Option<f32>,
            unk_token: Option<&'static str>,
            continuing_subword_prefix: &'static str,
            end_of_word_suffix: &'static str,
            fuse_unk: bool,
            byte_fallback: bool,
            ignore_merges: bool,
            vocab: OrderedVocab<'a>,
            merges: Vec<[&'a str; 2]>,
        }
        #[derive(Serialize)]
        struct TokenizerJson<'a> {
            version: &'static str,
            truncation: Option<()>,
            padding: Option<()>,
            added_tokens: Vec<AddedToken<'a>>,
            normalizer: Value,
            pre_tokenizer: Value,
            post_processor: Value,
            decoder: Value,
            model: Bpe<'a>,
        }
        let file = TokenizerJson {
            version: "1.0",
            truncation: None,
            padding: None,
            added_tokens: ADDED_TOKENS
                .iter()
                .enumerate()
                .map(|(i, &(content, special))| AddedToken {
                    id: self.vocab.len() + i,
                    content,
                    single_word: false,
                    lstrip: false,
                    rstrip: false,
                    normalized: false,
                    special,
                })
                .collect(),
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: pre_tokenizer_json(),
            post_processor: byte_level_json(),
            decoder: byte_level_json(),
            model: Bpe {
                r#type: "BPE",
                dropout: None,
                unk_token: None,
                continuing_subword_prefix: "",
                end_of_word_suffix: "",
                fuse_unk: false,
                byte_fallback: false,
                ignore_merges: false,
                vocab: OrderedVocab(&self.vocab),
                merges: self.merges.iter().map(|(a, b)| [a.as_str(), b.as_str()]).collect(),
            },
        };
        let mut bytes = serde_json::to_vec_pretty(&file)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// `vocab.json` (regular tokens only, compact, id order) for the slow `Qwen2Tokenizer`.
    pub fn vocab_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec(&OrderedVocab(&self.vocab))?)
    }

    /// `merges.txt` for the slow `Qwen2Tokenizer`.
    pub fn merges_txt(&self) -> Vec<u8> {
        let mut s = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            s.push_str(a);
            s.push(' ');
            s.push_str(b);
            s.push('\n');
        }
        s.into_bytes()
    }

    /// `tokenizer_config.json`, Qwen's (transformers 4.5x `Qwen2Tokenizer`), without a chat
    /// template (that lives in `chat_template.jinja`).
    pub fn tokenizer_config_json(&self) -> Result<Vec<u8>> {
        let decoder: serde_json::Map<String, Value> = ADDED_TOKENS
            .iter()
            .enumerate()
            .map(|(i, &(content, special))| {
                let entry = json!({
                    "content": content,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": special,
                });
                ((self.vocab.len() + i).to_string(), entry)
            })
            .collect();
        let additional: Vec<&str> = ADDED_TOKENS[1..14].iter().map(|(c, _)| *c).collect();
        let config = json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": additional,
            "bos_token": null,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 262144,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": null,
        });
        let mut bytes = serde_json::to_vec_pretty(&config)?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// Serializes a token list as a `{token: id}` map in id order (serde_json's own map would sort
/// it by token).
struct OrderedVocab<'a>(&'a [String]);

impl Serialize for OrderedVocab<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, token) in self.0.iter().enumerate() {
            map.serialize_entry(token, &id)?;
        }
        map.end()
    }
}

fn byte_level_json() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
}

fn pre_tokenizer_json() -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level_json(),
        ],
    })
}

fn pre_tokenizer() -> Result<PreTokenizerWrapper> {
    Ok(serde_json::from_value(pre_tokenizer_json())?)
}

/// GPT-2's byte-to-unicode table, in id order: printable bytes `!..=~`, `¡..=¬`, `®..=ÿ` map to
/// themselves, the other 68 bytes to U+0100.. in byte order, and they follow the printable ones.
pub fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut chars: Vec<char> = (0..256u32).filter(|&b| printable(b)).filter_map(char::from_u32).collect();
    chars.extend((0..256u32).filter(|&b| !printable(b)).zip(0x100u32..).filter_map(|(_, c)| char::from_u32(c)));
    chars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[0], '!');
        assert_eq!(a[93], '~');
        // Space (0x20) is the 33rd non-printable byte: U+0100 + 32 = 'Ġ'.
        assert!(a.contains(&'Ġ'));
        assert_eq!(a[255], 'Ń');
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn training_is_greedy_and_stable() {
        let t = DemoTokenizer::train(&["a cat, a cat, a cat"]).unwrap();
        // ("Ġ","c"), ("c","a") and ("a","t") all occur 3 times; the smallest pair wins.
        assert_eq!(t.merges[0], ("a".to_string(), "t".to_string()));
        assert_eq!(t.vocab.len(), 256 + t.merges.len());
        assert_eq!(DemoTokenizer::train(&["a cat, a cat, a cat"]).unwrap().merges, t.merges);
    }
}
