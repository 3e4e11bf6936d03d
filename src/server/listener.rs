//! Listening sockets (TCP and unix-domain) and the accept loop: each
//! accepted connection is counted against `max-connections`, then served by
//! its own task ([`connection::serve`]).
//!
//! A unix socket file gets its group (`unix-socket-group`) and then its
//! mode (`unix-socket-mode`, or 0660 with a group) right after the bind,
//! before anything is accepted; a group the server may not give it is a
//! configuration error ([`is_setting_error`]), as retrying cannot fix it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use super::connection::{self, BoxStream};
use super::tls::Tls;
use crate::config::{self, Config, UNIX_SOCKET_GROUP_MODE};
use crate::state::{Refusal, Shared};

/// How each unix-domain socket file is set up once bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnixAccess {
    /// `unix-socket-mode`.
    pub mode: Option<u32>,
    /// `unix-socket-group`, as given (a name or a gid).
    pub group: Option<String>,
}

impl UnixAccess {
    /// The unix socket settings of `cfg`.
    pub fn of(cfg: &Config) -> UnixAccess {
        UnixAccess {
            mode: cfg.unix_socket_mode,
            group: cfg.unix_socket_group.clone(),
        }
    }

    /// The mode a socket file is given: `unix-socket-mode`, else
    /// [`UNIX_SOCKET_GROUP_MODE`] with a group, else none (the umask's).
    fn mode(&self) -> Option<u32> {
        self.mode
            .or(self.group.as_ref().map(|_| UNIX_SOCKET_GROUP_MODE))
    }
}

/// A listener setting the server cannot apply (`unix-socket-group`): a
/// configuration error (exit status 2; retrying cannot fix it), in one line
/// naming the setting, the value and why.
#[derive(Debug)]
pub struct SettingError(String);

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingError {}

/// Whether a bind error is a [`SettingError`].
pub fn is_setting_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<SettingError>())
}

fn setting_error(line: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, SettingError(line))
}

/// This process's effective uid, effective gid and supplementary groups,
/// from `/proc/self/status` (std has no `getuid` without `unsafe`); for
/// error messages, so `None` where it cannot be read.
pub(super) fn credentials() -> Option<(u32, u32, Vec<u32>)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().filter_map(|n| n.parse().ok()))
    };
    let uid = field("Uid:")?.nth(1)?;
    let gid = field("Gid:")?.nth(1)?;
    let groups = field("Groups:")?.collect();
    Some((uid, gid, groups))
}

/// `gid` for the log: `zope (gid 998)`, or `gid 998` if `/etc/group` has
/// no name for it.
fn group_label(gid: u32) -> String {
    match config::group_name(gid) {
        Some(name) => format!("{name} (gid {gid})"),
        None => format!("gid {gid}"),
    }
}

/// Gives the socket file `path` the group `group` (`unix-socket-group`).
fn give_group(path: &Path, group: &str) -> io::Result<()> {
    let gid = config::group_id(group)
        .map_err(|why| setting_error(format!("unix-socket-group {group:?}: {why}")))?;
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
        let why = match (e.kind(), credentials()) {
            (io::ErrorKind::PermissionDenied, Some((uid, egid, groups)))
                if egid != gid && !groups.contains(&gid) =>
            {
                format!(
                    ": zeotemp (uid {uid}, gid {egid}, groups {groups:?}) is not a member of \
                     gid {gid}; make it one (systemd: SupplementaryGroups={group})"
                )
            }
            (io::ErrorKind::PermissionDenied, Some(_)) => format!(
                ": zeotemp is a member of gid {gid}, so the system call was refused \
                 (systemd: the unit needs SystemCallFilter=@chown)"
            ),
            _ => String::new(),
        };
        setting_error(format!(
            "unix-socket-group {group:?}: cannot give {} to {}: {e}{why}",
            path.display(),
            group_label(gid)
        ))
    })
}

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// What to print for this listener (`tcp 127.0.0.1:8101`, `unix /path`).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => "tcp ?".into(),
            },
            Listener::Unix(_, p) => {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                match std::fs::metadata(p) {
                    Ok(m) => format!(
                        "unix {} (mode {:o}, owner uid {}, group {})",
                        p.display(),
                        m.permissions().mode() & 0o777,
                        m.uid(),
                        group_label(m.gid())
                    ),
                    Err(_) => format!("unix {}", p.display()),
                }
            }
        }
    }

    /// Waits for the next connection: the stream and the peer's name for
    /// the log (its address, or `unix:PATH`).
    async fn accept(&self) -> io::Result<(BoxStream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), a.to_string()))
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), format!("unix:{}", p.display())))
            }
        }
    }
}

