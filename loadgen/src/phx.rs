//! Phoenix V2 messages the loadgen sends, and byte searches over the ones it receives
//! (no JSON parse on the hot path).

/// The join ref (and ref) of the one `phx_join` every connection sends.
pub const JOIN_REF: &str = "1";

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// `["1","1",<topic>,"phx_join",{}]`
pub fn join(topic: &str) -> String {
    format!(
        "[\"{JOIN_REF}\",\"{JOIN_REF}\",{},\"phx_join\",{{}}]",
        json_str(topic)
    )
}

/// `["1","1",<topic>,"phx_join",<payload>]`, `payload` being JSON text.
pub fn join_with(topic: &str, payload: &str) -> String {
    format!(
        "[\"{JOIN_REF}\",\"{JOIN_REF}\",{},\"phx_join\",{payload}]",
        json_str(topic)
    )
}

/// `[null,<ref>,"phoenix","heartbeat",{}]`
pub fn heartbeat(reference: u64) -> String {
    format!("[null,\"{reference}\",\"phoenix\",\"heartbeat\",{{}}]")
}

/// `["1",<ref>,<topic>,"new_msg",{"body":"<seq>:<send_unix_nanos>"}]`
pub fn publish(topic: &str, reference: u64, seq: u64, unix_nanos: u64) -> String {
    new_msg(topic, reference, &timed_body(seq, unix_nanos))
}

/// [`publish`] with `pad` bytes of chat-like text after the numbers (a space first),
/// which [`find_seq_ts`] skips.
pub fn publish_padded(topic: &str, reference: u64, seq: u64, unix_nanos: u64, pad: usize) -> String {
    if pad == 0 {
        return publish(topic, reference, seq, unix_nanos);
    }
    const TEXT: &str = "lorem ipsum dolor sit amet, the match starts at eight and the weather is fine. ";
    let filler: String = TEXT.chars().cycle().take(pad - 1).collect();
    new_msg(
        topic,
        reference,
        &format!("{} {filler}", timed_body(seq, unix_nanos)),
    )
}

/// The body of a timed broadcast, `"<seq>:<send unix nanos>"`: what [`find_seq_ts`]
/// reads back on the receiving side.
///
/// ```
/// assert_eq!(ringcast_loadgen::timed_body(1, 42), "1:42");
/// ```
pub fn timed_body(seq: u64, unix_nanos: u64) -> String {
    format!("{seq}:{unix_nanos}")
}

/// `["1",<ref>,<topic>,"new_msg",{"body":"<sender>:<seq>:<send_unix_nanos>"}]` (rooms, churn)
pub fn publish_from(topic: &str, reference: u64, sender: u64, seq: u64, unix_nanos: u64) -> String {
    new_msg(topic, reference, &format!("{sender}:{seq}:{unix_nanos}"))
}

/// `new_msg` with a body made only of digits and colons (no escaping needed).
fn new_msg(topic: &str, reference: u64, body: &str) -> String {
    format!(
        "[\"{JOIN_REF}\",\"{reference}\",{},\"new_msg\",{{\"body\":\"{body}\"}}]",
        json_str(topic)
    )
}

/// `["1",<ref>,<topic>,"phx_leave",{}]`
pub fn leave(topic: &str, reference: u64) -> String {
    format!(
        "[\"{JOIN_REF}\",\"{reference}\",{},\"phx_leave\",{{}}]",
        json_str(topic)
    )
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Parses ASCII digits at `b[i..]`; returns the value and the index after them.
fn digits(b: &[u8], mut i: usize) -> Option<(u64, usize)> {
    let start = i;
    let mut v: u64 = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add(u64::from(b[i] - b'0'))?;
        i += 1;
    }
    (i > start).then_some((v, i))
}

/// In a `new_msg` broadcast whose body is `"<seq>:<unix_nanos>"`, finds both numbers.
/// Returns `None` for any other message.
pub fn find_seq_ts(msg: &[u8]) -> Option<(u64, u64)> {
    body_numbers::<2>(msg).map(|[seq, ts]| (seq, ts))
}

/// In a `new_msg` broadcast whose body is `"<sender>:<seq>:<unix_nanos>"`, finds the
/// three numbers. Returns `None` for any other message.
pub fn find_sender_seq_ts(msg: &[u8]) -> Option<(u64, u64, u64)> {
    body_numbers::<3>(msg).map(|[sender, seq, ts]| (sender, seq, ts))
}

