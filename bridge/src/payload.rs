//! Payload encodings, both ways: how a `publish` frame's `data` becomes MQTT
//! payload bytes, and how MQTT payload bytes become a `message` frame's
//! `data` (and `encoding`).

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use serde_json::value::RawValue;

/// Standard alphabet; padding optional on input, always written on output.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How `data` maps to payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `data` is any JSON value, published as its compact JSON text.
    Json,
    /// `data` is a string, published as its UTF-8 bytes.
    Text,
    /// `data` is a base64 string, published as the decoded bytes.
    Base64,
}

impl Encoding {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Encoding::Json),
            "text" => Some(Encoding::Text),
            "base64" => Some(Encoding::Base64),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Text => "text",
            Encoding::Base64 => "base64",
        }
    }
}

/// Why `data` could not be turned into a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    NotAString(Encoding),
    InvalidBase64,
    /// Valid JSON syntax that strict parsers refuse (a number out of range).
    UnreadableJson,
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::NotAString(e) => {
                write!(f, "with encoding \"{}\", data must be a string", e.name())
            }
            PayloadError::InvalidBase64 => write!(f, "data is not valid base64"),
            PayloadError::UnreadableJson => {
                write!(f, "data holds a number out of range for JSON parsers")
            }
        }
    }
}

/// Turns a `publish` frame's `data` (raw JSON text) into payload bytes.
pub fn encode(data: &RawValue, encoding: Encoding) -> Result<Vec<u8>, PayloadError> {
    match encoding {
        Encoding::Json if is_strict_json(data.get()) => Ok(compact_json(data.get()).into_bytes()),
        Encoding::Json => Err(PayloadError::UnreadableJson),
        Encoding::Text => serde_json::from_str::<String>(data.get())
            .map(String::into_bytes)
            .map_err(|_| PayloadError::NotAString(encoding)),
        Encoding::Base64 => {
            let text = serde_json::from_str::<String>(data.get())
                .map_err(|_| PayloadError::NotAString(encoding))?;
            BASE64
                .decode(text.as_bytes())
                .map_err(|_| PayloadError::InvalidBase64)
        }
    }
}

/// Removes the insignificant whitespace from valid JSON text, keeping every
/// value exactly as written (numbers are not re-formatted).
pub fn compact_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

/// How a payload appears in a `message` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data<'a> {
    /// The payload is JSON text: embedded as is, `encoding` absent.
    Json(&'a str),
    /// Valid UTF-8 that is not JSON: a string, `"encoding": "text"`.
    Text(&'a str),
    /// Anything else: base64, `"encoding": "base64"`.
    Base64(String),
}

/// Classifies payload bytes for a `message` frame.
pub fn decode(payload: &[u8]) -> Data<'_> {
    match std::str::from_utf8(payload) {
        Ok(text) if is_strict_json(text) => Data::Json(text.trim_matches([' ', '\t', '\n', '\r'])),
        Ok(text) => Data::Text(text),
        Err(_) => Data::Base64(BASE64.encode(payload)),
    }
}

/// Whether `text` is one JSON value that strict parsers read: the grammar,
/// and every number finite as a double (`1e999` is valid syntax, but
/// serde_json, Go and others refuse it). Checked without building a value.
pub fn is_strict_json(text: &str) -> bool {
    serde_json::from_str::<Strict>(text).is_ok()
}

/// A JSON value walked with `deserialize_any`, which range-checks numbers.
struct Strict;

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        while map.next_entry::<Strict, Strict>()?.is_some() {}
        Ok(Strict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn encode_each_way() {
        assert_eq!(
            encode(&raw(r#"{ "a" : [1, 2.50, "x y"] }"#), Encoding::Json).unwrap(),
            br#"{"a":[1,2.50,"x y"]}"#
        );
        assert_eq!(
            encode(&raw(r#""quoted""#), Encoding::Json).unwrap(),
            br#""quoted""#
        );
        assert_eq!(
            encode(&raw(r#""h\u00e9""#), Encoding::Text).unwrap(),
            "hé".as_bytes()
        );
        assert_eq!(
            encode(&raw("42"), Encoding::Text),
            Err(PayloadError::NotAString(Encoding::Text))
        );
        assert_eq!(
            encode(&raw(r#""AAEC/w==""#), Encoding::Base64).unwrap(),
            vec![0, 1, 2, 255]
        );
        assert_eq!(
            encode(&raw(r#""AAEC/w""#), Encoding::Base64).unwrap(),
            vec![0, 1, 2, 255]
        );
        assert_eq!(
            encode(&raw(r#""%%%""#), Encoding::Base64),
            Err(PayloadError::InvalidBase64)
        );
    }

    #[test]
    fn compact_keeps_strings() {
        assert_eq!(
            compact_json(r#" [ "a \" b" , "\\" ,1 ] "#),
            r#"["a \" b","\\",1]"#
        );
    }

    #[test]
    fn decode_each_way() {
        assert_eq!(decode(b"42"), Data::Json("42"));
        assert_eq!(decode(br#""quoted""#), Data::Json(r#""quoted""#));
        assert_eq!(decode(br#" {"t":1} "#), Data::Json(r#"{"t":1}"#));
        assert_eq!(decode(b"null"), Data::Json("null"));
        assert_eq!(decode(b"hello"), Data::Text("hello"));
        assert_eq!(decode(b""), Data::Text(""));
        assert_eq!(decode(&[0xff, 0x00]), Data::Base64("/wA=".into()));
        // Valid syntax that strict parsers refuse is text, not JSON.
        assert_eq!(decode(b"1e999"), Data::Text("1e999"));
        assert_eq!(decode(b"[1, -1e400]"), Data::Text("[1, -1e400]"));
        assert_eq!(
            decode(b"123456789012345678901234567890"),
            Data::Json("123456789012345678901234567890")
        );
        assert_eq!(decode(b"{\"a\":1} x"), Data::Text("{\"a\":1} x"));
    }
}
