//! What ringcast nodes say to each other over Redis pub/sub, as bytes. Pure data: no
//! Redis, no threads.
//!
//! Every message starts with its kind and the sending node's id (so a node ignores its
//! own messages); the topic travels in the Redis channel name.

use bytes::Bytes;

use crate::proto::position::Position;
use crate::proto::presence::{Delta, Meta, Owner};
use crate::proto::Payload;

/// One message between nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    /// A broadcast to the topic of the channel it came on.
    Broadcast {
        /// Sending node.
        node: u32,
        /// Event.
        event: String,
        /// Payload.
        payload: Payload,
    },
    /// A presence delta of the sending node's own entries.
    Presence {
        /// Sending node.
        node: u32,
        /// The change.
        delta: Delta,
    },
    /// The sending node's complete presence on the topic: replaces what others hold.
    PresenceState {
        /// Sending node.
        node: u32,
        /// All of its entries on the topic.
        entries: Vec<(Box<str>, Meta)>,
    },
    /// Asks every node to send its `PresenceState` for the topic.
    SyncRequest {
        /// Sending node.
        node: u32,
    },
    /// A broadcast on a topic with history, as Redis sequenced it (the history
    /// script publishes it, to every node the sender's included, and keeps it).
    Sequenced {
        /// Sending node.
        node: u32,
        /// Its position, assigned by Redis.
        position: Position,
        /// `broadcast_from` on the sending node: the (core, connection key, generation)
        /// not to deliver to.
        from: Option<(u32, u32, u32)>,
        /// Event.
        event: String,
        /// Payload.
        payload: Payload,
    },
    /// "I am alive".
    Heartbeat {
        /// Sending node.
        node: u32,
        /// Its name.
        name: String,
    },
}

/// FNV-1a of a node name: the node's id in presence owners ([`Owner::node`]).
///
/// ```
/// use ringcast::cluster::envelope::node_id;
/// assert_ne!(node_id("a"), node_id("b"));
/// assert_ne!(node_id("a"), 0);
/// ```
pub fn node_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

type MetaRow = (Box<str>, Box<str>, Owner, Box<str>);
type LeaveRow = (Box<str>, Box<str>);

fn meta_rows(entries: &[(Box<str>, Meta)]) -> Vec<MetaRow> {
    entries
        .iter()
        .map(|(k, m)| (k.clone(), m.phx_ref.clone(), m.owner, m.json.clone()))
        .collect()
}

fn from_rows(rows: Vec<MetaRow>) -> Vec<(Box<str>, Meta)> {
    rows.into_iter()
        .map(|(k, phx_ref, owner, json)| (k, Meta { phx_ref, owner, json }))
        .collect()
}

fn bad(why: &str) -> String {
    format!("bad cluster message: {why}")
}

/// A broadcast's event and payload as bytes: the event's length (u16), the event, the
/// payload's kind (0 JSON, 1 bytes) and the payload.
fn broadcast_body(event: &str, payload: &Payload) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&(event.len() as u16).to_be_bytes());
    body.extend_from_slice(event.as_bytes());
    match payload {
        Payload::Json(v) => {
            body.push(0);
            serde_json::to_writer(&mut body, v).expect("writing to a Vec cannot fail");
        }
        Payload::Binary(b) => {
            body.push(1);
            body.extend_from_slice(b);
        }
    }
    body
}

fn decode_broadcast_body(body: &[u8]) -> Result<(String, Payload), String> {
    let len = u16::from_be_bytes(
        body.get(..2)
            .ok_or_else(|| bad("no event"))?
            .try_into()
            .expect("two"),
    ) as usize;
    let event = body.get(2..2 + len).ok_or_else(|| bad("short event"))?;
    let event = std::str::from_utf8(event)
        .map_err(|_| bad("event not UTF-8"))?
        .to_string();
    let rest = &body[2 + len..];
    let payload = match rest.first() {
        Some(0) => Payload::Json(serde_json::from_slice(&rest[1..]).map_err(|e| bad(&e.to_string()))?),
        Some(1) => Payload::Binary(Bytes::copy_from_slice(&rest[1..])),
        _ => return Err(bad("payload kind")),
    };
    Ok((event, payload))
}

/// A [`Envelope::Sequenced`] but for its position, in two parts, for Redis to put the
/// position it assigns between them: the kind and node, then the rest of the header
/// line and the broadcast.
pub fn sequenced_parts(
    node: u32,
    from: Option<(u32, u32, u32)>,
    event: &str,
    payload: &Payload,
) -> (Vec<u8>, Vec<u8>) {
    let mut prefix = vec![6];
    prefix.extend_from_slice(&node.to_be_bytes());
    let mut suffix = match from {
        Some((core, key, gen)) => format!(" {core} {key} {gen}\n").into_bytes(),
        None => b" - - -\n".to_vec(),
    };
    suffix.extend_from_slice(&broadcast_body(event, payload));
    (prefix, suffix)
}

