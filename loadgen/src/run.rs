//! The work of one process: its slice of connections spread over `cores` glommio
//! executors, plus (in the parent, for fanout) the publisher.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use slab::Slab;

use crate::client::{Conn, End, Fail, Piece, Target};
use crate::phx;
use crate::presence::{Kind, MemberReader, PresenceTally};
use crate::sys::{self, unix_nanos};

/// What the connections do once joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stay joined, heartbeat, until released.
    Hold,
    /// Subscribe: record every `new_msg` delivery of `messages` expected ones.
    Subscribe { messages: u64 },
    /// Room member: connection `i` is member `i / rooms` of room `i % rooms`. Once the
    /// run says go, it sends `per_sender` `new_msg` one `interval` apart and records
    /// every delivery of its room (its own included).
    Room {
        rooms: u64,
        members: u64,
        per_sender: u64,
        interval: Duration,
    },
    /// Churn slot: connect, join, `pushes` `new_msg`, leave, close; a new cycle every
    /// `period`, for `duration` from the start of the slice.
    Churn {
        period: Duration,
        duration: Duration,
        pushes: u64,
    },
    /// Presence room member: join with `join_payload`, read everything as pieces
    /// (counted, never parsed), count as joined once the join's own
    /// `presence_state` is read; at most `window` joins of the process under way at
    /// once. Once the run says go, look for the `watch` key in diffs.
    Presence { window: u64 },
}

/// Everything a process needs to run its slice; identical in parent and workers.
#[derive(Debug, Clone)]
pub struct Job {
    pub mode: Mode,
    pub target: Target,
    /// Source addresses to rotate over (none: let the kernel choose).
    pub sources: Vec<Ipv4Addr>,
    pub secret: String,
    pub topic: String,
    /// Spread connections over this many topics (`<topic>:<i % topics>`) when > 1.
    pub topics: u64,
    /// New connections per second for the whole run.
    pub rate: f64,
    /// Total connections of the whole run (for the rate share).
    pub total: u64,
    pub stage_timeout: Duration,
    pub cores: usize,
    pub heartbeat: Duration,
    /// Record duplicates exactly with a bitset per subscriber.
    pub exact_duplicates: bool,
    /// The `phx_join` payload (JSON text).
    pub join_payload: String,
    /// Connection i's user (its presence key) is `<user_prefix><i>`.
    pub user_prefix: String,
    /// Presence: the key whose join the members time, quoted (`"newcomer-0"`).
    pub watch: Option<Vec<u8>>,
    /// How long a slice's ramp may take (default: its share at `rate` plus slack).
    pub ramp_limit: Option<Duration>,
    /// Attempts again a connection that failed to open, this many times at most.
    pub retries: u32,
}

impl Job {
    pub fn topic_of(&self, idx: u64) -> String {
        if let Mode::Room { rooms, .. } = self.mode {
            // `topic` is the prefix: `bench:` → `bench:room-<i>`.
            format!("{}room-{}", self.topic, idx % rooms)
        } else if self.topics > 1 {
            format!("{}:{}", self.topic, idx % self.topics)
        } else {
            self.topic.clone()
        }
    }

    /// Rooms: the member index, inside `room`, of connection `sender`; `None` when the
    /// sender is not a member of that room.
    pub fn member_in_room(&self, sender: u64, room: u64) -> Option<u64> {
        match self.mode {
            Mode::Room { rooms, members, .. } => {
                (sender % rooms == room && sender / rooms < members).then_some(sender / rooms)
            }
            _ => None,
        }
    }

    fn rooms(&self) -> usize {
        match self.mode {
            Mode::Room { rooms, .. } => rooms as usize,
            _ => 0,
        }
    }

    fn source_of(&self, idx: u64) -> Option<Ipv4Addr> {
        if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[(idx % self.sources.len() as u64) as usize])
        }
    }
}

// ---------------------------------------------------------------------------------
// Figures

/// A histogram in transportable form: (value, count) pairs.
pub type HistData = Vec<[u64; 2]>;

pub fn new_hist() -> Histogram<u64> {
    // 1 ns .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

pub fn hist_to_data(h: &Histogram<u64>) -> HistData {
    h.iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
        .collect()
}

pub fn hist_add_data(h: &mut Histogram<u64>, d: &HistData) {
    for [v, c] in d {
        h.saturating_record_n(*v, *c);
    }
}

/// Figures of one slice (one process), mergeable.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SliceReport {
    pub attempted: u64,
    pub joined: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Failed attempts that were tried again (`--retries`), by kind.
    #[serde(default)]
    pub retried: BTreeMap<String, u64>,
    /// Times an executor's controller stayed silent past [`STALL_AFTER`], by what its
    /// thread was doing then ("asleep": in the kernel while its 20 ms timer was long
    /// due). The monitor wakes it each time.
    #[serde(default)]
    pub executor_stalls: BTreeMap<String, u64>,
    /// Joined connections that the server (or the network) ended before release.
    pub ended_early: u64,
    pub ends: BTreeMap<String, u64>,
    pub first_attempt_nanos: u64,
    pub last_join_nanos: u64,
    /// Connect + upgrade + join, nanoseconds.
    pub join_latency: HistData,
    // fanout
    pub deliveries: u64,
    pub duplicates: u64,
    pub reorders: u64,
    /// `new_msg` seqs out of the expected range, or messages we could not read.
    pub unexpected: u64,
    pub subscribers_complete: u64,
    pub first_recv_nanos: u64,
    pub last_recv_nanos: u64,
    /// Send-to-receive, nanoseconds.
    pub latency: HistData,
    // rooms: what the members sent, and per room the sends and the joined members
    pub sent: u64,
    pub first_send_nanos: u64,
    pub last_send_nanos: u64,
    pub room_sent: Vec<u64>,
    pub room_joined: Vec<u64>,
    /// churn: connect + join + pushes + leave + close, nanoseconds.
    pub cycle_latency: HistData,
    /// presence: what the members read.
    #[serde(default)]
    pub presence: PresenceTally,
    /// WebSocket bytes the connections read (after TLS), all messages included.
    #[serde(default)]
    pub wire_bytes_in: u64,
    /// Connections that negotiated `permessage-deflate` (`--compress`).
    #[serde(default)]
    pub compressed_connections: u64,
    /// Compressed messages the connections inflated.
    #[serde(default)]
    pub inflated_messages: u64,
}

