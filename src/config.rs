//! Server settings: every limit is a named constant with a default here,
//! overridable by the TOML config file and then by the command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::protocol::frame::DEFAULT_MAX_FRAME_SIZE;
pub use crate::protocol::pickle::{MAX_MESSAGE_ITEMS, MAX_NESTING_DEPTH};
pub use crate::session::outbox::{DEFAULT_MAX_OUTBOX_BYTES, READ_PAUSE_BYTES};
pub use crate::storage::{DEFAULT_INVALIDATION_QUEUE_SIZE, DEFAULT_RETENTION_SECS};

/// Smallest `max-nesting-depth` accepted: stock ZEO messages nest up to
/// four levels (envelope, arguments, a `tpc_begin` extension dict, a value
/// in it); below eight a client's odd but harmless message would close its
/// connection.
pub const MIN_NESTING_DEPTH: usize = 8;

/// Smallest `max-message-items` accepted: far above any stock client's
/// message, so a setting cannot lock clients out by accident.
pub const MIN_MESSAGE_ITEMS: usize = 1_000;

/// Smallest `read-pause-bytes` accepted: a few replies must fit before a
/// connection's requests pause.
pub const MIN_READ_PAUSE_BYTES: usize = 64 * 1024;

/// Default listen address: loopback, next to the main ZEO server's usual
/// 8100 and never on it.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8101";

/// Default storage name: what `ClientStorage` registers with unless told
/// otherwise (its `storage` option defaults to `'1'`).
pub const DEFAULT_STORAGE: &str = "1";

/// Default `transaction-timeout` in seconds: how long one transaction may
/// hold a storage's commit lock (from its vote, through client-side conflict
/// resolution, to `tpc_finish`). A client that exceeds it is disconnected and
/// its transaction aborted, so a hung Zope worker cannot block the others.
pub const DEFAULT_TRANSACTION_TIMEOUT_SECS: u64 = 30;

/// Default `frame-timeout` in seconds: how long a client may take to send
/// one message once its first byte arrived, and to send its handshake
/// after connecting. A connection over it is closed with a log line, so
/// half-sent frames (a crashed client, or one trickling bytes on purpose)
/// do not hold a connection and its buffer forever. Generous for the
/// largest frame (`max-frame-size`, 64 MiB) on a LAN; raise it for huge
/// objects over a slow link.
pub const DEFAULT_FRAME_TIMEOUT_SECS: u64 = 60;

/// Default bound on the bytes one transaction may buffer before its vote
/// (`max-transaction-bytes`). Over it, the vote fails with an error naming
/// the limit.
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 512 * 1024 * 1024;

/// Default number of simultaneous client connections (`max-connections`);
/// further ones are closed at once with a log line.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default `gc-interval` in seconds: how often each storage drops expired
/// non-current revisions and, if anything was committed since the last
/// time, collects garbage. Sessions churn every few seconds; a cycle over
/// 100k objects takes milliseconds.
pub const DEFAULT_GC_INTERVAL_SECS: u64 = 10;

/// Default `memory-limit`: this fraction of the machine's physical memory.
/// The limit applies to what zeotemp accounts for (records, references and
/// per-revision overheads), not to its RSS, which is somewhat higher.
pub const DEFAULT_MEMORY_LIMIT_FRACTION: f64 = 0.5;

/// Default `metrics-address`: none, so the Prometheus endpoint is off. Set
/// to `HOST:PORT` (port 0 picks a free port and logs it) to serve
/// `GET /metrics` in the Prometheus text format there (`src/metrics.rs`).
/// Plain HTTP without authentication: keep it on loopback or a private
/// network, as the ZEO port.
pub const DEFAULT_METRICS_ADDRESS: Option<&str> = None;

/// How often a summary line per storage is logged, in seconds.
pub const STATS_LOG_INTERVAL_SECS: u64 = 300;

/// Default `threads`: runtime worker threads serving connections. One is
/// enough for a session store and the cheapest per transaction: on the
/// 2-core benchmark machine, one thread used 13–21 % less server CPU per
/// real-client transaction than two, gave the same `load` throughput and a
/// 3× lower p99.9 (no second worker waking and parking), and only `echo`
/// went faster with two (BENCHMARKS.md). Garbage collection runs on its
/// own thread either way. Raise it for many busy clients on a big machine.
pub const DEFAULT_THREADS: usize = 1;

