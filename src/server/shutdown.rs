//! The shutdown sequence: commits end first ([`stop_commits`]), then every
//! connection closes (aborting open transactions) within `shutdown-grace`,
//! then the unix socket files go and the last log lines say what was done.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::log_summaries;
use crate::state::Shared;
use crate::storage::{LockAttempt, SHUTDOWN_HOLDER};

/// Shuts the server down once its shutdown future has completed: stops
/// commits, tells every task (accept loops, their connections, the
/// collector, the metrics endpoint) to stop through `stop`, waits for
/// `tasks` (at most `shutdown-grace` and a second), removes `unix_paths`
/// and logs each storage's summary and the server's last line (`next_id`
/// numbers the connections: how many were served).
pub(super) async fn shut_down(
    shared: &Shared,
    stop: watch::Sender<bool>,
    mut tasks: JoinSet<()>,
    unix_paths: Vec<PathBuf>,
    next_id: &AtomicU64,
) {
    info!("shutting down");
    // Kept to the end: a lock granted late still goes to the server.
    let _late_locks = stop_commits(shared).await;
    let _ = stop.send(true);
    let grace = shared.config.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!("some connections did not close in time");
    }
    for p in unix_paths {
        let _ = std::fs::remove_file(p);
    }
    log_summaries(shared);
    log_stopped(shared, next_id.load(Ordering::Relaxed) - 1);
}

/// Takes every storage's commit lock ahead of the waiting voters and keeps
/// it, so commits end before any connection closes: a transaction holding
/// the lock gets `shutdown-grace` to finish or abort; votes that
/// wait are never granted (their connections then close without a reply,
/// which clients retry as ClientDisconnected). Without this, a commit could
/// be acknowledged after another client's connection had already closed
/// without hearing of it. Returns the lock requests still waiting after the
/// grace (dropping one would pass the lock to the next voter).
async fn stop_commits(shared: &Shared) -> Vec<oneshot::Receiver<()>> {
    let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace;
    let mut late = Vec::new();
    for name in &shared.storage_names {
        let Some(s) = shared.storages.get(name) else {
            continue;
        };
        if let LockAttempt::Wait(mut granted) = s.lock_ahead(SHUTDOWN_HOLDER)
            && tokio::time::timeout_at(deadline, &mut granted)
                .await
                .is_err()
        {
            warn!(
                storage = %name,
                "a transaction did not finish within the shutdown grace; closing its connection"
            );
            late.push(granted);
        }
    }
    late
}

/// The server's last line: how long it ran, what it served.
fn log_stopped(shared: &Shared, served: u64) {
    let commits: u64 = shared
        .storages
        .values()
        .map(|s| s.stats.commits.load(Ordering::Relaxed))
        .sum();
    let up = shared.started.elapsed().unwrap_or_default().as_secs();
    info!(
        "zeotemp stopped after {}h{:02}m{:02}s: {served} connection{} served, {commits} commits on {} storage{}; \
         all data held in memory is gone",
        up / 3600,
        up / 60 % 60,
        up % 60,
        if served == 1 { "" } else { "s" },
        shared.storages.len(),
        if shared.storages.len() == 1 { "" } else { "s" },
    );
}
