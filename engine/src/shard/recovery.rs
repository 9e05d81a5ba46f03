//! The shard's side of history and recovery: publishing on a topic with history
//! (through its owner core, which sequences and keeps it), and answering a join with
//! its position and, with `since`, its replay. The rules of the ring itself are in
//! [`super::history`].
//!
//! A join on the owner core is answered at once. A join on another core holds the
//! topic's interest (the owner forwards the topic here from then on), asks the owner
//! over the mesh, and is subscribed the moment the answer arrives: the owner sent
//! every broadcast sequenced after its answer behind it on the same ring, so the
//! joiner gets the replay and then the live broadcasts, none twice, none missing.
//!
//! In cluster mode Redis takes the owner's part (`crate::cluster::history`): broadcasts
//! go to the Redis link to be sequenced, every core gets them back in Redis's order, a
//! join's fetch goes to the link, and a joiner is subscribed when the answer arrives;
//! broadcasts up to its answer's position still on their way skip it.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::conn::{Conn, Mail, OutFrame};
use super::history::{self, Answer, History, Publish, Replay};
use super::mesh::MeshMsg;
use super::{Broadcast, Shard, Sub};
use crate::proto::position::Position;
use crate::proto::serializer::{encode, Outgoing};
use crate::proto::{Payload, Ref};
use crate::shard::conn::ConnId;

/// A join on a topic with history, accepted by its channel, waiting to be answered:
/// everything its reply, its replay and its subscription need.
pub(crate) struct Recovery {
    pub(crate) conn: Rc<Conn>,
    pub(crate) topic: Rc<str>,
    pub(crate) join_ref: Ref,
    pub(crate) msg_ref: Option<Ref>,
    /// The channel's ok response; `position` (and `recovered`) are added to it.
    pub(crate) response: Payload,
    pub(crate) since: Option<Position>,
    /// The `phx_close` of a channel this join replaced, sent right after the reply.
    pub(crate) closed_old: Option<Bytes>,
    /// Pushes the channel made while joining, sent after the replay.
    pub(crate) deferred: Vec<OutFrame>,
    pub(crate) intercepts: &'static [&'static str],
    /// Set once answered; the session waits for it.
    pub(crate) done: Rc<Cell<bool>>,
}

/// Cluster mode: a join answered from Redis is subscribed at once (presence and
/// pushes reach it), but the topic's broadcasts up to `after`, the position its replay
/// ended at, may still be on their way from Redis: those skip it.
pub(crate) struct Admit {
    after: Position,
    conn: Rc<Conn>,
}

/// Whether `conn` still has the channel of `topic` joined under `join_ref`.
fn joined(conn: &Conn, topic: &str, join_ref: &Ref) -> bool {
    conn.close.get().is_none() && {
        let channels = conn.channels.borrow();
        channels
            .position(topic)
            .is_some_and(|i| channels.get(i).join_ref == *join_ref)
    }
}

impl Shard {
    /// The history `topic` keeps, if its route keeps one.
    pub(crate) fn history_of(&self, topic: &str) -> Option<History> {
        self.app.router.history_of(topic)
    }

    /// The core that sequences `topic`.
    pub(crate) fn owner_of(&self, topic: &str) -> usize {
        history::owner_core(topic, self.mesh.as_ref().map_or(1, |m| m.peers()))
    }

    /// Broadcasts from a channel, the endpoint or the HTTP API on this core: a topic
    /// without history takes today's path ([`Shard::publish`]); one with history goes
    /// to its owner core to be sequenced.
    pub(crate) fn broadcast(
        &self,
        topic: &str,
        event: &str,
        payload: Payload,
        from: Option<(usize, ConnId)>,
    ) {
        let Some(history) = self.history_of(topic) else {
            return self.publish(Broadcast::new(topic, event, payload, from));
        };
        self.stats.broadcasts.add(1);
        let publish = Publish {
            topic: topic.into(),
            event: event.into(),
            payload,
            from,
        };
        if let Some(cluster) = self.endpoint.cluster() {
            // Redis sequences it; every node, this one included, gets it from there.
            return cluster.sequence(publish, history);
        }
        match &self.mesh {
            Some(mesh) if self.owner_of(topic) != self.index => {
                let owner = self.owner_of(topic);
                mesh.send_to(owner, MeshMsg::Sequence(Box::new(publish)));
            }
            _ => self.sequence(publish),
        }
    }

