//! WebSocket framing, sans-IO: parses client frames out of caller-owned bytes and builds
//! finished server frames; [`client`] is the other role, for ringcast's own load clients.
//!
//! Header parsing is tungstenite's ([`FrameHeader::parse`]); this module adds what a
//! server needs around it: unmasking in place, fragment reassembly, control-frame rules,
//! the size limit and UTF-8 checks. It never touches a socket or a clock, and keeps no
//! buffer of its own between messages unless a message arrives in fragments.

pub mod client;
pub mod deflate;

use std::io::Cursor;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::error::ProtocolError;

/// Close codes ringcast sends (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away: server shutdown, `disconnect` broadcast, idle timeout.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error: a close frame with a code no endpoint may send.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Malformed frame or message.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client does not read; its outbound queue passed its bound.
    pub const POLICY: u16 = 1008;
    /// Inbound frame or message larger than `--max-frame`.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
}

/// One complete message or control frame read from the client.
#[derive(Debug)]
pub enum WsMessage<'b> {
    /// A text message; UTF-8 already checked.
    Text(MessageData<'b>),
    /// A binary message.
    Binary(MessageData<'b>),
    /// A ping with its payload (to be echoed in a pong).
    Ping(&'b [u8]),
    /// A pong (ignored by the server apart from counting as activity).
    Pong,
    /// A close frame with its code, if any.
    Close(Option<u16>),
}

/// Message bytes: borrowed from the read buffer when the message came in one frame,
/// owned when it was reassembled from fragments. Mutable because simd-json parses in
/// place.
#[derive(Debug)]
pub enum MessageData<'b> {
    /// Unmasked in place inside the caller's buffer.
    Borrowed(&'b mut [u8]),
    /// Reassembled from fragments.
    Owned(Vec<u8>),
}

impl MessageData<'_> {
    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            MessageData::Borrowed(b) => b,
            MessageData::Owned(v) => v.as_mut_slice(),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            MessageData::Borrowed(b) => b,
            MessageData::Owned(v) => v.as_slice(),
        }
    }
}

/// Outcome of one [`FrameReader::read`] call.
#[derive(Debug)]
pub enum Parsed<'b> {
    /// The buffer holds no complete frame yet; nothing was consumed.
    NeedMore,
    /// One frame was consumed (`consumed` bytes); it completed `message`, or it was a
    /// fragment that completes nothing yet (`None`).
    Frame {
        /// Bytes of the buffer this frame took.
        consumed: usize,
        /// The message the frame completed, if any.
        message: Option<WsMessage<'b>>,
    },
}

/// Per-connection reader state: the size limit, a fragment being reassembled, and
/// what `permessage-deflate` the connection negotiated.
#[derive(Debug)]
pub struct FrameReader {
    max_message: usize,
    fragment: Option<Box<Fragment>>,
    inflate: Inflate,
}

/// How a reader treats compressed messages (RSV1 on a message's first frame).
#[derive(Debug)]
enum Inflate {
    /// Not negotiated: RSV1 is a protocol error.
    Off,
    /// Each message on its own, with the core's inflater.
    PerMessage,
    /// The client keeps its context: the connection's own inflater, made at the first
    /// compressed message.
    Context(Option<Box<deflate::Inflater>>),
}

#[derive(Debug)]
struct Fragment {
    binary: bool,
    compressed: bool,
    data: Vec<u8>,
}

