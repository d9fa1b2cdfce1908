//! What the SDK does differently per operating system, and nothing else.
//!
//! Everything outside this module is portable Unix (signals, `waitpid`, fifos, sockets,
//! ptys). Each OS file provides the same small surface:
//!
//! | item | Linux | FreeBSD |
//! |---|---|---|
//! | `set_subreaper()` | `prctl(PR_SET_CHILD_SUBREAPER)` | `procctl(PROC_REAP_ACQUIRE)` |
//! | `mount_rootfs()`, `mount_one()`, `unmount_all()` | `mount(2)` (image files on loop devices), `umount2(MNT_DETACH)` | `nmount(2)`, `unmount(2)` |
//! | `exiting(pid)` | `/proc/<pid>/stat` (zombie, `PF_EXITING`) | `sysctl(KERN_PROC_PID)` (`SZOMB`, `P_WEXIT`) |
//! | `metrics()`, `CgroupMetrics`, `OomWatcher` | host cgroups ([`crate::cgroups`]) | `Unimplemented`: no cgroups |
//! | `batch_this_thread()`, `set_pipe_size()` | `sched_setscheduler(SCHED_BATCH)`, `F_SETPIPE_SZ` | nothing |
//! | `oom_score_above_parent(pid)` | `/proc/<pid>/oom_score_adj`: containerd's + 1 | nothing: no per-process score |
//!
//! A new OS is one more file implementing these.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub mod loop_device;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(target_os = "freebsd")]
mod freebsd;
#[cfg(target_os = "freebsd")]
pub use freebsd::*;
