//! Listening sockets (TCP and unix-domain) and the accept loop: each
//! accepted connection is counted against `max-connections`, then served by
//! its own task ([`connection::serve`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tracing::warn;

use super::connection::{self, BoxStream};
use super::tls::Tls;
use crate::state::{Refusal, Shared};

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
                use std::os::unix::fs::PermissionsExt;
                match std::fs::metadata(p) {
                    Ok(m) => format!(
                        "unix {} (mode {:o})",
                        p.display(),
                        m.permissions().mode() & 0o777
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
    let mut out = Vec::new();
    for addr in addresses {
        if addr.contains('/') {
            let path = PathBuf::from(addr);
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    std::fs::remove_file(&path)?;
                }
            }
            let l = bind_unix(&path, unix_mode)?;
            out.push(Listener::Unix(l, path));
        } else {
            out.push(Listener::Tcp(bind_tcp(addr).await?));
        }
    }
    Ok(out)
}

/// A TCP listener on `addr` (`HOST:PORT`).
async fn bind_tcp(addr: &str) -> io::Result<TcpListener> {
    // tokio sets SO_REUSEADDR, so a restart can rebind at once.
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// A unix-domain listener at `path`, whose socket file gets the mode
/// `unix_mode` if set.
fn bind_unix(path: &Path, unix_mode: Option<u32>) -> io::Result<UnixListener> {
    let l = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on unix socket {}: {e}", path.display()),
        )
    })?;
    if let Some(mode) = unix_mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot set mode {mode:o} on {}: {e}", path.display()),
            )
        })?;
    }
    Ok(l)
}

/// What `--check-config` finds when it tries the listeners a start would
/// bind, one line per problem (empty if a start would bind them all):
/// every TCP address and the metrics address are bound together, then
/// released, so a port in use (also by another of these addresses) is
/// found. A unix socket is bound at its path, if nothing is there, and its
/// file removed at once; an existing file is never removed: a socket file
/// is tried with a connect (a server answering there would lose its
/// socket to this one), anything else is a problem. Nothing is left
/// behind.
pub async fn probe(
    addresses: &[String],
    unix_mode: Option<u32>,
    metrics_address: Option<&str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    // Held until the end, so that two addresses that are one are found.
    let mut held = Vec::new();
    for addr in addresses {
        if addr.contains('/') {
            if let Err(why) = probe_unix(Path::new(addr), unix_mode) {
                problems.push(format!("address {addr:?}: {why}"));
            }
        } else {
            match bind_tcp(addr).await {
                Ok(l) => held.push(l),
                Err(e) => problems.push(format!("address {addr:?}: {e}")),
            }
        }
    }
    if let Some(addr) = metrics_address {
        match crate::monitor::http::bind(addr).await {
            Ok(l) => held.push(l),
            Err(e) => problems.push(format!("metrics-address {addr:?}: {e}")),
        }
    }
    problems
}

/// Whether a start could listen on the unix socket `path` (see [`probe`]).
fn probe_unix(path: &Path, unix_mode: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(
                    "a server is listening on this socket already (a start would \
                     take its socket file from it)"
                        .into(),
                ),
                // A stale socket from an earlier run: a start replaces it.
                Err(_) => Ok(()),
            }
        }
        Ok(_) => Err("exists and is not a socket (a start does not replace it)".into()),
        Err(_) => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(format!("directory {} does not exist", dir.display()));
            }
            // Closes the listener at once; the mode is set (or not) by now.
            let bound = bind_unix(path, unix_mode).map(drop);
            if std::fs::symlink_metadata(path).is_ok() {
                // Ours: nothing was there before the bind above.
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove the socket file it made: {e}"))?;
            }
            bound.map_err(|e| e.to_string())
        }
    }
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
                warn!("accept failed: {e}");
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
            warn!(%peer, max, "connection refused: max-connections reached");
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
