//! Random presence deltas from a few owners, each owner issuing deltas only about its
//! own metas (as PROTOCOL.md §13 and presence.rs require), applied to two
//! `PresenceState` replicas in different interleavings that keep each owner's order.
//! Invariants: both replicas end with the same `list_json` on every topic (compared with
//! each key's metas in a canonical order; strictly, byte for byte, when the env var
//! RINGCAST_FUZZ_PRESENCE_STRICT is set), equal to a model; replaying a delta changes
//! nothing; the diffs, folded by a client as Phoenix's `syncDiff` does, rebuild the state;
//! dropping an owner leaves the replicas equal.
#![no_main]

use std::collections::{BTreeSet, VecDeque};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringcast::proto::presence::{Delta, Meta, Owner, PresenceState};
use serde_json::Value;

const OWNERS: usize = 3;
const TOPICS: [&str; 2] = ["rooms:a", "rooms:b"];

#[derive(Arbitrary, Debug)]
struct Step {
    owner: u8,
    topic: u8,
    joins: Vec<(u8, u8)>,
    /// Indices into the owner's live metas on the topic.
    leaves: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    steps: Vec<Step>,
    /// Picks which owner's queue the second replica takes from next.
    order: Vec<u8>,
}

/// (topic, key, phx_ref) of every live meta.
type Model = BTreeSet<(String, String, String)>;

fn canonical(list_json: &str) -> Value {
    let mut v: Value = serde_json::from_str(list_json).expect("list_json is JSON");
    for (_, group) in v.as_object_mut().expect("an object").iter_mut() {
        let metas = group["metas"].as_array_mut().expect("metas");
        metas.sort_by(|a, b| a["phx_ref"].as_str().cmp(&b["phx_ref"].as_str()));
    }
    v
}

fn model_of(state: &PresenceState) -> Model {
    let mut out = Model::new();
    for topic in TOPICS {
        let v: Value = serde_json::from_str(&state.list_json(topic)).unwrap();
        for (key, group) in v.as_object().unwrap() {
            let metas = group["metas"].as_array().unwrap();
            assert!(!metas.is_empty(), "a key with no metas in list_json");
            for m in metas {
                out.insert((topic.into(), key.clone(), m["phx_ref"].as_str().unwrap().into()));
            }
        }
    }
    out
}

/// A client folding presence_diff payloads (phoenix.js `syncDiff`, by phx_ref).
fn client_apply(client: &mut Model, topic: &str, diff_json: &str) {
    let v: Value = serde_json::from_str(diff_json).expect("diff is JSON");
    for (key, group) in v["leaves"].as_object().expect("leaves") {
        for m in group["metas"].as_array().unwrap() {
            let r = m["phx_ref"].as_str().unwrap();
            assert!(client.remove(&(topic.into(), key.clone(), r.into())), "diff leaves an unknown meta {r}");
        }
    }
    for (key, group) in v["joins"].as_object().expect("joins") {
        for m in group["metas"].as_array().unwrap() {
            let r = m["phx_ref"].as_str().unwrap();
            assert!(client.insert((topic.into(), key.clone(), r.into())), "diff joins a known meta {r}");
        }
    }
}

fuzz_target!(|input: Input| {
    let strict = std::env::var_os("RINGCAST_FUZZ_PRESENCE_STRICT").is_some();
    // Generate each owner's deltas, in order, from the steps.
    let mut live: Vec<Vec<Vec<(Box<str>, Box<str>)>>> = vec![vec![Vec::new(); TOPICS.len()]; OWNERS];
    let mut queues: Vec<VecDeque<(usize, Delta)>> = vec![VecDeque::new(); OWNERS];
    let mut all: Vec<(usize, usize, Delta)> = Vec::new();
    let mut model = Model::new();
    let mut serial = 0u32;
    for step in input.steps.iter().take(64) {
        let owner = step.owner as usize % OWNERS;
        let t = step.topic as usize % TOPICS.len();
        let mut delta = Delta::default();
        let mine = &mut live[owner][t];
        let mut leave_idx: Vec<usize> = step.leaves.iter().take(4).filter(|_| !mine.is_empty()).map(|&i| i as usize % mine.len()).collect();
        leave_idx.sort_unstable();
        leave_idx.dedup();
        for &i in leave_idx.iter().rev() {
            let (key, r) = mine.remove(i);
            model.remove(&(TOPICS[t].into(), key.to_string(), r.to_string()));
            delta.leaves.push((key, r));
        }
        for &(key, name) in step.joins.iter().take(4) {
            serial += 1;
            let key: Box<str> = format!("u{}", key % 4).into();
            let phx_ref: Box<str> = format!("o{owner}r{serial}").into();
            let prev = (name % 3 == 0).then(|| format!("o{owner}r{}", serial.saturating_sub(1)));
            let meta = Meta::new(serde_json::json!({"name": format!("n{name}")}), phx_ref.clone(), prev.as_deref(), Owner::from_raw(owner as u64));
            model.insert((TOPICS[t].into(), key.to_string(), phx_ref.to_string()));
            mine.push((key.clone(), phx_ref));
            delta.joins.push((key, meta));
        }
        queues[owner].push_back((t, delta.clone()));
        all.push((owner, t, delta));
    }

    // Replica A: generation order; each delta applied twice (the replay changes nothing).
    let mut a = PresenceState::default();
    let mut client = Model::new();
    for (_, t, delta) in &all {
        let diff = a.apply(TOPICS[*t], delta);
        client_apply(&mut client, TOPICS[*t], &diff.to_json());
        assert!(a.apply(TOPICS[*t], delta).is_empty(), "a replayed delta changed something");
    }
    // Replica B: another interleaving keeping each owner's order.
    let mut b = PresenceState::default();
    let mut pick = input.order.iter().copied().cycle();
    let mut left: usize = queues.iter().map(VecDeque::len).sum();
    while left > 0 {
        let mut o = pick.next().unwrap_or(0) as usize % OWNERS;
        while queues[o].is_empty() {
            o = (o + 1) % OWNERS;
        }
        let (t, delta) = queues[o].pop_front().unwrap();
        b.apply(TOPICS[t], &delta);
        left -= 1;
    }

    assert_eq!(model_of(&a), model, "replica A differs from the model");
    assert_eq!(client, model, "the diffs do not rebuild the state");
    for topic in TOPICS {
        let (ja, jb) = (a.list_json(topic), b.list_json(topic));
        if strict {
            assert_eq!(ja, jb, "replicas differ byte for byte on {topic}");
        }
        assert_eq!(canonical(&ja), canonical(&jb), "replicas differ on {topic}:\n{ja}\n{jb}");
        assert_eq!(a.count(topic), b.count(topic));
    }

    // Owner 0's origin dies: both replicas drop the same entries.
    let da = a.drop_owner(|o| o == Owner::from_raw(0));
    let db = b.drop_owner(|o| o == Owner::from_raw(0));
    assert_eq!(da.len(), db.len());
    for topic in TOPICS {
        assert_eq!(canonical(&a.list_json(topic)), canonical(&b.list_json(topic)));
        assert!(a.entries(topic, |o| o == Owner::from_raw(0)).is_empty());
    }
    let expected: Model = model.iter().filter(|(_, _, r)| !r.starts_with("o0r")).cloned().collect();
    assert_eq!(model_of(&a), expected);
});
