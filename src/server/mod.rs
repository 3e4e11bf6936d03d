//! The network side: listeners (`listener`), one task per connection
//! (`connection`: handshake, frame loop, timers, writing), TLS ([`tls`]),
//! the background collector and the shutdown sequence (`shutdown`).
//! Depends on `session`, `monitor`, `state`, `storage`, `protocol` and
//! `config`; only the binary and the tests depend on it.
//!
//! Each connection runs one task: frames in, `Session`
//! handling, commit-lock waits, the transaction timeout, and the
//! connection's outbox out, in order. The server knows nothing about
//! pickles beyond the handshake.
//!
//! With TLS configured ([`tls`]), each connection's task first does
//! the TLS handshake (within `frame-timeout`), then serves the decrypted
//! stream exactly as a plain one; the accept loop never waits on a client.

mod connection;
mod listener;
mod shutdown;
pub mod tls;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{Config, STATS_LOG_INTERVAL_SECS};
use crate::monitor::status::log_summary;
use crate::state::Shared;

pub use connection::{PROTOCOL, PROTOCOL_MSGPACK};
pub use listener::{
    Listener, Probe, UnixAccess, bind, bind_with_access, bind_with_mode, is_setting_error, probe,
};

/// Serves until `shutdown` completes, then closes every connection
/// (aborting open transactions) and returns.
pub async fn run(
    listeners: Vec<Listener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    crate::logging::set_repeat_interval(config.log_repeat_interval);
    let shared = Arc::new(Shared::new(config));
    run_shared(listeners, shared, shutdown).await
}

/// [`run`] with the server state made by the caller.
pub async fn run_shared(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let tls = tls::load(&shared.config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        .map(Arc::new);
    let tls_note = match tls::describe(&shared.config) {
        Some(tls) => format!(" ({tls})"),
        None => String::new(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let next_id = Arc::new(AtomicU64::new(1));
    let mut tasks = tokio::task::JoinSet::new();
    let mut unix_paths = Vec::new();
    if let Some(addr) = &shared.config.metrics_address {
        let l = crate::monitor::http::bind(addr).await?;
        match l.local_addr() {
            Ok(a) => info!("metrics on http://{a}/metrics"),
            Err(_) => info!("metrics on http://{addr}/metrics"),
        }
        tasks.spawn(crate::monitor::http::serve(
            l,
            shared.clone(),
            stop_rx.clone(),
        ));
    }
    for l in listeners {
        if let Listener::Unix(_, p) = &l {
            unix_paths.push(p.clone());
        }
        info!("listening on {}{tls_note}", l.describe());
        if tls.is_some() && matches!(l, Listener::Unix(..)) {
            // Served as the stock server does, but of no use to its client:
            // ClientStorage gives asyncio no server_hostname for a unix
            // socket, and asyncio refuses TLS without one.
            warn!(
                "{} is served with TLS, which the stock ZEO client cannot use over a unix socket",
                l.describe()
            );
        }
        tasks.spawn(listener::accept_loop(
            l,
            tls.clone(),
            shared.clone(),
            stop_rx.clone(),
            next_id.clone(),
        ));
    }
    tasks.spawn(gc_loop(shared.clone(), stop_rx.clone()));
    shutdown.await;
    shutdown::shut_down(&shared, stop_tx, tasks, unix_paths, &next_id).await;
    Ok(())
}

/// The background collector: every `gc-interval`, for each storage, drops
/// expired history and, if anything was committed since, collects garbage;
/// every few minutes it logs a summary.
async fn gc_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.config.gc_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_summary = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let storages: Vec<_> = shared.storages.values().cloned().collect();
        let work = tokio::task::spawn_blocking(move || {
            for s in storages {
                let dropped = s.prune_expired();
                if dropped > 0 || s.changed_since_collection() {
                    s.collect_if_idle(s.retention_cutoff());
                }
            }
        });
        if let Err(e) = work.await {
            error!("garbage collection failed: {e}");
        }
        if last_summary.elapsed() >= Duration::from_secs(STATS_LOG_INTERVAL_SECS) {
            last_summary = tokio::time::Instant::now();
            log_summaries(&shared);
        }
    }
}

/// Each storage's summary line, in the configured order.
fn log_summaries(shared: &Shared) {
    for name in &shared.storage_names {
        if let Some(s) = shared.storages.get(name) {
            log_summary(s);
        }
    }
}

/// Logs a panic payload from a connection task (kept for the binary).
pub fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    error!("panic: {info}");
}
