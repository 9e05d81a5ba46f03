//! HTTP/1.1 requests (parsed by httparse) and the answers the transport writes: the
//! WebSocket upgrade and plain responses. Sans-IO: bytes in, bytes out.

use std::net::IpAddr;

use tungstenite::handshake::derive_accept_key;

/// Longest request head accepted before the connection is refused.
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// A parsed request head (body handling lives with the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path without the query, e.g. `/socket/websocket`.
    pub path: String,
    /// Raw query string (no `?`), possibly empty.
    pub query: String,
    /// Header names lower-cased, values as sent.
    pub headers: Vec<(String, String)>,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Not HTTP/1.x, or a header is not text.
    #[error("malformed HTTP request")]
    Malformed,
    /// Head over [`MAX_HEAD`] or too many headers.
    #[error("request head too large")]
    TooLarge,
    /// A repeated `Content-Length`, or one that is not all digits.
    #[error("bad content-length")]
    BadContentLength,
}

impl Request {
    /// Parses a request head from the front of `buf`: `Ok(None)` while incomplete, else the
    /// request and the head's length.
    ///
    /// ```
    /// use ringcast::proto::http::Request;
    /// let (req, len) = Request::parse(b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\n\r\n")
    ///     .unwrap().unwrap();
    /// assert_eq!((req.path.as_str(), req.query.as_str(), len), ("/socket/websocket", "vsn=2.0.0", 53));
    /// assert_eq!(req.header("host"), Some("x"));
    /// ```
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => Err(HttpError::TooLarge),
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.ok_or(HttpError::Malformed)?;
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let headers = req
                    .headers
                    .iter()
                    .map(|h| {
                        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
                        Ok((h.name.to_ascii_lowercase(), value.trim().to_string()))
                    })
                    .collect::<Result<_, HttpError>>()?;
                Ok(Some((
                    Request {
                        method: req.method.ok_or(HttpError::Malformed)?.to_string(),
                        path: path.to_string(),
                        query: query.to_string(),
                        headers,
                    },
                    len,
                )))
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err(HttpError::TooLarge),
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(HttpError::TooLarge),
            Err(_) => Err(HttpError::Malformed),
        }
    }

    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower case), in order: a header may be repeated.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header contains `token`, case-insensitively.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The body length the request announces: `Ok(0)` without a `Content-Length`, an
    /// error when the header is repeated, empty or not all ASCII digits (`+5`, `5, 5`,
    /// ` 5x`): a request that two parsers could read with two lengths is refused
    /// rather than guessed at (request smuggling).
    ///
    /// ```
    /// use ringcast::proto::http::Request;
    /// let req = |head: &str| Request::parse(head.as_bytes()).unwrap().unwrap().0;
    /// assert_eq!(req("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n").content_length(), Ok(12));
    /// assert_eq!(req("GET / HTTP/1.1\r\n\r\n").content_length(), Ok(0));
    /// assert!(req("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n").content_length().is_err());
    /// assert!(req("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").content_length().is_err());
    /// ```
    pub fn content_length(&self) -> Result<u64, HttpError> {
        let mut values = self.headers.iter().filter(|(n, _)| n == "content-length");
        let Some((_, value)) = values.next() else {
            return Ok(0);
        };
        if values.next().is_some() || value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::BadContentLength);
        }
        value.parse().map_err(|_| HttpError::BadContentLength)
    }

    /// Decoded query parameters, in order (repeated keys kept).
    pub fn query_params(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.query.as_bytes())
            .into_owned()
            .collect()
    }

    /// The `Sec-WebSocket-Key` when this is a valid WebSocket upgrade request.
    pub fn websocket_key(&self) -> Option<&str> {
        let upgrade = self.method == "GET"
            && self.header_has_token("connection", "upgrade")
            && self.header_has_token("upgrade", "websocket")
            && self.header("sec-websocket-version") == Some("13");
        upgrade.then(|| self.header("sec-websocket-key")).flatten()
    }
}

/// The prefix of the subprotocol that carries a Phoenix 1.8 `authToken`.
pub const AUTH_TOKEN_PREFIX: &str = "base64url.bearer.phx.";

/// The header a long-poll client sends its `authToken` in.
pub const AUTH_TOKEN_HEADER: &str = "x-phoenix-authtoken";

/// An auth token that was offered but cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the auth token offered is not base64 of UTF-8 text")]
pub struct BadAuthToken;

