//! The loadgen with `--compress` against a real ringcast server (in this process, as
//! `ringcast serve` runs it): every subscriber negotiates `permessage-deflate`, padded
//! broadcasts arrive compressed and intact (no loss), and the report counts far fewer
//! bytes received per delivery than the same run without compression.

use std::net::SocketAddr;
use std::process::Command;

use ringcast::{seed, Config, Server};

fn start() -> SocketAddr {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        ..Config::default()
    };
    let running = Server::bind(config, seed::UserSocket::new(seed::DEV_SECRET), seed::router())
        .unwrap()
        .start()
        .unwrap();
    let addr = running.local_addr();
    std::mem::forget(running);
    addr
}

/// A fanout of 40 padded messages to 30 subscribers; the JSON report.
fn fanout(addr: SocketAddr, compress: bool, name: &str) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!("lg-compress-{}-{name}.json", std::process::id()));
    let url = format!("ws://127.0.0.1:{}", addr.port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast-loadgen"));
    cmd.args(["--quiet", "--sources", "4", "--secret", seed::DEV_SECRET]);
    if compress {
        cmd.arg("--compress");
    }
    let out = cmd
        .args([
            "fanout", "--url", &url, "-n", "30", "-m", "40", "--pad", "3000", "--rate", "200",
        ])
        .args(["--topic", &format!("bench:{name}"), "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

#[test]
fn compressed_fanout_arrives_whole_and_costs_fewer_bytes() {
    let addr = start();
    let plain = fanout(addr, false, "plain");
    let packed = fanout(addr, true, "packed");
    for r in [&plain, &packed] {
        assert_eq!(r["loss"], 0, "{r}");
        assert_eq!(r["subscribers_joined"], 30);
    }
    assert_eq!(plain["compressed_connections"], 0);
    assert_eq!(
        packed["compressed_connections"], 30,
        "every subscriber negotiated it"
    );
    assert!(
        packed["inflated_messages"].as_u64().unwrap() >= 30 * 40,
        "{packed}"
    );
    let per = |r: &serde_json::Value| r["wire_bytes_per_delivery"].as_f64().unwrap();
    assert!(per(&plain) > 3000.0, "{plain}");
    assert!(
        per(&packed) * 4.0 < per(&plain),
        "{} against {}",
        per(&packed),
        per(&plain)
    );
}
