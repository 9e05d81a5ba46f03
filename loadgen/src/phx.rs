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

/// `[null,<ref>,"phoenix","heartbeat",{}]`
pub fn heartbeat(reference: u64) -> String {
    format!("[null,\"{reference}\",\"phoenix\",\"heartbeat\",{{}}]")
}

/// `["1",<ref>,<topic>,"new_msg",{"body":"<seq>:<send_unix_nanos>"}]`
pub fn publish(topic: &str, reference: u64, seq: u64, unix_nanos: u64) -> String {
    format!(
        "[\"{JOIN_REF}\",\"{reference}\",{},\"new_msg\",{{\"body\":\"{seq}:{unix_nanos}\"}}]",
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
    let (seq, i) = digits(msg, i + 1)?;
    if msg.get(i) != Some(&b':') {
        return None;
    }
    let (ts, i) = digits(msg, i + 1)?;
    if msg.get(i) != Some(&b'"') {
        return None;
    }
    Some((seq, ts))
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
    // Phoenix leaves the join_ref null on an "unmatched topic" reply.
    let ours = format!("[\"{JOIN_REF}\",\"{JOIN_REF}\",");
    let unmatched = format!("[null,\"{JOIN_REF}\",");
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
    fn builds_messages() {
        assert_eq!(join("bench:a"), r#"["1","1","bench:a","phx_join",{}]"#);
        assert_eq!(join("we\"ird"), r#"["1","1","we\"ird","phx_join",{}]"#);
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