impl Request {
    /// The subprotocols a WebSocket upgrade offers (`Sec-WebSocket-Protocol`, every
    /// header and every comma-separated item), in order.
    pub fn subprotocols(&self) -> impl Iterator<Item = &str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == "sec-websocket-protocol")
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }

    /// The Phoenix 1.8 auth token of this request: on a WebSocket upgrade the
    /// subprotocol `base64url.bearer.phx.<b64>` (standard or URL-safe alphabet, padded or
    /// not), on long-poll the `X-Phoenix-AuthToken` header. `None` when neither is sent.
    ///
    /// ```
    /// use ringcast::proto::http::Request;
    /// let req = |head: &str| Request::parse(head.as_bytes()).unwrap().unwrap().0;
    /// let ws = req("GET / HTTP/1.1\r\nSec-WebSocket-Protocol: phoenix, base64url.bearer.phx.YS5i\r\n\r\n");
    /// assert_eq!(ws.auth_token(), Some(Ok("a.b".to_string())));
    /// let lp = req("GET / HTTP/1.1\r\nX-Phoenix-AuthToken: a.b\r\n\r\n");
    /// assert_eq!(lp.auth_token(), Some(Ok("a.b".to_string())));
    /// assert_eq!(req("GET / HTTP/1.1\r\n\r\n").auth_token(), None);
    /// ```
    pub fn auth_token(&self) -> Option<Result<String, BadAuthToken>> {
        if let Some(b64) = self
            .subprotocols()
            .find_map(|p| p.strip_prefix(AUTH_TOKEN_PREFIX))
        {
            return Some(decode_auth_token(b64));
        }
        self.header(AUTH_TOKEN_HEADER).map(|t| Ok(t.to_string()))
    }

    /// The request target as sent: path, and `?query` when there is one.
    pub fn uri(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }

    /// Every `x-*` header, names lower-cased, in order (Phoenix's `x_headers`).
    pub fn x_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(n, _)| n.starts_with("x-"))
            .cloned()
            .collect()
    }

    /// The client's address as the proxies in front of `peer` tell it. Walks the
    /// `Forwarded` `for=` list (or, without one, `X-Forwarded-For`) from the nearest hop
    /// back while each hop is `trusted`; the first untrusted address is the client. A
    /// `peer` that is not trusted is the client itself, whatever its headers say.
    ///
    /// ```
    /// use std::net::IpAddr;
    /// use ringcast::proto::http::Request;
    /// let req = Request::parse(b"GET / HTTP/1.1\r\nX-Forwarded-For: 203.0.113.7, 10.0.0.2\r\n\r\n")
    ///     .unwrap().unwrap().0;
    /// let proxy = |ip: IpAddr| ip.to_string().starts_with("10.");
    /// assert_eq!(req.forwarded_client("10.0.0.1".parse().unwrap(), proxy), "203.0.113.7".parse::<IpAddr>().unwrap());
    /// assert_eq!(req.forwarded_client("198.51.100.1".parse().unwrap(), proxy), "198.51.100.1".parse::<IpAddr>().unwrap());
    /// ```
    pub fn forwarded_client(&self, peer: IpAddr, trusted: impl Fn(IpAddr) -> bool) -> IpAddr {
        if !trusted(peer) {
            return peer;
        }
        let forwarded: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == "forwarded")
            .flat_map(|(_, v)| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
                })
            })
            .collect();
        let hops: Vec<&str> = if forwarded.is_empty() {
            self.headers
                .iter()
                .filter(|(n, _)| n == "x-forwarded-for")
                .flat_map(|(_, v)| v.split(','))
                .map(str::trim)
                .collect()
        } else {
            forwarded
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !trusted(ip) {
                break;
            }
        }
        client
    }
}

/// An address of a `Forwarded` or `X-Forwarded-For` hop: `1.2.3.4`, `1.2.3.4:80`,
/// `"[2001:db8::1]:4711"`, `2001:db8::1`. Obfuscated or `unknown` hops are `None`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// Decodes the base64 of an auth token subprotocol, in either alphabet, padded or not.
fn decode_auth_token(b64: &str) -> Result<String, BadAuthToken> {
    use base64::Engine;
    let standard: String = b64
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(standard)
        .map_err(|_| BadAuthToken)?;
    String::from_utf8(bytes).map_err(|_| BadAuthToken)
}

