//! The metrics an operator alerts on, scraped from the real binary's
//! `/metrics` (`--metrics-address`) after each refusal and fault: every
//! counter is there from the start at 0, and the one with the right reason
//! goes up after the event (max-connections, accept errors under a low fd
//! limit, a TLS handshake in plain text or silence, a frame timeout, a transaction timeout, a client that does
//! not read, a protocol error, a vote over the memory limit or
//! max-transaction-bytes); the `process_*` metrics are sane; and a
//! connection's end is one `disconnected` line at INFO with its reason and
//! counts (a fault: WARN).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::client::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use zeotemp::protocol::value::Value;

/// The server binary, started with `args` on 127.0.0.1 port 0 for ZEO
/// and for metrics; its log lines are collected as they come.
struct Proc {
    child: tokio::process::Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    async fn start(args: &[&str]) -> Proc {
        Proc::start_under(&[], args).await
    }

    /// [`Proc::start`] under the command `wrapper` (e.g. `prlimit ...
    /// --`), if not empty.
    async fn start_under(wrapper: &[&str], args: &[&str]) -> Proc {
        let bin = env!("CARGO_BIN_EXE_zeotemp");
        let mut cmd = match wrapper.split_first() {
            None => tokio::process::Command::new(bin),
            Some((program, rest)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(rest).arg(bin);
                c
            }
        };
        let mut child = cmd
            .args([
                "--address",
                "127.0.0.1:0",
                "--metrics-address",
                "127.0.0.1:0",
            ])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (mut addr, mut metrics) = (None, None);
        tokio::time::timeout(READ_TIMEOUT, async {
            while addr.is_none() || metrics.is_none() {
                let line = lines.next_line().await.unwrap().expect("the server logs");
                // (`listening on tcp 127.0.0.1:PORT (TLS)` with TLS.)
                if let Some(a) = line.split("listening on tcp ").nth(1) {
                    addr = Some(a.split_whitespace().next().unwrap().parse().unwrap());
                }
                if let Some(a) = line.split("metrics on http://").nth(1) {
                    metrics = Some(a.trim().trim_end_matches("/metrics").parse().unwrap());
                }
                log.lock().unwrap().push(line);
            }
        })
        .await
        .expect("the server starts");
        let collected = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        Proc {
            child,
            addr: addr.unwrap(),
            metrics: metrics.unwrap(),
            log,
        }
    }

