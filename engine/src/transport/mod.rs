//! Transports: the accept loop of a core, the HTTP request head that starts every
//! connection, and the WebSocket upgrade into a [`websocket::Pump`].

pub(crate) mod websocket;

use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::api::router::ConnectInfo;
use crate::proto::http::{self, Request, MAX_HEAD};
use crate::proto::Vsn;
use crate::shard::session::Session;
use crate::shard::Shard;

/// How long a client may take to send its request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on this core until the listener fails for good.
pub(crate) async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(serve(shard.clone(), stream)).detach();
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                tracing::warn!(core = shard.index, "accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the request head; `Err` carries the response to send before closing.
async fn read_head(stream: &mut TcpStream) -> Result<(Request, Vec<u8>), Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        let filled = buf.len();
        buf.resize(filled + 2048, 0);
        let n = match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => n,
        };
        buf.truncate(filled + n);
        match Request::parse(&buf) {
            Ok(Some((req, len))) => return Ok((req, buf.split_off(len))),
            Ok(None) => {}
            Err(http::HttpError::TooLarge) => {
                return Err(Some(http::response(
                    431,
                    "text/plain",
                    b"request head too large\n",
                )))
            }
            Err(_) => {
                return Err(Some(http::response(
                    400,
                    "text/plain",
                    b"malformed HTTP request\n",
                )))
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(Some(http::response(
                431,
                "text/plain",
                b"request head too large\n",
            )));
        }
    }
}

async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    // Boxed: the head is read once, and its buffers must not stay in the connection's
    // task for the connection's whole life.
    let (req, leftover) = match Box::pin(read_head(&mut stream)).await {
        Ok(head) => head,
        Err(response) => {
            if let Some(response) = response {
                let _ = stream.write_all(&response).await;
            }
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    match (req.method.as_str(), req.path.as_str()) {
        (_, "/socket/websocket") => {
            let upgraded = Box::pin(upgrade(&shard, &mut stream, req)).await;
            if let Some(session) = upgraded {
                websocket::Pump::new(&mut stream, shard, session, leftover).await;
            }
        }
        ("GET", "/healthz") => {
            let _ = stream
                .write_all(&http::response(200, "text/plain", b"ok\n"))
                .await;
        }
        _ => {
            let _ = stream
                .write_all(&http::response(404, "text/plain", b"not found\n"))
                .await;
        }
    }
}

fn forbidden() -> Vec<u8> {
    http::response(403, "text/plain", b"")
}

fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(origin) => allowed
            .iter()
            .any(|a| a.trim_end_matches('/') == origin.trim_end_matches('/')),
    }
}

/// Answers the upgrade request; on success the connection is registered and its
/// session returned.
async fn upgrade(shard: &Rc<Shard>, stream: &mut TcpStream, req: Request) -> Option<Session> {
    let Some(key) = req.websocket_key().map(str::to_string) else {
        let response = http::response(400, "text/plain", b"WebSocket upgrade expected\n");
        let _ = stream.write_all(&response).await;
        return None;
    };
    let params = req.query_params();
    let vsn = Vsn::from_param(params.iter().find(|(k, _)| k == "vsn").map(|(_, v)| v.as_str()));
    let origin = req.header("origin").map(str::to_string);
    let app = shard.app.clone();
    let info = ConnectInfo {
        params,
        peer_addr: stream.peer_addr().ok(),
        origin,
    };
    let accepted = match vsn {
        Some(vsn) if origin_allowed(&app.config.allowed_origins, info.origin.as_deref()) => {
            app.socket.connect(&info).map(|(assigns, id)| (vsn, assigns, id))
        }
        _ => None,
    };
    let Some((vsn, assigns, socket_id)) = accepted else {
        let _ = stream.write_all(&forbidden()).await;
        return None;
    };
    let core = shard.index.to_string();
    let response = http::upgrade_response(&key, &[("x-ringcast-core", &core)]);
    stream.write_all(&response).await.ok()?;
    let conn = shard.add_conn(vsn, assigns, socket_id);
    Some(Session::new(shard.clone(), conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_rules() {
        let allowed = vec!["http://good.example".to_string()];
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&allowed, Some("http://good.example")));
        assert!(!origin_allowed(&allowed, Some("http://evil.example")));
        assert!(origin_allowed(&[], Some("http://anything")));
    }
}
