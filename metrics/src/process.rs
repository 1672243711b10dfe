//! The `process_*` families Prometheus client libraries export, read from
//! `/proc/self` on each scrape (Linux only; elsewhere the collector
//! encodes nothing).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::{encode_counters, encode_gauges};

/// Linux reports CPU times in clock ticks of `USER_HZ`, which is 100 on
/// every architecture Linux ships (`sysconf(_SC_CLK_TCK)`).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What one scrape read.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    start_time_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    threads: i64,
    open_fds: i64,
}

/// Fields of `/proc/self/stat` after the command name (which may hold
/// spaces and parentheses, so the split is at the last `)`), and the
/// boot time from `/proc/stat`.
fn parse(stat: &str, boot_time: f64, status: &str, fds: i64) -> Option<Sample> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the man page, so field n is
    // f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<i64>().ok())
            .map(|v| v * 1024)
    };
    Some(Sample {
        cpu_seconds: (num(14)? + num(15)?) / TICKS_PER_SECOND,
        start_time_seconds: boot_time + num(22)? / TICKS_PER_SECOND,
        resident_bytes: kb("VmRSS:").unwrap_or(0),
        virtual_bytes: kb("VmSize:").unwrap_or(0),
        threads: num(20)? as i64,
        open_fds: fds,
    })
}

fn boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn read() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    parse(&stat, boot, &status, fds)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(s) = read() else {
            return Ok(());
        };
        encode_counters(
            &mut encoder,
            [(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                s.cpu_seconds,
            )],
        )?;
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                s.start_time_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes",
                s.virtual_bytes as f64,
            ),
            (
                "process_threads",
                "OS threads of the process",
                s.threads as f64,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                s.open_fds as f64,
            ),
        ];
        encode_gauges(&mut encoder, gauges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_and_parentheses_in_the_name_parses() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 \
                    100 0 0 0 250 50 0 0 20 0 12 0 3000 1000000 500 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let status = "Name:\tmagnetar\nVmSize:\t  2048 kB\nVmRSS:\t    1024 kB\n";
        let s = parse(stat, 1_700_000_000.0, status, 7).expect("parses");
        assert_eq!(
            s,
            Sample {
                cpu_seconds: 3.0,
                start_time_seconds: 1_700_000_030.0,
                resident_bytes: 1024 * 1024,
                virtual_bytes: 2048 * 1024,
                threads: 12,
                open_fds: 7,
            }
        );
    }

    #[test]
    fn this_process_reads_itself() {
        let s = read().expect("/proc/self is there");
        assert!(
            s.resident_bytes > 0 && s.open_fds > 0 && s.threads > 0,
            "{s:?}"
        );
        assert!(s.start_time_seconds > 1_600_000_000.0, "{s:?}");
    }

    #[test]
    fn the_boot_time_line_is_found() {
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000.0)
        );
        assert_eq!(boot_time("cpu 1 2\n"), None);
    }
}
