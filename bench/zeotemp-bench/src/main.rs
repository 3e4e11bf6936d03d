//! `zeotemp-bench`: a ZEO 5 load generator. Parses the command line, runs
//! [`zeotemp_bench::run`] and prints its figures.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use zeotemp_bench::{Options, Workload};

/// Drives a ZEO 5 server (zeotemp or the stock Python ZEO) with pipelined
/// requests (or, zope, the real client's one at a time) over N connections
/// and reports throughput, latency percentiles and, with --server-pid, the
/// server's CPU time (user and system, per reply and per transaction) and
/// peak RSS.
#[derive(Parser, Debug)]
#[command(name = "zeotemp-bench", version, about, long_about)]
struct Cli {
    /// The server's HOST:PORT.
    #[arg(short, long, value_name = "HOST:PORT")]
    address: String,

    /// The storage name to register on.
    #[arg(long, default_value = "1")]
    storage: String,

    /// load: pipelined loadBefore of random objects; commit: transactions
    /// of 5 new objects; session: 90 % hot loads, 10 % rewrites of 1-2 hot
    /// objects with conflict resolution; echo: ping round trips; zope: the
    /// stock ClientStorage's shape, one request in flight per connection
    /// (--in-flight ignored): per transaction lastTransaction, loads of the
    /// objects invalidated since the last one (and 1 in 4 a random object),
    /// and half of them commit the connection's session object (1 in 10
    /// also a shared one), whose invalidations reach every other connection.
    #[arg(short, long, value_enum)]
    workload: Workload,

    /// Client connections, one tokio task each.
    #[arg(short, long, default_value_t = 1)]
    connections: usize,

    /// Requests kept outstanding per connection (commit: always one
    /// transaction at a time).
    #[arg(short = 'k', long, default_value_t = 1)]
    in_flight: usize,

    /// Seconds to measure (after setup).
    #[arg(short, long, value_name = "SECS", default_value_t = 10.0)]
    duration: f64,

    /// Objects committed in setup (load, session, zope; zope needs at least
    /// connections + 4).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    objects: usize,

    /// Bytes per object record.
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    object_size: usize,

    /// The server's process id, to report its CPU time in the measured
    /// window and its peak RSS (from /proc).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,

    /// Create FILE when the measured window starts (after setup), for
    /// scripts that attach tools (strace, perf) to the server then.
    #[arg(long, value_name = "FILE")]
    start_file: Option<std::path::PathBuf>,

    /// Print one JSON object on stdout (the human-readable block goes to
    /// stderr).
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !(cli.duration.is_finite() && cli.duration > 0.0) {
        eprintln!("zeotemp-bench: --duration must be a positive number of seconds");
        return ExitCode::FAILURE;
    }
    let opts = Options {
        address: cli.address,
        storage: cli.storage,
        workload: cli.workload,
        connections: cli.connections,
        in_flight: cli.in_flight,
        duration: Duration::from_secs_f64(cli.duration),
        objects: cli.objects,
        object_size: cli.object_size,
        server_pid: cli.server_pid,
        start_file: cli.start_file,
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zeotemp-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match rt.block_on(zeotemp_bench::run(&opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zeotemp-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.json {
        eprint!("{}", report.render());
        match serde_json::to_string(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("zeotemp-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render());
    }
    ExitCode::SUCCESS
}
