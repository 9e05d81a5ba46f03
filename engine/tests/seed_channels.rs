//! The seed app's channels, driven in-process through the test kit (no sockets).

use std::time::Duration;

use ringcast::proto::token;
use ringcast::testing::{self, unix_now, Kit};
use ringcast::{seed, Payload, Reply};
use serde_json::json;

const SECRET: &str = "kit-secret";

fn run<F, Fut>(test: F)
where
    F: FnOnce(Kit) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    testing::run(seed::UserSocket::new(SECRET), seed::router(), test)
}

async fn client(kit: &Kit, user: &str) -> testing::Client {
    let t = token::sign(SECRET.as_bytes(), user, unix_now());
    kit.socket(&[("token", &t), ("vsn", "2.0.0")])
        .await
        .expect("token accepted")
}

/// The ok reply of a `rooms:*` join: `{"position": "<epoch>:<offset>"}` and nothing else.
fn room_position(reply: Reply) -> String {
    let Reply::Ok(Payload::Json(response)) = reply else {
        panic!("not an ok reply: {reply:?}")
    };
    let position = response["position"].as_str().expect("a position").to_string();
    assert_eq!(response.as_object().map(|o| o.len()), Some(1), "{response}");
    assert!(
        ringcast::proto::position::Position::parse(&position).is_some(),
        "{position}"
    );
    position
}

#[test]
fn refused_tokens_do_not_connect() {
    run(|kit| async move {
        assert!(kit.socket(&[]).await.is_none());
        let forged = token::sign(b"other", "1", unix_now());
        assert!(kit.socket(&[("token", &forged)]).await.is_none());
        let expired = token::sign(SECRET.as_bytes(), "1", unix_now() - 86_401);
        assert!(kit.socket(&[("token", &expired)]).await.is_none());
    });
}

#[test]
fn room_join_welcome_and_locked_room() {
    run(|kit| async move {
        let mut c = client(&kit, "42").await;
        let position = room_position(c.subscribe_and_join("rooms:lobby", json!({"name": "ada"})).await);
        assert!(position.ends_with(":0"), "nothing broadcast yet: {position}");
        c.assert_push("rooms:lobby", "welcome", json!({"msg": "Welcome to room lobby!"}))
            .await;
        assert_eq!(
            c.subscribe_and_join("rooms:locked", json!({})).await,
            Reply::Error(json!({"reason": "unauthorized"}).into())
        );
        assert_eq!(
            c.subscribe_and_join("nowhere:1", json!({})).await,
            Reply::Error(json!({"reason": "unmatched topic"}).into())
        );
    });
}

#[test]
fn welcome_follows_the_join_reply() {
    run(|kit| async move {
        let mut c = client(&kit, "1").await;
        // A join pushed by hand, so that every frame it brings is seen in arrival order.
        let r = c.push("rooms:a", "phx_join", json!({}));
        let deadline = std::time::Instant::now() + testing::ASSERT_TIMEOUT;
        let mut frames = Vec::new();
        while !frames.iter().any(|f: &testing::Frame| f.event == "welcome") {
            assert!(
                std::time::Instant::now() < deadline,
                "no welcome; got {frames:#?}"
            );
            glommio::timer::sleep(Duration::from_millis(1)).await;
            frames.extend(c.frames());
        }
        let reply = frames
            .iter()
            .position(|f| f.event == "phx_reply" && f.msg_ref.as_deref() == Some(r.as_str()));
        let welcome = frames.iter().position(|f| f.event == "welcome");
        assert_eq!(
            (reply, welcome),
            (Some(0), Some(1)),
            "the join reply, then the welcome: {frames:#?}"
        );
    });
}

#[test]
fn new_msg_shout_and_whisper_reach_the_right_members() {
    run(|kit| async move {
        let mut a = client(&kit, "1").await;
        let mut a2 = client(&kit, "1").await;
        let mut b = client(&kit, "2").await;
        for c in [&mut a, &mut a2, &mut b] {
            c.subscribe_and_join("rooms:r", json!({})).await;
        }
        a.push("rooms:r", "new_msg", json!({"body": "hi"}));
        for c in [&mut a, &mut a2, &mut b] {
            c.assert_broadcast("rooms:r", "new_msg", json!({"body": "hi", "user": "1"}))
                .await;
        }
        let r = a.push("rooms:r", "shout", json!({"body": "HEY"}));
        a.assert_reply(&r, Reply::ok()).await;
        for c in [&mut a2, &mut b] {
            c.assert_broadcast("rooms:r", "shout", json!({"body": "HEY", "user": "1"}))
                .await;
        }
        a.refute(Duration::from_millis(50), |f| f.event == "shout").await;

        let r = b.push("rooms:r", "whisper", json!({"to": "1", "body": "psst"}));
        b.assert_reply(&r, Reply::ok()).await;
        let whisper = json!({"to": "1", "body": "psst", "from": "2"});
        a.assert_push("rooms:r", "whisper", whisper.clone()).await;
        a2.assert_push("rooms:r", "whisper", whisper).await;
        b.refute(Duration::from_millis(50), |f| f.event == "whisper")
            .await;
    });
}