fn min_nz(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

impl SliceReport {
    pub fn merge(&mut self, o: &SliceReport) {
        self.attempted += o.attempted;
        self.joined += o.joined;
        self.failed += o.failed;
        crate::report::add_counts(&mut self.failures, &o.failures);
        crate::report::add_counts(&mut self.retried, &o.retried);
        crate::report::add_counts(&mut self.executor_stalls, &o.executor_stalls);
        self.ended_early += o.ended_early;
        crate::report::add_counts(&mut self.ends, &o.ends);
        self.first_attempt_nanos = min_nz(self.first_attempt_nanos, o.first_attempt_nanos);
        self.last_join_nanos = self.last_join_nanos.max(o.last_join_nanos);
        self.deliveries += o.deliveries;
        self.duplicates += o.duplicates;
        self.reorders += o.reorders;
        self.unexpected += o.unexpected;
        self.subscribers_complete += o.subscribers_complete;
        self.first_recv_nanos = min_nz(self.first_recv_nanos, o.first_recv_nanos);
        self.last_recv_nanos = self.last_recv_nanos.max(o.last_recv_nanos);
        self.sent += o.sent;
        self.first_send_nanos = min_nz(self.first_send_nanos, o.first_send_nanos);
        self.last_send_nanos = self.last_send_nanos.max(o.last_send_nanos);
        add_vec(&mut self.room_sent, &o.room_sent);
        add_vec(&mut self.room_joined, &o.room_joined);
        merge_hist(&mut self.join_latency, &o.join_latency);
        merge_hist(&mut self.latency, &o.latency);
        merge_hist(&mut self.cycle_latency, &o.cycle_latency);
        self.presence.merge(&o.presence);
        self.wire_bytes_in += o.wire_bytes_in;
        self.compressed_connections += o.compressed_connections;
        self.inflated_messages += o.inflated_messages;
    }

    /// Rooms: the deliveries that should arrive, Σ over rooms of sends × joined members.
    pub fn room_expected(&self) -> u64 {
        self.room_sent
            .iter()
            .zip(&self.room_joined)
            .map(|(s, j)| s * j)
            .sum()
    }
}

pub(crate) fn merge_hist(a: &mut HistData, b: &HistData) {
    let mut h = new_hist();
    hist_add_data(&mut h, a);
    hist_add_data(&mut h, b);
    *a = hist_to_data(&h);
}

/// Element-wise `a += b`, growing `a` as needed.
fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// Live counters of one process, read by its monitor for progress and phase ends.
#[derive(Debug, Default)]
pub struct Shared {
    pub attempted: AtomicU64,
    pub joined: AtomicU64,
    pub failed: AtomicU64,
    pub ended_early: AtomicU64,
    pub deliveries: AtomicU64,
    pub subscribers_complete: AtomicU64,
    /// Rooms: `new_msg` sent, and members that sent all theirs.
    pub sent: AtomicU64,
    pub senders_done: AtomicU64,
    /// Connection tasks (churn: slots) that have ended.
    pub tasks_done: AtomicU64,
    /// Rooms: start sending. Presence: start looking for the watched key.
    pub go: AtomicBool,
    /// Presence: the arm time the run was given with go (unix nanos), what reach
    /// times count from.
    pub go_nanos: AtomicU64,
    pub stop: AtomicBool,
    /// Each executor's sign of life, watched by the slice's monitor.
    pub beats: Mutex<Vec<Arc<Beat>>>,
    /// What the monitor found when an executor went silent (see
    /// [`SliceReport::executor_stalls`]).
    pub stalls: Mutex<BTreeMap<String, u64>>,
}

/// How long an executor's controller (a 20 ms timer) may stay silent before the
/// monitor reports it and wakes the executor.
pub const STALL_AFTER: Duration = Duration::from_secs(2);

/// An executor's sign of life: its controller counts a tick each round and leaves
/// its waker, so that a thread outside the executor can tell that it stalled and
/// wake it (a foreign wake goes through the executor's eventfd).
#[derive(Debug, Default)]
pub struct Beat {
    pub tid: u32,
    pub ticks: AtomicU64,
    /// The controller has returned: silence is expected.
    pub done: AtomicBool,
    pub waker: Mutex<Option<Waker>>,
}

// ---------------------------------------------------------------------------------
// A per-executor broadcast: wakes every live connection task at once (stop, heartbeat).

struct Signal {
    gen: Cell<u64>,
    stopped: Cell<bool>,
    /// Every connection task of the executor has ended: its controller returns.
    finished: Cell<bool>,
    hb_epoch: Cell<u64>,
    /// When this executor saw the go flag.
    go_at: Cell<Option<Instant>>,
    wakers: RefCell<Slab<Option<Waker>>>,
}

impl Signal {
    fn new() -> Self {
        Signal {
            gen: Cell::new(0),
            stopped: Cell::new(false),
            finished: Cell::new(false),
            hb_epoch: Cell::new(0),
            go_at: Cell::new(None),
            wakers: RefCell::new(Slab::new()),
        }
    }

    fn fire(&self) {
        self.gen.set(self.gen.get() + 1);
        for (_, w) in self.wakers.borrow_mut().iter_mut() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
    }

    fn register(&self) -> usize {
        self.wakers.borrow_mut().insert(None)
    }

    fn unregister(&self, key: usize) {
        self.wakers.borrow_mut().try_remove(key);
    }

    fn wait(&self, key: usize, seen: u64) -> SignalWait<'_> {
        SignalWait { sig: self, key, seen }
    }
}

