//! A fast hasher for maps keyed by [`Oid`](crate::protocol::ids::Oid).
//!
//! The storage's object map is looked up once per `loadBefore`; with the
//! standard library's SipHash that lookup was 7 % of the server's time under
//! the `load` benchmark. Oids are 8-byte integers, so one multiply-xorshift
//! round (the splitmix64 finalizer, a bijection on `u64`) spreads them well.
//!
//! Clients choose the oids they store, so the mixer is keyed with a random
//! value per process: a client cannot precompute oids that collide in
//! another server's map (the defence SipHash's key gives, at a fraction of
//! its cost; this is not a cryptographic guarantee).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use crate::protocol::ids::Oid;

/// A `HashMap` keyed by oids (or tids) with [`OidHasher`].
pub type OidMap<K, V> = HashMap<K, V, OidBuildHasher>;

/// Creates [`OidHasher`]s sharing this process's key.
#[derive(Debug, Clone, Copy)]
pub struct OidBuildHasher {
    key: u64,
}

impl Default for OidBuildHasher {
    fn default() -> Self {
        static KEY: OnceLock<u64> = OnceLock::new();
        let key = *KEY.get_or_init(|| {
            // RandomState is seeded from the OS; hashing a constant with it
            // yields a random u64 without another dependency.
            std::collections::hash_map::RandomState::new().hash_one(0x5a17_u64)
        });
        OidBuildHasher { key }
    }
}

impl BuildHasher for OidBuildHasher {
    type Hasher = OidHasher;

    fn build_hasher(&self) -> OidHasher {
        OidHasher { state: self.key }
    }
}

/// splitmix64's finalizer over the key and the written integers.
#[derive(Debug, Clone)]
pub struct OidHasher {
    state: u64,
}

impl OidHasher {
    fn mix(&mut self, x: u64) {
        let mut z = (self.state ^ x).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.state = z ^ (z >> 31);
    }
}

impl Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.state
    }

    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }

    /// Anything but a `u64` (not used by oid keys, kept correct anyway).
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(b) ^ chunk.len() as u64);
        }
    }
}

/// Shards of a [`ShardedOidMap`].
pub const OID_MAP_SHARDS: usize = 256;

/// An oid-keyed map split into [`OID_MAP_SHARDS`] maps by the oid's hash
/// (bits the shards' own tables do not use), so that it can be gone
/// through a shard at a time: the collector's snapshot of the storage's
/// objects takes a few shards per hold of the storage lock instead of all
/// of them at once, and nothing it has not reached yet can move from
/// under it. A map that grows also rehashes one shard, not all objects.
#[derive(Debug)]
pub struct ShardedOidMap<V> {
    shards: Box<[OidMap<Oid, V>]>,
    len: usize,
    hasher: OidBuildHasher,
}

impl<V> Default for ShardedOidMap<V> {
    fn default() -> Self {
        ShardedOidMap {
            shards: (0..OID_MAP_SHARDS).map(|_| OidMap::default()).collect(),
            len: 0,
            hasher: OidBuildHasher::default(),
        }
    }
}

impl<V> ShardedOidMap<V> {
    fn shard(&self, oid: &Oid) -> usize {
        // The tables use the low bits (bucket) and the top 7 (tag).
        (self.hasher.hash_one(oid) >> 32) as usize % OID_MAP_SHARDS
    }

    pub fn get(&self, oid: &Oid) -> Option<&V> {
        self.shards[self.shard(oid)].get(oid)
    }

    pub fn get_mut(&mut self, oid: &Oid) -> Option<&mut V> {
        let i = self.shard(oid);
        self.shards[i].get_mut(oid)
    }

    pub fn insert(&mut self, oid: Oid, value: V) -> Option<V> {
        let i = self.shard(&oid);
        let old = self.shards[i].insert(oid, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// The value of `oid`, inserted by `make` if there was none (and then
    /// `true`).
    pub fn get_or_insert_with(&mut self, oid: Oid, make: impl FnOnce() -> V) -> (&mut V, bool) {
        let i = self.shard(&oid);
        let mut created = false;
        let value = self.shards[i].entry(oid).or_insert_with(|| {
            created = true;
            make()
        });
        if created {
            self.len += 1;
        }
        (value, created)
    }

    pub fn remove(&mut self, oid: &Oid) -> Option<V> {
        let i = self.shard(oid);
        let old = self.shards[i].remove(oid);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oids of shard `i` (`0..OID_MAP_SHARDS`; none past the end).
    pub fn shard_keys(&self, i: usize) -> impl Iterator<Item = &Oid> {
        self.shards.get(i).into_iter().flat_map(|s| s.keys())
    }

    /// How many oids shard `i` holds.
    pub fn shard_len(&self, i: usize) -> usize {
        self.shards.get(i).map_or(0, |s| s.len())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Oid, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_oids_spread_over_buckets() {
        // Sequential oids (what new_oids hands out) must not pile up in a
        // few buckets: look at the low 10 bits hashbrown uses for the index.
        let b = OidBuildHasher::default();
        let mut buckets = [0u32; 1024];
        for i in 0..102_400u64 {
            buckets[(b.hash_one(Oid(0x03e0_0000_0000_0000 + i)) & 1023) as usize] += 1;
        }
        let (min, max) = (buckets.iter().min().unwrap(), buckets.iter().max().unwrap());
        assert!(*min > 50 && *max < 160, "min {min} max {max}");
    }

    #[test]
    fn sharded_map_works() {
        let mut m: ShardedOidMap<u32> = ShardedOidMap::default();
        for i in 0..10_000u64 {
            assert_eq!(m.insert(Oid(i * 7), i as u32), None);
        }
        assert_eq!(m.insert(Oid(7), 100), Some(1));
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.get(&Oid(7 * 999)), Some(&999));
        assert_eq!(m.get(&Oid(1)), None);
        let (v, created) = m.get_or_insert_with(Oid(1), || 5);
        assert_eq!((*v, created), (5, true));
        let (v, created) = m.get_or_insert_with(Oid(1), || 6);
        *v += 1;
        assert!(!created);
        assert_eq!(m.get(&Oid(1)), Some(&6));
        assert_eq!(m.remove(&Oid(1)), Some(6));
        assert_eq!(m.remove(&Oid(1)), None);
        assert_eq!(m.len(), 10_000);
        // Every oid is in exactly one shard, and the shards are not lopsided.
        let mut all: Vec<Oid> = (0..OID_MAP_SHARDS + 1)
            .flat_map(|i| m.shard_keys(i).copied())
            .collect();
        assert_eq!(
            (0..OID_MAP_SHARDS).map(|i| m.shard_len(i)).sum::<usize>(),
            10_000
        );
        assert!((0..OID_MAP_SHARDS).all(|i| m.shard_len(i) > 10 && m.shard_len(i) < 80));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 10_000);
        assert_eq!(m.iter().count(), 10_000);
    }

    #[test]
    fn map_works() {
        let mut m: OidMap<Oid, u32> = OidMap::default();
        for i in 0..1000 {
            m.insert(Oid(i * 7), i as u32);
        }
        assert_eq!(m.get(&Oid(7 * 999)), Some(&999));
        assert_eq!(m.get(&Oid(1)), None);
    }
}
