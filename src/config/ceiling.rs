//! The memory this process can have: the machine's (`MemTotal`) or, when
//! smaller, its cgroup's limit (a container's or a systemd unit's
//! `MemoryMax=`). The default `memory-limit` is a fraction of it
//! ([`super::DEFAULT_MEMORY_LIMIT_FRACTION`]).
//!
//! The cgroup is the process's own, from `/proc/self/cgroup`: cgroup v2
//! (`0::/path`) reads `memory.max` and `memory.high` (above which the
//! kernel throttles the process hard; systemd's `MemoryHigh=`) in
//! `<root>/path`, v1 (the line whose
//! controllers include `memory`) reads `memory.limit_in_bytes` in
//! `<root>/memory/path`. A limit on a parent cgroup applies to its
//! children, so every directory from the process's own up to the root is
//! read and the smallest limit wins. A missing or unreadable file is no
//! limit; so are `max` (v2) and v1's "unlimited" (a huge number).

use std::path::{Component, Path, PathBuf};

/// Where the cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Test hook: when set, the cgroup file system is read under this
/// directory instead of [`CGROUP_ROOT`] (`tests/python/test_memory_budget.py`
/// gives the server a fake, smaller cgroup limit with it). Not a setting:
/// nothing in production should set it.
pub const CGROUP_ROOT_ENV: &str = "ZEOTEMP_CGROUP_ROOT";

/// A v1 `memory.limit_in_bytes` at or above this is "unlimited" (the
/// kernel writes `PAGE_COUNTER_MAX` pages, 9223372036854771712 with 4 KiB
/// pages, rounded to the page size).
const V1_UNLIMITED: u64 = 1 << 62;

/// The memory the process can have, and where each figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryCeiling {
    /// `MemTotal` from /proc/meminfo, in bytes.
    pub ram: Option<usize>,
    /// The smallest memory limit of the process's cgroup and its parents.
    pub cgroup: Option<usize>,
}

impl MemoryCeiling {
    /// This process's ceiling, from /proc and the cgroup file system
    /// (under `$ZEOTEMP_CGROUP_ROOT` if set, see [`CGROUP_ROOT_ENV`]).
    pub fn of_this_process() -> MemoryCeiling {
        let root = std::env::var_os(CGROUP_ROOT_ENV)
            .map_or_else(|| PathBuf::from(CGROUP_ROOT), PathBuf::from);
        MemoryCeiling::read(
            Path::new("/proc/meminfo"),
            Path::new("/proc/self/cgroup"),
            &root,
        )
    }

    /// The ceiling from a `meminfo` file, a `/proc/self/cgroup` file and
    /// the root of the cgroup file systems (any of them may be missing).
    pub fn read(meminfo: &Path, self_cgroup: &Path, cgroup_root: &Path) -> MemoryCeiling {
        MemoryCeiling {
            ram: std::fs::read_to_string(meminfo)
                .ok()
                .and_then(|t| mem_total(&t)),
            cgroup: std::fs::read_to_string(self_cgroup)
                .ok()
                .and_then(|t| cgroup_limit(&t, cgroup_root)),
        }
    }

    /// The smaller of the two, if either is known.
    pub fn bytes(&self) -> Option<usize> {
        match (self.ram, self.cgroup) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }

    /// Which figure [`bytes`](Self::bytes) is, for the start-up line: "the
    /// cgroup limit 4 GiB" or "the machine's memory 23.5 GiB".
    pub fn describe(&self) -> String {
        let bytes = super::human_bytes(self.bytes().unwrap_or(0));
        if self.cgroup.is_some() && self.bytes() == self.cgroup {
            format!("the cgroup limit {bytes}")
        } else {
            format!("the machine's memory {bytes}")
        }
    }
}

