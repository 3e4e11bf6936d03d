//! Under systemd, stderr is journald's stream, named by `JOURNAL_STREAM`
//! (`device:inode`): then every line starts with its syslog priority, so
//! `journalctl -p warning` finds the warnings. Reproduced here with a file
//! as stderr and `JOURNAL_STREAM` naming it, as systemd would name its
//! socket; and with a `JOURNAL_STREAM` that names another file (inherited
//! by a child whose stderr was redirected), which must change nothing.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zeotemp-journald-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `device:inode` of a file, as systemd writes `JOURNAL_STREAM`.
fn stream_id(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap();
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Runs the binary with `args`, stderr into `log` (truncated: the inode
/// stays), `JOURNAL_STREAM` set to `journal_stream`.
fn zeotemp(args: &[&str], log: &Path, journal_stream: &str) -> std::process::Child {
    let err = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_zeotemp"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", journal_stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("the binary runs")
}

/// Waits until the log holds a line containing `needle`; returns the log.
fn wait_for(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.contains(needle)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a server, makes it log an INFO and a WARN line (a client that
/// sends an HTTP request instead of ZEO), stops it; returns its log.
fn serve_and_provoke(dir: &Path, journal_stream: impl Fn(&Path) -> String) -> String {
    let log = dir.join("stderr");
    // Create the file first: its inode is what JOURNAL_STREAM names.
    std::fs::File::create(&log).unwrap();
    let stream = journal_stream(&log);
    let mut child = zeotemp(&["--address", "127.0.0.1:0"], &log, &stream);
    let text = wait_for(&log, "listening on tcp");
    let port = text
        .lines()
        .find_map(|l| l.split("listening on tcp 127.0.0.1:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the port in the listening line")
        .to_string();
    let mut c = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_for(&log, "disconnected: ");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn under_journald_each_line_starts_with_its_priority() {
    let dir = scratch("match");
    let text = serve_and_provoke(&dir, stream_id);
    let info = text
        .lines()
        .find(|l| l.contains("listening on tcp"))
        .unwrap();
    assert!(info.starts_with("<6>"), "{text}");
    let warn = text.lines().find(|l| l.contains("disconnected: ")).unwrap();
    assert!(warn.starts_with("<4>"), "{text}");
    for line in text.lines() {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| line.starts_with(p)),
            "a line without a priority: {line:?}\n{text}"
        );
        // journald stamps lines itself: no second timestamp.
        assert!(!line[3..].starts_with("20"), "a timestamp: {line:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn journal_stream_naming_another_file_changes_nothing() {
    let dir = scratch("other");
    let other = dir.join("other");
    std::fs::File::create(&other).unwrap();
    let text = serve_and_provoke(&dir, |_| stream_id(&other));
    for line in text.lines() {
        assert!(!line.starts_with('<'), "a priority prefix: {line:?}");
    }
    let info = text
        .lines()
        .find(|l| l.contains("listening on tcp"))
        .unwrap();
    assert!(info.starts_with("20"), "a timestamp first: {info:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn configuration_errors_are_priority_err_under_journald() {
    let dir = scratch("config");
    let log = dir.join("stderr");
    std::fs::File::create(&log).unwrap();
    let stream = stream_id(&log);
    let status = zeotemp(
        &[
            "--check-config",
            "--max-connections",
            "0",
            "--log-level",
            "loud",
        ],
        &log,
        &stream,
    )
    .wait()
    .unwrap();
    assert_eq!(status.code(), Some(2));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.starts_with("<3>zeotemp: "), "{line:?}\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