impl FrameReader {
    /// A reader that refuses frames and messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        FrameReader {
            max_message,
            fragment: None,
            inflate: Inflate::Off,
        }
    }

    /// A reader for a connection that negotiated `permessage-deflate`; `client_resets`
    /// as agreed ([`deflate::Agreed`]). Inflated messages are held to `max_message`
    /// too: past it, [`ProtocolError::TooBig`].
    pub fn with_deflate(max_message: usize, client_resets: bool) -> Self {
        FrameReader {
            inflate: if client_resets {
                Inflate::PerMessage
            } else {
                Inflate::Context(None)
            },
            ..FrameReader::new(max_message)
        }
    }

    /// No fragmented message is being reassembled, and no compression context is held:
    /// the reader can be dropped and made anew without losing anything.
    pub fn is_idle(&self) -> bool {
        self.fragment.is_none() && !matches!(self.inflate, Inflate::Context(Some(_)))
    }

    /// A complete message's data, inflated if it came compressed.
    fn message_data<'b>(
        &mut self,
        compressed: bool,
        data: MessageData<'b>,
    ) -> Result<MessageData<'b>, ProtocolError> {
        if !compressed {
            return Ok(data);
        }
        let input = data.as_slice();
        match &mut self.inflate {
            Inflate::Off => Err(ProtocolError::BadFrame("reserved bits set")),
            Inflate::PerMessage => deflate::inflate_message(input, self.max_message).map(MessageData::Owned),
            Inflate::Context(kept) => {
                let mut out = Vec::new();
                kept.get_or_insert_with(Box::default)
                    .inflate(input, self.max_message, &mut out)?;
                Ok(MessageData::Owned(out))
            }
        }
    }

    /// Parses at most one frame from the front of `buf`, unmasking it in place.
    ///
    /// ```
    /// use ringcast::proto::ws::{FrameReader, Parsed, WsMessage};
    /// // "hi" as a masked client text frame, mask 00 00 00 00.
    /// let mut buf = vec![0x81, 0x82, 0, 0, 0, 0, b'h', b'i'];
    /// let mut reader = FrameReader::new(1024);
    /// match reader.read(&mut buf).unwrap() {
    ///     Parsed::Frame { consumed: 8, message: Some(WsMessage::Text(t)) } => assert_eq!(t.as_slice(), b"hi"),
    ///     other => panic!("{other:?}"),
    /// }
    /// ```
    pub fn read<'b>(&mut self, buf: &'b mut [u8]) -> Result<Parsed<'b>, ProtocolError> {
        let mut cursor = Cursor::new(&*buf);
        let (header, length) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(Parsed::NeedMore),
            Err(_) => return Err(ProtocolError::BadFrame("unreadable frame header")),
        };
        let header_len = cursor.position() as usize;
        // RSV1 marks a compressed message, on its first frame only (RFC 7692 §6).
        let starts_data = matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        let deflate_ok = !matches!(self.inflate, Inflate::Off) && starts_data;
        if (header.rsv1 && !deflate_ok) || header.rsv2 || header.rsv3 {
            return Err(ProtocolError::BadFrame("reserved bits set"));
        }
        let Some(mask) = header.mask else {
            return Err(ProtocolError::BadFrame("client frame not masked"));
        };
        let buffered = self.fragment.as_ref().map_or(0, |f| f.data.len() as u64);
        if length.saturating_add(buffered) > self.max_message as u64 {
            return Err(ProtocolError::TooBig);
        }
        let length = length as usize;
        if buf.len() - header_len < length {
            return Ok(Parsed::NeedMore);
        }
        let consumed = header_len + length;
        let payload = &mut buf[header_len..consumed];
        unmask(payload, mask);

        let message = match header.opcode {
            OpCode::Control(control) => {
                if !header.is_final || length > 125 {
                    return Err(ProtocolError::BadFrame("bad control frame"));
                }
                match control {
                    Control::Ping => Some(WsMessage::Ping(payload)),
                    Control::Pong => Some(WsMessage::Pong),
                    Control::Close => Some(WsMessage::Close(parse_close(payload)?)),
                    Control::Reserved(_) => return Err(ProtocolError::BadFrame("reserved opcode")),
                }
            }
            OpCode::Data(Data::Reserved(_)) => return Err(ProtocolError::BadFrame("reserved opcode")),
            OpCode::Data(Data::Continue) => {
                let Some(fragment) = self.fragment.as_mut() else {
                    return Err(ProtocolError::BadFrame("continuation without a message"));
                };
                fragment.data.extend_from_slice(payload);
                if header.is_final {
                    let fragment = self.fragment.take().expect("checked above");
                    let data = self.message_data(fragment.compressed, MessageData::Owned(fragment.data))?;
                    Some(data_message(fragment.binary, data)?)
                } else {
                    None
                }
            }
            OpCode::Data(kind) => {
                if self.fragment.is_some() {
                    return Err(ProtocolError::BadFrame("new message inside a fragmented one"));
                }
                let binary = kind == Data::Binary;
                if header.is_final {
                    let data = self.message_data(header.rsv1, MessageData::Borrowed(payload))?;
                    Some(data_message(binary, data)?)
                } else {
                    self.fragment = Some(Box::new(Fragment {
                        binary,
                        compressed: header.rsv1,
                        data: payload.to_vec(),
                    }));
                    None
                }
            }
        };
        Ok(Parsed::Frame { consumed, message })
    }
}