/// The `101 Switching Protocols` answer for `key`, with extra `headers`.
pub fn upgrade_response(key: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// An HTTP response with a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers besides content-length and connection.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a content type and body.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: body.into(),
        }
    }

    /// A JSON response.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response::new(status, "application/json", body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The response on the wire; `keep_alive` false adds `connection: close`.
    ///
    /// ```
    /// use ringcast::proto::http::Response;
    /// let bytes = Response::json(202, r#"{"ok":true}"#).to_bytes(true);
    /// assert_eq!(bytes, b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}");
    /// ```
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!("content-length: {}\r\n", self.body.len()));
        if !keep_alive {
            out.push_str("connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// A complete response that closes the connection after it.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    Response::new(status, content_type, body).to_bytes(false)
}

/// Whether the client asked to close the connection after this request.
pub fn wants_close(req: &Request) -> bool {
    req.header_has_token("connection", "close")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /socket/websocket?token=a%2Eb&vsn=2.0.0 HTTP/1.1\r\nHost: h\r\n\
Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn upgrade_request_and_accept_key() {
        let (req, len) = Request::parse(UPGRADE).unwrap().unwrap();
        assert_eq!(len, UPGRADE.len());
        assert_eq!(req.websocket_key(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(
            req.query_params(),
            vec![("token".into(), "a.b".into()), ("vsn".into(), "2.0.0".into())]
        );
        let resp = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==", &[("x-a", "1")])).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.ends_with("x-a: 1\r\n\r\n"));
    }

    #[test]
    fn partial_garbage_and_oversized_heads() {
        assert_eq!(Request::parse(&UPGRADE[..20]), Ok(None));
        assert_eq!(
            Request::parse(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HttpError::Malformed)
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(Request::parse(&big), Err(HttpError::TooLarge));
    }

    fn head(headers: &str) -> Request {
        let text = format!("GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\n{headers}\r\n");
        Request::parse(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn auth_tokens_in_either_base64_alphabet_padded_or_not() {
        // "a?b>c" has a '/' and a '+' in standard base64 (YT9iPmM=).
        for b64 in ["YT9iPmM=", "YT9iPmM"] {
            let req = head(&format!(
                "Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.{b64}\r\n"
            ));
            assert_eq!(req.auth_token(), Some(Ok("a?b>c".to_string())), "{b64}");
        }
        let url_safe = head(
            "Sec-WebSocket-Protocol: phoenix\r\nSec-WebSocket-Protocol: base64url.bearer.phx.Pz8_Pz4-\r\n",
        );
        assert_eq!(
            url_safe.auth_token(),
            Some(Ok("????>>".to_string())),
            "two headers, URL-safe"
        );
        let standard = head("Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.Pz8/Pz4+\r\n");
        assert_eq!(standard.auth_token(), Some(Ok("????>>".to_string())));
        assert_eq!(
            head("Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.!!!\r\n").auth_token(),
            Some(Err(BadAuthToken))
        );
        assert_eq!(
            head("Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx./w\r\n").auth_token(),
            Some(Err(BadAuthToken)),
            "not UTF-8"
        );
        assert_eq!(head("Sec-WebSocket-Protocol: phoenix\r\n").auth_token(), None);
        let both =
            head("Sec-WebSocket-Protocol: base64url.bearer.phx.YS5i\r\nX-Phoenix-AuthToken: other\r\n");
        assert_eq!(
            both.auth_token(),
            Some(Ok("a.b".to_string())),
            "the subprotocol first"
        );
    }

    #[test]
    fn the_client_behind_trusted_proxies() {
        let ten = |ip: IpAddr| matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = head("X-Forwarded-For: 198.51.100.9, 203.0.113.7, 10.0.0.3\r\n");
        assert_eq!(
            xff.forwarded_client(proxy, ten),
            ip("203.0.113.7"),
            "the nearest untrusted hop"
        );
        assert_eq!(
            xff.forwarded_client(ip("192.0.2.1"), ten),
            ip("192.0.2.1"),
            "an untrusted peer is the client"
        );
        let fwd = head("Forwarded: for=192.0.2.60;proto=http;by=203.0.113.43, for=\"[2001:db8:cafe::17]:4711\"\r\nX-Forwarded-For: 1.1.1.1\r\n");
        assert_eq!(
            fwd.forwarded_client(proxy, ten),
            ip("2001:db8:cafe::17"),
            "Forwarded wins"
        );
        let all_trusted = head("X-Forwarded-For: 10.1.1.1, 10.2.2.2\r\n");
        assert_eq!(
            all_trusted.forwarded_client(proxy, ten),
            ip("10.1.1.1"),
            "the farthest one"
        );
        let unknown = head("Forwarded: for=unknown, for=203.0.113.5\r\n");
        assert_eq!(unknown.forwarded_client(proxy, ten), ip("203.0.113.5"));
        assert_eq!(
            head("").forwarded_client(proxy, ten),
            proxy,
            "no headers: the peer"
        );
        assert_eq!(
            head("X-Forwarded-For: 10.9.9.9:1234\r\n").forwarded_client(proxy, ten),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn uri_and_x_headers() {
        let req = head("X-Request-Id: 7\r\nUser-Agent: t\r\nx-real-ip: 1.2.3.4\r\n");
        assert_eq!(req.uri(), "/socket/websocket?vsn=2.0.0");
        assert_eq!(
            req.x_headers(),
            vec![
                ("x-request-id".to_string(), "7".to_string()),
                ("x-real-ip".to_string(), "1.2.3.4".to_string())
            ]
        );
    }

    #[test]
    fn non_upgrade_has_no_key() {
        let (req, _) = Request::parse(b"GET /socket/websocket HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.websocket_key(), None);
    }
}
