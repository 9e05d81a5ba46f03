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

use crate::client::{Conn, End, Target};
use crate::phx;
use crate::sys::{self, unix_nanos};

/// What the connections do once joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stay joined, heartbeat, until released.
    Hold,
    /// Subscribe: record every `new_msg` delivery of `messages` expected ones.
    Subscribe { messages: u64 },
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
}

impl Job {
    pub fn topic_of(&self, idx: u64) -> String {
        if self.topics > 1 {
            format!("{}:{}", self.topic, idx % self.topics)
        } else {
            self.topic.clone()
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
        for (k, v) in &o.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        self.ended_early += o.ended_early;
        for (k, v) in &o.ends {
            *self.ends.entry(k.clone()).or_default() += v;
        }
        self.first_attempt_nanos = min_nz(self.first_attempt_nanos, o.first_attempt_nanos);
        self.last_join_nanos = self.last_join_nanos.max(o.last_join_nanos);
        self.deliveries += o.deliveries;
        self.duplicates += o.duplicates;
        self.reorders += o.reorders;
        self.unexpected += o.unexpected;
        self.subscribers_complete += o.subscribers_complete;
        self.first_recv_nanos = min_nz(self.first_recv_nanos, o.first_recv_nanos);
        self.last_recv_nanos = self.last_recv_nanos.max(o.last_recv_nanos);
        let mut h = new_hist();
        hist_add_data(&mut h, &self.join_latency);
        hist_add_data(&mut h, &o.join_latency);
        self.join_latency = hist_to_data(&h);
        let mut h = new_hist();
        hist_add_data(&mut h, &self.latency);
        hist_add_data(&mut h, &o.latency);
        self.latency = hist_to_data(&h);
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
    pub stop: AtomicBool,
}

// ---------------------------------------------------------------------------------
// A per-executor broadcast: wakes every live connection task at once (stop, heartbeat).

struct Signal {
    gen: Cell<u64>,
    stopped: Cell<bool>,
    hb_epoch: Cell<u64>,
    wakers: RefCell<Slab<Option<Waker>>>,
}

impl Signal {
    fn new() -> Self {
        Signal {
            gen: Cell::new(0),
            stopped: Cell::new(false),
            hb_epoch: Cell::new(0),
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
    let mut last_hb = Instant::now();
    let (mut deliveries, mut complete) = (0u64, 0u64);
    loop {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        {
            let s = stats.borrow();
            shared.deliveries.fetch_add(s.deliveries - deliveries, Relaxed);
            shared
                .subscribers_complete
                .fetch_add(s.subscribers_complete - complete, Relaxed);
            deliveries = s.deliveries;
            complete = s.subscribers_complete;
        }
        if shared.stop.load(Relaxed) {
            sig.stopped.set(true);
            sig.fire();
            return;
        }
        if last_hb.elapsed() >= heartbeat {
            last_hb = Instant::now();
            sig.hb_epoch.set(sig.hb_epoch.get() + 1);
            sig.fire();
        }
    }
}

/// Keeps a joined connection alive until stop (returns `None` after a polite close)
/// or until it ends by itself (returns why). Every message goes to `on_msg`.
async fn live(mut conn: Conn, sig: &Signal, on_msg: &mut impl FnMut(&[u8])) -> Option<End> {
    let key = sig.register();
    let mut seen = sig.gen.get();
    let mut hb = sig.hb_epoch.get();
    let result = loop {
        if sig.stopped.get() {
            break None;
        }
        let step = futures_lite::future::or(async { Some(conn.recv(on_msg).await) }, async {
            sig.wait(key, seen).await;
            None
        })
        .await;
        match step {
            Some(Ok(())) => {}
            Some(Err(end)) => {
                sig.unregister(key);
                return Some(end);
            }
            None => {
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
}

impl ExecStats {
    fn new() -> Self {
        ExecStats {
            failures: BTreeMap::new(),
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
        }
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

async fn conn_task(
    job: Arc<Job>,
    shared: Arc<Shared>,
    sig: Rc<Signal>,
    stats: Rc<RefCell<ExecStats>>,
    idx: u64,
) {
    shared.attempted.fetch_add(1, Relaxed);
    let t0 = Instant::now();
    {
        let mut s = stats.borrow_mut();
        s.first_attempt_nanos = min_nz(s.first_attempt_nanos, unix_nanos());
    }
    let user = format!("lg{idx}");
    let token = ringcast::proto::token::sign(job.secret.as_bytes(), &user, unix_nanos() / 1_000_000_000);
    let topic = job.topic_of(idx);
    let opened = Conn::open(
        &job.target,
        job.source_of(idx),
        &token,
        &topic,
        job.stage_timeout,
        (idx as u32).wrapping_mul(2_654_435_761).wrapping_add(1),
    )
    .await;
    let conn = match opened {
        Ok(c) => c,
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
    }
    shared.joined.fetch_add(1, Relaxed);
    let end = match job.mode {
        Mode::Hold => live(conn, &sig, &mut |_| {}).await,
        Mode::Subscribe { messages } => {
            let mut sub = SubState::new(messages, job.exact_duplicates);
            let mut was_complete = false;
            let end = live(conn, &sig, &mut |m| {
                let Some((seq, ts)) = phx::find_seq_ts(m) else {
                    return;
                };
                let now = unix_nanos();
                let (dup, reorder, in_range) = sub.record(seq);
                let mut s = stats.borrow_mut();
                s.deliveries += 1;
                s.duplicates += u64::from(dup);
                s.reorders += u64::from(reorder);
                s.unexpected += u64::from(!in_range);
                s.latency.saturating_record(now.saturating_sub(ts).max(1));
                s.first_recv_nanos = min_nz(s.first_recv_nanos, now);
                s.last_recv_nanos = s.last_recv_nanos.max(now);
                if !was_complete && sub.complete() {
                    was_complete = true;
                    s.subscribers_complete += 1;
                }
            })
            .await;
            end
        }
    };
    if let Some(end) = end {
        shared.ended_early.fetch_add(1, Relaxed);
        *stats.borrow_mut().ends.entry(end.kind()).or_default() += 1;
    }
}

async fn exec_main(job: Arc<Job>, shared: Arc<Shared>, start: u64, count: u64) -> SliceReport {
    let sig = Rc::new(Signal::new());
    let stats = Rc::new(RefCell::new(ExecStats::new()));
    let ctl = glommio::spawn_local(controller(
        shared.clone(),
        sig.clone(),
        stats.clone(),
        job.heartbeat,
    ));
    let rate = (job.rate * count as f64 / job.total.max(1) as f64).max(0.001);
    let mut tasks = Vec::with_capacity(count as usize);
    let t0 = Instant::now();
    let mut i = 0u64;
    while i < count && !sig.stopped.get() {
        let due = ((t0.elapsed().as_secs_f64() * rate) as u64 + 1).min(count);
        while i < due {
            tasks.push(glommio::spawn_local(conn_task(
                job.clone(),
                shared.clone(),
                sig.clone(),
                stats.clone(),
                start + i,
            )));
            i += 1;
        }
        if i < count {
            let next = t0 + Duration::from_secs_f64(i as f64 / rate);
            let wait = next.saturating_duration_since(Instant::now());
            glommio::timer::sleep(wait.max(Duration::from_micros(200))).await;
        }
    }
    for t in tasks {
        t.await;
    }
    ctl.await;
    let s = stats.borrow();
    SliceReport {
        attempted: i,
        joined: 0,
        failed: s.failures.values().sum(),
        failures: s.failures.clone(),
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
    }
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
        let h = LocalExecutorBuilder::new(Placement::Unbound)
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
    report.joined = shared.joined.load(Relaxed);
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
/// `messages` `new_msg` broadcasts. Keeps reading both until `ps.stop`.
pub fn run_publisher(
    job: Arc<Job>,
    ps: Arc<PubShared>,
    messages: u64,
    pace: Pace,
    server_pid: Option<u32>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let h = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let r = LocalExecutorBuilder::new(Placement::Unbound)
                .name("publisher")
                .spawn(move || publisher_main(job, ps.clone(), messages, pace, server_pid))
                .and_then(|h| h.join());
            if let Err(e) = r {
                eprintln!("publisher executor failed: {e}");
            }
        })?;
    Ok(h)
}

async fn publisher_main(
    job: Arc<Job>,
    ps: Arc<PubShared>,
    messages: u64,
    pace: Pace,
    server_pid: Option<u32>,
) {
    let open = |user: &str, idx: u64| {
        let token = ringcast::proto::token::sign(job.secret.as_bytes(), user, unix_nanos() / 1_000_000_000);
        let job = job.clone();
        async move {
            Conn::open(
                &job.target,
                job.source_of(idx),
                &token,
                &job.topic,
                job.stage_timeout,
                idx as u32 ^ 0x9e37_79b9,
            )
            .await
        }
    };
    let sample = match open("lg-sample", job.total).await {
        Ok(c) => c,
        Err(f) => return ps.fail(format!("sample subscriber: {}", f.kind())),
    };
    let mut publisher = match open("lg-publisher", job.total + 1).await {
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
                publisher.queue_text(phx::publish(&job.topic, r, sent, now).as_bytes());
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
