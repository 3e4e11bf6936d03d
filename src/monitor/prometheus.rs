//! The Prometheus text exposition format (version 0.0.4) of the server's
//! figures; [`http`](super::http) serves it.
//!
//! Names are prefixed `zeotemp_`, counters end in `_total`, sizes are in
//! bytes and durations in seconds; per-storage series carry the label
//! `storage="NAME"`, refusals and faults the label `reason` (a small fixed
//! set, each exported from the start at 0), per-class series also
//! `class="module.name"` (for the `class-table-size` biggest classes and
//! `(other)`: bounded cardinality; class names are client data, escaped and
//! at most `refs::MAX_CLASS_NAME_BYTES` long). The process's own figures
//! are the standard `process_*` metrics of the Prometheus clients (no
//! prefix). [`render`] is a pure function of a [`Snapshot`].

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use super::figures::{AllocationCounts, ProcessFigures, Snapshot, StorageFigures};

/// `Content-Type` of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A sample value: integers print exactly, floats as Prometheus reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Int(u64),
    Float(f64),
}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Num::Int(i) => write!(f, "{i}"),
            Num::Float(x) if x.is_nan() => f.write_str("NaN"),
            Num::Float(x) if x.is_infinite() => f.write_str(if x > 0.0 { "+Inf" } else { "-Inf" }),
            Num::Float(x) => write!(f, "{x}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

/// A label value as the text format wants it: `\`, `"` and newlines
/// escaped.
pub fn escape_label_value(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    let mut out = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.into()
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: Kind, help: &str) {
    let kind = match kind {
        Kind::Gauge => "gauge",
        Kind::Counter => "counter",
    };
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

fn sample(out: &mut String, name: &str, label: Option<(&str, &str)>, v: Num) {
    match label {
        Some(l) => samples(out, name, &[l], v),
        None => {
            let _ = writeln!(out, "{name} {v}");
        }
    }
}

/// A sample with any number of labels.
fn samples(out: &mut String, name: &str, labels: &[(&str, &str)], v: Num) {
    out.push_str(name);
    for (i, (k, val)) in labels.iter().enumerate() {
        let sep = if i == 0 { '{' } else { ',' };
        let _ = write!(out, "{sep}{k}=\"{}\"", escape_label_value(val));
    }
    if !labels.is_empty() {
        out.push('}');
    }
    let _ = writeln!(out, " {v}");
}

/// The server-wide counters per reason: name, help, the snapshot's counts.
type PerReason = fn(&Snapshot) -> &[(&'static str, u64)];

static REASON_FAMILIES: &[(&str, &str, PerReason)] = &[
    (
        "zeotemp_connections_refused_total",
        "Connections refused at accept, by reason: max-connections (the limit was reached), accept-error (accept failed, e.g. out of file descriptors).",
        |s| &s.connections_refused,
    ),
    (
        "zeotemp_tls_handshake_failures_total",
        "TLS handshakes that failed, by reason: error (a TLS error: plain text, a refused or missing client certificate), timeout (not completed within frame-timeout).",
        |s| &s.tls_handshake_failures,
    ),
    (
        "zeotemp_disconnects_total",
        "Connections ended, by reason: client, slow-client (over max-outbox-bytes), transaction-timeout, frame-timeout, protocol-error, tls-handshake, ruok (a probe answered), shutdown (also cut off at shutdown-grace), internal-error (the connection's task failed: a bug).",
        |s| &s.disconnects,
    ),
];

type Figure = fn(&StorageFigures) -> Option<Num>;

/// The per-class families (gauges): name, help, value of a row.
type ClassFigure = fn(&crate::storage::ClassRow) -> u64;
static CLASS_FAMILIES: &[(&str, &str, ClassFigure)] = &[
    (
        "zeotemp_class_objects",
        "Objects whose current record is of the class, for the class-table-size classes holding the most bytes; class=\"(other)\" sums the rest.",
        |c| c.objects,
    ),
    (
        "zeotemp_class_bytes",
        "Bytes of the current records of the class's objects (they add up to zeotemp_current_bytes with class=\"(other)\").",
        |c| c.bytes,
    ),
];

fn int(n: usize) -> Option<Num> {
    Some(Num::Int(n as u64))
}

/// The per-storage families: name, type, help, value (`None`: no sample).
static STORAGE_FAMILIES: &[(&str, Kind, &str, Figure)] = &[
    (
        "zeotemp_storage_connections",
        Kind::Gauge,
        "Client connections registered with the storage (server_status connections).",
        |s| int(s.connections),
    ),
    (
        "zeotemp_objects",
        Kind::Gauge,
        "Objects in the storage, deleted ones with retained history included (len(storage)).",
        |s| int(s.objects),
    ),
    (
        "zeotemp_current_bytes",
        Kind::Gauge,
        "Bytes of the objects' current records (getSize).",
        |s| int(s.current_bytes),
    ),
    (
        "zeotemp_retained_bytes",
        Kind::Gauge,
        "Bytes of all retained records, current and replaced.",
        |s| int(s.retained_bytes),
    ),
    (
        "zeotemp_accounted_bytes",
        Kind::Gauge,
        "Bytes the storage is accounted for (records, references, bookkeeping); the sum over all storages is held under zeotemp_accounted_limit_bytes.",
        |s| int(s.accounted_bytes),
    ),
    (
        "zeotemp_revisions",
        Kind::Gauge,
        "Object revisions retained, current and replaced.",
        |s| int(s.revisions),
    ),
    (
        "zeotemp_last_transaction_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the storage's last transaction id.",
        |s| Some(Num::Float(s.last_tid.to_unix_time())),
    ),
    (
        "zeotemp_loads_total",
        Kind::Counter,
        "Object loads (loadBefore, loadSerial).",
        |s| Some(Num::Int(s.loads)),
    ),
    (
        "zeotemp_stores_total",
        Kind::Counter,
        "Object stores sent by transactions (storea; deletes are not counted, as in ZEO's server_status).",
        |s| Some(Num::Int(s.stores)),
    ),
    (
        "zeotemp_commits_total",
        Kind::Counter,
        "Transactions committed.",
        |s| Some(Num::Int(s.commits)),
    ),
    (
        "zeotemp_aborts_total",
        Kind::Counter,
        "Transactions aborted.",
        |s| Some(Num::Int(s.aborts)),
    ),
    (
        "zeotemp_conflicts_total",
        Kind::Counter,
        "Write conflicts found at vote (handed to clients to resolve, or refused).",
        |s| Some(Num::Int(s.conflicts)),
    ),
    (
        "zeotemp_conflicts_resolved_total",
        Kind::Counter,
        "Conflicts that clients resolved and then committed.",
        |s| Some(Num::Int(s.conflicts_resolved)),
    ),
    (
        "zeotemp_active_transactions",
        Kind::Gauge,
        "Transactions begun and not yet finished or aborted.",
        |s| Some(Num::Int(s.active_transactions)),
    ),
    (
        "zeotemp_commit_lock_waiters",
        Kind::Gauge,
        "Votes waiting for the storage's commit lock.",
        |s| int(s.lock_waiters),
    ),
    (
        "zeotemp_commit_lock_held_seconds",
        Kind::Gauge,
        "Seconds the current holder of the commit lock has held it (0 when free).",
        |s| Some(Num::Float(s.lock_held_seconds.unwrap_or(0.0))),
    ),
    (
        "zeotemp_gc_collections_total",
        Kind::Counter,
        "Garbage collection cycles completed.",
        |s| Some(Num::Int(s.gc_collections)),
    ),
    (
        "zeotemp_gc_freed_objects_total",
        Kind::Counter,
        "Unreachable objects freed by the garbage collector.",
        |s| Some(Num::Int(s.gc_freed_objects)),
    ),
    (
        "zeotemp_gc_longest_pause_seconds",
        Kind::Gauge,
        "Longest time the collector has held up loads and commits in one go, since the start.",
        |s| Some(Num::Float(s.gc_longest_pause_us as f64 / 1e6)),
    ),
    (
        "zeotemp_gc_last_pause_seconds",
        Kind::Gauge,
        "Longest time the last collection cycle held up loads and commits in one go.",
        |s| Some(Num::Float(s.gc_last_longest_pause_us as f64 / 1e6)),
    ),
    (
        "zeotemp_gc_last_collection_seconds",
        Kind::Gauge,
        "Duration of the last whole collection cycle.",
        |s| Some(Num::Float(s.gc_last_collection_us as f64 / 1e6)),
    ),
    (
        "zeotemp_unscannable_records",
        Kind::Gauge,
        "Retained records that could not be scanned for references; while there are any reachable ones, nothing is freed.",
        |s| int(s.unscannable_records),
    ),
];

/// The Prometheus text for `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::with_capacity(4096 + 2048 * snap.storages.len());
    server_families(&mut out, snap);
    for (name, help, counts) in REASON_FAMILIES {
        family(&mut out, name, Kind::Counter, help);
        for (reason, n) in counts(snap) {
            sample(&mut out, name, Some(("reason", reason)), Num::Int(*n));
        }
    }
    if let Some(p) = &snap.process {
        process_families(&mut out, p);
    }
    if let Some(a) = &snap.allocations {
        allocation_families(&mut out, a);
    }
    storage_families(&mut out, snap);
    out
}

/// The server's own gauges (build, uptime, connections, memory limit).
fn server_families(out: &mut String, snap: &Snapshot) {
    family(
        out,
        "zeotemp_build_info",
        Kind::Gauge,
        "The zeotemp version serving (always 1).",
    );
    sample(
        out,
        "zeotemp_build_info",
        Some(("version", &snap.version)),
        Num::Int(1),
    );
    let globals: [(&str, Kind, &str, Option<Num>); 8] = [
        (
            "zeotemp_start_time_seconds",
            Kind::Gauge,
            "Unix time the server started.",
            Some(Num::Float(snap.start_time)),
        ),
        (
            "zeotemp_uptime_seconds",
            Kind::Gauge,
            "Seconds since the server started.",
            Some(Num::Float(snap.uptime)),
        ),
        (
            "zeotemp_connections",
            Kind::Gauge,
            "Open ZEO client connections, all listeners (ruok probes and handshakes included).",
            Some(Num::Int(snap.connections as u64)),
        ),
        (
            "zeotemp_max_connections",
            Kind::Gauge,
            "The max-connections setting.",
            Some(Num::Int(snap.max_connections as u64)),
        ),
        (
            "zeotemp_storages",
            Kind::Gauge,
            "Storages served.",
            Some(Num::Int(snap.storages.len() as u64)),
        ),
        (
            "zeotemp_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the process (VmRSS; the same reading as process_resident_memory_bytes).",
            snap.resident_bytes.map(Num::Int),
        ),
        (
            "zeotemp_memory_limit_bytes",
            Kind::Gauge,
            "The memory-limit setting: resident memory the storages' data may take, all storages together (no sample when there is no limit).",
            snap.memory_limit.and_then(int),
        ),
        (
            "zeotemp_accounted_limit_bytes",
            Kind::Gauge,
            "Accounted bytes all storages together may hold under memory-limit (the rest is the allocator's overhead); a vote that would go over fails (no sample when there is no limit).",
            snap.accounted_limit.and_then(int),
        ),
    ];
    for (name, kind, help, value) in globals {
        family(out, name, kind, help);
        if let Some(v) = value {
            sample(out, name, None, v);
        }
    }
}

/// The per-storage families: one sample per storage, then the votes
/// refused per reason and the class table.
fn storage_families(out: &mut String, snap: &Snapshot) {
    for (name, kind, help, figure) in STORAGE_FAMILIES {
        family(out, name, *kind, help);
        for s in &snap.storages {
            if let Some(v) = figure(s) {
                sample(out, name, Some(("storage", &s.name)), v);
            }
        }
    }
    let name = "zeotemp_votes_refused_total";
    family(
        out,
        name,
        Kind::Counter,
        "Votes refused with an error, by reason: memory-limit (no room under memory-limit, even after dropping history and collecting), transaction-size (over max-transaction-bytes), unsupported (undo, blobs, restore). Conflicts are counted apart.",
    );
    for s in &snap.storages {
        for (reason, n) in &s.votes_refused {
            samples(
                out,
                name,
                &[("storage", &s.name), ("reason", reason)],
                Num::Int(*n),
            );
        }
    }
    for (name, help, figure) in CLASS_FAMILIES {
        family(out, name, Kind::Gauge, help);
        for s in &snap.storages {
            for c in &s.classes {
                let labels = [("storage", s.name.as_str()), ("class", &*c.class)];
                samples(out, name, &labels, Num::Int(figure(c)));
            }
        }
    }
}

/// The standard `process_*` families, named and described as the
/// Prometheus clients' process collectors export them.
fn process_families(out: &mut String, p: &ProcessFigures) {
    let families: [(&str, Kind, &str, Option<Num>); 7] = [
        (
            "process_cpu_seconds_total",
            Kind::Counter,
            "Total user and system CPU time spent in seconds.",
            Some(Num::Float(p.cpu_seconds)),
        ),
        (
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
            Some(Num::Int(p.resident_bytes)),
        ),
        (
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
            Some(Num::Int(p.virtual_bytes)),
        ),
        (
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
            Some(Num::Int(p.open_fds)),
        ),
        (
            "process_max_fds",
            Kind::Gauge,
            "Maximum number of open file descriptors (no sample when unlimited).",
            p.max_fds.map(Num::Int),
        ),
        (
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since unix epoch in seconds.",
            Some(Num::Float(p.start_time_seconds)),
        ),
        (
            "process_threads",
            Kind::Gauge,
            "Number of OS threads in the process.",
            Some(Num::Int(p.threads)),
        ),
    ];
    for (name, kind, help, value) in families {
        family(out, name, kind, help);
        if let Some(v) = value {
            sample(out, name, None, v);
        }
    }
}

/// The counting allocator's counters (a `count-allocations` build only).
fn allocation_families(out: &mut String, a: &AllocationCounts) {
    let families = [
        (
            "zeotemp_allocations_total",
            "Heap allocations since the process started (count-allocations build).",
            a.allocations,
        ),
        (
            "zeotemp_reallocations_total",
            "Heap reallocations since the process started (count-allocations build).",
            a.reallocations,
        ),
        (
            "zeotemp_allocated_bytes_total",
            "Bytes asked for by heap allocations and growing reallocations (count-allocations build).",
            a.bytes,
        ),
    ];
    for (name, help, n) in families {
        family(out, name, Kind::Counter, help);
        sample(out, name, None, Num::Int(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ClassRow;

    fn snapshot() -> Snapshot {
        Snapshot {
            version: "1.2.3".into(),
            start_time: 1_795_694_400.5,
            uptime: 12.25,
            connections: 3,
            max_connections: 100,
            resident_bytes: Some(4096),
            process: Some(ProcessFigures {
                cpu_seconds: 1.5,
                resident_bytes: 4096,
                virtual_bytes: 1 << 30,
                open_fds: 9,
                max_fds: Some(1024),
                start_time_seconds: 1_795_694_400.25,
                threads: 3,
            }),
            connections_refused: vec![("max-connections", 4), ("accept-error", 0)],
            tls_handshake_failures: vec![("error", 0), ("timeout", 2)],
            disconnects: vec![("client", 5), ("slow-client", 1)],
            memory_limit: Some(1 << 20),
            accounted_limit: Some(349_525),
            storages: vec![
                StorageFigures {
                    name: "1".into(),
                    objects: 10,
                    commits: 7,
                    gc_longest_pause_us: 1500,
                    votes_refused: vec![("memory-limit", 6), ("transaction-size", 0)],
                    classes: vec![
                        ClassRow {
                            class: "Products.Transience.TransientObject.TransientObject".into(),
                            objects: 8,
                            bytes: 8000,
                        },
                        ClassRow {
                            class: "evil\"}\\\nzeotemp_fake 1".into(),
                            objects: 1,
                            bytes: 30,
                        },
                        ClassRow {
                            class: "(other)".into(),
                            objects: 1,
                            bytes: 70,
                        },
                    ],
                    ..StorageFigures::default()
                },
                StorageFigures {
                    name: "a\"b\\c\nd".into(),
                    objects: 2,
                    ..StorageFigures::default()
                },
            ],
            allocations: None,
        }
    }

    #[test]
    fn allocation_counters_only_when_counted() {
        let plain = render(&snapshot());
        assert!(!plain.contains("zeotemp_allocations_total"), "{plain}");
        let counted = render(&Snapshot {
            allocations: Some(AllocationCounts {
                allocations: 7,
                reallocations: 2,
                bytes: 4096,
            }),
            ..snapshot()
        });
        for line in [
            "# TYPE zeotemp_allocations_total counter",
            "zeotemp_allocations_total 7",
            "zeotemp_reallocations_total 2",
            "zeotemp_allocated_bytes_total 4096",
        ] {
            assert!(counted.lines().any(|l| l == line), "{line} in {counted}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("temp"), "temp");
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), r"x\ny");
        assert_eq!(escape_label_value("tëmp"), "tëmp");
        let text = render(&snapshot());
        assert!(
            text.contains("zeotemp_objects{storage=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{text}"
        );
        // Every sample is one line: a label value's newline never splits it.
        for line in text.lines() {
            let name = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
                .unwrap_or(line);
            assert!(
                name.starts_with("zeotemp_") || name.starts_with("process_"),
                "{line:?}"
            );
        }
    }

    #[test]
    fn families_have_help_and_type_before_their_samples() {
        let text = render(&snapshot());
        let mut declared: Vec<(String, String)> = Vec::new();
        let mut helped = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(helped.last().map(String::as_str), Some(name));
                assert!(
                    declared.iter().all(|(n, _)| n != name),
                    "{name} declared twice"
                );
                declared.push((name.to_string(), kind.to_string()));
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let (last, kind) = declared.last().expect("a family first");
                assert_eq!(name, last, "samples of {last} are together");
                // Counters, and only counters, end in _total.
                assert_eq!(name.ends_with("_total"), kind == "counter", "{name}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        for name in [
            "zeotemp_build_info",
            "zeotemp_connections",
            "zeotemp_storages",
            "zeotemp_objects",
            "zeotemp_commits_total",
            "zeotemp_commit_lock_waiters",
            "zeotemp_gc_freed_objects_total",
            "zeotemp_connections_refused_total",
            "zeotemp_tls_handshake_failures_total",
            "zeotemp_disconnects_total",
            "zeotemp_votes_refused_total",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
            "process_threads",
        ] {
            assert!(declared.iter().any(|(n, _)| n == name), "{name}");
        }
    }

    #[test]
    fn values_and_labels() {
        let text = render(&snapshot());
        for want in [
            "zeotemp_build_info{version=\"1.2.3\"} 1\n",
            "zeotemp_start_time_seconds 1795694400.5\n",
            "zeotemp_connections 3\n",
            "zeotemp_storages 2\n",
            "zeotemp_resident_memory_bytes 4096\n",
            "zeotemp_objects{storage=\"1\"} 10\n",
            "zeotemp_commits_total{storage=\"1\"} 7\n",
            "zeotemp_memory_limit_bytes 1048576\n",
            "zeotemp_accounted_limit_bytes 349525\n",
            "zeotemp_gc_longest_pause_seconds{storage=\"1\"} 0.0015\n",
            "zeotemp_connections_refused_total{reason=\"max-connections\"} 4\n",
            "zeotemp_connections_refused_total{reason=\"accept-error\"} 0\n",
            "zeotemp_tls_handshake_failures_total{reason=\"timeout\"} 2\n",
            "zeotemp_disconnects_total{reason=\"slow-client\"} 1\n",
            "zeotemp_votes_refused_total{storage=\"1\",reason=\"memory-limit\"} 6\n",
            "zeotemp_votes_refused_total{storage=\"1\",reason=\"transaction-size\"} 0\n",
            "process_cpu_seconds_total 1.5\n",
            "process_open_fds 9\n",
            "process_max_fds 1024\n",
            "process_start_time_seconds 1795694400.25\n",
            "zeotemp_class_objects{storage=\"1\",class=\"Products.Transience.TransientObject.TransientObject\"} 8\n",
            "zeotemp_class_bytes{storage=\"1\",class=\"Products.Transience.TransientObject.TransientObject\"} 8000\n",
            "zeotemp_class_bytes{storage=\"1\",class=\"(other)\"} 70\n",
            // A class name is client data: escaped, in one line.
            "zeotemp_class_objects{storage=\"1\",class=\"evil\\\"}\\\\\\nzeotemp_fake 1\"} 1\n",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        // One limit for the process, not one per storage.
        assert!(!text.contains("zeotemp_memory_limit_bytes{"));
        // No limit: the family is there, the sample is not.
        let unlimited = render(&Snapshot {
            memory_limit: None,
            accounted_limit: None,
            ..snapshot()
        });
        assert!(unlimited.contains("# TYPE zeotemp_memory_limit_bytes gauge\n"));
        assert!(!unlimited.contains("\nzeotemp_memory_limit_bytes "));
        assert!(!unlimited.contains("\nzeotemp_accounted_limit_bytes "));
        // Unlimited descriptors: the family, no sample; no /proc: no
        // process families at all.
        let mut snap = snapshot();
        snap.process.as_mut().unwrap().max_fds = None;
        let text = render(&snap);
        assert!(text.contains("# TYPE process_max_fds gauge\n"));
        assert!(!text.contains("\nprocess_max_fds "));
        snap.process = None;
        assert!(!render(&snap).contains("# TYPE process_"));
        assert_eq!(Num::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Num::Float(f64::NAN).to_string(), "NaN");
    }

    /// Every reason of every refusal and fault counter is exported from the
    /// start, at 0, so that alerts and `rate()` work before the first one.
    #[test]
    fn every_reason_is_exported_at_zero_from_the_start() {
        use crate::state::{Disconnect, Refusal, Shared, TlsFailure};
        use crate::storage::stats::{Reason, VoteRefusal};
        let shared = Shared::new(crate::config::Config::default());
        let text = render(&Snapshot::take(&shared));
        fn each<R: Reason>(text: &str, name: &str, prefix: &str) {
            assert!(!R::ALL.is_empty());
            for r in R::ALL {
                let want = format!("{name}{{{prefix}reason=\"{}\"}} 0\n", r.label());
                assert!(text.contains(&want), "{want:?} in\n{text}");
            }
        }
        each::<Refusal>(&text, "zeotemp_connections_refused_total", "");
        each::<TlsFailure>(&text, "zeotemp_tls_handshake_failures_total", "");
        each::<Disconnect>(&text, "zeotemp_disconnects_total", "");
        each::<VoteRefusal>(&text, "zeotemp_votes_refused_total", "storage=\"1\",");
        // And each counts its own reason only.
        shared.faults.disconnects.bump(Disconnect::SlowClient);
        shared.faults.connections_refused.bump(Refusal::AcceptError);
        let text = render(&Snapshot::take(&shared));
        assert!(text.contains("zeotemp_disconnects_total{reason=\"slow-client\"} 1\n"));
        assert!(text.contains("zeotemp_disconnects_total{reason=\"client\"} 0\n"));
        assert!(text.contains("zeotemp_connections_refused_total{reason=\"accept-error\"} 1\n"));
        assert!(text.contains("process_open_fds "), "{text}");
    }
}
