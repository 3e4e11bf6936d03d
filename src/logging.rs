//! Where log lines go and how they are marked: `tracing` lines on stderr,
//! one per event. Under systemd, stderr is a stream to journald, which
//! reads a syslog priority prefix (`<3>`, `<4>`, `<6>`, `<7>`) at the
//! start of each line (`SyslogLevelPrefix=`, on by default), strips it and
//! stores the line at that priority. Without the prefix every line would
//! be stored at priority 6 (info), and `journalctl -p warning` would show
//! nothing. So when stderr *is* journald's stream, each line starts with
//! its priority, and the timestamp is left out (journald adds its own).
//!
//! "Is journald's stream" is what systemd documents for `JOURNAL_STREAM`:
//! the variable holds `device:inode` of the stream it connected, and it is
//! inherited by children whose stderr goes elsewhere, so it counts only
//! when it names the file stderr is (sd_journal_stream_fd(3),
//! systemd.exec(5) "$JOURNAL_STREAM").
//!
//! Warnings that can come in floods (refused connections and votes,
//! accept errors, failed TLS handshakes, faulty disconnects) go through a
//! [`Repeated`]: the first one of a kind is a WARN at once, those within
//! `log-repeat-interval` (10 s) after it only DEBUG lines, and the next WARN
//! after the interval says how many were held back. One refusal per vote
//! at a small memory limit made 82,493 WARN lines in a soak, and journald's
//! rate limit then drops *other* lines; the metrics still count every event.
//!
//! Depends only on `config` (the interval's default).

use std::fmt;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// The syslog priority journald stores a line at: ERROR is `err` (3),
/// WARN `warning` (4), INFO `info` (6), DEBUG and TRACE `debug` (7).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// True if `journal_stream` (the value of `JOURNAL_STREAM`) names the
/// file whose device and inode are `dev` and `ino`. A malformed value
/// names nothing.
pub fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// True if this process's stderr is the stream systemd connected to
/// journald.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(value) = value.to_str() else {
        return false;
    };
    // fstat(2) through an owned duplicate of fd 2: no unsafe needed.
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => names_stream(value, meta.dev(), meta.ino()),
        Err(_) => false,
    }
}

/// Prints one line of the command line's own output on stderr (a
/// configuration error before logging starts, for example), marked
/// `priority` when stderr is journald's stream.
pub fn eprint_line(priority: u8, line: &str) {
    if stderr_is_journal() {
        eprintln!("<{priority}>{line}");
    } else {
        eprintln!("{line}");
    }
}

/// Starts logging to stderr with `filter`: with the syslog priority
/// prefix and no timestamp under journald; else with timestamps, and
/// colours on a terminal only (log files get plain text).
pub fn init(filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if stderr_is_journal() {
        builder
            .with_ansi(false)
            .event_format(Prioritized(format::format().without_time()))
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// A line format `F` with the event's syslog priority in front.
pub struct Prioritized<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// After a warning of one kind, further ones of that kind within this long
/// are logged at DEBUG only (counted); the next WARN after it says how many
/// there were: the `log-repeat-interval` setting (its default,
/// [`crate::config::DEFAULT_LOG_REPEAT_INTERVAL_SECS`], until the server
/// sets it with [`set_repeat_interval`]), in milliseconds.
static WARN_REPEAT_INTERVAL_MS: AtomicU64 =
    AtomicU64::new(crate::config::DEFAULT_LOG_REPEAT_INTERVAL_SECS * 1000);

/// Sets how long warnings of one kind are held back after one
/// (`log-repeat-interval`; zero holds nothing back).
pub fn set_repeat_interval(interval: Duration) {
    let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    WARN_REPEAT_INTERVAL_MS.store(ms, Ordering::Relaxed);
}

/// The interval [`Repeated::warn`] uses now.
pub fn repeat_interval() -> Duration {
    Duration::from_millis(WARN_REPEAT_INTERVAL_MS.load(Ordering::Relaxed))
}

/// Logs a warning of one kind through its own [`Repeated`] (a `static` per
/// call site): a WARN with what was held back appended, or, within the
/// interval after the last one, the same line at DEBUG. Fields go in
/// brackets, then the message:
///
/// ```
/// let peer = "127.0.0.1:4242";
/// zeotemp::warn_repeated!([%peer, max = 10,] "connection refused: max-connections reached");
/// ```
#[macro_export]
macro_rules! warn_repeated {
    ([$($field:tt)*] $fmt:literal $(, $arg:expr)* $(,)?) => {{
        static LIMIT: $crate::logging::Repeated = $crate::logging::Repeated::new();
        match LIMIT.warn() {
            Some(more) => ::tracing::warn!($($field)* "{}{}", format_args!($fmt $(, $arg)*), more),
            None => ::tracing::debug!($($field)* $fmt $(, $arg)*),
        }
    }};
}

/// Rate limit of one kind of warning (one `static` per kind, see the module
/// docs; [`warn_repeated!`](crate::warn_repeated) makes one per call
/// site). Lock-free: two atomics, taken on the hot refusal paths.
#[derive(Debug)]
pub struct Repeated {
    /// When the last WARN was, in milliseconds since [`epoch`], plus one
    /// (0: never).
    last: AtomicU64,
    /// Events held back since the last WARN.
    held: AtomicU64,
}

/// What a WARN line of a [`Repeated`] adds to its text: nothing, or
/// ` (and N more like it in the last S s, at debug level)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldBack {
    /// How many were logged at DEBUG only since the previous WARN.
    pub count: u64,
    /// Since the previous WARN.
    pub since: Duration,
}

impl fmt::Display for HeldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return Ok(());
        }
        write!(
            f,
            " (and {} more like it in the last {} s, at debug level)",
            self.count,
            self.since.as_secs()
        )
    }
}

