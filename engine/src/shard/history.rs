//! History and recovery of the topics whose route keeps it
//! ([`crate::Router::history`]): the ring of a topic's last broadcasts, kept on the
//! topic's owner core, which assigns every broadcast its offset; and what crosses the
//! mesh to sequence a broadcast there or to fetch a joiner's replay from there.
//!
//! One owner core per topic ([`owner_core`]) makes one order: every broadcast on the
//! topic, wherever it was published, is sequenced there, kept, and fanned out from
//! there, so the subscribers on every core get them in the offsets' order. A joiner on
//! another core is subscribed only when the owner's answer arrives (the mesh keeps
//! each pair's messages in order), so replay and live broadcasts meet with no gap and
//! no duplicate. Pure state and plain messages: the shard runs them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::position::Position;
use crate::proto::Payload;
use crate::shard::conn::ConnId;
use crate::shard::Broadcast;

/// What a route keeps: the last `size` broadcasts of each topic, each for `ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct History {
    /// Broadcasts kept per topic.
    pub(crate) size: usize,
    /// How long each is kept.
    pub(crate) ttl: Duration,
}

impl History {
    pub(crate) fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis().min(u64::MAX as u128) as u64
    }
}

/// The core that sequences `topic`'s broadcasts, of `cores` (FNV-1a of the topic).
pub(crate) fn owner_core(topic: &str, cores: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % cores.max(1) as u64) as usize
}

/// A fresh epoch: `seed` (different at every start) mixed with the core and a count
/// of the epochs it made, so that no two histories of one topic share one.
pub(crate) fn epoch(seed: u64, core: usize, n: u64) -> u64 {
    // splitmix64's finalizer.
    let mut z = seed ^ ((core as u64) << 56) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

/// One topic's history: its epoch, the offset of its latest broadcast, and the last
/// broadcasts with the time each was kept (ms on the shard's clock). Generic over what
/// it keeps so that its rules are tested on plain values.
#[derive(Debug)]
pub(crate) struct Ring<T> {
    epoch: u64,
    /// Offset of the latest broadcast; 0 before the first.
    last: u64,
    /// Last broadcast or fetch (ms): a topic nobody used for a ttl may be forgotten.
    touched_ms: u64,
    /// Offsets `last - len + 1 ..= last`, oldest first.
    entries: VecDeque<(u64, T)>,
}

impl<T: Clone> Ring<T> {
    pub(crate) fn new(epoch: u64, now_ms: u64) -> Self {
        Ring {
            epoch,
            last: 0,
            touched_ms: now_ms,
            entries: VecDeque::new(),
        }
    }

    /// The latest broadcast's position (offset 0: none yet).
    pub(crate) fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.last,
        }
    }

    /// The position the next broadcast takes.
    pub(crate) fn next(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.last + 1,
        }
    }

    /// Keeps `item` at [`Ring::next`]; past `size` the oldest goes.
    pub(crate) fn push(&mut self, now_ms: u64, item: T, size: usize) {
        self.last += 1;
        self.touched_ms = now_ms;
        self.entries.push_back((now_ms, item));
        while self.entries.len() > size {
            self.entries.pop_front();
        }
    }

    /// Marks the ring used at `now_ms` (a join asked for its position).
    pub(crate) fn touch(&mut self, now_ms: u64) {
        self.touched_ms = now_ms;
    }

    /// Drops what was kept `ttl_ms` ago or earlier.
    pub(crate) fn expire(&mut self, now_ms: u64, ttl_ms: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now_ms.saturating_sub(*at) >= ttl_ms)
        {
            self.entries.pop_front();
        }
    }

    /// Every broadcast after `since`, oldest first, if all of them are still kept;
    /// `None` for another epoch, a position ahead of the latest, or one too old.
    pub(crate) fn since(&mut self, since: Position, now_ms: u64, ttl_ms: u64) -> Option<Vec<T>> {
        self.expire(now_ms, ttl_ms);
        self.touched_ms = now_ms;
        if since.epoch != self.epoch || since.offset > self.last {
            return None;
        }
        // The offset just before the oldest kept one.
        let before_oldest = self.last - self.entries.len() as u64;
        if since.offset < before_oldest {
            return None;
        }
        let skip = (since.offset - before_oldest) as usize;
        Some(self.entries.iter().skip(skip).map(|(_, t)| t.clone()).collect())
    }

    /// Broadcasts kept.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing kept and untouched for `ttl_ms`: forgetting it loses nothing a client
    /// could still recover (its epoch goes with it).
    pub(crate) fn idle(&self, now_ms: u64, ttl_ms: u64) -> bool {
        self.entries.is_empty() && now_ms.saturating_sub(self.touched_ms) >= ttl_ms
    }
}

/// A broadcast on a topic with history, on its way to the owner core to be sequenced.
pub(crate) struct Publish {
    pub(crate) topic: Box<str>,
    pub(crate) event: Box<str>,
    pub(crate) payload: Payload,
    pub(crate) from: Option<(usize, ConnId)>,
}

