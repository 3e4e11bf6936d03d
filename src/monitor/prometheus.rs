//! The Prometheus endpoint (`metrics-address`, off by default): a minimal
//! HTTP/1.1 server that answers `GET /metrics` with the server's figures
//! in the Prometheus text format (version 0.0.4).
//!
//! It runs on the server's runtime beside the ZEO listeners, and cannot
//! hurt them: a scrape reads the same counters as `server_status` (each
//! storage's read lock for a moment, never the commit lock's holder's
//! work), a request head is bounded ([`MAX_REQUEST_BYTES`]) and must arrive
//! within [`IO_TIMEOUT_SECS`], at most [`MAX_SCRAPE_CONNECTIONS`] scrapes
//! run at once, and every connection is closed after one response
//! (`Connection: close`). Anything but `GET` or `HEAD` of `/metrics` gets
//! a 404, 405 or 400 and is closed.
//!
//! Names are prefixed `zeotemp_`, counters end in `_total`, sizes are in
//! bytes and durations in seconds; per-storage series carry the label
//! `storage="NAME"`. [`render`] is a pure function of a [`Snapshot`].

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::protocol::ids::Tid;
use crate::state::Shared;
use crate::storage::Storage;

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

/// `Content-Type` of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
                    warn!("metrics: accept failed: {e}");
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

/// The figures of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub version: String,
    /// Unix time the server started, and seconds since.
    pub start_time: f64,
    pub uptime: f64,
    /// Open ZEO connections (all listeners), and the limit.
    pub connections: usize,
    pub max_connections: usize,
    /// The process's resident set size, if known (Linux).
    pub resident_bytes: Option<u64>,
    pub storages: Vec<StorageFigures>,
}

/// One storage's figures, read at one moment: what the metrics and the
/// storage's `server_status` (and so `ruok`) report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageFigures {
    pub name: String,
    pub connections: usize,
    pub objects: usize,
    pub current_bytes: usize,
    pub retained_bytes: usize,
    pub accounted_bytes: usize,
    pub memory_limit: Option<usize>,
    pub revisions: usize,
    pub last_tid: Tid,
    pub loads: u64,
    pub stores: u64,
    pub commits: u64,
    pub aborts: u64,
    pub conflicts: u64,
    pub conflicts_resolved: u64,
    pub active_transactions: u64,
    pub lock_waiters: usize,
    /// Seconds the commit lock's holder has held it (`None` when free).
    pub lock_held_seconds: Option<f64>,
    pub gc_collections: u64,
    pub gc_freed_objects: u64,
    pub gc_longest_pause_us: u64,
    pub gc_last_collection_us: u64,
    pub unscannable_records: usize,
}

impl StorageFigures {
    /// Reads storage `s`'s figures now.
    pub fn of(s: &Storage) -> StorageFigures {
        // Not nested: the commit lock's state, then the storage's.
        let (lock_held_seconds, lock_waiters) = s.lock_status();
        let st = s.read();
        let (revisions, retained_bytes) = st.retained();
        let (stats, gc) = (&s.stats, &s.gc_stats);
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        StorageFigures {
            name: s.name().to_string(),
            connections: st.subscriber_count(),
            objects: st.len(),
            current_bytes: st.size(),
            retained_bytes,
            accounted_bytes: st.accounted(),
            memory_limit: st.memory_limit(),
            revisions,
            last_tid: st.last_tid(),
            loads: n(&stats.loads),
            stores: n(&stats.stores),
            commits: n(&stats.commits),
            aborts: n(&stats.aborts),
            conflicts: n(&stats.conflicts),
            conflicts_resolved: n(&stats.conflicts_resolved),
            active_transactions: n(&stats.active_txns),
            lock_waiters,
            lock_held_seconds,
            gc_collections: n(&gc.collections),
            gc_freed_objects: n(&gc.freed_objects),
            gc_longest_pause_us: n(&gc.longest_pause_us),
            gc_last_collection_us: n(&gc.last_cycle_us),
            unscannable_records: st.unscannable(),
        }
    }
}

impl Snapshot {
    /// Reads the server's figures now.
    pub fn take(shared: &Shared) -> Snapshot {
        let storages = shared
            .storage_names
            .iter()
            .filter_map(|name| shared.storages.get(name))
            .map(|s| StorageFigures::of(s))
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            start_time: shared
                .started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            uptime: shared
                .started
                .elapsed()
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            connections: shared.connections.load(Ordering::Relaxed),
            max_connections: shared.config.max_connections,
            resident_bytes: resident_bytes(),
            storages,
        }
    }
}

