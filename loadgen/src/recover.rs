//! `recover`: history and recovery under load (issue 16). Subscribers of one topic with
//! history drop their connections (each at a random moment, or all at once), stay away,
//! connect again and rejoin with `since` = the last position they saw, while a
//! publisher sends `new_msg` at a steady rate. Every subscriber checks every message:
//! lost, duplicated, reordered; the joins answered `recovered` true or false; and the
//! time from a rejoin until the subscriber held every message published before it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{Conn, Target};
use crate::sys::unix_nanos;
use crate::{parse_url, phx, Cli, RecoverArgs};

/// What the run saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecoverReport {
    pub command: String,
    pub url: String,
    pub topic: String,
    pub subscribers: u64,
    pub all_at_once: bool,
    pub away_ms: u64,
    /// Messages the publisher sent.
    pub sent: u64,
    /// Drops (each subscriber drops once) and the rejoins after them.
    pub drops: u64,
    pub rejoins: u64,
    pub recovered: u64,
    pub not_recovered: u64,
    /// Over every subscriber: messages sent and never received, received twice or
    /// more (each extra copy counted), received after a later one.
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Messages received on a rejoin before the first live one is not told apart: the
    /// time from the rejoin sent to holding every message sent before it.
    pub recover_ms_p50: Option<f64>,
    pub recover_ms_max: Option<f64>,
    pub problems: Vec<String>,
}

/// One subscriber's books.
#[derive(Default)]
struct Sub {
    /// Copies received of message `seq` (index `seq - 1`).
    seen: Vec<u32>,
    max_seq: u64,
    reordered: u64,
    position: Option<String>,
    recovered: Option<bool>,
    /// A rejoin in progress: when it was sent, and how many were sent before it.
    rejoin: Option<(Instant, u64)>,
    recover_ms: Option<f64>,
    rejoined: bool,
    problems: Vec<String>,
}

impl Sub {
    fn holds_all_before(&self, n: u64) -> bool {
        self.seen.iter().take(n as usize).all(|&c| c > 0) && self.seen.len() as u64 >= n
    }

    fn on_message(&mut self, m: &[u8]) {
        let Ok(Value::Array(v)) = serde_json::from_slice::<Value>(m) else {
            return;
        };
        match v.get(3).and_then(Value::as_str) {
            Some("phx_reply") if v.get(1).and_then(Value::as_str) == Some("1") => {
                let response = &v[4]["response"];
                if v[4]["status"] != "ok" {
                    self.problems.push(format!("join refused: {response}"));
                    return;
                }
                if self.position.is_none() {
                    self.position = response["position"].as_str().map(str::to_string);
                }
                self.recovered = response["recovered"].as_bool();
            }
            Some("new_msg") => {
                if let Some(p) = v.get(1).and_then(Value::as_str) {
                    self.position = Some(p.to_string());
                }
                let Some(seq) = v[4]["body"].as_str().and_then(|b| b.parse::<u64>().ok()) else {
                    return;
                };
                if seq == 0 {
                    return;
                }
                if self.seen.len() < seq as usize {
                    self.seen.resize(seq as usize, 0);
                }
                self.seen[seq as usize - 1] += 1;
                if seq < self.max_seq {
                    self.reordered += 1;
                }
                self.max_seq = self.max_seq.max(seq);
                if let Some((at, before)) = self.rejoin {
                    if self.holds_all_before(before) {
                        self.recover_ms = Some(at.elapsed().as_secs_f64() * 1000.0);
                        self.rejoin = None;
                    }
                }
            }
            _ => {}
        }
    }
}

fn token(cli: &Cli, user: &str) -> String {
    ringcast::proto::token::sign(cli.secret.as_bytes(), user, unix_nanos() / 1_000_000_000)
}

/// Reads until `until`, handing every message to `on`; `Err` when the connection ended.
async fn read_until(conn: &mut Conn, until: Instant, on: &mut impl FnMut(&[u8])) -> Result<(), String> {
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        let wait = (until - now).min(Duration::from_millis(100));
        let got = futures_lite::future::or(async { Some(conn.recv(on).await) }, async {
            glommio::timer::sleep(wait).await;
            None
        })
        .await;
        if let Some(Err(end)) = got {
            return Err(end.kind());
        }
    }
}

