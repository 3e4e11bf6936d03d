//! The two recipes of `config/zeotemp.service`, reproduced as systemd runs
//! them, with `setpriv` (util-linux): the server as an unprivileged user
//! (`nobody`, standing for the user `DynamicUser=` makes up), with no
//! capabilities, in the groups the recipe gives it.
//!
//! - The unix socket recipe (`SupplementaryGroups=zope` and
//!   `unix-socket-group = "zope"`): a throwaway group stands for `zope`.
//!   The server in it gives its socket that group and mode 0660; a client
//!   of another user in the group connects and gets the ZEO handshake, one
//!   outside it gets EACCES. Without the group the server does not start
//!   (exit status 2, one line), and `--check-config` says the same,
//!   leaving no socket behind.
//! - The TLS recipe (`LoadCredential=`): a key only root may read stops the
//!   server with "permission denied" (exit status 2); the same files copied
//!   as `LoadCredential=` does (into a directory of the service user's,
//!   read-only, named by `$CREDENTIALS_DIRECTORY`) serve TLS: a client
//!   that trusts the CA completes the handshake and gets the ZEO one.
//!
//! - A live socket the service user may not connect to (EACCES: owned by
//!   root, mode 0700, in a directory the user may write): `--check-config`
//!   says "permission denied" for it and a start refuses it (exit status
//!   non-zero); neither removes the socket file.
//!
//! The system-call filter is not reproduced here: `tests/unit_file.rs`
//! checks that, as systemd resolves it, it allows the socket recipe's
//! chown. The tests need root (to switch users, make a group, own files)
//! and `setpriv`; elsewhere they are skipped, saying why.

use std::io::{BufRead, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A watchdog, not a timing assertion: a server that neither logs the
/// awaited line nor exits within this is killed and the test fails.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Why these tests cannot run here, if they cannot (`tools` must be
/// installed too).
fn cannot_run(tools: &[&str]) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    if uid != Some("0") {
        return Some("not root (setpriv needs it to run the server as another user)".into());
    }
    for tool in std::iter::once(&"setpriv").chain(tools) {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

macro_rules! skip_unless_possible {
    ($($tool:expr),*) => {
        if let Some(why) = cannot_run(&[$($tool),*]) {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// The uid and primary gid `/etc/passwd` gives `user`.
fn passwd(user: &str) -> (u32, u32) {
    let text = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == user).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        })
        .unwrap_or_else(|| panic!("no user {user} in /etc/passwd"))
}

/// A uid no account has: the client "of another user".
fn unused_uid() -> u32 {
    let text = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let used: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (50_000..60_000)
        .rev()
        .find(|uid| !used.contains(uid))
        .expect("a free uid")
}

/// A group made for one test (`groupadd`), removed when dropped, also when
/// the test fails.
struct TempGroup {
    name: String,
    gid: u32,
}

impl TempGroup {
    fn new(name: &str) -> TempGroup {
        let _ = Command::new("groupdel")
            .arg(name)
            .stderr(Stdio::null())
            .status();
        let status = Command::new("groupadd")
            .arg(name)
            .status()
            .expect("groupadd");
        assert!(status.success(), "groupadd {name}");
        let text = std::fs::read_to_string("/etc/group").unwrap();
        let gid = text
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f[0] == name).then(|| f[2].parse().unwrap())
            })
            .expect("the new group in /etc/group");
        TempGroup {
            name: name.into(),
            gid,
        }
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

/// A fresh directory of this test's own under the target directory, with
/// `owner` and `mode`; every directory above it can be traversed by others
/// (the test runs as root; the server does not).
fn scratch(name: &str, owner: u32, mode: u32) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("systemd_recipes-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(owner), None).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    let mut above = dir.parent();
    while let Some(d) = above {
        let m = std::fs::metadata(d).unwrap().permissions().mode();
        assert!(
            m & 0o001 != 0,
            "{} (mode {m:o}) is closed to others",
            d.display()
        );
        above = d.parent();
    }
    dir
}

/// `program` run as `uid`/`gid` with exactly the supplementary groups
/// `groups` and no capabilities, as systemd starts a service with
/// `DynamicUser=` and `SupplementaryGroups=`.
fn as_user(uid: u32, gid: u32, groups: &[u32], program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(program)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// The server run as `uid`/`gid` in `groups` with `args`, which must exit
/// by itself: its exit status and output (stdout, then stderr).
fn exit_of(uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = as_user(uid, gid, groups, env!("CARGO_BIN_EXE_zeotemp"));
    cmd.args(args);
    exit_status_and_output(cmd)
}

/// What `cmd` (the server) does, which must exit by itself: its exit
/// status and output (stdout, then stderr). One that still runs after
/// [`WATCHDOG`] is killed and fails the test.
fn exit_status_and_output(mut cmd: Command) -> (Option<i32>, String) {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command runs");
    let deadline = std::time::Instant::now() + WATCHDOG;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "zeotemp {args:?} runs instead of exiting: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text.into_owned())
}

/// A server started by a test: its log lines come through a channel, and
/// it is killed when dropped (if [`Running::stop`] did not stop it).
struct Running {
    child: std::process::Child,
    log: mpsc::Receiver<String>,
    seen: String,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("setpriv runs");
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            log,
            seen: String::new(),
        }
    }

    /// The first log line from now on that contains `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.log.recv_timeout(WATCHDOG) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no {needle:?} in the log ({e}):\n{}", self.seen),
            }
        }
    }

    /// SIGTERM; the server must stop cleanly.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        self.wait_for("zeotemp stopped after");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "after SIGTERM: {status:?}\n{}", self.seen);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to the unix socket given as its argument and prints the
