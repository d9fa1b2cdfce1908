//! `io.containerd.cgroups.v2.Metrics` from a unified cgroup, field by field as containerd's
//! cgroup2 manager fills it (github.com/containerd/cgroups `cgroup2.Manager.Stat`).

use std::path::Path;

use protobuf::MessageField;
use protocol::cgroups_v2::*;

use super::{flat_keyed, hugetlb_sizes, read, read_u64};

/// Every figure the cgroup's enabled controllers expose; a file that is missing (controller
/// not enabled for the cgroup, no swap accounting, old kernel) is a zero, never an error.
pub(super) fn metrics(d: &Path) -> Metrics {
    let mut m = Metrics::new();
    // containerd reports "max" (no limit) as u64::MAX on v2; `read_u64` does the same.
    m.pids = MessageField::some(PidsStat {
        current: read_u64(d, "pids.current"),
        limit: read_u64(d, "pids.max"),
        ..Default::default()
    });
    m.cpu = MessageField::some(cpu(&read(d, "cpu.stat").unwrap_or_default()));
    let mut mem = memory_stat(&read(d, "memory.stat").unwrap_or_default());
    mem.usage = read_u64(d, "memory.current");
    mem.usage_limit = read_u64(d, "memory.max");
    mem.swap_usage = read_u64(d, "memory.swap.current");
    mem.swap_limit = read_u64(d, "memory.swap.max");
    mem.max_usage = read_u64(d, "memory.peak");
    mem.swap_max_usage = read_u64(d, "memory.swap.peak");
    m.memory = MessageField::some(mem);
    m.memory_events = read(d, "memory.events").map(|t| memory_events(&t)).into();
    m.io = MessageField::some(IOStat {
        usage: io_stat(&read(d, "io.stat").unwrap_or_default()),
        ..Default::default()
    });
    m.hugetlb = hugetlb_sizes(d, ".current")
        .into_iter()
        .map(|size| HugeTlbStat {
            current: read_u64(d, &format!("hugetlb.{size}.current")),
            max: read_u64(d, &format!("hugetlb.{size}.max")),
            pagesize: size,
            ..Default::default()
        })
        .collect();
    m
}

fn cpu(text: &str) -> CPUStat {
    let kv = flat_keyed(text);
    let get = |k| kv.get(k).copied().unwrap_or(0);
    CPUStat {
        usage_usec: get("usage_usec"),
        user_usec: get("user_usec"),
        system_usec: get("system_usec"),
        nr_periods: get("nr_periods"),
        nr_throttled: get("nr_throttled"),
        throttled_usec: get("throttled_usec"),
        ..Default::default()
    }
}

fn memory_stat(text: &str) -> MemoryStat {
    let kv = flat_keyed(text);
    let get = |k: &str| kv.get(k).copied().unwrap_or(0);
    // Linux 5.9 split workingset_* into _anon and _file; containerd's field is the sum.
    let ws = |k: &str| match kv.get(k) {
        Some(v) => *v,
        None => get(&format!("{k}_anon")) + get(&format!("{k}_file")),
    };
    MemoryStat {
        anon: get("anon"),
        file: get("file"),
        kernel_stack: get("kernel_stack"),
        slab: get("slab"),
        sock: get("sock"),
        shmem: get("shmem"),
        file_mapped: get("file_mapped"),
        file_dirty: get("file_dirty"),
        file_writeback: get("file_writeback"),
        anon_thp: get("anon_thp"),
        inactive_anon: get("inactive_anon"),
        active_anon: get("active_anon"),
        inactive_file: get("inactive_file"),
        active_file: get("active_file"),
        unevictable: get("unevictable"),
        slab_reclaimable: get("slab_reclaimable"),
        slab_unreclaimable: get("slab_unreclaimable"),
        pgfault: get("pgfault"),
        pgmajfault: get("pgmajfault"),
        workingset_refault: ws("workingset_refault"),
        workingset_activate: ws("workingset_activate"),
        workingset_nodereclaim: get("workingset_nodereclaim"),
        pgrefill: get("pgrefill"),
        pgscan: get("pgscan"),
        pgsteal: get("pgsteal"),
        pgactivate: get("pgactivate"),
        pgdeactivate: get("pgdeactivate"),
        pglazyfree: get("pglazyfree"),
        pglazyfreed: get("pglazyfreed"),
        thp_fault_alloc: get("thp_fault_alloc"),
        thp_collapse_alloc: get("thp_collapse_alloc"),
        ..Default::default()
    }
}