/// The body of a `new_msg` broadcast, when it is exactly N colon-separated numbers.
fn body_numbers<const N: usize>(msg: &[u8]) -> Option<[u64; N]> {
    find(msg, b"\"new_msg\"")?;
    let key = find(msg, b"\"body\"")?;
    let mut i = skip_ws(msg, key + 6);
    if msg.get(i) != Some(&b':') {
        return None;
    }
    i = skip_ws(msg, i + 1);
    if msg.get(i) != Some(&b'"') {
        return None;
    }
    let mut out = [0u64; N];
    for (k, slot) in out.iter_mut().enumerate() {
        let (v, next) = digits(msg, i + 1)?;
        let sep = if k + 1 == N { b'"' } else { b':' };
        // After the last number: the end of the body, or a space and padding.
        let padded = k + 1 == N && msg.get(next) == Some(&b' ');
        if msg.get(next) != Some(&sep) && !padded {
            return None;
        }
        *slot = v;
        i = next;
    }
    Some(out)
}

/// The answer to our join, if `msg` is it.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinReply {
    Ok,
    /// Refused, with the reason when one was given.
    Error(String),
}

/// Recognises the `phx_reply` to our `phx_join` (join_ref and ref both `"1"`).
pub fn join_reply(msg: &[u8]) -> Option<JoinReply> {
    reply_to(msg, JOIN_REF)
}

