//! Phoenix serializers V1 (JSON objects) and V2 (JSON arrays + binary frames): decode a
//! client frame into a [`Message`], encode a server message into a finished WebSocket
//! frame. Encoding writes straight into the frame buffer: one allocation per message,
//! whatever the number of subscribers it goes to.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::error::ProtocolError;
use super::message::{Message, Payload, Ref, Vsn};
use super::ws::{FrameBuilder, FrameKind};

/// What a server message carries in its payload slot.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// A push or broadcast payload.
    Payload(&'a Payload),
    /// A `phx_reply`: `{"status": status, "response": response}` (binary: kind 1).
    Reply(&'a str, &'a Payload),
    /// A payload that is already JSON text (presence state and diffs).
    RawJson(&'a str),
}

/// A server → client message, borrowed, ready to encode.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Channel's join_ref (pushes, replies, close/error), `None` for fastlane broadcasts.
    pub join_ref: Option<&'a Ref>,
    /// Request ref (replies, close/error), `None` for pushes and broadcasts.
    pub msg_ref: Option<&'a Ref>,
    /// Topic.
    pub topic: &'a str,
    /// Event (`phx_reply` for replies).
    pub event: &'a str,
    /// Payload.
    pub body: Body<'a>,
}

impl<'a> Outgoing<'a> {
    /// A fastlane broadcast: no join_ref, no ref.
    pub fn broadcast(topic: &'a str, event: &'a str, payload: &'a Payload) -> Self {
        Outgoing {
            join_ref: None,
            msg_ref: None,
            topic,
            event,
            body: Body::Payload(payload),
        }
    }

    /// A channel push: the channel's join_ref, no ref.
    pub fn push(join_ref: Option<&'a Ref>, topic: &'a str, event: &'a str, payload: &'a Payload) -> Self {
        Outgoing {
            join_ref,
            msg_ref: None,
            topic,
            event,
            body: Body::Payload(payload),
        }
    }