/// Binds every address: `host:port` is TCP (port 0 picks a free one), a
/// path (anything with a `/`) is a unix-domain socket, replacing a stale
/// socket file left by an earlier run.
pub async fn bind(addresses: &[String]) -> io::Result<Vec<Listener>> {
    bind_with_mode(addresses, None).await
}

/// [`bind`], and gives each unix-domain socket file the mode `unix_mode`
/// (`unix-socket-mode`) before returning, so the socket is never served
/// with the umask's mode.
pub async fn bind_with_mode(
    addresses: &[String],
    unix_mode: Option<u32>,
) -> io::Result<Vec<Listener>> {
    let access = UnixAccess {
        mode: unix_mode,
        group: None,
    };
    bind_with_access(addresses, &access).await
}

/// [`bind`], and gives each unix-domain socket file the group and mode of
/// `access` before returning, so the socket is never served with the
/// process's group or the umask's mode. A group it cannot give is an
/// error for which [`is_setting_error`] holds.
pub async fn bind_with_access(
    addresses: &[String],
    access: &UnixAccess,
) -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for addr in addresses {
        if addr.contains('/') {
            let path = PathBuf::from(addr);
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    remove_stale_socket(&path)?;
                }
            }
            let l = bind_unix(&path, access)?;
            out.push(Listener::Unix(l, path));
        } else {
            out.push(Listener::Tcp(bind_tcp(addr).await?));
        }
    }
    Ok(out)
}

/// Removes the socket file at `path` if nobody listens on it (a connect
/// is refused: left by an earlier run). A server answering there keeps
/// its socket, and so does one this process may not connect to (the
/// connect fails otherwise, e.g. with EACCES): an error naming the path.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let error = |kind: io::ErrorKind, why: String| {
        io::Error::new(
            kind,
            format!("cannot listen on unix socket {}: {why}", path.display()),
        )
    };
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| {
                error(
                    e.kind(),
                    format!("cannot remove the stale socket file: {e}"),
                )
            }),
        Ok(_) => Err(error(
            io::ErrorKind::AddrInUse,
            "a server is listening on this socket already".into(),
        )),
        Err(e) => Err(error(e.kind(), unknown_socket(&e))),
    }
}

/// A TCP listener on `addr` (`HOST:PORT`).
async fn bind_tcp(addr: &str) -> io::Result<TcpListener> {
    // tokio sets SO_REUSEADDR, so a restart can rebind at once.
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// A unix-domain listener at `path`, whose socket file gets the group and
/// then the mode of `access` (in that order: the group's permission is
/// never granted to the process's own group). If either fails, the file
/// this made is removed.
fn bind_unix(path: &Path, access: &UnixAccess) -> io::Result<UnixListener> {
    let l = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on unix socket {}: {e}", path.display()),
        )
    })?;
    let set_up = || -> io::Result<()> {
        if let Some(group) = &access.group {
            give_group(path, group)?;
        }
        if let Some(mode) = access.mode() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot set mode {mode:o} on {}: {e}", path.display()),
                )
            })?;
        }
        Ok(())
    };
    if let Err(e) = set_up() {
        drop(l);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(l)
}

/// How long `--check-config` waits for whoever holds an address in use to
/// show what it is (a ZEO server's handshake frame, a metrics page): a
/// running zeotemp answers at once, so this only bounds a silent peer.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// Most bytes of a metrics page read to find [`METRICS_MARK`]: it is near
/// the top (the first family's `# HELP` line).
const PROBE_METRICS_BYTES: usize = 64 * 1024;

/// What a zeotemp metrics page has near its top.
const METRICS_MARK: &str = "# HELP zeotemp_";

/// What `--check-config` finds when it tries the listeners (see [`probe`]).
#[derive(Debug, Default, PartialEq)]
pub struct Probe {
    /// One line per problem: a start would fail (exit status 2).
    pub problems: Vec<String>,
    /// One line per address in use by a running ZEO server (or zeotemp
    /// metrics endpoint): no problem before a restart, which takes it over.
    pub notes: Vec<String>,
}

