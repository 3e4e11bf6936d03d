//! `zeotemp-counted`: the `zeotemp` server binary with [`CountingAlloc`] as
//! its global allocator. It registers the counts with the server library,
//! whose metrics endpoint then exports `zeotemp_allocations_total`,
//! `zeotemp_reallocations_total` and `zeotemp_allocated_bytes_total`
//! (bench/per_request.py reads them). Same options, same behaviour
//! otherwise; for benchmarks only.

use std::process::ExitCode;

use alloc_count::CountingAlloc;

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// The server's own `main.rs`, unchanged.
#[path = "../../../src/main.rs"]
mod server;

/// The counting allocator's figures, for the metrics.
fn counts() -> zeotemp::AllocationCounts {
    let (allocations, reallocations, bytes) = alloc_count::counts();
    zeotemp::AllocationCounts {
        allocations,
        reallocations,
        bytes,
    }
}

fn main() -> ExitCode {
    zeotemp::register_allocation_counter(counts);
    server::main()
}
