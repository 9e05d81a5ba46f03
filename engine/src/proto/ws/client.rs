//! The client role of WebSocket framing (RFC 6455): masked client frames out, unmasked
//! server frames in, on byte slices. The loadgen and the benchmark clients speak it;
//! the server side is [`super::FrameReader`] and [`super::FrameBuilder`].

pub use super::opcode;

/// Header of one server frame found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The frame ends its message.
    pub fin: bool,
    /// Its opcode ([`opcode`]).
    pub opcode: u8,
    /// RSV1: the message this frame starts is compressed (`permessage-deflate`).
    pub compressed: bool,
    /// Bytes of header (2, 4 or 10 for unmasked frames).
    pub header_len: usize,
    /// Bytes of payload after the header.
    pub payload_len: usize,
}

impl Frame {
    /// Header plus payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// What [`parse_frame`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A complete frame is at the start of the buffer.
    Frame(Frame),
    /// Not enough bytes yet; at least this many are needed in total.
    Incomplete(usize),
}

/// Protocol violations by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// RSV bits set (no extension was negotiated).
    Reserved,
    /// A server must not mask its frames.
    Masked,
    /// Unknown opcode.
    BadOpcode(u8),
    /// Control frame fragmented or longer than 125 bytes.
    BadControl,
    /// Payload larger than the caller's limit.
    TooBig(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Reserved => f.write_str("reserved bits set"),
            FrameError::Masked => f.write_str("masked server frame"),
            FrameError::BadOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            FrameError::BadControl => f.write_str("bad control frame"),
            FrameError::TooBig(n) => write!(f, "frame of {n} bytes over the limit"),
        }
    }
}

/// Parses the header of the server frame at the start of `buf`, on a connection that
/// negotiated no extension.
pub fn parse_frame(buf: &[u8], max_payload: usize) -> Result<Parsed, FrameError> {
    parse_frame_with(buf, max_payload, false)
}

/// [`parse_frame`] on a connection that negotiated `permessage-deflate` when `deflate`:
/// RSV1 may then mark the first frame of a data message as compressed.
pub fn parse_frame_with(buf: &[u8], max_payload: usize, deflate: bool) -> Result<Parsed, FrameError> {
    if buf.len() < 2 {
        return Ok(Parsed::Incomplete(2));
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let compressed = b0 & 0x40 != 0;
    let data_start = matches!(b0 & 0x0F, opcode::TEXT | opcode::BINARY);
    if b0 & 0x30 != 0 || (compressed && !(deflate && data_start)) {
        return Err(FrameError::Reserved);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0F;
    match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin || (b1 & 0x7F) > 125 {
                return Err(FrameError::BadControl);
            }
        }
        other => return Err(FrameError::BadOpcode(other)),
    }
    let (header_len, len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Parsed::Incomplete(4));
            }
            (4, u64::from(u16::from_be_bytes([buf[2], buf[3]])))
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Parsed::Incomplete(10));
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(b))
        }
        n => (2, u64::from(n)),
    };
    if len > max_payload as u64 {
        return Err(FrameError::TooBig(len));
    }
    let frame = Frame {
        fin,
        opcode: op,
        compressed,
        header_len,
        payload_len: len as usize,
    };
    if buf.len() < frame.total_len() {
        return Ok(Parsed::Incomplete(frame.total_len()));
    }
    Ok(Parsed::Frame(frame))
}

/// XORs `data` with the 4-byte `mask`, starting at mask offset 0 (masking and unmasking
/// are the same operation).
pub use super::unmask as apply_mask;

/// Appends one complete (FIN) masked client frame to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, op: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | (op & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Close code of a close frame payload (1005 "no status" when absent).
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// A tiny xorshift generator for mask keys (masking needs no cryptographic strength
/// against our own server).
#[derive(Debug, Clone)]
pub struct MaskGen(u32);

impl MaskGen {
    /// A generator seeded with `seed` (any value; zero is made odd).
    pub fn new(seed: u32) -> Self {
        MaskGen(seed | 1)
    }