    /// The body of `GET /metrics`.
    async fn scrape(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: zeotemp\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(READ_TIMEOUT, s.read_to_end(&mut response))
            .await
            .expect("a scrape answers in time")
            .unwrap();
        let response = String::from_utf8(response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        body.to_string()
    }

    /// The value of the sample `series` (name and labels, as exported).
    async fn value(&self, series: &str) -> f64 {
        sample(&self.scrape().await, series)
    }

    /// Waits (5 s at most) until `series` is at least `min`; its value.
    async fn wait_for(&self, series: &str, min: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            let v = self.value(series).await;
            if v >= min || tokio::time::Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log lines so far that contain every one of `parts`.
    fn log_lines(&self, parts: &[&str]) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .cloned()
            .collect()
    }

    /// Waits (5 s at most) for a log line with every one of `parts`.
    async fn wait_log(&self, parts: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            if let Some(l) = self.log_lines(parts).pop() {
                return l;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {parts:?} in:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The value of the sample `series` in the exposition `text`; panics if
/// it is not there.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

fn disconnects(reason: &str) -> String {
    format!("zeotemp_disconnects_total{{reason=\"{reason}\"}}")
}

/// `series` is 0 now; after `event`, it is 1 or more.
async fn counts(p: &Proc, series: &str, event: impl std::future::Future<Output = ()>) {
    assert_eq!(p.value(series).await, 0.0, "{series} before");
    event.await;
    let after = p.wait_for(series, 1.0).await;
    assert!(after >= 1.0, "{series} after: {after}");
}

/// The value of field `key` (`key=value`) of a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len() + 2..].split(' ').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refusal_is_counted() {
    let p = Proc::start(&["--max-connections", "1"]).await;
    let series = "zeotemp_connections_refused_total{reason=\"max-connections\"}";
    assert_eq!(
        p.value("zeotemp_connections_refused_total{reason=\"accept-error\"}")
            .await,
        0.0
    );
    let mut first = Client::registered(p.addr).await;
    counts(&p, series, async {
        // Accepted by the kernel, then closed by the server unanswered.
        let mut second = TcpStream::connect(p.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(READ_TIMEOUT, second.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "the second connection gets nothing");
    })
    .await;
    first.ping_ok().await;
    p.stop().await;
}

/// 50 clients refused by max-connections: the metric counts all 50, the
/// log has a warning for the first (with the text operators grep for) and
/// not one per refusal (the rest are at debug level, rate-limited: one
/// WARN per 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_but_their_warnings_rate_limited() {
    let p = Proc::start(&["--max-connections", "1"]).await;
    let series = "zeotemp_connections_refused_total{reason=\"max-connections\"}";
    let mut first = Client::registered(p.addr).await;
    for _ in 0..50 {
        let mut refused = TcpStream::connect(p.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(READ_TIMEOUT, refused.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "a refused connection gets nothing");
    }
    assert_eq!(p.wait_for(series, 50.0).await, 50.0);
    let text = "connection refused: max-connections reached";
    p.wait_log(&["WARN", text]).await;
    let warnings = p.log_lines(&["WARN", text]);
    // One, or two if the 50 took longer than the interval (10 s).
    assert!(
        (1..=2).contains(&warnings.len()),
        "{} warnings for 50 refusals:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    // Not at debug level here: the held-back ones are not in the log.
    assert!(p.log_lines(&[text]).len() <= 2);
    first.ping_ok().await;
    p.stop().await;

    // `log-repeat-interval = 0` holds nothing back: a warning each.
    let p = Proc::start(&["--max-connections", "1", "--log-repeat-interval", "0"]).await;
    let mut first = Client::registered(p.addr).await;
    for _ in 0..5 {
        let mut refused = TcpStream::connect(p.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(READ_TIMEOUT, refused.read(&mut buf)).await;
    }
    assert_eq!(p.wait_for(series, 5.0).await, 5.0);
    p.wait_log(&["WARN", text]).await;
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    while p.log_lines(&["WARN", text]).len() < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(p.log_lines(&["WARN", text]).len(), 5);
    first.ping_ok().await;
    p.stop().await;
}

/// A connection whose task panics (a bug, injected here) is still counted
/// once, as `internal-error`, with its warning; the server goes on.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_panics_is_counted_once() {
    let p = Proc::start(&[]).await;
    let series = "zeotemp_disconnects_total{reason=\"internal-error\"}";
    assert_eq!(p.value(series).await, 0.0);
    let mut a = Client::registered(p.addr).await;
    a.send(false, "_zeotemp_fault_panic", vec![]).await;
    a.expect_closed("_zeotemp_fault_panic").await;
    assert_eq!(p.wait_for(series, 1.0).await, 1.0);
    p.wait_log(&["WARN", "disconnected: its task failed"]).await;
    let mut b = Client::registered(p.addr).await;
    b.ping_ok().await;
    drop(b);
    // The other connections' ends are counted as before, and this one once.
    assert_eq!(p.value(series).await, 1.0);
    p.stop().await;
}

/// A misconfigured client that asks for a storage this server does not
/// serve retries at once, forever: each attempt gets its error reply, the
/// log one warning per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_storage_warnings_are_rate_limited() {
    let p = Proc::start(&[]).await;
    for _ in 0..20 {
        let mut c = Client::handshaken(p.addr).await;
        let err = c
            .expect_err(
                "register",
                vec![s("nope"), Value::Bool(false)],
                "builtins.ValueError",
            )
            .await;
        assert!(err.contains("unknown storage: nope"), "{err}");
    }
    let text = "register: unknown storage";
    p.wait_log(&["WARN", text]).await;
    let warnings = p.log_lines(&["WARN", text]);
    assert!((1..=2).contains(&warnings.len()), "{warnings:?}");
    p.stop().await;
}

/// Out of file descriptors (a `LimitNOFILE=` too low for the clients):
/// accept fails, and is counted; `process_max_fds` is the limit, and
/// `process_open_fds` shows how close the server came to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_and_the_fd_limit_are_exported() {
    let limit = 40;
    let nofile = format!("--nofile={limit}:{limit}");
    let p = Proc::start_under(&["prlimit", &nofile, "--"], &[]).await;
    let text = p.scrape().await;
    assert_eq!(sample(&text, "process_max_fds"), limit as f64);
    let idle = sample(&text, "process_open_fds");
    assert!(idle < limit as f64, "{idle} open at start");
    let series = "zeotemp_connections_refused_total{reason=\"accept-error\"}";
    counts(&p, series, async {
        // More connections than descriptors: the kernel completes them
        // all (the listen backlog); the server accepts until it has none.
        let mut clients = Vec::new();
        for _ in 0..limit {
            clients.push(TcpStream::connect(p.addr).await.unwrap());
        }
        let log = ["WARN", "accept failed"];
        p.wait_log(&log).await;
        drop(clients);
    })
    .await;
    // Descriptors free again: served as before.
    let mut c = Client::registered(p.addr).await;
    c.ping_ok().await;
    let open = p.value("process_open_fds").await;
    assert!(open < limit as f64, "{open}");
    p.stop().await;
}

/// A throwaway self-signed certificate and key (the `openssl` command).
fn certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the openssl command makes the test certificate");
    assert!(ok.success());
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_failures_are_counted_by_reason() {
    let dir = std::env::temp_dir().join(format!("zeotemp-metrics-tls-{}", std::process::id()));
    let (cert, key) = certificate(&dir);
    let p = Proc::start(&[
        "--tls-certificate",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--frame-timeout",
        "1",
    ])
    .await;
    let error = "zeotemp_tls_handshake_failures_total{reason=\"error\"}";
    let timeout = "zeotemp_tls_handshake_failures_total{reason=\"timeout\"}";
    assert_eq!(p.value(&disconnects("tls-handshake")).await, 0.0);
    // Plain ZEO bytes to the TLS port: a TLS error at once.
    counts(&p, error, async {
        let mut plain = TcpStream::connect(p.addr).await.unwrap();
        plain.write_all(b"\x00\x00\x00\x02Z5").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(READ_TIMEOUT, plain.read_to_end(&mut buf)).await;
    })
    .await;
    assert_eq!(p.value(timeout).await, 0.0, "an error is not a timeout");
    // Silence: the handshake times out (after frame-timeout, and the retry
    // delay of the address that just failed).
    counts(&p, timeout, async {
        let mut silent = TcpStream::connect(p.addr).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await;
    })
    .await;
    assert!(p.value(&disconnects("tls-handshake")).await >= 2.0);
    let line = p
        .wait_log(&[
            "WARN",
            "disconnected: TLS handshake failed",
            "reason=tls-handshake",
        ])
        .await;
    assert!(line.contains(" seconds="), "{line}");
    p.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_timeout_is_counted() {
    let p = Proc::start(&["--frame-timeout", "1"]).await;
    counts(&p, &disconnects("frame-timeout"), async {
        let mut half = Client::registered(p.addr).await;
        half.write(&100u32.to_be_bytes()).await;
        half.write(&[0x80; 10]).await;
        tokio::time::timeout(Duration::from_secs(10), half.expect_closed("frame timeout"))
            .await
            .expect("closed");
    })
    .await;
    let line = p.wait_log(&["WARN", "reason=frame-timeout"]).await;
    assert!(line.contains("still incomplete"), "{line}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_timeout_is_counted() {
    let p = Proc::start(&["--transaction-timeout", "1"]).await;
    counts(&p, &disconnects("transaction-timeout"), async {
        let mut a = Client::registered(p.addr).await;
        a.hold_lock(1).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            a.expect_closed("transaction timeout"),
        )
        .await
        .expect("closed");
    })
    .await;
    // One warning for it, with the aborted transaction counted.
    let line = p
        .wait_log(&[
            "WARN",
            "reason=transaction-timeout",
            "transaction-timeout exceeded",
        ])
        .await;
    assert_eq!(field(&line, "aborts"), "1", "{line}");
    assert_eq!(p.log_lines(&["transaction-timeout"]).len(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_counted() {
    let p = Proc::start(&["--max-frame-size", "32768", "--max-outbox-bytes", "65536"]).await;
    let series = disconnects("slow-client");
    assert_eq!(p.value(&series).await, 0.0);
    let mut a = Client::registered(p.addr).await;
    let (big, _) = a.commit_new(&[7u8; 30 * 1024], 1).await;
    // Registered, asks for far more than it reads, and never reads.
    let mut sleeper = Client::connect_small_buffer(p.addr).await;
    sleeper.send_frame(b"Z5").await;
    sleeper.register().await;
    for i in 0..400 {
        let req = request(
            Value::Int(1000 + i),
            false,
            "loadBefore",
            &t(vec![big.clone(), b(&MAXTID)]),
        );
        sleeper.send_frame(&req).await;
    }
    // The others' commits push invalidations until its outbox overflows.
    let mut commits = 0;
    while p.value(&series).await < 1.0 && commits < 3000 {
        for _ in 0..50 {
            a.commit_new(b"commit", 2).await;
            commits += 1;
        }
    }
    assert!(p.value(&series).await >= 1.0, "after {commits} commits");
    p.wait_log(&["WARN", "reason=slow-client"]).await;
    // One line for it: the push's own notice is no second warning.
    assert!(
        p.log_lines(&["WARN", "invalidation not delivered"])
            .is_empty()
    );
    drop(sleeper);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_is_counted() {
    let p = Proc::start(&[]).await;
    counts(&p, &disconnects("protocol-error"), async {
        let mut c = Client::registered(p.addr).await;
        c.send_frame(b"this is not a pickle").await;
        c.expect_closed("garbage").await;
    })
    .await;
    p.wait_log(&["WARN", "reason=protocol-error", "cannot decode"])
        .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_and_transaction_size_vote_refusals_are_counted() {
    let p = Proc::start(&[
        "--memory-limit",
        "1048576",
        "--max-transaction-bytes",
        "2000000",
    ])
    .await;
    let memory = "zeotemp_votes_refused_total{storage=\"1\",reason=\"memory-limit\"}";
    let size = "zeotemp_votes_refused_total{storage=\"1\",reason=\"transaction-size\"}";
    assert_eq!(
        p.value("zeotemp_votes_refused_total{storage=\"1\",reason=\"unsupported\"}")
            .await,
        0.0
    );
    let mut c = Client::registered(p.addr).await;
    // 1.5 MB fits max-transaction-bytes, not the memory limit.
    counts(&p, memory, async {
        let o = c.new_oid().await;
        c.begin(1).await;
        c.store(&o, &b(&Z64), &vec![1u8; 1_500_000], 1).await;
        let err = c.expect_err(
            "vote",
            vec![Value::Int(1)],
            "ZODB.POSException.StorageError",
        );
        assert!(err.await.contains("memory-limit"));
    })
    .await;
    assert_eq!(p.value(size).await, 0.0, "not a size refusal");
    // 2.5 MB is over max-transaction-bytes.
    counts(&p, size, async {
        let o = c.new_oid().await;
        c.begin(2).await;
        c.store(&o, &b(&Z64), &vec![1u8; 2_500_000], 2).await;
        let err = c.expect_err(
            "vote",
            vec![Value::Int(2)],
            "ZODB.POSException.StorageError",
        );
        assert!(err.await.contains("max-transaction-bytes"));
    })
    .await;
    assert_eq!(p.value(memory).await, 1.0, "not a memory refusal");
    // Both are warnings (`journalctl -p warning` shows refusals).
    p.wait_log(&["WARN", "is full", "memory-limit"]).await;
    p.wait_log(&[
        "WARN",
        "vote of a refused transaction",
        "max-transaction-bytes",
    ])
    .await;
    // Refused again and again: each counted, the warnings rate-limited
    // (one per 10 s; two if these took longer).
    for tid in 3..8 {
        let o = c.new_oid().await;
        c.begin(tid).await;
        c.store(&o, &b(&Z64), &vec![1u8; 1_500_000], tid).await;
        let err = c.expect_err(
            "vote",
            vec![Value::Int(tid)],
            "ZODB.POSException.StorageError",
        );
        assert!(err.await.contains("memory-limit"));
    }
    assert_eq!(p.wait_for(memory, 6.0).await, 6.0);
    let full = p.log_lines(&["WARN", "is full"]);
    assert!(full.len() <= 2, "{}", full.join("\n"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_metrics_are_sane() {
    let p = Proc::start(&[]).await;
    let mut c = Client::registered(p.addr).await;
    c.ping_ok().await;
    let text = p.scrape().await;
    let open = sample(&text, "process_open_fds");
    let max = sample(&text, "process_max_fds");
    // The listeners and this client's connection at least.
    assert!(open >= 3.0 && open <= max, "open {open}, max {max}");
    assert!(sample(&text, "process_cpu_seconds_total") >= 0.0);
    assert!(sample(&text, "process_threads") >= 1.0);
    let rss = sample(&text, "process_resident_memory_bytes");
    assert!(rss > 0.0 && rss <= sample(&text, "process_virtual_memory_bytes"));
    // Started with the server (which was started just now).
    let start = sample(&text, "process_start_time_seconds");
    let server_start = sample(&text, "zeotemp_start_time_seconds");
    assert!(
        (start - server_start).abs() < 5.0,
        "process {start}, server {server_start}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 600.0,
        "{start} vs {now}"
    );
    // Each family once, with HELP and TYPE.
    for name in [
        "process_cpu_seconds_total",
        "process_open_fds",
        "zeotemp_disconnects_total",
        "zeotemp_votes_refused_total",
    ] {
        assert_eq!(
            text.matches(&format!("# TYPE {name} ")).count(),
            1,
            "{name}"
        );
        assert_eq!(
            text.matches(&format!("# HELP {name} ")).count(),
            1,
            "{name}"
        );
    }
    drop(c);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_close_is_one_info_line_with_the_connections_counts() {
    let p = Proc::start(&[]).await;
    assert_eq!(p.value(&disconnects("client")).await, 0.0);
    let mut c = Client::registered(p.addr).await;
    let (o, _) = c.commit_new(b"counted", 1).await;
    for _ in 0..3 {
        c.call("loadBefore", vec![o.clone(), b(&MAXTID)])
            .await
            .unwrap();
    }
    c.ping_ok().await;
    let peer = c_local_addr(c);
    let line = p
        .wait_log(&["disconnected: client closed the connection", &peer])
        .await;
    assert!(line.contains(" INFO "), "{line}");
    assert_eq!(field(&line, "reason"), "client");
    // register, new_oids, tpc_begin, storea, vote, tpc_finish, 3 loads, ping.
    assert_eq!(field(&line, "requests"), "10", "{line}");
    assert_eq!(field(&line, "loads"), "3", "{line}");
    assert_eq!(field(&line, "commits"), "1", "{line}");
    assert_eq!(field(&line, "aborts"), "0", "{line}");
    assert!(field(&line, "seconds").parse::<f64>().unwrap() >= 0.0);
    assert!(field(&line, "bytes_in").parse::<u64>().unwrap() > "counted".len() as u64);
    assert!(field(&line, "bytes_out").parse::<u64>().unwrap() > 0);
    assert!(p.value(&disconnects("client")).await >= 1.0);
    // A ruok probe is counted, not logged at INFO.
    let ruok = disconnects("ruok");
    counts(&p, &ruok, async {
        let mut probe = Client::connect(p.addr).await;
        probe.send_frame(b"ruok").await;
        assert!(probe.frame().await.is_some());
    })
    .await;
    assert!(p.log_lines(&["INFO", "answered ruok"]).is_empty());
    p.stop().await;
}

/// A client that goes away in the middle of a transaction: one line says
/// so, with the abort counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_during_a_transaction_is_one_line_with_the_abort() {
    let p = Proc::start(&[]).await;
    let mut c = Client::registered(p.addr).await;
    c.hold_lock(1).await;
    let peer = c_local_addr(c);
    let line = p
        .wait_log(&["disconnected: client closed the connection", &peer])
        .await;
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("(during a transaction: aborted)"), "{line}");
    assert_eq!(field(&line, "aborts"), "1", "{line}");
    assert_eq!(field(&line, "commits"), "0", "{line}");
    assert_eq!(
        p.log_lines(&["disconnect", &peer]).len(),
        1,
        "one line for its end"
    );
    // The lock was released: another client commits.
    let mut other = Client::registered(p.addr).await;
    other.commit_new(b"after", 1).await;
    p.stop().await;
}

/// The client's side of the connection (the server's `peer`), and the
/// connection closed.
fn c_local_addr(c: Client) -> String {
    let stream = c.into_stream();
    let peer = format!("peer={} ", stream.local_addr().unwrap());
    drop(stream);
    peer
}