struct SignalWait<'a> {
    sig: &'a Signal,
    key: usize,
    seen: u64,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.sig.gen.get() != self.seen {
            return Poll::Ready(());
        }
        let mut wakers = self.sig.wakers.borrow_mut();
        if let Some(slot) = wakers.get_mut(self.key) {
            match slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

/// Watches the process-wide stop flag and the heartbeat clock for one executor.
/// Also publishes this executor's delivery counts to the process-wide counters (in
/// deltas, so that the hot path touches no shared cache line).
async fn controller(
    shared: Arc<Shared>,
    sig: Rc<Signal>,
    stats: Rc<RefCell<ExecStats>>,
    heartbeat: Duration,
) {
    let beat = Arc::new(Beat {
        tid: sys::gettid(),
        ..Beat::default()
    });
    let waker = futures_lite::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    *beat.waker.lock().unwrap() = Some(waker);
    shared.beats.lock().unwrap().push(beat.clone());
    let mut last_hb = Instant::now();
    let (mut deliveries, mut complete, mut sent, mut senders_done) = (0u64, 0u64, 0u64, 0u64);
    loop {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        beat.ticks.fetch_add(1, Relaxed);
        {
            let s = stats.borrow();
            shared.deliveries.fetch_add(s.deliveries - deliveries, Relaxed);
            shared
                .subscribers_complete
                .fetch_add(s.subscribers_complete - complete, Relaxed);
            shared.sent.fetch_add(s.sent - sent, Relaxed);
            shared
                .senders_done
                .fetch_add(s.senders_done - senders_done, Relaxed);
            deliveries = s.deliveries;
            complete = s.subscribers_complete;
            sent = s.sent;
            senders_done = s.senders_done;
        }
        if sig.go_at.get().is_none() && shared.go.load(Relaxed) {
            sig.go_at.set(Some(Instant::now()));
            sig.fire();
        }
        if sig.finished.get() {
            beat.done.store(true, Relaxed);
            return;
        }
        if shared.stop.load(Relaxed) && !sig.stopped.get() {
            // Keep ticking while the connections close: a stall then is one too.
            sig.stopped.set(true);
            sig.fire();
        }
        if last_hb.elapsed() >= heartbeat {
            last_hb = Instant::now();
            sig.hb_epoch.set(sig.hb_epoch.get() + 1);
            sig.fire();
        }
    }
}

/// Watches a slice's executors for silence (see [`Beat`]): one whose controller
/// has not ticked for [`STALL_AFTER`] is counted by what its thread is doing,
/// reported on stderr (the first few times, with its kernel state and its rings) and
/// woken.
#[derive(Default)]
pub struct StallWatch {
    /// Per executor: the ticks last seen, since when, and whether this silence was
    /// already counted and reported.
    seen: Vec<(u64, Instant, bool, bool)>,
    reported: u32,
}

impl StallWatch {
    const REPORTS: u32 = 3;

    pub fn check(&mut self, shared: &Shared) {
        let beats = shared.beats.lock().unwrap().clone();
        let now = Instant::now();
        self.seen.resize(beats.len(), (0, now, false, false));
        for (b, (ticks, since, counted, reported)) in beats.iter().zip(&mut self.seen) {
            let t = b.ticks.load(Relaxed);
            if t != *ticks {
                if *reported {
                    eprintln!(
                        "executor thread {} ticks again after {:.1}s of silence",
                        b.tid,
                        since.elapsed().as_secs_f64()
                    );
                }
                (*ticks, *since, *counted, *reported) = (t, now, false, false);
                continue;
            }
            if *counted || b.done.load(Relaxed) || now - *since < STALL_AFTER {
                continue;
            }
            *counted = true;
            let state = match sys::thread_state(b.tid) {
                Some('R') => "runnable (starved of CPU)",
                Some('S') => "asleep",
                Some('D') => "in uninterruptible wait",
                Some(_) => "other",
                None => "gone",
            };
            *shared
                .stalls
                .lock()
                .unwrap()
                .entry(state.to_string())
                .or_default() += 1;
            if self.reported < Self::REPORTS {
                self.reported += 1;
                *reported = true;
                eprintln!(
                    "executor stall: its controller has not ticked for {:.1}s; {}",
                    since.elapsed().as_secs_f64(),
                    sys::thread_report(b.tid)
                );
                for l in sys::uring_report() {
                    eprintln!("  {l}");
                }
            }
            if let Some(w) = b.waker.lock().unwrap().as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

/// The `new_msg` pushes of a room member, sent once its executor has seen go.
struct PushPlan {
    topic: String,
    sender: u64,
    room: usize,
    count: u64,
    interval: Duration,
    /// Spreads the members over one interval, so that a room does not send in bursts.
    offset: Duration,
    sent: u64,
}

impl PushPlan {
    /// When the next push is due; `None` before go and after the last one.
    fn due(&self, go_at: Option<Instant>) -> Option<Instant> {
        let go = go_at?;
        (self.sent < self.count).then(|| go + self.offset + self.interval.mul_f64(self.sent as f64))
    }

    /// Queues every push due by now (at most 16 at once) and counts them.
    fn queue_due(&mut self, conn: &mut Conn, go_at: Option<Instant>, stats: &RefCell<ExecStats>) {
        let now = Instant::now();
        let mut s = stats.borrow_mut();
        for _ in 0..16 {
            match self.due(go_at) {
                Some(d) if d <= now => {}
                _ => break,
            }
            let ts = unix_nanos();
            let r = conn.next_ref();
            conn.queue_text(phx::publish_from(&self.topic, r, self.sender, self.sent, ts).as_bytes());
            self.sent += 1;
            s.sent += 1;
            s.room_sent[self.room] += 1;
            s.first_send_nanos = min_nz(s.first_send_nanos, ts);
            s.last_send_nanos = s.last_send_nanos.max(ts);
            if self.sent == self.count {
                s.senders_done += 1;
            }
        }
    }
}

enum Step {
    Recv(Result<(), End>),
    Signal,
    Push,
}

/// Keeps a joined connection alive until stop (returns `None` after a polite close)
/// or until it ends by itself (returns why). Every message goes to `on_msg`; the
/// pushes of `plan` go out when due.
async fn live(
    mut conn: Conn,
    sig: &Signal,
    stats: &RefCell<ExecStats>,
    mut plan: Option<&mut PushPlan>,
    on_msg: &mut impl FnMut(Piece),
) -> Option<End> {
    let key = sig.register();
    let mut seen = sig.gen.get();
    let mut hb = sig.hb_epoch.get();
    let result = loop {
        if sig.stopped.get() {
            break None;
        }
        let due = plan.as_ref().and_then(|p| p.due(sig.go_at.get()));
        let step = futures_lite::future::or(
            async { Step::Recv(conn.recv_pieces(on_msg).await) },
            futures_lite::future::or(
                async {
                    sig.wait(key, seen).await;
                    Step::Signal
                },
                async {
                    match due {
                        Some(d) => {
                            glommio::timer::sleep(d.saturating_duration_since(Instant::now())).await;
                            Step::Push
                        }
                        None => futures_lite::future::pending().await,
                    }
                },
            ),
        )
        .await;
        match step {
            Step::Recv(Ok(())) => {}
            Step::Recv(Err(end)) => {
                sig.unregister(key);
                return Some(end);
            }
            Step::Push => {
                if let Some(p) = plan.as_deref_mut() {
                    p.queue_due(&mut conn, sig.go_at.get(), stats);
                    if let Err(e) = conn.flush_queued().await {
                        break Some(End::Io(e.kind()));
                    }
                }
            }
            Step::Signal => {
                seen = sig.gen.get();
                if sig.hb_epoch.get() != hb && !sig.stopped.get() {
                    hb = sig.hb_epoch.get();
                    if let Err(e) = conn.heartbeat().await {
                        break Some(End::Io(e.kind()));
                    }
                }
            }
        }
    };
    sig.unregister(key);
    if result.is_none() {
        conn.close(Duration::from_secs(1)).await;
    }
    result
}

// ---------------------------------------------------------------------------------
// Per-executor figures

struct ExecStats {
    failures: BTreeMap<String, u64>,
    retried: BTreeMap<String, u64>,
    ends: BTreeMap<String, u64>,
    first_attempt_nanos: u64,
    last_join_nanos: u64,
    join_latency: Histogram<u64>,
    deliveries: u64,
    duplicates: u64,
    reorders: u64,
    unexpected: u64,
    subscribers_complete: u64,
    first_recv_nanos: u64,
    last_recv_nanos: u64,
    latency: Histogram<u64>,
    sent: u64,
    senders_done: u64,
    first_send_nanos: u64,
    last_send_nanos: u64,
    room_sent: Vec<u64>,
    room_joined: Vec<u64>,
    cycle_latency: Histogram<u64>,
    presence: PresenceTally,
    /// Presence: joins started whose `presence_state` has not arrived.
    inflight: u64,
    /// Presence: [`PresenceTally::join_to_state`] and [`PresenceTally::reach`] while
    /// they are recorded.
    join_to_state: Histogram<u64>,
    reach: Histogram<u64>,
}

impl ExecStats {
    fn new(rooms: usize) -> Self {
        ExecStats {
            failures: BTreeMap::new(),
            retried: BTreeMap::new(),
            ends: BTreeMap::new(),
            first_attempt_nanos: 0,
            last_join_nanos: 0,
            join_latency: new_hist(),
            deliveries: 0,
            duplicates: 0,
            reorders: 0,
            unexpected: 0,
            subscribers_complete: 0,
            first_recv_nanos: 0,
            last_recv_nanos: 0,
            latency: new_hist(),
            sent: 0,
            senders_done: 0,
            first_send_nanos: 0,
            last_send_nanos: 0,
            room_sent: vec![0; rooms],
            room_joined: vec![0; rooms],
            cycle_latency: new_hist(),
            presence: PresenceTally::default(),
            inflight: 0,
            join_to_state: new_hist(),
            reach: new_hist(),
        }
    }

    /// Records one `new_msg` delivery sent at `ts`, as judged by the receiver's state.
    fn delivery(&mut self, ts: u64, (dup, reorder, in_range): (bool, bool, bool)) {
        let now = unix_nanos();
        self.deliveries += 1;
        self.duplicates += u64::from(dup);
        self.reorders += u64::from(reorder);
        self.unexpected += u64::from(!in_range);
        self.latency.saturating_record(now.saturating_sub(ts).max(1));
        self.first_recv_nanos = min_nz(self.first_recv_nanos, now);
        self.last_recv_nanos = self.last_recv_nanos.max(now);
    }
}

/// One subscriber's view of the stream.
struct SubState {
    messages: u64,
    count: u64,
    unique: u64,
    last: Option<u64>,
    seen: Option<Vec<u64>>,
}

impl SubState {
    fn new(messages: u64, exact: bool) -> Self {
        SubState {
            messages,
            count: 0,
            unique: 0,
            last: None,
            seen: exact.then(|| vec![0u64; messages.div_ceil(64) as usize]),
        }
    }

    /// Records one delivery of `seq`; returns (duplicate, reorder, in_range).
    fn record(&mut self, seq: u64) -> (bool, bool, bool) {
        self.count += 1;
        if seq >= self.messages {
            return (false, false, false);
        }
        let dup = match &mut self.seen {
            Some(bits) => {
                let (w, b) = ((seq / 64) as usize, seq % 64);
                let was = bits[w] & (1 << b) != 0;
                bits[w] |= 1 << b;
                was
            }
            // Without a bitset only an immediate repeat is recognised.
            None => self.last == Some(seq),
        };
        let reorder = !dup && self.last.is_some_and(|l| seq < l);
        if !dup {
            self.unique += 1;
        }
        self.last = Some(seq);
        (dup, reorder, true)
    }

    fn complete(&self) -> bool {
        self.unique == self.messages
    }
}

/// One room member's view of its room: a stream per sender, each checked like a
/// fanout subscriber's (duplicates, reorders per sender).
struct RoomState {
    members: u64,
    per_sender: u64,
    exact: bool,
    /// Indexed by the sender's member index; allocated at the first delivery.
    senders: Vec<Option<SubState>>,
}

impl RoomState {
    fn new(members: u64, per_sender: u64, exact: bool) -> Self {
        RoomState {
            members,
            per_sender,
            exact,
            senders: Vec::new(),
        }
    }

    /// Records one delivery of `seq` from member `sender` (`None`: not a member of
    /// this room); returns (duplicate, reorder, in_range).
    fn record(&mut self, sender: Option<u64>, seq: u64) -> (bool, bool, bool) {
        let Some(m) = sender.filter(|&m| m < self.members) else {
            return (false, false, false);
        };
        if self.senders.is_empty() {
            self.senders.resize_with(self.members as usize, || None);
        }
        let (per_sender, exact) = (self.per_sender, self.exact);
        self.senders[m as usize]
            .get_or_insert_with(|| SubState::new(per_sender, exact))
            .record(seq)
    }
}

/// Opens connection `idx` (token, connect, upgrade, join) and records its join
/// latency. Failures are for the caller to count.
async fn open_recorded(job: &Job, stats: &RefCell<ExecStats>, idx: u64) -> Result<Conn, Fail> {
    let t0 = Instant::now();
    {
        let mut s = stats.borrow_mut();
        s.first_attempt_nanos = min_nz(s.first_attempt_nanos, unix_nanos());
    }
    let user = format!("{}{idx}", job.user_prefix);
    let token = ringcast::proto::token::sign(job.secret.as_bytes(), &user, unix_nanos() / 1_000_000_000);
    let conn = Conn::open(
        &job.target,
        job.source_of(idx),
        &token,
        &job.topic_of(idx),
        job.stage_timeout,
        (idx as u32).wrapping_mul(2_654_435_761).wrapping_add(1),
    )
    .await?;
    let mut s = stats.borrow_mut();
    s.join_latency
        .saturating_record(t0.elapsed().as_nanos().max(1) as u64);
    s.last_join_nanos = s.last_join_nanos.max(unix_nanos());
    Ok(conn)
}

async fn conn_task(
    job: Arc<Job>,
    shared: Arc<Shared>,
    sig: Rc<Signal>,
    stats: Rc<RefCell<ExecStats>>,
    idx: u64,
    slice_start: Instant,
) {
    if let Mode::Churn {
        period,
        duration,
        pushes,
    } = job.mode
    {
        churn_slot(
            &job,
            &shared,
            &sig,
            &stats,
            idx,
            slice_start + duration,
            period,
            pushes,
        )
        .await;
    } else if let Mode::Presence { .. } = job.mode {
        presence_member(&job, &shared, &sig, &stats, idx).await;
    } else {
        member_task(&job, &shared, &sig, &stats, idx).await;
    }
    shared.tasks_done.fetch_add(1, Relaxed);
}

/// phoenix.js's `reconnectAfterMs`: the wait before attempt `tries` + 1.
fn reconnect_after(tries: u32) -> Duration {
    const STEPS: [u64; 9] = [10, 50, 100, 150, 200, 250, 500, 1000, 2000];
    Duration::from_millis(STEPS.get(tries as usize - 1).copied().unwrap_or(5000))
}

/// One connection of connect, fanout or rooms: open (again, up to `job.retries`
/// times), then live until released.
async fn member_task(job: &Job, shared: &Shared, sig: &Signal, stats: &RefCell<ExecStats>, idx: u64) {
    shared.attempted.fetch_add(1, Relaxed);
    let mut tries = 0u32;
    let conn = loop {
        match open_recorded(job, stats, idx).await {
            Ok(c) => break c,
            Err(f) if tries < job.retries && !sig.stopped.get() => {
                *stats.borrow_mut().retried.entry(f.kind()).or_default() += 1;
                tries += 1;
                glommio::timer::sleep(reconnect_after(tries)).await;
            }
            Err(f) => {
                shared.failed.fetch_add(1, Relaxed);
                *stats.borrow_mut().failures.entry(f.kind()).or_default() += 1;
                return;
            }
        }
    };
    shared.joined.fetch_add(1, Relaxed);
    let end = match job.mode {
        Mode::Hold => {
            // Timed broadcasts that someone else sends (`ringcast-bench cluster` through
            // the HTTP API): every delivery is timed, and the first one counts this
            // connection as reached (`subscribers_complete`).
            let mut reached = false;
            live(conn, sig, stats, None, &mut |p| {
                let Some((_, ts)) = p.as_whole().and_then(phx::find_seq_ts) else {
                    return;
                };
                let mut s = stats.borrow_mut();
                s.delivery(ts, (false, false, true));
                if !reached {
                    reached = true;
                    s.subscribers_complete += 1;
                }
            })
            .await
        }
        Mode::Churn { .. } | Mode::Presence { .. } => live(conn, sig, stats, None, &mut |_| {}).await,
        Mode::Subscribe { messages } => {
            let mut sub = SubState::new(messages, job.exact_duplicates);
            let mut was_complete = false;
            live(conn, sig, stats, None, &mut |p| {
                let Some((seq, ts)) = p.as_whole().and_then(phx::find_seq_ts) else {
                    return;
                };
                let verdict = sub.record(seq);
                let mut s = stats.borrow_mut();
                s.delivery(ts, verdict);
                if !was_complete && sub.complete() {
                    was_complete = true;
                    s.subscribers_complete += 1;
                }
            })
            .await
        }
        Mode::Room {
            rooms,
            members,
            per_sender,
            interval,
        } => {
            let room = idx % rooms;
            stats.borrow_mut().room_joined[room as usize] += 1;
            let mut plan = PushPlan {
                topic: job.topic_of(idx),
                sender: idx,
                room: room as usize,
                count: per_sender,
                interval,
                offset: interval.mul_f64((idx / rooms) as f64 / members as f64),
                sent: 0,
            };
            let mut state = RoomState::new(members, per_sender, job.exact_duplicates);
            live(conn, sig, stats, Some(&mut plan), &mut |p| {
                let Some((sender, seq, ts)) = p.as_whole().and_then(phx::find_sender_seq_ts) else {
                    return;
                };
                let verdict = state.record(job.member_in_room(sender, room), seq);
                stats.borrow_mut().delivery(ts, verdict);
            })
            .await
        }
    };
    if let Some(end) = end {
        shared.ended_early.fetch_add(1, Relaxed);
        *stats.borrow_mut().ends.entry(end.kind()).or_default() += 1;
    }
}

/// Presence: connect, upgrade, join with the job's payload, and read (skimming) until
/// the join's ok reply and this connection's own `presence_state` are in, bounded by
/// the stage timeout. Returns the connection, its reader and join-sent → state.
async fn presence_open(
    job: &Job,
    stats: &RefCell<ExecStats>,
    idx: u64,
) -> Result<(Conn, MemberReader, Duration), Fail> {
    let user = format!("{}{idx}", job.user_prefix);
    let token = ringcast::proto::token::sign(job.secret.as_bytes(), &user, unix_nanos() / 1_000_000_000);
    let mut conn = Conn::upgrade(
        &job.target,
        job.source_of(idx),
        &token,
        job.stage_timeout,
        (idx as u32).wrapping_mul(2_654_435_761).wrapping_add(1),
    )
    .await?;
    conn.skim();
    conn.send_text(phx::join_with(&job.topic_of(idx), &job.join_payload).as_bytes())
        .await
        .map_err(|e| Fail::Join(format!("write: {:?}", e.kind())))?;
    let sent = Instant::now();
    let mut reader = MemberReader::new();
    let (mut replied, mut got_state, mut refused) = (false, false, None);
    let wait = async {
        while !(replied && got_state) {
            conn.recv_pieces(&mut |p| {
                let out = reader.piece(p.bytes, p.first, p.last, &mut stats.borrow_mut().presence);
                match out.ended {
                    Some(Kind::JoinReply) => match p.as_whole().and_then(phx::join_reply) {
                        Some(phx::JoinReply::Ok) => replied = true,
                        Some(phx::JoinReply::Error(r)) => refused = Some(r),
                        None => refused = Some("unreadable join reply".into()),
                    },
                    Some(Kind::PresenceState) => got_state = true,
                    _ => {}
                }
            })
            .await
            .map_err(|e| Fail::Join(e.kind()))?;
            if let Some(r) = refused.take() {
                return Err(Fail::Join(r));
            }
        }
        Ok(())
    };
    bounded_stage("join", job.stage_timeout, wait).await?;
    Ok((conn, reader, sent.elapsed()))
}

/// Races `fut` against a timer; on expiry `Fail::Timeout(stage)`.
async fn bounded_stage<T>(
    stage: &'static str,
    dur: Duration,
    fut: impl Future<Output = Result<T, Fail>>,
) -> Result<T, Fail> {
    futures_lite::future::or(fut, async move {
        glommio::timer::sleep(dur).await;
        Err(Fail::Timeout(stage))
    })
    .await
}

/// One presence member: open (see [`presence_open`]), then read every piece until
/// released, timing the first diff with the watched key once the run said go.
async fn presence_member(job: &Job, shared: &Shared, sig: &Signal, stats: &RefCell<ExecStats>, idx: u64) {
    shared.attempted.fetch_add(1, Relaxed);
    let t0 = Instant::now();
    {
        let mut s = stats.borrow_mut();
        s.first_attempt_nanos = min_nz(s.first_attempt_nanos, unix_nanos());
    }
    let opened = presence_open(job, stats, idx).await;
    stats.borrow_mut().inflight -= 1;
    let (conn, mut reader, to_state) = match opened {
        Ok(x) => x,
        Err(f) => {
            shared.failed.fetch_add(1, Relaxed);
            *stats.borrow_mut().failures.entry(f.kind()).or_default() += 1;
            return;
        }
    };
    {
        let mut s = stats.borrow_mut();
        s.join_latency
            .saturating_record(t0.elapsed().as_nanos().max(1) as u64);
        s.last_join_nanos = s.last_join_nanos.max(unix_nanos());
        s.presence.members_with_state += 1;
        s.join_to_state
            .saturating_record(to_state.as_nanos().max(1) as u64);
    }
    shared.joined.fetch_add(1, Relaxed);
    let end = live(conn, sig, stats, None, &mut |p| {
        if let Some(needle) = &job.watch {
            if !reader.armed() && !reader.reached && sig.go_at.get().is_some() {
                reader.arm(needle);
            }
        }
        let mut s = stats.borrow_mut();
        let out = reader.piece(p.bytes, p.first, p.last, &mut s.presence);
        if matches!(out.ended, Some(Kind::PresenceDiff | Kind::PresenceState)) {
            s.presence.last_presence_unix_nanos = unix_nanos();
        }
        if out.reached_now {
            let now = unix_nanos();
            s.reach
                .saturating_record(now.saturating_sub(shared.go_nanos.load(Relaxed)).max(1));
            let t = &mut s.presence;
            t.reached += 1;
            t.first_reach_unix_nanos = min_nz(t.first_reach_unix_nanos, now);
            t.last_reach_unix_nanos = t.last_reach_unix_nanos.max(now);
        }
    })
    .await;
    if let Some(end) = end {
        shared.ended_early.fetch_add(1, Relaxed);
        *stats.borrow_mut().ends.entry(end.kind()).or_default() += 1;
    }
}

/// Churn: the cycle after cycle `k` (which ended `elapsed` after the slot started).
/// Cycles that this one overran are skipped, so a slow server sees no catch-up burst.
fn next_cycle(k: u64, elapsed: Duration, period: Duration) -> u64 {
    let now = (elapsed.as_secs_f64() / period.as_secs_f64().max(1e-9)).ceil() as u64;
    (k + 1).max(now)
}

/// One churn slot: a cycle every `period` until `until` (or stop).
#[allow(clippy::too_many_arguments)]
async fn churn_slot(
    job: &Job,
    shared: &Shared,
    sig: &Signal,
    stats: &RefCell<ExecStats>,
    idx: u64,
    until: Instant,
    period: Duration,
    pushes: u64,
) {
    let start = Instant::now();
    let mut k = 0u64;
    loop {
        let due = start + period.mul_f64(k as f64);
        if due >= until {
            break;
        }
        while !sig.stopped.get() && Instant::now() < due {
            let left = due.saturating_duration_since(Instant::now());
            glommio::timer::sleep(left.min(Duration::from_millis(100))).await;
        }
        if sig.stopped.get() {
            break;
        }
        shared.attempted.fetch_add(1, Relaxed);
        let t0 = Instant::now();
        match churn_cycle(job, stats, idx, pushes).await {
            Ok(()) => {
                shared.joined.fetch_add(1, Relaxed);
                stats
                    .borrow_mut()
                    .cycle_latency
                    .saturating_record(t0.elapsed().as_nanos().max(1) as u64);
            }
            Err(f) => {
                shared.failed.fetch_add(1, Relaxed);
                *stats.borrow_mut().failures.entry(f.kind()).or_default() += 1;
            }
        }
        k = next_cycle(k, start.elapsed(), period);
    }
}

/// connect → upgrade → join → pushes → leave → close.
async fn churn_cycle(job: &Job, stats: &RefCell<ExecStats>, idx: u64, pushes: u64) -> Result<(), Fail> {
    let mut conn = open_recorded(job, stats, idx).await?;
    let topic = job.topic_of(idx);
    if pushes > 0 {
        for seq in 0..pushes {
            let r = conn.next_ref();
            conn.queue_text(phx::publish_from(&topic, r, idx, seq, unix_nanos()).as_bytes());
        }
        conn.flush_queued()
            .await
            .map_err(|e| Fail::Push(format!("write: {:?}", e.kind())))?;
    }
    conn.leave(&topic, job.stage_timeout).await?;
    conn.close(Duration::from_secs(1)).await;
    Ok(())
}

async fn exec_main(job: Arc<Job>, shared: Arc<Shared>, start: u64, count: u64) -> SliceReport {
    let sig = Rc::new(Signal::new());
    let stats = Rc::new(RefCell::new(ExecStats::new(job.rooms())));
    let ctl = glommio::spawn_local(controller(
        shared.clone(),
        sig.clone(),
        stats.clone(),
        job.heartbeat,
    ));
    let rate = (job.rate * count as f64 / job.total.max(1) as f64).max(0.001);
    // Churn slots that would start after the run's duration are not started at all.
    let spawn_for = match job.mode {
        Mode::Churn { duration, .. } => duration,
        _ => Duration::MAX,
    };
    // Presence: this executor's share of the joins that may be under way at once.
    let window = match job.mode {
        Mode::Presence { window } => Some((window * count).div_ceil(job.total.max(1)).max(1)),
        _ => None,
    };
    let mut tasks = Vec::with_capacity(count as usize);
    let t0 = Instant::now();
    let mut i = 0u64;
    while i < count && !sig.stopped.get() && t0.elapsed() < spawn_for {
        let due = ((t0.elapsed().as_secs_f64() * rate) as u64 + 1).min(count);
        let mut full = false;
        while i < due {
            if let Some(w) = window {
                let mut s = stats.borrow_mut();
                if s.inflight >= w {
                    full = true;
                    break;
                }
                s.inflight += 1;
            }
            tasks.push(glommio::spawn_local(conn_task(
                job.clone(),
                shared.clone(),
                sig.clone(),
                stats.clone(),
                start + i,
                t0,
            )));
            i += 1;
        }
        if full {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        } else if i < count {
            let next = t0 + Duration::from_secs_f64(i as f64 / rate);
            let wait = next.saturating_duration_since(Instant::now());
            glommio::timer::sleep(wait.max(Duration::from_micros(200))).await;
        }
    }
    // Slots never started count as done.
    shared.tasks_done.fetch_add(count - i, Relaxed);
    for t in tasks {
        t.await;
    }
    sig.finished.set(true);
    ctl.await;
    let s = stats.borrow();
    let wire = crate::client::wire_tally();
    SliceReport {
        wire_bytes_in: wire.bytes_in,
        compressed_connections: wire.compressed_conns,
        inflated_messages: wire.inflated,
        attempted: i,
        joined: 0,
        failed: s.failures.values().sum(),
        failures: s.failures.clone(),
        retried: s.retried.clone(),
        // The slice's monitor counts them (run_slice).
        executor_stalls: BTreeMap::new(),
        ended_early: s.ends.values().sum(),
        ends: s.ends.clone(),
        first_attempt_nanos: s.first_attempt_nanos,
        last_join_nanos: s.last_join_nanos,
        join_latency: hist_to_data(&s.join_latency),
        deliveries: s.deliveries,
        duplicates: s.duplicates,
        reorders: s.reorders,
        unexpected: s.unexpected,
        subscribers_complete: s.subscribers_complete,
        first_recv_nanos: s.first_recv_nanos,
        last_recv_nanos: s.last_recv_nanos,
        latency: hist_to_data(&s.latency),
        sent: s.sent,
        first_send_nanos: s.first_send_nanos,
        last_send_nanos: s.last_send_nanos,
        room_sent: s.room_sent.clone(),
        room_joined: s.room_joined.clone(),
        cycle_latency: hist_to_data(&s.cycle_latency),
        presence: PresenceTally {
            join_to_state: hist_to_data(&s.join_to_state),
            reach: hist_to_data(&s.reach),
            ..s.presence.clone()
        },
    }
}

/// An executor for thousands of connections. Its rings are deep (4,096, glommio's
/// default is 128) because io_uring looks a cancelled request up in a hash table sized
/// by the ring, and every idle connection holds a poll there: each time the executor
/// parks it cancels a timer, and with 128 entries that walks a bucket of thousands of
/// polls. Measured on one held broadcast to 18,000 connections, that walk was a quarter
/// of the loadgen's CPU. Registered I/O memory is 1 MiB (the default pins 10 MiB for file
/// I/O the loadgen does not do), for a box running dozens of loadgens.
fn executor() -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Unbound)
        .ring_depth(4096)
        .io_memory(1 << 20)
}

/// Runs connections `start .. start + count` on `job.cores` executors. Returns once
/// `shared.stop` is set and every connection has closed.
pub fn run_slice(job: Arc<Job>, shared: Arc<Shared>, start: u64, count: u64) -> anyhow::Result<SliceReport> {
    let cores = job.cores.max(1).min(count.max(1) as usize);
    let mut handles = Vec::new();
    let mut s = start;
    for c in 0..cores {
        let n = count / cores as u64 + u64::from((c as u64) < count % cores as u64);
        let (job, shared) = (job.clone(), shared.clone());
        let h = executor()
            .name(&format!("loadgen-{c}"))
            .spawn(move || exec_main(job, shared, s, n))
            .map_err(|e| anyhow::anyhow!("cannot start executor {c}: {e}"))?;
        handles.push(h);
        s += n;
    }
    let mut report = SliceReport::default();
    for h in handles {
        let r = h.join().map_err(|e| anyhow::anyhow!("executor failed: {e}"))?;
        report.merge(&r);
    }
    // Churn counts cycles, not connections: take both from the live counters.
    report.attempted = shared.attempted.load(Relaxed);
    report.joined = shared.joined.load(Relaxed);
    report.executor_stalls = shared.stalls.lock().unwrap().clone();
    Ok(report)
}

// ---------------------------------------------------------------------------------
// Publisher (fanout, parent process only)

/// How the publisher paces itself.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Messages per second.
    Rate(f64),
    /// As fast as possible, with at most this many messages not yet received by the
    /// sample subscriber.
    Window(u64),
}

#[derive(Debug, Default)]
pub struct PubShared {
    pub sent: AtomicU64,
    pub sample_received: AtomicU64,
    pub publishing: AtomicBool,
    pub done_sending: AtomicBool,
    pub first_send_nanos: AtomicU64,
    pub last_send_nanos: AtomicU64,
    pub stop: AtomicBool,
    pub failed: AtomicBool,
    pub error: Mutex<Option<String>>,
    pub server_before: Mutex<Option<sys::ProcSample>>,
}

impl PubShared {
    pub fn fail(&self, e: String) {
        self.error.lock().unwrap().get_or_insert(e);
        self.failed.store(true, Relaxed);
        self.done_sending.store(true, Relaxed);
    }
}

/// Opens the sample subscriber (joined after every other subscriber, so that a
/// server delivering in join order reaches it last) and the publisher, then sends
/// `messages` `new_msg` broadcasts through `publish_to` (the subscribers' server, or
/// another node of their cluster). Keeps reading both until `ps.stop`.
#[allow(clippy::too_many_arguments)]
pub fn run_publisher(
    job: Arc<Job>,
    publish_to: Target,
    ps: Arc<PubShared>,
    messages: u64,
    pace: Pace,
    server_pid: Option<u32>,
    pad: usize,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let h = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let r = executor()
                .name("publisher")
                .spawn(move || publisher_main(job, publish_to, ps.clone(), messages, pace, server_pid, pad))
                .and_then(|h| h.join());
            if let Err(e) = r {
                eprintln!("publisher executor failed: {e}");
            }
        })?;
    Ok(h)
}

