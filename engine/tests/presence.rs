//! Presence through the in-process test kit: state on join, diffs to every member,
//! untrack on leave / crash / disconnect, updates, and batching under a join storm.

use std::collections::BTreeMap;
use std::time::Duration;

use ringcast::proto::token;
use ringcast::testing::{self, unix_now, Client, Kit};
use ringcast::{seed, Channel, HandleResult, Payload, Reply, Router, Socket};
use serde_json::{json, Value};

const SECRET: &str = "presence-secret";

async fn client(kit: &Kit, user: &str) -> Client {
    let t = token::sign(SECRET.as_bytes(), user, unix_now());
    kit.socket(&[("token", &t)]).await.expect("token accepted")
}

/// Applies presence_state / presence_diff frames the way phoenix.js does, by phx_ref,
/// keeping each meta as it came (`metas`, by phx_ref).
#[derive(Default)]
struct View(BTreeMap<String, Vec<String>>, BTreeMap<String, Value>);

impl View {
    fn apply_state(&mut self, state: &Value) {
        self.0.clear();
        self.apply_side(state, true);
    }

    fn apply_side(&mut self, side: &Value, join: bool) {
        for (key, entry) in side.as_object().unwrap() {
            for meta in entry["metas"].as_array().unwrap() {
                let r = meta["phx_ref"].as_str().unwrap().to_string();
                if join {
                    self.1.insert(r.clone(), meta.clone());
                }
                let refs = self.0.entry(key.clone()).or_default();
                if join {
                    if !refs.contains(&r) {
                        refs.push(r);
                    }
                } else {
                    refs.retain(|x| *x != r);
                }
            }
            if self.0.get(key).is_some_and(Vec::is_empty) {
                self.0.remove(key);
            }
        }
    }

    /// Consumes every presence frame the client has received so far.
    fn absorb(&mut self, c: &mut Client, topic: &str) -> usize {
        let mut diffs = 0;
        for f in c.frames() {
            if f.topic != topic {
                continue;
            }
            let Payload::Json(v) = &f.payload else { continue };
            match f.event.as_str() {
                "presence_state" => self.apply_state(v),
                "presence_diff" => {
                    diffs += 1;
                    self.apply_side(&v["joins"], true);
                    self.apply_side(&v["leaves"], false);
                }
                _ => {}
            }
        }
        diffs
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    /// The metas of `key`, as the last frames that named them carried them.
    fn metas(&self, key: &str) -> Vec<&Value> {
        self.0
            .get(key)
            .into_iter()
            .flatten()
            .map(|r| &self.1[r])
            .collect()
    }

    /// Absorbs `c`'s presence frames until `done` holds, waiting for them as they come
    /// (at most the kit's assertion timeout); returns the diffs absorbed.
    async fn absorb_until(&mut self, c: &mut Client, topic: &str, done: impl Fn(&View) -> bool) -> usize {
        let deadline = std::time::Instant::now() + testing::ASSERT_TIMEOUT;
        let mut diffs = self.absorb(c, topic);
        while !done(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "presence view of {topic} still {:?} after {:?}",
                self.keys(),
                testing::ASSERT_TIMEOUT
            );
            glommio::timer::sleep(Duration::from_millis(2)).await;
            diffs += self.absorb(c, topic);
        }
        diffs
    }
}

#[test]
fn joiner_gets_state_then_everyone_gets_its_diff() {
    testing::run(seed::UserSocket::new(SECRET), seed::router(), |kit| async move {
        let mut a = client(&kit, "1").await;
        a.subscribe_and_join("rooms:p", json!({"name": "ada"})).await;
        a.assert_push("rooms:p", "presence_state", json!({})).await;
        let diff = a.expect("own diff", |f| f.event == "presence_diff").await;
        let Payload::Json(diff) = diff.payload else {
            panic!()
        };
        let meta = &diff["joins"]["1"]["metas"][0];
        assert_eq!(meta["name"], "ada");
        assert!(meta["online_at"].as_str().unwrap().parse::<u64>().is_ok());
        assert!(meta["phx_ref"].is_string());
        assert_eq!(diff["leaves"], json!({}));
        // Ada's view so far: the empty state she got, then her own diff.
        let mut va = View::default();
        va.apply_state(&json!({}));
        va.apply_side(&diff["joins"], true);

        let mut b = client(&kit, "2").await;
        b.subscribe_and_join("rooms:p", json!({})).await;
        let state = b.expect("state", |f| f.event == "presence_state").await;
        let Payload::Json(state) = state.payload else {
            panic!()
        };
        assert_eq!(state["1"]["metas"][0]["name"], "ada");
        assert!(
            state.get("2").is_none(),
            "the state holds the presences before this one"
        );
        let mut vb = View::default();
        vb.apply_state(&state);
        va.absorb_until(&mut a, "rooms:p", |v| v.keys() == ["1", "2"])
            .await;
        vb.absorb_until(&mut b, "rooms:p", |v| v.keys() == ["1", "2"])
            .await;
        // Bob joined without a name: his meta's name defaults to his user id, and
        // both see the same metas.
        assert_eq!(va.metas("2")[0]["name"], "2");
        assert_eq!(va.metas("2"), vb.metas("2"));
        assert_eq!(vb.metas("1")[0]["name"], "ada");
    });
}

