//! ZODB's identifiers: object ids ([`Oid`]) and transaction ids ([`Tid`]).
//!
//! Both travel as 8 big-endian bytes. A tid is a ZODB *TimeStamp*: the high
//! 32 bits count minutes since 1900-01-01 00:00 UTC with every month taken as
//! 31 days, the low 32 bits are the seconds within that minute scaled by
//! 2³²/60 (`persistent.timestamp._makeRaw`). Clients show tids as dates and
//! refuse a server whose tids go backwards, so [`Clock::next_tid_after`] only
//! grows.

use std::fmt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// An 8-byte ZODB object id. Oid 0 is the root object.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Oid(pub u64);

/// An 8-byte ZODB transaction id (also called serial), a TimeStamp.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tid(pub u64);

impl Oid {
    /// The root object, which every storage has from its start.
    pub const ROOT: Oid = Oid(0);

    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Reads an oid from exactly 8 bytes; anything else is not an oid.
    pub fn from_slice(b: &[u8]) -> Option<Oid> {
        Some(Oid(u64::from_be_bytes(b.try_into().ok()?)))
    }
}

impl Tid {
    /// `z64`: "no revision yet" (the serial a client sends for a new object).
    pub const ZERO: Tid = Tid(0);
    /// `ZODB.utils.maxtid`, what `ClientStorage.load` asks `loadBefore` for.
    pub const MAX: Tid = Tid(0x7fff_ffff_ffff_ffff);

    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub fn from_slice(b: &[u8]) -> Option<Tid> {
        Some(Tid(u64::from_be_bytes(b.try_into().ok()?)))
    }

    /// The TimeStamp of a moment given as seconds since the Unix epoch (UTC).
    pub fn from_unix_time(secs: f64) -> Tid {
        let secs = secs.max(0.0);
        let whole = secs.floor() as i64;
        let days = whole.div_euclid(86_400);
        let in_day = whole.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (hour, minute) = (in_day / 3600, (in_day % 3600) / 60);
        let second = (in_day % 60) as f64 + (secs - whole as f64);
        let high = ((((y - 1900) * 12 + m - 1) * 31 + d - 1) * 24 + hour) * 60 + minute;
        // persistent: b = int(second / (60 / 2**32)), truncated.
        let low = ((second * (4_294_967_296.0 / 60.0)) as u64).min(0xffff_ffff);
        Tid(((high as u64) << 32) | low)
    }

    /// Seconds since the Unix epoch that this TimeStamp stands for
    /// (`TimeStamp.timeTime()`); used for `history`'s `time` field.
    pub fn to_unix_time(self) -> f64 {
        let high = (self.0 >> 32) as i64;
        let low = (self.0 & 0xffff_ffff) as f64;
        let minute = high % 60;
        let hours = high / 60;
        let hour = hours % 24;
        let days31 = hours / 24;
        let d = days31 % 31 + 1;
        let months = days31 / 31;
        let m = months % 12 + 1;
        let y = months / 12 + 1900;
        let days = days_from_civil(y, m, d);
        (days * 86_400 + hour * 3600 + minute * 60) as f64 + low * (60.0 / 4_294_967_296.0)
    }

    /// The TimeStamp of the current wall-clock time (read at start-up; a
    /// running storage goes by its [`Clock`]).
    pub fn now() -> Tid {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Tid::from_unix_time(secs)
    }
}

/// The time a running server goes by: the wall clock read once, at
/// start-up, plus the monotonic time elapsed since.
///
/// A step of the system clock during a run (a machine that booted with a
/// fast clock and was corrected by NTP, an operator's `date -s`) neither
/// moves it back nor makes it jump: tids keep growing at the pace of real
/// time, oids never run ahead of it, retention and the collector keep
/// counting real seconds. Nothing ever waits for the wall clock to catch
/// up. It departs from the wall clock only by the monotonic clock's rate
/// error and by the steps it ignores; the next start reads the wall clock
/// again (README, "Restarts and the clock").
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Unix time (seconds) at `start`.
    unix_at_start: f64,
    start: Instant,
}