impl Envelope {
    /// The sending node.
    pub fn node(&self) -> u32 {
        match self {
            Envelope::Broadcast { node, .. }
            | Envelope::Presence { node, .. }
            | Envelope::PresenceState { node, .. }
            | Envelope::SyncRequest { node }
            | Envelope::Sequenced { node, .. }
            | Envelope::Heartbeat { node, .. } => *node,
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (u8, Vec<u8>) = match self {
            Envelope::Broadcast { event, payload, .. } => (1, broadcast_body(event, payload)),
            Envelope::Sequenced {
                node,
                position,
                from,
                event,
                payload,
            } => {
                let (mut out, suffix) = sequenced_parts(*node, *from, event, payload);
                out.extend_from_slice(position.to_string().as_bytes());
                out.extend_from_slice(&suffix);
                return out;
            }
            Envelope::Presence { delta, .. } => {
                let body =
                    serde_json::to_vec(&(meta_rows(&delta.joins), &delta.leaves)).expect("serializable");
                (2, body)
            }
            Envelope::PresenceState { entries, .. } => {
                (3, serde_json::to_vec(&meta_rows(entries)).expect("serializable"))
            }
            Envelope::SyncRequest { .. } => (4, Vec::new()),
            Envelope::Heartbeat { name, .. } => (5, name.as_bytes().to_vec()),
        };
        let mut out = Vec::with_capacity(5 + body.len());
        out.push(kind);
        out.extend_from_slice(&self.node().to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads an envelope.
    pub fn decode(data: &[u8]) -> Result<Envelope, String> {
        if data.len() < 5 {
            return Err(bad("too short"));
        }
        let node = u32::from_be_bytes(data[1..5].try_into().expect("four bytes"));
        let body = &data[5..];
        match data[0] {
            1 => {
                let (event, payload) = decode_broadcast_body(body)?;
                Ok(Envelope::Broadcast { node, event, payload })
            }
            2 => {
                let (joins, leaves): (Vec<MetaRow>, Vec<LeaveRow>) =
                    serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
                Ok(Envelope::Presence {
                    node,
                    delta: Delta {
                        joins: from_rows(joins),
                        leaves,
                    },
                })
            }
            3 => {
                let rows: Vec<MetaRow> = serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
                Ok(Envelope::PresenceState {
                    node,
                    entries: from_rows(rows),
                })
            }
            4 => Ok(Envelope::SyncRequest { node }),
            6 => {
                let nl = body
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or_else(|| bad("no header"))?;
                let header = std::str::from_utf8(&body[..nl]).map_err(|_| bad("header not UTF-8"))?;
                let mut fields = header.split(' ');
                let position = fields
                    .next()
                    .and_then(Position::parse)
                    .ok_or_else(|| bad("position"))?;
                let from: Vec<Option<u32>> = fields.map(|f| f.parse().ok()).collect();
                let from = match from[..] {
                    [Some(core), Some(key), Some(gen)] => Some((core, key, gen)),
                    _ => None,
                };
                let (event, payload) = decode_broadcast_body(&body[nl + 1..])?;
                Ok(Envelope::Sequenced {
                    node,
                    position,
                    from,
                    event,
                    payload,
                })
            }
            5 => Ok(Envelope::Heartbeat {
                node,
                name: String::from_utf8_lossy(body).into_owned(),
            }),
            _ => Err(bad("unknown kind")),
        }
    }
}

/// Whether `data` is an envelope `node` published itself, other than a sequenced
/// broadcast (which every node delivers as Redis ordered it, the sender's too): read
/// from its header alone, without checking its signature.
pub fn is_own_echo(data: &[u8], node: u32) -> bool {
    data.len() >= 5 && data[0] != 6 && data[1..5] == node.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips() {
        let meta = Meta::new(json!({"name": "ada"}), "r1".into(), None, Owner::new(7, 0, 3));
        let cases = vec![
            Envelope::Broadcast {
                node: 7,
                event: "new_msg".into(),
                payload: Payload::Json(json!({"body": "hi"})),
            },
            Envelope::Broadcast {
                node: 7,
                event: "bin".into(),
                payload: Payload::Binary(Bytes::from_static(&[0, 1, 255])),
            },
            Envelope::Presence {
                node: 7,
                delta: Delta {
                    joins: vec![("42".into(), meta.clone())],
                    leaves: vec![("41".into(), "r0".into())],
                },
            },
            Envelope::PresenceState {
                node: 7,
                entries: vec![("42".into(), meta)],
            },
            Envelope::SyncRequest { node: 9 },
            Envelope::Sequenced {
                node: 7,
                position: Position {
                    epoch: 0xabc,
                    offset: 12,
                },
                from: Some((1, 40, 3)),
                event: "new_msg".into(),
                payload: Payload::Json(json!({"body": "hi"})),
            },
            Envelope::Sequenced {
                node: 7,
                position: Position { epoch: 1, offset: 1 },
                from: None,
                event: "bin".into(),
                payload: Payload::Binary(Bytes::from_static(&[b'\n', 0])),
            },
            Envelope::Heartbeat {
                node: 9,
                name: "n1".into(),
            },
        ];
        for e in cases {
            assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        }
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            &[1, 0, 0, 0, 1],
            &[9, 0, 0, 0, 1],
            &[1, 0, 0, 0, 1, 0, 9, b'x'],
            &[2, 0, 0, 0, 1, b'{'],
        ] {
            assert!(Envelope::decode(bad).is_err(), "{bad:?}");
        }
    }
}

/// Length of the tag every message between nodes ends with.
pub const TAG_LEN: usize = 32;

/// Signs and checks messages between nodes: HMAC-SHA256 keyed by `--cluster-secret`,
/// over the Redis channel name and the message, so that whoever can `PUBLISH` to the
/// Redis but lacks the secret can neither make a message nor move one to another topic.
///
/// A sequenced broadcast is signed without its position, which Redis writes into it
/// (the position is what Redis assigns; the content is what the node vouches for).
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

/// A message that is not signed with the cluster's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message not signed with the cluster secret")]
pub struct Forged;

impl Signer {
    /// A signer keyed by `secret`.
    pub fn new(secret: &str) -> Signer {
        Signer {
            key: secret.as_bytes().to_vec(),
        }
    }

    fn tag(&self, channel: &str, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(channel.as_bytes());
        mac.update(&[0]);
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// `message` for `channel`, with its tag appended.
    pub fn seal(&self, channel: &str, mut message: Vec<u8>) -> Vec<u8> {
        let tag = self.tag(channel, &[&message]);
        message.extend_from_slice(&tag);
        message
    }

    /// The suffix of a sequenced broadcast ([`sequenced_parts`]) with the tag over the
    /// prefix and the suffix appended: Redis puts the position between them.
    pub fn seal_sequenced(&self, channel: &str, prefix: &[u8], mut suffix: Vec<u8>) -> Vec<u8> {
        let tag = self.tag(channel, &[prefix, &suffix]);
        suffix.extend_from_slice(&tag);
        suffix
    }

    /// The message without its tag, if the tag is right for `channel`.
    ///
    /// ```
    /// use ringcast::cluster::envelope::{Envelope, Signer};
    /// let s = Signer::new("cluster secret");
    /// let beat = Envelope::Heartbeat { node: 7, name: "a".into() }.encode();
    /// let sealed = s.seal("ringcast:nodes", beat.clone());
    /// assert_eq!(s.open("ringcast:nodes", &sealed).unwrap(), &beat[..]);
    /// assert!(s.open("ringcast:t:other", &sealed).is_err(), "bound to its channel");
    /// assert!(Signer::new("guess").open("ringcast:nodes", &sealed).is_err());
    /// assert!(s.open("ringcast:nodes", &beat).is_err(), "unsigned");
    /// ```
    pub fn open<'a>(&self, channel: &str, data: &'a [u8]) -> Result<&'a [u8], Forged> {
        use subtle::ConstantTimeEq;
        let split = data.len().checked_sub(TAG_LEN).ok_or(Forged)?;
        let (message, tag) = data.split_at(split);
        let expected = if message.first() == Some(&6) && message.len() > 5 {
            // Sequenced: the position (up to the first space after the header) is Redis's.
            let body = &message[5..];
            let space = body.iter().position(|&b| b == b' ').ok_or(Forged)?;
            self.tag(channel, &[&message[..5], &body[space..]])
        } else {
            self.tag(channel, &[message])
        };
        if bool::from(expected.ct_eq(tag)) {
            Ok(message)
        } else {
            Err(Forged)
        }
    }
}

#[cfg(test)]
mod signing {
    use super::*;