#[test]
fn leave_crash_and_disconnect_untrack() {
    testing::run(seed::UserSocket::new(SECRET), seed::router(), |kit| async move {
        let mut watcher = client(&kit, "w").await;
        watcher.subscribe_and_join("rooms:u", json!({})).await;
        let mut view = View::default();
        let mut l = client(&kit, "leaver").await;
        let mut c = client(&kit, "crasher").await;
        let d = client(&kit, "dropper").await;
        let mut d = d;
        for x in [&mut l, &mut c, &mut d] {
            x.subscribe_and_join("rooms:u", json!({})).await;
        }
        view.absorb_until(&mut watcher, "rooms:u", |v| {
            v.keys() == ["crasher", "dropper", "leaver", "w"]
        })
        .await;

        l.push("rooms:u", "leave", json!({}));
        view.absorb_until(&mut watcher, "rooms:u", |v| {
            v.keys() == ["crasher", "dropper", "w"]
        })
        .await;

        c.push("rooms:u", "crash", json!({}));
        view.absorb_until(&mut watcher, "rooms:u", |v| v.keys() == ["dropper", "w"])
            .await;

        d.disconnect();
        view.absorb_until(&mut watcher, "rooms:u", |v| v.keys() == ["w"])
            .await;
    });
}

#[test]
fn one_user_on_two_connections_is_one_key_with_two_metas() {
    testing::run(seed::UserSocket::new(SECRET), seed::router(), |kit| async move {
        let mut a = client(&kit, "7").await;
        let mut a2 = client(&kit, "7").await;
        a.subscribe_and_join("rooms:m", json!({})).await;
        a2.subscribe_and_join("rooms:m", json!({})).await;
        let mut view = View::default();
        view.absorb_until(&mut a2, "rooms:m", |v| v.metas("7").len() == 2)
            .await;
        assert_eq!(view.keys(), ["7"], "one key");
        a.leave("rooms:m").await;
        view.absorb_until(&mut a2, "rooms:m", |v| v.metas("7").len() == 1)
            .await;
        assert_eq!(view.keys(), ["7"]);
    });
}

/// A channel with a presence update, to check the diff shape of Presence.update.
struct Status;

impl Channel for Status {
    async fn join(_: &str, _: Payload, socket: &mut Socket) -> Result<(Self, Payload), Payload> {
        socket.channel_ref().send(());
        Ok((Status, Payload::empty()))
    }

    async fn handle_info(&mut self, _: Box<dyn std::any::Any>, socket: &mut Socket) -> HandleResult {
        socket.track("me", json!({"status": "online"}));
        HandleResult::NoReply
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut Socket) -> HandleResult {
        match event {
            "set" => {
                let ok = socket.update_presence("me", payload.json().cloned().unwrap_or_default());
                HandleResult::Reply(if ok {
                    Reply::ok()
                } else {
                    Reply::error("not tracked")
                })
            }
            "list" => HandleResult::Reply(Reply::Ok(socket.presence_list().into())),
            "untrack" => {
                socket.untrack("me");
                HandleResult::Reply(Reply::ok())
            }
            _ => HandleResult::Reply(Reply::error("unknown event")),
        }
    }
}

#[test]
fn update_sends_leave_and_join_with_phx_ref_prev() {
    let router = Router::new().channel::<Status>("status:*");
    testing::run(seed::UserSocket::new(SECRET), router, |kit| async move {
        let mut c = client(&kit, "1").await;
        c.subscribe_and_join("status:x", json!({})).await;
        let first = c.expect("join diff", |f| f.event == "presence_diff").await;
        let Payload::Json(first) = first.payload else {
            panic!()
        };
        let old_ref = first["joins"]["me"]["metas"][0]["phx_ref"].clone();
        let r = c.push("status:x", "set", json!({"status": "away"}));
        c.assert_reply(&r, Reply::ok()).await;
        let diff = c.expect("update diff", |f| f.event == "presence_diff").await;
        let Payload::Json(diff) = diff.payload else {
            panic!()
        };
        let joined = &diff["joins"]["me"]["metas"][0];
        assert_eq!(joined["status"], "away");
        assert_eq!(joined["phx_ref_prev"], old_ref);
        assert_eq!(diff["leaves"]["me"]["metas"][0]["phx_ref"], old_ref);

        let r = c.push("status:x", "list", json!({}));
        let listed = c
            .expect("list reply", |f| f.msg_ref.as_deref() == Some(r.as_str()))
            .await;
        let Payload::Json(listed) = listed.payload else {
            panic!()
        };
        assert_eq!(listed["response"]["me"]["metas"].as_array().unwrap().len(), 1);
        assert_eq!(listed["response"]["me"]["metas"][0]["status"], "away");

        let r = c.push("status:x", "untrack", json!({}));
        c.assert_reply(&r, Reply::ok()).await;
        let gone = c.expect("untrack diff", |f| f.event == "presence_diff").await;
        let Payload::Json(gone) = gone.payload else {
            panic!()
        };
        assert!(gone["leaves"]["me"].is_object());
    });
}

#[test]
fn a_join_storm_is_batched_into_few_diffs() {
    testing::run(seed::UserSocket::new(SECRET), seed::router(), |kit| async move {
        let mut watcher = client(&kit, "watcher").await;
        watcher.subscribe_and_join("rooms:storm", json!({})).await;
        let mut view = View::default();
        view.absorb_until(&mut watcher, "rooms:storm", |v| v.keys() == ["watcher"])
            .await;
        let mut others = Vec::new();
        for i in 0..300 {
            let mut c = client(&kit, &format!("u{i}")).await;
            c.push("rooms:storm", "phx_join", json!({}));
            others.push(c);
        }
        let diffs = view
            .absorb_until(&mut watcher, "rooms:storm", |v| v.keys().len() == 301)
            .await;
        assert!(diffs <= 10, "300 joins came as {diffs} diffs");
    });
}