    /// The ring of `topic`, made with a fresh epoch if this core holds none.
    fn with_ring<R>(
        &self,
        topic: &str,
        now_ms: u64,
        f: impl FnOnce(&mut history::Ring<Arc<Broadcast>>) -> R,
    ) -> R {
        let mut rings = self.histories.borrow_mut();
        if let Some(ring) = rings.get_mut(topic) {
            return f(ring);
        }
        let n = self.epochs_made.get();
        self.epochs_made.set(n + 1);
        let epoch = history::epoch(self.app.epoch_seed, self.index, n);
        self.stats.history_topics.add(1);
        f(rings
            .entry(topic.into())
            .or_insert(history::Ring::new(epoch, now_ms)))
    }

    /// On the owner core: gives the broadcast the topic's next offset, keeps it, and
    /// fans it out here and to every core with subscribers. A binary payload keeps
    /// its place in the order but takes no offset (its frame has no `ref` slot).
    pub(crate) fn sequence(&self, p: Publish) {
        let Some(history) = self.history_of(&p.topic) else {
            return self.publish(Broadcast::new(&p.topic, &p.event, p.payload, p.from));
        };
        let now = self.clock().now_ms();
        let b = if matches!(p.payload, Payload::Binary(_)) {
            Arc::new(Broadcast::new(&p.topic, &p.event, p.payload, p.from))
        } else {
            self.with_ring(&p.topic, now, |ring| {
                let b = Arc::new(Broadcast::at(&p.topic, &p.event, p.payload, p.from, ring.next()));
                let before = ring.len();
                ring.push(now, b.clone(), history.size);
                let after = ring.len();
                self.stats.history_entries.add(after as u64);
                self.stats.history_entries.sub(before as u64);
                b
            })
        };
        if let Some(mesh) = &self.mesh {
            mesh.forward(&b);
        }
        self.deliver_local(&b);
    }

    /// On the owner core: the topic's position and, for `since`, the replay.
    pub(crate) fn history_answer(&self, topic: &str, since: Option<Position>) -> Answer {
        let ttl = self.history_of(topic).map_or(0, |h| h.ttl_ms());
        let now = self.clock().now_ms();
        self.with_ring(topic, now, |ring| {
            let before = ring.len();
            let replay = match since {
                None => {
                    ring.touch(now);
                    Replay::NotAsked
                }
                Some(since) => match ring.since(since, now, ttl) {
                    Some(list) => Replay::Recovered(list),
                    None => Replay::Lost,
                },
            };
            self.stats.history_entries.sub((before - ring.len()) as u64);
            Answer {
                position: ring.position(),
                replay,
            }
        })
    }

    /// Answers a join accepted on a topic with history: at once on the owner core
    /// (`true`), else once the owner's answer arrives (`false`; `job.done` is set then).
    pub(crate) fn recover(&self, job: Recovery) -> bool {
        let owner = self.owner_of(&job.topic);
        let id = self.next_fetch.get() + 1;
        if let (Some(cluster), Some(history)) = (self.endpoint.cluster(), self.history_of(&job.topic)) {
            // Redis answers through this core's inbox ([`Shard::complete_recovery`]).
            self.hold(&job.topic);
            self.next_fetch.set(id);
            let (topic, since) = (job.topic.clone(), job.since);
            self.awaiting.borrow_mut().insert(id, job);
            if cluster.fetch(self.index, id, &topic, since, history) {
                return false;
            }
            let job = self.awaiting.borrow_mut().remove(&id).expect("just inserted");
            self.complete_recovery(job, Answer::unavailable(since));
            return true;
        }
        match &self.mesh {
            Some(mesh) if owner != self.index => {
                self.hold(&job.topic);
                self.next_fetch.set(id);
                let (topic, since) = (Arc::from(&*job.topic), job.since);
                self.awaiting.borrow_mut().insert(id, job);
                let core = self.index;
                mesh.send_to(
                    owner,
                    MeshMsg::HistoryFetch {
                        topic,
                        since,
                        core,
                        id,
                    },
                );
                false
            }
            _ => {
                let answer = self.history_answer(&job.topic, job.since);
                if let Some((topic, sub, _)) = self.answer_if_joined(job, answer) {
                    self.subscribe_now(&topic, sub);
                }
                true
            }
        }
    }

