//! The guest's PID 1 set-up, before the agent serves anything: the kernel hands the
//! initramfs over with nothing mounted and `lo` down, and there is no udev or init system
//! to do it. Every driver is built into the kernel ([`crate::image::kernel`]).
//!
//! ```no_run
//! # fn main() -> shim_common::Result<()> {
//! shim_vm::boot::setup()?;
//! let port = shim_vm::boot::port("agent", std::time::Duration::from_secs(5))?;
//! # drop(port);
//! shim_vm::boot::poweroff()
//! # }
//! ```

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use shim_common::{Context, Error, Result};

/// Where a `shim_vm.share=<tag>` virtiofs share is mounted.
pub const SHARED_DIR: &str = "/run/shared";

/// The kernel command-line parameter naming the virtiofs tag to mount at [`SHARED_DIR`].
pub const SHARE_PARAM: &str = "shim_vm.share";

/// The kernel command-line parameter carrying the host's clock (seconds since the epoch):
/// the guest's clock is set to it when the RTC left it behind.
pub const CLOCK_PARAM: &str = "shim_vm.clock";

/// What [`setup`] did, for the agent to log.
#[derive(Debug, Default, Clone)]
pub struct Booted {
    /// The virtiofs tag mounted at [`SHARED_DIR`], if any.
    pub share: Option<String>,
}

/// Mounts the API filesystems, brings up `lo`, mounts the virtiofs share the command line
/// names and sets the clock if it asks to.
pub fn setup() -> Result<Booted> {
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("proc", "/proc", "proc", nosuid_noexec, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_noexec, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    replace_with_symlink("/dev/ptmx", "pts/ptmx")?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec, None)?;

    let cmdline = fs::read_to_string("/proc/cmdline").context("read /proc/cmdline")?;
    let mut booted = Booted::default();
    loopback_up()?;

    if let Some(secs) = param(&cmdline, CLOCK_PARAM).and_then(|s| s.parse::<i64>().ok()) {
        set_clock_forward(secs)?;
    }
    if let Some(tag) = param(&cmdline, SHARE_PARAM) {
        mount_fs(tag, SHARED_DIR, "virtiofs", MsFlags::empty(), None)?;
        booted.share = Some(tag.to_string());
    }
    Ok(booted)
}

/// The value of `key=value` on a kernel command line.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
    match mount(Some(src), target, Some(fstype), flags, data) {
        // Already there (a kernel that mounts devtmpfs itself, a second call).
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("mount {fstype} {src} on {target}")),
    }
}

fn replace_with_symlink(path: &str, target: &str) -> Result<()> {
    if fs::read_link(path).is_ok_and(|t| t == Path::new(target)) {
        return Ok(());
    }
    let _ = fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).with_context(|| format!("link {path} to {target}"))
}

/// `ip link set lo up`, by ioctl: the guest has no `ip`.
fn loopback_up() -> Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket for lo")?;
    // SAFETY: ifreq is plain data; zeroed is a valid value for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq we own; union field
    // ifru_flags is the one these requests use.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error()).context("get lo's flags");
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error()).context("bring lo up");
        }
    }
    Ok(())
}

/// Moves the clock to `secs` if it is behind (an RTC-less or stale guest); never back.
fn set_clock_forward(secs: i64) -> Result<()> {
    use nix::time::{clock_gettime, clock_settime, ClockId};
    let now = clock_gettime(ClockId::CLOCK_REALTIME).context("read the clock")?;
    if now.tv_sec() < secs {
        clock_settime(
            ClockId::CLOCK_REALTIME,
            nix::sys::time::TimeSpec::new(secs, 0),
        )
        .context("set the clock")?;
    }
    Ok(())
}

/// Opens the virtio-serial port the host named `name` (`virtserialport,name=...`): its
/// `/dev/vportNpM`, found through `/sys/class/virtio-ports/*/name`. The device appears
/// when the driver has probed it, which can be after `setup` returns: waits up to `timeout`.
pub fn port(name: &str, timeout: Duration) -> Result<OwnedFd> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(dev) = find_port(name) {
            if dev.exists() {
                let f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&dev)
                    .with_context(|| format!("open {}", dev.display()))?;
                return Ok(OwnedFd::from(f));
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Unavailable(format!(
                "virtio-serial port {name:?} did not appear in /sys/class/virtio-ports within {timeout:?}"
            )));
        }
        // No udev to tell us: the driver's probe runs asynchronously, so look again shortly.
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn find_port(name: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/class/virtio-ports").ok()?.find_map(|e| {
        let e = e.ok()?;
        let n = fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim_end() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Flushes the filesystems and powers the VM off (QEMU exits). Returns only on failure.
pub fn poweroff() -> Result<()> {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Err(e) => Err(e).context("power off"),
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_found_by_key() {
        let c = "console=ttyS0 quiet shim_vm.share=pod shim_vm.clock=17";
        assert_eq!(param(c, SHARE_PARAM), Some("pod"));
        assert_eq!(param(c, CLOCK_PARAM), Some("17"));
        assert_eq!(param(c, "quiet"), None);
        assert_eq!(param(c, "shim_vm"), None);
    }
}
