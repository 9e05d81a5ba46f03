//! `permessage-deflate` (RFC 7692), sans-IO: the extension's negotiation, and the
//! codec for whole messages.
//!
//! The server always resets its compressor between messages
//! (`server_no_context_takeover`). Each outbound message is then compressed on its own,
//! so one compressed frame serves every subscriber of a broadcast: compression costs
//! once per broadcast, not once per delivery. By default the server asks the client to
//! reset too (`client_no_context_takeover`, which RFC 7692 §7.1.1.2 lets a server add to
//! any accepted offer): an inflater then lives only while a compressed message is read,
//! and a connection keeps no compression state between messages.
//!
//! The compressor and the inflater are per thread (one per core), reused for every
//! message; a connection that negotiated compression costs nothing more at rest. Only
//! [`InboundContext::Keep`] gives a connection an inflater of its own, from its first
//! compressed message on.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::{finish_frame, split_frame, HEADER_ROOM};
use crate::proto::error::ProtocolError;

/// The extension's token in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The four bytes a sync flush ends with, which a sender strips from every message and
/// a receiver appends (RFC 7692 §7.2.1).
const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Level for a broadcast: compressed once for all its subscribers, so worth zlib's
/// default effort.
pub const BROADCAST_LEVEL: u32 = 6;
/// Level for a frame compressed for one connection (`presence_state`, large pushes):
/// fast, since it is paid per connection on the core.
pub const OWN_LEVEL: u32 = 1;

/// What the server asks of the client's compressor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundContext {
    /// Ask for `client_no_context_takeover`: every client message inflates on its own,
    /// with the core's shared inflater. The default.
    #[default]
    Reset,
    /// Accept the client's context takeover (what browsers do unless asked): the
    /// connection keeps an inflater, about 40 KiB, from its first compressed message on,
    /// and does not park while it holds one.
    Keep,
}

/// An accepted offer: what the connection's frames use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The client resets its compressor between messages.
    pub client_resets: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the upgrade answer.
    pub fn response(&self) -> &'static str {
        if self.client_resets {
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        } else {
            "permessage-deflate; server_no_context_takeover"
        }
    }
}

/// Picks the first `permessage-deflate` offer the server can accept from the values of
/// every `Sec-WebSocket-Extensions` header, or `None` (decline: no compression).
///
/// An offer is declined when a parameter is unknown, repeated or has a bad value, and
/// when it limits the server's window below 15 bits: broadcasts are compressed once with
/// the full window, for every subscriber alike.
///
/// ```
/// use ringcast::proto::ws::deflate::{negotiate, InboundContext};
/// let chrome = ["permessage-deflate; client_max_window_bits"];
/// let agreed = negotiate(chrome, InboundContext::Reset).unwrap();
/// assert_eq!(
///     agreed.response(),
///     "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
/// );
/// assert!(negotiate(["permessage-deflate; server_max_window_bits=10"], InboundContext::Reset).is_none());
/// assert!(negotiate(["x-webkit-deflate-frame"], InboundContext::Reset).is_none());
/// ```
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>, inbound: InboundContext) -> Option<Agreed> {
    headers
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(|offer| accept(offer, inbound))
}

/// One offer (`name; param; param=value`), accepted or not.
fn accept(offer: &str, inbound: InboundContext) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut seen = [false; 4];
    let mut client_offers_reset = false;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let slot = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => {
                client_offers_reset = true;
                1
            }
            // The server compresses with 15 bits for everyone: a smaller limit declines.
            "server_max_window_bits" if value.and_then(window_bits) == Some(15) => 2,
            // Any window the client uses is within the inflater's 15 bits.
            "client_max_window_bits" if value.is_none_or(|v| window_bits(v).is_some()) => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
    }
    Some(Agreed {
        client_resets: client_offers_reset || inbound == InboundContext::Reset,
    })
}

/// A window size parameter: 8 to 15, in plain digits.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    /// The core's compressors, by level, reset for every message.
    static DEFLATERS: RefCell<Vec<(u32, Compress)>> = const { RefCell::new(Vec::new()) };
    /// The core's inflater for messages of clients that reset their context.
    static INFLATER: RefCell<Option<Inflater>> = const { RefCell::new(None) };
}