/// The owner's answer to a join: the topic's latest position, and, when the join
/// asked `since` a position, the replay or that it cannot be had.
pub(crate) struct Answer {
    pub(crate) position: Position,
    pub(crate) replay: Replay,
}

impl Answer {
    /// The answer when history cannot be asked (Redis away): position 0:0, and a
    /// `since` is not recovered.
    pub(crate) fn unavailable(since: Option<Position>) -> Answer {
        Answer {
            position: Position { epoch: 0, offset: 0 },
            replay: match since {
                Some(_) => Replay::Lost,
                None => Replay::NotAsked,
            },
        }
    }
}

/// What a join with `since` gets.
pub(crate) enum Replay {
    /// The join carried no `since`.
    NotAsked,
    /// Every broadcast after `since`, in order (`"recovered": true`).
    Recovered(Vec<Arc<Broadcast>>),
    /// Some are gone, or the epoch changed (`"recovered": false`).
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 300_000;

    fn at(epoch: u64, offset: u64) -> Position {
        Position { epoch, offset }
    }

    #[test]
    fn offsets_grow_by_one_from_one_and_the_ring_keeps_the_last_size() {
        let mut ring = Ring::new(7, 0);
        assert_eq!(ring.position(), at(7, 0), "none yet");
        for n in 1..=5u64 {
            assert_eq!(ring.next(), at(7, n));
            ring.push(0, n, 3);
        }
        assert_eq!(ring.position(), at(7, 5));
        assert_eq!(ring.len(), 3);
        assert_eq!(
            ring.since(at(7, 2), 0, TTL),
            Some(vec![3, 4, 5]),
            "all after 2 kept"
        );
        assert_eq!(ring.since(at(7, 4), 0, TTL), Some(vec![5]));
        assert_eq!(ring.since(at(7, 5), 0, TTL), Some(vec![]), "nothing missed");
        assert_eq!(ring.since(at(7, 1), 0, TTL), None, "2 is gone");
        assert_eq!(ring.since(at(7, 6), 0, TTL), None, "ahead of the latest");
        assert_eq!(ring.since(at(8, 5), 0, TTL), None, "another epoch");
    }

    #[test]
    fn a_topic_that_never_broadcast_recovers_from_offset_zero() {
        let mut ring: Ring<u64> = Ring::new(3, 0);
        assert_eq!(ring.since(at(3, 0), 0, TTL), Some(vec![]));
        ring.push(1, 10, 100);
        assert_eq!(ring.since(at(3, 0), 1, TTL), Some(vec![10]));
    }

    #[test]
    fn entries_expire_after_the_ttl_on_the_clock_passed_in() {
        let mut ring = Ring::new(1, 0);
        ring.push(0, "a", 10);
        ring.push(100, "b", 10);
        assert_eq!(ring.since(at(1, 0), TTL - 1, TTL), Some(vec!["a", "b"]));
        assert_eq!(
            ring.since(at(1, 0), TTL, TTL),
            None,
            "a expired: after 0 cannot be had"
        );
        assert_eq!(ring.since(at(1, 1), TTL, TTL), Some(vec!["b"]));
        assert_eq!(ring.since(at(1, 1), TTL + 100, TTL), None, "b expired too");
        assert_eq!(
            ring.since(at(1, 2), TTL + 100, TTL),
            Some(vec![]),
            "the latest is known"
        );
        assert_eq!(ring.position(), at(1, 2), "expiry keeps the offsets");
    }

    #[test]
    fn a_ring_is_idle_once_empty_and_untouched_for_a_ttl() {
        let mut ring = Ring::new(1, 0);
        assert!(!ring.idle(TTL - 1, TTL));
        assert!(ring.idle(TTL, TTL));
        ring.push(TTL, 1, 10);
        assert!(!ring.idle(3 * TTL, TTL), "holds an entry");
        ring.expire(2 * TTL, TTL);
        assert!(ring.idle(2 * TTL, TTL));
        let _ = ring.since(at(1, 1), 2 * TTL, TTL);
        assert!(!ring.idle(2 * TTL + 1, TTL), "a fetch touches it");
    }

    #[test]
    fn a_size_of_zero_keeps_nothing_but_still_counts() {
        let mut ring = Ring::new(1, 0);
        ring.push(0, 1, 0);
        ring.push(0, 2, 0);
        assert_eq!(ring.len(), 0);
        assert_eq!(ring.since(at(1, 2), 0, TTL), Some(vec![]));
        assert_eq!(ring.since(at(1, 1), 0, TTL), None);
    }

    #[test]
    fn epochs_differ_by_seed_core_and_count_and_owners_spread() {
        let e = [epoch(1, 0, 0), epoch(2, 0, 0), epoch(1, 1, 0), epoch(1, 0, 1)];
        for i in 0..e.len() {
            for j in i + 1..e.len() {
                assert_ne!(e[i], e[j]);
            }
        }
        let owners: std::collections::HashSet<_> =
            (0..64).map(|i| owner_core(&format!("rooms:{i}"), 4)).collect();
        assert_eq!(owners.len(), 4, "64 topics use every core of 4");
    }
}