/// Default `shutdown-grace` in seconds: at a stop, how long a commit in
/// progress may take to finish, and then how long each connection may take
/// to receive what is queued for it and to close its own side (what it
/// still sends meanwhile is read and dropped, so that it sees a clean close,
/// not a reset), before it is closed anyway. (A connection that ends by
/// itself, or that the server closes, gets the same time.)
pub const SHUTDOWN_GRACE_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `host:port` for TCP, or a filesystem path for a unix-domain socket.
    pub addresses: Vec<String>,
    /// Storage names served; each is a separate, isolated database.
    pub storages: Vec<String>,
    pub read_only: bool,
    /// `msgpack`: announce `M5` (msgpack) instead of `Z5` (pickle) at the
    /// handshake, as the stock server's `msgpack true`. Stock clients
    /// answer with the letter announced; whatever was announced, a client
    /// answering `M5` is spoken msgpack, one answering `Z5` pickle. Off by
    /// default: a stock client needs the `msgpack` package for `M5`, which
    /// Zope and Plone do not install.
    pub msgpack: bool,
    pub transaction_timeout: Duration,
    /// See [`DEFAULT_FRAME_TIMEOUT_SECS`].
    pub frame_timeout: Duration,
    /// `shutdown-grace` ([`SHUTDOWN_GRACE_SECS`]).
    pub shutdown_grace: Duration,
    /// File mode of unix-domain sockets (e.g. `0o660`); `None` leaves the
    /// process umask's.
    pub unix_socket_mode: Option<u32>,
    pub invalidation_queue_size: usize,
    pub max_frame_size: usize,
    pub max_outbox_bytes: usize,
    /// `read-pause-bytes` ([`READ_PAUSE_BYTES`]; at most half of
    /// `max_outbox_bytes` takes effect).
    pub read_pause_bytes: usize,
    pub max_transaction_bytes: usize,
    pub max_connections: usize,
    /// `max-nesting-depth`: how deeply containers may nest in one message
    /// ([`MAX_NESTING_DEPTH`]; at least [`MIN_NESTING_DEPTH`]).
    pub max_nesting_depth: usize,
    /// `max-message-items`: values one message may decode to
    /// ([`MAX_MESSAGE_ITEMS`]; at least [`MIN_MESSAGE_ITEMS`]).
    pub max_message_items: usize,
    /// Runtime worker threads (at least 1).
    pub threads: usize,
    pub history_retention: Duration,
    pub gc_interval: Duration,
    /// Accounted bytes per storage; `None` is no limit.
    pub memory_limit: Option<usize>,
    /// `tls-certificate`: the server's certificate chain (PEM: its own
    /// certificate first, then any intermediates). With `tls-key`, every
    /// listener speaks TLS (the stock server's `<ssl> certificate`); see
    /// `src/tls.rs`.
    pub tls_certificate: Option<PathBuf>,
    /// `tls-key`: the private key of `tls-certificate` (PEM, unencrypted;
    /// the stock server's `<ssl> key`).
    pub tls_key: Option<PathBuf>,
    /// `tls-client-ca`: CA certificates (PEM); when set, a client must
    /// present a certificate signed by one of them or its handshake fails
    /// (the stock server's `<ssl> authenticate`). Needs `tls-certificate`.
    pub tls_client_ca: Option<PathBuf>,
    /// `metrics-address`: `HOST:PORT` of the Prometheus endpoint; `None`
    /// (the default, [`DEFAULT_METRICS_ADDRESS`]) serves none.
    pub metrics_address: Option<String>,
}

/// Physical memory in bytes, from /proc/meminfo (Linux).
pub fn physical_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The default memory limit: half the machine's memory, if known.
pub fn default_memory_limit() -> Option<usize> {
    physical_memory().map(|m| (m as f64 * DEFAULT_MEMORY_LIMIT_FRACTION) as usize)
}