/// `MemTotal` of a /proc/meminfo text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The smallest memory limit of the cgroup `self_cgroup` (the text of
/// /proc/self/cgroup) names and its parents, v1 and v2, under
/// `cgroup_root`.
pub fn cgroup_limit(self_cgroup: &str, cgroup_root: &Path) -> Option<usize> {
    let mut limits = Vec::new();
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            // memory.high (systemd's MemoryHigh=) throttles the process
            // hard above it: as much a ceiling as memory.max.
            for file in ["memory.max", "memory.high"] {
                limits.extend(walk_up(
                    &cgroup_root.join(relative(path)),
                    cgroup_root,
                    file,
                ));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let root = cgroup_root.join("memory");
            limits.extend(walk_up(
                &root.join(relative(path)),
                &root,
                "memory.limit_in_bytes",
            ));
        }
    }
    limits.into_iter().min()
}

/// A cgroup path as a relative path: its normal components only (a path
/// outside the process's cgroup namespace shows as `/../..`).
fn relative(path: &str) -> PathBuf {
    Path::new(path.trim())
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// The limits in `file` from `dir` up to `root`, both included.
fn walk_up(dir: &Path, root: &Path, file: &str) -> Vec<usize> {
    let mut found = Vec::new();
    let mut dir = dir.to_path_buf();
    loop {
        if let Some(limit) = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| parse_limit(&t))
        {
            found.push(limit);
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return found;
        }
    }
}

