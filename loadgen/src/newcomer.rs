//! `newcomer`: one connection joins a presence room after its members and checks what
//! it is told: its `presence_state` (keys, metas, bytes, time from the join), then the
//! diffs after it applied as phoenix.js `Presence` applies them, until its view holds
//! every member and every newcomer (or it falls quiet, or time runs out). The one
//! connection of the run that parses presence.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::Conn;
use crate::phx;
use crate::presence::{state_counts, PresenceView, NEWCOMER_PREFIX};
use crate::sys::unix_nanos;
use crate::{parse_url, Cli, NewcomerArgs};

/// What the newcomer saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NewcomerReport {
    pub command: String,
    pub url: String,
    pub topic: String,
    pub key: String,
    pub expected_members: u64,
    pub expected_newcomers: u64,
    pub join_sent_unix_nanos: u64,
    /// Join sent → its ok reply.
    pub reply_ms: Option<f64>,
    /// Join sent → its `presence_state` read whole.
    pub state_ms: Option<f64>,
    pub state_bytes: u64,
    pub state_keys: u64,
    /// Keys of the state that are members' (not `newcomer-*`): should be all of them.
    pub state_member_keys: u64,
    /// Newcomers already tracked when the state was made (0 .. newcomers - 1).
    pub state_newcomer_keys: u64,
    pub state_metas: u64,
    pub diffs_before_state: u64,
    pub diffs_after_state: u64,
    pub diff_bytes: u64,
    /// Join sent → the diff that carried its own join.
    pub own_join_ms: Option<f64>,
    /// Join sent → the view held members + newcomers keys.
    pub complete_ms: Option<f64>,
    pub final_keys: u64,
    pub final_member_keys: u64,
    pub final_newcomer_keys: u64,
    pub final_metas: u64,
    /// The state had every expected member, and the view later every newcomer too.
    pub state_has_every_member: bool,
    pub complete: bool,
    /// How the connection ended, if it did before the check was over.
    pub ended: Option<String>,
    pub problems: Vec<String>,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