    #[test]
    fn a_sequenced_broadcast_is_checked_whatever_position_redis_writes_into_it() {
        let signer = Signer::new("k");
        let channel = "ringcast:t:rooms:a";
        let (prefix, suffix) =
            sequenced_parts(9, None, "new_msg", &Payload::Json(serde_json::json!({"b": 1})));
        let suffix = signer.seal_sequenced(channel, &prefix, suffix);
        for position in ["1a:1", "ff:123456"] {
            // What Redis publishes: prefix, position, suffix (with its tag).
            let mut wire = prefix.clone();
            wire.extend_from_slice(position.as_bytes());
            wire.extend_from_slice(&suffix);
            let opened = signer.open(channel, &wire).expect("signed");
            assert!(matches!(
                Envelope::decode(opened),
                Ok(Envelope::Sequenced { node: 9, .. })
            ));
        }
        // Its content cannot change, nor its channel.
        let mut wire = prefix.clone();
        wire.extend_from_slice(b"1:1");
        let mut tampered = suffix.clone();
        let i = tampered.len() - TAG_LEN - 2;
        tampered[i] ^= 1;
        wire.extend_from_slice(&tampered);
        assert_eq!(signer.open(channel, &wire), Err(Forged));
        let mut wire = prefix.clone();
        wire.extend_from_slice(b"1:1");
        wire.extend_from_slice(&suffix);
        assert_eq!(signer.open("ringcast:t:rooms:b", &wire), Err(Forged));
    }
}
