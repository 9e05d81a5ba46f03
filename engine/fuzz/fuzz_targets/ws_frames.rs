//! FrameReader on arbitrary bytes, fed in chunks the way a connection's read loop does:
//! append what arrived, parse frames off the front until NeedMore, keep the rest.
//! Invariants: no panic; `consumed` is within the buffer and never 0; a Text message is
//! valid UTF-8; no message (or reassembly) exceeds the limit; a Ping payload ≤ 125 bytes;
//! errors close with 1007 or 1009, or 1002 for a close code no peer may send; a Close
//! message carries only codes a peer may send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::ws::{FrameReader, Parsed, WsMessage};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // First byte: the limit (small, so TooBig paths are reached); second: chunking seed.
    let max = 1 + (data[0] as usize) * 16;
    let mut seed = data[1] as usize | 1;
    let input = &data[2..];
    let mut reader = FrameReader::new(max);
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0;
    'outer: while at < input.len() {
        // next chunk length: 1..=64, derived from the seed
        seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
        let n = 1 + (seed >> 8) % 64;
        let end = (at + n).min(input.len());
        buf.extend_from_slice(&input[at..end]);
        at = end;
        loop {
            let len = buf.len();
            let consumed = match reader.read(&mut buf) {
                Ok(Parsed::NeedMore) => break,
                Ok(Parsed::Frame { consumed, message }) => {
                    assert!(consumed > 0 && consumed <= len, "consumed {consumed} of {len}");
                    match message {
                        Some(WsMessage::Text(t)) => {
                            assert!(std::str::from_utf8(t.as_slice()).is_ok(), "Text not UTF-8");
                            assert!(t.as_slice().len() <= max, "text over the limit");
                        }
                        Some(WsMessage::Binary(b)) => assert!(b.as_slice().len() <= max, "binary over the limit"),
                        Some(WsMessage::Ping(p)) => assert!(p.len() <= 125, "ping over 125 bytes"),
                        Some(WsMessage::Close(Some(code))) => {
                            assert!(ringcast::proto::ws::close_code_allowed(code), "close code {code} accepted")
                        }
                        Some(WsMessage::Pong) | Some(WsMessage::Close(None)) | None => {}
                    }
                    consumed
                }
                Err(e) => {
                    let code = e.close_code();
                    // 1002 only for a close frame's forbidden code (RFC 6455 §7.4).
                    let protocol = matches!(e, ringcast::proto::ProtocolError::BadCloseCode(c) if !ringcast::proto::ws::close_code_allowed(c));
                    assert!(code == 1007 || code == 1009 || (code == 1002 && protocol), "close code {code} for {e:?}");
                    break 'outer;
                }
            };
            buf.drain(..consumed);
        }
    }
});
