//! Presence as pure data: who is tracked on which topic, under which key, with which
//! metas; the deltas that change it and the diffs clients see (PROTOCOL.md §13).
//!
//! Every entry has exactly one owner (the core, later the node, holding the connection
//! that tracked it), and only its owner issues deltas about it. Replicas apply deltas
//! from every owner in each owner's order, so they converge; applying a delta twice
//! changes nothing (a join of a known `phx_ref` or a leave of an unknown one is a no-op).
//! Metas are kept as finished JSON text so that `presence_state` and `presence_diff` are
//! built by concatenation, never by re-encoding.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// Who owns an entry: the connection that tracked it, on its core of its node. Only the
/// owner may issue deltas about it; when a node dies its entries are dropped together.
/// The one place that knows how the three are packed (node id in the high half, 0
/// outside a cluster; then the core in 8 bits and the connection slot in 24).
///
/// ```
/// use ringcast::proto::presence::Owner;
/// let o = Owner::new(7, 1, 3);
/// assert_eq!(o.node(), 7);
/// assert_ne!(Owner::new(7, 0, 3), o);
/// assert_eq!(Owner::from_raw(o.raw()), o);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Owner(u64);

impl Owner {
    /// The owner of a presence tracked by connection slot `conn` on `core` of `node`.
    pub fn new(node: u32, core: usize, conn: u32) -> Owner {
        Owner((u64::from(node) << 32) | ((core as u64 & 0xff) << 24) | (u64::from(conn) & 0x00ff_ffff))
    }

    /// The node the owner belongs to.
    pub fn node(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The packed form, as the cluster's envelopes carry it.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// An owner from its packed form.
    pub fn from_raw(raw: u64) -> Owner {
        Owner(raw)
    }
}

/// One tracked meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Unique id of this track.
    pub phx_ref: Box<str>,
    /// The owner of the entry.
    pub owner: Owner,
    /// The whole meta object as JSON, `phx_ref` (and `phx_ref_prev`) included.
    pub json: Box<str>,
}

impl Meta {
    /// Builds a meta from the application's fields (a JSON object), adding `phx_ref`
    /// and, after an update, `phx_ref_prev`.
    ///
    /// ```
    /// use ringcast::proto::presence::{Meta, Owner};
    /// let m = Meta::new(serde_json::json!({"name": "ada"}), "r1".into(), Some("r0"), Owner::new(0, 0, 7));
    /// assert_eq!(&*m.json, r#"{"name":"ada","phx_ref":"r1","phx_ref_prev":"r0"}"#);
    /// ```
    pub fn new(fields: serde_json::Value, phx_ref: Box<str>, prev: Option<&str>, owner: Owner) -> Meta {
        let mut map = match fields {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        map.insert("phx_ref".into(), (*phx_ref).into());
        if let Some(prev) = prev {
            map.insert("phx_ref_prev".into(), prev.into());
        }
        Meta {
            phx_ref,
            owner,
            json: serde_json::Value::Object(map).to_string().into_boxed_str(),
        }
    }
}

/// A change issued by one owner on one topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    /// Metas that start, with their keys.
    pub joins: Vec<(Box<str>, Meta)>,
    /// Metas that end: key and `phx_ref`.
    pub leaves: Vec<(Box<str>, Box<str>)>,
}

/// What changed for clients: metas joined and left, grouped by key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diff {
    joins: BTreeMap<Box<str>, Vec<Meta>>,
    leaves: BTreeMap<Box<str>, Vec<Meta>>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// Folds a later diff into this one. A meta that joined here and leaves there
    /// vanishes from both sides.
    pub fn merge(&mut self, later: Diff) {
        for (key, metas) in later.joins {
            self.joins.entry(key).or_default().extend(metas);
        }
        for (key, metas) in later.leaves {
            for meta in metas {
                let joined = self.joins.get_mut(&key);
                let pos = joined
                    .as_ref()
                    .and_then(|j| j.iter().position(|m| m.phx_ref == meta.phx_ref));
                match (joined, pos) {
                    (Some(joined), Some(i)) => {
                        joined.remove(i);
                        if joined.is_empty() {
                            self.joins.remove(&key);
                        }
                    }
                    _ => self.leaves.entry(key.clone()).or_default().push(meta),
                }
            }
        }
    }

    /// The `presence_diff` payload: `{"joins":{...},"leaves":{...}}`.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push_str("{\"joins\":");
        write_groups(&mut out, self.joins.iter().map(|(k, v)| (k, v.iter())));
        out.push_str(",\"leaves\":");
        write_groups(&mut out, self.leaves.iter().map(|(k, v)| (k, v.iter())));
        out.push('}');
        out
    }
}

