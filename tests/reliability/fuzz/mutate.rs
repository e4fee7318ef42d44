//! Mutations of good inputs, as proptest strategies (so failures shrink to few, small steps).
//!
//! - [`ByteMut`]: byte-level (flip, set, insert, delete, duplicate, truncate), plus two
//!   MessagePack-aware ones: overwrite a float's 8 bytes with a poison value (NaN, ±Inf, huge,
//!   subnormal) and inject an interesting 64-bit integer.
//! - [`TreeMut`]: structured, on the JSON tree (replace a node by an interesting leaf, remove it,
//!   copy one node over another, grow or shrink an array), re-encoded as JSON or MessagePack.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

/// Interesting 64-bit patterns for floats (as bits).
const POISON_F64: [f64; 12] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -0.0,
    f64::MAX,
    f64::MIN,
    f64::MIN_POSITIVE,
    5e-324,
    1e300,
    -1.0,
    0.0,
    1e-300,
];

const INTERESTING_U64: [u64; 12] =
    [0, 1, 2, 255, 256, 65_535, 65_536, 2_147_483_647, 4_294_967_295, 4_294_967_296, i64::MAX as u64, u64::MAX];

#[derive(Debug, Clone)]
pub enum ByteMut {
    Flip {
        at: Index,
        bit: u8,
    },
    Set {
        at: Index,
        value: u8,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Delete {
        at: Index,
        len: u16,
    },
    Duplicate {
        from: Index,
        len: u16,
        to: Index,
    },
    Truncate {
        at: Index,
    },
    /// Overwrite the 8 bytes after the n-th `0xcb` (MessagePack float 64) with a poison value.
    PoisonFloat {
        nth: Index,
        which: usize,
    },
    /// Replace the byte at `at` by a MessagePack uint 64 holding an interesting value.
    InjectInt {
        at: Index,
        which: usize,
    },
}

pub fn byte_mut() -> impl Strategy<Value = ByteMut> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| ByteMut::Flip { at, bit }),
        2 => (any::<Index>(), prop_oneof![Just(0u8), Just(0xff), Just(0x7f), Just(0x80), Just(b'"'), Just(b'{'), any::<u8>()])
            .prop_map(|(at, value)| ByteMut::Set { at, value }),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| ByteMut::Insert { at, bytes }),
        1 => (any::<Index>(), 1u16..64).prop_map(|(at, len)| ByteMut::Delete { at, len }),
        1 => (any::<Index>(), 1u16..256, any::<Index>()).prop_map(|(from, len, to)| ByteMut::Duplicate { from, len, to }),
        1 => any::<Index>().prop_map(|at| ByteMut::Truncate { at }),
        3 => (any::<Index>(), 0..POISON_F64.len()).prop_map(|(nth, which)| ByteMut::PoisonFloat { nth, which }),
        2 => (any::<Index>(), 0..INTERESTING_U64.len()).prop_map(|(at, which)| ByteMut::InjectInt { at, which }),
    ]
}

/// Applies byte mutations to `bytes`, only within `bytes[..limit]` for position choices when
/// `limit` is given (e.g. a safetensors header).
pub fn apply_bytes(bytes: &mut Vec<u8>, muts: &[ByteMut], limit: Option<usize>) {
    for m in muts {
        let len = limit.map_or(bytes.len(), |l| l.min(bytes.len()));
        if len == 0 {
            if let ByteMut::Insert { bytes: b, .. } = m {
                bytes.extend(b);
            }
            continue;
        }
        match m {
            ByteMut::Flip { at, bit } => bytes[at.index(len)] ^= 1 << bit,
            ByteMut::Set { at, value } => bytes[at.index(len)] = *value,
            ByteMut::Insert { at, bytes: b } => {
                let i = at.index(len + 1);
                bytes.splice(i..i, b.iter().copied());
            }
            ByteMut::Delete { at, len: n } => {
                let i = at.index(len);
                let end = (i + *n as usize).min(len);
                bytes.drain(i..end);
            }
            ByteMut::Duplicate { from, len: n, to } => {
                let i = from.index(len);
                let chunk: Vec<u8> = bytes[i..(i + *n as usize).min(len)].to_vec();
                let j = to.index(len + 1);
                bytes.splice(j..j, chunk);
            }
            ByteMut::Truncate { at } => bytes.truncate(at.index(len)),
            ByteMut::PoisonFloat { nth, which } => {
                let marks: Vec<usize> = (0..len.saturating_sub(8)).filter(|&i| bytes[i] == 0xcb).collect();
                if !marks.is_empty() {
                    let i = marks[nth.index(marks.len())];
                    bytes[i + 1..i + 9].copy_from_slice(&POISON_F64[*which].to_bits().to_be_bytes());
                }
            }
            ByteMut::InjectInt { at, which } => {
                let i = at.index(len);
                let mut v = vec![0xcf];
                v.extend(INTERESTING_U64[*which].to_be_bytes());
                bytes.splice(i..i + 1, v);
            }
        }
    }
}

