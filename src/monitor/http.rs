//! The Prometheus endpoint (`metrics-address`, off by default): a minimal
//! HTTP/1.1 server that answers `GET /metrics` with the server's figures
//! rendered by [`prometheus`](super::prometheus).
//!
//! It runs on the server's runtime beside the ZEO listeners, and cannot
//! hurt them: a scrape reads the same counters as `server_status` (each
//! storage's read lock for a moment, never the commit lock's holder's
//! work), a request head is bounded ([`MAX_REQUEST_BYTES`]) and must arrive
//! within [`IO_TIMEOUT_SECS`], at most [`MAX_SCRAPE_CONNECTIONS`] scrapes
//! run at once, and every connection is closed after one response
//! (`Connection: close`). Anything but `GET` or `HEAD` of `/metrics` gets
//! a 404, 405 or 400 and is closed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use super::figures::Snapshot;
use super::prometheus::{CONTENT_TYPE, render};
use crate::state::Shared;

/// Bytes of request head (request line and headers) a scraper may send; a
/// longer head is answered 431 and the connection closed. Prometheus sends
/// about 300.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Seconds a scraper may take to send its request head, and then to take
/// the response; over it the connection is closed.
pub const IO_TIMEOUT_SECS: u64 = 5;

/// Scrape connections served at once; further ones are closed at once
/// (Prometheus uses one per target).
pub const MAX_SCRAPE_CONNECTIONS: usize = 16;

/// After a response, how long and how many bytes the rest of a request
/// (a body nobody asked for) is read and dropped, so that closing does not
/// reset the connection before the client has read the response.
const DRAIN_SECS: u64 = 1;
const DRAIN_BYTES: usize = 64 * 1024;

/// Binds the endpoint's TCP listener (`HOST:PORT`, port 0 picks a free one).
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })
}

/// Serves scrapes until `stop` changes; then drops the scrapes in flight.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    crate::warn_repeated!([] "metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        if conns.len() >= MAX_SCRAPE_CONNECTIONS {
            debug!(%peer, "metrics: connection refused, {MAX_SCRAPE_CONNECTIONS} scrapes running");
            continue;
        }
        let shared = shared.clone();
        conns.spawn(async move {
            let timeout = Duration::from_secs(IO_TIMEOUT_SECS);
            let outcome = handle(stream, timeout, || render(&Snapshot::take(&shared))).await;
            debug!(%peer, "metrics: {outcome}");
        });
    }
}

/// One scrape connection: reads a request head, writes one response,
/// closes. Returns what happened, for the debug log.
pub async fn handle<S, F>(mut stream: S, timeout: Duration, body: F) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce() -> String,
{
    let response = match tokio::time::timeout(timeout, read_head(&mut stream)).await {
        Err(_) => return format!("no request within {timeout:?}; closed"),
        Ok(Err(e)) => return format!("read error: {e}"),
        Ok(Ok(None)) => return "closed before a request".into(),
        Ok(Ok(Some(head))) => respond(&head, body),
    };
    let status = response.status;
    let written = tokio::time::timeout(timeout, async {
        stream.write_all(&response.bytes).await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Err(_) => return format!("{status}; response not taken within {timeout:?}"),
        Ok(Err(e)) => return format!("{status}; write error: {e}"),
        Ok(Ok(())) => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(DRAIN_SECS), async {
        let mut chunk = [0u8; 4096];
        let mut left = DRAIN_BYTES;
        while left > 0 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    format!("answered {status}")
}

/// What the client sent so far, as far as the request head goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// Not the whole head yet (and nothing wrong in it).
    Partial,
    /// The head is complete: its length in bytes, final blank line included.
    Complete(usize),
    /// Not an HTTP request (a control byte, or a bad request line) or too
    /// long: the response to give.
    Bad(u16),
}

/// Looks at the bytes received so far. A request line that cannot be
/// HTTP is refused as soon as it is seen, not after the timeout.
pub fn check_head(buf: &[u8]) -> Head {
    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Head::Complete(i + 4);
    }
    if let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
        return Head::Complete(i + 2);
    }
    if buf
        .iter()
        .any(|&b| (b < 0x20 && !matches!(b, b'\r' | b'\n' | b'\t')) || b == 0x7f)
    {
        return Head::Bad(400);
    }
    if let Some(i) = buf.iter().position(|&b| b == b'\n')
        && parse_request_line(&buf[..i]).is_none()
    {
        return Head::Bad(400);
    }
    if buf.len() > MAX_REQUEST_BYTES {
        return Head::Bad(431);
    }
    Head::Partial
}

/// `(method, path)` of a request line (`GET /metrics?x=1 HTTP/1.1` gives
/// `("GET", "/metrics")`), or `None` if it is not HTTP/1.x.
pub fn parse_request_line(line: &[u8]) -> Option<(&str, &str)> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !version.starts_with("HTTP/1.")
    {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some((method, path))
}