/// VmRSS of this process from /proc/self/status (Linux), in bytes.
fn resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A sample value: integers print exactly, floats as Prometheus reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Int(u64),
    Float(f64),
}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Num::Int(i) => write!(f, "{i}"),
            Num::Float(x) if x.is_nan() => f.write_str("NaN"),
            Num::Float(x) if x.is_infinite() => f.write_str(if x > 0.0 { "+Inf" } else { "-Inf" }),
            Num::Float(x) => write!(f, "{x}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

/// A label value as the text format wants it: `\`, `"` and newlines
/// escaped.
pub fn escape_label_value(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    let mut out = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.into()
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: Kind, help: &str) {
    let kind = match kind {
        Kind::Gauge => "gauge",
        Kind::Counter => "counter",
    };
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

fn sample(out: &mut String, name: &str, label: Option<(&str, &str)>, v: Num) {
    match label {
        Some((k, val)) => {
            let _ = writeln!(out, "{name}{{{k}=\"{}\"}} {v}", escape_label_value(val));
        }
        None => {
            let _ = writeln!(out, "{name} {v}");
        }
    }
}

type Figure = fn(&StorageFigures) -> Option<Num>;

fn int(n: usize) -> Option<Num> {
    Some(Num::Int(n as u64))
}

/// The per-storage families: name, type, help, value (`None`: no sample).
static STORAGE_FAMILIES: &[(&str, Kind, &str, Figure)] = &[
    (
        "zeotemp_storage_connections",
        Kind::Gauge,
        "Client connections registered with the storage (server_status connections).",
        |s| int(s.connections),
    ),
    (
        "zeotemp_objects",
        Kind::Gauge,
        "Objects in the storage, deleted ones with retained history included (len(storage)).",
        |s| int(s.objects),
    ),
    (
        "zeotemp_current_bytes",
        Kind::Gauge,
        "Bytes of the objects' current records (getSize).",
        |s| int(s.current_bytes),
    ),
    (
        "zeotemp_retained_bytes",
        Kind::Gauge,
        "Bytes of all retained records, current and replaced.",
        |s| int(s.retained_bytes),
    ),
    (
        "zeotemp_accounted_bytes",
        Kind::Gauge,
        "Bytes the storage is accounted for (records, references, bookkeeping); the memory limit applies to this.",
        |s| int(s.accounted_bytes),
    ),
    (
        "zeotemp_memory_limit_bytes",
        Kind::Gauge,
        "The memory limit of the storage's accounted bytes (no sample when there is no limit).",
        |s| s.memory_limit.and_then(int),
    ),
    (
        "zeotemp_revisions",
        Kind::Gauge,
        "Object revisions retained, current and replaced.",
        |s| int(s.revisions),
    ),
    (
        "zeotemp_last_transaction_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the storage's last transaction id.",
        |s| Some(Num::Float(s.last_tid.to_unix_time())),
    ),
    (
        "zeotemp_loads_total",
        Kind::Counter,
        "Object loads (loadBefore, loadSerial).",
        |s| Some(Num::Int(s.loads)),
    ),
    (
        "zeotemp_stores_total",
        Kind::Counter,
        "Object stores and deletes sent by transactions.",
        |s| Some(Num::Int(s.stores)),
    ),
    (
        "zeotemp_commits_total",
        Kind::Counter,
        "Transactions committed.",
        |s| Some(Num::Int(s.commits)),
    ),
    (
        "zeotemp_aborts_total",
        Kind::Counter,
        "Transactions aborted.",
        |s| Some(Num::Int(s.aborts)),
    ),
    (
        "zeotemp_conflicts_total",
        Kind::Counter,
        "Write conflicts found at vote (handed to clients to resolve, or refused).",
        |s| Some(Num::Int(s.conflicts)),
    ),
    (
        "zeotemp_conflicts_resolved_total",
        Kind::Counter,
        "Conflicts that clients resolved and then committed.",
        |s| Some(Num::Int(s.conflicts_resolved)),
    ),
    (
        "zeotemp_active_transactions",
        Kind::Gauge,
        "Transactions begun and not yet finished or aborted.",
        |s| Some(Num::Int(s.active_transactions)),
    ),
    (
        "zeotemp_commit_lock_waiters",
        Kind::Gauge,
        "Votes waiting for the storage's commit lock.",
        |s| int(s.lock_waiters),
    ),
    (
        "zeotemp_commit_lock_held_seconds",
        Kind::Gauge,
        "Seconds the current holder of the commit lock has held it (0 when free).",
        |s| Some(Num::Float(s.lock_held_seconds.unwrap_or(0.0))),
    ),
    (
        "zeotemp_gc_collections_total",
        Kind::Counter,
        "Garbage collection cycles completed.",
        |s| Some(Num::Int(s.gc_collections)),
    ),
    (
        "zeotemp_gc_freed_objects_total",
        Kind::Counter,
        "Unreachable objects freed by the garbage collector.",
        |s| Some(Num::Int(s.gc_freed_objects)),
    ),
    (
        "zeotemp_gc_longest_pause_seconds",
        Kind::Gauge,
        "Longest time the collector has held up loads and commits in one go.",
        |s| Some(Num::Float(s.gc_longest_pause_us as f64 / 1e6)),
    ),
    (
        "zeotemp_gc_last_collection_seconds",
        Kind::Gauge,
        "Duration of the last whole collection cycle.",
        |s| Some(Num::Float(s.gc_last_collection_us as f64 / 1e6)),
    ),
    (
        "zeotemp_unscannable_records",
        Kind::Gauge,
        "Retained records that could not be scanned for references; while there are any reachable ones, nothing is freed.",
        |s| int(s.unscannable_records),
    ),
];

/// The Prometheus text for `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::with_capacity(4096 + 2048 * snap.storages.len());
    family(
        &mut out,
        "zeotemp_build_info",
        Kind::Gauge,
        "The zeotemp version serving (always 1).",
    );
    sample(
        &mut out,
        "zeotemp_build_info",
        Some(("version", &snap.version)),
        Num::Int(1),
    );
    let globals: [(&str, Kind, &str, Option<Num>); 6] = [
        (
            "zeotemp_start_time_seconds",
            Kind::Gauge,
            "Unix time the server started.",
            Some(Num::Float(snap.start_time)),
        ),
        (
            "zeotemp_uptime_seconds",
            Kind::Gauge,
            "Seconds since the server started.",
            Some(Num::Float(snap.uptime)),
        ),
        (
            "zeotemp_connections",
            Kind::Gauge,
            "Open ZEO client connections, all listeners (ruok probes and handshakes included).",
            Some(Num::Int(snap.connections as u64)),
        ),
        (
            "zeotemp_max_connections",
            Kind::Gauge,
            "The max-connections setting.",
            Some(Num::Int(snap.max_connections as u64)),
        ),
        (
            "zeotemp_storages",
            Kind::Gauge,
            "Storages served.",
            Some(Num::Int(snap.storages.len() as u64)),
        ),
        (
            "zeotemp_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the process (VmRSS).",
            snap.resident_bytes.map(Num::Int),
        ),
    ];
    for (name, kind, help, value) in globals {
        family(&mut out, name, kind, help);
        if let Some(v) = value {
            sample(&mut out, name, None, v);
        }
    }
    for (name, kind, help, figure) in STORAGE_FAMILIES {
        family(&mut out, name, *kind, help);
        for s in &snap.storages {
            if let Some(v) = figure(s) {
                sample(&mut out, name, Some(("storage", &s.name)), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            version: "1.2.3".into(),
            start_time: 1_795_694_400.5,
            uptime: 12.25,
            connections: 3,
            max_connections: 100,
            resident_bytes: Some(4096),
            storages: vec![
                StorageFigures {
                    name: "1".into(),
                    objects: 10,
                    commits: 7,
                    memory_limit: Some(1 << 20),
                    gc_longest_pause_us: 1500,
                    ..StorageFigures::default()
                },
                StorageFigures {
                    name: "a\"b\\c\nd".into(),
                    objects: 2,
                    ..StorageFigures::default()
                },
            ],
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("temp"), "temp");
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), r"x\ny");
        assert_eq!(escape_label_value("tëmp"), "tëmp");
        let text = render(&snapshot());
        assert!(
            text.contains("zeotemp_objects{storage=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{text}"
        );
        // Every sample is one line: a label value's newline never splits it.
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP zeotemp_")
                    || line.starts_with("# TYPE zeotemp_")
                    || line.starts_with("zeotemp_"),
                "{line:?}"
            );
        }
    }

    #[test]
    fn families_have_help_and_type_before_their_samples() {
        let text = render(&snapshot());
        let mut declared: Vec<(String, String)> = Vec::new();
        let mut helped = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(helped.last().map(String::as_str), Some(name));
                assert!(
                    declared.iter().all(|(n, _)| n != name),
                    "{name} declared twice"
                );
                declared.push((name.to_string(), kind.to_string()));
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let (last, kind) = declared.last().expect("a family first");
                assert_eq!(name, last, "samples of {last} are together");
                // Counters, and only counters, end in _total.
                assert_eq!(name.ends_with("_total"), kind == "counter", "{name}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        for name in [
            "zeotemp_build_info",
            "zeotemp_connections",
            "zeotemp_storages",
            "zeotemp_objects",
            "zeotemp_commits_total",
            "zeotemp_commit_lock_waiters",
            "zeotemp_gc_freed_objects_total",
        ] {
            assert!(declared.iter().any(|(n, _)| n == name), "{name}");
        }
    }

    #[test]
    fn values_and_labels() {
        let text = render(&snapshot());
        for want in [
            "zeotemp_build_info{version=\"1.2.3\"} 1\n",
            "zeotemp_start_time_seconds 1795694400.5\n",
            "zeotemp_connections 3\n",
            "zeotemp_storages 2\n",
            "zeotemp_resident_memory_bytes 4096\n",
            "zeotemp_objects{storage=\"1\"} 10\n",
            "zeotemp_commits_total{storage=\"1\"} 7\n",
            "zeotemp_memory_limit_bytes{storage=\"1\"} 1048576\n",
            "zeotemp_gc_longest_pause_seconds{storage=\"1\"} 0.0015\n",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        // No limit: the family is there, the sample is not.
        assert!(text.contains("# TYPE zeotemp_memory_limit_bytes gauge\n"));
        assert!(!text.contains("zeotemp_memory_limit_bytes{storage=\"a"));
        assert_eq!(Num::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Num::Float(f64::NAN).to_string(), "NaN");
    }

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
