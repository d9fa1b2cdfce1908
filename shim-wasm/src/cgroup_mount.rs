//! A container's `/sys/fs/cgroup` on a cgroup v1 host, written into its spec as plain mounts
//! when libcontainer's own construction of it would fail.
//!
//! libcontainer 0.7 builds that view itself (a tmpfs and, per hierarchy, a bind of the
//! container's own cgroup), but first reads `/proc/<pid>/cgroup` on the *host's* /proc with
//! the pid the init has inside its pid namespace (1 in a fresh one, the host's PID 1 there).
//! A container that joins an existing pid namespace — a pod's sidecar sharing pause's, as CRI
//! asks for with `shareProcessNamespace` — has some other pid, which names an unrelated host
//! process or none at all, and create fails with "failed to prepare rootfs". For exactly those
//! containers the shim replaces the `cgroup` mount with the same view before libcontainer sees
//! the spec, read-only when the spec asked for it (libcontainer binds read-write).

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use libcgroups::common::CgroupSetup;
use oci_spec::runtime::{LinuxNamespaceType, Mount, MountBuilder, Spec};

use shim_common::{Error, Result};

/// One cgroup v1 hierarchy of the host, as the shim's process sits in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted on the host (`/sys/fs/cgroup/memory`).
    pub mount_point: PathBuf,
    /// Whether libcgroups' cgroupfs manager places the container in it (at `cgroupsPath`);
    /// otherwise (`name=systemd`) the container stays where the shim is.
    pub managed: bool,
    /// The shim's own cgroup in it (`/proc/self/cgroup`).
    pub own: String,
}

/// Rewrites `spec` when it needs it (see the module doc); says whether it did.
pub fn adapt(spec: &mut Spec) -> Result<bool> {
    if !joins_a_pid_namespace(spec) || cgroup_mount(spec).is_none() {
        return Ok(false);
    }
    let Some(cgroups_path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) else {
        return Ok(false);
    };
    match libcgroups::common::get_cgroup_setup() {
        Ok(CgroupSetup::Legacy | CgroupSetup::Hybrid) => {}
        Ok(CgroupSetup::Unified) => return Ok(false),
        Err(e) => return Err(Error::Runtime(format!("cgroup setup: {e}"))),
    }
    let hierarchies = host_hierarchies()?;
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .try_fold(Vec::new(), |mut out, m| {
            if is_cgroup(m) {
                out.extend(emulated(m, &cgroups_path, &hierarchies)?);
            } else {
                out.push(m.clone());
            }
            Ok::<_, Error>(out)
        })?;
    spec.set_mounts(Some(mounts));
    Ok(true)
}

fn joins_a_pid_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_some())
        })
}

fn is_cgroup(m: &Mount) -> bool {
    m.typ().as_deref() == Some("cgroup")
}

fn cgroup_mount(spec: &Spec) -> Option<&Mount> {
    spec.mounts().as_ref()?.iter().find(|m| is_cgroup(m))
}

/// The mounts standing for `cgroup`: a tmpfs at its destination, and per hierarchy the
/// container's cgroup bound at the hierarchy's name (and at each name of a comount, where
/// libcontainer would place a symlink a spec cannot express).
pub fn emulated(
    cgroup: &Mount,
    cgroups_path: &Path,
    hierarchies: &[Hierarchy],
) -> Result<Vec<Mount>> {
    let options = cgroup.options().clone().unwrap_or_default();
    let ro = options.iter().any(|o| o == "ro");
    let dest = cgroup.destination();
    let build = |b: MountBuilder| {
        b.build()
            .map_err(|e| Error::Runtime(format!("cgroup mount: {e}")))
    };
    let mut out = vec![build(
        MountBuilder::default()
            .destination(dest)
            .typ("tmpfs")
            .source("tmpfs")
            .options(owned(&["noexec", "nosuid", "nodev", "mode=755"])),
    )?];
    let bind = owned(if ro {
        &["rbind", "ro", "nosuid", "noexec", "nodev"]
    } else {
        &["rbind", "rw", "nosuid", "noexec", "nodev"]
    });
    for h in hierarchies {
        let Some(name) = h.mount_point.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let within = if h.managed {
            cgroups_path.to_path_buf()
        } else {
            PathBuf::from(&h.own)
        };
        let source = under(&h.mount_point, &within)?;
        let mut names = vec![name];
        if name.contains(',') {
            names.extend(name.split(','));
        }
        for n in names {
            out.push(build(
                MountBuilder::default()
                    .destination(dest.join(n))
                    .typ("bind")
                    .source(&source)
                    .options(bind.clone()),
            )?);
        }
    }
    Ok(out)
}

fn owned(options: &[&str]) -> Vec<String> {
    options.iter().map(|o| o.to_string()).collect()
}