/// protocol of the server's first frame (`Z5`), or the errno's name if
/// the connection is refused.
const UNIX_CLIENT: &str = r#"
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(errno.errorcode[e.errno])
    sys.exit(0)
data = b""
while len(data) < 6:
    chunk = s.recv(6 - len(data))
    if not chunk:
        break
    data += chunk
print(data[4:].decode() if data[:4] == b"\0\0\0\x02" else repr(data))
"#;

/// A Python 3 that any user may run (the one on root's PATH may live in
/// root's home).
fn system_python() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o001 != 0)
        })
}

/// What [`UNIX_CLIENT`] prints when run as `uid` with the supplementary
/// groups `groups`.
fn unix_client(uid: u32, groups: &[u32], socket: &Path) -> String {
    let python = system_python().expect("checked by the test");
    let out = as_user(uid, uid, groups, python)
        .args(["-c", UNIX_CLIENT])
        .arg(socket)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The unix socket recipe: with the server in the group, the socket gets
/// the group and mode 0660, members of the group connect and others get
/// EACCES; without it, the server refuses to start (exit status 2) with
/// one line naming the setting, the value and why, and so does
/// `--check-config`, neither leaving a socket behind.
#[test]
fn unix_socket_group_recipe() {
    skip_unless_possible!("groupadd", "groupdel");
    if system_python().is_none() {
        eprintln!("skipped: no python3 that another user may run (for the client)");
        return;
    }
    let (nobody, nogroup) = passwd("nobody");
    let zope = TempGroup::new(&format!("zt-recipe-{}", std::process::id()));
    // /run/zeotemp: RuntimeDirectory=, the service user's, mode 0755.
    let run_dir = scratch("socket", nobody, 0o755);
    let socket = run_dir.join("zeotemp.sock");
    let args = [
        "--address",
        socket.to_str().unwrap(),
        "--unix-socket-group",
        &zope.name,
    ];
    let check = [&args[..], &["--check-config"]].concat();

    // Not in the group (the recipe's SupplementaryGroups= forgotten).
    for args in [&check[..], &args[..]] {
        let (code, out) = exit_of(nobody, nogroup, &[], args);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("unix-socket-group"))
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        let expected = format!(
            "unix-socket-group \"{}\": cannot give {} to {} (gid {}): ",
            zope.name,
            socket.display(),
            zope.name,
            zope.gid
        );
        assert!(lines[0].contains(&expected), "{expected:?} not in {out}");
        assert!(
            lines[0].contains(&format!(
                "is not a member of gid {}; make it one (systemd: SupplementaryGroups={})",
                zope.gid, zope.name
            )),
            "{out}"
        );
        assert!(!socket.exists(), "{args:?} left the socket behind");
    }

    // In the group: --check-config passes and leaves nothing behind.
    let (code, out) = exit_of(nobody, nogroup, &[zope.gid], &check);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(!socket.exists(), "--check-config left the socket behind");

    let mut cmd = as_user(nobody, nogroup, &[zope.gid], env!("CARGO_BIN_EXE_zeotemp"));
    cmd.args(args);
    let mut server = Running::start(cmd);
    let line = server.wait_for("listening on unix ");
    assert!(
        line.contains(&format!(
            "listening on unix {} (mode 660, owner uid {nobody}, group {} (gid {}))",
            socket.display(),
            zope.name,
            zope.gid
        )),
        "{line}"
    );
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (nobody, zope.gid, 0o660)
    );
    // Zope's user: another uid, in the group.
    let other = unused_uid();
    assert_eq!(unix_client(other, &[zope.gid], &socket), "Z5");
    // Anyone else.
    assert_eq!(unix_client(other, &[], &socket), "EACCES");
    server.stop();
    assert!(!socket.exists(), "the socket outlived the server");
}