    /// A `phx_reply` to the message `msg_ref`.
    pub fn reply(
        join_ref: Option<&'a Ref>,
        msg_ref: Option<&'a Ref>,
        topic: &'a str,
        status: &'a str,
        response: &'a Payload,
    ) -> Self {
        Outgoing {
            join_ref,
            msg_ref,
            topic,
            event: "phx_reply",
            body: Body::Reply(status, response),
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// V1 has no representation for bytes.
    #[error("binary payloads need the V2 serializer")]
    BinaryOnV1,
    /// A V2 binary frame field is over 255 bytes.
    #[error("field too long for a binary frame")]
    FieldTooLong,
}

/// Encodes `msg` for `vsn` into a finished WebSocket frame.
///
/// ```
/// use ringcast::proto::serializer::{encode, Outgoing};
/// use ringcast::proto::Vsn;
/// use ringcast::Payload;
/// let payload = Payload::from(serde_json::json!({"body": "hi"}));
/// let frame = encode(Vsn::V2, &Outgoing::broadcast("rooms:a", "new_msg", &payload)).unwrap();
/// assert_eq!(&frame[2..], br#"[null,null,"rooms:a","new_msg",{"body":"hi"}]"#);
/// ```
pub fn encode(vsn: Vsn, msg: &Outgoing<'_>) -> Result<Bytes, EncodeError> {
    let binary = match msg.body {
        Body::Payload(Payload::Binary(b)) | Body::Reply(_, Payload::Binary(b)) => Some(b),
        _ => None,
    };
    match (vsn, binary) {
        (Vsn::V1, Some(_)) => Err(EncodeError::BinaryOnV1),
        (Vsn::V2, Some(data)) => encode_binary(msg, data),
        (Vsn::V1, None) => Ok(encode_v1(msg)),
        (Vsn::V2, None) => Ok(encode_v2(msg)),
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

fn write_ref(out: &mut Vec<u8>, r: Option<&Ref>) {
    out.extend_from_slice(r.map_or("null", Ref::json).as_bytes());
}

fn write_json_body(out: &mut Vec<u8>, body: Body<'_>) {
    let json = |out: &mut Vec<u8>, p: &Payload| match p {
        Payload::Json(v) => serde_json::to_writer(&mut *out, v).expect("writing to a Vec cannot fail"),
        Payload::Binary(_) => unreachable!("binary bodies take the binary path"),
    };
    match body {
        Body::Payload(p) => json(out, p),
        Body::RawJson(text) => out.extend_from_slice(text.as_bytes()),
        Body::Reply(status, response) => {
            out.extend_from_slice(b"{\"status\":");
            write_str(out, status);
            out.extend_from_slice(b",\"response\":");
            json(out, response);
            out.push(b'}');
        }
    }
}

fn size_hint(msg: &Outgoing<'_>) -> usize {
    64 + msg.topic.len() + msg.event.len()
}

fn encode_v2(msg: &Outgoing<'_>) -> Bytes {
    let mut frame = FrameBuilder::with_capacity(size_hint(msg));
    let out = frame.payload();
    out.push(b'[');
    write_ref(out, msg.join_ref);
    out.push(b',');
    write_ref(out, msg.msg_ref);
    out.push(b',');
    write_str(out, msg.topic);
    out.push(b',');
    write_str(out, msg.event);
    out.push(b',');
    write_json_body(out, msg.body);
    out.push(b']');
    frame.finish(FrameKind::Text)
}

fn encode_v1(msg: &Outgoing<'_>) -> Bytes {
    let mut frame = FrameBuilder::with_capacity(size_hint(msg));
    let out = frame.payload();
    out.extend_from_slice(b"{\"topic\":");
    write_str(out, msg.topic);
    out.extend_from_slice(b",\"event\":");
    write_str(out, msg.event);
    out.extend_from_slice(b",\"payload\":");
    write_json_body(out, msg.body);
    out.extend_from_slice(b",\"ref\":");
    write_ref(out, msg.msg_ref);
    out.push(b'}');
    frame.finish(FrameKind::Text)
}

fn len_u8(s: &str) -> Result<u8, EncodeError> {
    u8::try_from(s.len()).map_err(|_| EncodeError::FieldTooLong)
}

fn encode_binary(msg: &Outgoing<'_>, data: &Bytes) -> Result<Bytes, EncodeError> {
    let join_ref = msg.join_ref.map(Ref::text).unwrap_or_default();
    let msg_ref = msg.msg_ref.map(Ref::text).unwrap_or_default();
    let (join_ref, msg_ref) = (&*join_ref, &*msg_ref);
    let mut frame = FrameBuilder::with_capacity(8 + data.len() + size_hint(msg));
    let out = frame.payload();
    match msg.body {
        Body::Reply(status, _) => {
            out.extend_from_slice(&[
                1,
                len_u8(join_ref)?,
                len_u8(msg_ref)?,
                len_u8(msg.topic)?,
                len_u8(status)?,
            ]);
            for field in [join_ref, msg_ref, msg.topic, status] {
                out.extend_from_slice(field.as_bytes());
            }
        }
        Body::RawJson(_) => unreachable!("JSON text takes the text path"),
        Body::Payload(_) if msg.join_ref.is_some() => {
            out.extend_from_slice(&[0, len_u8(join_ref)?, len_u8(msg.topic)?, len_u8(msg.event)?]);
            for field in [join_ref, msg.topic, msg.event] {
                out.extend_from_slice(field.as_bytes());
            }
        }
        Body::Payload(_) => {
            out.extend_from_slice(&[2, len_u8(msg.topic)?, len_u8(msg.event)?]);
            for field in [msg.topic, msg.event] {
                out.extend_from_slice(field.as_bytes());
            }
        }
    }
    out.extend_from_slice(data);
    Ok(frame.finish(FrameKind::Binary))
}

/// Longest topic a client message may name, in bytes (`seed-app.md`, "Limits"): a topic
/// is copied into the topic table, every core's interest table and a Redis channel name.
pub const MAX_TOPIC: usize = 255;
/// Longest event, ref or join_ref a client message may carry, in bytes.
pub const MAX_NAME: usize = 64;

/// Refuses a decoded message whose topic, event or refs are over their limits.
fn within_limits(msg: Message) -> Result<Message, ProtocolError> {
    let long_ref = |r: &Option<Ref>| r.as_ref().is_some_and(|r| r.text().len() > MAX_NAME);
    let why = if msg.topic.len() > MAX_TOPIC {
        "topic longer than 255 bytes"
    } else if msg.event.len() > MAX_NAME {
        "event longer than 64 bytes"
    } else if long_ref(&msg.msg_ref) {
        "ref longer than 64 bytes"
    } else if long_ref(&msg.join_ref) {
        "join_ref longer than 64 bytes"
    } else {
        return Ok(msg);
    };
    Err(ProtocolError::BadMessage(why.into()))
}

/// Decodes a client text frame. `data` is parsed in place by simd-json. A topic over
/// [`MAX_TOPIC`] bytes, or an event, ref or join_ref over [`MAX_NAME`], is an error.
///
/// ```
/// use ringcast::proto::{serializer::decode_text, Vsn};
/// let mut frame = br#"["1","2","rooms:a","ping",{"n":1}]"#.to_vec();
/// let msg = decode_text(Vsn::V2, &mut frame).unwrap();
/// assert_eq!((msg.join_ref, msg.msg_ref), (Some("1".into()), Some("2".into())));
/// assert_eq!((msg.topic.as_str(), msg.event.as_str()), ("rooms:a", "ping"));
/// ```
pub fn decode_text(vsn: Vsn, data: &mut [u8]) -> Result<Message, ProtocolError> {
    let bad = |e: simd_json::Error| ProtocolError::BadMessage(e.to_string());
    let msg = match vsn {
        Vsn::V2 => simd_json::serde::from_slice::<V2Frame>(data)
            .map(|f| f.0)
            .map_err(bad)?,
        Vsn::V1 => {
            let f: V1Frame = simd_json::serde::from_slice(data).map_err(bad)?;
            Message {
                join_ref: f.join_ref,
                msg_ref: f.msg_ref,
                topic: f.topic,
                event: f.event,
                payload: Payload::Json(f.payload),
            }
        }
    };
    within_limits(msg)
}

/// Decodes a client binary frame (V2 kind 0, push). Binary frames on V1 are malformed;
/// the limits of [`decode_text`] hold.
pub fn decode_binary(vsn: Vsn, data: &[u8]) -> Result<Message, ProtocolError> {
    let bad = |why: &str| ProtocolError::BadMessage(why.to_string());
    if vsn == Vsn::V1 {
        return Err(bad("binary frame on a V1 connection"));
    }
    let [kind, lens @ ..] = data
        .get(..5)
        .ok_or_else(|| bad("binary frame shorter than its header"))?
    else {
        unreachable!("slice of five")
    };
    if *kind != 0 {
        return Err(bad("unknown binary frame kind"));
    }
    let mut at = 5;
    let mut fields = [""; 4];
    for (field, &len) in fields.iter_mut().zip(lens) {
        let end = at + len as usize;
        let bytes = data
            .get(at..end)
            .ok_or_else(|| bad("binary header announces more bytes than the frame holds"))?;
        *field = std::str::from_utf8(bytes).map_err(|_| bad("binary frame field is not UTF-8"))?;
        at = end;
    }
    let [join_ref, msg_ref, topic, event] = fields;
    let opt = |s: &str| (!s.is_empty()).then(|| Ref::from(s));
    within_limits(Message {
        join_ref: opt(join_ref),
        msg_ref: opt(msg_ref),
        topic: topic.to_string(),
        event: event.to_string(),
        payload: Payload::Binary(Bytes::copy_from_slice(&data[at..])),
    })
}

/// `[join_ref, ref, topic, event, payload, ...ignored]`.
struct V2Frame(Message);

impl<'de> Deserialize<'de> for V2Frame {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = V2Frame;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("[join_ref, ref, topic, event, payload]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<V2Frame, A::Error> {
                let short = || de::Error::custom("fewer than five elements");
                let join_ref: Option<Ref> = seq.next_element()?.ok_or_else(short)?;
                let msg_ref: Option<Ref> = seq.next_element()?.ok_or_else(short)?;
                let topic: String = seq.next_element()?.ok_or_else(short)?;
                let event: String = seq.next_element()?.ok_or_else(short)?;
                let payload: Value = seq.next_element()?.ok_or_else(short)?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(V2Frame(Message {
                    join_ref,
                    msg_ref,
                    topic,
                    event,
                    payload: Payload::Json(payload),
                }))
            }
        }
        d.deserialize_seq(V)
    }
}

fn required_nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ref>, D::Error> {
    Option::<Ref>::deserialize(d)
}

/// `{"topic", "event", "payload", "ref", "join_ref"?}`; `ref` must be present (may be null).
#[derive(Deserialize)]
struct V1Frame {
    topic: String,
    event: String,
    payload: Value,
    #[serde(rename = "ref", deserialize_with = "required_nullable")]
    msg_ref: Option<Ref>,
    #[serde(default)]
    join_ref: Option<Ref>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(s: &str) -> Ref {
        Ref::from(s)
    }

    /// The ok reply to `m` with `response`, as the server would send it.
    fn ok_reply(vsn: Vsn, m: &Message, response: &Payload) -> Bytes {
        let out = Outgoing::reply(m.join_ref.as_ref(), m.msg_ref.as_ref(), &m.topic, "ok", response);
        encode(vsn, &out).unwrap()
    }

    fn frame_body(frame: &Bytes) -> &[u8] {
        crate::proto::ws::split_frame(frame).expect("a whole frame").1
    }

    #[test]
    fn v2_text_round_trip() {
        let payload = Payload::from(json!({"body": "héllo \"q\"", "n": [1, 2]}));
        let one = r("1");
        let out = Outgoing::push(Some(&one), "rooms:a", "new_msg", &payload);
        let frame = encode(Vsn::V2, &out).unwrap();
        assert_eq!(frame[0], 0x81);
        let mut body = frame_body(&frame).to_vec();
        let msg = decode_text(Vsn::V2, &mut body).unwrap();
        assert_eq!(msg.join_ref, Some(r("1")));
        assert_eq!(msg.msg_ref, None);
        assert_eq!(msg.topic, "rooms:a");
        assert_eq!(msg.payload, payload);
    }

    #[test]
    fn v2_reply_shape() {
        let resp = Payload::from(json!({"n": 1}));
        let frame = encode(
            Vsn::V2,
            &Outgoing::reply(Some(&r("1")), Some(&r("4")), "rooms:a", "ok", &resp),
        )
        .unwrap();
        assert_eq!(
            frame_body(&frame),
            br#"["1","4","rooms:a","phx_reply",{"status":"ok","response":{"n":1}}]"#
        );
    }

    #[test]
    fn v1_never_emits_join_ref() {
        let p = Payload::empty();
        let one = r("1");
        let frame = encode(Vsn::V1, &Outgoing::reply(Some(&one), Some(&one), "t", "ok", &p)).unwrap();
        assert_eq!(
            frame_body(&frame),
            br#"{"topic":"t","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"1"}"#
        );
        let mut body = frame_body(&frame).to_vec();
        let msg = decode_text(Vsn::V1, &mut body).unwrap();
        assert_eq!((msg.join_ref, msg.msg_ref), (None, Some(one)));
    }

    #[test]
    fn v1_decode_with_join_ref_and_null_ref() {
        let mut f = br#"{"topic":"a","event":"e","payload":[1],"ref":null,"join_ref":"3"}"#.to_vec();
        let m = decode_text(Vsn::V1, &mut f).unwrap();
        assert_eq!((m.join_ref, m.msg_ref), (Some(r("3")), None));
        assert_eq!(m.payload, Payload::from(json!([1])));
    }

    #[test]
    fn number_refs_round_trip_as_numbers() {
        let mut f = br#"[1,2,"rooms:p3","phx_join",{}]"#.to_vec();
        let m = decode_text(Vsn::V2, &mut f).unwrap();
        assert_eq!(
            (m.join_ref.clone(), m.msg_ref.clone()),
            (Some(Ref::from(1i64)), Some(Ref::from(2i64)))
        );
        assert!(m.msg_ref.as_ref().unwrap().is_number());
        let reply = ok_reply(Vsn::V2, &m, &Payload::empty());
        assert_eq!(
            frame_body(&reply),
            br#"[1,2,"rooms:p3","phx_reply",{"status":"ok","response":{}}]"#
        );

        let mut f = br#"{"event":"heartbeat","topic":"phoenix","ref":0,"payload":{}}"#.to_vec();
        let m = decode_text(Vsn::V1, &mut f).unwrap();
        assert_eq!(
            (m.join_ref.clone(), m.msg_ref.clone()),
            (None, Some(Ref::from(0i64)))
        );
        let reply = encode(
            Vsn::V1,
            &Outgoing::reply(None, m.msg_ref.as_ref(), "phoenix", "ok", &Payload::empty()),
        )
        .unwrap();
        assert_eq!(
            frame_body(&reply),
            br#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":0}"#
        );

        let mut f = br#"[-7,18446744073709551615,"t","e",{}]"#.to_vec();
        let m = decode_text(Vsn::V2, &mut f).unwrap();
        assert_eq!(m.join_ref.unwrap().json(), "-7");
        assert_eq!(m.msg_ref.unwrap().json(), "18446744073709551615");
    }

    #[test]
    fn string_refs_keep_their_value_through_escapes() {
        let mut f = br#"["\u0031","a\"b","t","e",{}]"#.to_vec();
        let m = decode_text(Vsn::V2, &mut f).unwrap();
        assert_eq!(m.join_ref, Some(r("1")));
        assert_ne!(m.join_ref, Some(Ref::from(1i64)));
        let msg_ref = m.msg_ref.unwrap();
        assert_eq!(msg_ref.json(), r#""a\"b""#);
        assert_eq!(msg_ref.text(), "a\"b");
    }

    #[test]
    fn number_refs_in_binary_frames_are_their_digits() {
        let data = Payload::Binary(Bytes::from_static(&[9]));
        let push = encode(Vsn::V2, &Outgoing::push(Some(&Ref::from(12i64)), "t", "e", &data)).unwrap();
        assert_eq!(frame_body(&push), &[0, 2, 1, 1, b'1', b'2', b't', b'e', 9]);
        let reply = encode(
            Vsn::V2,
            &Outgoing::reply(Some(&Ref::null()), Some(&Ref::from(3i64)), "t", "ok", &data),
        )
        .unwrap();
        assert_eq!(frame_body(&reply), &[1, 0, 1, 1, 2, b'3', b't', b'o', b'k', 9]);
    }

    #[test]
    fn topics_events_and_refs_over_their_limits_are_refused() {
        let frame = |topic: &str, event: &str, r: &str, jr: &str| {
            serde_json::to_vec(&json!([jr, r, topic, event, {}])).unwrap()
        };
        let (t255, t256) = ("t".repeat(255), "t".repeat(256));
        let (n64, n65) = ("n".repeat(64), "n".repeat(65));
        let ok = |mut f: Vec<u8>| decode_text(Vsn::V2, &mut f).is_ok();
        assert!(ok(frame(&t255, &n64, &n64, &n64)), "at the limits");
        for (f, what) in [
            (frame(&t256, "e", "1", "1"), "topic longer than 255 bytes"),
            (frame("t", &n65, "1", "1"), "event longer than 64 bytes"),
            (frame("t", "e", &n65, "1"), "ref longer than 64 bytes"),
            (frame("t", "e", "1", &n65), "join_ref longer than 64 bytes"),
        ] {
            let mut f = f;
            assert_eq!(
                decode_text(Vsn::V2, &mut f),
                Err(ProtocolError::BadMessage(what.into()))
            );
        }
        let mut v1 =
            serde_json::to_vec(&json!({"topic": t256, "event": "e", "payload": {}, "ref": null})).unwrap();
        assert!(decode_text(Vsn::V1, &mut v1).is_err());
        // Number refs count by their digits; a huge one is still 20 at most.
        let mut num = br#"[18446744073709551615,1,"t","e",{}]"#.to_vec();
        assert!(decode_text(Vsn::V2, &mut num).is_ok());
        // Binary frames: the event's length byte may say up to 255.
        let mut bin = vec![0, 1, 1, 1, 65, b'1', b'2', b't'];
        bin.extend_from_slice(n65.as_bytes());
        assert_eq!(
            decode_binary(Vsn::V2, &bin),
            Err(ProtocolError::BadMessage("event longer than 64 bytes".into()))
        );
    }

    #[test]
    fn v2_ignores_extra_elements() {
        let mut f = br#"[null,"1","phoenix","heartbeat",{},"extra",7]"#.to_vec();
        let m = decode_text(Vsn::V2, &mut f).unwrap();
        assert_eq!((m.topic.as_str(), m.event.as_str()), ("phoenix", "heartbeat"));
    }

    #[test]
    fn malformed_text_frames() {
        let v2_bad: &[&[u8]] = &[
            b"not json",
            b"{}",
            b"[]",
            br#"["1","1","t"]"#,
            br#"["1","1","t","e"]"#,
            br#"["1","1",5,"e",{}]"#,
            br#"["1","1","t",null,{}]"#,
            br#"[{"r":1},"1","t","e",{}]"#,
            br#"["1",[1],"t","e",{}]"#,
            br#"["1",1.5,"t","e",{}]"#,
            br#"["1",true,"t","e",{}]"#,
            br#"["1","1","t","e",{}"#,
            b"",
        ];
        for bad in v2_bad {
            let mut f = bad.to_vec();
            assert!(
                decode_text(Vsn::V2, &mut f).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let v1_bad: &[&[u8]] = &[
            br#"["1","1","t","e",{}]"#,
            br#"{"topic":"t","event":"e","payload":{}}"#,
            br#"{"topic":"t","event":"e","ref":"1"}"#,
            br#"{"topic":1,"event":"e","payload":{},"ref":"1"}"#,
            br#"{"topic":"t","event":"e","payload":{},"ref":{"n":0}}"#,
            br#"{"topic":"t","event":"e","payload":{},"ref":2.0}"#,
            br#"{"topic":"t","event":"e","payload":{},"ref":"1","join_ref":[1]}"#,
        ];
        for bad in v1_bad {
            let mut f = bad.to_vec();
            assert!(
                decode_text(Vsn::V1, &mut f).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn binary_worked_example_from_the_protocol() {
        let client = [
            0, 1, 1, 7, 4, b'1', b'5', b'r', b'o', b'o', b'm', b's', b':', b'a', b'p', b'i', b'n', b'g', 1, 2,
        ];
        let m = decode_binary(Vsn::V2, &client).unwrap();
        assert_eq!(
            (m.join_ref.clone(), m.msg_ref.clone()),
            (Some(r("1")), Some(r("5")))
        );
        assert_eq!((m.topic.as_str(), m.event.as_str()), ("rooms:a", "ping"));
        let reply = ok_reply(Vsn::V2, &m, &m.payload);
        assert_eq!(reply[0], 0x82);
        assert_eq!(
            frame_body(&reply),
            &[1, 1, 1, 7, 2, b'1', b'5', b'r', b'o', b'o', b'm', b's', b':', b'a', b'o', b'k', 1, 2]
        );
    }

    #[test]
    fn binary_push_and_broadcast_headers() {
        let data = Payload::Binary(Bytes::from_static(&[9]));
        let push = encode(Vsn::V2, &Outgoing::push(Some(&r("2")), "t", "e", &data)).unwrap();
        assert_eq!(frame_body(&push), &[0, 1, 1, 1, b'2', b't', b'e', 9]);
        let bcast = encode(Vsn::V2, &Outgoing::broadcast("t", "e", &data)).unwrap();
        assert_eq!(frame_body(&bcast), &[2, 1, 1, b't', b'e', 9]);
        assert_eq!(
            encode(Vsn::V1, &Outgoing::broadcast("t", "e", &data)),
            Err(EncodeError::BinaryOnV1)
        );
        let long = "x".repeat(256);
        assert_eq!(
            encode(Vsn::V2, &Outgoing::broadcast(&long, "e", &data)),
            Err(EncodeError::FieldTooLong)
        );
    }

    #[test]
    fn malformed_binary_frames() {
        let cases: &[&[u8]] = &[
            &[],
            &[0, 1, 1],
            &[1, 0, 0, 0, 0],
            &[0, 1, 1, 7, 4, b'1'],
            &[0, 0, 0, 1, 1, 0xff, b'e'],
        ];
        for bad in cases {
            assert!(decode_binary(Vsn::V2, bad).is_err(), "{bad:?}");
        }
        assert!(decode_binary(Vsn::V1, &[0, 0, 0, 1, 1, b't', b'e']).is_err());
    }
}