#[allow(clippy::too_many_arguments)]
async fn publisher_main(
    job: Arc<Job>,
    publish_to: Target,
    ps: Arc<PubShared>,
    messages: u64,
    pace: Pace,
    server_pid: Option<u32>,
    pad: usize,
) {
    let open = |user: &str, idx: u64, target: Target| {
        let token = ringcast::proto::token::sign(job.secret.as_bytes(), user, unix_nanos() / 1_000_000_000);
        let job = job.clone();
        async move {
            Conn::open(
                &target,
                job.source_of(idx),
                &token,
                &job.topic,
                job.stage_timeout,
                idx as u32 ^ 0x9e37_79b9,
            )
            .await
        }
    };
    let sample = match open("lg-sample", job.total, job.target.clone()).await {
        Ok(c) => c,
        Err(f) => return ps.fail(format!("sample subscriber: {}", f.kind())),
    };
    let mut publisher = match open("lg-publisher", job.total + 1, publish_to).await {
        Ok(c) => c,
        Err(f) => return ps.fail(format!("publisher: {}", f.kind())),
    };
    let sig = Rc::new(Signal::new());
    let stop_sig = Rc::new(Signal::new());
    let stop_flag = Rc::new(Cell::new(false));
    // The sample subscriber: counts deliveries, wakes the publisher on progress.
    let sample_task = {
        let (ps, sig, stop_sig, stop_flag) = (ps.clone(), sig.clone(), stop_sig.clone(), stop_flag.clone());
        glommio::spawn_local(async move {
            let mut sample = sample;
            let mut got = 0u64;
            let mut hb = 0u64;
            let key = stop_sig.register();
            loop {
                let seen = stop_sig.gen.get();
                let r = futures_lite::future::or(
                    async {
                        Some(
                            sample
                                .recv(&mut |m| got += u64::from(phx::find_seq_ts(m).is_some()))
                                .await,
                        )
                    },
                    async {
                        stop_sig.wait(key, seen).await;
                        None
                    },
                )
                .await;
                ps.sample_received.store(got, Relaxed);
                sig.fire();
                match r {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        ps.fail(format!("sample subscriber ended: {}", e.kind()));
                        break;
                    }
                    None if stop_flag.get() => {
                        sample.close(Duration::from_secs(1)).await;
                        break;
                    }
                    None => {
                        if stop_sig.hb_epoch.get() != hb {
                            hb = stop_sig.hb_epoch.get();
                            if let Err(e) = sample.heartbeat().await {
                                ps.fail(format!("sample subscriber heartbeat: {:?}", e.kind()));
                                break;
                            }
                        }
                    }
                }
            }
            stop_sig.unregister(key);
        })
    };
    // Stop watcher: mirrors the cross-thread flag into the executor.
    let watcher = {
        let (ps, sig, stop_sig, stop_flag) = (ps.clone(), sig.clone(), stop_sig.clone(), stop_flag.clone());
        let heartbeat = job.heartbeat;
        glommio::spawn_local(async move {
            let mut last_hb = Instant::now();
            while !ps.stop.load(Relaxed) {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                if last_hb.elapsed() >= heartbeat {
                    last_hb = Instant::now();
                    stop_sig.hb_epoch.set(stop_sig.hb_epoch.get() + 1);
                    stop_sig.fire();
                }
            }
            stop_flag.set(true);
            stop_sig.fire();
            sig.fire();
        })
    };
    if let Some(pid) = server_pid {
        *ps.server_before.lock().unwrap() = sys::sample(pid);
    }
    ps.publishing.store(true, Relaxed);
    let key = sig.register();
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut failed = None;
    while sent < messages && !stop_flag.get() && failed.is_none() && !ps.failed.load(Relaxed) {
        // How many may go now.
        let allowed = match pace {
            Pace::Rate(r) => ((t0.elapsed().as_secs_f64() * r) as u64 + 1).min(messages),
            Pace::Window(w) => (ps.sample_received.load(Relaxed) + w).min(messages),
        };
        if allowed > sent {
            while sent < allowed {
                let now = unix_nanos();
                if sent == 0 {
                    ps.first_send_nanos.store(now, Relaxed);
                }
                let r = publisher.next_ref();
                publisher.queue_text(phx::publish_padded(&job.topic, r, sent, now, pad).as_bytes());
                sent += 1;
                // Keep frames flowing in small batches.
                if sent.is_multiple_of(16) {
                    break;
                }
            }
            if let Err(e) = publisher.flush_queued().await {
                failed = Some(format!("publisher write: {:?}", e.kind()));
            }
            ps.sent.store(sent, Relaxed);
            ps.last_send_nanos.store(unix_nanos(), Relaxed);
            continue;
        }
        // Wait for room (window) or for the next send time (rate), reading our echoes.
        let seen = sig.gen.get();
        let wait = async {
            match pace {
                Pace::Rate(r) => {
                    let next = t0 + Duration::from_secs_f64(sent as f64 / r);
                    let d = next.saturating_duration_since(Instant::now());
                    glommio::timer::sleep(d.max(Duration::from_micros(50))).await;
                }
                Pace::Window(_) => sig.wait(key, seen).await,
            }
            None
        };
        let r = futures_lite::future::or(async { Some(publisher.recv(&mut |_| {}).await) }, wait).await;
        if let Some(Err(e)) = r {
            failed = Some(format!("publisher connection ended: {}", e.kind()));
        }
    }
    if let Some(e) = failed {
        ps.fail(e);
    }
    ps.done_sending.store(true, Relaxed);
    // Drain our own echoes until told to stop.
    loop {
        let seen = sig.gen.get();
        let r = futures_lite::future::or(async { Some(publisher.recv(&mut |_| {}).await) }, async {
            sig.wait(key, seen).await;
            None
        })
        .await;
        if stop_flag.get() || matches!(r, Some(Err(_))) {
            break;
        }
    }
    sig.unregister(key);
    publisher.close(Duration::from_secs(1)).await;
    sample_task.await;
    watcher.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An executor whose thread sleeps outside its reactor (a task blocking in
    /// `std::thread::sleep`) stops its controller: the watch counts it once, as asleep,
    /// and counts nothing while the controller ticks, nor after it returned.
    #[test]
    fn stall_watch_counts_a_silent_executor_once() {
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let h = executor()
            .spawn(move || async move {
                let sig = Rc::new(Signal::new());
                let stats = Rc::new(RefCell::new(ExecStats::new(0)));
                let ctl = glommio::spawn_local(controller(sh, sig.clone(), stats, Duration::from_secs(30)));
                glommio::timer::sleep(Duration::from_millis(600)).await;
                std::thread::sleep(STALL_AFTER + Duration::from_millis(800));
                glommio::timer::sleep(Duration::from_millis(600)).await;
                sig.finished.set(true);
                ctl.await;
            })
            .unwrap();
        let mut watch = StallWatch::default();
        let t0 = Instant::now();
        let mut before_block = None;
        while t0.elapsed() < STALL_AFTER + Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
            watch.check(&shared);
            if t0.elapsed() > Duration::from_millis(500) && before_block.is_none() {
                before_block = Some(shared.stalls.lock().unwrap().clone());
            }
        }
        h.join().unwrap();
        assert_eq!(
            before_block,
            Some(BTreeMap::new()),
            "nothing counted while it ticked"
        );
        let stalls = shared.stalls.lock().unwrap().clone();
        assert_eq!(stalls, BTreeMap::from([("asleep".to_string(), 1)]));
        assert!(shared.beats.lock().unwrap()[0].done.load(Relaxed));
    }

    #[test]
    fn reconnects_wait_as_phoenix_js_does() {
        let waits: Vec<u64> = (1..=11).map(|t| reconnect_after(t).as_millis() as u64).collect();
        assert_eq!(waits, [10, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000, 5000]);
    }

    #[test]
    fn subscriber_state_counts_dups_and_reorders() {
        let mut s = SubState::new(10, true);
        for seq in [0, 1, 3, 2, 2, 4, 0, 12] {
            s.record(seq);
        }
        // 2 repeated and 0 repeated: duplicates; 2 after 3: reorder; 12: out of range.
        assert_eq!(s.count, 8);
        assert_eq!(s.unique, 5);
        assert!(!s.complete());
        let mut s = SubState::new(3, false);
        assert_eq!(s.record(0), (false, false, true));
        assert_eq!(s.record(0), (true, false, true));
        assert_eq!(s.record(2), (false, false, true));
        assert_eq!(s.record(1), (false, true, true));
        assert!(s.complete());
    }

    fn room_job(rooms: u64, members: u64) -> Job {
        Job {
            mode: Mode::Room {
                rooms,
                members,
                per_sender: 5,
                interval: Duration::from_millis(100),
            },
            target: Target {
                addr: "127.0.0.1:1".parse().unwrap(),
                host: "127.0.0.1:1".into(),
                path: "/socket/websocket".into(),
                tls: None,
                compress: false,
            },
            sources: Vec::new(),
            secret: "s".into(),
            topic: "bench:".into(),
            topics: 1,
            rate: 1.0,
            total: rooms * members,
            stage_timeout: Duration::from_secs(1),
            cores: 1,
            heartbeat: Duration::from_secs(25),
            exact_duplicates: true,
            join_payload: "{}".into(),
            user_prefix: "lg".into(),
            watch: None,
            ramp_limit: None,
            retries: 0,
        }
    }

    #[test]
    fn rooms_map_connections_to_members() {
        let job = room_job(3, 4);
        // Connection 7 is member 2 of room 1.
        assert_eq!(job.topic_of(7), "bench:room-1");
        assert_eq!(job.member_in_room(7, 1), Some(2));
        assert_eq!(job.member_in_room(7, 0), None);
        // Beyond rooms x members: nobody's member.
        assert_eq!(job.member_in_room(13, 1), None);
        assert_eq!(job.rooms(), 3);
    }

    #[test]
    fn room_state_checks_each_sender_on_its_own() {
        let mut r = RoomState::new(3, 4, true);
        // Interleaved senders: no reorder across senders.
        assert_eq!(r.record(Some(0), 0), (false, false, true));
        assert_eq!(r.record(Some(1), 2), (false, false, true));
        assert_eq!(r.record(Some(0), 1), (false, false, true));
        assert_eq!(r.record(Some(1), 1), (false, true, true));
        assert_eq!(r.record(Some(0), 1), (true, false, true));
        // Not a member, or a seq past what a sender sends.
        assert_eq!(r.record(None, 0), (false, false, false));
        assert_eq!(r.record(Some(5), 0), (false, false, false));
        assert_eq!(r.record(Some(2), 4), (false, false, false));
    }

    #[test]
    fn push_plan_schedule() {
        let plan = PushPlan {
            topic: "bench:room-0".into(),
            sender: 0,
            room: 0,
            count: 3,
            interval: Duration::from_millis(100),
            offset: Duration::from_millis(50),
            sent: 1,
        };
        assert_eq!(plan.due(None), None);
        let go = Instant::now();
        assert_eq!(plan.due(Some(go)), Some(go + Duration::from_millis(150)));
        let done = PushPlan { sent: 3, ..plan };
        assert_eq!(done.due(Some(go)), None);
    }

    #[test]
    fn churn_skips_overrun_cycles() {
        let p = Duration::from_millis(100);
        assert_eq!(next_cycle(0, Duration::from_millis(30), p), 1);
        assert_eq!(next_cycle(0, Duration::from_millis(250), p), 3);
        assert_eq!(next_cycle(4, Duration::from_millis(300), p), 5);
    }

    #[test]
    fn room_tallies_merge_into_expected_deliveries() {
        let a = SliceReport {
            room_sent: vec![10, 0],
            room_joined: vec![2, 1],
            ..Default::default()
        };
        let b = SliceReport {
            room_sent: vec![5, 4, 1],
            room_joined: vec![1, 1, 0],
            ..Default::default()
        };
        let mut m = SliceReport::default();
        m.merge(&a);
        m.merge(&b);
        assert_eq!(m.room_sent, [15, 4, 1]);
        assert_eq!(m.room_joined, [3, 2, 0]);
        assert_eq!(m.room_expected(), 15 * 3 + 4 * 2);
    }

    #[test]
    fn histograms_travel_and_merge() {
        let mut a = SliceReport::default();
        let mut h = new_hist();
        for v in [1_000u64, 2_000, 3_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let b = SliceReport {
            latency: hist_to_data(&h),
            deliveries: 4,
            first_recv_nanos: 10,
            last_recv_nanos: 20,
            ..Default::default()
        };
        a.merge(&b);
        a.merge(&b);
        let mut m = new_hist();
        hist_add_data(&mut m, &a.latency);
        assert_eq!(m.len(), 8);
        assert_eq!(a.deliveries, 8);
        assert_eq!(a.first_recv_nanos, 10);
        assert!(m.value_at_quantile(1.0) >= 1_000_000);
        let json = serde_json::to_string(&a).unwrap();
        let back: SliceReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.latency, a.latency);
    }
}
