//! The Phoenix message: five fields, a payload that is JSON or bytes, and the serializer
//! version a connection speaks.

use std::borrow::Cow;
use std::fmt;
use std::rc::Rc;

use bytes::Bytes;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// A message payload: a JSON value or raw bytes (V2 binary frames).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Any JSON value (pushes and broadcasts from the server carry objects).
    Json(Value),
    /// Raw bytes, carried in V2 binary frames.
    Binary(Bytes),
}

impl Payload {
    /// The empty JSON object `{}`.
    pub fn empty() -> Self {
        Payload::Json(Value::Object(Default::default()))
    }

    /// The JSON value, if this payload is JSON.
    pub fn json(&self) -> Option<&Value> {
        match self {
            Payload::Json(v) => Some(v),
            Payload::Binary(_) => None,
        }
    }

    /// A string field of a JSON object payload.
    ///
    /// ```
    /// use ringcast::Payload;
    /// let p = Payload::from(serde_json::json!({"body": "hi", "n": 1}));
    /// assert_eq!(p.str_field("body"), Some("hi"));
    /// assert_eq!(p.str_field("n"), None);
    /// ```
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.json()?.get(key)?.as_str()
    }
}

impl From<Value> for Payload {
    fn from(v: Value) -> Self {
        Payload::Json(v)
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::Binary(b)
    }
}

/// A client's `ref` or `join_ref` as it came on the wire: a string, an integer, or null
/// (PROTOCOL.md §1). It is kept as its JSON text (`"1"` with its quotes, or `1`), so that
/// it goes back out in the type it came in, is written into a frame as it is, and two
/// refs are equal exactly when their values are: `"1"` is not `1`.
///
/// ```
/// use ringcast::proto::Ref;
/// assert_eq!(Ref::from("1").json(), r#""1""#);
/// assert_eq!(Ref::from(1i64).json(), "1");
/// assert_ne!(Ref::from("1"), Ref::from(1i64));
/// assert_eq!(Ref::from(1i64).text(), "1");
/// assert_eq!(Ref::from("a\"b").text(), "a\"b");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Ref(Rc<str>);

impl Ref {
    /// The JSON `null` ref: a join that carried neither a `join_ref` nor a `ref`.
    pub fn null() -> Self {
        Ref("null".into())
    }

    /// The ref as JSON text, ready to be written into a text frame.
    pub fn json(&self) -> &str {
        &self.0
    }

    /// Whether the client sent this ref as a number.
    pub fn is_number(&self) -> bool {
        self.0.starts_with(|c: char| c == '-' || c.is_ascii_digit())
    }

    /// The ref as plain text, as a V2 binary frame carries it: a string's characters, a
    /// number's digits, nothing for null.
    pub fn text(&self) -> Cow<'_, str> {
        let json = &*self.0;
        match json.as_bytes().first() {
            Some(b'"') if !json.contains('\\') => Cow::Borrowed(&json[1..json.len() - 1]),
            Some(b'"') => Cow::Owned(serde_json::from_str(json).expect("a ref holds valid JSON")),
            _ if json == "null" => Cow::Borrowed(""),
            _ => Cow::Borrowed(json),
        }
    }
}

impl fmt::Debug for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Ref {
    fn from(s: &str) -> Self {
        // Refs are short (64 bytes at most on the wire) and rarely need escaping: quote
        // them on the stack and allocate once, as decoding a plain string would.
        let plain = !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
        let mut buf = [0u8; 130];
        if plain && s.len() + 2 <= buf.len() {
            buf[0] = b'"';
            buf[1..=s.len()].copy_from_slice(s.as_bytes());
            buf[s.len() + 1] = b'"';
            let quoted = std::str::from_utf8(&buf[..s.len() + 2]).expect("quotes around UTF-8");
            return Ref(quoted.into());
        }
        let escaped = serde_json::to_string(s).expect("a string always serializes");
        Ref(escaped.into())
    }
}

impl From<i64> for Ref {
    fn from(n: i64) -> Self {
        Ref(n.to_string().into())
    }
}

impl From<u64> for Ref {
    fn from(n: u64) -> Self {
        Ref(n.to_string().into())
    }
}

/// Strings and integers; anything else (a float, an object, an array) is refused.
impl<'de> Deserialize<'de> for Ref {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ref;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a ref: a string, an integer or null")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Ref, E> {
                Ok(Ref::from(s))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Ref, E> {
                Ok(Ref::from(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Ref, E> {
                Ok(Ref::from(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// One Phoenix message, in either direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The `ref` of the join this message belongs to.
    pub join_ref: Option<Ref>,
    /// The client's request id, echoed by the reply.
    pub msg_ref: Option<Ref>,
    /// Topic, e.g. `rooms:lobby`.
    pub topic: String,
    /// Event, e.g. `phx_join` or `new_msg`.
    pub event: String,
    /// Body.
    pub payload: Payload,
}

/// The serializer a connection speaks, chosen by its `vsn` connect parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `vsn=1.0.x` (or none): one JSON object per text frame, no binary.
    V1,
    /// `vsn=2.0.x`: JSON arrays in text frames plus binary frames.
    V2,
}

impl Vsn {
    /// The serializer for a `vsn` parameter, as Phoenix matches it (`~> 1.0.0`,
    /// `~> 2.0.0`); `None` when the version is refused.
    ///
    /// ```
    /// use ringcast::proto::Vsn;
    /// assert_eq!(Vsn::from_param(Some("2.0.7")), Some(Vsn::V2));
    /// assert_eq!(Vsn::from_param(None), Some(Vsn::V1));
    /// assert_eq!(Vsn::from_param(Some("2.1.0")), None);
    /// ```
    pub fn from_param(vsn: Option<&str>) -> Option<Vsn> {
        let Some(vsn) = vsn else {
            return Some(Vsn::V1);
        };
        let mut parts = vsn.split('.');
        let (major, minor, patch) = (parts.next()?, parts.next()?, parts.next()?);
        let patch_ok = patch
            .split(['-', '+'])
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if parts.next().is_some() || !patch_ok || minor != "0" {
            return None;
        }
        match major {
            "1" => Some(Vsn::V1),
            "2" => Some(Vsn::V2),
            _ => None,
        }
    }
}
