//! The loadgen over `wss://` against a real ringcast server with TLS (in this process,
//! as `ringcast serve --tls-self-signed` or `--tls-cert/--tls-key` runs it): joins and
//! deliveries arrive with `--tls-insecure` or the right `--tls-ca`, and a certificate
//! the flags do not trust is refused with an error that says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ringcast::server::TlsSource;
use ringcast::{seed, Config, Server};

fn start(tls: TlsSource) -> SocketAddr {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        tls: Some(tls),
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

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lg-tls-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringcast-loadgen"))
        .args(["--quiet", "--sources", "4"])
        .args(args)
        .output()
        .unwrap()
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A CA and a certificate for `localhost` and 127.0.0.1 it signed; the paths of the CA
/// certificate, the server certificate and its key.
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

#[test]
fn fanout_over_wss_to_a_self_signed_server_with_tls_insecure() {
    let addr = start(TlsSource::SelfSigned);
    let dir = scratch("fanout");
    let json = dir.join("fanout.json");
    let url = format!("wss://127.0.0.1:{}", addr.port());
    let out = loadgen(&[
        "fanout",
        "--url",
        &url,
        "--tls-insecure",
        "-n",
        "30",
        "-m",
        "40",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&json);
    assert_eq!(r["subscribers_joined"], 30, "{r}");
    assert_eq!(r["sent"], 40);
    // Every subscriber gets every message.
    assert_eq!(r["deliveries"], 30 * 40, "{r}");
    assert_eq!(r["expected"], r["deliveries"]);
    assert_eq!(r["loss"], 0);
    assert_eq!(r["duplicates"], 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_self_signed_certificate_is_refused_without_a_trust_flag() {
    let addr = start(TlsSource::SelfSigned);
    let url = format!("wss://127.0.0.1:{}", addr.port());
    let out = loadgen(&["connect", "--url", &url, "-n", "3", "--hold", "0s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
    assert!(
        stderr.contains("--tls-ca") && stderr.contains("--tls-insecure"),
        "{stderr}"
    );
    // Over ws://, the same port answers nothing the loadgen can upgrade.
    let dir = scratch("plain");
    let json = dir.join("connect.json");
    let out = loadgen(&[
        "connect",
        "--url",
        &format!("ws://127.0.0.1:{}", addr.port()),
        "-n",
        "1",
        "--hold",
        "0s",
        "--stage-timeout",
        "2s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&json);
    assert_eq!(r["joined"], 0, "{r}");
    assert_eq!(r["failed"], 1, "{r}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_ca_file_trusts_the_certificates_it_signed_and_no_others() {
    let dir = scratch("ca");
    let (ca, cert, key) = make_ca(&dir, "good");
    let (other_ca, _, _) = make_ca(&dir, "other");
    let addr = start(TlsSource::Files { cert, key });
    let json = dir.join("connect.json");
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("wss://{host}:{}", addr.port());
        let out = loadgen(&[
            "connect",
            "--url",
            &url,
            "--tls-ca",
            ca.to_str().unwrap(),
            "-n",
            "20",
            "--rate",
            "500",
            "--hold",
            "1s",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = report(&json);
        assert_eq!(r["joined"], 20, "{r}");
        assert_eq!(r["connected_at_hold_end"], 20, "{r}");
    }
    let url = format!("wss://localhost:{}", addr.port());
    let out = loadgen(&[
        "connect",
        "--url",
        &url,
        "--tls-ca",
        other_ca.to_str().unwrap(),
        "-n",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
