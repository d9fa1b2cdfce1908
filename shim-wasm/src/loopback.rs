//! The loopback interface of a container's own network namespace, brought up as runc does.
//!
//! A fresh network namespace starts with `lo` down, and libcontainer leaves it so: a server
//! in the container (a `wasi:http` component) would be unreachable even from inside, at
//! 127.0.0.1. The container's init cannot do it itself: it has dropped `CAP_NET_ADMIN` by
//! the time our executor runs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::sched::{setns, CloneFlags};

use shim_common::{Context, Error, Result};

/// Brings `lo` up in the network namespace of `pid`, unless that is this process's own
/// (host networking: the host's `lo` is not ours to touch). Joins the namespace, so call it
/// only from a throwaway single-threaded process (libcontainer's helper, see `fork`).
pub fn up_in(pid: u32) -> Result<()> {
    let theirs = format!("/proc/{pid}/ns/net");
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    if ino(&theirs).context("container's network namespace")?
        == ino("/proc/self/ns/net").context("own network namespace")?
    {
        return Ok(());
    }
    let ns = File::open(&theirs).with_context(|| format!("open {theirs}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Runtime(format!("setns: {e}")))?;
    set_up("lo")
}

fn set_up(name: &str) -> Result<()> {
    let fail = |what: &str| {
        Error::Runtime(format!(
            "bring {name} up: {what}: {}",
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: plain socket(2); the fd is owned by `sock` from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `ifr_flags` of a valid ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(fail("SIOCGIFFLAGS"));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(fail("SIOCSIFFLAGS"));
        }
    }
    Ok(())
}
