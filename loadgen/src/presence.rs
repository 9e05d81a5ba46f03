//! Presence traffic as the loadgen reads it, as pure functions and data: the cheap
//! classification of a server frame by its first bytes, a needle search across the
//! chunks of a frame that is read in parts, the members' tallies, and the newcomer's
//! model of the room (what phoenix.js `Presence` does with `presence_state` and
//! `presence_diff`). No I/O, no clock: callers pass the times.
//!
//! A room of 100,000 members moves on the order of a terabyte of presence frames, so a
//! member never JSON-parses one: it looks at the first [`PREFIX`] bytes and counts the
//! rest. Only the newcomer, one connection, parses what it gets.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::phx;
use crate::run::{merge_hist, HistData};

/// Bytes of a message's start that classify it: `[join_ref,ref,topic,event,` with a
/// topic of at most 255 bytes and refs of at most 64 fit easily.
pub const PREFIX: usize = 512;

/// The key prefix of every newcomer (`newcomer-<i>`); members' keys never start so.
pub const NEWCOMER_PREFIX: &str = "newcomer-";

/// What a server message is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PresenceDiff,
    PresenceState,
    /// A `phx_reply` to the message with ref `"1"` (our join).
    JoinReply,
    /// Anything else readable (welcome, heartbeat replies, broadcasts).
    Other,
    /// Not a V2 array we can read from these bytes.
    Unreadable,
}

/// A JSON string starting at `b[i]` (which must be `"`): the index just past its
/// closing quote, and the raw bytes between the quotes (escapes left as they are).
fn json_str(b: &[u8], i: usize) -> Option<(usize, &[u8])> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some((j + 1, &b[i + 1..j])),
            _ => j += 1,
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

/// `null` or a string at `b[i]`: the index past it and the string (None for null).
fn null_or_str(b: &[u8], i: usize) -> Option<(usize, Option<&[u8]>)> {
    if b[i..].starts_with(b"null") {
        return Some((i + 4, None));
    }
    json_str(b, i).map(|(j, s)| (j, Some(s)))
}

/// Expects `,` (after optional whitespace) at `b[i]`; returns the index after it and
/// the whitespace that follows.
fn comma(b: &[u8], i: usize) -> Option<usize> {
    let i = skip_ws(b, i);
    (b.get(i) == Some(&b',')).then(|| skip_ws(b, i + 1))
}

/// Classifies a V2 server message by its first bytes (`[join_ref,ref,topic,event,...`):
/// no JSON parse, no allocation. `prefix` is the message's start, at least
/// [`PREFIX`] bytes of it when the message is longer.
///
/// ```
/// use ringcast_loadgen::presence::{classify, Kind};
/// let diff = br#"[null,null,"rooms:a","presence_diff",{"joins":{},"leaves":{}}]"#;
/// assert_eq!(classify(diff), Kind::PresenceDiff);
/// assert_eq!(classify(br#"["1",null,"rooms:a","presence_state",{"#), Kind::PresenceState);
/// ```
pub fn classify(prefix: &[u8]) -> Kind {
    let parse = || -> Option<Kind> {
        let i = skip_ws(prefix, 0);
        if prefix.get(i) != Some(&b'[') {
            return None;
        }
        let (i, join_ref) = null_or_str(prefix, skip_ws(prefix, i + 1))?;
        let (i, reference) = null_or_str(prefix, comma(prefix, i)?)?;
        let (i, _topic) = json_str(prefix, comma(prefix, i)?)?;
        let (_, event) = json_str(prefix, comma(prefix, i)?)?;
        Some(match event {
            b"presence_diff" => Kind::PresenceDiff,
            b"presence_state" => Kind::PresenceState,
            b"phx_reply"
                if reference == Some(phx::JOIN_REF.as_bytes()) && matches!(join_ref, None | Some(b"1")) =>
            {
                Kind::JoinReply
            }
            _ => Kind::Other,
        })
    };
    parse().unwrap_or(Kind::Unreadable)
}

/// Finds a needle in a message that arrives in chunks (it may straddle two), keeping
/// only the needle's length minus one bytes between chunks.
///
/// ```
/// use ringcast_loadgen::presence::StreamFinder;
/// let mut f = StreamFinder::new(b"\"newcomer-0\"");
/// assert!(!f.feed(br#"{"joins":{"newcom"#));
/// assert!(f.feed(br#"er-0":{"metas":[]}}"#));
/// ```
#[derive(Debug, Clone)]
pub struct StreamFinder {
    needle: Vec<u8>,
    carry: Vec<u8>,
}