fn data_message(binary: bool, data: MessageData<'_>) -> Result<WsMessage<'_>, ProtocolError> {
    if binary {
        Ok(WsMessage::Binary(data))
    } else if simdutf8_ok(data.as_slice()) {
        Ok(WsMessage::Text(data))
    } else {
        Err(ProtocolError::BadUtf8)
    }
}

fn simdutf8_ok(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, ProtocolError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::BadFrame("close frame with a one-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(ProtocolError::BadCloseCode(code));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(ProtocolError::BadUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// Whether a peer may send close `code` (RFC 6455 §7.4): the defined codes an endpoint
/// sends (1000-1003, 1007-1011, and 1012-1014 registered since), and the ranges for
/// libraries and applications (3000-4999). 1004-1006 and 1015 are reserved, never sent.
///
/// ```
/// use ringcast::proto::ws::close_code_allowed;
/// assert!(close_code_allowed(1000) && close_code_allowed(4000));
/// assert!(!close_code_allowed(1005) && !close_code_allowed(999) && !close_code_allowed(2000));
/// ```
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the 4-byte `mask`, eight bytes at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunk of 8")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let done = data.len() - data.len() % 8;
    for (i, byte) in data[done..].iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Room left in front of a frame under construction for the longest server header.
pub const HEADER_ROOM: usize = 10;

/// Opcode of a server data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Text frame (0x1).
    Text,
    /// Binary frame (0x2).
    Binary,
}

/// A server frame being built: payload is written after [`HEADER_ROOM`] spare bytes,
/// then [`FrameBuilder::finish`] writes the header in front, so the payload is never
/// moved.
#[derive(Debug)]
pub struct FrameBuilder {
    buf: Vec<u8>,
}

impl FrameBuilder {
    /// An empty frame with room for `payload_hint` bytes.
    pub fn with_capacity(payload_hint: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_ROOM + payload_hint);
        buf.resize(HEADER_ROOM, 0);
        FrameBuilder { buf }
    }

    /// The payload buffer; write the frame's payload here.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Writes the header and returns the finished frame, ready for the wire.
    pub fn finish(self, kind: FrameKind) -> Bytes {
        let opcode = match kind {
            FrameKind::Text => 0x81,
            FrameKind::Binary => 0x82,
        };
        finish_frame(self.buf, opcode)
    }
}

pub(crate) fn finish_frame(mut buf: Vec<u8>, first_byte: u8) -> Bytes {
    let len = buf.len() - HEADER_ROOM;
    let start = if len < 126 {
        buf[HEADER_ROOM - 1] = len as u8;
        HEADER_ROOM - 2
    } else if len <= u16::MAX as usize {
        buf[HEADER_ROOM - 3] = 126;
        buf[HEADER_ROOM - 2..HEADER_ROOM].copy_from_slice(&(len as u16).to_be_bytes());
        HEADER_ROOM - 4
    } else {
        buf[1] = 127;
        buf[2..HEADER_ROOM].copy_from_slice(&(len as u64).to_be_bytes());
        0
    };
    buf[start] = first_byte;
    Bytes::from(buf).slice(start..)
}

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// A finished (unmasked, unfragmented) server frame split into its opcode and payload:
/// how long-poll and the test kit read back the frames the shard queued. `None` if
/// `frame` is shorter than its header says.
///
/// ```
/// use ringcast::proto::ws::{opcode, split_frame, FrameBuilder, FrameKind};
/// let mut f = FrameBuilder::with_capacity(300);
/// f.payload().extend_from_slice(&[b'x'; 300]);
/// let frame = f.finish(FrameKind::Text);
/// assert_eq!(split_frame(&frame), Some((opcode::TEXT, &[b'x'; 300][..])));
/// assert_eq!(split_frame(&frame[..3]), None);
/// ```
pub fn split_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    let (first, len) = (*frame.first()?, *frame.get(1)? & 0x7f);
    let (start, len) = match len {
        126 => (
            4usize,
            u16::from_be_bytes(frame.get(2..4)?.try_into().ok()?) as usize,
        ),
        127 => (
            10,
            u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?) as usize,
        ),
        n => (2, n as usize),
    };
    Some((first & 0x0f, frame.get(start..start.checked_add(len)?)?))
}

