//! The `zeotemp` binary: parses the command line and config file, sets up
//! logging, binds, and runs the library's server until SIGINT/SIGTERM.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info};
use zeotemp::config::{self, Config, FileConfig};

/// A ZEO 5 server for temporary ZODB storages: everything in RAM, nothing
/// on disk, a restart clears it. Stock ZEO 5.2+ clients (ClientStorage,
/// Zope's <zeoclient>/<clientstorage>) use it unchanged.
///
/// Settings come from the defaults, then the --config file, then the
/// command line.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Where to listen: HOST:PORT for TCP (port 0 picks a free port), or a
    /// path for a unix-domain socket. Repeat for several listeners.
    /// [default: 127.0.0.1:8101]
    #[arg(short, long = "address", value_name = "ADDR")]
    address: Vec<String>,

    /// A storage name to serve (what clients give as `storage`). Repeat for
    /// several fully isolated storages. [default: 1]
    #[arg(short, long = "storage", value_name = "NAME")]
    storage: Vec<String>,

    /// Serve every storage read-only: writable registrations are refused
    /// with ReadOnlyError (clients with read-only-fallback connect
    /// read-only).
    #[arg(long)]
    read_only: bool,

    /// Announce ZEO protocol M5 (msgpack) instead of Z5 (pickle), as the
    /// stock server's `msgpack true`; stock clients then speak msgpack
    /// (they need the `msgpack` package). Whatever is announced, a client
    /// answering M5 gets msgpack and one answering Z5 pickle.
    /// [default: off]
    #[arg(long)]
    msgpack: bool,

    /// Seconds one transaction may hold a storage's commit lock (from vote,
    /// through client-side conflict resolution, to tpc_finish) before it is
    /// aborted and its connection closed. [default: 30]
    #[arg(long, value_name = "SECS")]
    transaction_timeout: Option<u64>,

    /// Seconds a client may take to send one message once its first byte
    /// arrived (and its handshake after connecting); over it the connection
    /// is closed with a log line. [default: 60]
    #[arg(long, value_name = "SECS")]
    frame_timeout: Option<u64>,

    /// Seconds a stop (SIGTERM, Ctrl-C) gives a commit in progress to
    /// finish, and then each connection to receive what is queued for it.
    /// [default: 5]
    #[arg(long, value_name = "SECS")]
    shutdown_grace: Option<u64>,

    /// File mode of unix-domain sockets, in octal (e.g. 0660); default: the
    /// process umask's.
    #[arg(long, value_name = "MODE")]
    unix_socket_mode: Option<String>,

    /// Recent transactions remembered for reconnecting clients' quick cache
    /// verification (getInvalidations). [default: 100]
    #[arg(long, value_name = "N")]
    invalidation_queue_size: Option<usize>,

    /// Seconds a non-current object revision is kept after it was replaced,
    /// for open snapshots (MVCC) and client-side conflict resolution. A
    /// load of a revision older than that is answered with a retryable
    /// conflict. [default: 600]
    #[arg(long, value_name = "SECS")]
    history_retention: Option<u64>,

    /// Seconds between background passes that drop expired history and,
    /// if anything was committed, collect objects unreachable from the
    /// root. [default: 10]
    #[arg(long, value_name = "SECS")]
    gc_interval: Option<u64>,

    /// Bytes each storage may hold (records, references and bookkeeping,
    /// as accounted by zeotemp; RSS is somewhat higher). A commit that would
    /// cross it first drops the oldest history and collects garbage; if
    /// still over, its vote fails with an error naming this limit. 0 means
    /// no limit. [default: half of the machine's memory]
    #[arg(long, value_name = "BYTES")]
    memory_limit: Option<usize>,

    /// Largest frame (message) a client may send, in bytes; a larger one
    /// closes that connection with a log line. [default: 67108864 = 64 MiB]
    #[arg(long, value_name = "BYTES")]
    max_frame_size: Option<usize>,

    /// Bytes of replies and invalidations queued for one client; a client
    /// that does not read them is disconnected (it reconnects and verifies
    /// its cache), never sent a partial stream. [default: 268435456 = 256 MiB]
    #[arg(long, value_name = "BYTES")]
    max_outbox_bytes: Option<usize>,

    /// Bytes of object data one transaction may send before its vote; over
    /// it the vote fails with an error naming this limit.
    /// [default: 536870912 = 512 MiB]
    #[arg(long, value_name = "BYTES")]
    max_transaction_bytes: Option<usize>,

    /// Simultaneous client connections; further ones are closed at once
    /// with a log line. [default: 10000]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Bytes queued for a client past which its own requests are not read
    /// until it reads its replies (a client that pipelines and never reads
    /// holds about this much of the server's memory). [default: 1 MiB]
    #[arg(long, value_name = "BYTES")]
    read_pause_bytes: Option<usize>,

    /// How deeply containers may nest in one message; a deeper one closes
    /// its connection with a log line. [default: 64]
    #[arg(long, value_name = "N")]
    max_nesting_depth: Option<usize>,

    /// Values (scalars and containers) one message may decode to; more
    /// close its connection with a log line (bounds decoding to about 100
    /// bytes per value). [default: 100000]
    #[arg(long, value_name = "N")]
    max_message_items: Option<usize>,

    /// Worker threads serving connections. One is the leanest and steadiest
    /// for a session store; more help only many busy clients on a machine
    /// with cores to spare. [default: 1]
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Accepted for familiarity with ZEO's option of the same name, and
    /// always on: zeotemp never unpickles application data, so conflicts
    /// are handed to the clients to resolve (BTrees, Length, Transience
    /// resolve theirs as with a stock server in this mode).
    #[arg(long)]
    client_conflict_resolution: bool,

    /// Serve every listener (unix sockets too) with TLS, using this PEM
    /// certificate chain (the server's certificate first, then any
    /// intermediates); needs --tls-key. Clients use ZEO's <ssl> section or
    /// ClientStorage(ssl=...). [default: no TLS]
    #[arg(long, value_name = "FILE")]
    tls_certificate: Option<PathBuf>,

    /// The PEM private key of --tls-certificate (unencrypted).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// PEM file of CA certificates: clients must present a certificate
    /// signed by one of them, or the TLS handshake fails (the stock
    /// server's <ssl> authenticate). Needs --tls-certificate.
    /// [default: no client certificate asked for]
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,

    /// Serve Prometheus metrics (GET /metrics, plain HTTP) on HOST:PORT;
    /// port 0 picks a free port and logs it. [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    metrics_address: Option<String>,

    /// TOML file with the same settings (see config/zeotemp.toml).
    #[arg(short = 'C', long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check the settings (config file, command line, TLS files) and print
    /// them in one line, without starting; exit status 0 if usable, 2 if
    /// not (with the reason).
    #[arg(long)]
    check_config: bool,

    /// Log filter: error, warn, info, debug (commits are logged at debug),
    /// or a tracing filter like `zeotemp=debug`. Overrides RUST_LOG.
    /// [default: info]
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// Print the manual page (roff, generated from these options) and
    /// exit: `zeotemp --man-page > zeotemp.1` (docs/zeotemp.1 is this).
    #[arg(long, hide = true)]
    man_page: bool,
}