async fn join(conn: &mut Conn, topic: &str, since: Option<&str>) -> Result<(), String> {
    let payload = match since {
        Some(p) => serde_json::json!({ "since": p }).to_string(),
        None => "{}".into(),
    };
    conn.send_text(phx::join_with(topic, &payload).as_bytes())
        .await
        .map_err(|e| format!("join write: {:?}", e.kind()))
}

struct Shared {
    cli: Cli,
    a: RecoverArgs,
    target: Target,
    /// Messages sent so far, and whether the publisher is done.
    sent: Cell<u64>,
    done: Cell<bool>,
}

async fn subscriber(sh: Rc<Shared>, i: u64, drop_at: Instant, book: Rc<RefCell<Sub>>) {
    let user = format!("recover-{i}");
    let seed = 0x5eed_0000 + i as u32;
    let mut on = |m: &[u8]| book.borrow_mut().on_message(m);
    let token = token(&sh.cli, &user);
    let open = |n: u32| Conn::upgrade(&sh.target, None, &token, sh.cli.stage_timeout, seed + n);
    let mut conn = match open(0).await {
        Ok(c) => c,
        Err(f) => return book.borrow_mut().problems.push(format!("open: {}", f.kind())),
    };
    if let Err(e) = join(&mut conn, &sh.a.topic, None).await {
        return book.borrow_mut().problems.push(e);
    }
    if let Err(e) = read_until(&mut conn, drop_at, &mut on).await {
        return book
            .borrow_mut()
            .problems
            .push(format!("ended before the drop: {e}"));
    }
    // The network goes: no close frame.
    drop(conn);
    glommio::timer::sleep(sh.a.away).await;
    let mut conn = match open(1).await {
        Ok(c) => c,
        Err(f) => return book.borrow_mut().problems.push(format!("reopen: {}", f.kind())),
    };
    let since = book.borrow().position.clone();
    book.borrow_mut().rejoin = Some((Instant::now(), sh.sent.get()));
    book.borrow_mut().rejoined = true;
    if let Err(e) = join(&mut conn, &sh.a.topic, since.as_deref()).await {
        return book.borrow_mut().problems.push(e);
    }
    loop {
        let until = Instant::now() + Duration::from_millis(200);
        if let Err(e) = read_until(&mut conn, until, &mut on).await {
            return book
                .borrow_mut()
                .problems
                .push(format!("ended after the rejoin: {e}"));
        }
        if sh.done.get() {
            break;
        }
    }
    // What was published last may still be on its way.
    let _ = read_until(&mut conn, Instant::now() + sh.a.grace, &mut on).await;
    conn.close(Duration::from_millis(200)).await;
}

async fn publisher(sh: Rc<Shared>, start: Instant) -> Result<(), String> {
    let mut conn = Conn::upgrade(
        &sh.target,
        None,
        &token(&sh.cli, "recover-pub"),
        sh.cli.stage_timeout,
        0x9b,
    )
    .await
    .map_err(|f| format!("publisher open: {}", f.kind()))?;
    join(&mut conn, &sh.a.topic, None).await?;
    let total = (sh.a.rate * sh.a.duration.as_secs_f64()).round() as u64;
    let every = Duration::from_secs_f64(1.0 / sh.a.rate.max(0.001));
    for seq in 1..=total {
        let at = start + every * (seq as u32);
        read_until(&mut conn, at, &mut |_| {}).await?;
        let msg = format!(
            "[\"1\",\"p{seq}\",{},\"new_msg\",{{\"body\":\"{seq}\"}}]",
            serde_json::to_string(&sh.a.topic).expect("a string")
        );
        conn.send_text(msg.as_bytes())
            .await
            .map_err(|e| format!("publish: {:?}", e.kind()))?;
        sh.sent.set(seq);
    }
    sh.done.set(true);
    let _ = read_until(&mut conn, Instant::now() + sh.a.grace, &mut |_| {}).await;
    conn.close(Duration::from_millis(200)).await;
    Ok(())
}