impl StreamFinder {
    pub fn new(needle: &[u8]) -> StreamFinder {
        StreamFinder {
            needle: needle.to_vec(),
            carry: Vec::with_capacity(needle.len() * 2),
        }
    }

    /// Forgets the message so far (call at the start of each message).
    pub fn reset(&mut self) {
        self.carry.clear();
    }

    /// Feeds the next chunk of the message; true when the needle ends in it.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        let n = self.needle.len();
        if n == 0 {
            return true;
        }
        if !self.carry.is_empty() {
            // Only the boundary: the carry (under n bytes) and the chunk's first n - 1.
            let old = self.carry.len();
            self.carry.extend_from_slice(&chunk[..chunk.len().min(n - 1)]);
            let found = phx::find(&self.carry, &self.needle).is_some();
            self.carry.truncate(old);
            if found {
                self.carry.clear();
                return true;
            }
        }
        if phx::find(chunk, &self.needle).is_some() {
            return true;
        }
        // Keep the last n - 1 bytes seen: where a needle cut by the next chunk starts.
        if chunk.len() >= n - 1 {
            self.carry.clear();
            self.carry.extend_from_slice(&chunk[chunk.len() - (n - 1)..]);
        } else {
            self.carry.extend_from_slice(chunk);
            let excess = self.carry.len().saturating_sub(n - 1);
            self.carry.drain(..excess);
        }
        false
    }
}

/// What the members of one slice received, mergeable across slices.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PresenceTally {
    pub diff_frames: u64,
    pub diff_bytes: u64,
    pub state_frames: u64,
    pub state_bytes: u64,
    pub largest_state_bytes: u64,
    /// Welcome, join replies, heartbeat replies and anything else.
    pub other_frames: u64,
    pub other_bytes: u64,
    /// Messages too big for the read buffer, read and counted in chunks.
    pub streamed_messages: u64,
    /// Members whose join was answered ok and whose own `presence_state` arrived.
    pub members_with_state: u64,
    /// Join sent to its `presence_state` read to the end, nanoseconds.
    pub join_to_state: HistData,
    /// Members that saw the watched key (the newcomer's) in a `presence_diff`.
    pub reached: u64,
    /// From the arm time the run was given to that diff, nanoseconds.
    pub reach: HistData,
    pub first_reach_unix_nanos: u64,
    pub last_reach_unix_nanos: u64,
    /// The last presence frame any member read.
    pub last_presence_unix_nanos: u64,
}

impl PresenceTally {
    /// Every byte of presence frames (diffs and states).
    pub fn presence_bytes(&self) -> u64 {
        self.diff_bytes + self.state_bytes
    }

    pub fn merge(&mut self, o: &PresenceTally) {
        self.diff_frames += o.diff_frames;
        self.diff_bytes += o.diff_bytes;
        self.state_frames += o.state_frames;
        self.state_bytes += o.state_bytes;
        self.largest_state_bytes = self.largest_state_bytes.max(o.largest_state_bytes);
        self.other_frames += o.other_frames;
        self.other_bytes += o.other_bytes;
        self.streamed_messages += o.streamed_messages;
        self.members_with_state += o.members_with_state;
        merge_hist(&mut self.join_to_state, &o.join_to_state);
        self.reached += o.reached;
        merge_hist(&mut self.reach, &o.reach);
        self.first_reach_unix_nanos = match (self.first_reach_unix_nanos, o.first_reach_unix_nanos) {
            (0, x) | (x, 0) => x,
            (x, y) => x.min(y),
        };
        self.last_reach_unix_nanos = self.last_reach_unix_nanos.max(o.last_reach_unix_nanos);
        self.last_presence_unix_nanos = self.last_presence_unix_nanos.max(o.last_presence_unix_nanos);
    }
}

/// One member's reading of its messages, piece by piece: the kind of the message under
/// way and, once armed, the search for the watched key in diffs.
#[derive(Debug, Clone)]
pub struct MemberReader {
    kind: Kind,
    len: u64,
    finder: Option<StreamFinder>,
    /// The watched key was seen.
    pub reached: bool,
}

/// What the member's last piece finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PieceOutcome {
    /// A message ended with this piece; of this kind.
    pub ended: Option<Kind>,
    /// The watched key was seen for the first time in this piece.
    pub reached_now: bool,
}