/// A finished close frame with `code` and a short `reason`.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut buf = vec![0; HEADER_ROOM];
    buf.extend_from_slice(&code.to_be_bytes());
    buf.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    finish_frame(buf, 0x88)
}

/// A finished pong frame echoing `payload` (at most 125 bytes, as pings are).
pub fn pong_frame(payload: &[u8]) -> Bytes {
    let mut buf = vec![0; HEADER_ROOM];
    buf.extend_from_slice(&payload[..payload.len().min(125)]);
    finish_frame(buf, 0x8A)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a masked client frame whose first byte is `first` (FIN, RSV and opcode
    /// bits as given), with the client role's own framing.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        client::encode_client_frame(&mut out, first & 0x0f, payload, mask);
        out[0] = first;
        out
    }

    fn read_one(reader: &mut FrameReader, buf: &mut [u8]) -> Result<(usize, Option<String>), ProtocolError> {
        match reader.read(buf)? {
            Parsed::NeedMore => Ok((0, None)),
            Parsed::Frame { consumed, message } => Ok((
                consumed,
                message.map(|m| match m {
                    WsMessage::Text(t) => format!("text:{}", String::from_utf8_lossy(t.as_slice())),
                    WsMessage::Binary(b) => format!("binary:{:?}", b.as_slice()),
                    WsMessage::Ping(p) => format!("ping:{p:?}"),
                    WsMessage::Pong => "pong".into(),
                    WsMessage::Close(c) => format!("close:{c:?}"),
                }),
            )),
        }
    }

    #[test]
    fn text_frame_round_trip_with_every_length_format() {
        for len in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let text = "x".repeat(len);
            let mut frame = client_frame(0x81, text.as_bytes(), [1, 2, 3, 4]);
            let mut reader = FrameReader::new(1 << 20);
            let (consumed, msg) = read_one(&mut reader, &mut frame).unwrap();
            assert_eq!(consumed, frame.len());
            assert_eq!(msg.unwrap(), format!("text:{text}"));
        }
    }

    #[test]
    fn partial_frame_needs_more_and_consumes_nothing() {
        let frame = client_frame(0x81, b"hello world", [9, 8, 7, 6]);
        let mut reader = FrameReader::new(1024);
        for cut in 0..frame.len() {
            let mut part = frame[..cut].to_vec();
            assert!(
                matches!(reader.read(&mut part).unwrap(), Parsed::NeedMore),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn fragments_are_reassembled_and_controls_may_interleave() {
        let mut bytes = client_frame(0x01, b"hel", [1, 1, 1, 1]);
        bytes.extend(client_frame(0x89, b"p", [2, 2, 2, 2]));
        bytes.extend(client_frame(0x80, b"lo", [3, 3, 3, 3]));
        let mut reader = FrameReader::new(1024);
        let mut seen = vec![];
        let mut at = 0;
        while at < bytes.len() {
            let (consumed, msg) = read_one(&mut reader, &mut bytes[at..]).unwrap();
            at += consumed;
            seen.extend(msg);
        }
        assert_eq!(seen, vec!["ping:[112]".to_string(), "text:hello".to_string()]);
    }

    #[test]
    fn malformed_frames_are_refused() {
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            // Unmasked client frame.
            (
                vec![0x81, 0x02, b'h', b'i'],
                ProtocolError::BadFrame("client frame not masked"),
            ),
            // RSV1 set.
            (
                client_frame(0xC1, b"hi", [0; 4]),
                ProtocolError::BadFrame("reserved bits set"),
            ),
            // Reserved data opcode (tungstenite's header parser refuses it).
            (
                client_frame(0x83, b"hi", [0; 4]),
                ProtocolError::BadFrame("unreadable frame header"),
            ),
            // Reserved control opcode.
            (
                client_frame(0x8B, b"", [0; 4]),
                ProtocolError::BadFrame("unreadable frame header"),
            ),
            // Control frame over 125 bytes.
            (
                client_frame(0x89, &[0; 126], [0; 4]),
                ProtocolError::BadFrame("bad control frame"),
            ),
            // Fragmented control frame.
            (
                client_frame(0x09, b"", [0; 4]),
                ProtocolError::BadFrame("bad control frame"),
            ),
            // Continuation with nothing to continue.
            (
                client_frame(0x80, b"x", [0; 4]),
                ProtocolError::BadFrame("continuation without a message"),
            ),
            // Invalid UTF-8 in a text frame.
            (client_frame(0x81, &[0xff, 0xfe], [0; 4]), ProtocolError::BadUtf8),
            // Close frame with a one-byte payload.
            (
                client_frame(0x88, &[3], [0; 4]),
                ProtocolError::BadFrame("close frame with a one-byte payload"),
            ),
            // Close codes no endpoint may send (RFC 6455 §7.4).
            (
                client_frame(0x88, &1005u16.to_be_bytes(), [1, 2, 3, 4]),
                ProtocolError::BadCloseCode(1005),
            ),
            (
                client_frame(0x88, &1006u16.to_be_bytes(), [0; 4]),
                ProtocolError::BadCloseCode(1006),
            ),
            (
                client_frame(0x88, &999u16.to_be_bytes(), [0; 4]),
                ProtocolError::BadCloseCode(999),
            ),
            (
                client_frame(0x88, &2500u16.to_be_bytes(), [0; 4]),
                ProtocolError::BadCloseCode(2500),
            ),
            (
                client_frame(0x88, &5000u16.to_be_bytes(), [0; 4]),
                ProtocolError::BadCloseCode(5000),
            ),
        ];
        for code in [1000u16, 1001, 1003, 1011, 3000, 4999] {
            let mut frame = client_frame(0x88, &code.to_be_bytes(), [9, 8, 7, 6]);
            let parsed = FrameReader::new(1024).read(&mut frame).map(|p| match p {
                Parsed::Frame {
                    message: Some(WsMessage::Close(c)),
                    ..
                } => c,
                _ => None,
            });
            assert_eq!(parsed, Ok(Some(code)), "close code {code} is allowed");
        }
        for (mut frame, want) in cases {
            let mut reader = FrameReader::new(1024);
            assert_eq!(reader.read(&mut frame).unwrap_err(), want);
        }
    }

    #[test]
    fn new_message_inside_fragmented_one_is_refused() {
        let mut reader = FrameReader::new(1024);
        let mut first = client_frame(0x01, b"a", [0; 4]);
        read_one(&mut reader, &mut first).unwrap();
        let mut second = client_frame(0x81, b"b", [0; 4]);
        assert_eq!(
            reader.read(&mut second).unwrap_err(),
            ProtocolError::BadFrame("new message inside a fragmented one")
        );
    }

    #[test]
    fn size_limit_applies_to_headers_and_reassembled_messages() {
        let mut reader = FrameReader::new(100);
        // A header announcing a huge length is refused before the payload arrives.
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes()[..]);
        huge.extend_from_slice(&[0; 4]);
        assert!(matches!(
            reader.read(&mut huge),
            Err(ProtocolError::TooBig | ProtocolError::BadFrame(_))
        ));
        let mut big = client_frame(0x82, &[0; 101], [0; 4]);
        assert_eq!(reader.read(&mut big).unwrap_err(), ProtocolError::TooBig);
        let mut reader = FrameReader::new(100);
        let mut a = client_frame(0x02, &[0; 60], [0; 4]);
        read_one(&mut reader, &mut a).unwrap();
        let mut b = client_frame(0x80, &[0; 60], [0; 4]);
        assert_eq!(reader.read(&mut b).unwrap_err(), ProtocolError::TooBig);
    }

    #[test]
    fn server_frames_have_minimal_headers() {
        for (len, header) in [(5usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut fb = FrameBuilder::with_capacity(len);
            fb.payload().extend(std::iter::repeat_n(b'a', len));
            let frame = fb.finish(FrameKind::Text);
            assert_eq!(frame.len(), len + header);
            assert_eq!(frame[0], 0x81);
            let mut cursor = Cursor::new(&frame[..]);
            let (h, l) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(l as usize, len);
            assert!(h.mask.is_none() && h.is_final);
        }
        assert_eq!(
            &close_frame(1007, "bad")[..],
            &[0x88, 5, 0x03, 0xEF, b'b', b'a', b'd']
        );
        assert_eq!(&pong_frame(b"x")[..], &[0x8A, 1, b'x']);
    }

    /// `text` deflated as one message, the way a resetting client sends it.
    fn deflated(text: &[u8]) -> Vec<u8> {
        let frame = deflate::compress_frame(
            &{
                let mut f = FrameBuilder::with_capacity(text.len());
                f.payload().extend_from_slice(text);
                f.finish(FrameKind::Text)
            },
            deflate::BROADCAST_LEVEL,
        )
        .expect("compressible");
        split_frame(&frame).unwrap().1.to_vec()
    }

    #[test]
    fn compressed_messages_inflate_only_where_negotiated_and_only_on_a_first_frame() {
        let text = "compress me, compress me, compress me, compress me".as_bytes();
        let payload = deflated(text);
        let mut reader = FrameReader::with_deflate(1024, true);
        let mut frame = client_frame(0xC1, &payload, [9, 8, 7, 6]);
        let (_, msg) = read_one(&mut reader, &mut frame).unwrap();
        assert_eq!(
            msg.as_deref(),
            Some("text:compress me, compress me, compress me, compress me")
        );
        assert!(reader.is_idle(), "a resetting client leaves no state behind");

        // Not negotiated: RSV1 is a protocol error.
        let mut frame = client_frame(0xC1, &payload, [9, 8, 7, 6]);
        assert!(matches!(
            FrameReader::new(1024).read(&mut frame),
            Err(ProtocolError::BadFrame(_))
        ));
        // RSV1 on a control frame or a continuation is an error even when negotiated.
        let mut ping = client_frame(0xC9, b"", [1, 1, 1, 1]);
        assert!(FrameReader::with_deflate(1024, true).read(&mut ping).is_err());
        let mut reader = FrameReader::with_deflate(1024, true);
        let mut first = client_frame(0x41, &payload[..4], [1, 2, 3, 4]);
        assert_eq!(read_one(&mut reader, &mut first).unwrap().1, None);
        let mut cont = client_frame(0xC0, &payload[4..], [1, 2, 3, 4]);
        assert!(reader.read(&mut cont).is_err());

        // A compressed message in fragments: RSV1 on the first, inflated at the end.
        let mut reader = FrameReader::with_deflate(1024, true);
        let mut first = client_frame(0x41, &payload[..4], [1, 2, 3, 4]);
        let mut last = client_frame(0x80, &payload[4..], [4, 3, 2, 1]);
        assert_eq!(read_one(&mut reader, &mut first).unwrap().1, None);
        let (_, msg) = read_one(&mut reader, &mut last).unwrap();
        assert_eq!(
            msg.as_deref(),
            Some("text:compress me, compress me, compress me, compress me")
        );
    }

    #[test]
    fn an_inflated_message_is_held_to_the_limit_and_checked_as_text() {
        let big = vec![b'a'; 5000];
        let mut frame = client_frame(0xC1, &deflated(&big), [1, 2, 3, 4]);
        assert!(frame.len() < 100, "5000 bytes deflate small");
        assert!(matches!(
            FrameReader::with_deflate(4999, true).read(&mut frame),
            Err(ProtocolError::TooBig)
        ));
        let mut frame = client_frame(0xC1, &deflated(&[0xff; 300]), [1, 2, 3, 4]);
        assert!(matches!(
            FrameReader::with_deflate(1024, true).read(&mut frame),
            Err(ProtocolError::BadUtf8)
        ));
    }

    #[test]
    fn a_reader_that_keeps_the_clients_context_is_not_idle_once_it_holds_one() {
        let payload = deflated(b"hello hello hello hello hello hello");
        let mut reader = FrameReader::with_deflate(1024, false);
        assert!(reader.is_idle());
        let mut frame = client_frame(0xC1, &payload, [5, 5, 5, 5]);
        read_one(&mut reader, &mut frame).unwrap();
        assert!(
            !reader.is_idle(),
            "its window must survive until the next message"
        );
    }
}