async fn run(cli: Cli, a: RecoverArgs) -> RecoverReport {
    let mut r = RecoverReport {
        command: "recover".into(),
        url: a.url.clone(),
        topic: a.topic.clone(),
        subscribers: a.subscribers,
        all_at_once: a.all_at_once,
        away_ms: a.away.as_millis() as u64,
        ..Default::default()
    };
    let target = match parse_url(&a.url, crate::trust_of(&cli)) {
        Ok(t) => t,
        Err(e) => {
            r.problems.push(format!("{e:#}"));
            return r;
        }
    };
    let sh = Rc::new(Shared {
        cli,
        a: a.clone(),
        target,
        sent: Cell::new(0),
        done: Cell::new(false),
    });
    // Subscribers join first, then the stream starts; each drops once within it.
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let mut rng = a.seed.max(1);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % 1_000_000) as f64 / 1_000_000.0
    };
    let books: Vec<Rc<RefCell<Sub>>> = (0..a.subscribers).map(|_| Rc::default()).collect();
    let mut tasks = Vec::new();
    for (i, book) in books.iter().enumerate() {
        let frac = if a.all_at_once { 0.4 } else { 0.2 + 0.5 * next() };
        let drop_at = start + a.duration.mul_f64(frac);
        tasks.push(glommio::spawn_local(subscriber(
            sh.clone(),
            i as u64,
            drop_at,
            book.clone(),
        )));
    }
    glommio::timer::sleep(warmup).await;
    if let Err(e) = publisher(sh.clone(), start).await {
        r.problems.push(e);
        sh.done.set(true);
    }
    for t in tasks {
        t.await;
    }
    r.sent = sh.sent.get();
    let mut times = Vec::new();
    for (i, book) in books.iter().enumerate() {
        let b = book.borrow();
        for p in &b.problems {
            r.problems.push(format!("subscriber {i}: {p}"));
        }
        if b.rejoined {
            r.drops += 1;
            r.rejoins += 1;
        }
        match b.recovered {
            Some(true) => r.recovered += 1,
            Some(false) => r.not_recovered += 1,
            None => {}
        }
        for seq in 0..r.sent as usize {
            match b.seen.get(seq).copied().unwrap_or(0) {
                0 => r.lost += 1,
                c => r.duplicated += (c - 1) as u64,
            }
        }
        r.reordered += b.reordered;
        times.extend(b.recover_ms);
    }
    times.sort_by(f64::total_cmp);
    r.recover_ms_p50 = times.get(times.len() / 2).copied();
    r.recover_ms_max = times.last().copied();
    r
}

fn opt_ms(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{x:.1} ms"))
}

pub fn print(r: &RecoverReport) {
    println!(
        "== recover on {} ({}): {} subscribers, drops {}, away {} ms",
        r.topic,
        r.url,
        r.subscribers,
        if r.all_at_once { "all at once" } else { "at random" },
        r.away_ms
    );
    println!("  sent            {} new_msg", r.sent);
    println!(
        "  rejoins         {} ({} recovered, {} not)",
        r.rejoins, r.recovered, r.not_recovered
    );
    println!(
        "  deliveries      lost {}, duplicated {}, reordered {}",
        r.lost, r.duplicated, r.reordered
    );
    println!(
        "  time to recover p50 {}, max {}",
        opt_ms(r.recover_ms_p50),
        opt_ms(r.recover_ms_max)
    );
    for p in &r.problems {
        println!("  PROBLEM: {p}");
    }
}

/// Runs the check on one executor; `Ok(false)` when anything was lost, duplicated,
/// reordered or not recovered.
pub fn main(cli: &Cli, a: &RecoverArgs) -> anyhow::Result<bool> {
    let (cli2, a2) = (cli.clone(), a.clone());
    let r = crate::one_executor_check(cli, "recover", move || run(cli2, a2), print)?;
    Ok(r.problems.is_empty()
        && r.lost == 0
        && r.duplicated == 0
        && r.reordered == 0
        && r.not_recovered == 0
        && r.rejoins == r.subscribers)
}
