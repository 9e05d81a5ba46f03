//! V2 text decoding (JSON arrays) on arbitrary bytes: no panic; a decoded message
//! is within the length limits and re-encodes and decodes again to the same fields (round trip).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::serializer::{decode_text, encode, Outgoing};
use ringcast::proto::{Payload, Vsn};

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let Ok(msg) = decode_text(Vsn::V2, &mut buf) else { return };
    assert_within_limits(&msg);
    // A push frame is [join_ref, null, topic, event, payload]: it decodes back (msg_ref
    // aside) to what was decoded here.
    let out = Outgoing::push(msg.join_ref.as_ref(), &msg.topic, &msg.event, &msg.payload);
    let Ok(bytes) = encode(Vsn::V2, &out) else { return };
    // The server's own frames carry an unmasked WebSocket header; the JSON text follows.
    assert_eq!(bytes[0], 0x81, "a JSON push is one final text frame");
    let start = match bytes[1] {
        126 => 4,
        127 => 10,
        n => {
            assert!(n < 126);
            2
        }
    };
    if !matches!(msg.payload, Payload::Json(_)) {
        return;
    }
    let mut again = bytes[start..].to_vec();
    let back = decode_text(Vsn::V2, &mut again).unwrap_or_else(|e| {
        panic!("re-encoded frame does not decode: {e:?}: {:?}", String::from_utf8_lossy(&bytes[start..]))
    });
    assert_eq!(back.join_ref, msg.join_ref);
    assert_eq!(back.topic, msg.topic);
    assert_eq!(back.event, msg.event);
    assert_eq!(back.payload, msg.payload);
});

/// What decodes is within the limits of seed-app.md ("Limits").
fn assert_within_limits(msg: &ringcast::proto::Message) {
    use ringcast::proto::serializer::{MAX_NAME, MAX_TOPIC};
    assert!(msg.topic.len() <= MAX_TOPIC, "topic of {} bytes decoded", msg.topic.len());
    assert!(msg.event.len() <= MAX_NAME, "event of {} bytes decoded", msg.event.len());
    for r in [&msg.msg_ref, &msg.join_ref].into_iter().flatten() {
        assert!(r.text().len() <= MAX_NAME, "ref {r} decoded");
    }
}
