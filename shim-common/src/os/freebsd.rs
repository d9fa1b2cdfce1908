//! FreeBSD: subreaping with `procctl(PROC_REAP_ACQUIRE)`, rootfs mounts with `nmount(2)`;
//! no cgroups, so no metrics or OOM events from the SDK (`rctl(8)` is a backend's business).
//!
//! Written against `libc` 0.2 and `nix` 0.29 for `x86_64-unknown-freebsd`; it is not
//! compiled on the project's Linux machines (see the README).

use std::path::Path;

use nix::mount::{unmount, MntFlags, Nmount};
use protobuf::well_known_types::any::Any;
use protocol::mount::Mount;

use crate::error::{Context, Error, Result};

/// Nothing: FreeBSD's scheduler has no batch class; the SDK only asks for it inside a VM.
pub fn batch_this_thread() -> Result<()> {
    Ok(())
}

/// Nothing: FreeBSD sizes its pipes itself.
pub fn set_pipe_size(_fd: &impl std::os::fd::AsRawFd, _bytes: usize) -> Result<()> {
    Ok(())
}

/// Makes this process the reaper of its descendants: orphans are re-parented to it, so its
/// `waitpid(-1)` sees every exit, as with Linux's child subreaper.
pub fn set_subreaper() -> Result<()> {
    // SAFETY: PROC_REAP_ACQUIRE takes no data; procctl only reads its integer arguments.
    let rc = unsafe {
        libc::procctl(
            libc::P_PID,
            libc::getpid() as libc::id_t,
            libc::PROC_REAP_ACQUIRE,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Already the reaper (a second install in the same process) is what we want.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e).context("procctl(PROC_REAP_ACQUIRE)");
        }
    }
    Ok(())
}

/// FreeBSD's OOM killer has no per-process score to raise (`protect(1)` only exempts a
/// process), so the shim daemon is left as it is.
pub fn oom_score_above_parent(_pid: u32) -> Result<()> {
    Ok(())
}

/// Whether `pid` is exiting (`P_WEXIT`), a zombie or gone, from `kern.proc.pid.<pid>`.
pub fn exiting(pid: i32) -> bool {
    let mib = [libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, pid];
    // SAFETY: kinfo_proc is plain data (integers, arrays, pointers never dereferenced);
    // sysctl writes at most `len` bytes into it.
    let mut kp: libc::kinfo_proc = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::kinfo_proc>();
    let rc = unsafe {
        libc::sysctl(
            mib.as_ptr(),
            mib.len() as libc::c_uint,
            (&mut kp as *mut libc::kinfo_proc).cast(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    if rc != 0 || len == 0 {
        return true;
    }
    kp.ki_stat == libc::SZOMB || kp.ki_flag & libc::P_WEXIT as libc::c_long != 0
}

/// No cgroups on FreeBSD: `Stats` is the backend's to answer.
pub fn metrics(_pid: u32) -> Result<Any> {
    Err(Error::Unimplemented(
        "Stats (FreeBSD has no cgroups; this backend collects no rctl usage)".into(),
    ))
}

/// No cgroups to remember: [`CgroupMetrics::of`] always says so and no value exists.
#[derive(Debug, Clone)]
pub enum CgroupMetrics {}

impl CgroupMetrics {
    pub fn of(_pid: u32) -> Option<CgroupMetrics> {
        None
    }

    pub fn read(&self) -> Result<Any> {
        match *self {}
    }
}

/// No cgroups, so no OOM events: [`OomWatcher::new`] always fails and no value exists.
pub enum OomWatcher {}

impl OomWatcher {
    pub fn new(_on_oom: impl Fn(&str) + Send + Sync + 'static) -> Result<OomWatcher> {
        Err(Error::Unimplemented(
            "OOM events (FreeBSD has no cgroups)".into(),
        ))
    }

    pub fn add(&self, _id: &str, _pid: u32) -> Result<()> {
        match *self {}
    }

    pub fn check(&self, _id: &str) {
        match *self {}
    }

    pub fn remove(&self, _id: &str) {
        match *self {}
    }
}

/// Mounts every entry of `mounts` on `target`, in order; on failure, undoes what it
/// mounted. containerd on FreeBSD describes a snapshot as `nullfs` (or `bind`, which is
/// the same thing here) or as the snapshotter's file system (`zfs`, `ufs`...).
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(m, target) {
            for _ in 0..i {
                let _ = unmount(target, MntFlags::MNT_FORCE);
            }
            return Err(e);
        }
    }
    Ok(())
}

pub(crate) fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    let fstype = match m.type_.as_str() {
        "" | "bind" | "rbind" => "nullfs",
        t => t,
    };
    let mut flags = MntFlags::empty();
    let mut nm = Nmount::new();
    nm.str_opt_owned("fstype", fstype)
        .str_opt_owned("fspath", target);
    // nullfs names its source `target`; every other file system `from`.
    let source_key = if fstype == "nullfs" { "target" } else { "from" };
    nm.str_opt_owned(source_key, m.source.as_str());
    for o in &m.options {
        match o.as_str() {
            "ro" | "rdonly" => flags |= MntFlags::MNT_RDONLY,
            "rw" => flags &= !MntFlags::MNT_RDONLY,
            "nosuid" => flags |= MntFlags::MNT_NOSUID,
            "noexec" => flags |= MntFlags::MNT_NOEXEC,
            "noatime" => flags |= MntFlags::MNT_NOATIME,
            // Linux-only meanings with no FreeBSD counterpart.
            "bind" | "rbind" | "defaults" | "private" | "rprivate" => {}
            other => match other.split_once('=') {
                Some((k, v)) => {
                    nm.str_opt_owned(k, v);
                }
                None => {
                    nm.null_opt_owned(other);
                }
            },
        }
    }
    nm.nmount(flags).map_err(|e| Error::Sys {
        context: format!(
            "nmount {} ({fstype}) on {}{}",
            m.source,
            target.display(),
            e.errmsg().map(|m| format!(": {m}")).unwrap_or_default()
        ),
        source: e.error(),
    })
}

/// Unmounts everything stacked on `target`. A target that is not mounted is fine.
pub fn unmount_all(target: &Path) -> Result<()> {
    for _ in 0..64 {
        match unmount(target, MntFlags::MNT_FORCE) {
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