/// Reads until the request head is complete or known to be bad. `None`:
/// the client closed without sending anything.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // A head cut short: answered as malformed (400).
            return Ok((!buf.is_empty()).then_some(buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        match check_head(&buf) {
            Head::Partial => {}
            Head::Complete(len) => {
                buf.truncate(len);
                return Ok(Some(buf));
            }
            Head::Bad(_) => return Ok(Some(buf)),
        }
    }
}

/// A whole HTTP response.
pub struct Response {
    pub status: u16,
    pub bytes: Vec<u8>,
}

/// The response to a request head (complete, cut short, or bad); `body`
/// renders the metrics and is called only for `GET /metrics`.
pub fn respond(head: &[u8], body: impl FnOnce() -> String) -> Response {
    let (method, path) = match check_head(head) {
        Head::Bad(status) => return plain(status, "", "malformed request\n"),
        Head::Partial => return plain(400, "", "malformed request\n"),
        Head::Complete(_) => {
            let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
            match parse_request_line(&head[..line_end]) {
                Some(x) => x,
                None => return plain(400, "", "malformed request\n"),
            }
        }
    };
    let head_only = method == "HEAD";
    if !head_only && method != "GET" {
        return plain(405, "Allow: GET, HEAD\r\n", "only GET /metrics is served\n");
    }
    if path != "/metrics" {
        let r = plain(404, "", "not found; metrics are at /metrics\n");
        return if head_only { headers_only(r) } else { r };
    }
    let text = body();
    let r = response(200, CONTENT_TYPE, "", text.as_bytes());
    if head_only { headers_only(r) } else { r }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

fn plain(status: u16, extra_headers: &str, text: &str) -> Response {
    response(
        status,
        "text/plain; charset=utf-8",
        extra_headers,
        text.as_bytes(),
    )
}

fn response(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Response {
    let mut bytes = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {extra_headers}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    Response { status, bytes }
}

/// `r` without its body (for `HEAD`; `Content-Length` stays).
fn headers_only(mut r: Response) -> Response {
    if let Some(i) = r.bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        r.bytes.truncate(i + 4);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line(b"GET /metrics?name[]=x HTTP/1.0"),
            Some(("GET", "/metrics"))
        );
        for bad in [
            &b"GET /metrics"[..],
            b"GET metrics HTTP/1.1",
            b"get /metrics HTTP/1.1",
            b"GET /metrics HTTP/2",
            b"GET  /metrics HTTP/1.1",
            b"\xff\xfe /metrics HTTP/1.1",
        ] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
        }
        assert_eq!(
            check_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Head::Partial
        );
        assert_eq!(
            check_head(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Head::Complete(25)
        );
        assert_eq!(check_head(b"GET / HTTP/1.1\n\nbody"), Head::Complete(16));
        // A ZEO client (zeo-nagios) pointed at the metrics port: refused at
        // once, not after the timeout.
        assert_eq!(check_head(b"\x00\x00\x00\x04ruok"), Head::Bad(400));
        assert_eq!(check_head(b"HELLO\r\n"), Head::Bad(400));
        let long = format!("GET /{} HTTP/1.1", "x".repeat(MAX_REQUEST_BYTES));
        assert_eq!(check_head(long.as_bytes()), Head::Bad(431));
    }

    #[test]
    fn responses() {
        let text = |r: Response| String::from_utf8(r.bytes).unwrap();
        let ok = text(respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || {
            "zeotemp_storages 1\n".into()
        }));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(&format!("\r\nContent-Type: {CONTENT_TYPE}\r\n")));
        assert!(ok.contains("\r\nContent-Length: 19\r\n"), "{ok}");
        assert!(ok.contains("\r\nConnection: close\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nzeotemp_storages 1\n"), "{ok}");
        let head = text(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", || "abc".into()));
        assert!(head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"));
        assert!(head.contains("Content-Length: 3\r\n"));
        let never = || -> String { panic!("rendered for a request that is not GET /metrics") };
        for (req, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"GARBAGE\r\n\r\n", "400"),
            (b"GET /metrics HTTP/1.1\r\nHost", "400"),
            (b"\x16\x03\x01\x02\x00", "400"),
        ] {
            let r = text(respond(req, never));
            assert!(
                r.starts_with(&format!("HTTP/1.1 {status} ")),
                "{req:?}: {r}"
            );
            assert!(r.contains("Connection: close\r\n"));
        }
    }

    #[tokio::test]
    async fn one_response_per_connection() {
        let timeout = Duration::from_secs(5);
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(handle(server, timeout, || "zeotemp_storages 1\n".into()));
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8(got).unwrap();
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 1, "{got}");
        drop(client);
        assert_eq!(task.await.unwrap(), "answered 200");

        // Bytes that are not HTTP: a 400 and the end, without waiting.
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(handle(server, Duration::from_secs(3600), || unreachable!()));
        client.write_all(b"\x00\x00\x00\x04ruok").await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 400 "), "{got:?}");
        drop(client);
        assert_eq!(task.await.unwrap(), "answered 400");
    }
}
