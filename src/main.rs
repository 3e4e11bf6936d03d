//! The `zeotemp` binary: parses the command line and config file, sets up
//! logging, binds, and runs the library's server until SIGINT/SIGTERM
//! (SIGHUP is logged and ignored).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info, warn};
use zeotemp::config::{self, Config, Settings};

/// A ZEO 5 server for temporary ZODB storages: everything in RAM, nothing
/// on disk, a restart clears it. Stock ZEO 5.2+ clients (ClientStorage,
/// Zope's <zeoclient>/<clientstorage>) use it unchanged.
///
/// Settings come from the defaults, then the --config file, then the
/// command line.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(flatten)]
    settings: Settings,

    /// TOML file with the same settings (see config/zeotemp.toml).
    #[arg(short = 'C', long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check the settings (config file, command line, TLS files, values)
    /// and bind and release every listener, then print them in one line,
    /// without starting; exit status 0 if usable, 2 if not (one line per
    /// problem).
    #[arg(long)]
    check_config: bool,

    /// Print the manual page (roff, generated from these options) and
    /// exit: `zeotemp --man-page > zeotemp.1` (docs/zeotemp.1 is this).
    #[arg(long, hide = true)]
    man_page: bool,
}

/// The command line's settings over the config file's over the defaults,
/// checked; and the log filter (`log-level`, else `RUST_LOG`), checked too.
fn settings(cli: &Cli) -> Result<(Config, tracing_subscriber::EnvFilter), config::ConfigError> {
    let file = match &cli.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    let settings = cli.settings.clone().or(file);
    let cfg = settings.resolve()?;
    // Every problem at once: the values' and the log filter's.
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = match (
        cfg.validate(),
        config::log_filter(settings.log_level.as_deref(), rust_log.as_deref()),
    ) {
        (Ok(()), Ok(filter)) => filter,
        (Err(e), Ok(_)) | (Ok(()), Err(e)) => return Err(e),
        (Err(values), Err(filter)) => {
            return Err(config::ConfigError::Invalid(format!("{values}\n{filter}")));
        }
    };
    // Read and check the TLS files now, so a bad one is reported before
    // anything is bound (the server reads them again when it starts).
    zeotemp::server::tls::load(&cfg).map_err(|e| config::ConfigError::Invalid(e.to_string()))?;
    Ok((cfg, filter))
}

// `pub(crate)`: bench/alloc-count's `zeotemp-counted` (this binary with a
// counting allocator) includes this file as a module and calls it.
pub(crate) fn main() -> ExitCode {
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
    let (cfg, filter) = match settings(&cli) {
        Ok(x) => x,
        Err(e) => {
            // One line per problem, at priority err under journald.
            for line in e.to_string().lines() {
                zeotemp::logging::eprint_line(3, &format!("zeotemp: {line}"));
            }
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        return check_config(&cfg);
    }
    // Priorities for journald under systemd; colours only on a terminal.
    zeotemp::logging::init(filter);
    std::panic::set_hook(Box::new(zeotemp::server::log_panic));

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .thread_name("zeotemp")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            zeotemp::logging::eprint_line(3, &format!("zeotemp: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(serve(cfg))
}

/// `--check-config`, once the settings passed: binds and releases every
/// listener, so that a port in use or a missing directory is found now,
/// not at the start; prints the configuration in one line.
fn check_config(cfg: &Config) -> ExitCode {
    let found = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(zeotemp::server::probe(
            &cfg.addresses,
            &zeotemp::server::UnixAccess::of(cfg),
            cfg.metrics_address.as_deref(),
        )),
        Err(e) => zeotemp::server::Probe {
            problems: vec![format!(
                "cannot start the runtime to try the listeners: {e}"
            )],
            notes: Vec::new(),
        },
    };
    if !found.problems.is_empty() {
        for line in found.problems {
            zeotemp::logging::eprint_line(3, &format!("zeotemp: {line}"));
        }
        for line in found.notes {
            println!("note: {line}");
        }
        return ExitCode::from(2);
    }
    println!(
        "zeotemp {}: configuration OK: listen on {}{}; {}",
        env!("CARGO_PKG_VERSION"),
        cfg.addresses.join(" and "),
        zeotemp::server::tls::describe(cfg)
            .map(|tls| format!(" ({tls})"))
            .unwrap_or_default(),
        cfg.summary()
    );
    // An address in use by the running server: no problem before a
    // restart, but worth knowing.
    for line in found.notes {
        println!("note: {line}");
    }
    ExitCode::SUCCESS
}

/// Binds the listeners and serves until SIGINT or SIGTERM.
async fn serve(cfg: Config) -> ExitCode {
    let shutdown = shutdown_signal();
    let access = zeotemp::server::UnixAccess::of(&cfg);
    let listeners = match zeotemp::server::bind_with_access(&cfg.addresses, &access).await {
        Ok(l) => l,
        // A unix socket group it may not use: a configuration error,
        // which no retry fixes.
        Err(e) if zeotemp::server::is_setting_error(&e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
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
    if cfg.memory_limit.is_none() && cfg.memory_ceiling.bytes().is_none() {
        warn!("memory-limit: {}", config::UNKNOWN_CEILING);
    }
    match zeotemp::server::run(listeners, cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Watches SIGINT, SIGTERM and SIGHUP from now on (so a signal that
/// arrives while the listeners are bound is not missed, and SIGHUP's
/// default disposition, death, is gone before anything is served), and
/// returns what completes on SIGINT or SIGTERM. SIGHUP only logs a line:
/// zeotemp holds everything in memory and has nothing to reload or reopen
/// (it logs to stderr), and a restart would drop every session, so a
/// `systemctl reload` or a closed terminal must not stop it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate())
        .map_err(|e| error!("cannot watch SIGTERM: {e}"))
        .ok();
    let hup = signal(SignalKind::hangup())
        .map_err(|e| error!("cannot watch SIGHUP: {e}"))
        .ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        tokio::pin!(ctrl_c);
        let (mut term, mut hup) = (term, hup);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => {
                    info!("SIGINT received");
                    return;
                }
                Some(()) = async { term.as_mut()?.recv().await } => {
                    info!("SIGTERM received");
                    return;
                }
                Some(()) = async { hup.as_mut()?.recv().await } => info!(
                    "SIGHUP received: ignored; zeotemp has nothing to reload: \
                     restart it to apply a new configuration"
                ),
            }
        }
    }
}
