//! The memory this process may use at most — its cgroup's limit (v2
//! `memory.max`, v1 `memory.limit_in_bytes`) or, without one, the machine's
//! physical memory (`MemTotal`) — and the memory budget's default derived
//! from it.
//!
//! Why half: the budget counts what the server holds on behalf of clients
//! (sessions, replay caches, messages in flight), not the memory around it:
//! libtorch and the runtime (a few hundred MiB), the working tensors of
//! computations under way (a train Forward allocates about its input again
//! for the output, plus the reply's encoding), and the freed buffers the
//! allocator keeps for reuse (`memory::malloc` keeps up to 256 MiB of free
//! heap and 64 MiB of slack per arena so that large messages are not faulted
//! in again on every call). Half of the limit leaves the other half to them,
//! so that a full budget stays below the point where the kernel's OOM killer
//! would end the process (and every session with it).

use std::path::{Path, PathBuf};

/// The share of the memory limit the budget defaults to: numerator, denominator.
pub const DEFAULT_SHARE: (u64, u64) = (1, 2);

/// Limits at or above this are "no limit" (cgroup v1 writes 2^63 rounded
/// down to a page; v2 writes "max").
const UNLIMITED: u64 = 1 << 62;

/// The memory the process may use at most, and where that number came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// "cgroup v2 memory.max", "cgroup v1 memory.limit_in_bytes" or "MemTotal".
    pub source: &'static str,
}

/// The process' memory limit: its cgroup's when one is set below the
/// physical memory, else the physical memory; `None` where neither can be
/// read (not Linux).
pub fn memory_limit() -> Option<MemoryLimit> {
    let physical = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text))
        .map(|bytes| MemoryLimit {
            bytes,
            source: "MemTotal",
        });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|membership| cgroup_limit(&membership, Path::new("/sys/fs/cgroup")));
    match (cgroup, physical) {
        (Some(cgroup), Some(physical)) if cgroup.bytes >= physical.bytes => Some(physical),
        (Some(cgroup), _) => Some(cgroup),
        (None, physical) => physical,
    }
}

/// The default budget: [`DEFAULT_SHARE`] of `limit`.
pub fn default_budget(limit: &MemoryLimit) -> u64 {
    let (numerator, denominator) = DEFAULT_SHARE;
    limit.bytes / denominator * numerator
}

/// The budget in force: `configured` (`--memory-budget`), else the default
/// from this process' memory limit, else no limit (where none can be read);
/// with a sentence saying where it came from, for the start-up log.
pub fn resolve_budget(configured: Option<u64>) -> (u64, String) {
    if let Some(bytes) = configured {
        return (bytes, "--memory-budget".to_owned());
    }
    match memory_limit() {
        Some(limit) => {
            let (numerator, denominator) = DEFAULT_SHARE;
            (
                default_budget(&limit),
                format!(
                    "{numerator}/{denominator} of {} ({})",
                    super::format_bytes(limit.bytes),
                    limit.source
                ),
            )
        }
        None => (u64::MAX, "no memory limit found: unlimited".to_owned()),
    }
}

/// The embedded store's page cache under a budget of `budget` bytes: an
/// eighth of it, between 8 MiB and redb's default of 1 GiB. redb keeps the
/// pages it wrote and read up to this size; left at its default it would
/// hold up to 1 GiB beside a budget of any size (about two copies of every
/// record written, until full).
pub fn store_cache_bytes(budget: u64) -> u64 {
    (budget / 8).clamp(8 << 20, 1 << 30)
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The tightest memory limit of the cgroups `membership` (the text of
/// /proc/self/cgroup) names, under the cgroup file system at `root`: the
/// process' own cgroup and its ancestors (a limit set on a parent applies
/// too). v2 (`0::/path`) first, then v1's memory controller.
fn cgroup_limit(membership: &str, root: &Path) -> Option<MemoryLimit> {
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            let limit = tightest(&root.join("unified"), path, "memory.max")
                .or_else(|| tightest(root, path, "memory.max"));
            if let Some(bytes) = limit {
                return Some(MemoryLimit {
                    bytes,
                    source: "cgroup v2 memory.max",
                });
            }
        }
    }
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            if let Some(bytes) = tightest(&root.join("memory"), path, "memory.limit_in_bytes") {
                return Some(MemoryLimit {
                    bytes,
                    source: "cgroup v1 memory.limit_in_bytes",
                });
            }
        }
    }
    None
}

/// The smallest limit in `file` of the cgroup at `path` under `mount` and of
/// its ancestors up to the mount itself (where a cgroup namespace puts the
/// process' own cgroup); `None` when none of them sets one.
fn tightest(mount: &Path, path: &str, file: &str) -> Option<u64> {
    let mut directory = PathBuf::from(mount);
    let mut candidates = vec![directory.join(file)];
    for part in path.split('/').filter(|p| !p.is_empty()) {
        directory.push(part);
        candidates.push(directory.join(file));
    }
    candidates
        .iter()
        .filter_map(|candidate| std::fs::read_to_string(candidate).ok())
        .filter_map(|text| text.trim().parse::<u64>().ok())
        .filter(|&bytes| bytes < UNLIMITED)
        .min()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(root: &Path, relative: &str, text: &str) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_tightest_cgroup_v2_limit_of_the_process_and_its_parents_wins() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "pod/memory.max", "4294967296\n");
        write(root.path(), "pod/app/memory.max", "max\n");
        let limit = cgroup_limit("0::/pod/app\n", root.path()).unwrap();
        assert_eq!(limit.bytes, 4 << 30);
        assert_eq!(limit.source, "cgroup v2 memory.max");
        // A namespaced process sees its own cgroup at the mount's root.
        let namespaced = tempfile::tempdir().unwrap();
        write(namespaced.path(), "memory.max", "1073741824\n");
        assert_eq!(
            cgroup_limit("0::/\n", namespaced.path()).unwrap().bytes,
            1 << 30
        );
    }

    #[test]
    fn cgroup_v1_unlimited_is_no_limit_and_a_set_one_is_read() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        let membership = "4:memory:/job\n0::/\n";
        assert_eq!(cgroup_limit(membership, root.path()), None);
        write(
            root.path(),
            "memory/job/memory.limit_in_bytes",
            "536870912\n",
        );
        let limit = cgroup_limit(membership, root.path()).unwrap();
        assert_eq!(limit.bytes, 512 << 20);
        assert_eq!(limit.source, "cgroup v1 memory.limit_in_bytes");
    }

    #[test]
    fn mem_total_is_read_in_kib_and_the_default_is_half() {
        let meminfo = "MemTotal:       24684096 kB\nMemFree:  1 kB\n";
        let bytes = mem_total(meminfo).unwrap();
        assert_eq!(bytes, 24_684_096 * 1024);
        let limit = MemoryLimit {
            bytes,
            source: "MemTotal",
        };
        assert_eq!(default_budget(&limit), bytes / 2);
    }
}
