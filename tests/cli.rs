//! The server's command line, as an operator sees it: it names itself in
//! `--version`, `--help` is wrapped (to the terminal, or to 100 columns
//! when its output is not a terminal, as here), and the manual page in
//! `docs/` is the one the server generates from its options.

use std::process::Command;

/// stdout of `binary args`, which must succeed.
fn run(binary: &str, args: &[&str]) -> String {
    let out = Command::new(binary)
        .args(args)
        .env_remove("COLUMNS")
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{binary} {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The load generator's are checked by its own crate
/// (bench/zeotemp-bench/tests/smoke.rs).
const BINARIES: [(&str, &str); 1] = [("zeotemp", env!("CARGO_BIN_EXE_zeotemp"))];

#[test]
fn version_names_each_binary() {
    for (name, binary) in BINARIES {
        assert_eq!(
            run(binary, &["--version"]).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn help_is_wrapped() {
    for (name, binary) in BINARIES {
        let help = run(binary, &["--help"]);
        assert!(help.contains("Usage:"), "{name}: {help}");
        let widest = help.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(
            widest <= 100,
            "{name} --help has a line of {widest} columns"
        );
    }
}

/// `docs/zeotemp.1` is what `zeotemp --man-page` prints: regenerate it
/// (`cargo run -- --man-page > docs/zeotemp.1`) when an option changes.
#[test]
fn man_page_in_docs_is_current() {
    let generated = run(env!("CARGO_BIN_EXE_zeotemp"), &["--man-page"]);
    assert!(generated.contains(".TH zeotemp 1") && generated.contains("history\\-retention"));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/zeotemp.1");
    let committed = std::fs::read_to_string(&path).expect("docs/zeotemp.1");
    assert!(
        committed == generated,
        "docs/zeotemp.1 is stale: cargo run -- --man-page > docs/zeotemp.1"
    );
}

/// A watchdog, not a timing assertion: a server that should have refused
/// to start but runs is killed after this many seconds and the test fails.
const REFUSAL_WATCHDOG_SECS: u64 = 60;

/// Exit status and stderr of the server started with `args` (and
/// `RUST_LOG` set to `rust_log`, or unset), which must exit by itself:
/// one that still runs after [`REFUSAL_WATCHDOG_SECS`] is killed and fails
/// the test.
fn exit_of(args: &[&str], rust_log: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zeotemp"));
    cmd.args([
        "--address",
        "127.0.0.1:0",
        "--metrics-address",
        "127.0.0.1:0",
    ])
    .args(args)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    match rust_log {
        Some(v) => cmd.env("RUST_LOG", v),
        None => cmd.env_remove("RUST_LOG"),
    };
    let mut child = cmd.spawn().expect("the binary runs");
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(REFUSAL_WATCHDOG_SECS);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "zeotemp {args:?} (RUST_LOG {rust_log:?}) started instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8(out.stderr).expect("UTF-8"),
    )
}

/// A mistyped log level or filter, on the command line, in the config file
/// or in RUST_LOG, is a configuration error (exit 2, one line naming the
/// setting and the value), at a start and with --check-config alike:
/// never a server that runs and logs nothing.
#[test]
fn invalid_log_filter_is_a_configuration_error() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-log-filter");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("loud.toml");
    std::fs::write(&file, "log-level = \"loud\"\n").unwrap();
    let file = file.to_str().unwrap();
    let cases: [(&[&str], Option<&str>, &str); 4] = [
        (&["--log-level", "loud"], None, "log-level \"loud\""),
        (&["--config", file], None, "log-level \"loud\""),
        (
            &["--log-level", "zeotemp=loud"],
            None,
            "log-level \"zeotemp=loud\"",
        ),
        (&[], Some("garbage!!"), "RUST_LOG \"garbage!!\""),
    ];
    for (args, rust_log, complaint) in cases {
        for check in [false, true] {
            let mut args = args.to_vec();
            if check {
                args.push("--check-config");
            }
            let (status, stderr) = exit_of(&args, rust_log);
            assert_eq!(status, Some(2), "{args:?} {rust_log:?}: {stderr}");
            assert!(
                stderr.contains(complaint) && stderr.trim().lines().count() == 1,
                "{args:?} {rust_log:?}: {stderr}"
            );
        }
    }
    // A valid filter in RUST_LOG is still taken, and --log-level wins over
    // a bad one.
    for (args, rust_log) in [
        (&["--check-config"][..], Some("warn,zeotemp=debug")),
        (
            &["--check-config", "--log-level", "info"][..],
            Some("garbage!!"),
        ),
    ] {
        let (status, stderr) = exit_of(args, rust_log);
        assert_eq!(status, Some(0), "{args:?} {rust_log:?}: {stderr}");
    }
    // A bad filter is reported with the other problems, not instead of
    // them (nor they instead of it).
    for check in [false, true] {
        let mut args = vec!["--max-connections", "0", "--log-level", "loud"];
        if check {
            args.push("--check-config");
        }
        let (status, stderr) = exit_of(&args, None);
        assert_eq!(status, Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 2, "{args:?}: {stderr}");
        assert!(lines[0].contains("max-connections = 0"), "{stderr}");
        assert!(lines[1].contains("log-level \"loud\""), "{stderr}");
    }
}

/// Kills the process `.0` (SIGKILL) when dropped: a server a test started
/// never outlives it, whatever happened.
struct Reap(u32);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `kill -SIGNAL pid` (the `kill` command: no libc in the dependencies).
fn send(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// SIGHUP never stops the server: it logs a line and goes on serving (a
/// new connection still gets the `Z5` handshake); SIGTERM then stops it
/// cleanly (exit status 0, the last summary line).
#[test]
fn sighup_is_logged_and_ignored() {
    use std::io::{BufRead, Read};
    let mut child = Command::new(env!("CARGO_BIN_EXE_zeotemp"))
        .args([
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
        ])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let pid = child.id();
    // Killed when the test ends, whatever happened.
    let _reap = Reap(pid);
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    // The log up to the first line containing `needle`; the server's end
    // of the log (it died) fails the test with what it logged.
    let mut wait_for = |needle: &str| -> String {
        for line in log.by_ref() {
            let line = line.expect("log line");
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the server's log ended without {needle:?}:\n{seen}");
    };
    let listening = wait_for("listening on tcp ");
    let address = listening
        .rsplit("listening on tcp ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    for _ in 0..3 {
        send("HUP", pid);
        wait_for("SIGHUP received: ignored");
    }
    // Still serving: a new connection gets the handshake frame.
    let mut conn = std::net::TcpStream::connect(&address).expect("connect after SIGHUP");
    let mut frame = [0u8; 6];
    conn.read_exact(&mut frame).expect("handshake");
    assert_eq!(&frame, b"\0\0\0\x02Z5");
    drop(conn);
    send("TERM", pid);
    wait_for("SIGTERM received");
    wait_for("zeotemp stopped after");
    let status = child.wait().expect("wait");
    assert!(status.success(), "after SIGTERM: {status:?}");
}

/// `zeotemp --check-config args`: its exit status, stdout and stderr.
fn check_config(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zeotemp"))
        .arg("--check-config")
        .args(args)
        .output()
        .expect("the binary runs");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8");
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// Every value that would stop a start or leave the server useless is
/// refused with exit status 2 and one line per problem, all of them at
/// once, each naming the setting and the value.
#[test]
fn check_config_refuses_useless_values_one_line_each() {
    let (code, stdout, stderr) = check_config(&[
        "--address",
        "127.0.0.1:99999",
        "--address",
        "127.0.0.1:0",
        "--address",
        "localhost:8101",
        "--address",
        "LOCALHOST:8101",
        "--metrics-address",
        "localhost:8101",
        "--storage",
        " ",
        "--max-connections",
        "0",
        "--max-transaction-bytes",
        "0",
        "--memory-limit",
        "1",
        "--threads",
        "100000",
        "--gc-hold-budget",
        "0",
    ]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(!stdout.contains("configuration OK"), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    for expected in [
        "zeotemp: address \"127.0.0.1:99999\" is not HOST:PORT",
        "zeotemp: address \"LOCALHOST:8101\" is given twice",
        "zeotemp: metrics-address \"localhost:8101\" is also the ZEO address",
        "zeotemp: storage \" \" is an empty name",
        "zeotemp: max-connections = 0 ",
        "zeotemp: max-transaction-bytes = 0 ",
        "zeotemp: memory-limit = 1 ",
        "zeotemp: threads = 100000 ",
        "zeotemp: gc-hold-budget = 0 ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "{expected:?} not in:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), 9, "{stderr}");
}

/// A fresh directory of this test's own under the target directory.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// `--check-config` binds and releases every listener: a port in use (by
/// this test, or by another of its addresses, or the metrics address's),
/// a unix socket in a missing directory, a socket a server listens on and
/// a path that is no socket are each one line and exit status 2; a free
/// socket path is left as it was found, and an existing file is never
/// removed.
#[test]
fn check_config_binds_every_listener() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("address").port();
    let dir = scratch_dir("check_config_binds_every_listener");
    let live = dir.join("live.sock");
    let _server = std::os::unix::net::UnixListener::bind(&live).expect("bind live.sock");
    let plain = dir.join("plain");
    std::fs::write(&plain, "not a socket").expect("write");
    let free = dir.join("free.sock");
    let busy_address = format!("127.0.0.1:{port}");
    let missing = dir.join("missing/x.sock");
    let (code, stdout, stderr) = check_config(&[
        "--address",
        &busy_address,
        "--address",
        missing.to_str().unwrap(),
        "--address",
        live.to_str().unwrap(),
        "--address",
        plain.to_str().unwrap(),
        "--address",
        free.to_str().unwrap(),
        "--metrics-address",
        &format!("localhost:{port}"),
    ]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let expected = [
        format!("zeotemp: address \"{busy_address}\": cannot listen on {busy_address}: "),
        format!(
            "zeotemp: address \"{}\": directory {} does not exist",
            missing.display(),
            dir.join("missing").display()
        ),
        format!(
            "zeotemp: address \"{}\": a server is listening on this socket already",
            live.display()
        ),
        format!(
            "zeotemp: address \"{}\": exists and is not a socket",
            plain.display()
        ),
        format!("zeotemp: metrics-address \"localhost:{port}\": cannot listen for metrics on "),
    ];
    for e in &expected {
        assert!(
            lines.iter().any(|l| l.starts_with(e.as_str())),
            "{e:?} not in:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    assert!(
        live.exists() && plain.exists(),
        "an existing file was removed"
    );
    assert!(!free.exists(), "the probe left {} behind", free.display());

    // Free listeners pass; nothing is left behind. A port freed here may be
    // taken by another test's connection before the probe binds it: then
    // the probe rightly refuses it, and another free port is tried.
    drop(busy);
    let mut tries = 0;
    let (code, stdout, stderr) = loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let (code, stdout, stderr) = check_config(&[
            "--address",
            &format!("127.0.0.1:{port}"),
            "--address",
            free.to_str().unwrap(),
            "--unix-socket-mode",
            "0660",
        ]);
        tries += 1;
        if code == Some(0) || tries == 5 || !stderr.contains("cannot listen on 127.0.0.1:") {
            break (code, stdout, stderr);
        }
    };
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(!free.exists(), "the probe left {} behind", free.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TOML syntax or type error in the config file is one line naming the
/// file, the line, the setting and what was expected; exit status 2.
#[test]
fn check_config_toml_error_is_one_line() {
    let dir = scratch_dir("check_config_toml_error_is_one_line");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "threads = 2\nmax-connections = \"x\"\n").expect("write");
    let (code, stdout, stderr) = check_config(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert_eq!(
        stderr,
        format!(
            "zeotemp: config file {}, line 2, max-connections: invalid type: string \"x\", \
             expected usize\n",
            file.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Before a restart the server still runs: `--check-config` on its own
/// addresses (TCP, unix socket, metrics) finds a ZEO server's handshake
/// and a zeotemp metrics page there, prints a note for each after
/// "configuration OK" and exits 0, and leaves the running server's socket
/// file alone. A port held by something that is not ZEO stays a problem.
#[test]
fn check_config_before_a_restart_notes_the_running_server() {
    use std::io::BufRead;
    let dir = scratch_dir("check_config_before_a_restart");
    let socket = dir.join("zeo.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zeotemp"))
        .args(["--address", "127.0.0.1:0", "--address"])
        .arg(&socket)
        .args(["--metrics-address", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // Killed when the test ends, whatever happened.
    let _reap = Reap(child.id());
    let (mut tcp, mut metrics, mut unix) = (None, None, false);
    let mut seen = String::new();
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    for line in log.by_ref() {
        let line = line.expect("log line");
        seen.push_str(&line);
        seen.push('\n');
        let word_after = |marker: &str| {
            line.split(marker)
                .nth(1)
                .and_then(|rest| rest.split(['/', ' ']).next())
                .map(str::to_string)
        };
        tcp = tcp.or_else(|| word_after("listening on tcp "));
        metrics = metrics.or_else(|| word_after("metrics on http://"));
        unix |= line.contains("listening on unix ");
        if tcp.is_some() && metrics.is_some() && unix {
            break;
        }
    }
    let (Some(tcp), Some(metrics), true) = (tcp, metrics, unix) else {
        panic!("the server's log ended before it listened:\n{seen}");
    };
    let (code, stdout, stderr) = check_config(&[
        "--address",
        &tcp,
        "--address",
        socket.to_str().unwrap(),
        "--metrics-address",
        &metrics,
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("configuration OK"), "{stdout}");
    let expected = [
        format!(
            "note: address \"{tcp}\" is in use by a running ZEO server (Z5): a restart of that \
             server takes it over; a second server would not start"
        ),
        format!(
            "note: address \"{}\" is in use by a running ZEO server (Z5): ",
            socket.display()
        ),
        format!("note: metrics-address \"{metrics}\" is in use by a running zeotemp's metrics "),
    ];
    for (line, e) in lines[1..].iter().zip(&expected) {
        assert!(line.starts_with(e.as_str()), "{e:?} is not {line:?}");
    }
    assert_eq!(lines.len(), 1 + expected.len(), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(socket.exists(), "the running server's socket was removed");

    // Something that is not ZEO on the port: a problem, as ever.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_address = busy.local_addr().expect("address").to_string();
    let (code, stdout, stderr) = check_config(&["--address", &busy_address]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "zeotemp: address \"{busy_address}\": cannot listen on {busy_address}: "
        )),
        "{stderr}"
    );
    assert!(!stdout.contains("note:"), "{stdout}");
    drop(busy);
    send("TERM", child.id());
    // Read to its end: the server logs until it stops.
    log.for_each(drop);
    assert!(child.wait().expect("wait").success());
    let _ = std::fs::remove_dir_all(&dir);
}