#[test]
fn ping_bad_request_unknown_and_invalid() {
    run(|kit| async move {
        let mut c = client(&kit, "7").await;
        c.subscribe_and_join("rooms:p", json!({})).await;
        let r = c.push("rooms:p", "ping", json!({"n": [1, 2]}));
        c.assert_reply(&r, Reply::Ok(json!({"n": [1, 2]}).into())).await;
        let bytes = Payload::Binary(bytes::Bytes::from_static(&[1, 2, 3]));
        let r = c.push("rooms:p", "ping", bytes.clone());
        c.assert_reply(&r, Reply::Ok(bytes)).await;
        let r = c.push("rooms:p", "bad_request", json!({}));
        c.assert_reply(&r, Reply::error("invalid")).await;
        let r = c.push("rooms:p", "what", json!({}));
        c.assert_reply(&r, Reply::error("unknown event")).await;
        for (event, payload) in [
            ("new_msg", json!({})),
            ("shout", json!({"body": 5})),
            ("whisper", json!({"body": "x"})),
        ] {
            let r = c.push("rooms:p", event, payload);
            c.assert_reply(&r, Reply::error("invalid")).await;
        }
        let r = c.push("rooms:p", "ping", json!({}));
        c.assert_reply(&r, Reply::ok()).await;
    });
}

#[test]
fn leave_event_closes_the_channel() {
    run(|kit| async move {
        let mut c = client(&kit, "7").await;
        c.subscribe_and_join("rooms:l", json!({})).await;
        c.push("rooms:l", "leave", json!({}));
        let close = c.expect("phx_close", |f| f.event == "phx_close").await;
        assert_eq!(close.join_ref, close.msg_ref);
        let r = c.push("rooms:l", "ping", json!({}));
        c.assert_reply(&r, Reply::error("unmatched topic")).await;
    });
}

#[test]
fn crash_sends_phx_error_and_other_channels_go_on() {
    run(|kit| async move {
        let mut c = client(&kit, "7").await;
        c.subscribe_and_join("rooms:x", json!({})).await;
        c.subscribe_and_join("rooms:y", json!({})).await;
        c.push("rooms:x", "crash", json!({}));
        let err = c.expect("phx_error", |f| f.event == "phx_error").await;
        assert_eq!(err.topic, "rooms:x");
        assert_eq!(err.payload, Payload::Json(json!({"reason": "channel_crash"})));
        let r = c.push("rooms:y", "ping", json!({}));
        c.assert_reply(&r, Reply::ok()).await;
        // The crashed channel can be joined again.
        room_position(c.subscribe_and_join("rooms:x", json!({})).await);
    });
}

#[test]
fn notifications_only_for_their_user_and_endpoint_reaches_them() {
    run(|kit| async move {
        let mut c = client(&kit, "5").await;
        assert_eq!(
            c.subscribe_and_join("notifications:5", json!({})).await,
            Reply::ok()
        );
        assert_eq!(
            c.subscribe_and_join("notifications:6", json!({})).await,
            Reply::Error(json!({"reason": "unauthorized"}).into())
        );
        kit.broadcast("notifications:5", "alert", json!({"text": "hello"}));
        c.assert_broadcast("notifications:5", "alert", json!({"text": "hello"}))
            .await;
    });
}

#[test]
fn bench_fanout_without_pushes() {
    run(|kit| async move {
        let mut a = client(&kit, "1").await;
        let mut b = client(&kit, "2").await;
        a.subscribe_and_join("bench:z", json!({})).await;
        b.subscribe_and_join("bench:z", json!({})).await;
        a.push("bench:z", "new_msg", json!({"body": "0"}));
        for c in [&mut a, &mut b] {
            c.assert_broadcast("bench:z", "new_msg", json!({"body": "0", "user": "1"}))
                .await;
            assert!(c.frames().is_empty(), "no pushes on bench topics");
        }
    });
}

#[test]
fn disconnect_broadcast_closes_every_socket_of_the_user() {
    run(|kit| async move {
        let a = client(&kit, "9").await;
        let a2 = client(&kit, "9").await;
        let b = client(&kit, "10").await;
        // On its own core a broadcast is delivered before `broadcast` returns: the close
        // requests are made by then, no wait needed.
        kit.broadcast("user_socket:9", "disconnect", json!({}));
        assert_eq!(a.close_code(), Some(1001));
        assert_eq!(a2.close_code(), Some(1001));
        assert_eq!(b.close_code(), None);
        // Other events on the socket id are ignored.
        kit.broadcast("user_socket:10", "other", json!({}));
        assert_eq!(b.close_code(), None);
        kit.broadcast("user_socket:10", "disconnect", json!({}));
        assert_eq!(
            b.close_code(),
            Some(1001),
            "the same socket id does close on disconnect"
        );
    });
}

