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

/// Shards of a [`ShardedOidMap`] (a power of two).
pub const OID_MAP_SHARDS: usize = 256;
const _: () = assert!(OID_MAP_SHARDS.is_power_of_two() && OID_MAP_SHARDS > 1);

/// An oid-keyed map split into [`OID_MAP_SHARDS`] maps by a keyed
/// multiplicative hash of the oid (its top bits), so that it can be gone
/// through a shard at a time: the collector takes a few shards per hold of
/// the storage lock instead of all objects at once. A map that grows also
/// rehashes one shard, not all objects.
#[derive(Debug)]
pub struct ShardedOidMap<V> {
    shards: Box<[OidMap<Oid, V>]>,
    len: usize,
    /// This process's key (as the shards' hasher's).
    key: u64,
}

impl<V> Default for ShardedOidMap<V> {
    fn default() -> Self {
        ShardedOidMap {
            shards: (0..OID_MAP_SHARDS).map(|_| OidMap::default()).collect(),
            len: 0,
            key: OidBuildHasher::default().key,
        }
    }
}

impl<V> ShardedOidMap<V> {
    /// One multiply (the shard's table hashes the oid again anyway): the
    /// top bits of a product depend on every bit of the oid.
    #[inline]
    fn shard(&self, oid: &Oid) -> usize {
        let h = (oid.0 ^ self.key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> (64 - OID_MAP_SHARDS.trailing_zeros())) as usize
    }

    #[inline]
    pub fn get(&self, oid: &Oid) -> Option<&V> {
        self.shards[self.shard(oid)].get(oid)
    }

    #[inline]
    pub fn get_mut(&mut self, oid: &Oid) -> Option<&mut V> {
        let i = self.shard(oid);
        self.shards[i].get_mut(oid)
    }

    #[inline]
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
    #[inline]
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

    #[inline]
    pub fn remove(&mut self, oid: &Oid) -> Option<V> {
        let i = self.shard(oid);
        let old = self.shards[i].remove(oid);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The shards, each a map of its own.
    pub fn shards(&self) -> &[OidMap<Oid, V>] {
        &self.shards
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
        assert_eq!(m.shards().len(), OID_MAP_SHARDS);
        let mut all: Vec<Oid> = m.shards().iter().flat_map(|s| s.keys().copied()).collect();
        assert!(m.shards().iter().all(|s| s.len() > 10 && s.len() < 80));
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
