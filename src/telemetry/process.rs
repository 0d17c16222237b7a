//! The process' own metrics, under the names every Prometheus client library
//! uses (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...),
//! read from `/proc/self` at each scrape. Linux only: where `/proc` cannot be
//! read, or a value is missing, that metric is absent from the exposition.
//!
//! Owns the reading and parsing of `/proc`; knows nothing of the server.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The kernel's clock ticks per second in `/proc` times (USER_HZ): 100 on
/// every Linux architecture, fixed by the ABI (the Go client assumes it too).
const TICKS_PER_SECOND: f64 = 100.0;

/// Every process metric as it appears in the exposition.
pub const NAMES: [&str; 7] = [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_threads",
];

/// One reading of the process' figures; `None` where it could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessSample {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// The soft limit on open files (`None` when unlimited).
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
    pub threads: Option<u64>,
}

impl ProcessSample {
    /// Reads `/proc/self` now.
    pub fn read() -> ProcessSample {
        let proc_file = |path: &str| std::fs::read_to_string(path).ok();
        let stat = proc_file("/proc/self/stat")
            .as_deref()
            .and_then(parse_stat)
            .unwrap_or_default();
        let status = proc_file("/proc/self/status").unwrap_or_default();
        let boot_time = proc_file("/proc/stat").as_deref().and_then(parse_boot_time);
        ProcessSample {
            cpu_seconds: stat.cpu_ticks.map(|ticks| ticks as f64 / TICKS_PER_SECOND),
            resident_memory_bytes: status_kib(&status, "VmRSS:").map(|kib| kib * 1024),
            virtual_memory_bytes: stat.virtual_memory_bytes,
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|entries| entries.count() as u64),
            max_fds: proc_file("/proc/self/limits")
                .as_deref()
                .and_then(parse_max_open_files),
            start_time_seconds: boot_time
                .zip(stat.start_ticks)
                .map(|(boot, ticks)| boot as f64 + ticks as f64 / TICKS_PER_SECOND),
            threads: stat.threads,
        }
    }
}

/// The fields used from `/proc/self/stat`.
#[derive(Debug, Default, PartialEq)]
struct Stat {
    /// utime + stime.
    cpu_ticks: Option<u64>,
    threads: Option<u64>,
    /// Clock ticks after boot.
    start_ticks: Option<u64>,
    virtual_memory_bytes: Option<u64>,
}

/// Parses `/proc/<pid>/stat` (proc(5)). The command name, field 2, is in
/// parentheses and may itself hold spaces and parentheses: the fields are
/// counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, after_name) = text.rsplit_once(')')?;
    // Field 3 (state) is index 0 here, so field N is index N - 3.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
    Some(Stat {
        cpu_ticks: field(14).zip(field(15)).map(|(user, system)| user + system),
        threads: field(20),
        start_ticks: field(22),
        virtual_memory_bytes: field(23),
    })
}

/// A `Name:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits`.
fn parse_max_open_files(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The prometheus-client collector reading a [`ProcessSample`] per scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sample = ProcessSample::read();
        if let Some(seconds) = sample.cpu_seconds {
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
        }
        let whole = |value: Option<u64>| value.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let counts = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                whole(sample.resident_memory_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                whole(sample.virtual_memory_bytes),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                whole(sample.open_fds),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (soft limit)",
                whole(sample.max_fds),
            ),
        ];
        for (name, help, value) in counts {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        if let Some(seconds) = sample.start_time_seconds {
            let gauge = ConstGauge::new(seconds);
            gauge.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                None,
                gauge.metric_type(),
            )?)?;
        }
        if let Some(threads) = whole(sample.threads) {
            let gauge = ConstGauge::new(threads);
            gauge.encode(encoder.encode_descriptor(
                "process_threads",
                "Number of OS threads in the process",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // proc(5)'s layout, with a command name holding ") (" and spaces.
        let text = "4242 (a) (b c) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 17 0 123456 987654321 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                cpu_ticks: Some(325),
                threads: Some(17),
                start_ticks: Some(123_456),
                virtual_memory_bytes: Some(987_654_321),
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_limits_and_boot_time_lines_are_read() {
        let status = "Name:\tnormserve\nVmPeak:\t  200 kB\nVmRSS:\t   51200 kB\nThreads:\t9\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(51_200));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63432                63432                processes \n\
                      Max open files            1024                 1048576              files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_open_files(unlimited), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1764460800\nprocesses 9\n"),
            Some(1_764_460_800)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read_from_proc() {
        let sample = ProcessSample::read();
        // Oracles apart from the code under test: the task directory and the
        // system clock.
        let tasks = std::fs::read_dir("/proc/self/task").unwrap().count() as u64;
        let threads = sample.threads.unwrap();
        assert!(threads.abs_diff(tasks) <= 8, "{threads} vs {tasks}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = sample.start_time_seconds.unwrap();
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
        assert!(sample.resident_memory_bytes.unwrap() > 1 << 20);
        assert!(sample.virtual_memory_bytes.unwrap() >= sample.resident_memory_bytes.unwrap());
        assert!(sample.open_fds.unwrap() >= 3);
        assert!(sample.cpu_seconds.unwrap() >= 0.0);
    }
}
