//! Container metrics and OOM kills, read from the cgroup of a container's init process.
//!
//! containerd's `Stats` answer is an `Any` holding `io.containerd.cgroups.v1.Metrics` on a
//! legacy or hybrid host and `io.containerd.cgroups.v2.Metrics` on a unified one; containerd
//! picks the decoder by the type URL. Which one we send follows the host, exactly as
//! containerd's own `cgroups.Mode()` decides: `/sys/fs/cgroup` is a cgroup2 mount or not.
//!
//! The files are read directly rather than through youki's `libcgroups` 0.7, whose only
//! public way to read stats is the all-or-nothing `CgroupManager::stats()`: one missing
//! optional file fails the whole answer (`memory.memsw.*` without swap accounting, the
//! `*.pressure` files on kernels booted without PSI, `nr_periods` when the cpu controller is
//! not enabled for the cgroup), it indexes `memory.stat["cache"]` (a panic, so an aborted
//! shim, on a kernel without it), and it has no OOM counters, which would be read by hand
//! anyway. It would also add ~0.3 MB (pathrs, procfs, oci-spec) to the shim. Here a missing
//! figure is a zero, as in containerd's own collector.
//!
//! ```no_run
//! let any = shim_common::cgroups::metrics(std::process::id())?;
//! assert!(any.type_url.starts_with("io.containerd.cgroups."));
//! # Ok::<(), shim_common::Error>(())
//! ```

mod oom;
mod v1;
mod v2;

pub use oom::OomWatcher;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use protobuf::well_known_types::any::Any;
use protobuf::Message;

use crate::error::{Context, Error, Result};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup directories of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// cgroup v1 (legacy or hybrid host): one directory per controller, keyed by the
    /// controller's name (`memory`, `cpuacct`, ...).
    V1(HashMap<String, PathBuf>),
    /// cgroup v2 (unified host): one directory for every controller.
    V2(PathBuf),
}

impl Cgroup {
    /// The cgroups `pid` is in now, from `/proc/<pid>/cgroup`.
    ///
    /// ```no_run
    /// use shim_common::cgroups::Cgroup;
    /// match Cgroup::of(std::process::id())? {
    ///     Cgroup::V1(dirs) => println!("memory cgroup: {:?}", dirs.get("memory")),
    ///     Cgroup::V2(dir) => println!("cgroup: {}", dir.display()),
    /// }
    /// # Ok::<(), shim_common::Error>(())
    /// ```
    pub fn of(pid: u32) -> Result<Cgroup> {
        let file = format!("/proc/{pid}/cgroup");
        let text = match std::fs::read_to_string(&file) {
            // The process is gone: what containerd asked about no longer exists.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("process {pid}")))
            }
            r => r.with_context(|| format!("read {file}"))?,
        };
        let mounts = mounts();
        if mounts.unified_host {
            let rel = parse_proc_cgroup(&text)
                .into_iter()
                .find(|(ctrls, _)| ctrls.is_empty())
                .map(|(_, p)| p)
                .unwrap_or_default();
            return Ok(Cgroup::V2(under(&mounts.v2, &rel)));
        }
        let mut dirs = HashMap::new();
        for (ctrls, rel) in parse_proc_cgroup(&text) {
            for c in ctrls {
                if let Some(mount) = mounts.v1.get(&c) {
                    dirs.insert(c, under(mount, &rel));
                }
            }
        }
        Ok(Cgroup::V1(dirs))
    }
}

/// Moves `pid` into the existing cgroup `path` (relative to the cgroup root, as runc's
/// `ShimCgroup` option names it): on cgroup v2 its one directory; on v1 every hierarchy,
/// named ones included, where `path` exists (at least one must). containerd's runc shim does the same with the
/// daemon it starts.
pub fn join(path: &str, pid: u32) -> Result<()> {
    let mounts = mounts();
    let dirs: Vec<PathBuf> = if mounts.unified_host {
        vec![under(&mounts.v2, path)]
    } else {
        mounts
            .v1_hierarchies
            .iter()
            .map(|m| under(m, path))
            .filter(|d| d.is_dir())
            .collect()
    };
    if !dirs.iter().any(|d| d.is_dir()) {
        return Err(crate::Error::NotFound(format!(
            "cgroup {path} does not exist"
        )));
    }
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("join cgroup {path}: write {}", procs.display()))?;
    }
    Ok(())
}

/// containerd's `Stats` payload for the cgroup `pid` belongs to.
pub fn metrics(pid: u32) -> Result<Any> {
    metrics_of(&Cgroup::of(pid)?)
}

/// A container's cgroup, found while its init runs. Its metrics stay readable after the
/// init exits, until the runtime removes the cgroup at delete: containerd's CRI asks for
/// them then, to see whether the exit was an OOM kill.
#[derive(Debug, Clone)]
pub struct CgroupMetrics(Cgroup);

impl CgroupMetrics {
    /// The cgroup `pid` is in now; `None` once it is gone.
    pub fn of(pid: u32) -> Option<CgroupMetrics> {
        Cgroup::of(pid).ok().map(CgroupMetrics)
    }

