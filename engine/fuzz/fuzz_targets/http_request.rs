//! HTTP request heads on arbitrary bytes, whole and in growing prefixes (as a connection
//! reads them): no panic; a complete head's length is within the buffer and ≤ MAX_HEAD;
//! a prefix that is complete stays complete with the same result as more bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::http::{wants_close, Request, MAX_HEAD};

fn check(buf: &[u8]) -> Option<(Request, usize)> {
    match Request::parse(buf) {
        Ok(Some((req, len))) => {
            assert!(len <= buf.len() && len <= MAX_HEAD, "head length {len} of {}", buf.len());
            let _ = req.query_params();
            let _ = req.websocket_key();
            let _ = req.header("host");
            let _ = req.header_has_token("connection", "upgrade");
            let _ = wants_close(&req);
            Some((req, len))
        }
        Ok(None) => {
            assert!(buf.len() <= MAX_HEAD, "partial head over MAX_HEAD not refused");
            None
        }
        Err(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = check(data);
    // Feed in prefixes: the first prefix that parses complete must agree with the whole.
    let step = 1 + data.len() / 16;
    let mut end = 0;
    while end < data.len() {
        end = (end + step).min(data.len());
        if let Ok(Some((req, len))) = Request::parse(&data[..end]) {
            let (wreq, wlen) = whole.expect("a prefix parsed complete but the whole did not");
            assert_eq!((req, len), (wreq, wlen), "prefix and whole disagree");
            break;
        }
    }
});