/// The instant [`Repeated`] counts its milliseconds from (the first use).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Repeated {
    pub const fn new() -> Repeated {
        Repeated {
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether this event is logged as a WARN now: `Some` with what was
    /// held back before it (append it to the line), or `None` (counted; log
    /// it at DEBUG).
    pub fn warn(&self) -> Option<HeldBack> {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.warn_at(now, repeat_interval())
    }

    /// [`Repeated::warn`] at `now` (milliseconds on any monotonic clock),
    /// with `interval` between WARNs: the clock is injected for tests.
    ///
    /// Of threads racing past the interval, one wins the exchange and
    /// warns; the others count as held back. An event counted between the
    /// exchange and the swap of the count lands in this WARN's count
    /// instead of the next one's: the total is right either way.
    pub fn warn_at(&self, now: u64, interval: Duration) -> Option<HeldBack> {
        let interval = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let last = self.last.load(Ordering::Acquire);
        let due = last == 0 || now.saturating_add(1).saturating_sub(last) >= interval;
        if due
            && self
                .last
                .compare_exchange(
                    last,
                    now.saturating_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let count = self.held.swap(0, Ordering::AcqRel);
            let since = Duration::from_millis(now.saturating_add(1).saturating_sub(last));
            return Some(HeldBack { count, since });
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Repeated {
    fn default() -> Repeated {
        Repeated::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_S: Duration = Duration::from_secs(10);

    #[test]
    fn the_first_warns_then_repeats_are_held_back_and_counted() {
        let r = Repeated::new();
        let first = r.warn_at(5_000, TEN_S).expect("the first one warns");
        assert_eq!(first.count, 0);
        assert_eq!(first.to_string(), "", "nothing to add to the first");
        for t in [5_000, 5_001, 9_000, 14_999] {
            assert_eq!(r.warn_at(t, TEN_S), None, "at {t} ms: held back");
        }
        // The interval is over: a WARN saying how many were held back.
        let next = r.warn_at(15_000, TEN_S).expect("warns after the interval");
        assert_eq!(next.count, 4);
        assert_eq!(next.since, TEN_S);
        assert_eq!(
            next.to_string(),
            " (and 4 more like it in the last 10 s, at debug level)"
        );
        // And the count starts again.
        assert_eq!(r.warn_at(15_001, TEN_S), None);
        let later = r.warn_at(60_000, TEN_S).unwrap();
        assert_eq!((later.count, later.since.as_secs()), (1, 45));
    }

    #[test]
    fn a_first_event_at_clock_zero_warns_and_starts_the_interval() {
        let r = Repeated::new();
        assert!(r.warn_at(0, TEN_S).is_some());
        assert_eq!(r.warn_at(1, TEN_S), None);
        assert_eq!(r.warn_at(9_999, TEN_S).map(|h| h.count), None);
        assert_eq!(r.warn_at(10_000, TEN_S).map(|h| h.count), Some(2));
    }

    #[test]
    fn kinds_are_limited_apart() {
        let (a, b) = (Repeated::new(), Repeated::new());
        assert!(a.warn_at(100, TEN_S).is_some());
        assert!(b.warn_at(101, TEN_S).is_some(), "another kind still warns");
        assert_eq!(a.warn_at(102, TEN_S), None);
    }

    #[test]
    fn racing_threads_warn_once_and_lose_no_count() {
        let r = Repeated::new();
        let warned: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| (0..1000).filter(|_| r.warn_at(7, TEN_S).is_some()).count() as u64)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(warned, 1, "one WARN for 4000 events at one instant");
        let next = r.warn_at(7 + 10_000, TEN_S).unwrap();
        assert_eq!(next.count, 3999);
    }

    #[test]
    fn the_real_clock_warns_first_then_holds_back() {
        let r = Repeated::new();
        assert!(r.warn().is_some());
        // (10 s cannot pass between these two calls.)
        assert_eq!(r.warn(), None);
    }

    #[test]
    fn priorities_are_syslogs() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }

    #[test]
    fn journal_stream_must_name_this_file() {
        assert!(names_stream("8:1234", 8, 1234));
        assert!(names_stream("8:1234\n", 8, 1234));
        assert!(!names_stream("8:1235", 8, 1234));
        assert!(!names_stream("9:1234", 8, 1234));
        for bad in ["", ":", "8", "8:", ":1234", "x:1234", "8:1234:5", "-8:1234"] {
            assert!(!names_stream(bad, 8, 1234), "{bad:?}");
        }
    }
}
