//! Linux: subreaping with `prctl`, rootfs mounts with `mount(2)`, metrics and OOM kills from
//! host cgroups.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use protocol::mount::Mount;

use crate::error::{Context, Error, Result};
use crate::os::loop_device::{LoopDevice, LoopParams};

pub use crate::cgroups::{metrics, CgroupMetrics, OomWatcher};

/// Makes this process the subreaper of its descendants.
pub fn set_subreaper() -> Result<()> {
    // SAFETY: prctl with integer arguments has no memory effects.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("prctl(PR_SET_CHILD_SUBREAPER)");
    }
    Ok(())
}

/// Runs the calling thread `SCHED_BATCH`: its wake-ups no longer preempt the thread that is
/// running, which keeps its CPU until its tick or until it blocks.
pub fn batch_this_thread() -> Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setscheduler(SCHED_BATCH)");
    }
    Ok(())
}

/// Makes the pipe of `fd` hold `bytes` (rounded up to pages by the kernel).
pub fn set_pipe_size(fd: &impl std::os::fd::AsRawFd, bytes: usize) -> Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ only changes the capacity of the pipe behind `fd`.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) } < 0 {
        return Err(std::io::Error::last_os_error()).context("fcntl(F_SETPIPE_SZ)");
    }
    Ok(())
}

/// The largest `oom_score_adj`: the kernel's OOM killer picks such a process first.
const OOM_SCORE_ADJ_MAX: i32 = 1000;
const OOM_SCORE_ADJ_MIN: i32 = -1000;

/// Gives the shim daemon `pid` our parent's (containerd's) `oom_score_adj` plus one, at most
/// the maximum, as containerd's Go shim does in `start`: under memory pressure the kernel
/// kills a shim before the daemon that manages every container. Raising a score needs no
/// privilege; a permission error is ignored only where the file is not ours to write
/// (unprivileged, or in a user namespace), as containerd does.
pub fn oom_score_above_parent(pid: u32) -> Result<()> {
    let parent = std::os::unix::process::parent_id();
    let path = format!("/proc/{parent}/oom_score_adj");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let score: i32 = text
        .trim()
        .parse()
        .map_err(|e| Error::Runtime(format!("{path} holds {:?}: {e}", text.trim())))?;
    let want = score
        .saturating_add(1)
        .clamp(OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_MAX);
    let target = format!("/proc/{pid}/oom_score_adj");
    match std::fs::write(&target, want.to_string()) {
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                && (!nix::unistd::geteuid().is_root() || in_user_namespace()) =>
        {
            Ok(())
        }
        r => r.with_context(|| format!("set {target} to {want} (containerd's {score} + 1)")),
    }
}

/// Whether this process runs in a user namespace other than the initial one, whose uid map
/// is the identity over all 2^32 - 1 ids.
fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
}

/// Whether `pid` is exiting, a zombie or gone. A v1 logger's fd 5 also closes when it
/// dies, and the kernel closes files only after marking the task `PF_EXITING`, so this
/// tells "closed because ready" from "closed because dying" without waiting.
pub fn exiting(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // Fields after the command name (which may hold spaces): state is the first, flags
    // the seventh.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return true;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let zombie = matches!(fields.first(), Some(&("Z" | "X" | "x")));
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    zombie || flags & PF_EXITING != 0
}

/// A mount's options, split as `mount(2)` and the loop device want them.
#[derive(Debug, PartialEq)]
struct Options {
    flags: MsFlags,
    propagation: MsFlags,
    /// The filesystem's own options, comma-joined.
    data: String,
    /// `loop`: the source is an image file to bind to a loop device first.
    loop_device: bool,
    /// `direct-io`, with `loop`: the device bypasses the image's page cache.
    direct_io: bool,
}