/// A leaf value to put into a JSON tree.
#[derive(Debug, Clone)]
pub enum Leaf {
    Null,
    Bool(bool),
    UInt(u64),
    Int(i64),
    Float(f64),
    Str(String),
    EmptyArray,
    EmptyObject,
}

impl Leaf {
    fn value(&self) -> Value {
        match self {
            Leaf::Null => Value::Null,
            Leaf::Bool(b) => Value::Bool(*b),
            Leaf::UInt(u) => Value::from(*u),
            Leaf::Int(i) => Value::from(*i),
            Leaf::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Leaf::Str(s) => Value::String(s.clone()),
            Leaf::EmptyArray => Value::Array(Vec::new()),
            Leaf::EmptyObject => Value::Object(Default::default()),
        }
    }
}

pub fn leaf() -> impl Strategy<Value = Leaf> {
    prop_oneof![
        Just(Leaf::Null),
        any::<bool>().prop_map(Leaf::Bool),
        prop::sample::select(INTERESTING_U64.to_vec()).prop_map(Leaf::UInt),
        any::<u64>().prop_map(Leaf::UInt),
        prop::sample::select(vec![-1i64, -100, i64::MIN, -2_147_483_648]).prop_map(Leaf::Int),
        prop::sample::select(vec![0.5, -0.5, 1e308, -1e308, 5e-324, 1e-9, 16.0, 8.0, 4.5, 0.0001])
            .prop_map(Leaf::Float),
        prop::sample::select(vec![
            "",
            "NONE",
            "FP8",
            "gradient",
            "kl_div",
            "../x.jpg",
            "/etc/hostname",
            "\u{0}",
            "🦀",
            "a.b.c",
            "qsens.scores",
            "model.visual.blocks.0.attn.qkv",
            "lm_head",
            "F32",
            "I64",
            "BOOL",
            "F8_E4M3",
        ])
        .prop_map(|s| Leaf::Str(s.to_string())),
        "[ -~]{0,12}".prop_map(Leaf::Str),
        (1usize..3000).prop_map(|n| Leaf::Str("x".repeat(n))),
        Just(Leaf::EmptyArray),
        Just(Leaf::EmptyObject),
    ]
}

#[derive(Debug, Clone)]
pub enum TreeMut {
    Replace {
        node: Index,
        with: Leaf,
    },
    Remove {
        node: Index,
    },
    CopyOver {
        from: Index,
        to: Index,
    },
    /// Repeats an array's elements (up to `times` extra copies, capped at 4096 elements).
    Grow {
        node: Index,
        times: u8,
    },
    Shrink {
        node: Index,
        keep: Index,
    },
    /// Changes a number into a related one (keeps the type right, so deeper code sees it).
    Numeric {
        node: Index,
        how: Numeric,
    },
}

#[derive(Debug, Clone, Copy)]
pub enum Numeric {
    Negate,
    Zero,
    Double,
    Half,
    PlusOne,
    MinusOne,
    Huge,
    Tiny,
    Max,
}