impl MemberReader {
    pub fn new() -> MemberReader {
        MemberReader {
            kind: Kind::Other,
            len: 0,
            finder: None,
            reached: false,
        }
    }

    /// From now on, look for `needle` in `presence_diff`s.
    pub fn arm(&mut self, needle: &[u8]) {
        if self.finder.is_none() && !self.reached {
            self.finder = Some(StreamFinder::new(needle));
        }
    }

    pub fn armed(&self) -> bool {
        self.finder.is_some()
    }

    /// Takes one piece of a message (`first`: its start, at least [`PREFIX`] bytes of
    /// it or all; `last`: its end) and counts it into `t`.
    pub fn piece(&mut self, bytes: &[u8], first: bool, last: bool, t: &mut PresenceTally) -> PieceOutcome {
        if first {
            self.kind = classify(&bytes[..bytes.len().min(PREFIX)]);
            self.len = 0;
            if let Some(f) = &mut self.finder {
                f.reset();
            }
        }
        self.len += bytes.len() as u64;
        let mut out = PieceOutcome::default();
        if self.kind == Kind::PresenceDiff && !self.reached {
            if let Some(f) = &mut self.finder {
                if f.feed(bytes) {
                    self.reached = true;
                    self.finder = None;
                    out.reached_now = true;
                }
            }
        }
        if first && !last {
            t.streamed_messages += 1;
        }
        if last {
            match self.kind {
                Kind::PresenceDiff => {
                    t.diff_frames += 1;
                    t.diff_bytes += self.len;
                }
                Kind::PresenceState => {
                    t.state_frames += 1;
                    t.state_bytes += self.len;
                    t.largest_state_bytes = t.largest_state_bytes.max(self.len);
                }
                _ => {
                    t.other_frames += 1;
                    t.other_bytes += self.len;
                }
            }
            out.ended = Some(self.kind);
        }
        out
    }
}

impl Default for MemberReader {
    fn default() -> Self {
        MemberReader::new()
    }
}

/// The room as a phoenix.js `Presence` sees it: diffs that come before the
/// `presence_state` wait for it, then apply in order; a join adds metas (replacing
/// those with the same `phx_ref`), a leave removes metas by `phx_ref` and a key whose
/// last meta left goes.
#[derive(Debug, Default)]
pub struct PresenceView {
    /// key → the `phx_ref` of each meta; None until the state arrived.
    state: Option<HashMap<String, Vec<String>>>,
    pending: Vec<serde_json::Value>,
}