    /// The cgroup's metrics, as [`metrics`] gives them.
    pub fn read(&self) -> Result<Any> {
        metrics_of(&self.0)
    }
}

fn metrics_of(cgroup: &Cgroup) -> Result<Any> {
    let (type_url, value) = match cgroup {
        Cgroup::V1(dirs) => (
            protocol::type_urls::CGROUPS_V1_METRICS,
            v1::metrics(dirs).write_to_bytes(),
        ),
        Cgroup::V2(dir) => (
            protocol::type_urls::CGROUPS_V2_METRICS,
            v2::metrics(dir).write_to_bytes(),
        ),
    };
    Ok(Any {
        type_url: type_url.to_string(),
        value: value.context("encode cgroup metrics")?,
        ..Default::default()
    })
}

/// containerd's metrics payload for the cgroup at `path`, relative to the cgroup root as
/// CRI's `cgroup_parent` names a pod's (a systemd slice name is nested as systemd nests
/// it): what a pod's containers use together. `NotFound` when no hierarchy has it.
pub fn metrics_at(path: &str) -> Result<Any> {
    let rel = slice_path(path).unwrap_or_else(|| path.to_string());
    let mounts = mounts();
    let cgroup = if mounts.unified_host {
        Cgroup::V2(under(&mounts.v2, &rel))
    } else {
        Cgroup::V1(
            mounts
                .v1
                .iter()
                .map(|(c, m)| (c.clone(), under(m, &rel)))
                .filter(|(_, d)| d.is_dir())
                .collect(),
        )
    };
    let exists = match &cgroup {
        Cgroup::V2(dir) => dir.is_dir(),
        Cgroup::V1(dirs) => !dirs.is_empty(),
    };
    if !exists {
        return Err(Error::NotFound(format!("cgroup {path}")));
    }
    metrics_of(&cgroup)
}

/// Where systemd puts a slice: `a-b-c.slice` in `a.slice/a-b.slice/`; `None` for a path
/// that is not a slice name.
fn slice_path(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".slice")?;
    if name.contains('/') {
        return None;
    }
    if stem == "-" {
        return Some(String::new());
    }
    let parts: Vec<&str> = stem.split('-').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let nested: Vec<String> = (1..=parts.len())
        .map(|i| format!("{}.slice", parts[..i].join("-")))
        .collect();
    Some(nested.join("/"))
}

/// How many processes of `pid`'s cgroup the kernel's OOM killer has killed so far
/// (`oom_kill` in `memory.oom_control` on v1, in `memory.events` on v2). `None` when the
/// kernel does not count them (v1 before Linux 4.13) or there is no memory controller.
pub fn oom_kills(pid: u32) -> Result<Option<u64>> {
    Ok(OomCounter::of(&Cgroup::of(pid)?).and_then(|c| c.read()))
}

/// Where a cgroup's OOM-kill counter lives: it stays readable after the last process
/// exits (until the runtime removes the cgroup), which is when the SDK checks it.
#[derive(Debug, Clone)]
struct OomCounter {
    /// `memory.oom_control` (v1) or `memory.events` (v2).
    file: PathBuf,
}

impl OomCounter {
    fn of(cg: &Cgroup) -> Option<OomCounter> {
        let file = match cg {
            Cgroup::V1(dirs) => dirs.get("memory")?.join("memory.oom_control"),
            Cgroup::V2(dir) => dir.join("memory.events"),
        };
        Some(OomCounter { file })
    }

    fn read(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.file).ok()?;
        flat_keyed(&text).get("oom_kill").copied()
    }
}

/// Where the cgroup hierarchies are mounted, read once: mounts do not move under a shim.
struct Mounts {
    unified_host: bool,
    /// v1 controller name → mount point.
    v1: HashMap<String, PathBuf>,
    /// Every v1 hierarchy, named ones (`name=systemd`) included.
    v1_hierarchies: Vec<PathBuf>,
    v2: PathBuf,
}

fn mounts() -> &'static Mounts {
    static MOUNTS: OnceLock<Mounts> = OnceLock::new();
    MOUNTS.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (v1, v2) = parse_mountinfo(&info);
        Mounts {
            unified_host: is_cgroup2(Path::new(CGROUP_ROOT)),
            v1,
            v1_hierarchies: v1_hierarchies(&info),
            v2: v2.unwrap_or_else(|| PathBuf::from(CGROUP_ROOT)),
        }
    })
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// `/proc/<pid>/cgroup` as (controllers, path) pairs; the v2 line has no controllers.
/// Named hierarchies (`name=systemd`) are kept as they are.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((ctrls, path.to_string()))
        })
        .collect()
}

