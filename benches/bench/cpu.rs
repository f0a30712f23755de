//! Where a run's CPU goes: each process's user and system time, read from `/proc`.

use super::*;

/// The processes a web run shares the machine with, by name, and their pids.
pub(crate) struct Processes(Vec<(&'static str, u32)>);

/// CPU seconds each process used, by name.
pub(crate) type CpuUse = Vec<(&'static str, f64)>;

impl Processes {
    /// The bench itself (its clients and consumer), the database server of `bench` (by
    /// its `@@pid_file`) and the broker (`BENCH_BROKER_PID_FILE`); the ones it cannot
    /// find are left out.
    pub(crate) fn of(bench: &Bench) -> Processes {
        let mut found = vec![("bench (clients, consumer)", std::process::id())];
        let database = bench
            .pool
            .get_conn()
            .ok()
            .and_then(|mut conn| conn.query_first::<String, _>("SELECT @@pid_file").ok())
            .flatten()
            .and_then(|file| read_pid(&file));
        if let Some(pid) = database {
            found.push(("database", pid));
        }
        if let Some(pid) = std::env::var("BENCH_BROKER_PID_FILE")
            .ok()
            .and_then(|file| read_pid(&file))
        {
            found.push(("broker", pid));
        }
        Processes(found)
    }

    /// These processes and `more`, with the CPU seconds each has used so far.
    pub(crate) fn used(&self, more: &[(&'static str, u32)]) -> CpuUse {
        self.0
            .iter()
            .chain(more)
            .map(|&(name, pid)| (name, cpu_seconds(pid).unwrap_or(0.0)))
            .collect()
    }
}

/// Statements the server of `bench` has run so far (its `Questions`, the bench's own
/// reads of it included).
pub(crate) fn statements(bench: &Bench) -> f64 {
    bench
        .pool
        .get_conn()
        .ok()
        .and_then(|mut conn| {
            conn.query_first::<(String, f64), _>("SHOW GLOBAL STATUS LIKE 'Questions'")
                .ok()
        })
        .flatten()
        .map_or(0.0, |(_, n)| n)
}

/// What each process used between `before` and `after` (taken with the same `more`).
pub(crate) fn spent(before: &CpuUse, after: &CpuUse) -> CpuUse {
    before
        .iter()
        .zip(after)
        .map(|(&(name, b), &(_, a))| (name, (a - b).max(0.0)))
        .collect()
}

fn read_pid(file: &str) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// User and system CPU seconds of process `pid`, all its threads.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces, in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / per_second.max(1) as f64)
}