fn metas_refs(presence: &serde_json::Value) -> Vec<String> {
    presence
        .get("metas")
        .and_then(|m| m.as_array())
        .map(|metas| {
            metas
                .iter()
                .map(|m| {
                    m.get("phx_ref")
                        .and_then(|r| r.as_str())
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

impl PresenceView {
    pub fn has_state(&self) -> bool {
        self.state.is_some()
    }

    /// A `presence_state` payload: `{key: {"metas": [...]}}`. Replaces the view, then
    /// applies the diffs that were waiting for it.
    pub fn apply_state(&mut self, payload: &serde_json::Value) {
        let mut state = HashMap::new();
        if let Some(obj) = payload.as_object() {
            for (k, v) in obj {
                state.insert(k.clone(), metas_refs(v));
            }
        }
        self.state = Some(state);
        for diff in std::mem::take(&mut self.pending) {
            self.apply_diff(&diff);
        }
    }

    /// A `presence_diff` payload: `{"joins": {...}, "leaves": {...}}`.
    pub fn apply_diff(&mut self, payload: &serde_json::Value) {
        let Some(state) = &mut self.state else {
            self.pending.push(payload.clone());
            return;
        };
        if let Some(joins) = payload.get("joins").and_then(|j| j.as_object()) {
            for (k, v) in joins {
                let new = metas_refs(v);
                let entry = state.entry(k.clone()).or_default();
                entry.retain(|r| !new.contains(r));
                entry.extend(new);
            }
        }
        if let Some(leaves) = payload.get("leaves").and_then(|l| l.as_object()) {
            for (k, v) in leaves {
                let gone = metas_refs(v);
                if let Some(entry) = state.get_mut(k) {
                    entry.retain(|r| !gone.contains(r));
                    if entry.is_empty() {
                        state.remove(k);
                    }
                }
            }
        }
    }

    /// Keys in the view (0 before the state).
    pub fn keys(&self) -> usize {
        self.state.as_ref().map_or(0, HashMap::len)
    }

    /// Metas over all keys.
    pub fn metas(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.values().map(Vec::len).sum())
    }

    /// Keys that are newcomers' (see [`NEWCOMER_PREFIX`]).
    pub fn newcomer_keys(&self) -> usize {
        self.state
            .as_ref()
            .map_or(0, |s| s.keys().filter(|k| k.starts_with(NEWCOMER_PREFIX)).count())
    }

    pub fn has_key(&self, key: &str) -> bool {
        self.state.as_ref().is_some_and(|s| s.contains_key(key))
    }
}

/// Keys and metas of a `presence_state` payload, by itself.
pub fn state_counts(payload: &serde_json::Value) -> (usize, usize) {
    payload.as_object().map_or((0, 0), |o| {
        (o.len(), o.values().map(|v| metas_refs(v).len()).sum())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_by_the_first_bytes() {
        let cases: [(&[u8], Kind); 9] = [
            (
                br#"[null,null,"rooms:r","presence_diff",{"joins":{}"#,
                Kind::PresenceDiff,
            ),
            (
                br#"["1",null,"rooms:r","presence_state",{}]"#,
                Kind::PresenceState,
            ),
            (
                br#"["1","1","rooms:r","phx_reply",{"status":"ok","response":{}}]"#,
                Kind::JoinReply,
            ),
            // "unmatched topic" replies leave the join_ref null.
            (
                br#"[null,"1","rooms:r","phx_reply",{"status":"error"}]"#,
                Kind::JoinReply,
            ),
            // A heartbeat reply is not the join's.
            (
                br#"[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]"#,
                Kind::Other,
            ),
            (
                br#"["1",null,"rooms:r","welcome",{"msg":"Welcome to room r!"}]"#,
                Kind::Other,
            ),
            // Whitespace and an escaped quote in the topic do not confuse it.
            (
                br#"[ null , null , "rooms:\"x\"" , "presence_diff" , {}]"#,
                Kind::PresenceDiff,
            ),
            (b"{\"topic\":\"x\"}", Kind::Unreadable),
            (br#"[null,null,"rooms:r","presen"#, Kind::Unreadable),
        ];
        for (msg, kind) in cases {
            assert_eq!(classify(msg), kind, "{}", String::from_utf8_lossy(msg));
        }
        // A body that mentions presence_diff does not make a new_msg one.
        let m = br#"[null,null,"rooms:r","new_msg",{"body":"presence_diff"}]"#;
        assert_eq!(classify(m), Kind::Other);
    }

    #[test]
    fn finds_a_needle_across_every_split() {
        let msg = br#"{"joins":{"m3-17":{},"newcomer-0":{"metas":[]}},"leaves":{}}"#;
        let needle = b"\"newcomer-0\"";
        for a in 0..msg.len() {
            for b in a..msg.len() {
                let mut f = StreamFinder::new(needle);
                let found = f.feed(&msg[..a]) || f.feed(&msg[a..b]) || f.feed(&msg[b..]);
                assert!(found, "split at {a}, {b}");
            }
        }
        // Not there, and not made up from the end of one message and the next.
        let mut f = StreamFinder::new(needle);
        assert!(!f.feed(br#"{"joins":{"newcomer-01":{}}}"#));
        assert!(!f.feed(br#"{"joins":{"newcomer-"#));
        f.reset();
        assert!(!f.feed(br#"0":{}}}"#));
        // Byte by byte.
        let mut f = StreamFinder::new(needle);
        assert!(msg.chunks(1).any(|c| f.feed(c)));
    }

    #[test]
    fn member_reader_counts_pieces_by_kind_and_spots_the_key_once_armed() {
        let mut t = PresenceTally::default();
        let mut r = MemberReader::new();
        let state = br#"["1",null,"rooms:r","presence_state",{"m0-1":{"metas":[]}}]"#;
        assert_eq!(
            r.piece(state, true, true, &mut t).ended,
            Some(Kind::PresenceState)
        );
        let diff = br#"[null,null,"rooms:r","presence_diff",{"joins":{"newcomer-0":{}},"leaves":{}}]"#;
        // Before it is armed, the key is not looked for.
        assert!(!r.piece(diff, true, true, &mut t).reached_now);
        r.arm(b"\"newcomer-0\"");
        // A diff in three pieces: counted once, whole, with the key found.
        let (a, rest) = diff.split_at(40);
        let (b, c) = rest.split_at(20);
        assert_eq!(r.piece(a, true, false, &mut t), PieceOutcome::default());
        assert!(r.piece(b, false, false, &mut t).reached_now);
        assert_eq!(r.piece(c, false, true, &mut t).ended, Some(Kind::PresenceDiff));
        assert!(r.reached && !r.armed());
        // Seen once: later diffs with it do not count again.
        assert!(!r.piece(diff, true, true, &mut t).reached_now);
        let welcome = br#"["1",null,"rooms:r","welcome",{"msg":"hi"}]"#;
        r.piece(welcome, true, true, &mut t);
        assert_eq!((t.state_frames, t.state_bytes), (1, state.len() as u64));
        assert_eq!((t.diff_frames, t.diff_bytes), (3, 3 * diff.len() as u64));
        assert_eq!((t.other_frames, t.other_bytes), (1, welcome.len() as u64));
        assert_eq!(t.streamed_messages, 1);
        assert_eq!(t.presence_bytes(), state.len() as u64 + 3 * diff.len() as u64);
    }

    #[test]
    fn tallies_merge() {
        let a = PresenceTally {
            diff_frames: 2,
            diff_bytes: 100,
            largest_state_bytes: 7,
            reached: 1,
            first_reach_unix_nanos: 50,
            last_reach_unix_nanos: 60,
            reach: vec![[1000, 1]],
            ..Default::default()
        };
        let b = PresenceTally {
            state_bytes: 9,
            largest_state_bytes: 9,
            reached: 2,
            first_reach_unix_nanos: 40,
            last_reach_unix_nanos: 55,
            reach: vec![[2000, 2]],
            ..Default::default()
        };
        let mut m = PresenceTally::default();
        m.merge(&a);
        m.merge(&b);
        assert_eq!(
            (m.diff_frames, m.presence_bytes(), m.largest_state_bytes),
            (2, 109, 9)
        );
        assert_eq!(
            (m.reached, m.first_reach_unix_nanos, m.last_reach_unix_nanos),
            (3, 40, 60)
        );
        assert_eq!(m.reach.iter().map(|[_, c]| c).sum::<u64>(), 3);
    }

    fn meta(r: &str) -> serde_json::Value {
        json!({"name": "m", "online_at": "1", "phx_ref": r})
    }

    #[test]
    fn the_view_applies_state_then_diffs_as_phoenix_js_does() {
        let mut v = PresenceView::default();
        // A diff before the state waits for it.
        v.apply_diff(&json!({"joins": {"newcomer-1": {"metas": [meta("n1")]}}, "leaves": {}}));
        assert!(!v.has_state());
        assert_eq!(v.keys(), 0);
        let state = json!({
            "m0-0": {"metas": [meta("a")]},
            "m0-1": {"metas": [meta("b"), meta("c")]},
        });
        assert_eq!(state_counts(&state), (2, 3));
        v.apply_state(&state);
        assert_eq!((v.keys(), v.metas(), v.newcomer_keys()), (3, 4, 1));
        // Our own join, then the same join again (a repeated diff): one meta.
        let own = json!({"joins": {"newcomer-0": {"metas": [meta("n0")]}}, "leaves": {}});
        v.apply_diff(&own);
        v.apply_diff(&own);
        assert_eq!((v.keys(), v.metas(), v.newcomer_keys()), (4, 5, 2));
        assert!(v.has_key("newcomer-0"));
        // A leave removes by phx_ref; the key goes with its last meta.
        v.apply_diff(&json!({"joins": {}, "leaves": {"m0-1": {"metas": [meta("b")]}}}));
        assert_eq!((v.keys(), v.metas()), (4, 4));
        v.apply_diff(&json!({"joins": {}, "leaves": {"m0-1": {"metas": [meta("c")]}}}));
        assert_eq!((v.keys(), v.metas()), (3, 3));
        // A leave of an unknown key or ref changes nothing.
        v.apply_diff(&json!({"joins": {}, "leaves": {"zz": {"metas": [meta("q")]}}}));
        assert_eq!(v.keys(), 3);
        // A later state replaces everything.
        v.apply_state(&json!({}));
        assert_eq!(v.keys(), 0);
    }
}