    /// The next mask key.
    pub fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x.to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | op];
        let len = payload.len();
        if len < 126 {
            v.push(len as u8);
        } else if len <= 0xFFFF {
            v.push(126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_all_three_length_forms() {
        for (len, header) in [(0usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let payload = vec![b'x'; len];
            let buf = server_frame(opcode::TEXT, true, &payload);
            let parsed = parse_frame(&buf, 1 << 20).unwrap();
            assert_eq!(
                parsed,
                Parsed::Frame(Frame {
                    fin: true,
                    opcode: opcode::TEXT,
                    compressed: false,
                    header_len: header,
                    payload_len: len
                }),
                "len {len}"
            );
        }
    }

    #[test]
    fn reports_incomplete_with_needed_length() {
        let buf = server_frame(opcode::TEXT, true, &[b'a'; 300]);
        assert_eq!(parse_frame(&buf[..1], 1 << 20), Ok(Parsed::Incomplete(2)));
        assert_eq!(parse_frame(&buf[..3], 1 << 20), Ok(Parsed::Incomplete(4)));
        assert_eq!(parse_frame(&buf[..100], 1 << 20), Ok(Parsed::Incomplete(304)));
        let big = server_frame(opcode::BINARY, true, &vec![0; 70000]);
        assert_eq!(parse_frame(&big[..5], 1 << 20), Ok(Parsed::Incomplete(10)));
        assert_eq!(parse_frame(&big[..10], 1 << 20), Ok(Parsed::Incomplete(70010)));
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut buf = server_frame(opcode::TEXT, true, b"hello");
        buf.extend(server_frame(opcode::CLOSE, true, &[0x03, 0xE9]));
        let Parsed::Frame(f) = parse_frame(&buf, 1024).unwrap() else {
            panic!()
        };
        assert_eq!(&buf[f.header_len..f.total_len()], b"hello");
        let rest = &buf[f.total_len()..];
        let Parsed::Frame(c) = parse_frame(rest, 1024).unwrap() else {
            panic!()
        };
        assert_eq!(c.opcode, opcode::CLOSE);
        assert_eq!(close_code(&rest[c.header_len..c.total_len()]), 1001);
        assert_eq!(close_code(&[]), 1005);
    }

    #[test]
    fn rejects_protocol_violations() {
        assert_eq!(parse_frame(&[0x81, 0x85], 1024), Err(FrameError::Masked));
        assert_eq!(parse_frame(&[0xC1, 0x00], 1024), Err(FrameError::Reserved));
        // With permessage-deflate, RSV1 marks a compressed data message; on a control
        // frame or a continuation it stays an error, and RSV2/RSV3 always are.
        assert!(matches!(
            parse_frame_with(&[0xC1, 0x00], 1024, true),
            Ok(Parsed::Frame(Frame { compressed: true, .. }))
        ));
        assert_eq!(
            parse_frame_with(&[0xC9, 0x00], 1024, true),
            Err(FrameError::Reserved)
        );
        assert_eq!(
            parse_frame_with(&[0xC0, 0x00], 1024, true),
            Err(FrameError::Reserved)
        );
        assert_eq!(
            parse_frame_with(&[0xA1, 0x00], 1024, true),
            Err(FrameError::Reserved)
        );
        assert_eq!(parse_frame(&[0x83, 0x00], 1024), Err(FrameError::BadOpcode(3)));
        assert_eq!(parse_frame(&[0x09, 0x00], 1024), Err(FrameError::BadControl));
        assert_eq!(parse_frame(&[0x89, 126], 1024), Err(FrameError::BadControl));
        let big = server_frame(opcode::TEXT, true, &[0; 2000]);
        assert_eq!(parse_frame(&big, 1024), Err(FrameError::TooBig(2000)));
        // Fragments are fine for data frames.
        let frag = server_frame(opcode::TEXT, false, b"ab");
        assert!(matches!(
            parse_frame(&frag, 1024),
            Ok(Parsed::Frame(Frame { fin: false, .. }))
        ));
    }

    /// Decodes a client frame the way a server would, to check our encoder.
    fn decode_client(buf: &[u8]) -> (u8, Vec<u8>) {
        assert_eq!(buf[0] & 0x80, 0x80, "FIN");
        assert_eq!(buf[1] & 0x80, 0x80, "client frames are masked");
        let (hl, len) = match buf[1] & 0x7F {
            126 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
            127 => (10, u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize),
            n => (2, n as usize),
        };
        let mask: [u8; 4] = buf[hl..hl + 4].try_into().unwrap();
        assert_eq!(buf.len(), hl + 4 + len);
        let mut p = buf[hl + 4..].to_vec();
        apply_mask(&mut p, mask);
        (buf[0] & 0x0F, p)
    }

    #[test]
    fn client_frames_round_trip() {
        let mut g = MaskGen::new(7);
        for len in [0usize, 1, 5, 125, 126, 1000, 65535, 65536, 70001] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_client_frame(&mut out, opcode::TEXT, &payload, g.next_mask());
            let (op, got) = decode_client(&out);
            assert_eq!(op, opcode::TEXT);
            assert_eq!(got, payload, "len {len}");
        }
    }

    #[test]
    fn rfc_6455_masked_hello_example() {
        // RFC 6455 section 5.7: a single-frame masked text message "Hello".
        let mut out = Vec::new();
        encode_client_frame(&mut out, opcode::TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(
            out,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn mask_gen_varies() {
        let mut g = MaskGen::new(0);
        let a = g.next_mask();
        let b = g.next_mask();
        assert_ne!(a, b);
    }
}
