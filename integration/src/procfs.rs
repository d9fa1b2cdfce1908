//! What the harness reads from /proc: processes, their command lines and states, and the
//! memory figures the benchmarks compare.

use std::fs;
use std::path::PathBuf;

use crate::error::{Error, IoContext};

pub(crate) fn list_pids() -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// argv of `pid`, or None if it is gone (or a kernel thread).
pub(crate) fn cmdline(pid: i32) -> Option<Vec<Vec<u8>>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(<[u8]>::to_vec)
            .collect(),
    )
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// `(state, ppid, starttime)` from `/proc/<pid>/stat`.
pub(crate) fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parens: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let ppid = f.get(1)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((state, ppid, start))
}

/// CPU time `pid` has used, user and system, in clock ticks (`utime + stime`).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `"<pid> <starttime>"`: identifies a process across pid reuse.
pub(crate) fn owner_token(pid: u32) -> Option<String> {
    let (_, _, start) = proc_stat(i32::try_from(pid).ok()?)?;
    Some(format!("{pid} {start}"))
}

fn smaps_rollup_kb(pid: i32, key: &str) -> Result<u64, Error> {
    let path = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
    let text = fs::read_to_string(&path).ctx_path("reading", &path)?;
    let prefix = format!("{key}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::Proc {
            path,
            what: format!("no {key} line"),
        })
}

/// Proportional set size of `pid` in KiB (`Pss` in `/proc/<pid>/smaps_rollup`):
/// the fair measure when comparing shims, since shared library pages are
/// split between the processes using them.
pub fn pss_kb(pid: i32) -> Result<u64, Error> {
    smaps_rollup_kb(pid, "Pss")
}

/// Resident set size of `pid` in KiB (`Rss` in `/proc/<pid>/smaps_rollup`).
pub fn rss_kb(pid: i32) -> Result<u64, Error> {
    smaps_rollup_kb(pid, "Rss")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_is_readable() {
        let pid = std::process::id() as i32;
        assert!(rss_kb(pid).expect("rss") > 0);
        assert!(pss_kb(pid).expect("pss") > 0);
    }

    #[test]
    fn own_cpu_time_grows_while_spinning() {
        let me = std::process::id();
        let before = cpu_ticks(me).expect("own cpu time");
        let t0 = std::time::Instant::now();
        while cpu_ticks(me).expect("own cpu time") < before + 2 {
            assert!(t0.elapsed().as_secs() < 30, "no cpu time counted");
        }
    }
}