/// A `memory.max` or `memory.limit_in_bytes` value: bytes, or `None` for
/// "max", v1's "unlimited" or anything unreadable.
fn parse_limit(text: &str) -> Option<usize> {
    let n: u64 = text.trim().parse().ok()?;
    if n >= V1_UNLIMITED {
        return None;
    }
    usize::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    /// A fresh temporary directory (removed at the end of the test).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("zeotemp-ceiling-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn put(&self, rel: &str, text: &str) {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ceiling(t: &TempDir) -> MemoryCeiling {
        MemoryCeiling::read(
            &t.0.join("meminfo"),
            &t.0.join("self-cgroup"),
            &t.0.join("fs"),
        )
    }

    const MEMINFO: &str = "MemTotal:       24683772 kB\nMemFree:         1000000 kB\n";

    #[test]
    fn v2_memory_high_counts_too() {
        let t = TempDir::new("v2-high");
        t.put("meminfo", MEMINFO);
        t.put("self-cgroup", "0::/system.slice/zeotemp.service\n");
        t.put("fs/system.slice/zeotemp.service/memory.max", "4294967296\n");
        t.put(
            "fs/system.slice/zeotemp.service/memory.high",
            "2147483648\n",
        );
        assert_eq!(ceiling(&t).cgroup, Some(2 * GIB));
        t.put("fs/system.slice/zeotemp.service/memory.high", "max\n");
        assert_eq!(ceiling(&t).cgroup, Some(4 * GIB));
    }

    #[test]
    fn v2_memory_max_below_ram_is_the_ceiling() {
        let t = TempDir::new("v2");
        t.put("meminfo", MEMINFO);
        t.put("self-cgroup", "0::/system.slice/zeotemp.service\n");
        t.put("fs/system.slice/zeotemp.service/memory.max", "4294967296\n");
        let c = ceiling(&t);
        assert_eq!(c.ram, Some(24683772 * 1024));
        assert_eq!(c.cgroup, Some(4 * GIB));
        assert_eq!(c.bytes(), Some(4 * GIB));
        assert_eq!(c.describe(), "the cgroup limit 4 GiB");
    }

    #[test]
    fn max_is_no_limit_and_ram_is_the_ceiling() {
        let t = TempDir::new("max");
        t.put("meminfo", MEMINFO);
        t.put("self-cgroup", "0::/user.slice\n");
        t.put("fs/user.slice/memory.max", "max\n");
        let c = ceiling(&t);
        assert_eq!(c.cgroup, None);
        assert_eq!(c.bytes(), Some(24683772 * 1024));
        assert_eq!(c.describe(), "the machine's memory 23.5 GiB");
    }

    #[test]
    fn a_cgroup_limit_above_ram_does_not_count() {
        let t = TempDir::new("above");
        t.put("meminfo", MEMINFO);
        t.put("self-cgroup", "0::/\n");
        t.put("fs/memory.max", &(64 * GIB).to_string());
        let c = ceiling(&t);
        assert_eq!(c.cgroup, Some(64 * GIB));
        assert_eq!(c.bytes(), c.ram);
        assert!(c.describe().starts_with("the machine's memory"));
    }

    #[test]
    fn v1_memory_line_and_its_unlimited_value() {
        let t = TempDir::new("v1");
        t.put("meminfo", MEMINFO);
        // This machine's own /proc/self/cgroup (hybrid: v1 memory, v2 "0::/").
        t.put(
            "self-cgroup",
            "9:name=systemd:/\n4:memory:/process_api/9ca7\n1:cpu,cpuacct:/\n0::/\n",
        );
        t.put("fs/memory/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(ceiling(&t).cgroup, None, "v1's unlimited");
        t.put(
            "fs/memory/process_api/9ca7/memory.limit_in_bytes",
            "2147483648\n",
        );
        assert_eq!(ceiling(&t).cgroup, Some(2 * GIB));
        assert_eq!(ceiling(&t).bytes(), Some(2 * GIB));
        // A controller list that merely contains "memory" as a substring
        // is not the memory controller.
        let t2 = TempDir::new("v1-names");
        t2.put("self-cgroup", "4:memoryish:/a\n");
        t2.put("fs/memory/a/memory.limit_in_bytes", "1048576\n");
        assert_eq!(ceiling(&t2).cgroup, None);
        // Co-mounted controllers ("cpu,memory") are found.
        t2.put("self-cgroup", "4:cpu,memory:/a\n");
        assert_eq!(ceiling(&t2).cgroup, Some(1 << 20));
    }

    #[test]
    fn nested_cgroups_the_smallest_limit_up_the_tree_wins() {
        let t = TempDir::new("nested");
        t.put("meminfo", MEMINFO);
        t.put("self-cgroup", "0::/kubepods/pod1/ctr\n");
        t.put("fs/kubepods/memory.max", &(8 * GIB).to_string());
        t.put("fs/kubepods/pod1/memory.max", &(3 * GIB).to_string());
        t.put("fs/kubepods/pod1/ctr/memory.max", "max");
        assert_eq!(
            ceiling(&t).cgroup,
            Some(3 * GIB),
            "the parent's limit applies"
        );
        // The process's own directory need not exist (or be readable).
        t.put("self-cgroup", "0::/kubepods/pod1/gone/deeper\n");
        assert_eq!(ceiling(&t).cgroup, Some(3 * GIB));
        // A path outside the namespace (`/../..`) stays under the root.
        t.put("self-cgroup", "0::/../../kubepods\n");
        assert_eq!(ceiling(&t).cgroup, Some(8 * GIB));
    }

    #[test]
    fn missing_or_garbled_files_are_no_limit() {
        let t = TempDir::new("missing");
        let c = ceiling(&t);
        assert_eq!(c, MemoryCeiling::default());
        assert_eq!(c.bytes(), None);
        t.put("meminfo", "MemFree: 12 kB\n");
        t.put("self-cgroup", "garbage\n0::\n::\n");
        t.put("fs/memory.max", "-5\n");
        assert_eq!(ceiling(&t), MemoryCeiling::default());
        t.put("fs/memory.max", "12 MiB");
        assert_eq!(ceiling(&t).cgroup, None);
        t.put("fs/memory.max", "");
        assert_eq!(ceiling(&t).cgroup, None);
        // A cgroup limit without MemTotal is the ceiling on its own.
        t.put("fs/memory.max", "1073741824");
        assert_eq!(ceiling(&t).bytes(), Some(GIB));
    }

    #[test]
    fn mem_total_parses_kib() {
        assert_eq!(mem_total(MEMINFO), Some(24683772 * 1024));
        assert_eq!(mem_total("MemTotal: x kB"), None);
        assert_eq!(mem_total(""), None);
        assert_eq!(mem_total(&format!("MemTotal: {} kB", usize::MAX)), None);
    }
}
