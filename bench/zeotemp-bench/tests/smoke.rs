//! Smoke test of the load generator: each workload for about a second
//! against the real server on 127.0.0.1:0, in this process. No timing is
//! asserted.

// The server's own test helpers (the in-process `Server`), shared rather
// than copied.
#[path = "../../../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use common::Server;
use zeotemp::config::Config;
use zeotemp_bench::{self as bench, Options, Workload};

const KEYS: [&str; 25] = [
    "workload",
    "connections",
    "in_flight",
    "duration_s",
    "ops",
    "ops_per_s",
    "txns",
    "p50_us",
    "p99_us",
    "p999_us",
    "errors",
    "conflicts_retried",
    "txn_p50_us",
    "txn_p99_us",
    "commits",
    "invalidations",
    "invalidated_loads",
    "random_loads",
    "server_cpu_s",
    "server_user_s",
    "server_sys_s",
    "server_cpu_us_per_op",
    "server_user_us_per_op",
    "server_sys_us_per_op",
    "server_peak_rss_kib",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_and_reports() {
    let srv = Server::start(Config {
        addresses: vec![],
        ..Config::default()
    })
    .await;
    let addr = srv.addr;
    for workload in [
        Workload::Echo,
        Workload::Load,
        Workload::Commit,
        Workload::Session,
        Workload::Zope,
    ] {
        let opts = Options {
            address: addr.to_string(),
            storage: "1".into(),
            workload,
            connections: 2,
            in_flight: 4,
            duration: Duration::from_secs(1),
            objects: 2000,
            object_size: 200,
            // The server runs in this process.
            server_pid: Some(std::process::id()),
            start_file: None,
        };
        let r = tokio::time::timeout(Duration::from_secs(60), bench::run(&opts))
            .await
            .expect("bench finished")
            .unwrap_or_else(|e| panic!("{workload:?}: {e}"));
        assert!(r.ops > 0, "{workload:?} did operations: {r:?}");
        assert_eq!(r.errors, 0, "{workload:?} without errors: {r:?}");
        if !matches!(workload, Workload::Session | Workload::Zope) {
            assert_eq!(r.conflicts_retried, 0, "{r:?}");
        }
        if matches!(
            workload,
            Workload::Commit | Workload::Session | Workload::Zope
        ) {
            assert!(r.txns > 0, "{workload:?} did transactions: {r:?}");
            assert!(r.commits > 0, "{workload:?} committed: {r:?}");
            assert!(r.server_cpu_us_per_txn.is_some(), "{r:?}");
        }
        if workload == Workload::Zope {
            // Two connections: each one's commits invalidate its session
            // object in the other, which loads it in its next transaction.
            assert!(r.invalidations > 0, "{r:?}");
            assert!(r.invalidated_loads > 0, "{r:?}");
            assert_eq!(r.in_flight, 1, "one request at a time: {r:?}");
            assert!(r.txn_p50_us > 0.0 && r.txn_p50_us <= r.txn_p99_us, "{r:?}");
        } else {
            assert_eq!((r.invalidated_loads, r.random_loads), (0, 0), "{r:?}");
        }
        let (user, sys) = (r.server_user_s.unwrap(), r.server_sys_s.unwrap());
        assert!((user + sys - r.server_cpu_s.unwrap()).abs() < 1e-9, "{r:?}");
        assert!(r.server_cpu_us_per_op.is_some(), "{r:?}");
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.p999_us, "{r:?}");
        assert!(r.server_cpu_s.is_some() && r.server_peak_rss_kib.unwrap() > 0);

        let json = serde_json::to_string(&r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let obj = v.as_object().expect("one JSON object");
        for k in KEYS {
            assert!(obj.contains_key(k), "{k} in {json}");
        }
        assert_eq!(v["workload"], workload.name());
        assert!(!r.render().is_empty());
    }
    srv.stop().await;
}

/// The binary's command line and `--json` output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_json() {
    let srv = Server::start(Config {
        addresses: vec![],
        ..Config::default()
    })
    .await;
    let addr = srv.addr;
    let start_file =
        std::env::temp_dir().join(format!("zeotemp-bench-start-{}", std::process::id()));
    let _ = std::fs::remove_file(&start_file);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_zeotemp-bench"))
        .args(["--address", &addr.to_string(), "--workload", "echo"])
        .args([
            "--connections",
            "2",
            "--in-flight",
            "2",
            "--duration",
            "0.5",
        ])
        .args(["--server-pid", &std::process::id().to_string(), "--json"])
        .arg("--start-file")
        .arg(&start_file)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in KEYS {
        assert!(v.get(k).is_some(), "{k} in {v}");
    }
    assert!(v["ops"].as_u64().unwrap() > 0);
    assert_eq!(v["errors"], 0);
    assert!(start_file.exists(), "--start-file created");
    let _ = std::fs::remove_file(&start_file);
    srv.stop().await;
}

/// stdout of `zeotemp-bench args`, which must succeed (without `COLUMNS`,
/// so clap wraps `--help` at 100 columns).
fn run_binary(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_zeotemp-bench"))
        .args(args)
        .env_remove("COLUMNS")
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// As the server's tests/cli.rs checks for `zeotemp`: `--version` names
/// the binary, `--help` is wrapped.
#[test]
fn binary_names_itself_and_wraps_help() {
    assert_eq!(
        run_binary(&["--version"]).trim(),
        format!("zeotemp-bench {}", env!("CARGO_PKG_VERSION"))
    );
    let help = run_binary(&["--help"]);
    assert!(help.contains("Usage:"), "{help}");
    let widest = help.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    assert!(widest <= 100, "--help has a line of {widest} columns");
}
