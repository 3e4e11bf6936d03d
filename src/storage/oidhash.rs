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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ids::Oid;

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
    fn map_works() {
        let mut m: OidMap<Oid, u32> = OidMap::default();
        for i in 0..1000 {
            m.insert(Oid(i * 7), i as u32);
        }
        assert_eq!(m.get(&Oid(7 * 999)), Some(&999));
        assert_eq!(m.get(&Oid(1)), None);
    }
}
