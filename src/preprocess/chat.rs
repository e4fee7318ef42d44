//! Chat-template rendering as HF's `apply_chat_template`: Jinja with `trim_blocks` and
//! `lstrip_blocks`, the HF globals (`raise_exception`, `strftime_now`), Python's `tojson`, and
//! Python string/dict methods (`.strip()`, `.split()`, `.items()`, ...) via minijinja-contrib's
//! pycompat layer.

use anyhow::{anyhow, Result};
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// One message of a conversation, shaped as HF's processors expect.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// `{"type": "image", "image": ...}` or `{"type": "text", "text": ...}`.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Part {
    pub fn image(reference: impl Into<String>) -> Self {
        Part { kind: "image".into(), image: Some(reference.into()), text: None }
    }
    pub fn text(text: impl Into<String>) -> Self {
        Part { kind: "text".into(), image: None, text: Some(text.into()) }
    }
}

impl Message {
    /// A user turn: the images (in order), then the prompt text.
    pub fn user(images: &[String], prompt: &str) -> Self {
        let mut parts: Vec<Part> = images.iter().map(|i| Part::image(i.clone())).collect();
        parts.push(Part::text(prompt));
        Message { role: "user".into(), content: Content::Parts(parts) }
    }
    pub fn assistant(text: &str) -> Self {
        Message { role: "assistant".into(), content: Content::Text(text.to_string()) }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Vec<(String, String)>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `special_tokens` (`bos_token`, `eos_token`, ...) are passed to every
    /// render as HF does.
    pub fn new(source: &str, special_tokens: Vec<(String, String)>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(|e| anyhow!("invalid chat template: {e:#}"))?;
        Ok(ChatTemplate { env, special_tokens })
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| anyhow!("{e:#}"))?;
        let mut ctx: std::collections::BTreeMap<String, Value> =
            self.special_tokens.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        tmpl.render(Value::from_object(ctx)).map_err(|e| anyhow!("rendering the chat template: {e:#}"))
    }
}

/// HF's `strftime_now(format)`; only `%Y %m %d %B %b %H %M %S` and `%%` are supported.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil-from-days (Howard Hinnant's algorithm), UTC.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported %{other:?}")))
            }
        }
    }
    Ok(Value::from(out))
}

/// Python's `json.dumps(value, ensure_ascii=False)` (HF's `tojson`): `", "` and `": "`
/// separators, insertion-ordered keys, no HTML escaping (minijinja's built-in escapes `<>&'`).
/// The `indent` keyword is honoured as in Python; other keywords are accepted and ignored.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        // minijinja formats numbers as Python does (`2.0`, `1.5`, `3`).
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                json_string(&k.to_string(), out);
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => json_string(&v.to_string(), out),
    }
    Ok(())
}

fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_behaviours() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content | tojson }}|{{ m.role.upper() }}|{{ '  x '.strip() }}\n{% endfor %}",
            vec![],
        )
        .unwrap();
        let out = t.render(&[Message::assistant("a<b>\"c\"\né")], false).unwrap();
        assert_eq!(out, "\"a<b>\\\"c\\\"\\né\"|ASSISTANT|x\n");
    }

    /// The constructs Qwen3 / Qwen3-VL-Thinking templates rely on: namespace assignment, a
    /// reversed `range`, Python string methods with arguments, `is defined` / `is not none`.
    #[test]
    fn qwen_thinking_constructs() {
        let src = r#"{%- set ns = namespace(last=messages|length - 1, seen=false) %}
{%- for i in range(ns.last, -1, -1) %}{%- if messages[i].role == 'user' and not ns.seen %}{%- set ns.last = i %}{%- set ns.seen = true %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.content is string and '</think>' in m.content %}
{{- m.content.split('</think>')[-1].lstrip('\n') }}|{{ m.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') }}|{{ ' x\n'.strip('\n') }}
{%- elif m.reasoning_content is defined and m.reasoning_content is not none %}R
{%- else %}{{ m.role }}:{{ ns.last }}{{ m.content[0].type if m.content is not string }};
{%- endif %}
{%- endfor %}"#;
        let t = ChatTemplate::new(src, vec![]).unwrap();
        let msgs =
            [Message::user(&["a.jpg".to_string()], "hi"), Message::assistant("<think>\nwhy\n</think>\n\nA cat.")];
        assert_eq!(t.render(&msgs, false).unwrap(), "user:0image;A cat.|why| x");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        let t =
            ChatTemplate::new("A\n  {% if true %}\nB\n  {% endif %}\nC\n", vec![("eos_token".into(), "<e>".into())])
                .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "A\nB\nC");
        let t =
            ChatTemplate::new("{{ eos_token }}{{ raise_exception('boom') }}", vec![("eos_token".into(), "<e>".into())])
                .unwrap();
        assert!(format!("{:#}", t.render(&[], false).unwrap_err()).contains("boom"));
    }

    #[test]
    fn tojson_numbers_and_maps() {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        let out = env.render_str("{{ {'a': 1, 'b': [1.5, 2.0, none, true]} | tojson }}", ()).unwrap();
        assert_eq!(out, "{\"a\": 1, \"b\": [1.5, 2.0, null, true]}");
    }
}
