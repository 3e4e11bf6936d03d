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
//! A leaf: depends on nothing of this crate.

use std::fmt;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

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

#[cfg(test)]
mod tests {
    use super::*;

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