async fn check(cli: Cli, a: NewcomerArgs) -> NewcomerReport {
    let mut r = NewcomerReport {
        command: "newcomer".into(),
        url: a.url.clone(),
        topic: a.topic.clone(),
        key: a.key.clone(),
        expected_members: a.members,
        expected_newcomers: a.newcomers,
        ..Default::default()
    };
    let target = match parse_url(&a.url, crate::trust_of(&cli)) {
        Ok(t) => t,
        Err(e) => {
            r.problems.push(format!("{e:#}"));
            return r;
        }
    };
    let token = ringcast::proto::token::sign(cli.secret.as_bytes(), &a.key, unix_nanos() / 1_000_000_000);
    let mut conn = match Conn::upgrade(&target, None, &token, cli.stage_timeout, 0x5eed).await {
        Ok(c) => c,
        Err(f) => {
            r.problems.push(format!("open: {}", f.kind()));
            return r;
        }
    };
    let payload = serde_json::json!({ "name": "newcomer" }).to_string();
    let sent = Instant::now();
    r.join_sent_unix_nanos = unix_nanos();
    if let Err(e) = conn
        .send_text(phx::join_with(&a.topic, &payload).as_bytes())
        .await
    {
        r.problems.push(format!("join write: {:?}", e.kind()));
        return r;
    }
    let expected_keys = a.members + a.newcomers;
    let deadline = sent + a.timeout;
    let mut view = PresenceView::default();
    let mut last_msg = Instant::now();
    let mut unreadable = 0u64;
    loop {
        if r.complete {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            r.problems.push(format!(
                "not complete after {:.0}s: {} keys of {expected_keys}",
                a.timeout.as_secs_f64(),
                view.keys()
            ));
            break;
        }
        if view.has_state() && r.own_join_ms.is_some() && last_msg.elapsed() >= a.quiet_for {
            r.problems.push(format!(
                "quiet for {:.0}s with {} keys of {expected_keys}",
                a.quiet_for.as_secs_f64(),
                view.keys()
            ));
            break;
        }
        let wait = (deadline - now).min(Duration::from_millis(500));
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        let got = futures_lite::future::or(
            async { Some(conn.recv(&mut |m| msgs.push(m.to_vec())).await) },
            async {
                glommio::timer::sleep(wait).await;
                None
            },
        )
        .await;
        match got {
            None => continue,
            Some(Err(end)) => {
                r.ended = Some(end.kind());
                r.problems.push(format!("connection ended: {}", end.kind()));
                break;
            }
            Some(Ok(())) => {}
        }
        for m in msgs {
            last_msg = Instant::now();
            if let Some(reply) = phx::join_reply(&m) {
                match reply {
                    phx::JoinReply::Ok => r.reply_ms = Some(ms_since(sent)),
                    phx::JoinReply::Error(e) => {
                        r.problems.push(format!("join refused: {e}"));
                        return r;
                    }
                }
                continue;
            }
            let Ok(serde_json::Value::Array(v)) = serde_json::from_slice::<serde_json::Value>(&m) else {
                unreadable += 1;
                continue;
            };
            let event = v.get(3).and_then(|e| e.as_str()).unwrap_or_default();
            let payload = v.get(4).cloned().unwrap_or_default();
            match event {
                "presence_state" if !view.has_state() => {
                    r.state_ms = Some(ms_since(sent));
                    r.state_bytes = m.len() as u64;
                    let (keys, metas) = state_counts(&payload);
                    let newcomers = payload
                        .as_object()
                        .map_or(0, |o| o.keys().filter(|k| k.starts_with(NEWCOMER_PREFIX)).count());
                    r.state_keys = keys as u64;
                    r.state_metas = metas as u64;
                    r.state_newcomer_keys = newcomers as u64;
                    r.state_member_keys = (keys - newcomers) as u64;
                    r.state_has_every_member = r.state_member_keys == a.members;
                    view.apply_state(&payload);
                }
                "presence_state" => r.problems.push("a second presence_state".into()),
                "presence_diff" => {
                    r.diff_bytes += m.len() as u64;
                    if view.has_state() {
                        r.diffs_after_state += 1;
                    } else {
                        r.diffs_before_state += 1;
                    }
                    view.apply_diff(&payload);
                }
                _ => {}
            }
            if r.own_join_ms.is_none() && view.has_key(&a.key) {
                r.own_join_ms = Some(ms_since(sent));
            }
            if !r.complete && view.has_state() && view.keys() as u64 == expected_keys {
                r.complete_ms = Some(ms_since(sent));
                r.complete = true;
            }
        }
    }
    if unreadable > 0 {
        r.problems.push(format!("{unreadable} unreadable message(s)"));
    }
    r.final_keys = view.keys() as u64;
    r.final_newcomer_keys = view.newcomer_keys() as u64;
    r.final_member_keys = r.final_keys - r.final_newcomer_keys;
    r.final_metas = view.metas() as u64;
    if r.state_ms.is_none() {
        r.problems.push("no presence_state".into());
    } else if !r.state_has_every_member {
        r.problems.push(format!(
            "the state had {} member keys, {} expected",
            r.state_member_keys, a.members
        ));
    }
    conn.close(Duration::from_secs(1)).await;
    r
}

fn opt_ms(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{x:.1} ms"))
}

pub fn print(r: &NewcomerReport) {
    println!("== newcomer {} on {} ({})", r.key, r.topic, r.url);
    println!(
        "  presence_state  {} keys ({} members of {} expected, {} newcomers), {} metas, {} bytes, {} after the join",
        r.state_keys,
        r.state_member_keys,
        r.expected_members,
        r.state_newcomer_keys,
        r.state_metas,
        r.state_bytes,
        opt_ms(r.state_ms)
    );
    println!(
        "  diffs           {} before the state, {} after, {} bytes; own join seen {}",
        r.diffs_before_state,
        r.diffs_after_state,
        r.diff_bytes,
        opt_ms(r.own_join_ms)
    );
    println!(
        "  final view      {} keys ({} members, {} newcomers of {}), {} metas; complete: {} {}",
        r.final_keys,
        r.final_member_keys,
        r.final_newcomer_keys,
        r.expected_newcomers,
        r.final_metas,
        r.complete,
        opt_ms(r.complete_ms)
    );
    for p in &r.problems {
        println!("  PROBLEM: {p}");
    }
}

/// Runs the check on one executor; `Ok(false)` when it is not complete.
pub fn main(cli: &Cli, a: &NewcomerArgs) -> anyhow::Result<bool> {
    if !a.key.starts_with(NEWCOMER_PREFIX) {
        anyhow::bail!("--key must start with {NEWCOMER_PREFIX}");
    }
    let (cli2, a2) = (cli.clone(), a.clone());
    let r = crate::one_executor_check(cli, "newcomer", move || check(cli2, a2), print)?;
    Ok(r.complete && r.state_has_every_member && r.problems.is_empty())
}
