//! A counting global allocator for zeotemp's benchmark build: it wraps
//! [`std::alloc::System`] and counts allocations, reallocations and the
//! bytes they asked for, with relaxed atomics (a few nanoseconds per call).
//!
//! Why a crate of its own: zeotemp is `#![forbid(unsafe_code)]`, and a
//! [`GlobalAlloc`] can only be written with `unsafe`. This crate's binary,
//! `zeotemp-counted` (src/main.rs), is the `zeotemp` server with
//! [`CountingAlloc`] as its `#[global_allocator]`, exporting [`counts`] as
//! Prometheus counters, so `bench/per_request.py` can report allocations
//! per request; the release binary and the wheels never count. Not
//! published; not in the package.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static REALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting.
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to `System`, which upholds
// `GlobalAlloc`'s contract; the counters are plain atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCATIONS.fetch_add(1, Relaxed);
        // Bytes asked for beyond the old size (a shrink counts nothing).
        BYTES.fetch_add(new_size.saturating_sub(layout.size()) as u64, Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// `(allocations, reallocations, bytes allocated)` since the process
/// started (counted only where [`CountingAlloc`] is the global allocator).
pub fn counts() -> (u64, u64, u64) {
    (
        ALLOCATIONS.load(Relaxed),
        REALLOCATIONS.load(Relaxed),
        BYTES.load(Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static A: CountingAlloc = CountingAlloc;

    #[test]
    fn counts_allocations_reallocations_and_bytes() {
        let (a0, r0, b0) = counts();
        let mut v: Vec<u8> = Vec::with_capacity(1000);
        v.extend_from_slice(&[1; 1000]);
        v.reserve_exact(3000);
        let (a1, r1, b1) = counts();
        // Other test threads may allocate too: at least ours are counted.
        assert!(a1 > a0, "{a0} -> {a1}");
        assert!(r1 > r0, "{r0} -> {r1}");
        assert!(b1 - b0 >= 4000, "{b0} -> {b1}");
        drop(v);
    }
}
