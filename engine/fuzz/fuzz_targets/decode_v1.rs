//! V1 text decoding (JSON objects) on arbitrary bytes: no panic; a decoded message
//! re-encodes (as a push) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::serializer::{decode_text, encode, Outgoing};
use ringcast::proto::Vsn;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    if let Ok(msg) = decode_text(Vsn::V1, &mut buf) {
        for vsn in [Vsn::V1, Vsn::V2] {
            let out = Outgoing::push(msg.join_ref.as_ref(), &msg.topic, &msg.event, &msg.payload);
            let _ = encode(vsn, &out);
        }
    }
});