/// Makes a CA and a server certificate for `localhost` signed by it, with
/// `openssl`, in `dir`: `ca.crt`, `tls.crt`, `tls.key`.
fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("openssl.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n\
         [ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign\n\
         [server]\nbasicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n\
         subjectAltName = DNS:localhost\n",
    )
    .unwrap();
    let newkey = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(
        &[
            &["req", "-x509", "-new"][..],
            &newkey,
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2"],
            &[
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
                "-subj",
                "/CN=zeotemp test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-new"][..],
            &newkey,
            &[
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
                "-config",
                "openssl.cnf",
            ],
            &["-subj", "/CN=localhost"],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "2",
        "-days",
        "2",
        "-extfile",
        "openssl.cnf",
        "-extensions",
        "server",
        "-out",
        "tls.crt",
    ]);
}

/// A TLS handshake with the server at `address` as a client trusting
/// `ca`, then the server's first frame: its ZEO protocol (`Z5`).
fn tls_protocol(address: &str, ca: &Path) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca.crt") {
        roots.add(cert.expect("a certificate")).expect("a CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let sock = std::net::TcpStream::connect(address).expect("connect");
    sock.set_read_timeout(Some(WATCHDOG)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut frame = [0u8; 6];
    tls.read_exact(&mut frame)
        .expect("TLS handshake, then a frame");
    assert_eq!(&frame[..4], b"\0\0\0\x02", "{frame:?}");
    String::from_utf8_lossy(&frame[4..]).into_owned()
}

/// The TLS recipe: a key only root may read stops the server (exit status
/// 2, one line: the setting, the file, "permission denied"), at a start
/// and in `--check-config`; the files handed over as `LoadCredential=`
/// does serve TLS.
#[test]
fn tls_credentials_recipe() {
    skip_unless_possible!("openssl");
    let (nobody, nogroup) = passwd("nobody");
    // /etc/zeotemp: root's; the key 0600, as a private key is kept.
    let etc = scratch("tls-etc", 0, 0o755);
    make_certificates(&etc);
    let (cert, key) = (etc.join("tls.crt"), etc.join("tls.key"));
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&key, Some(0), Some(0)).unwrap();

    let args = [
        "--address",
        "127.0.0.1:0",
        "--tls-certificate",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let check = [&args[..], &["--check-config"]].concat();
    for args in [&args[..], &check[..]] {
        let (code, out) = exit_of(nobody, nogroup, &[], args);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        let expected = format!(
            "zeotemp: tls-key {}: permission denied: zeotemp runs as uid {nobody} (gid \
             {nogroup}), which may not read it (under systemd, hand it over with \
             LoadCredential=tls.key:{} and --tls-key %d/tls.key; ",
            key.display(),
            key.display()
        );
        assert!(out.starts_with(&expected), "{expected:?} not in:\n{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
    }

    // LoadCredential=tls.crt:... and tls.key:...: copies that the service
    // user alone may read, in $CREDENTIALS_DIRECTORY (%d).
    let credentials = scratch("tls-credentials", 0, 0o755);
    for (name, from) in [("tls.crt", &cert), ("tls.key", &key)] {
        let to = credentials.join(name);
        std::fs::copy(from, &to).unwrap();
        std::os::unix::fs::chown(&to, Some(nobody), Some(nogroup)).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    std::os::unix::fs::chown(&credentials, Some(nobody), Some(nogroup)).unwrap();
    std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o500)).unwrap();
    // As systemd expands %d/tls.crt and %d/tls.key.
    let (cert, key) = (credentials.join("tls.crt"), credentials.join("tls.key"));
    let mut cmd = as_user(nobody, nogroup, &[], env!("CARGO_BIN_EXE_zeotemp"));
    cmd.env("CREDENTIALS_DIRECTORY", &credentials).args([
        "--address",
        "127.0.0.1:0",
        "--tls-certificate",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let mut server = Running::start(cmd);
    let line = server.wait_for("listening on tcp ");
    assert!(line.ends_with(" (TLS)"), "{line}");
    let address = line
        .rsplit("listening on tcp ")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    assert_eq!(tls_protocol(&address, &etc.join("ca.crt")), "Z5");
    server.stop();
}

/// A `unix-socket-group` that `/etc/group` does not know (a typo, or a
/// group from LDAP given by name) is a configuration error at a start and
/// in `--check-config`: exit status 2, one line naming the setting, the
/// value and why; no socket is made. Needs no root.
#[test]
fn unknown_unix_socket_group_is_a_configuration_error() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd_recipes-unknown-group");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("zeotemp.sock");
    let group = "zeotemp-no-such-group";
    for check in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zeotemp"));
        cmd.args(["--address", socket.to_str().unwrap()])
            .args(["--unix-socket-group", group])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        if check {
            cmd.arg("--check-config");
        }
        let (code, out) = exit_status_and_output(cmd);
        assert_eq!(code, Some(2), "check {check}: {out}");
        assert_eq!(
            out,
            format!(
                "zeotemp: unix-socket-group \"{group}\": no such group in /etc/group (names are \
                 looked up there only: give the gid of a group from LDAP or another source)\n"
            )
        );
        assert!(!socket.exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A live socket file the server's user may not connect to (EACCES) is
/// not taken for a stale one: `--check-config` as that user reports it
/// with the errno's text (exit status 2), and a start refuses it (exit
/// status non-zero); the file is still there after both, though the user
/// could remove it (the directory is its own).
#[test]
fn unix_socket_it_may_not_connect_to_is_left_alone() {
    skip_unless_possible!();
    let (nobody, nogroup) = passwd("nobody");
    let dir = scratch("no-connect", nobody, 0o755);
    let socket = dir.join("zeotemp.sock");
    let _live = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o700)).unwrap();
    let address = socket.to_str().unwrap();
    let (code, out) = exit_of(
        nobody,
        nogroup,
        &[],
        &["--check-config", "--address", address],
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.starts_with(&format!(
            "zeotemp: address \"{address}\": cannot tell whether a server listens on this \
             socket: connect: Permission denied"
        )),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(socket.exists(), "--check-config removed the socket file");
    let (code, out) = exit_of(nobody, nogroup, &[], &["--address", address]);
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {out}");
    assert!(out.to_lowercase().contains("permission denied"), "{out}");
    assert!(out.contains(address), "{out}");
    assert!(socket.exists(), "a start removed the socket file");
    let _ = std::fs::remove_dir_all(&dir);
}
