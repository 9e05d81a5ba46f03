//! The Phoenix message: five fields, a payload that is JSON or bytes, and the serializer
//! version a connection speaks.

use bytes::Bytes;
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

/// One Phoenix message, in either direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The `ref` of the join this message belongs to.
    pub join_ref: Option<String>,
    /// The client's request id, echoed by the reply.
    pub msg_ref: Option<String>,
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