fn write_groups<'a>(
    out: &mut String,
    groups: impl Iterator<Item = (&'a Box<str>, impl Iterator<Item = &'a Meta>)>,
) {
    out.push('{');
    let mut first = true;
    for (key, metas) in groups {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{}:{{\"metas\":[", serde_json::Value::from(&**key));
        let mut first_meta = true;
        for meta in metas {
            if !first_meta {
                out.push(',');
            }
            first_meta = false;
            out.push_str(&meta.json);
        }
        out.push_str("]}");
    }
    out.push('}');
}

/// Every topic's presences, as one replica sees them.
#[derive(Debug, Default)]
pub struct PresenceState {
    topics: HashMap<Box<str>, BTreeMap<Box<str>, Vec<Meta>>>,
}

impl PresenceState {
    /// Applies `delta` on `topic`; returns what actually changed.
    ///
    /// ```
    /// use ringcast::proto::presence::{Delta, Meta, Owner, PresenceState};
    /// let mut state = PresenceState::default();
    /// let meta = Meta::new(serde_json::json!({}), "a".into(), None, Owner::new(0, 0, 1));
    /// let delta = Delta { joins: vec![("42".into(), meta)], leaves: vec![] };
    /// assert!(!state.apply("rooms:x", &delta).is_empty());
    /// assert!(state.apply("rooms:x", &delta).is_empty(), "a replayed delta changes nothing");
    /// assert_eq!(state.list_json("rooms:x"), r#"{"42":{"metas":[{"phx_ref":"a"}]}}"#);
    /// ```
    pub fn apply(&mut self, topic: &str, delta: &Delta) -> Diff {
        let mut diff = Diff::default();
        let keys = match self.topics.get_mut(topic) {
            Some(keys) => keys,
            None => self.topics.entry(topic.into()).or_default(),
        };
        for (key, phx_ref) in &delta.leaves {
            let Some(metas) = keys.get_mut(key) else { continue };
            let Some(i) = metas.iter().position(|m| m.phx_ref == *phx_ref) else {
                continue;
            };
            let meta = metas.remove(i);
            if metas.is_empty() {
                keys.remove(key);
            }
            diff.leaves.entry(key.clone()).or_default().push(meta);
        }
        for (key, meta) in &delta.joins {
            let metas = keys.entry(key.clone()).or_default();
            // Metas stay ordered by phx_ref: every replica lists them alike, whatever
            // order the owners' deltas reached it in.
            let Err(at) = metas.binary_search_by(|m| m.phx_ref.cmp(&meta.phx_ref)) else {
                continue;
            };
            metas.insert(at, meta.clone());
            diff.joins.entry(key.clone()).or_default().push(meta.clone());
        }
        if keys.is_empty() {
            self.topics.remove(topic);
        }
        diff
    }

    /// Drops every entry of `owner` on every topic (its origin died); returns the
    /// diffs per topic.
    pub fn drop_owner(&mut self, is_gone: impl Fn(Owner) -> bool) -> Vec<(Box<str>, Diff)> {
        let mut out = Vec::new();
        for (topic, keys) in self.topics.iter_mut() {
            let mut diff = Diff::default();
            keys.retain(|key, metas| {
                metas.retain(|m| {
                    let gone = is_gone(m.owner);
                    if gone {
                        diff.leaves.entry(key.clone()).or_default().push(m.clone());
                    }
                    !gone
                });
                !metas.is_empty()
            });
            if !diff.is_empty() {
                out.push((topic.clone(), diff));
            }
        }
        self.topics.retain(|_, keys| !keys.is_empty());
        out
    }

    /// Replaces every entry on `topic` owned by `is_origin` owners with `entries` (an
    /// origin's full state after a resync); returns what changed.
    pub fn replace_origin(
        &mut self,
        topic: &str,
        is_origin: impl Fn(Owner) -> bool,
        entries: &[(Box<str>, Meta)],
    ) -> Diff {
        let stale: Vec<(Box<str>, Box<str>)> = self
            .topics
            .get(topic)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .flat_map(|(key, metas)| metas.iter().map(move |m| (key, m)))
            .filter(|(key, m)| {
                is_origin(m.owner) && !entries.iter().any(|(k, e)| k == *key && e.phx_ref == m.phx_ref)
            })
            .map(|(key, m)| (key.clone(), m.phx_ref.clone()))
            .collect();
        self.apply(
            topic,
            &Delta {
                joins: entries.to_vec(),
                leaves: stale,
            },
        )
    }

    /// Every entry on `topic` whose owner satisfies `pred`.
    pub fn entries(&self, topic: &str, pred: impl Fn(Owner) -> bool) -> Vec<(Box<str>, Meta)> {
        self.topics
            .get(topic)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .flat_map(|(key, metas)| metas.iter().map(move |m| (key.clone(), m.clone())))
            .filter(|(_, m)| pred(m.owner))
            .collect()
    }

    /// Topics with at least one entry.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.topics.keys().map(|k| &**k)
    }

    /// The `presence_state` payload for `topic`: `{key: {"metas": [...]}, ...}`.
    pub fn list_json(&self, topic: &str) -> String {
        let mut out = String::new();
        match self.topics.get(topic) {
            Some(keys) => write_groups(&mut out, keys.iter().map(|(k, v)| (k, v.iter()))),
            None => out.push_str("{}"),
        }
        out
    }

    /// The metas under `key` on `topic`.
    pub fn get(&self, topic: &str, key: &str) -> &[Meta] {
        self.topics
            .get(topic)
            .and_then(|k| k.get(key))
            .map_or(&[], Vec::as_slice)
    }

    /// Number of tracked metas on `topic`.
    pub fn count(&self, topic: &str) -> usize {
        self.topics
            .get(topic)
            .map_or(0, |k| k.values().map(Vec::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(r: &str, owner: Owner) -> Meta {
        Meta::new(json!({"name": r}), r.into(), None, owner)
    }

    fn join(key: &str, m: Meta) -> Delta {
        Delta {
            joins: vec![(key.into(), m)],
            leaves: vec![],
        }
    }

    fn leave(key: &str, r: &str) -> Delta {
        Delta {
            joins: vec![],
            leaves: vec![(key.into(), r.into())],
        }
    }

    #[test]
    fn track_untrack_and_one_key_with_several_metas() {
        let mut s = PresenceState::default();
        s.apply("t", &join("1", meta("a", Owner::from_raw(1))));
        s.apply("t", &join("1", meta("b", Owner::from_raw(2))));
        assert_eq!(s.get("t", "1").len(), 2);
        let diff = s.apply("t", &leave("1", "a"));
        assert_eq!(
            diff.to_json(),
            r#"{"joins":{},"leaves":{"1":{"metas":[{"name":"a","phx_ref":"a"}]}}}"#
        );
        assert_eq!(
            s.list_json("t"),
            r#"{"1":{"metas":[{"name":"b","phx_ref":"b"}]}}"#
        );
        s.apply("t", &leave("1", "b"));
        assert_eq!(s.list_json("t"), "{}");
        assert_eq!(s.count("t"), 0);
    }

    #[test]
    fn update_is_a_leave_plus_a_join_with_prev_ref() {
        let mut s = PresenceState::default();
        s.apply("t", &join("1", meta("a", Owner::from_raw(1))));
        let updated = Meta::new(
            json!({"status": "away"}),
            "a2".into(),
            Some("a"),
            Owner::from_raw(1),
        );
        let diff = s.apply(
            "t",
            &Delta {
                joins: vec![("1".into(), updated)],
                leaves: vec![("1".into(), "a".into())],
            },
        );
        assert_eq!(
            diff.to_json(),
            r#"{"joins":{"1":{"metas":[{"phx_ref":"a2","phx_ref_prev":"a","status":"away"}]}},"leaves":{"1":{"metas":[{"name":"a","phx_ref":"a"}]}}}"#
        );
        assert_eq!(s.get("t", "1").len(), 1);
    }

    #[test]
    fn replicas_converge_whatever_the_interleaving_of_owners() {
        // Two owners' delta streams, each in order, interleaved differently.
        let a = [
            join("x", meta("a1", Owner::from_raw(1))),
            join("y", meta("a2", Owner::from_raw(1))),
            leave("x", "a1"),
        ];
        let b = [
            join("x", meta("b1", Owner::from_raw(2))),
            leave("x", "b1"),
            join("z", meta("b2", Owner::from_raw(2))),
        ];
        let mut r1 = PresenceState::default();
        let mut r2 = PresenceState::default();
        for d in a.iter().chain(b.iter()) {
            r1.apply("t", d);
        }
        for (da, db) in a.iter().zip(b.iter()) {
            r2.apply("t", db);
            r2.apply("t", da);
        }
        assert_eq!(r1.list_json("t"), r2.list_json("t"));
        assert_eq!(
            r1.list_json("t"),
            r#"{"y":{"metas":[{"name":"a2","phx_ref":"a2"}]},"z":{"metas":[{"name":"b2","phx_ref":"b2"}]}}"#
        );
    }

    #[test]
    fn metas_of_one_key_list_alike_whatever_the_arrival_order() {
        let (a, b) = (
            join("k", meta("r2", Owner::from_raw(1))),
            join("k", meta("r1", Owner::from_raw(2))),
        );
        let mut r1 = PresenceState::default();
        let mut r2 = PresenceState::default();
        r1.apply("t", &a);
        r1.apply("t", &b);
        r2.apply("t", &b);
        r2.apply("t", &a);
        assert_eq!(r1.list_json("t"), r2.list_json("t"));
    }

    #[test]
    fn replayed_deltas_are_idempotent() {
        let mut s = PresenceState::default();
        let d = join("1", meta("a", Owner::from_raw(1)));
        assert!(!s.apply("t", &d).is_empty());
        assert!(s.apply("t", &d).is_empty());
        let l = leave("1", "a");
        assert!(!s.apply("t", &l).is_empty());
        assert!(s.apply("t", &l).is_empty());
    }

    #[test]
    fn merged_diffs_cancel_a_join_that_left_in_the_same_window() {
        let mut s = PresenceState::default();
        let mut acc = s.apply("t", &join("1", meta("a", Owner::from_raw(1))));
        acc.merge(s.apply("t", &join("2", meta("b", Owner::from_raw(1)))));
        acc.merge(s.apply("t", &leave("1", "a")));
        assert_eq!(
            acc.to_json(),
            r#"{"joins":{"2":{"metas":[{"name":"b","phx_ref":"b"}]}},"leaves":{}}"#
        );
    }

    #[test]
    fn dropping_an_owner_reports_its_leaves() {
        let mut s = PresenceState::default();
        s.apply("t", &join("1", meta("a", Owner::from_raw(1))));
        s.apply("t", &join("1", meta("b", Owner::from_raw(2))));
        s.apply("u", &join("2", meta("c", Owner::from_raw(2))));
        let mut diffs = s.drop_owner(|o| o == Owner::from_raw(2));
        diffs.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(diffs.len(), 2);
        assert_eq!(
            s.list_json("t"),
            r#"{"1":{"metas":[{"name":"a","phx_ref":"a"}]}}"#
        );
        assert_eq!(s.list_json("u"), "{}");
    }

    #[test]
    fn replacing_an_origins_state_reports_the_difference() {
        let mut s = PresenceState::default();
        s.apply("t", &join("1", meta("a", Owner::from_raw(1 << 32))));
        s.apply("t", &join("2", meta("b", Owner::from_raw(1 << 32))));
        s.apply("t", &join("3", meta("c", Owner::from_raw(2 << 32))));
        let from_one = |o: Owner| o.node() == 1;
        let diff = s.replace_origin(
            "t",
            from_one,
            &[
                ("2".into(), meta("b", Owner::from_raw(1 << 32))),
                ("4".into(), meta("d", Owner::from_raw(1 << 32))),
            ],
        );
        assert_eq!(
            diff.to_json(),
            r#"{"joins":{"4":{"metas":[{"name":"d","phx_ref":"d"}]}},"leaves":{"1":{"metas":[{"name":"a","phx_ref":"a"}]}}}"#
        );
        assert_eq!(s.entries("t", from_one).len(), 2);
        assert_eq!(s.count("t"), 3);
    }

    #[test]
    fn keys_are_json_escaped() {
        let mut s = PresenceState::default();
        s.apply("t", &join("a\"b", meta("r", Owner::from_raw(1))));
        assert_eq!(
            s.list_json("t"),
            r#"{"a\"b":{"metas":[{"name":"r","phx_ref":"r"}]}}"#
        );
    }
}