fn memory_events(text: &str) -> MemoryEvents {
    let kv = flat_keyed(text);
    let get = |k| kv.get(k).copied().unwrap_or(0);
    MemoryEvents {
        low: get("low"),
        high: get("high"),
        max: get("max"),
        oom: get("oom"),
        oom_kill: get("oom_kill"),
        ..Default::default()
    }
}

/// `io.stat`: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N` per device.
fn io_stat(text: &str) -> Vec<IOEntry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (maj, min) = f.next()?.split_once(':')?;
            let mut e = IOEntry {
                major: maj.parse().ok()?,
                minor: min.parse().ok()?,
                ..Default::default()
            };
            for kv in f {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_stat_and_workingset_split() {
        let m = memory_stat(
            "anon 1000\nfile 2000\nslab 30\npgmajfault 4\nworkingset_refault_anon 5\n\
             workingset_refault_file 6\nworkingset_activate 7\nthp_fault_alloc 8\n",
        );
        assert_eq!((m.anon, m.file, m.slab, m.pgmajfault), (1000, 2000, 30, 4));
        assert_eq!(m.workingset_refault, 11);
        assert_eq!(m.workingset_activate, 7);
        assert_eq!(m.thp_fault_alloc, 8);
    }

    #[test]
    fn io_stat_lines() {
        let e =
            io_stat("8:0 rbytes=4096 wbytes=512 rios=2 wios=1 dbytes=0 dios=0\n253:3 rbytes=1\n");
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].major, e[0].minor, e[0].rbytes), (8, 0, 4096));
        assert_eq!((e[0].wbytes, e[0].rios, e[0].wios), (512, 2, 1));
        assert_eq!((e[1].major, e[1].minor, e[1].rbytes), (253, 3, 1));
    }

    #[test]
    fn reads_a_fixture_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (f, v) in [
            ("pids.current", "2\n"),
            ("pids.max", "max\n"),
            (
                "cpu.stat",
                "usage_usec 900\nuser_usec 600\nsystem_usec 300\n",
            ),
            ("memory.stat", "anon 4096\nfile 8192\n"),
            ("memory.current", "16384\n"),
            ("memory.max", "20971520\n"),
            ("memory.swap.max", "max\n"),
            ("memory.events", "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n"),
            ("hugetlb.2MB.current", "0\n"),
            ("hugetlb.2MB.max", "max\n"),
            ("hugetlb.2MB.events", "max 0\n"),
        ] {
            std::fs::write(d.join(f), v).unwrap();
        }
        let m = metrics(d);
        assert_eq!((m.pids.current, m.pids.limit), (2, u64::MAX));
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec),
            (900, 600, 300)
        );
        assert_eq!(
            m.cpu.nr_periods, 0,
            "no cpu controller: no throttling figures"
        );
        assert_eq!((m.memory.anon, m.memory.file), (4096, 8192));
        assert_eq!((m.memory.usage, m.memory.usage_limit), (16384, 20971520));
        assert_eq!((m.memory.swap_usage, m.memory.swap_limit), (0, u64::MAX));
        assert_eq!((m.memory_events.max, m.memory_events.oom_kill), (9, 1));
        assert_eq!(m.hugetlb.len(), 1);
        assert_eq!(
            (m.hugetlb[0].pagesize.as_str(), m.hugetlb[0].max),
            ("2MB", u64::MAX)
        );
        assert!(m.io.usage.is_empty());
    }
}