pub fn tree_mut() -> impl Strategy<Value = TreeMut> {
    prop_oneof![
        4 => (any::<Index>(), leaf()).prop_map(|(node, with)| TreeMut::Replace { node, with }),
        2 => any::<Index>().prop_map(|node| TreeMut::Remove { node }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(from, to)| TreeMut::CopyOver { from, to }),
        1 => (any::<Index>(), 1u8..4).prop_map(|(node, times)| TreeMut::Grow { node, times }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(node, keep)| TreeMut::Shrink { node, keep }),
        4 => (any::<Index>(), prop::sample::select(vec![
            Numeric::Negate, Numeric::Zero, Numeric::Double, Numeric::Half, Numeric::PlusOne,
            Numeric::MinusOne, Numeric::Huge, Numeric::Tiny, Numeric::Max,
        ]))
            .prop_map(|(node, how)| TreeMut::Numeric { node, how }),
    ]
}

/// Paths (keys / indices) of every node, pre-order, root first.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    At(usize),
}

fn paths(v: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                prefix.push(Step::Key(k.clone()));
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(Step::At(i));
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn get_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut cur = v;
    for s in path {
        cur = match (s, cur) {
            (Step::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Step::At(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Picks nodes among the array-valued ones first for `Grow`/`Shrink`, any node otherwise.
pub fn apply_tree(v: &mut Value, muts: &[TreeMut]) {
    for m in muts {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let pick = |i: &Index| all[i.index(all.len())].clone();
        match m {
            TreeMut::Replace { node, with } => {
                if let Some(n) = get_mut(v, &pick(node)) {
                    *n = with.value();
                }
            }
            TreeMut::Remove { node } => {
                let p = pick(node);
                let Some((last, parent)) = p.split_last() else { continue };
                match (get_mut(v, parent), last) {
                    (Some(Value::Object(m)), Step::Key(k)) => {
                        m.remove(k);
                    }
                    (Some(Value::Array(a)), Step::At(i)) if *i < a.len() => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
            TreeMut::CopyOver { from, to } => {
                let src = get_mut(v, &pick(from)).map(|n| n.clone());
                if let (Some(src), Some(dst)) = (src, get_mut(v, &pick(to))) {
                    *dst = src;
                }
            }
            TreeMut::Grow { node, times } => {
                let arrays: Vec<&Vec<Step>> =
                    all.iter().filter(|p| matches!(get_ref(v, p), Some(Value::Array(a)) if !a.is_empty())).collect();
                if arrays.is_empty() {
                    continue;
                }
                let p = arrays[node.index(arrays.len())].clone();
                if let Some(Value::Array(a)) = get_mut(v, &p) {
                    let orig = a.clone();
                    for _ in 0..*times {
                        if a.len() + orig.len() > 4096 {
                            break;
                        }
                        a.extend(orig.iter().cloned());
                    }
                }
            }
            TreeMut::Numeric { node, how } => {
                let numbers: Vec<&Vec<Step>> =
                    all.iter().filter(|p| matches!(get_ref(v, p), Some(Value::Number(_)))).collect();
                if numbers.is_empty() {
                    continue;
                }
                let p = numbers[node.index(numbers.len())].clone();
                if let Some(n @ Value::Number(_)) = get_mut(v, &p) {
                    *n = numeric(n, *how);
                }
            }
            TreeMut::Shrink { node, keep } => {
                let arrays: Vec<&Vec<Step>> =
                    all.iter().filter(|p| matches!(get_ref(v, p), Some(Value::Array(a)) if !a.is_empty())).collect();
                if arrays.is_empty() {
                    continue;
                }
                let p = arrays[node.index(arrays.len())].clone();
                if let Some(Value::Array(a)) = get_mut(v, &p) {
                    let n = keep.index(a.len());
                    a.truncate(n);
                }
            }
        }
    }
}

fn numeric(n: &Value, how: Numeric) -> Value {
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    if let Some(u) = n.as_u64() {
        return match how {
            Numeric::Negate => Value::from(-(u.min(i64::MAX as u64) as i64)),
            Numeric::Zero => Value::from(0u64),
            Numeric::Double => Value::from(u.saturating_mul(2)),
            Numeric::Half => Value::from(u / 2),
            Numeric::PlusOne => Value::from(u.saturating_add(1)),
            Numeric::MinusOne => {
                if u == 0 {
                    Value::from(-1i64)
                } else {
                    Value::from(u - 1)
                }
            }
            Numeric::Huge => Value::from(u.saturating_mul(1 << 20)),
            Numeric::Tiny => float(u as f64 * 1e-300),
            Numeric::Max => Value::from(u64::MAX),
        };
    }
    let x = n.as_f64().unwrap_or(0.0);
    float(match how {
        Numeric::Negate => -x,
        Numeric::Zero => 0.0,
        Numeric::Double => x * 2.0,
        Numeric::Half => x / 2.0,
        Numeric::PlusOne => x + 1.0,
        Numeric::MinusOne => x - 1.0,
        Numeric::Huge => x * 1e300,
        Numeric::Tiny => x * 1e-300,
        Numeric::Max => f64::MAX,
    })
}

fn get_ref<'a>(v: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = v;
    for s in path {
        cur = match (s, cur) {
            (Step::Key(k), Value::Object(m)) => m.get(k)?,
            (Step::At(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// How a mutated input is made from the seeds of one target.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Seed `seed`'s bytes, mutated byte-wise.
    Bytes { seed: Index, muts: Vec<ByteMut> },
    /// Seed `seed` parsed as JSON, mutated as a tree, encoded as JSON or (`msgpack`) MessagePack,
    /// then optionally mutated byte-wise.
    Tree { seed: Index, muts: Vec<TreeMut>, msgpack: bool, then: Vec<ByteMut> },
    /// Random bytes.
    Random(Vec<u8>),
}

pub fn plan(msgpack_allowed: bool) -> impl Strategy<Value = Plan> {
    prop_oneof![
        4 => (any::<Index>(), prop::collection::vec(byte_mut(), 1..8)).prop_map(|(seed, muts)| Plan::Bytes { seed, muts }),
        5 => (any::<Index>(), prop::collection::vec(tree_mut(), 1..6), any::<bool>(), prop::collection::vec(byte_mut(), 0..2))
            .prop_map(move |(seed, muts, m, then)| Plan::Tree { seed, muts, msgpack: m && msgpack_allowed, then }),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Plan::Random),
    ]
}

/// Byte-level plans only (for seeds that are not JSON).
pub fn byte_plan() -> impl Strategy<Value = Plan> {
    prop_oneof![
        9 => (any::<Index>(), prop::collection::vec(byte_mut(), 1..8)).prop_map(|(seed, muts)| Plan::Bytes { seed, muts }),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Plan::Random),
    ]
}

/// The seeds of a target: raw bytes, and (for tree mutations) their JSON trees.
pub struct Seeds {
    pub bytes: Vec<Vec<u8>>,
    pub trees: Vec<Value>,
}

impl Seeds {
    /// `bytes` are all used for byte mutations; those that parse as JSON also for tree mutations.
    pub fn new(bytes: Vec<Vec<u8>>) -> Self {
        let trees = bytes.iter().filter_map(|b| serde_json::from_slice(b).ok()).collect();
        Seeds { bytes, trees }
    }

    pub fn make(&self, plan: &Plan) -> Vec<u8> {
        match plan {
            Plan::Bytes { seed, muts } => {
                let mut b = self.bytes[seed.index(self.bytes.len())].clone();
                apply_bytes(&mut b, muts, None);
                b
            }
            Plan::Tree { seed, muts, msgpack, then } => {
                if self.trees.is_empty() {
                    return Vec::new();
                }
                let mut v = self.trees[seed.index(self.trees.len())].clone();
                apply_tree(&mut v, muts);
                let mut b = if *msgpack {
                    rmp_serde::to_vec_named(&v).expect("msgpack of a JSON value")
                } else {
                    serde_json::to_vec(&v).expect("JSON of a JSON value")
                };
                apply_bytes(&mut b, then, None);
                b
            }
            Plan::Random(b) => b.clone(),
        }
    }
}