impl Default for Config {
    fn default() -> Config {
        Config {
            addresses: vec![DEFAULT_ADDRESS.to_string()],
            storages: vec![DEFAULT_STORAGE.to_string()],
            read_only: false,
            msgpack: false,
            transaction_timeout: Duration::from_secs(DEFAULT_TRANSACTION_TIMEOUT_SECS),
            frame_timeout: Duration::from_secs(DEFAULT_FRAME_TIMEOUT_SECS),
            shutdown_grace: Duration::from_secs(SHUTDOWN_GRACE_SECS),
            unix_socket_mode: None,
            invalidation_queue_size: DEFAULT_INVALIDATION_QUEUE_SIZE,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_outbox_bytes: DEFAULT_MAX_OUTBOX_BYTES,
            read_pause_bytes: READ_PAUSE_BYTES,
            max_transaction_bytes: DEFAULT_MAX_TRANSACTION_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_nesting_depth: MAX_NESTING_DEPTH,
            max_message_items: MAX_MESSAGE_ITEMS,
            threads: DEFAULT_THREADS,
            history_retention: Duration::from_secs(DEFAULT_RETENTION_SECS),
            gc_interval: Duration::from_secs(DEFAULT_GC_INTERVAL_SECS),
            memory_limit: default_memory_limit(),
            tls_certificate: None,
            tls_key: None,
            tls_client_ca: None,
            metrics_address: DEFAULT_METRICS_ADDRESS.map(String::from),
        }
    }
}

/// The TOML config file: the same settings as the command line, each
/// optional (see `config/zeotemp.toml`).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub address: Option<Vec<String>>,
    pub storage: Option<Vec<String>>,
    pub read_only: Option<bool>,
    pub msgpack: Option<bool>,
    pub transaction_timeout: Option<u64>,
    pub frame_timeout: Option<u64>,
    pub shutdown_grace: Option<u64>,
    /// Octal digits, e.g. `"0660"`.
    pub unix_socket_mode: Option<String>,
    pub invalidation_queue_size: Option<usize>,
    pub max_frame_size: Option<usize>,
    pub max_outbox_bytes: Option<usize>,
    pub read_pause_bytes: Option<usize>,
    pub max_transaction_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_nesting_depth: Option<usize>,
    pub max_message_items: Option<usize>,
    pub threads: Option<usize>,
    pub history_retention: Option<u64>,
    pub gc_interval: Option<u64>,
    /// Bytes; 0 means no limit.
    pub memory_limit: Option<usize>,
    /// Accepted for familiarity with ZEO's `client-conflict-resolution`:
    /// zeotemp always lets clients resolve conflicts; `false` is refused.
    pub client_conflict_resolution: Option<bool>,
    /// Log filter, e.g. `info` or `zeotemp=debug`.
    pub log_level: Option<String>,
    /// Paths; relative ones are relative to the working directory.
    pub tls_certificate: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// `HOST:PORT` of the Prometheus endpoint (off when unset).
    pub metrics_address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A unix file mode from octal digits (`"660"`, `"0660"`, `"0o660"`).
fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    let digits = s.trim().trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(ConfigError::Invalid(format!(
            "unix-socket-mode {s:?} is not a file mode in octal such as 0660"
        ))),
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Applies the file's settings on top of `cfg`.
    pub fn apply(&self, cfg: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = &self.address {
            cfg.addresses = v.clone();
        }
        if let Some(v) = &self.storage {
            cfg.storages = v.clone();
        }
        if let Some(v) = self.read_only {
            cfg.read_only = v;
        }
        if let Some(v) = self.msgpack {
            cfg.msgpack = v;
        }
        if let Some(v) = self.shutdown_grace {
            cfg.shutdown_grace = Duration::from_secs(v);
        }
        if let Some(v) = self.frame_timeout {
            cfg.frame_timeout = Duration::from_secs(v);
        }
        if let Some(v) = &self.unix_socket_mode {
            cfg.unix_socket_mode = Some(parse_mode(v)?);
        }
        if let Some(v) = self.transaction_timeout {
            cfg.transaction_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.invalidation_queue_size {
            cfg.invalidation_queue_size = v;
        }
        if let Some(v) = self.max_frame_size {
            cfg.max_frame_size = v;
        }
        if let Some(v) = self.max_outbox_bytes {
            cfg.max_outbox_bytes = v;
        }
        if let Some(v) = self.read_pause_bytes {
            cfg.read_pause_bytes = v;
        }
        if let Some(v) = self.max_transaction_bytes {
            cfg.max_transaction_bytes = v;
        }
        if let Some(v) = self.max_connections {
            cfg.max_connections = v;
        }
        if let Some(v) = self.max_nesting_depth {
            cfg.max_nesting_depth = v;
        }
        if let Some(v) = self.max_message_items {
            cfg.max_message_items = v;
        }
        if let Some(v) = self.threads {
            cfg.threads = v;
        }
        if let Some(v) = self.history_retention {
            cfg.history_retention = Duration::from_secs(v);
        }
        if let Some(v) = self.gc_interval {
            cfg.gc_interval = Duration::from_secs(v);
        }
        if let Some(v) = self.memory_limit {
            cfg.memory_limit = (v > 0).then_some(v);
        }
        if let Some(v) = &self.tls_certificate {
            cfg.tls_certificate = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            cfg.tls_key = Some(v.clone());
        }
        if let Some(v) = &self.tls_client_ca {
            cfg.tls_client_ca = Some(v.clone());
        }
        if let Some(v) = &self.metrics_address {
            cfg.metrics_address = Some(v.clone());
        }
        if self.client_conflict_resolution == Some(false) {
            return Err(ConfigError::Invalid(
                "client-conflict-resolution = false is not possible: zeotemp never unpickles \
                 application data, so clients always resolve conflicts"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `n` bytes for people: `512 B`, `64 MiB`, `11.8 GiB`.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Config {
    /// The settings in one line for people: what is served and every limit
    /// (the start-up line and `--check-config` print it).
    pub fn summary(&self) -> String {
        let secs = |d: Duration| format!("{} s", d.as_secs());
        let storages = self
            .storages
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let memory = match self.memory_limit {
            Some(m) => human_bytes(m),
            None => "no limit".into(),
        };
        let mut extras = String::new();
        if self.msgpack {
            extras.push_str(", announcing msgpack (M5)");
        }
        if let Some(a) = &self.metrics_address {
            extras.push_str(&format!(", metrics-address {a}"));
        }
        format!(
            "storage{} {storages}{}{}; memory {memory} per storage, history {}, gc every {}; \
             limits: {} connections, frame {}, transaction {}, outbox {} (read pause {}), \
             nesting {}, {} values per message; timeouts: transaction {}, frame {}, shutdown {}; \
             {} thread{}",
            if self.storages.len() == 1 { "" } else { "s" },
            if self.read_only { " (read-only)" } else { "" },
            extras,
            secs(self.history_retention),
            secs(self.gc_interval),
            self.max_connections,
            human_bytes(self.max_frame_size),
            human_bytes(self.max_transaction_bytes),
            human_bytes(self.max_outbox_bytes),
            human_bytes(crate::session::outbox::effective_read_pause(
                self.max_outbox_bytes,
                self.read_pause_bytes
            )),
            self.max_nesting_depth,
            self.max_message_items,
            secs(self.transaction_timeout),
            secs(self.frame_timeout),
            secs(self.shutdown_grace),
            self.threads,
            if self.threads == 1 { "" } else { "s" },
        )
    }

    /// Checks settings that would make the server useless or unsafe.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.addresses.is_empty() {
            return Err(ConfigError::Invalid("no address to listen on".into()));
        }
        if self.storages.is_empty() {
            return Err(ConfigError::Invalid("no storage to serve".into()));
        }
        let mut names = self.storages.clone();
        names.sort();
        names.dedup();
        if names.len() != self.storages.len() {
            return Err(ConfigError::Invalid("a storage name is given twice".into()));
        }
        if self.threads == 0 {
            return Err(ConfigError::Invalid("threads must be at least 1".into()));
        }
        if self.max_frame_size < 1024 {
            return Err(ConfigError::Invalid(
                "max-frame-size must be at least 1024 bytes".into(),
            ));
        }
        if self.max_outbox_bytes < self.max_frame_size {
            return Err(ConfigError::Invalid(
                "max-outbox-bytes must be at least max-frame-size (a reply must fit)".into(),
            ));
        }
        if self.max_nesting_depth < MIN_NESTING_DEPTH {
            return Err(ConfigError::Invalid(format!(
                "max-nesting-depth must be at least {MIN_NESTING_DEPTH} (stock clients' messages nest up to 4 levels)"
            )));
        }
        if self.max_message_items < MIN_MESSAGE_ITEMS {
            return Err(ConfigError::Invalid(format!(
                "max-message-items must be at least {MIN_MESSAGE_ITEMS} (a stock client's message has a few dozen values; \
                 a tpc_begin extension or a getInvalidations list more)"
            )));
        }
        if self.read_pause_bytes < MIN_READ_PAUSE_BYTES {
            return Err(ConfigError::Invalid(format!(
                "read-pause-bytes must be at least {MIN_READ_PAUSE_BYTES} (a few replies must fit)"
            )));
        }
        if self.gc_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "gc-interval must be at least 1 second".into(),
            ));
        }
        if self.transaction_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "transaction-timeout must be at least 1 second".into(),
            ));
        }
        if self.frame_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "frame-timeout must be at least 1 second".into(),
            ));
        }
        // The files themselves are read and checked at startup
        // (`tls::load`).
        match (&self.tls_certificate, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "tls-certificate needs tls-key (the certificate's private key)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "tls-key needs tls-certificate (the certificate it belongs to)".into(),
                ));
            }
            _ => {}
        }
        if let Some(a) = &self.metrics_address {
            let port_ok = a
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok || a.contains('/') {
                return Err(ConfigError::Invalid(format!(
                    "metrics-address {a:?} is not HOST:PORT (e.g. 127.0.0.1:9101; TCP only)"
                )));
            }
        }
        if self.tls_client_ca.is_some() && self.tls_certificate.is_none() {
            return Err(ConfigError::Invalid(
                "tls-client-ca needs tls-certificate and tls-key (client certificates are \
                 checked in the TLS handshake)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/zeotemp.toml");
        let file = FileConfig::load(&path).unwrap();
        let mut cfg = Config::default();
        file.apply(&mut cfg).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.addresses, vec!["127.0.0.1:8101".to_string()]);
        assert_eq!(cfg.storages, vec!["1".to_string()]);
        assert_eq!(
            cfg.gc_interval,
            Duration::from_secs(DEFAULT_GC_INTERVAL_SECS)
        );
        assert_eq!(cfg.threads, DEFAULT_THREADS);
        // Every setting is explained in the example (memory-limit commented out).
        let text = std::fs::read_to_string(&path).unwrap();
        for key in [
            "address",
            "storage",
            "read-only",
            "msgpack",
            "transaction-timeout",
            "invalidation-queue-size",
            "history-retention",
            "gc-interval",
            "memory-limit",
            "max-frame-size",
            "max-outbox-bytes",
            "max-transaction-bytes",
            "max-connections",
            "read-pause-bytes",
            "shutdown-grace",
            "max-nesting-depth",
            "max-message-items",
            "threads",
            "frame-timeout",
            "unix-socket-mode",
            "client-conflict-resolution",
            "log-level",
            "tls-certificate",
            "tls-key",
            "tls-client-ca",
            "metrics-address",
        ] {
            assert!(
                text.contains(&format!("{key} =")),
                "{key} is in config/zeotemp.toml"
            );
        }
    }

    #[test]
    fn decode_limits_have_floors() {
        let file: FileConfig =
            toml::from_str("max-nesting-depth = 16\nmax-message-items = 5000").unwrap();
        let mut cfg = Config::default();
        file.apply(&mut cfg).unwrap();
        assert_eq!((cfg.max_nesting_depth, cfg.max_message_items), (16, 5000));
        cfg.validate().unwrap();
        for (depth, items, complaint) in [
            (
                MIN_NESTING_DEPTH - 1,
                MAX_MESSAGE_ITEMS,
                "max-nesting-depth",
            ),
            (
                MAX_NESTING_DEPTH,
                MIN_MESSAGE_ITEMS - 1,
                "max-message-items",
            ),
        ] {
            let cfg = Config {
                max_nesting_depth: depth,
                max_message_items: items,
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(complaint), "{err}");
        }
    }

    #[test]
    fn summary_names_what_is_served_and_every_limit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        let cfg = Config {
            storages: vec!["1".into(), "temp".into()],
            memory_limit: Some(1 << 30),
            ..Config::default()
        };
        let s = cfg.summary();
        for part in [
            "storages \"1\", \"temp\";",
            "memory 1 GiB per storage",
            "history 60 s",
            "10000 connections",
            "frame 64 MiB",
            "transaction 512 MiB",
            "outbox 256 MiB (read pause 1 MiB)",
            "nesting 64",
            "100000 values per message",
            "timeouts: transaction 30 s, frame 60 s, shutdown 5 s",
            "1 thread",
        ] {
            assert!(s.contains(part), "{part:?} not in {s:?}");
        }
        let ro = Config {
            read_only: true,
            memory_limit: None,
            ..Config::default()
        };
        assert!(
            ro.summary()
                .starts_with("storage \"1\" (read-only); memory no limit")
        );
    }

    #[test]
    fn msgpack_is_off_by_default() {
        assert!(!Config::default().msgpack);
        let file: FileConfig = toml::from_str("msgpack = true").unwrap();
        let mut cfg = Config::default();
        file.apply(&mut cfg).unwrap();
        assert!(cfg.msgpack);
        cfg.validate().unwrap();
        let file: FileConfig = toml::from_str("msgpack = false").unwrap();
        file.apply(&mut cfg).unwrap();
        assert!(!cfg.msgpack);
    }

    #[test]
    fn memory_limit_zero_means_none() {
        let file: FileConfig = toml::from_str("memory-limit = 0").unwrap();
        let mut cfg = Config::default();
        file.apply(&mut cfg).unwrap();
        assert_eq!(cfg.memory_limit, None);
        let file: FileConfig = toml::from_str("memory-limit = 1000000").unwrap();
        file.apply(&mut cfg).unwrap();
        assert_eq!(cfg.memory_limit, Some(1_000_000));
    }

    #[test]
    fn unknown_key_refused() {
        let err = toml::from_str::<FileConfig>("adress = ['x']").unwrap_err();
        assert!(err.to_string().contains("adress"), "{err}");
    }

    #[test]
    fn unix_socket_mode_is_octal() {
        for (text, want) in [("0660", 0o660), ("660", 0o660), ("0o600", 0o600)] {
            let file: FileConfig = toml::from_str(&format!("unix-socket-mode = {text:?}")).unwrap();
            let mut cfg = Config::default();
            file.apply(&mut cfg).unwrap();
            assert_eq!(cfg.unix_socket_mode, Some(want));
        }
        for bad in ["rw-rw----", "0999", "1777777"] {
            let file: FileConfig = toml::from_str(&format!("unix-socket-mode = {bad:?}")).unwrap();
            assert!(file.apply(&mut Config::default()).is_err(), "{bad}");
        }
    }

    #[test]
    fn metrics_address_is_off_by_default_and_host_port() {
        assert_eq!(Config::default().metrics_address, None);
        let file: FileConfig = toml::from_str("metrics-address = '127.0.0.1:9101'").unwrap();
        let mut cfg = Config::default();
        file.apply(&mut cfg).unwrap();
        assert_eq!(cfg.metrics_address.as_deref(), Some("127.0.0.1:9101"));
        cfg.validate().unwrap();
        for good in ["[::1]:0", "localhost:9101"] {
            let cfg = Config {
                metrics_address: Some(good.into()),
                ..Config::default()
            };
            cfg.validate().unwrap();
        }
        for bad in [
            "9101",
            "127.0.0.1",
            ":9101",
            "127.0.0.1:99999",
            "/run/metrics.sock",
        ] {
            let cfg = Config {
                metrics_address: Some(bad.into()),
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("metrics-address"), "{bad}: {err}");
        }
    }

    #[test]
    fn ccr_false_refused() {
        let file: FileConfig = toml::from_str("client-conflict-resolution = false").unwrap();
        assert!(file.apply(&mut Config::default()).is_err());
    }

    #[test]
    fn validate_catches_nonsense() {
        let cfg = Config {
            storages: vec!["1".into(), "1".into()],
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = Config {
            max_frame_size: 10,
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = Config {
            threads: 0,
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
        Config::default().validate().unwrap();
    }

    #[test]
    fn tls_certificate_and_key_go_together() {
        let file: FileConfig = toml::from_str(
            "tls-certificate = 'c.pem'\ntls-key = 'k.pem'\ntls-client-ca = 'ca.pem'",
        )
        .unwrap();
        let mut cfg = Config::default();
        file.apply(&mut cfg).unwrap();
        assert_eq!(cfg.tls_certificate, Some(PathBuf::from("c.pem")));
        assert_eq!(cfg.tls_key, Some(PathBuf::from("k.pem")));
        assert_eq!(cfg.tls_client_ca, Some(PathBuf::from("ca.pem")));
        cfg.validate().unwrap();
        for (cert, key, ca, complaint) in [
            (true, false, false, "tls-certificate needs tls-key"),
            (false, true, false, "tls-key needs tls-certificate"),
            (false, false, true, "tls-client-ca needs tls-certificate"),
            (true, false, true, "tls-certificate needs tls-key"),
        ] {
            let cfg = Config {
                tls_certificate: cert.then(|| "c.pem".into()),
                tls_key: key.then(|| "k.pem".into()),
                tls_client_ca: ca.then(|| "ca.pem".into()),
                ..Config::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(complaint), "{err}");
        }
    }
}