    /// A join answered by the owner core over the mesh, or by Redis: reply, replay,
    /// and the subscription, which now replaces the hold on the topic's interest. The
    /// owner's later broadcasts come behind its answer; Redis's before the answer's
    /// position may still be on their way, and skip the joiner, which has them
    /// ([`Shard::deliver_sequenced`]).
    pub(crate) fn complete_recovery(&self, job: Recovery, answer: Answer) {
        let topic = job.topic.clone();
        let after = answer.position;
        if let Some((_, sub, _)) = self.answer_if_joined(job, answer) {
            // Position 0:0: Redis was away, there is no order to wait for.
            if self.endpoint.cluster().is_some() && after.epoch != 0 {
                let admit = Admit {
                    after,
                    conn: sub.conn.clone(),
                };
                let mut admitting = self.admitting.borrow_mut();
                admitting.entry((*topic).into()).or_default().push(admit);
            }
            self.subscribe_now(&topic, sub);
        }
        self.release_hold(&topic);
    }

    fn subscribe_now(&self, topic: &str, sub: Sub) {
        if let Some(ack) = self.subscribe(topic, sub) {
            // Broadcasts on this topic all come from its owner (or Redis): no ack to
            // wait for.
            self.acks.forget(ack);
        }
    }

    /// Sends the join's reply and replay if its channel is still there, and returns
    /// what to subscribe. Either way the session waiting for it goes on.
    fn answer_if_joined(&self, job: Recovery, answer: Answer) -> Option<(Rc<str>, Sub, Ref)> {
        if !joined(&job.conn, &job.topic, &job.join_ref) {
            job.done.set(true);
            job.conn.wake();
            return None;
        }
        let (topic, join_ref) = (job.topic.clone(), job.join_ref.clone());
        Some((topic, self.answer_join(job, answer), join_ref))
    }

    /// A broadcast from Redis on a topic with history. Joins answered with a replay
    /// that already holds it skip it; the first broadcast past a join's replay ends
    /// its skipping.
    pub(crate) fn deliver_sequenced(&self, b: &Arc<Broadcast>) {
        let at = b.position.expect("a sequenced broadcast");
        let skip = {
            let mut admitting = self.admitting.borrow_mut();
            match admitting.get_mut(&*b.topic) {
                None => Vec::new(),
                Some(list) => {
                    list.retain(|a| at.epoch == a.after.epoch && at.offset <= a.after.offset);
                    let skip: Vec<ConnId> = list.iter().map(|a| a.conn.id).collect();
                    if list.is_empty() {
                        admitting.remove(&*b.topic);
                    }
                    skip
                }
            }
        };
        self.deliver_skipping(b, &skip);
    }

    /// A broadcast Redis could not sequence (it was away) on a topic with history:
    /// there is no order to keep, every subscriber takes it.
    pub(crate) fn deliver_unsequenced(&self, b: &Arc<Broadcast>) {
        self.admitting.borrow_mut().remove(&*b.topic);
        self.deliver_local(b);
    }