/// Recognises the `phx_reply` to the message with ref `reference` on our channel
/// (join_ref `"1"`), e.g. the reply to a `phx_leave`.
pub fn reply_to(msg: &[u8], reference: &str) -> Option<JoinReply> {
    // Phoenix leaves the join_ref null on an "unmatched topic" reply.
    let ours = format!("[\"{JOIN_REF}\",\"{reference}\",");
    let unmatched = format!("[null,\"{reference}\",");
    if !(msg.starts_with(ours.as_bytes()) || msg.starts_with(unmatched.as_bytes()))
        || find(msg, b"\"phx_reply\"").is_none()
    {
        return None;
    }
    if find(msg, b"\"status\":\"ok\"").is_some() {
        return Some(JoinReply::Ok);
    }
    let reason = find(msg, b"\"reason\":\"")
        .and_then(|p| {
            let rest = &msg[p + 10..];
            let end = rest.iter().position(|&b| b == b'"')?;
            std::str::from_utf8(&rest[..end]).ok().map(str::to_string)
        })
        .unwrap_or_else(|| "error".to_string());
    Some(JoinReply::Error(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_bodies_keep_their_numbers_readable() {
        let m = publish_padded("bench:x", 2, 7, 42, 12);
        assert!(m.contains(r#""body":"7:42 lorem ipsum"}"#), "{m}");
        assert_eq!(find_seq_ts(m.as_bytes()), Some((7, 42)));
        assert_eq!(
            publish_padded("bench:x", 2, 7, 42, 0),
            publish("bench:x", 2, 7, 42)
        );
        // A body that only starts with numbers, without the space, is not a timed one.
        assert_eq!(find_seq_ts(br#"["1",null,"t","new_msg",{"body":"7:42x"}]"#), None);
    }

    #[test]
    fn builds_messages() {
        assert_eq!(join("bench:a"), r#"["1","1","bench:a","phx_join",{}]"#);
        assert_eq!(join("we\"ird"), r#"["1","1","we\"ird","phx_join",{}]"#);
        assert_eq!(
            join_with("rooms:r", r#"{"name":"m"}"#),
            r#"["1","1","rooms:r","phx_join",{"name":"m"}]"#
        );
        assert_eq!(heartbeat(7), r#"[null,"7","phoenix","heartbeat",{}]"#);
        assert_eq!(
            publish("bench:fan", 3, 12, 1_700_000_000_123_456_789),
            r#"["1","3","bench:fan","new_msg",{"body":"12:1700000000123456789"}]"#
        );
    }

    #[test]
    fn finds_seq_and_timestamp() {
        let m = br#"[null,null,"bench:fan","new_msg",{"body":"42:1700000000123456789","user":"pub"}]"#;
        assert_eq!(find_seq_ts(m), Some((42, 1_700_000_000_123_456_789)));
        // Key order and whitespace do not matter.
        let m = br#"[null,null,"bench:fan","new_msg",{"user":"p","body" : "0:5"}]"#;
        assert_eq!(find_seq_ts(m), Some((0, 5)));
        // What the publisher itself sent parses the same way.
        assert_eq!(
            find_seq_ts(publish("bench:x", 9, 77, 123).as_bytes()),
            Some((77, 123))
        );
    }

    #[test]
    fn reads_a_timed_broadcast_of_the_http_api() {
        // What `POST /api/broadcast` with payload {"body": timed_body(..), "user": "api"}
        // delivers to a subscriber (no join_ref, no ref).
        let frame = format!(
            r#"[null,null,"bench:cluster-40000","new_msg",{{"body":"{}","user":"api"}}]"#,
            timed_body(1, 1_764_590_000_000_000_123)
        );
        assert_eq!(
            find_seq_ts(frame.as_bytes()),
            Some((1, 1_764_590_000_000_000_123))
        );
    }

    #[test]
    fn ignores_other_messages() {
        let cases: [&[u8]; 7] = [
            br#"[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]"#,
            br#"[null,null,"bench:fan","shout",{"body":"1:2","user":"u"}]"#,
            br#"[null,null,"bench:fan","new_msg",{"body":"hello","user":"u"}]"#,
            br#"[null,null,"bench:fan","new_msg",{"body":"1:","user":"u"}]"#,
            br#"[null,null,"bench:fan","new_msg",{"body":"1:2x","user":"u"}]"#,
            br#"[null,null,"bench:fan","new_msg",{"body":"99999999999999999999:1"}]"#,
            br#"[null,null,"bench:fan","new_msg",{"body":"#,
        ];
        for c in cases {
            assert_eq!(find_seq_ts(c), None, "{}", String::from_utf8_lossy(c));
        }
    }

    #[test]
    fn sender_seq_and_timestamp() {
        let m = publish_from("bench:room-3", 4, 17, 2, 99);
        assert_eq!(m, r#"["1","4","bench:room-3","new_msg",{"body":"17:2:99"}]"#);
        assert_eq!(find_sender_seq_ts(m.as_bytes()), Some((17, 2, 99)));
        let b = br#"[null,null,"rooms:room-0","new_msg",{"body":"5:0:123","user":"lg5"}]"#;
        assert_eq!(find_sender_seq_ts(b), Some((5, 0, 123)));
        // Two numbers are a fanout body, not a room body, and the other way round.
        assert_eq!(find_sender_seq_ts(publish("t", 1, 2, 3).as_bytes()), None);
        assert_eq!(find_seq_ts(b), None);
        assert_eq!(
            find_sender_seq_ts(br#"["1",null,"t","new_msg",{"body":"1:2:"}]"#),
            None
        );
    }

    #[test]
    fn leave_and_its_reply() {
        assert_eq!(leave("bench:c", 5), r#"["1","5","bench:c","phx_leave",{}]"#);
        let ok = br#"["1","5","bench:c","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(reply_to(ok, "5"), Some(JoinReply::Ok));
        assert_eq!(reply_to(ok, "6"), None);
        assert_eq!(join_reply(ok), None);
        let close = br#"["1","1","bench:c","phx_close",{}]"#;
        assert_eq!(reply_to(close, "5"), None);
    }

    #[test]
    fn byte_search() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"aaa", b"aaaa"), None);
        assert_eq!(find(b"xyz", b"z"), Some(2));
        assert_eq!(find(b"", b"a"), None);
    }

    #[test]
    fn recognises_join_replies() {
        let ok = br#"["1","1","bench:a","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(join_reply(ok), Some(JoinReply::Ok));
        let err =
            br#"["1","1","nope","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#;
        assert_eq!(join_reply(err), Some(JoinReply::Error("unmatched topic".into())));
        let unmatched =
            br#"[null,"1","nope","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#;
        assert_eq!(
            join_reply(unmatched),
            Some(JoinReply::Error("unmatched topic".into()))
        );
        let other = br#"[null,"2","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(join_reply(other), None);
        let push = br#"["1",null,"rooms:a","welcome",{"msg":"hi"}]"#;
        assert_eq!(join_reply(push), None);
    }
}
