//! `zeotemp-counted` serves as `zeotemp` does and exports the counting
//! allocator's figures on its metrics endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

/// The value of the sample `name` in a Prometheus text.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_export_the_allocation_counts() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zeotemp-counted"))
        .args([
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("zeotemp-counted starts");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    // "metrics on http://HOST:PORT/metrics"
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            let (_, rest) = l.split_once("metrics on http://")?;
            Some(rest.split_once('/')?.0.to_string())
        })
        .expect("the metrics address is logged");
    let scrape = || {
        let mut s = TcpStream::connect(&addr).expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let first = scrape();
    let second = scrape();
    let _ = child.kill();
    let _ = child.wait();
    for name in [
        "zeotemp_allocations_total",
        "zeotemp_reallocations_total",
        "zeotemp_allocated_bytes_total",
    ] {
        assert!(
            first.contains(&format!("# TYPE {name} counter")),
            "{name} in {first}"
        );
    }
    let (a1, a2) = (
        sample(&first, "zeotemp_allocations_total").unwrap(),
        sample(&second, "zeotemp_allocations_total").unwrap(),
    );
    // Starting the server allocates; serving a scrape allocates more.
    assert!(a1 > 0 && a2 > a1, "{a1} then {a2}");
    assert!(sample(&first, "zeotemp_allocated_bytes_total").unwrap() > 0);
}