    fn answer_join(&self, job: Recovery, answer: Answer) -> Sub {
        let conn = &job.conn;
        let mut response = job.response;
        if let Payload::Json(Value::Object(map)) = &mut response {
            map.insert("position".into(), answer.position.to_string().into());
            match &answer.replay {
                Replay::NotAsked => {}
                Replay::Recovered(_) => {
                    map.insert("recovered".into(), true.into());
                }
                Replay::Lost => {
                    map.insert("recovered".into(), false.into());
                }
            }
        }
        let reply = Outgoing::reply(
            Some(&job.join_ref),
            job.msg_ref.as_ref(),
            &job.topic,
            "ok",
            &response,
        );
        if let Ok(frame) = encode(conn.vsn, &reply) {
            conn.enqueue(OutFrame::Own(frame));
        }
        if let Some(close) = job.closed_old {
            conn.enqueue(OutFrame::Own(close));
        }
        for frame in job.deferred {
            conn.enqueue(frame);
        }
        match answer.replay {
            Replay::NotAsked => {}
            Replay::Lost => self.stats.history_lost.add(1),
            Replay::Recovered(list) => {
                self.stats.history_recovered.add(1);
                self.stats.history_replayed.add(list.len() as u64);
                // From the first intercepted broadcast on, the replay goes through the
                // mailbox (`handle_out` runs there), ahead of whatever the join mailed
                // itself: the replay comes before the channel's after-join work.
                let mut mails = Vec::new();
                for b in list {
                    if job.intercepts.contains(&&*b.event) {
                        mails.push(Mail::Out(b));
                    } else if let Some(frame) = b.frame(conn.vsn) {
                        let frame = OutFrame::Shared(Rc::new(frame.clone()));
                        if mails.is_empty() {
                            conn.enqueue(frame);
                        } else {
                            mails.push(Mail::Frame(frame));
                        }
                    }
                }
                conn.mail_first(mails);
            }
        }
        job.done.set(true);
        conn.wake();
        Sub {
            conn: conn.clone(),
            vsn: conn.vsn,
            intercepts: job.intercepts,
        }
    }

    /// Counts a join waiting for the owner as interest in `topic`.
    fn hold(&self, topic: &str) {
        let first = !self.interested_locally(topic);
        *self.held.borrow_mut().entry(topic.into()).or_default() += 1;
        if first {
            if let Some(ack) = self.interest_up(topic) {
                // Broadcasts on this topic come from its owner (or Redis): no ack to
                // wait for.
                self.acks.forget(ack);
            }
        }
    }

    /// The waiting join was answered (and subscribed, unless it went away meanwhile).
    pub(crate) fn release_hold(&self, topic: &str) {
        {
            let mut held = self.held.borrow_mut();
            let Some(n) = held.get_mut(topic) else { return };
            *n -= 1;
            if *n > 0 {
                return;
            }
            held.remove(topic);
        }
        if !self.interested_locally(topic) {
            self.interest_down(topic);
        }
    }

    /// Whether this core has subscribers, listeners or waiting joins for `topic`.
    fn interested_locally(&self, topic: &str) -> bool {
        self.topics.borrow().contains_key(topic)
            || self.listeners.borrow().contains_key(topic)
            || self.held.borrow().contains_key(topic)
    }

    /// Expires what the histories this core owns kept past their ttl, and forgets a
    /// topic nobody used for a ttl once it keeps nothing and no core subscribes to it.
    pub(crate) fn sweep_histories(&self) {
        // Answered joins of connections gone before their topic went past their replay.
        self.admitting.borrow_mut().retain(|_, list| {
            list.retain(|a| a.conn.close.get().is_none());
            !list.is_empty()
        });
        if self.histories.borrow().is_empty() {
            return;
        }
        let now = self.clock().now_ms();
        let mut entries = 0;
        self.histories.borrow_mut().retain(|topic, ring| {
            let ttl = self.app.router.history_of(topic).map_or(0, |h| h.ttl_ms());
            ring.expire(now, ttl);
            let used = self.topics.borrow().contains_key(topic)
                || self.held.borrow().contains_key(topic)
                || self.mesh.as_ref().is_some_and(|m| m.has_interest(topic));
            let keep = used || !ring.idle(now, ttl);
            if keep {
                entries += ring.len() as u64;
            }
            keep
        });
        self.stats.history_entries.set(entries);
        self.stats
            .history_topics
            .set(self.histories.borrow().len() as u64);
    }
}