impl Clock {
    /// A clock that reads `start` now and runs on from it.
    pub fn starting_at(start: Tid) -> Clock {
        Clock {
            unix_at_start: start.to_unix_time(),
            start: Instant::now(),
        }
    }

    /// Seconds since the Unix epoch, as this clock tells them.
    pub fn unix_secs(&self) -> f64 {
        self.unix_at_start + self.start.elapsed().as_secs_f64()
    }

    /// The TimeStamp of now.
    pub fn now(&self) -> Tid {
        Tid::from_unix_time(self.unix_secs())
    }

    /// The tid for a new transaction: now if that is later than `last`,
    /// else one tick after `last` (ZODB's `newTid` / `laterThan`).
    pub fn next_tid_after(&self, last: Tid) -> Tid {
        let now = self.now();
        if now > last { now } else { Tid(last.0 + 1) }
    }
}

/// `time.ctime()` of a Unix time in UTC, e.g. `Thu Nov 26 12:00:00 2026`
/// (ZEO's `server_status` reports its start time this way).
pub fn ctime(unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(m - 1) as usize],
        d,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        y
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01; inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Oid(0x{:x})", self.0)
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:016x}", self.0)
    }
}

impl fmt::Debug for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tid({:016x})", self.0)
    }
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_matches_persistent() {
        // persistent.TimeStamp(2026, 11, 26, 12, 0, 0.0).raw() == 040d45ed00000000
        // (high word: ((126*12+10)*31+25)*24*60+12*60).
        let secs = 1_795_694_400.0; // 2026-11-26 12:00:00 UTC
        let tid = Tid::from_unix_time(secs);
        assert_eq!(
            tid.0 >> 32,
            ((((126 * 12 + 10) * 31 + 25) * 24 + 12) * 60) as u64
        );
        assert_eq!(tid.0 & 0xffff_ffff, 0);
        assert!((tid.to_unix_time() - secs).abs() < 1e-6);
    }

    #[test]
    fn captured_tid_decodes_to_capture_day() {
        // A tid from fixtures/zeo5-py3/06 (captured on 2026-11-26 UTC).
        let tid = Tid(0x040d45eb4db70499);
        let t = tid.to_unix_time();
        assert!((1_795_651_200.0..1_795_737_600.0).contains(&t), "{t}");
        // Round trip within one TimeStamp tick.
        assert!(Tid::from_unix_time(t).0.abs_diff(tid.0) <= 1);
    }

    #[test]
    fn half_minute_is_half_the_low_word() {
        let tid = Tid::from_unix_time(1_795_694_430.0);
        assert_eq!(tid.0 & 0xffff_ffff, 0x8000_0000);
    }

    #[test]
    fn next_tid_only_grows() {
        let clock = Clock::starting_at(Tid::now());
        let far_future = Tid(Tid::now().0 + (1 << 40));
        assert_eq!(clock.next_tid_after(far_future), Tid(far_future.0 + 1));
        let now = clock.next_tid_after(Tid::ZERO);
        assert!(now > Tid::ZERO);
        assert!(clock.next_tid_after(now) > now);
    }

    #[test]
    fn clock_runs_on_from_its_start() {
        // A start an hour in the past (as after the system clock stepped
        // forward by an hour): the clock counts on from there.
        let start = Tid::from_unix_time(Clock::starting_at(Tid::now()).unix_secs() - 3600.0);
        let clock = Clock::starting_at(start);
        let a = clock.now();
        assert!(a >= Tid(start.0.saturating_sub(100)) && a < Tid::now());
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(clock.now() > a);
    }

    #[test]
    fn ctime_like_python() {
        // time.ctime(1795694400) in UTC
        assert_eq!(ctime(1_795_694_400), "Thu Nov 26 12:00:00 2026");
        assert_eq!(ctime(0), "Thu Jan  1 00:00:00 1970");
    }

    #[test]
    fn oid_bytes() {
        assert_eq!(Oid::from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]), Some(Oid(0x102)));
        assert_eq!(Oid::from_slice(&[1, 2]), None);
        assert_eq!(Oid(7).to_bytes(), [0, 0, 0, 0, 0, 0, 0, 7]);
    }
}
