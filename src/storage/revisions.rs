//! An object's revisions: oldest first, the last one current.
//!
//! Most objects have exactly one retained revision (no history inside the
//! retention window), so that one lives inline in the object map's entry;
//! only objects with history pay for a separate `Vec`. Against a
//! `Vec<Revision>` per object this saves an allocation (64 bytes of
//! malloc chunk) for every object with no history (`bench/compare.py
//! --memory`; BENCHMARKS.md has the figures).

use std::ops::Deref;

use super::Revision;

#[derive(Debug)]
pub enum Revisions {
    One(Revision),
    /// Two or more (empty only while an object is being created).
    Many(Vec<Revision>),
}

impl Default for Revisions {
    fn default() -> Self {
        Revisions::Many(Vec::new())
    }
}

impl Deref for Revisions {
    type Target = [Revision];

    fn deref(&self) -> &[Revision] {
        match self {
            Revisions::One(r) => std::slice::from_ref(r),
            Revisions::Many(v) => v,
        }
    }
}

impl<'a> IntoIterator for &'a Revisions {
    type Item = &'a Revision;
    type IntoIter = std::slice::Iter<'a, Revision>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Revisions {
    /// Appends a new current revision.
    pub fn push(&mut self, rev: Revision) {
        match self {
            Revisions::Many(v) if v.is_empty() => *self = Revisions::One(rev),
            Revisions::Many(v) => v.push(rev),
            Revisions::One(_) => {
                let Revisions::One(first) = std::mem::take(self) else {
                    unreachable!("matched One above")
                };
                *self = Revisions::Many(vec![first, rev]);
            }
        }
    }

    /// Removes the `k` oldest revisions (at least one is always kept) and
    /// returns them; a single remaining revision moves back inline.
    pub fn drain_oldest(&mut self, k: usize) -> Vec<Revision> {
        let Revisions::Many(v) = self else {
            return Vec::new();
        };
        let k = k.min(v.len().saturating_sub(1));
        let dropped: Vec<Revision> = v.drain(..k).collect();
        if v.len() == 1 {
            let last = v.pop().expect("one left");
            *self = Revisions::One(last);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::ids::Tid;
    use crate::storage::TxnMeta;

    fn rev(t: u64) -> Revision {
        Revision {
            tid: Tid(t),
            data: Some(Box::from(&b"x"[..])),
            refs: Some(Box::new([])),
            meta: Arc::new(TxnMeta {
                user: bytes::Bytes::new(),
                description: bytes::Bytes::new(),
                extension: crate::protocol::value::Value::Dict(Vec::new()),
            }),
        }
    }

    fn tids(r: &Revisions) -> Vec<u64> {
        r.iter().map(|r| r.tid.0).collect()
    }

    #[test]
    fn one_inline_then_many_then_one_again() {
        let mut r = Revisions::default();
        assert!(r.is_empty());
        r.push(rev(1));
        assert!(matches!(r, Revisions::One(_)));
        r.push(rev(2));
        r.push(rev(3));
        assert_eq!(tids(&r), [1, 2, 3]);
        assert_eq!(r.last().unwrap().tid, Tid(3));
        let gone = r.drain_oldest(1);
        assert_eq!(gone.len(), 1);
        assert_eq!(tids(&r), [2, 3]);
        // Never drains the current revision.
        let gone = r.drain_oldest(5);
        assert_eq!(gone.len(), 1);
        assert_eq!(tids(&r), [3]);
        assert!(matches!(r, Revisions::One(_)));
        assert!(r.drain_oldest(1).is_empty());
    }

    #[test]
    fn an_object_with_one_revision_needs_no_allocation_of_its_own() {
        // The point of the type: no bigger than the revision it holds
        // plus a tag, and no heap block for the revision list.
        assert!(std::mem::size_of::<Revisions>() <= std::mem::size_of::<Revision>() + 8);
    }
}