/// Compresses a finished, unfragmented server data frame (text or binary, FIN set) into
/// the same message as a compressed frame (RSV1 set), with the core's compressor at
/// `level`. `None` when `frame` is not such a frame or compression would not make it
/// smaller: send it as it is.
///
/// ```
/// use ringcast::proto::ws::deflate::{compress_frame, inflate_message, BROADCAST_LEVEL};
/// use ringcast::proto::ws::{split_frame, FrameBuilder, FrameKind};
/// let json = br#"{"body":"hello hello hello hello hello hello hello hello"}"#;
/// let mut f = FrameBuilder::with_capacity(json.len());
/// f.payload().extend_from_slice(json);
/// let plain = f.finish(FrameKind::Text);
/// let packed = compress_frame(&plain, BROADCAST_LEVEL).unwrap();
/// assert_eq!(packed[0], 0xC1, "FIN, RSV1, text");
/// let (_, deflated) = split_frame(&packed).unwrap();
/// assert!(deflated.len() < json.len());
/// assert_eq!(inflate_message(deflated, 1024).unwrap(), json);
/// ```
pub fn compress_frame(frame: &[u8], level: u32) -> Option<Bytes> {
    let first = *frame.first()?;
    if first != 0x81 && first != 0x82 {
        return None;
    }
    let (_, payload) = split_frame(frame)?;
    let mut buf = Vec::with_capacity(HEADER_ROOM + payload.len() / 2 + 64);
    buf.resize(HEADER_ROOM, 0);
    DEFLATERS.with(|d| {
        let mut d = d.borrow_mut();
        let at = match d.iter().position(|(l, _)| *l == level) {
            Some(at) => at,
            None => {
                d.push((level, Compress::new(Compression::new(level.min(9)), false)));
                d.len() - 1
            }
        };
        deflate(&mut d[at].1, payload, &mut buf);
    });
    if buf.len() - HEADER_ROOM >= payload.len() {
        return None;
    }
    Some(finish_frame(buf, first | 0x40))
}

/// Deflates `input` as one message into `out` (appended), without the sync trailer.
fn deflate(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) {
    c.reset();
    let base = c.total_in();
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let used = (c.total_in() - base) as usize;
        c.compress_vec(&input[used..], out, FlushCompress::Sync)
            .expect("deflating bytes in memory cannot fail");
        let used = (c.total_in() - base) as usize;
        // A sync flush is complete once all input is in and output room is left over.
        if used == input.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&TRAILER) {
        out.truncate(out.len() - TRAILER.len());
    }
}

/// Inflates one message from a client that resets its context, with the core's shared
/// inflater; more than `limit` bytes inflated is [`ProtocolError::TooBig`] (1009), at
/// once, without inflating the rest.
pub fn inflate_message(input: &[u8], limit: usize) -> Result<Vec<u8>, ProtocolError> {
    INFLATER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let inflater = cell.get_or_insert_with(Inflater::new);
        inflater.reset();
        let mut out = Vec::new();
        let r = inflater.inflate(input, limit, &mut out);
        // The next message starts afresh whatever happened to this one.
        inflater.reset();
        r.map(|()| out)
    })
}

/// An inflater: the core's, or a connection's own when its client keeps its context.
pub struct Inflater {
    d: Decompress,
    /// The client's stream ended with a final block: the next message starts a new one.
    ended: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").field("ended", &self.ended).finish()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    /// A raw-deflate inflater with the full 15-bit window.
    pub fn new() -> Self {
        Inflater {
            d: Decompress::new(false),
            ended: false,
        }
    }

    fn reset(&mut self) {
        self.d.reset(false);
        self.ended = false;
    }

