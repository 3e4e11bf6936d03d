//! What fills a storage: objects and bytes by class, over the current
//! revisions of its objects (the class table of `server_status` and of
//! the `zeotemp_class_*` metrics).
//!
//! The class of a record is read by the reference scanner
//! ([`refs::scan`](super::refs::scan), the same pass that finds its
//! references, on the connection's task before any lock); the table is
//! updated under the storage's write lock that a commit or a collection
//! already holds: when a commit stores or replaces an object (its class may
//! change), deletes it, and when the collector frees it.
//!
//! Invariants (tested below and in `storage`'s tests):
//! * the objects of all classes are the objects whose current revision
//!   holds a record, and their bytes are the storage's current bytes
//!   (`getSize`), each record counted at its length;
//! * memory is bounded: at most [`MAX_CLASSES`] distinct names are kept
//!   (each at most `refs::MAX_CLASS_NAME_BYTES` long); classes seen after
//!   that count as [`OTHER_CLASS`]. A name stays interned once seen (its
//!   row is hidden while it counts nothing), so an object's class is a
//!   2-byte index.

use std::collections::HashMap;
use std::sync::Arc;

/// Most distinct class names one storage keeps (beyond [`UNKNOWN_CLASS`]
/// and [`OTHER_CLASS`]): a real site has tens to hundreds of persistent
/// classes; a client that stores records of ever new class names cannot
/// make the table grow past this (about 2 MB at the longest names), and
/// what it stores after that counts as [`OTHER_CLASS`].
pub const MAX_CLASSES: usize = 10_000;

/// The class of records whose class the scanner cannot read (not a pickle,
/// a class pickle cut short, a persistent class referenced by oid).
pub const UNKNOWN_CLASS: &str = "(unknown)";

/// The class of records whose class came after [`MAX_CLASSES`] others, and
/// in a top-N listing the row that sums the classes not listed.
pub const OTHER_CLASS: &str = "(other)";

/// An index into one storage's class table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClassId(u16);

impl ClassId {
    /// [`UNKNOWN_CLASS`]; also what a new object starts with.
    pub const UNKNOWN: ClassId = ClassId(0);
    /// [`OTHER_CLASS`].
    pub const OTHER: ClassId = ClassId(1);
}

// Every id fits in the u16.
const _: () = assert!(MAX_CLASSES + 2 <= u16::MAX as usize);

/// One row of the table: a class and what its objects hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassRow {
    pub class: Arc<str>,
    /// Objects whose current revision is of this class.
    pub objects: u64,
    /// Bytes of those current records.
    pub bytes: u64,
}

/// One storage's class table.
#[derive(Debug)]
pub struct ClassTable {
    /// Interned names, indexed by [`ClassId`].
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, ClassId>,
    /// `(objects, bytes)` by [`ClassId`].
    counts: Vec<(u64, u64)>,
}

impl Default for ClassTable {
    fn default() -> ClassTable {
        let names: Vec<Arc<str>> = vec![UNKNOWN_CLASS.into(), OTHER_CLASS.into()];
        let ids = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), ClassId(i as u16)))
            .collect();
        ClassTable {
            counts: vec![(0, 0); names.len()],
            names,
            ids,
        }
    }
}

impl ClassTable {
    /// The id of `class` (`None`: [`UNKNOWN_CLASS`]), interning it if there
    /// is room, else [`ClassId::OTHER`].
    pub fn intern(&mut self, class: Option<&str>) -> ClassId {
        let Some(class) = class else {
            return ClassId::UNKNOWN;
        };
        if let Some(&id) = self.ids.get(class) {
            return id;
        }
        if self.names.len() >= MAX_CLASSES + 2 {
            return ClassId::OTHER;
        }
        let id = ClassId(self.names.len() as u16);
        let name: Arc<str> = class.into();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        self.counts.push((0, 0));
        id
    }

    /// An object of class `id` now has a current record of `bytes`.
    pub fn add(&mut self, id: ClassId, bytes: usize) {
        if let Some((objects, total)) = self.counts.get_mut(usize::from(id.0)) {
            *objects += 1;
            *total += bytes as u64;
        }
    }

    /// An object of class `id` with a current record of `bytes` was
    /// replaced, deleted or freed.
    pub fn remove(&mut self, id: ClassId, bytes: usize) {
        if let Some((objects, total)) = self.counts.get_mut(usize::from(id.0)) {
            *objects = objects.saturating_sub(1);
            *total = total.saturating_sub(bytes as u64);
        }
    }

    /// The name of `id`.
    pub fn name(&self, id: ClassId) -> &str {
        self.names
            .get(usize::from(id.0))
            .map_or(UNKNOWN_CLASS, |n| n)
    }

    /// Every class that counts an object now, in no particular order.
    /// Cheap enough to call under the lock (a copy of the counts and a
    /// reference count per class); sort with [`top`] after releasing it.
    pub fn rows(&self) -> Vec<ClassRow> {
        self.counts
            .iter()
            .zip(&self.names)
            .filter(|((objects, _), _)| *objects > 0)
            .map(|(&(objects, bytes), name)| ClassRow {
                class: name.clone(),
                objects,
                bytes,
            })
            .collect()
    }
}

