//! How long does garbage collection hold up loads and commits?
//!
//! Builds a storage of N objects (default 1,000,000: the root links 1,000
//! containers of 1,000 leaves, 200-byte records), unlinks half of the
//! containers, then packs (history drop + a full collection) while two
//! threads load random objects and one commits small transactions, all the
//! time. Prints the longest hold of the storage lock by the history drop and
//! by each phase of the collection (which one is the longest), the slowest
//! load and the slowest commit seen during the pack, and its duration.
//!
//!     cargo run --release --example gc_pause [-- OBJECTS [alone]]
//!
//! With `alone`, nothing loads or commits during the pack (to count its
//! own work, e.g. under `valgrind --tool=callgrind`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zeotemp::protocol::ids::{Oid, Tid};
use zeotemp::protocol::value::Value;
use zeotemp::storage::{
    GcOutcome, HoldKind, LockAttempt, Storage, StorageLimits, TxnMeta, TxnOp, Vote,
};

fn store(oid: u64, serial: Tid, refs: Vec<u64>) -> TxnOp {
    TxnOp::Store {
        oid: Oid(oid),
        serial,
        data: Bytes::from(vec![b'x'; 200]),
        refs: Some(refs.into_iter().map(Oid).collect()),
        class: None,
    }
}

fn commit(s: &Arc<Storage>, conn: u64, ops: Vec<TxnOp>) -> Tid {
    let mut txn = s.begin(conn);
    for op in ops {
        txn.buffer(op);
    }
    if let LockAttempt::Wait(mut rx) = txn.lock() {
        // The lock is handed over when the holder finishes.
        while rx.try_recv().is_err() {
            std::thread::yield_now();
        }
    }
    let Vote::Voted(voted) = txn.vote().expect("vote") else {
        panic!("no conflicts")
    };
    let meta = TxnMeta {
        user: Bytes::new(),
        description: Bytes::new(),
        extension: Value::None,
    };
    // Commits, then releases the commit lock.
    txn.finish(voted, meta, |tid, _, _| tid)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let fanout = (n as f64).sqrt().round() as u64;
    let s = Arc::new(Storage::new("1", Tid::now(), StorageLimits::default()));
    let mut serials = std::collections::HashMap::new();
    let t_build = Instant::now();
    // Containers 1..=fanout, leaves after them.
    let mut next = fanout + 1;
    for c in 1..=fanout {
        let leaves: Vec<u64> = (next..next + fanout).collect();
        next += fanout;
        let mut ops: Vec<TxnOp> = leaves
            .iter()
            .map(|l| store(*l, Tid::ZERO, vec![]))
            .collect();
        ops.push(store(c, Tid::ZERO, leaves));
        let tid = commit(&s, 1, ops);
        serials.insert(c, tid);
    }
    let root = s.read().get_tid(Oid::ROOT).expect("root");
    let root_tid = commit(&s, 1, vec![store(0, root, (1..=fanout).collect())]);
    let total = s.read().len();
    println!("built {total} objects in {:?}", t_build.elapsed());

    // Unlink half of the containers: about n/2 objects become garbage.
    let root_tid = commit(&s, 1, vec![store(0, root_tid, (1..=fanout / 2).collect())]);

    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    let alone = std::env::args().nth(2).as_deref() == Some("alone");
    for k in 0..if alone { 0 } else { 2u64 } {
        let (s, stop) = (s.clone(), stop.clone());
        loaders.push(std::thread::spawn(move || {
            let (mut worst, mut count, mut x) = (Duration::ZERO, 0u64, 0x9e37_79b9u64 + k);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Live objects only: containers 1..=fanout/2 and their leaves.
                let c = 1 + x % (fanout / 2);
                let t = Instant::now();
                let _ = s.read().load_before(Oid(c), Tid::MAX);
                worst = worst.max(t.elapsed());
                count += 1;
            }
            (worst, count)
        }));
    }
    let committer = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut worst, mut count, mut serial) = (Duration::ZERO, 0u64, Tid::ZERO);
            let oid = 10 * n + 7; // linked from nothing, written each time
            while !alone && !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                serial = commit(&s, 2, vec![store(oid, serial, vec![])]);
                worst = worst.max(t.elapsed());
                count += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (worst, count)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let t_gc = Instant::now();
    let report = s.pack(Tid(root_tid.0 + 1));
    let outcome = report.gc;
    let took = t_gc.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let loads: Vec<(Duration, u64)> = loaders
        .into_iter()
        .map(|h| h.join().expect("loader"))
        .collect();
    let (commit_worst, commits) = committer.join().expect("committer");
    let GcOutcome::Collected {
        examined,
        freed,
        longest_pause,
        holds,
    } = outcome
    else {
        panic!("unexpected {outcome:?}")
    };
    println!("objects examined:        {examined}");
    println!("objects freed:           {freed}");
    println!("pack (prune + collect):  {took:?}");
    println!(
        "longest collector pause: {longest_pause:?} (longest single hold of the storage lock, {})",
        holds.longest().0.name()
    );
    println!("storage-lock holds by kind (read or write; either blocks commits):");
    println!("  kind                  holds     longest        mean  <1ms <2ms <5ms <10ms >=10ms");
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    println!(
        "  {:<19} {:>7} {:>11}",
        "history drop (w)",
        1,
        ms(report.prune_hold)
    );
    for kind in HoldKind::ALL {
        let h = holds.get(kind);
        let b = h.buckets;
        println!(
            "  {:<19} {:>7} {:>11} {:>11} {:>5} {:>4} {:>4} {:>5} {:>6}",
            format!("{} ({})", kind.name(), kind.lock()),
            h.count,
            ms(h.longest),
            ms(h.total / h.count.max(1) as u32),
            b[0],
            b[1],
            b[2],
            b[3],
            b[4]
        );
    }
    println!(
        "slowest load during it:  {:?} ({} loads)",
        loads.iter().map(|l| l.0).max().unwrap_or_default(),
        loads.iter().map(|l| l.1).sum::<u64>()
    );
    println!("slowest commit during it: {commit_worst:?} ({commits} commits)");
    let all = HoldKind::ALL.map(|k| holds.get(k));
    let count: usize = all.iter().map(|h| h.count).sum();
    let over_5ms: usize = all.iter().map(|h| h.buckets[3] + h.buckets[4]).sum();
    println!("collector holds:         {count}, {over_5ms} of them 5 ms or longer");
    println!("objects left:            {}", s.read().len());
}