    /// Inflates one message (its frames' payloads joined) and appends it to `out`,
    /// keeping the window for the next message. Past `limit` bytes of output it stops
    /// with [`ProtocolError::TooBig`]; corrupt data is [`ProtocolError::BadFrame`].
    pub fn inflate(&mut self, input: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        if self.ended {
            self.reset();
        }
        for part in [input, &TRAILER[..]] {
            let base = self.d.total_in();
            loop {
                if out.len() == out.capacity() {
                    if out.len() > limit {
                        return Err(ProtocolError::TooBig);
                    }
                    let grow = out.len().max(1024).min(limit + 1 - out.len());
                    out.reserve_exact(grow);
                }
                let before = (self.d.total_in(), self.d.total_out());
                let used = (before.0 - base) as usize;
                let status = self
                    .d
                    .decompress_vec(&part[used..], out, FlushDecompress::Sync)
                    .map_err(|_| ProtocolError::BadFrame("corrupt compressed message"))?;
                if out.len() > limit {
                    return Err(ProtocolError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block: nothing after it belongs to this stream.
                    self.ended = true;
                    return Ok(());
                }
                let used = (self.d.total_in() - base) as usize;
                let stalled = before == (self.d.total_in(), self.d.total_out());
                if (used == part.len() && out.len() < out.capacity())
                    || (stalled && out.len() < out.capacity())
                {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ws::{FrameBuilder, FrameKind};

    fn text_frame(payload: &[u8]) -> Bytes {
        let mut f = FrameBuilder::with_capacity(payload.len());
        f.payload().extend_from_slice(payload);
        f.finish(FrameKind::Text)
    }

    /// Raw deflate of `input` with its own compressor, as a client does.
    fn client_deflate(c: &mut Compress, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 64);
        let base = c.total_in();
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity());
            }
            let used = (c.total_in() - base) as usize;
            c.compress_vec(&input[used..], &mut out, FlushCompress::Sync)
                .unwrap();
            if (c.total_in() - base) as usize == input.len() && out.len() < out.capacity() {
                break;
            }
        }
        assert!(out.ends_with(&TRAILER));
        out.truncate(out.len() - 4);
        out
    }

    #[test]
    fn negotiation_accepts_what_browsers_and_ws_offer_and_declines_the_rest() {
        let reset = InboundContext::Reset;
        let keep = InboundContext::Keep;
        for offer in [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "Permessage-Deflate; client_max_window_bits=10; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits=15",
            "permessage-deflate; client_max_window_bits=\"12\"",
        ] {
            let agreed = negotiate([offer], reset).unwrap_or_else(|| panic!("{offer}"));
            assert!(agreed.client_resets);
            assert!(!negotiate([offer], keep).unwrap().client_resets, "{offer}");
        }
        // A client that offers to reset is answered so in either mode.
        let offered = negotiate(["permessage-deflate; client_no_context_takeover"], keep).unwrap();
        assert!(offered.client_resets);
        for bad in [
            "permessage-deflate; server_max_window_bits=9",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=+9",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; mystery",
            "deflate-frame",
            "",
        ] {
            assert_eq!(negotiate([bad], reset), None, "{bad}");
        }
        // The first acceptable offer wins, across list items and header lines.
        let agreed = negotiate(
            [
                "foo, permessage-deflate; server_max_window_bits=10",
                "permessage-deflate; client_no_context_takeover",
            ],
            keep,
        );
        assert_eq!(agreed, Some(Agreed { client_resets: true }));
    }

    #[test]
    fn frames_compress_to_the_same_bytes_every_time_and_inflate_back() {
        let json = br#"{"user":"ada","body":"the quick brown fox jumps over the lazy dog"}"#.repeat(40);
        let plain = text_frame(&json);
        let a = compress_frame(&plain, BROADCAST_LEVEL).unwrap();
        let b = compress_frame(&plain, BROADCAST_LEVEL).unwrap();
        assert_eq!(a, b, "no context carries over between messages");
        assert!(a.len() * 5 < plain.len(), "{} of {}", a.len(), plain.len());
        let (op, deflated) = split_frame(&a).unwrap();
        assert_eq!(op, 0x1);
        assert_eq!(inflate_message(deflated, json.len()).unwrap(), json);
        // One byte short of the limit is too big.
        assert!(matches!(
            inflate_message(deflated, json.len() - 1),
            Err(ProtocolError::TooBig)
        ));
    }

    #[test]
    fn frames_that_do_not_shrink_and_control_frames_go_as_they_are() {
        assert_eq!(compress_frame(&text_frame(b"ab"), BROADCAST_LEVEL), None);
        let close = crate::proto::ws::close_frame(1000, "a reason a reason a reason a reason");
        assert_eq!(compress_frame(&close, BROADCAST_LEVEL), None);
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_limit_without_inflating_the_rest() {
        // 64 MiB of zeros deflate to about 64 KiB.
        let mut c = Compress::new(Compression::best(), false);
        let bomb = client_deflate(&mut c, &vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100 << 10, "{}", bomb.len());
        let mut inflater = Inflater::new();
        let mut out = Vec::new();
        let limit = 256 << 10;
        assert!(matches!(
            inflater.inflate(&bomb, limit, &mut out),
            Err(ProtocolError::TooBig)
        ));
        assert!(out.capacity() <= 2 * limit, "held {} bytes", out.capacity());
    }

    #[test]
    fn a_client_that_keeps_its_context_inflates_with_a_kept_inflater_only() {
        let mut client = Compress::new(Compression::default(), false);
        let msg = br#"{"event":"new_msg","body":"same words again and again"}"#;
        let first = client_deflate(&mut client, msg);
        let second = client_deflate(&mut client, msg);
        assert!(second.len() < first.len(), "the second refers back to the first");
        let mut kept = Inflater::new();
        for deflated in [&first, &second] {
            let mut out = Vec::new();
            kept.inflate(deflated, 1024, &mut out).unwrap();
            assert_eq!(out, msg);
        }
        // Without the context, the second message does not inflate to the message.
        assert!(inflate_message(&second, 1024).map_or(true, |m| m != msg));
    }

    #[test]
    fn corrupt_data_is_a_bad_frame() {
        assert!(matches!(
            inflate_message(&[0xff, 0xff, 0xff, 0xff, 0xff], 1024),
            Err(ProtocolError::BadFrame(_))
        ));
    }
}