impl Cli {
    /// The command line's settings, in the config file's shape, so both
    /// are applied by one piece of code (`FileConfig::apply`).
    fn overrides(&self) -> FileConfig {
        let some_vec = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        FileConfig {
            address: some_vec(&self.address),
            storage: some_vec(&self.storage),
            read_only: self.read_only.then_some(true),
            msgpack: self.msgpack.then_some(true),
            transaction_timeout: self.transaction_timeout,
            frame_timeout: self.frame_timeout,
            shutdown_grace: self.shutdown_grace,
            unix_socket_mode: self.unix_socket_mode.clone(),
            invalidation_queue_size: self.invalidation_queue_size,
            max_frame_size: self.max_frame_size,
            max_outbox_bytes: self.max_outbox_bytes,
            max_transaction_bytes: self.max_transaction_bytes,
            max_connections: self.max_connections,
            read_pause_bytes: self.read_pause_bytes,
            max_nesting_depth: self.max_nesting_depth,
            max_message_items: self.max_message_items,
            threads: self.threads,
            history_retention: self.history_retention,
            gc_interval: self.gc_interval,
            memory_limit: self.memory_limit,
            client_conflict_resolution: self.client_conflict_resolution.then_some(true),
            log_level: self.log_level.clone(),
            tls_certificate: self.tls_certificate.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            metrics_address: self.metrics_address.clone(),
        }
    }
}

/// Defaults, then the config file, then the command line.
fn settings(cli: &Cli) -> Result<(Config, Option<String>), config::ConfigError> {
    let mut cfg = Config::default();
    let file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    file.apply(&mut cfg)?;
    let overrides = cli.overrides();
    overrides.apply(&mut cfg)?;
    cfg.validate()?;
    // Read and check the TLS files now, so a bad one is reported before
    // anything is bound (the server reads them again when it starts).
    zeotemp::server::tls::load(&cfg).map_err(|e| config::ConfigError::Invalid(e.to_string()))?;
    Ok((cfg, overrides.log_level.or(file.log_level)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.man_page {
        // The page is generated from the options above, so it cannot drift.
        let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("zeotemp: cannot write the manual page: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (cfg, log_level) = match settings(&cli) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("zeotemp: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!(
            "zeotemp {}: configuration OK: listen on {}{}; {}",
            env!("CARGO_PKG_VERSION"),
            cfg.addresses.join(" and "),
            zeotemp::server::tls::describe(&cfg)
                .map(|tls| format!(" ({tls})"))
                .unwrap_or_default(),
            cfg.summary()
        );
        return ExitCode::SUCCESS;
    }
    let filter = match log_level {
        Some(l) => tracing_subscriber::EnvFilter::new(l),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    // Colours only on a terminal: log files and journald get plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    std::panic::set_hook(Box::new(zeotemp::server::log_panic));

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .thread_name("zeotemp")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zeotemp: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listeners =
            match zeotemp::server::bind_with_mode(&cfg.addresses, cfg.unix_socket_mode).await {
                Ok(l) => l,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
        let on = listeners
            .iter()
            .map(|l| l.describe())
            .collect::<Vec<_>>()
            .join(" and ");
        let tls = zeotemp::server::tls::describe(&cfg)
            .map(|tls| format!(" ({tls})"))
            .unwrap_or_default();
        info!(
            "zeotemp {} on {on}{tls}: {}",
            env!("CARGO_PKG_VERSION"),
            cfg.summary()
        );
        match zeotemp::server::run(listeners, cfg, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
