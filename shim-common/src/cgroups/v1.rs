//! `io.containerd.cgroups.v1.Metrics` from a cgroup v1 hierarchy, field by field as
//! containerd's own v1 collector fills it (github.com/containerd/cgroups `*.Stat`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use protobuf::MessageField;
use protocol::cgroups_v1::*;

use super::{flat_keyed, hugetlb_sizes, read, read_u64, read_u64_or};

/// USER_HZ: `cpuacct.stat` counts in clock ticks, which are 1/100 s on every Linux ABI
/// containerd supports; containerd converts with the same constant.
const NANOS_PER_TICK: u64 = 1_000_000_000 / 100;

/// Every figure we can read for the controllers in `dirs`; a controller that is not
/// mounted leaves its part empty.
pub(super) fn metrics(dirs: &HashMap<String, PathBuf>) -> Metrics {
    let dir = |c: &str| dirs.get(c).map(PathBuf::as_path);
    let mut m = Metrics::new();
    if let Some(d) = dir("pids") {
        m.pids = MessageField::some(PidsStat {
            current: read_u64(d, "pids.current"),
            // containerd reports "no limit" as 0 on v1.
            limit: read_u64_or(d, "pids.max", 0).unwrap_or(0),
            ..Default::default()
        });
    }
    if dir("cpuacct").is_some() || dir("cpu").is_some() {
        m.cpu = MessageField::some(CPUStat {
            usage: dir("cpuacct").map(cpu_usage).into(),
            throttling: dir("cpu")
                .and_then(|d| read(d, "cpu.stat"))
                .map(|t| throttle(&t))
                .into(),
            ..Default::default()
        });
    }
    if let Some(d) = dir("memory") {
        m.memory = MessageField::some(memory(d));
        m.memory_oom_control = read(d, "memory.oom_control")
            .map(|t| oom_control(&t))
            .into();
    }
    if let Some(d) = dir("blkio") {
        m.blkio = MessageField::some(blkio(d));
    }
    if let Some(d) = dir("hugetlb") {
        m.hugetlb = hugetlb(d);
    }
    m
}

