//! A random sequence of client messages (join_ref, topic, event) routed through
//! `ChannelTable` with the same inserts and removes the shard's session does
//! (engine/src/shard/session.rs), against a model (topic → join_ref).
//! Invariants: at most one entry per topic; the table always equals the model; every
//! route result is consistent with the table (index in range and on the same topic,
//! Stale only for a different join_ref, Join/Unmatched/LeaveUnjoined only when unjoined);
//! the 100-channel cap holds.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringcast::proto::socket::{ChannelTable, Route};
use ringcast::proto::Ref;

const MAX_CHANNELS: usize = 100;
const TOPICS: [&str; 8] = ["rooms:a", "rooms:b", "bench:x", "phoenix", "", "rooms:a ", "notifications:1", "ROOMS:A"];
const EVENTS: [&str; 7] = ["phx_join", "phx_leave", "heartbeat", "new_msg", "ping", "crash", "phx_close"];

#[derive(Arbitrary, Debug)]
struct Msg {
    /// A ref: below 128 the string "<n>", from 128 on the number n - 128, so that "1" and
    /// 1 both occur (they are different refs).
    join_ref: Option<u8>,
    msg_ref: Option<u8>,
    topic: u8,
    /// An index into TOPICS, or (when ≥ 8) a generated topic "t<n>" so the cap is reached.
    topic_n: u8,
    event: u8,
    /// Whether the channel's join handler accepts the join.
    accept: bool,
}

fuzz_target!(|msgs: Vec<Msg>| {
    let mut table: ChannelTable<u32> = ChannelTable::default();
    let mut model: BTreeMap<String, Ref> = BTreeMap::new();
    let mut serial = 0u32;
    for m in msgs {
        let topic: String = if (m.topic as usize) < TOPICS.len() {
            TOPICS[m.topic as usize].to_string()
        } else {
            format!("t{}", m.topic_n % 128)
        };
        let event = EVENTS[m.event as usize % EVENTS.len()];
        let as_ref = |r: u8| match r {
            0..128 => Ref::from(r.to_string().as_str()),
            _ => Ref::from(i64::from(r - 128)),
        };
        let join_ref = m.join_ref.map(as_ref);
        let msg_ref = m.msg_ref.map(as_ref);
        let route = table.route(join_ref.as_ref(), &topic, event);
        assert_eq!(route, table.route(join_ref.as_ref(), &topic, event), "route is not a function");
        let joined = model.get(&topic).cloned();
        let new_join_ref = || join_ref.clone().or_else(|| msg_ref.clone()).unwrap_or_else(Ref::null);
        match route {
            Route::Heartbeat => assert!(topic == "phoenix" && event == "heartbeat"),
            Route::LeaveUnjoined => assert!(joined.is_none() && event == "phx_leave"),
            Route::Unmatched => assert!(joined.is_none() && event != "phx_join" && event != "phx_leave"),
            Route::Join => {
                assert!(joined.is_none() && event == "phx_join");
                assert_eq!(table.position(&topic), None);
                if m.accept && table.len() < MAX_CHANNELS {
                    serial += 1;
                    let i = table.insert(topic.as_str().into(), new_join_ref(), serial);
                    assert_eq!(&*table.get(i).topic, topic);
                    model.insert(topic.clone(), new_join_ref());
                }
            }
            Route::Rejoin(i) => {
                assert!(event == "phx_join");
                assert!(i < table.len(), "index {i} out of {}", table.len());
                assert_eq!(&*table.get(i).topic, topic);
                assert_eq!(Some(&table.get(i).join_ref), joined.as_ref());
                // end_channel, then start_join
                let old = table.remove(i);
                assert_eq!(&*old.topic, topic);
                model.remove(&topic);
                assert_eq!(table.position(&topic), None);
                if m.accept && table.len() < MAX_CHANNELS {
                    serial += 1;
                    table.insert(topic.as_str().into(), new_join_ref(), serial);
                    model.insert(topic.clone(), new_join_ref());
                }
            }
            Route::Stale => {
                let stored = joined.expect("Stale for an unjoined topic");
                assert!(event != "phx_join");
                assert!(join_ref.as_ref().is_some_and(|jr| *jr != stored), "Stale with a matching join_ref");
            }
            Route::Deliver(i) => {
                assert!(i < table.len(), "index {i} out of {}", table.len());
                assert_eq!(&*table.get(i).topic, topic);
                let stored = joined.expect("Deliver to an unjoined topic");
                assert!(event != "phx_join");
                assert!(join_ref.is_none() || join_ref.as_ref() == Some(&stored));
                if event == "phx_leave" || event == "crash" {
                    let gone = table.remove(i);
                    assert_eq!(&*gone.topic, topic);
                    model.remove(&topic);
                }
            }
        }
        // The table equals the model; one entry per topic.
        assert_eq!(table.len(), model.len());
        assert!(table.len() <= MAX_CHANNELS);
        let mut seen = BTreeSet::new();
        for i in 0..table.len() {
            let j = table.get(i);
            assert!(seen.insert(j.topic.clone()), "topic {:?} twice", j.topic);
            assert_eq!(model.get(&*j.topic), Some(&j.join_ref));
            assert_eq!(table.position(&j.topic), Some(i));
        }
    }
    let drained: Vec<_> = table.drain().map(|j| j.topic).collect();
    assert_eq!(drained.len(), model.len());
    assert!(table.is_empty());
});