/// Splits mount options into `mount(2)` flags, propagation flags, the data string and the
/// loop device's (`loop`, `direct-io`: as containerd, neither reaches the filesystem).
fn parse_options(options: &[String]) -> Options {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    let (mut loop_device, mut direct_io) = (false, false);
    for o in options {
        let (set, clear) = match o.as_str() {
            "loop" => {
                loop_device = true;
                continue;
            }
            "direct-io" => {
                direct_io = true;
                continue;
            }
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                propagation |= match o.as_str() {
                    "private" => MsFlags::MS_PRIVATE,
                    "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                    "shared" => MsFlags::MS_SHARED,
                    "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
                    "slave" => MsFlags::MS_SLAVE,
                    "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
                    "unbindable" => MsFlags::MS_UNBINDABLE,
                    _ => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
                };
                continue;
            }
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    if !loop_device && direct_io {
        // Without a loop device it is the filesystem's to judge.
        data.push("direct-io".to_string());
        direct_io = false;
    }
    Options {
        flags,
        propagation,
        data: data.join(","),
        loop_device,
        direct_io,
    }
}

/// Mounts every entry of `mounts` on `target`, in order (containerd sends one for a
/// snapshot; layered setups may send more). On failure, undoes what it mounted.
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(m, target) {
            for _ in 0..i {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Mounts `m` on `target`; see [`mount_rootfs`].
pub(crate) fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    let Options {
        mut flags,
        propagation,
        data,
        loop_device,
        direct_io,
    } = parse_options(&m.options);
    // Closed once mounted (or not): autoclear then ties the device's life to the mount's.
    let device = loop_device
        .then(|| {
            let params = LoopParams {
                read_only: flags.contains(MsFlags::MS_RDONLY),
                direct_io,
            };
            LoopDevice::attach(Path::new(&m.source), params)
        })
        .transpose()?;
    let source = device
        .as_ref()
        .map_or(m.source.as_str(), |d| d.path().to_str().unwrap_or_default());
    if m.type_ == "bind" {
        flags |= MsFlags::MS_BIND;
    }
    let fstype = (!m.type_.is_empty() && m.type_ != "bind").then_some(m.type_.as_str());
    let data = (!data.is_empty()).then_some(data.as_str());
    let what = || match &device {
        Some(d) => format!(
            "mount {} ({} on {}) on {}",
            m.source,
            m.type_,
            d.path().display(),
            target.display()
        ),
        None => format!("mount {} ({}) on {}", m.source, m.type_, target.display()),
    };
    // A read-only bind needs a second, remounting call: the first ignores MS_RDONLY.
    let ro_bind = flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY);
    let first = if ro_bind {
        flags & !MsFlags::MS_RDONLY
    } else {
        flags
    };
    mount(Some(source), target, fstype, first, data).with_context(what)?;
    if ro_bind {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .with_context(what)?;
    }
    if !propagation.is_empty() {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            propagation,
            None::<&str>,
        )
        .with_context(what)?;
    }
    Ok(())
}

/// Unmounts everything stacked on `target`. A target that is not mounted is fine.
pub fn unmount_all(target: &Path) -> Result<()> {
    for _ in 0..64 {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(Error::Sys {
                    context: format!("unmount {}", target.display()),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_become_data() {
        let opts: Vec<String> = [
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l",
            "ro",
            "nosuid",
        ]
        .map(String::from)
        .to_vec();
        let o = parse_options(&opts);
        assert_eq!(o.flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert!(o.propagation.is_empty());
        assert_eq!(o.data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l");
        assert!(!o.loop_device);
    }

    #[test]
    fn later_options_win_and_propagation_is_separate() {
        let opts: Vec<String> = ["ro", "rw", "rbind", "rprivate"].map(String::from).to_vec();
        let o = parse_options(&opts);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert!(o.data.is_empty());
    }

    #[test]
    fn loop_and_direct_io_go_to_the_loop_device_not_the_filesystem() {
        let opts: Vec<String> = ["ro", "loop", "direct-io", "device=/x"]
            .map(String::from)
            .to_vec();
        let o = parse_options(&opts);
        assert!(o.loop_device && o.direct_io);
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        assert_eq!(o.data, "device=/x");
        // Without `loop`, `direct-io` is the filesystem's own option.
        let o = parse_options(&["direct-io".to_string()]);
        assert!(!o.loop_device && !o.direct_io);
        assert_eq!(o.data, "direct-io");
    }
}