/// The `n` classes holding the most bytes (ties: more objects first, then
/// by name), then one [`OTHER_CLASS`] row summing the rest, if any: the
/// classes not listed and the classes seen after [`MAX_CLASSES`]. `n = 0`
/// lists nothing.
pub fn top(mut rows: Vec<ClassRow>, n: usize) -> Vec<ClassRow> {
    if n == 0 {
        return Vec::new();
    }
    let mut other = ClassRow {
        class: OTHER_CLASS.into(),
        objects: 0,
        bytes: 0,
    };
    rows.retain(|r| {
        let keep = &*r.class != OTHER_CLASS;
        if !keep {
            other.objects += r.objects;
            other.bytes += r.bytes;
        }
        keep
    });
    rows.sort_unstable_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.objects.cmp(&a.objects))
            .then_with(|| a.class.cmp(&b.class))
    });
    for r in rows.drain(n.min(rows.len())..) {
        other.objects += r.objects;
        other.bytes += r.bytes;
    }
    if other.objects > 0 {
        rows.push(other);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(class: &str, objects: u64, bytes: u64) -> ClassRow {
        ClassRow {
            class: class.into(),
            objects,
            bytes,
        }
    }

    fn sorted(mut rows: Vec<ClassRow>) -> Vec<ClassRow> {
        rows.sort_by(|a, b| a.class.cmp(&b.class));
        rows
    }

    #[test]
    fn counts_follow_adds_and_removes() {
        let mut t = ClassTable::default();
        let pm = t.intern(Some("persistent.mapping.PersistentMapping"));
        let tree = t.intern(Some("BTrees.OOBTree.OOBTree"));
        assert_eq!(t.intern(Some("persistent.mapping.PersistentMapping")), pm);
        assert_eq!(t.intern(None), ClassId::UNKNOWN);
        assert_ne!(pm, tree);
        assert_eq!(t.name(tree), "BTrees.OOBTree.OOBTree");
        t.add(pm, 100);
        t.add(pm, 50);
        t.add(tree, 7);
        t.add(ClassId::UNKNOWN, 3);
        assert_eq!(
            sorted(t.rows()),
            [
                row("(unknown)", 1, 3),
                row("BTrees.OOBTree.OOBTree", 1, 7),
                row("persistent.mapping.PersistentMapping", 2, 150),
            ]
        );
        // Replaced by an object of another class, then freed.
        t.remove(pm, 50);
        t.add(tree, 60);
        t.remove(tree, 7);
        t.remove(ClassId::UNKNOWN, 3);
        assert_eq!(
            sorted(t.rows()),
            [
                row("BTrees.OOBTree.OOBTree", 1, 60),
                row("persistent.mapping.PersistentMapping", 1, 100),
            ]
        );
        // A class that counts nothing is not listed, and keeps its id.
        t.remove(pm, 100);
        assert_eq!(t.rows(), [row("BTrees.OOBTree.OOBTree", 1, 60)]);
        assert_eq!(t.intern(Some("persistent.mapping.PersistentMapping")), pm);
    }

    #[test]
    fn new_classes_past_the_cap_are_other() {
        let mut t = ClassTable::default();
        for i in 0..MAX_CLASSES {
            let id = t.intern(Some(&format!("m.C{i}")));
            assert_ne!(id, ClassId::OTHER, "{i}");
            t.add(id, 1);
        }
        let late = t.intern(Some("m.Late"));
        assert_eq!(late, ClassId::OTHER);
        assert_eq!(t.intern(Some("m.Later")), ClassId::OTHER);
        t.add(late, 5);
        // Known classes keep their own ids.
        let known = t.intern(Some("m.C42"));
        assert_eq!(t.name(known), "m.C42");
        assert_eq!(t.names.len(), MAX_CLASSES + 2);
        assert_eq!(t.ids.len(), MAX_CLASSES + 2);
        let rows = t.rows();
        assert_eq!(rows.len(), MAX_CLASSES + 1);
        assert!(rows.contains(&row("(other)", 1, 5)));
    }

    #[test]
    fn top_n_by_bytes_then_other() {
        let rows = vec![
            row("a.Small", 10, 100),
            row("b.Big", 1, 5000),
            row("c.Tie", 2, 300),
            row("d.Tie", 2, 300),
            row("e.TieMoreObjects", 3, 300),
            row("(other)", 4, 40),
            row("(unknown)", 1, 1000),
        ];
        assert_eq!(
            top(rows.clone(), 3),
            [
                row("b.Big", 1, 5000),
                row("(unknown)", 1, 1000),
                row("e.TieMoreObjects", 3, 300),
                // c.Tie, d.Tie, a.Small and the classes past the cap.
                row("(other)", 18, 740),
            ]
        );
        assert_eq!(
            top(rows.clone(), 4)[3],
            row("c.Tie", 2, 300),
            "ties by name"
        );
        // Everything listed: the (other) row is only what was past the cap.
        let all = top(rows.clone(), 100);
        assert_eq!(all.len(), 7);
        assert_eq!(all[6], row("(other)", 4, 40));
        assert_eq!(all[5], row("a.Small", 10, 100));
        let without_other: Vec<ClassRow> = rows[..5].to_vec();
        assert_eq!(top(without_other.clone(), 100).len(), 5, "no empty (other)");
        assert_eq!(top(without_other, 0), []);
        assert_eq!(top(Vec::new(), 10), []);
    }
}
