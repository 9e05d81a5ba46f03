//! Bounds on what piles up inside a core, driven through the test kit: a channel whose
//! handler does not finish while intercepted broadcasts keep coming is closed once its
//! mailbox passes its bound, and the other members lose nothing.

use std::time::Duration;

use ringcast::testing::{self, Frame};
use ringcast::{Channel, ConnectInfo, HandleResult, Payload, Reply, Router, Socket, SocketHandler};
use serde_json::json;

struct Anyone;

impl SocketHandler for Anyone {
    type Assigns = ();
    async fn connect(&self, _: &ConnectInfo) -> Option<()> {
        Some(())
    }
}

/// Intercepts `note` (pushed on through `handle_out`); `stall` keeps its handler busy.
struct Stalling;

impl Channel for Stalling {
    const INTERCEPTS: &'static [&'static str] = &["note"];

    async fn join(_: &str, _: Payload, _: &mut Socket) -> Result<(Self, Payload), Payload> {
        Ok((Stalling, Payload::empty()))
    }

    async fn handle_in(&mut self, event: &str, _: Payload, _: &mut Socket) -> HandleResult {
        if event == "stall" {
            glommio::timer::sleep(Duration::from_secs(30)).await;
        }
        HandleResult::Reply(Reply::ok())
    }

    fn handle_out(&mut self, event: &str, payload: &Payload, socket: &mut Socket) {
        socket.push(event, payload.clone());
    }
}

#[test]
fn a_mailbox_over_its_bound_closes_its_connection_and_only_that_one() {
    let router = Router::new().channel::<Stalling>("room:*");
    testing::run(Anyone, router, |kit| async move {
        let mut stuck = kit.socket(&[]).await.unwrap();
        let mut member = kit.socket(&[]).await.unwrap();
        stuck.subscribe_and_join("room:a", json!({})).await;
        member.subscribe_and_join("room:a", json!({})).await;
        stuck.push("room:a", "stall", json!({}));
        glommio::timer::sleep(Duration::from_millis(20)).await;
        // Far more intercepted broadcasts than a mailbox holds (1,024), while the
        // stuck channel's handler never returns.
        const NOTES: usize = 1500;
        for n in 0..NOTES {
            kit.broadcast("room:a", "note", json!({ "n": n }));
            if n % 100 == 99 {
                // Let the other member's driver drain its mailbox meanwhile.
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        let deadline = std::time::Instant::now() + testing::ASSERT_TIMEOUT;
        while stuck.close_code().is_none() && std::time::Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(stuck.close_code(), Some(1008), "the stuck connection is cut off");
        let mut got = Vec::new();
        while got.len() < NOTES && std::time::Instant::now() < deadline + testing::ASSERT_TIMEOUT {
            got.extend(
                member
                    .frames()
                    .into_iter()
                    .filter(|f: &Frame| f.event == "note")
                    .map(|f| f.payload.json().unwrap()["n"].as_u64().unwrap()),
            );
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let want: Vec<u64> = (0..NOTES as u64).collect();
        assert_eq!(got, want, "the other member gets every note, in order");
        assert_eq!(member.close_code(), None);
    });
}