/// `path` (absolute or not, as libcgroups joins it) below `root`, refusing `..`.
fn under(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut out = root.to_path_buf();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "cgroupsPath {} leaves its hierarchy",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

/// The host's v1 hierarchies under `/sys/fs/cgroup`, as libcontainer would list them.
fn host_hierarchies() -> Result<Vec<Hierarchy>> {
    let all = libcgroups::v1::util::list_subsystem_mount_points()
        .map_err(|e| Error::Runtime(format!("cgroup v1 mount points: {e}")))?;
    let managed: HashSet<PathBuf> = libcgroups::v1::util::list_supported_mount_points()
        .map_err(|e| Error::Runtime(format!("cgroup v1 controllers: {e}")))?
        .into_values()
        .collect();
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::Runtime(format!("read /proc/self/cgroup: {e}")))?;
    Ok(all
        .into_iter()
        .filter(|p| p.starts_with("/sys/fs/cgroup"))
        .map(|mount_point| {
            let name = mount_point
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            Hierarchy {
                own: own_cgroup(&own, name).unwrap_or("/").to_string(),
                managed: managed.contains(&mount_point),
                mount_point,
            }
        })
        .collect())
}

/// The path of `/proc/self/cgroup`'s line for the hierarchy mounted as `name` (`systemd` is
/// the named `name=systemd`).
fn own_cgroup<'a>(proc_cgroup: &'a str, name: &str) -> Option<&'a str> {
    let key = if name == "systemd" {
        "name=systemd".to_string()
    } else {
        name.to_string()
    };
    proc_cgroup.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        (controllers == key).then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hierarchy(mount_point: &str, managed: bool, own: &str) -> Hierarchy {
        Hierarchy {
            mount_point: mount_point.into(),
            managed,
            own: own.into(),
        }
    }

    fn cgroup(options: &[&str]) -> Mount {
        MountBuilder::default()
            .destination("/sys/fs/cgroup")
            .typ("cgroup")
            .source("cgroup")
            .options(owned(options))
            .build()
            .expect("mount")
    }

    #[test]
    fn each_hierarchy_binds_the_container_cgroup_and_comounts_get_every_name() {
        let hs = [
            hierarchy("/sys/fs/cgroup/memory", true, "/shim"),
            hierarchy("/sys/fs/cgroup/cpu,cpuacct", true, "/"),
            hierarchy(
                "/sys/fs/cgroup/systemd",
                false,
                "/system.slice/containerd.service",
            ),
        ];
        let m = emulated(
            &cgroup(&["nosuid", "noexec", "nodev", "relatime", "ro"]),
            Path::new("/k8s.io/abc"),
            &hs,
        )
        .expect("emulated");
        let seen: Vec<(String, String, String)> = m
            .iter()
            .map(|m| {
                (
                    m.destination().display().to_string(),
                    m.typ().clone().unwrap_or_default(),
                    m.source()
                        .as_ref()
                        .map(|s| s.display().to_string())
                        .unwrap_or_default(),
                )
            })
            .collect();
        let want = |d: &str, t: &str, s: &str| (d.to_string(), t.to_string(), s.to_string());
        assert_eq!(
            seen,
            vec![
                want("/sys/fs/cgroup", "tmpfs", "tmpfs"),
                want(
                    "/sys/fs/cgroup/memory",
                    "bind",
                    "/sys/fs/cgroup/memory/k8s.io/abc"
                ),
                want(
                    "/sys/fs/cgroup/cpu,cpuacct",
                    "bind",
                    "/sys/fs/cgroup/cpu,cpuacct/k8s.io/abc"
                ),
                want(
                    "/sys/fs/cgroup/cpu",
                    "bind",
                    "/sys/fs/cgroup/cpu,cpuacct/k8s.io/abc"
                ),
                want(
                    "/sys/fs/cgroup/cpuacct",
                    "bind",
                    "/sys/fs/cgroup/cpu,cpuacct/k8s.io/abc"
                ),
                want(
                    "/sys/fs/cgroup/systemd",
                    "bind",
                    "/sys/fs/cgroup/systemd/system.slice/containerd.service"
                ),
            ]
        );
        assert!(m[1..].iter().all(|m| m
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "ro"))));
    }

    #[test]
    fn a_writable_cgroup_mount_stays_writable_and_dot_dot_is_refused() {
        let hs = [hierarchy("/sys/fs/cgroup/pids", true, "/")];
        let m = emulated(&cgroup(&["nosuid"]), Path::new("relative/c1"), &hs).expect("emulated");
        assert_eq!(
            m[1].source().as_deref(),
            Some(Path::new("/sys/fs/cgroup/pids/relative/c1"))
        );
        assert!(m[1]
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "rw")));
        let err = emulated(&cgroup(&[]), Path::new("/../../etc"), &hs).expect_err("escape");
        assert!(err.to_string().contains("leaves its hierarchy"), "{err}");
    }

    #[test]
    fn own_cgroup_reads_the_named_systemd_line() {
        let text = "9:name=systemd:/init.scope\n4:memory:/shim\n2:cpu,cpuacct:/\n0::/\n";
        assert_eq!(own_cgroup(text, "systemd"), Some("/init.scope"));
        assert_eq!(own_cgroup(text, "memory"), Some("/shim"));
        assert_eq!(own_cgroup(text, "cpu,cpuacct"), Some("/"));
        assert_eq!(own_cgroup(text, "pids"), None);
    }
}