/// What `--check-config` finds when it tries the listeners a start would
/// bind (no problem: a start would bind them all): every TCP address and
/// the metrics address are bound together, then released, so a port in
/// use (also by another of these addresses) is found. A port in use by a
/// running ZEO server (it sends a ZEO handshake frame) or by a zeotemp
/// metrics endpoint is a note, not a problem: before a restart, that is
/// the server being restarted. A unix socket is bound at its path, if
/// nothing is there, and its file removed at once; an existing file is
/// never removed: a socket file is tried with a connect (refused: a stale
/// file, which a start replaces; a ZEO server answering: a note; anything
/// else a problem), anything but a socket is a problem. Nothing is left
/// behind.
pub async fn probe(
    addresses: &[String],
    access: &UnixAccess,
    metrics_address: Option<&str>,
) -> Probe {
    let mut found = Probe::default();
    // Held until the end, so that two addresses that are one are found.
    let mut held = Vec::new();
    for addr in addresses {
        if addr.contains('/') {
            match probe_unix(addr, access).await {
                Ok(Some(note)) => found.notes.push(note),
                Ok(None) => {}
                Err(problem) => found.problems.push(problem),
            }
        } else {
            match bind_tcp(addr).await {
                Ok(l) => held.push(l),
                Err(e) => match in_use_by_zeo(&e, addr).await {
                    Some(protocol) => found.notes.push(running_note("address", addr, &protocol)),
                    None => found.problems.push(format!("address {addr:?}: {e}")),
                },
            }
        }
    }
    if let Some(addr) = metrics_address {
        match crate::monitor::http::bind(addr).await {
            Ok(l) => held.push(l),
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse && serves_zeotemp_metrics(addr).await =>
            {
                found.notes.push(format!(
                    "metrics-address {addr:?} is in use by a running zeotemp's metrics \
                     endpoint: a restart of that server takes it over; a second server \
                     would not start"
                ));
            }
            Err(e) => found
                .problems
                .push(format!("metrics-address {addr:?}: {e}")),
        }
    }
    found
}

/// The note for `setting` `addr` in use by a running ZEO server speaking
/// `protocol`.
fn running_note(setting: &str, addr: &str, protocol: &str) -> String {
    format!(
        "{setting} {addr:?} is in use by a running ZEO server ({protocol}): a restart of \
         that server takes it over; a second server would not start"
    )
}

/// If binding the TCP address `addr` failed with `e` because it is in
/// use, and what listens there sends a ZEO handshake frame: its protocol.
async fn in_use_by_zeo(e: &io::Error, addr: &str) -> Option<String> {
    if e.kind() != io::ErrorKind::AddrInUse {
        return None;
    }
    let conn = tokio::time::timeout(PROBE_WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    zeo_handshake(conn).await
}

/// The protocol of the ZEO handshake frame `conn`'s peer sends first
/// (`Z5`, `M5`, `Z4`, `Z3101`...: a 4-byte big-endian length, then `Z`
/// or `M` and digits), read for up to [`PROBE_WAIT`]; `None` for anything
/// else or nothing. Nothing is sent: the server takes it for a probe.
async fn zeo_handshake(mut conn: impl tokio::io::AsyncRead + Unpin) -> Option<String> {
    use tokio::io::AsyncReadExt;
    /// Longer than any ZEO protocol name.
    const MAX_NAME: usize = 8;
    let read = async {
        let mut header = [0u8; crate::protocol::frame::HEADER_LEN];
        conn.read_exact(&mut header).await.ok()?;
        let len = u32::from_be_bytes(header) as usize;
        if !(2..=MAX_NAME).contains(&len) {
            return None;
        }
        let mut name = vec![0u8; len];
        conn.read_exact(&mut name).await.ok()?;
        let zeo = matches!(name[0], b'Z' | b'M') && name[1..].iter().all(u8::is_ascii_digit);
        zeo.then(|| String::from_utf8_lossy(&name).into_owned())
    };
    tokio::time::timeout(PROBE_WAIT, read).await.ok()?
}

/// Whether `GET /metrics` on the TCP address `addr` answers, within
/// [`PROBE_WAIT`], with a page that has [`METRICS_MARK`].
async fn serves_zeotemp_metrics(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: zeotemp\r\n\r\n")
            .await
            .ok()?;
        let mut page = Vec::new();
        let mut chunk = [0u8; 4096];
        while page.len() < PROBE_METRICS_BYTES {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            page.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&page).contains(METRICS_MARK) {
                return Some(());
            }
        }
        None
    };
    matches!(tokio::time::timeout(PROBE_WAIT, ask).await, Ok(Some(())))
}