/// Two shards driven in memory over a hand-delivered mesh: a joiner on the core that
/// does not own the topic, with broadcasts sequenced at every awkward moment of its
/// fetch, gets the reply, the replay and the live broadcasts once each, in order.
#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::time::Duration;

    use super::*;
    use crate::clock::Clock;
    use crate::proto::Vsn;
    use crate::shard::api::endpoint::Endpoint;
    use crate::shard::app::{App, Config};
    use crate::shard::conn::Slot;
    use crate::shard::mesh::{Mesh, MeshLink};
    use crate::{Channel, HandleResult, Router, Socket};

    struct Room;

    impl Channel for Room {
        async fn join(_: &str, _: Payload, _: &mut Socket) -> Result<(Self, Payload), Payload> {
            Ok((Room, Payload::empty()))
        }
        async fn handle_in(&mut self, _: &str, _: Payload, _: &mut Socket) -> HandleResult {
            HandleResult::NoReply
        }
    }

    type Wire = Rc<RefCell<VecDeque<(usize, MeshMsg)>>>;

    struct TestLink(Wire);

    impl MeshLink for TestLink {
        fn send(&self, peer: usize, msg: MeshMsg) {
            self.0.borrow_mut().push_back((peer, msg));
        }
    }

    fn shards(size: usize) -> (Vec<Rc<Shard>>, Wire) {
        let config = Config {
            cores: 2,
            ..Config::default()
        };
        let app = Arc::new(App {
            router: Router::new()
                .channel::<Room>("h:*")
                .history(size, Duration::from_secs(60)),
            socket: Box::new(crate::seed::UserSocket::new("s")),
            presence_fetch: None,
            stats: (0..2).map(|_| Default::default()).collect(),
            epoch_seed: 42,
            config,
        });
        let wire = Wire::default();
        let shards = (0..2)
            .map(|i| {
                let mesh = Mesh::new(i, 2, Box::new(TestLink(wire.clone())));
                Shard::new(
                    i,
                    app.clone(),
                    Endpoint::new(Vec::new(), None),
                    Some(mesh),
                    Clock::manual(),
                )
            })
            .collect();
        (shards, wire)
    }

    /// Delivers the next message on the wire; `false` when none is left.
    fn step(shards: &[Rc<Shard>], wire: &Wire) -> bool {
        let next = wire.borrow_mut().pop_front();
        let Some((to, msg)) = next else { return false };
        assert!(shards[to].handle_mesh(msg).is_none());
        true
    }

    fn deliver_all(shards: &[Rc<Shard>], wire: &Wire) {
        while step(shards, wire) {}
    }

    /// A connection on `shard` with a channel slot for `topic` under join_ref "1".
    fn member(shard: &Shard, topic: &str) -> Rc<Conn> {
        let conn = shard.add_conn(Vsn::V2, Rc::new(()), None, false);
        let slot = Slot {
            running: None,
            sub_pos: Cell::new(0),
        };
        conn.channels.borrow_mut().insert(topic.into(), "1".into(), slot);
        conn
    }

    fn joining(conn: &Rc<Conn>, topic: &str, since: Option<Position>) -> (Recovery, Rc<Cell<bool>>) {
        let done = Rc::new(Cell::new(false));
        let job = Recovery {
            conn: conn.clone(),
            topic: topic.into(),
            join_ref: "1".into(),
            msg_ref: Some("1".into()),
            response: Payload::empty(),
            since,
            closed_old: None,
            deferred: Vec::new(),
            intercepts: &[],
            done: done.clone(),
        };
        (job, done)
    }

    /// `(event, ref, payload)` of every frame queued to `conn`, emptying its queue.
    fn frames(conn: &Conn) -> Vec<(String, Value, Value)> {
        let mut out = conn.out.borrow_mut();
        let got = out
            .frames
            .iter()
            .map(|f| {
                let (_, body) = crate::proto::ws::split_frame(f.bytes()).expect("a whole frame");
                let v: Value = serde_json::from_slice(body).expect("JSON");
                (v[3].as_str().unwrap().to_string(), v[1].clone(), v[4].clone())
            })
            .collect();
        let n = out.bytes;
        out.consume(n);
        got
    }

    fn offsets(frames: &[(String, Value, Value)]) -> Vec<u64> {
        frames
            .iter()
            .filter(|(e, _, _)| e == "m")
            .map(|(_, r, _)| Position::parse(r.as_str().expect("a position")).unwrap().offset)
            .collect()
    }

    fn say(shard: &Shard, topic: &str, n: u64) {
        shard.broadcast(topic, "m", Payload::Json(serde_json::json!({ "n": n })), None);
    }

    #[test]
    fn a_joiner_on_the_other_core_gets_reply_replay_and_live_once_each_in_order() {
        let (shards, wire) = shards(10);
        let topic = (0..)
            .map(|i| format!("h:{i}"))
            .find(|t| history::owner_core(t, 2) == 0)
            .unwrap();
        let (owner, other) = (&shards[0], &shards[1]);
        // A subscriber on each core; broadcasts from both.
        for shard in [owner, other] {
            let conn = member(shard, &topic);
            let (job, done) = joining(&conn, &topic, None);
            shard.recover(job);
            deliver_all(&shards, &wire);
            assert!(done.get());
        }
        let watcher = other.topics.borrow()[topic.as_str()][0].conn.clone();
        frames(&watcher);
        say(other, &topic, 1);
        say(owner, &topic, 2);
        say(other, &topic, 3);
        deliver_all(&shards, &wire);
        assert_eq!(
            offsets(&frames(&watcher)),
            [1, 2, 3],
            "one order, from both cores"
        );

        // The watcher leaves: the other core has no subscriber left, and no interest.
        other.unsubscribe(&topic, watcher.id, 0);
        deliver_all(&shards, &wire);
        let joiner = member(other, &topic);
        let epoch = owner.history_answer(&topic, None).position.epoch;
        let (job, done) = joining(&joiner, &topic, Some(Position { epoch, offset: 1 }));
        assert!(!other.recover(job), "the owner is asked");
        say(owner, &topic, 4); // sequenced before the owner knows of the joiner
        assert!(step(&shards, &wire), "the interest reaches the owner");
        say(owner, &topic, 5); // forwarded to the other core, ahead of the answer
        say(other, &topic, 6); // on its way to the owner, behind the fetch
        deliver_all(&shards, &wire);
        assert!(done.get());
        say(owner, &topic, 7);
        deliver_all(&shards, &wire);

        let got = frames(&joiner);
        assert_eq!(got[0].0, "phx_reply");
        assert_eq!(got[0].2["response"]["recovered"], true);
        let position = got[0].2["response"]["position"].as_str().unwrap();
        assert_eq!(
            Position::parse(position).unwrap().offset,
            5,
            "the answer came after 5"
        );
        assert_eq!(offsets(&got), [2, 3, 4, 5, 6, 7], "none twice, none missing");
        assert!(other.held.borrow().is_empty(), "the hold is released");
    }

    #[test]
    fn too_old_a_since_is_not_recovered_and_a_gone_joiner_is_not_subscribed() {
        let (shards, wire) = shards(2);
        let topic = (0..)
            .map(|i| format!("h:{i}"))
            .find(|t| history::owner_core(t, 2) == 0)
            .unwrap();
        for n in 1..=4 {
            say(&shards[1], &topic, n);
        }
        deliver_all(&shards, &wire);
        let epoch = shards[0].history_answer(&topic, None).position.epoch;
        let conn = member(&shards[1], &topic);
        let (job, _) = joining(&conn, &topic, Some(Position { epoch, offset: 1 }));
        shards[1].recover(job);
        deliver_all(&shards, &wire);
        let got = frames(&conn);
        assert_eq!(got.len(), 1, "the reply alone");
        assert_eq!(got[0].2["response"]["recovered"], false);
        assert_eq!(shards[1].stats.history_lost.get(), 1);

        // A joiner whose connection closes while the owner answers is not subscribed.
        let gone = member(&shards[1], &topic);
        let (job, done) = joining(&gone, &topic, None);
        shards[1].recover(job);
        gone.request_close(1000);
        deliver_all(&shards, &wire);
        assert!(done.get());
        let subs = shards[1].topics.borrow()[topic.as_str()].len();
        assert_eq!(subs, 1, "only the first joiner");
    }

    /// Cluster mode, with the Redis link a channel the test reads: the join asks the
    /// link, the answer comes through the inbox, and sequenced broadcasts the replay
    /// already held, still on their way, skip the joiner, while the others reach it.
    #[test]
    fn in_cluster_mode_broadcasts_the_replay_held_skip_the_joiner_and_later_ones_reach_it() {
        use crate::shard::cluster::{ClusterHandle, ClusterStats, LinkCmd};
        use crate::shard::inbox::CoreCommand;
        let (tx, rx) = crossbeam_channel::bounded(64);
        let cluster = ClusterHandle::new(tx, 1, Arc::new(ClusterStats::default()));
        let app = Arc::new(App {
            router: Router::new()
                .channel::<Room>("h:*")
                .history(10, Duration::from_secs(60)),
            socket: Box::new(crate::seed::UserSocket::new("s")),
            presence_fetch: None,
            stats: vec![Default::default()],
            epoch_seed: 42,
            config: Config {
                cores: 1,
                ..Config::default()
            },
        });
        let endpoint = Endpoint::new(Vec::new(), Some(cluster));
        let shard = Shard::new(0, app, endpoint, None, Clock::manual());
        let topic = "h:c";
        let at = |offset| Position { epoch: 9, offset };
        let sequenced = |n: u64| {
            let payload = Payload::Json(serde_json::json!({ "n": n }));
            Arc::new(Broadcast::at(topic, "m", payload, None, at(n)))
        };

        // Broadcasting goes to Redis, not to the subscribers.
        shard.broadcast(topic, "m", Payload::empty(), None);
        assert!(matches!(rx.try_recv(), Ok(LinkCmd::Sequence(..))));

        let joiner = member(&shard, topic);
        let (job, done) = joining(&joiner, topic, Some(at(1)));
        assert!(!shard.recover(job), "Redis is asked");
        assert!(matches!(rx.try_recv(), Ok(LinkCmd::Interest { on: true, .. })));
        let Ok(LinkCmd::Fetch { id, since, .. }) = rx.try_recv() else {
            panic!("a fetch")
        };
        assert_eq!(since, Some(at(1)));
        let answer = Answer {
            position: at(3),
            replay: Replay::Recovered(vec![sequenced(2), sequenced(3)]),
        };
        shard.run_command(CoreCommand::HistoryReply(id, Box::new(answer)));
        assert!(done.get());
        for n in [2, 3, 4, 5] {
            shard.run_command(CoreCommand::Deliver(sequenced(n)));
        }
        let got = frames(&joiner);
        assert_eq!(got[0].0, "phx_reply");
        assert_eq!(got[0].2["response"]["recovered"], true);
        assert_eq!(offsets(&got), [2, 3, 4, 5], "2 and 3 from the replay, once");
        shard.run_command(CoreCommand::Deliver(sequenced(3)));
        assert_eq!(
            offsets(&frames(&joiner)),
            [3],
            "skipping ended with the first one past it"
        );
        assert!(shard.admitting.borrow().is_empty());
        assert!(
            shard.held.borrow().is_empty(),
            "the subscription holds the interest now"
        );
    }
}
