//! V1 text decoding (JSON objects) on arbitrary bytes: no panic; a decoded message
//! re-encodes (as a push) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::serializer::{decode_text, encode, Outgoing};
use ringcast::proto::Vsn;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    if let Ok(msg) = decode_text(Vsn::V1, &mut buf) {
        assert_within_limits(&msg);
        for vsn in [Vsn::V1, Vsn::V2] {
            let out = Outgoing::push(msg.join_ref.as_ref(), &msg.topic, &msg.event, &msg.payload);
            let _ = encode(vsn, &out);
        }
    }
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