/// Whether a start could listen on the unix socket `addr` and give it its
/// group and mode (see [`probe`]): `Ok(Some(note))` if a ZEO server
/// listens there; if not, the problem's line.
async fn probe_unix(addr: &str, access: &UnixAccess) -> Result<Option<String>, String> {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new(addr);
    let problem = |why: String| format!("address {addr:?}: {why}");
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match tokio::net::UnixStream::connect(path).await {
                Ok(conn) => match zeo_handshake(conn).await {
                    Some(protocol) => Ok(Some(running_note("address", addr, &protocol))),
                    None => Err(problem(
                        "a server is listening on this socket already, and it is not a \
                         ZEO server (a start would refuse it)"
                            .into(),
                    )),
                },
                // A stale socket from an earlier run: a start replaces it.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(None),
                Err(e) => Err(problem(unknown_socket(&e))),
            }
        }
        Ok(_) => Err(problem(
            "exists and is not a socket (a start does not replace it)".into(),
        )),
        Err(_) => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(problem(format!(
                    "directory {} does not exist{}",
                    dir.display(),
                    if made_by_systemd(dir) {
                        " (under systemd, RuntimeDirectory= creates it at the start)"
                    } else {
                        ""
                    }
                )));
            }
            // Closes the listener at once; the group and mode are set (or
            // not) by now.
            let bound = bind_unix(path, access).map(drop);
            if std::fs::symlink_metadata(path).is_ok() {
                // Ours: nothing was there before the bind above.
                std::fs::remove_file(path)
                    .map_err(|e| problem(format!("cannot remove the socket file it made: {e}")))?;
            }
            bound
                .map_err(|e| {
                    if is_setting_error(&e) {
                        e.to_string()
                    } else {
                        problem(e.to_string())
                    }
                })
                .map(|()| None)
        }
    }
}

/// Why a socket file whose connect failed with `e` (not refused) is
/// neither replaced nor used.
fn unknown_socket(e: &io::Error) -> String {
    format!(
        "cannot tell whether a server listens on this socket: connect: {e} (a start does \
         not replace it)"
    )
}

/// Whether the missing directory `dir` is one that systemd's
/// `RuntimeDirectory=` makes: under /run, in a directory that exists.
fn made_by_systemd(dir: &Path) -> bool {
    dir.starts_with("/run") && dir.parent().is_some_and(Path::is_dir)
}

/// Accepts connections on `l` until `stop` changes, each served by its own
/// task; then closes the listener and gives the connections
/// `shutdown-grace` to end. `next_id` numbers the connections of every
/// listener.
pub(super) async fn accept_loop(
    l: Listener,
    tls: Option<Arc<Tls>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    next_id: Arc<AtomicU64>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            // Reap finished connection tasks as we go.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = l.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: log, breathe, go on.
                shared.faults.connections_refused.bump(Refusal::AcceptError);
                crate::warn_repeated!([] "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let max = shared.config.max_connections;
        // Counted here, before the task is spawned: a burst of accepts runs
        // before any spawned task does, so counting in the task let a burst
        // go past the limit (up to ~128 in one go, tokio's budget).
        let Some(counted) = Counted::try_new(&shared, max) else {
            shared
                .faults
                .connections_refused
                .bump(Refusal::MaxConnections);
            crate::warn_repeated!([%peer, max,] "connection refused: max-connections reached");
            drop(stream);
            continue;
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        conns.spawn(connection::serve(
            counted,
            stream,
            peer,
            id,
            tls.clone(),
            shared.clone(),
            stop.clone(),
        ));
    }
    // Closed before the connections: a client that reconnects at once is
    // refused (and retries) instead of landing in the backlog of a
    // listener nobody accepts from any more.
    drop(l);
    let grace = shared.config.shutdown_grace;
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
}

/// Counts a live connection; the count drops when the connection ends,
/// even if its task panics.
pub(super) struct Counted(Arc<Shared>);

impl Counted {
    /// Counts one more connection, unless `max` are open already.
    fn try_new(shared: &Arc<Shared>, max: usize) -> Option<Counted> {
        shared
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Counted(shared.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `RuntimeDirectory=` hint is for a missing last directory under
    /// /run only.
    #[test]
    fn systemd_hint_only_for_a_missing_directory_under_run() {
        assert!(Path::new("/run").is_dir(), "this test needs /run");
        assert!(made_by_systemd(Path::new("/run/zeotemp-not-there")));
        assert!(!made_by_systemd(Path::new("/run/zeotemp-not-there/sub")));
        assert!(!made_by_systemd(Path::new("/tmp/zeotemp-not-there")));
        assert!(!made_by_systemd(Path::new("/running/zeotemp")));
    }

    /// A ZEO handshake frame gives its protocol; anything else, or a
    /// closed connection, gives none.
    #[tokio::test]
    async fn handshake_frames_are_told_apart() {
        for (bytes, expected) in [
            (&b"\0\0\0\x02Z5"[..], Some("Z5")),
            (b"\0\0\0\x02M5", Some("M5")),
            (b"\0\0\0\x05Z3101", Some("Z3101")),
            (b"\0\0\0\x02Z", None),
            (b"\0\0\0\x02HT", None),
            (b"HTTP/1.1 200 OK\r\n", None),
            (b"\0\0\0\x0aZ123456789", None),
            (b"", None),
        ] {
            assert_eq!(zeo_handshake(bytes).await.as_deref(), expected, "{bytes:?}");
        }
    }
}