/// cgroup mounts from `/proc/self/mountinfo`: v1 controller → mount point, and the cgroup2
/// mount (preferring `/sys/fs/cgroup` itself, then `/sys/fs/cgroup/unified`).
fn parse_mountinfo(text: &str) -> (HashMap<String, PathBuf>, Option<PathBuf>) {
    let mut v1 = HashMap::new();
    let mut v2: Option<PathBuf> = None;
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        let (fstype, _source, opts) = (post.next(), post.next(), post.next().unwrap_or(""));
        match fstype {
            Some("cgroup") => {
                for opt in opts.split(',') {
                    if is_v1_controller(opt) {
                        v1.entry(opt.to_string())
                            .or_insert_with(|| PathBuf::from(mount_point));
                    }
                }
            }
            Some("cgroup2") if v2.as_deref() != Some(Path::new(CGROUP_ROOT)) => {
                v2 = Some(PathBuf::from(mount_point));
            }
            _ => {}
        }
    }
    (v1, v2)
}

/// The mount point of every cgroup v1 hierarchy in `/proc/self/mountinfo` text.
fn v1_hierarchies(text: &str) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next() == Some("cgroup")).then(|| PathBuf::from(mount_point))
        })
        .collect();
    all.sort();
    all.dedup();
    all
}

fn is_v1_controller(opt: &str) -> bool {
    matches!(
        opt,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "blkio"
            | "pids"
            | "hugetlb"
            | "devices"
            | "freezer"
            | "net_cls"
            | "net_prio"
            | "perf_event"
            | "rdma"
            | "misc"
    )
}

/// `mount` joined with a cgroup path from `/proc/<pid>/cgroup` (which is absolute).
fn under(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

/// `key value` lines (`memory.stat`, `cpu.stat`, `memory.events`, `memory.oom_control`).
fn flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

/// Reads a file of `dir`, `None` if it is missing or unreadable: most cgroup files are
/// optional (controllers not mounted, kernel options, cgroup removed meanwhile).
fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// A single-number file; `max` (no limit) is `max` as given.
fn read_u64_or(dir: &Path, file: &str, max: u64) -> Option<u64> {
    let text = read(dir, file)?;
    let text = text.trim();
    if text == "max" {
        return Some(max);
    }
    text.parse().ok()
}

/// A single-number file; 0 when missing.
fn read_u64(dir: &Path, file: &str) -> u64 {
    read_u64_or(dir, file, u64::MAX).unwrap_or(0)
}

/// `hugetlb.<size>.<suffix>` page sizes present in `dir` (`2MB`, `1GB`).
fn hugetlb_sizes(dir: &Path, suffix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sizes: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let size = name.strip_prefix("hugetlb.")?.strip_suffix(suffix)?;
            (!size.contains('.')).then(|| size.to_string())
        })
        .collect();
    sizes.sort();
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_systemd_slice_nests_in_its_parents() {
        assert_eq!(
            slice_path("kubepods-burstable-pod1f2e.slice").as_deref(),
            Some("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e.slice")
        );
        assert_eq!(slice_path("-.slice").as_deref(), Some(""));
        assert_eq!(slice_path("/kubepods/burstable/pod1f2e"), None);
        assert_eq!(slice_path("a--b.slice"), None);
    }

    #[test]
    fn proc_cgroup_v1_hybrid() {
        let text = "9:name=systemd:/\n8:pids:/default/c1\n4:memory:/default/c1\n\
                    2:cpu,cpuacct:/default/c1\n0::/\n";
        let parsed = parse_proc_cgroup(text);
        assert_eq!(parsed[1], (vec!["pids".to_string()], "/default/c1".into()));
        assert_eq!(parsed[3].0, vec!["cpu".to_string(), "cpuacct".to_string()]);
        assert_eq!(parsed[4], (vec![], "/".into()));
    }

    #[test]
    fn mountinfo_finds_v1_controllers_and_unified() {
        let text = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";
        let (v1, v2) = parse_mountinfo(text);
        assert_eq!(v1["cpu"], Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(v1["cpuacct"], Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(v1["memory"], Path::new("/sys/fs/cgroup/memory"));
        assert!(!v1.contains_key("name=systemd"));
        // Joining a cgroup (`ShimCgroup`) takes every hierarchy, the named one too.
        assert_eq!(
            v1_hierarchies(text),
            [
                Path::new("/sys/fs/cgroup/cpu,cpuacct"),
                Path::new("/sys/fs/cgroup/memory"),
                Path::new("/sys/fs/cgroup/systemd")
            ]
        );
        assert_eq!(v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn flat_keyed_skips_garbage() {
        let m = flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\nbogus\nx y\n");
        assert_eq!(m.get("oom_kill"), Some(&2));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn metrics_of_this_process() {
        // Whatever the host, our own cgroup is readable and packs under containerd's name.
        let any = metrics(std::process::id()).unwrap();
        assert!(
            any.type_url == protocol::type_urls::CGROUPS_V1_METRICS
                || any.type_url == protocol::type_urls::CGROUPS_V2_METRICS,
            "{}",
            any.type_url
        );
    }

    #[test]
    fn missing_process_is_not_found() {
        let err = metrics(u32::MAX).unwrap_err();
        assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
    }
}
