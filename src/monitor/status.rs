//! What a monitor asks for by name: `server_status()` (the stock server's
//! keys plus zeotemp's figures), the `ruok` answer (zeo-nagios), and the
//! periodic summary log line.

use std::time::{SystemTime, UNIX_EPOCH};

use tracing::info;

use crate::monitor::figures::StorageFigures;
use crate::state::Shared;
use crate::storage::Storage;

/// `server_status()` of one storage: the keys the stock server returns
/// (`StorageServer.server_status`), plus zeotemp's own figures.
pub fn server_status(shared: &Shared, storage: &Storage) -> serde_json::Value {
    let f = StorageFigures::of(storage, shared.config.class_table_size);
    let start = shared
        .started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut status = serde_json::json!({
        "connections": f.connections,
        "loads": f.loads,
        "stores": f.stores,
        "commits": f.commits,
        "aborts": f.aborts,
        "active_txns": f.active_transactions,
        "lock_time": f.lock_held_seconds.map(|age| now_secs() - age),
        "conflicts": f.conflicts,
        "conflicts_resolved": f.conflicts_resolved,
        "start": crate::protocol::ids::ctime(start),
        "waiting": f.lock_waiters,
        "timeout-thread-is-alive": true,
        "last-transaction": f.last_tid.to_string(),
        "objects": f.objects,
        "size": f.current_bytes,
        "revisions": f.revisions,
        "retained-bytes": f.retained_bytes,
        "accounted-bytes": f.accounted_bytes,
        "memory-limit": f.memory_limit,
        "accounted-limit": f.accounted_limit,
        "unscannable-records": f.unscannable_records,
        "collections": f.gc_collections,
        "freed-objects": f.gc_freed_objects,
        "longest-pause-ms": f.gc_longest_pause_us as f64 / 1000.0,
        "last-collection-ms": f.gc_last_collection_us as f64 / 1000.0,
        "last-pause-ms": f.gc_last_longest_pause_us as f64 / 1000.0,
    });
    // What fills the storage (`class-table-size`; none listed at 0).
    if shared.config.class_table_size > 0 {
        status["classes"] = f
            .classes
            .iter()
            .map(
                |c| serde_json::json!({"class": &*c.class, "objects": c.objects, "bytes": c.bytes}),
            )
            .collect();
    }
    status
}

/// The `ruok` answer: every storage's status, as JSON in ASCII (as
/// the stock server's `json.dumps`): `zeo-nagios` decodes the answer
/// as ASCII, so a storage named in UTF-8 must come escaped.
pub fn ruok(shared: &Shared) -> String {
    let map: serde_json::Map<String, serde_json::Value> = shared
        .storage_names
        .iter()
        .filter_map(|n| {
            shared
                .storages
                .get(n)
                .map(|s| (n.clone(), server_status(shared, s)))
        })
        .collect();
    ascii_json(&serde_json::Value::Object(map).to_string())
}

/// JSON text with every non-ASCII character written as a `\uXXXX` escape
/// (UTF-16 surrogate pairs beyond the BMP), as Python's `json.dumps` does
/// by default. Outside strings JSON text is ASCII already, so escaping
/// character by character is exact.
pub fn ascii_json(json: &str) -> String {
    if json.is_ascii() {
        return json.to_string();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One line with a storage's figures, naming the class whose objects hold
/// the most bytes.
pub fn log_summary(s: &Storage) {
    let f = StorageFigures::of(s, 1);
    let top_class = f.classes.first().map(|c| {
        let share = c.bytes as f64 * 100.0 / f.current_bytes.max(1) as f64;
        format!(
            "{} ({} objects, {share:.0} % of the bytes)",
            c.class, c.objects
        )
    });
    info!(
        storage = s.name(),
        objects = f.objects,
        revisions = f.revisions,
        retained_bytes = f.retained_bytes,
        accounted_bytes = f.accounted_bytes,
        commits = f.commits,
        collections = f.gc_collections,
        freed_objects = f.gc_freed_objects,
        longest_pause_ms = f.gc_longest_pause_us as f64 / 1000.0,
        top_class = top_class.as_deref().unwrap_or("none"),
        "storage summary"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn ruok_is_ascii_json_like_json_dumps() {
        // What Python's json.dumps writes for these names.
        assert_eq!(ascii_json(r#"{"temp":1}"#), r#"{"temp":1}"#);
        assert_eq!(ascii_json(r#"{"tëmp":1}"#), r#"{"t\u00ebmp":1}"#);
        assert_eq!(ascii_json("\"\u{1F600}\""), r#""\ud83d\ude00""#);
        let shared = Shared::new(Config {
            storages: vec!["1".into(), "tëmp\u{1F600}".into()],
            ..Config::default()
        });
        let text = ruok(&shared);
        assert!(text.is_ascii(), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(back.get("tëmp\u{1F600}").is_some(), "{text}");
        assert_eq!(back["1"]["commits"], 0);
    }

    #[test]
    fn status_lists_the_biggest_classes() {
        let shared = Shared::new(Config::default());
        let s = shared.storages.get("1").unwrap();
        let status = server_status(&shared, s);
        // The root, an empty PersistentMapping, exists from the start.
        assert_eq!(
            status["classes"],
            serde_json::json!([{
                "class": "persistent.mapping.PersistentMapping",
                "objects": 1,
                "bytes": status["size"],
            }])
        );
        let off = Shared::new(Config {
            class_table_size: 0,
            ..Config::default()
        });
        let status = server_status(&off, off.storages.get("1").unwrap());
        assert!(status.get("classes").is_none(), "{status}");
        assert_eq!(status["objects"], 1);
    }
}