fn cpu_usage(d: &Path) -> CPUUsage {
    let ticks = read(d, "cpuacct.stat")
        .map(|t| {
            let kv = flat_keyed(&t);
            let get = |k| kv.get(k).copied().unwrap_or(0) * NANOS_PER_TICK;
            (get("user"), get("system"))
        })
        .unwrap_or_default();
    CPUUsage {
        total: read_u64(d, "cpuacct.usage"),
        user: ticks.0,
        kernel: ticks.1,
        per_cpu: read(d, "cpuacct.usage_percpu")
            .map(|t| per_cpu(&t))
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// `cpuacct.usage_percpu`: nanoseconds per CPU, space separated.
fn per_cpu(text: &str) -> Vec<u64> {
    text.split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// `cpu.stat` of the cpu controller: CFS throttling.
fn throttle(text: &str) -> Throttle {
    let kv = flat_keyed(text);
    let get = |k| kv.get(k).copied().unwrap_or(0);
    Throttle {
        periods: get("nr_periods"),
        throttled_periods: get("nr_throttled"),
        throttled_time: get("throttled_time"),
        ..Default::default()
    }
}

fn memory(d: &Path) -> MemoryStat {
    let mut m = read(d, "memory.stat")
        .map(|t| memory_stat(&t))
        .unwrap_or_default();
    m.usage = memory_entry(d, "memory").into();
    // memory.memsw.* exist only with swap accounting, kmem only on kernels that still
    // have it: containerd skips them the same way.
    m.swap = memory_entry(d, "memory.memsw").into();
    m.kernel = memory_entry(d, "memory.kmem").into();
    m.kernel_tcp = memory_entry(d, "memory.kmem.tcp").into();
    m
}

fn memory_entry(d: &Path, prefix: &str) -> Option<MemoryEntry> {
    let usage = read_u64_or(d, &format!("{prefix}.usage_in_bytes"), u64::MAX)?;
    Some(MemoryEntry {
        usage,
        max: read_u64(d, &format!("{prefix}.max_usage_in_bytes")),
        limit: read_u64(d, &format!("{prefix}.limit_in_bytes")),
        failcnt: read_u64(d, &format!("{prefix}.failcnt")),
        ..Default::default()
    })
}

/// `memory.stat` into containerd's fields (their names differ from the file's in places:
/// `pgpgin` is `pg_pg_in`, `hierarchical_memsw_limit` is `hierarchical_swap_limit`).
fn memory_stat(text: &str) -> MemoryStat {
    let kv = flat_keyed(text);
    let get = |k: &str| kv.get(k).copied().unwrap_or(0);
    let total = |k: &str| get(&format!("total_{k}"));
    MemoryStat {
        cache: get("cache"),
        rss: get("rss"),
        rss_huge: get("rss_huge"),
        mapped_file: get("mapped_file"),
        dirty: get("dirty"),
        writeback: get("writeback"),
        pg_pg_in: get("pgpgin"),
        pg_pg_out: get("pgpgout"),
        pg_fault: get("pgfault"),
        pg_maj_fault: get("pgmajfault"),
        inactive_anon: get("inactive_anon"),
        active_anon: get("active_anon"),
        inactive_file: get("inactive_file"),
        active_file: get("active_file"),
        unevictable: get("unevictable"),
        hierarchical_memory_limit: get("hierarchical_memory_limit"),
        hierarchical_swap_limit: get("hierarchical_memsw_limit"),
        total_cache: total("cache"),
        total_rss: total("rss"),
        total_rss_huge: total("rss_huge"),
        total_mapped_file: total("mapped_file"),
        total_dirty: total("dirty"),
        total_writeback: total("writeback"),
        total_pg_pg_in: total("pgpgin"),
        total_pg_pg_out: total("pgpgout"),
        total_pg_fault: total("pgfault"),
        total_pg_maj_fault: total("pgmajfault"),
        total_inactive_anon: total("inactive_anon"),
        total_active_anon: total("active_anon"),
        total_inactive_file: total("inactive_file"),
        total_active_file: total("active_file"),
        total_unevictable: total("unevictable"),
        ..Default::default()
    }
}

fn oom_control(text: &str) -> MemoryOomControl {
    let kv = flat_keyed(text);
    let get = |k| kv.get(k).copied().unwrap_or(0);
    MemoryOomControl {
        oom_kill_disable: get("oom_kill_disable"),
        under_oom: get("under_oom"),
        oom_kill: get("oom_kill"),
        ..Default::default()
    }
}

fn blkio(d: &Path) -> BlkIOStat {
    let mut names = DeviceNames::default();
    let mut entries = |file: &str| -> Vec<BlkIOEntry> {
        read(d, file)
            .map(|t| blkio_entries(&t, &mut |maj, min| names.get(maj, min)))
            .unwrap_or_default()
    };
    // The CFQ files exist only with the CFQ/BFQ scheduler's legacy names; on every other
    // kernel only the throttle layer counts, exactly as containerd falls back.
    if d.join("blkio.io_serviced_recursive").exists() {
        BlkIOStat {
            io_service_bytes_recursive: entries("blkio.io_service_bytes_recursive"),
            io_serviced_recursive: entries("blkio.io_serviced_recursive"),
            io_queued_recursive: entries("blkio.io_queued_recursive"),
            io_service_time_recursive: entries("blkio.io_service_time_recursive"),
            io_wait_time_recursive: entries("blkio.io_wait_time_recursive"),
            io_merged_recursive: entries("blkio.io_merged_recursive"),
            io_time_recursive: entries("blkio.time_recursive"),
            sectors_recursive: entries("blkio.sectors_recursive"),
            ..Default::default()
        }
    } else {
        BlkIOStat {
            io_service_bytes_recursive: entries("blkio.throttle.io_service_bytes"),
            io_serviced_recursive: entries("blkio.throttle.io_serviced"),
            ..Default::default()
        }
    }
}

/// Lines `MAJ:MIN [Op] VALUE`; the summary line `Total N` is skipped.
fn blkio_entries(text: &str, name: &mut dyn FnMut(u64, u64) -> String) -> Vec<BlkIOEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dev, op, value) = match f.as_slice() {
                [dev, op, value] => (*dev, *op, *value),
                [dev, value] => (*dev, "", *value),
                _ => return None,
            };
            let (maj, min) = dev.split_once(':')?;
            let (major, minor) = (maj.parse().ok()?, min.parse().ok()?);
            Some(BlkIOEntry {
                op: op.to_string(),
                device: name(major, minor),
                major,
                minor,
                value: value.parse().ok()?,
                ..Default::default()
            })
        })
        .collect()
}

/// `/dev/<name>` of block devices, looked up once per device per call.
#[derive(Default)]
struct DeviceNames(HashMap<(u64, u64), String>);

impl DeviceNames {
    fn get(&mut self, major: u64, minor: u64) -> String {
        self.0
            .entry((major, minor))
            .or_insert_with(|| {
                std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("DEVNAME="))
                            .map(|n| format!("/dev/{n}"))
                    })
                    .unwrap_or_default()
            })
            .clone()
    }
}

