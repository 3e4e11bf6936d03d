//! A tiny deterministic pseudo-random generator (xorshift64*), shared by
//! the randomized tests (the codecs', the collector's, `tests/*.rs`) and
//! the load generator's choices (`bench/zeotemp-bench`); no crate needed.
//! Not for anything an attacker may predict (the oid hasher keys itself from
//! the OS).

/// xorshift64*: fast, reproducible from its seed, not for security.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed` (any value; zero is replaced, as xorshift
    /// would stay at zero forever).
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_in_range() {
        let (mut a, mut b) = (XorShift64::new(7), XorShift64::new(7));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let (x, y) = (a.below(10), b.below(10));
            assert_eq!(x, y);
            assert!(x < 10);
        }
        assert_eq!(XorShift64::new(0).below(0), 0);
        assert_ne!(XorShift64::new(0).next_u64(), 0);
    }
}
