//! V2 binary decoding (kind 0 push) on arbitrary bytes: no panic; on V1 always an error;
//! a decoded message is within the length limits, its fields exactly the announced slices.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::serializer::decode_binary;
use ringcast::proto::{Payload, Vsn};

fuzz_target!(|data: &[u8]| {
    assert!(decode_binary(Vsn::V1, data).is_err(), "binary accepted on V1");
    let Ok(msg) = decode_binary(Vsn::V2, data) else { return };
    assert_within_limits(&msg);
    assert_eq!(data[0], 0, "only kind 0 decodes");
    let lens: Vec<usize> = data[1..5].iter().map(|&b| b as usize).collect();
    let header = 5 + lens.iter().sum::<usize>();
    assert!(header <= data.len());
    assert_eq!(msg.join_ref.as_ref().map_or(0, |r| r.text().len()), lens[0]);
    assert_eq!(msg.msg_ref.as_ref().map_or(0, |r| r.text().len()), lens[1]);
    assert_eq!(msg.topic.len(), lens[2]);
    assert_eq!(msg.event.len(), lens[3]);
    match &msg.payload {
        Payload::Binary(b) => assert_eq!(&b[..], &data[header..]),
        Payload::Json(_) => panic!("binary frame decoded to a JSON payload"),
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