fn hugetlb(d: &Path) -> Vec<HugetlbStat> {
    hugetlb_sizes(d, ".usage_in_bytes")
        .into_iter()
        .map(|size| HugetlbStat {
            usage: read_u64(d, &format!("hugetlb.{size}.usage_in_bytes")),
            max: read_u64(d, &format!("hugetlb.{size}.max_usage_in_bytes")),
            failcnt: read_u64(d, &format!("hugetlb.{size}.failcnt")),
            pagesize: size,
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY_STAT: &str = "\
cache 9273344
rss 5464064
rss_huge 0
shmem 8998912
mapped_file 7483392
dirty 40960
writeback 0
pgpgin 35863
pgpgout 32265
pgfault 39254
pgmajfault 3
inactive_anon 0
active_anon 1531904
inactive_file 24576
active_file 249856
unevictable 12926976
hierarchical_memory_limit 20971520
hierarchical_memsw_limit 9223372036854771712
total_cache 1718861824
total_rss 379727872
total_pgpgin 30839953
total_pgmajfault 5171
total_unevictable 7
";

    #[test]
    fn memory_stat_maps_containerd_names() {
        let m = memory_stat(MEMORY_STAT);
        assert_eq!(m.cache, 9273344);
        assert_eq!(m.rss, 5464064);
        assert_eq!(m.pg_pg_in, 35863);
        assert_eq!(m.pg_maj_fault, 3);
        assert_eq!(m.unevictable, 12926976);
        assert_eq!(m.hierarchical_memory_limit, 20971520);
        assert_eq!(m.hierarchical_swap_limit, 9223372036854771712);
        assert_eq!(m.total_rss, 379727872);
        assert_eq!(m.total_pg_pg_in, 30839953);
        assert_eq!(m.total_pg_maj_fault, 5171);
        assert_eq!(m.total_unevictable, 7);
        assert_eq!(m.total_dirty, 0, "absent fields are zero");
    }

    #[test]
    fn cpu_files() {
        assert_eq!(per_cpu("1200 0 34 \n"), vec![1200, 0, 34]);
        let t = throttle("nr_periods 10\nnr_throttled 2\nthrottled_time 5000\nnr_bursts 0\n");
        assert_eq!(
            (t.periods, t.throttled_periods, t.throttled_time),
            (10, 2, 5000)
        );
    }

    #[test]
    fn oom_control_counts_kills() {
        let o = oom_control("oom_kill_disable 0\nunder_oom 1\noom_kill 3\n");
        assert_eq!((o.oom_kill_disable, o.under_oom, o.oom_kill), (0, 1, 3));
    }

    #[test]
    fn blkio_lines() {
        let text = "8:0 Read 4096\n8:0 Write 0\n8:0 Total 4096\n253:1 17\nTotal 4096\n";
        let e = blkio_entries(text, &mut |maj, _| format!("/dev/x{maj}"));
        assert_eq!(e.len(), 4);
        assert_eq!((e[0].major, e[0].minor, e[0].op.as_str()), (8, 0, "Read"));
        assert_eq!((e[0].value, e[0].device.as_str()), (4096, "/dev/x8"));
        assert_eq!((e[3].major, e[3].op.as_str(), e[3].value), (253, "", 17));
    }

    #[test]
    fn reads_a_fixture_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (f, v) in [
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
            ("cpuacct.usage", "123456789\n"),
            ("cpuacct.stat", "user 12\nsystem 3\n"),
            ("cpuacct.usage_percpu", "100 200 \n"),
            ("memory.stat", MEMORY_STAT),
            ("memory.usage_in_bytes", "4096\n"),
            ("memory.max_usage_in_bytes", "8192\n"),
            ("memory.limit_in_bytes", "20971520\n"),
            ("memory.failcnt", "5\n"),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
            ),
            ("hugetlb.2MB.usage_in_bytes", "0\n"),
            ("hugetlb.2MB.max_usage_in_bytes", "0\n"),
            ("hugetlb.2MB.failcnt", "0\n"),
            ("hugetlb.2MB.limit_in_bytes", "0\n"),
        ] {
            std::fs::write(d.join(f), v).unwrap();
        }
        let dirs: HashMap<String, PathBuf> = ["pids", "cpuacct", "memory", "hugetlb"]
            .iter()
            .map(|c| (c.to_string(), d.to_path_buf()))
            .collect();
        let m = metrics(&dirs);
        assert_eq!((m.pids.current, m.pids.limit), (3, 0));
        let usage = &m.cpu.usage;
        assert_eq!(usage.total, 123456789);
        assert_eq!((usage.user, usage.kernel), (120_000_000, 30_000_000));
        assert_eq!(usage.per_cpu, vec![100, 200]);
        assert!(m.cpu.throttling.is_none(), "no cpu controller given");
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.max, 8192);
        assert_eq!(m.memory.usage.limit, 20971520);
        assert_eq!(m.memory.usage.failcnt, 5);
        assert!(m.memory.swap.is_none(), "no memsw files: no swap entry");
        assert_eq!(m.memory.rss, 5464064);
        assert_eq!(m.memory_oom_control.oom_kill, 1);
        assert_eq!(m.hugetlb.len(), 1);
        assert_eq!(m.hugetlb[0].pagesize, "2MB");
        assert!(m.blkio.is_none());
    }
}