#[test]
fn duplicate_join_replaces_the_channel() {
    run(|kit| async move {
        let mut c = client(&kit, "3").await;
        c.subscribe_and_join("rooms:d", json!({})).await;
        c.frames();
        room_position(c.subscribe_and_join("rooms:d", json!({})).await);
        let frames = c.frames();
        assert_eq!(frames[0].event, "phx_close");
        assert_eq!(frames[0].join_ref.as_deref(), Some("1"));
        assert_eq!(frames[1].event, "welcome");
        // Only one subscription remains: one broadcast, one delivery.
        c.push("rooms:d", "new_msg", json!({"body": "once"}));
        c.assert_broadcast("rooms:d", "new_msg", json!({"body": "once", "user": "3"}))
            .await;
        c.refute(Duration::from_millis(30), |f| f.event == "new_msg")
            .await;
    });
}

#[test]
fn leaving_in_any_order_keeps_the_subscriber_list_exact() {
    run(|kit| async move {
        let mut clients = Vec::new();
        for i in 0..40 {
            clients.push(client(&kit, &i.to_string()).await);
        }
        for c in clients.iter_mut() {
            c.subscribe_and_join("bench:order", json!({})).await;
        }
        // Leave in an order that moves entries around the list (every third, then the
        // last few, then the first).
        let leaving: Vec<usize> = (0..40).step_by(3).chain([39, 38, 1]).collect();
        for &i in &leaving {
            assert_eq!(clients[i].leave("bench:order").await, Reply::ok());
        }
        let stayer = (0..40).find(|i| !leaving.contains(i)).unwrap();
        clients[stayer].push("bench:order", "new_msg", json!({"body": "after"}));
        for (i, c) in clients.iter_mut().enumerate() {
            if leaving.contains(&i) {
                c.refute(Duration::from_millis(5), |f| f.event == "new_msg").await;
            } else {
                c.assert_broadcast(
                    "bench:order",
                    "new_msg",
                    json!({"body": "after", "user": stayer.to_string()}),
                )
                .await;
                c.refute(Duration::ZERO, |f| f.event == "new_msg").await;
            }
        }
    });
}

#[test]
fn a_rejoin_with_since_recovers_what_it_missed_and_whispers_only_reach_their_addressee() {
    run(|kit| async move {
        let mut a = client(&kit, "a").await;
        let mut b = client(&kit, "b").await;
        let start = room_position(a.subscribe_and_join("rooms:h", json!({})).await);
        room_position(b.subscribe_and_join("rooms:h", json!({})).await);
        assert_eq!(a.leave("rooms:h").await, Reply::ok());
        b.push("rooms:h", "new_msg", json!({"body": "1"}));
        b.push("rooms:h", "whisper", json!({"to": "b", "body": "2"}));
        b.push("rooms:h", "whisper", json!({"to": "a", "body": "3"}));
        b.push("rooms:h", "new_msg", json!({"body": "4"}));
        let last = b
            .assert_broadcast("rooms:h", "new_msg", json!({"body": "4", "user": "b"}))
            .await
            .expect("a position");
        let epoch = start.split(':').next().unwrap();
        assert_eq!(last, format!("{epoch}:4"));
        a.frames();

        let reply = a.subscribe_and_join("rooms:h", json!({"since": start})).await;
        let expected = json!({"position": format!("{epoch}:4"), "recovered": true});
        assert_eq!(reply, Reply::Ok(expected.into()));
        let got: Vec<_> = a
            .frames()
            .into_iter()
            .filter(|f| f.event == "new_msg" || f.event == "whisper")
            .map(|f| {
                (
                    f.event,
                    f.payload.str_field("body").map(str::to_string),
                    f.msg_ref,
                )
            })
            .collect();
        let at = |n: u32| Some(format!("{epoch}:{n}"));
        assert_eq!(
            got,
            vec![
                ("new_msg".to_string(), Some("1".to_string()), at(1)),
                ("whisper".to_string(), Some("3".to_string()), at(3)),
                ("new_msg".to_string(), Some("4".to_string()), at(4)),
            ],
            "the replay, in order; the whisper to b is not a's"
        );

        let reply = a
            .subscribe_and_join("rooms:h2", json!({"since": format!("{epoch}:1")}))
            .await;
        let Reply::Ok(Payload::Json(r)) = reply else {
            panic!()
        };
        assert_eq!(r["recovered"], json!(false), "another room has another epoch");
        assert_eq!(
            a.subscribe_and_join("rooms:h3", json!({"since": "4"})).await,
            Reply::error("invalid")
        );
    });
}
