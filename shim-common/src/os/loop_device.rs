//! Loop devices for mounts with the `loop` option: containerd's EROFS snapshotter and
//! block-image layers describe a layer as an image file (`layer.erofs`, `rwlayer.img`) that
//! must sit on a block device before `mount(2)` takes it. As containerd's `SetupLoop`: a free
//! device from `/dev/loop-control`, bound with `LOOP_CONFIGURE` (or `LOOP_SET_FD` and
//! `LOOP_SET_STATUS64` on kernels before 5.8), always autoclear, read-only when the mount is.
//!
//! Autoclear is what detaches: the kernel frees the device when its last user goes, so once
//! [`LoopDevice`] is dropped the device lives exactly as long as the mount on it, and a mount
//! that failed leaves no device behind.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use linux_raw_sys::loop_device::{
    loop_config, loop_info64, LOOP_CLR_FD, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LOOP_SET_FD,
    LOOP_SET_STATUS64, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY,
};

use crate::error::{Context, Error, Result};

/// How many free devices to try when others take them first (containerd: 100).
const ATTEMPTS: u32 = 100;

/// How to bind an image file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopParams {
    /// The device refuses writes (the mount's `ro`).
    pub read_only: bool,
    /// Bypass the page cache of the backing file (the mount's `direct-io`).
    pub direct_io: bool,
}

/// A bound loop device, open. Dropping it closes the last descriptor but the mount's: the
/// device goes away with the mount.
#[derive(Debug)]
pub struct LoopDevice {
    // Held only to keep the device bound until the mount holds it.
    _device: File,
    path: PathBuf,
}

impl LoopDevice {
    /// Binds `backing` to a free loop device.
    pub fn attach(backing: &Path, params: LoopParams) -> Result<LoopDevice> {
        let backing_file = open(backing, params.read_only)
            .with_context(|| format!("open loop image {}", backing.display()))?;
        let mut last_busy = None;
        for attempt in 0..ATTEMPTS {
            let path = free_device()?;
            let device = match open(&path, params.read_only) {
                Ok(f) => f,
                // Another process took and removed it between the two calls.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
            };
            match bind(&device, &backing_file, backing, params) {
                Ok(()) => {
                    return Ok(LoopDevice {
                        _device: device,
                        path,
                    })
                }
                // Another process bound it first: ask again, after a short random pause as
                // containerd and util-linux do, so racing binders spread out.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last_busy = Some(e);
                    std::thread::sleep(jitter(attempt));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("bind {} to {}", backing.display(), path.display())
                    })
                }
            }
        }
        Err(Error::Io {
            context: format!(
                "bind {} to a loop device: every free device was taken ({ATTEMPTS} tries)",
                backing.display()
            ),
            source: last_busy.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
        })
    }

    /// `/dev/loopN`, what `mount(2)` takes as the source.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open(path: &Path, read_only: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Asks `/dev/loop-control` for a free device (the kernel creates one if none is free).
fn free_device() -> Result<PathBuf> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .context("open /dev/loop-control (is the loop module loaded?)")?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
    let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as libc::c_ulong) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("find a free loop device");
    }
    Ok(PathBuf::from(format!("/dev/loop{n}")))
}

fn bind(device: &File, backing: &File, path: &Path, params: LoopParams) -> std::io::Result<()> {
    let mut flags = LO_FLAGS_AUTOCLEAR as u32;
    if params.read_only {
        flags |= LO_FLAGS_READ_ONLY as u32;
    }
    if params.direct_io {
        flags |= LO_FLAGS_DIRECT_IO as u32;
    }
    // SAFETY: both are plain-old-data kernel structs; all-zero is their "unset" value.
    let mut info: loop_info64 = unsafe { std::mem::zeroed() };
    info.lo_flags = flags;
    let name = path.as_os_str().as_encoded_bytes();
    let n = name.len().min(info.lo_file_name.len() - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);

    // SAFETY: as above.
    let mut config: loop_config = unsafe { std::mem::zeroed() };
    config.fd = backing.as_raw_fd() as u32;
    config.info = info;
    let fd = device.as_raw_fd();
    // SAFETY: LOOP_CONFIGURE reads a `loop_config` that outlives the call.
    let rc = unsafe { libc::ioctl(fd, LOOP_CONFIGURE as libc::c_ulong, &config) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // Kernels before 5.8 lack LOOP_CONFIGURE: bind in two steps, undoing the first if the
    // second fails.
    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
        return Err(err);
    }
    // SAFETY: LOOP_SET_FD takes the backing descriptor as its integer argument.
    if unsafe { libc::ioctl(fd, LOOP_SET_FD as libc::c_ulong, backing.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: LOOP_SET_STATUS64 reads a `loop_info64` that outlives the call.
    if unsafe { libc::ioctl(fd, LOOP_SET_STATUS64 as libc::c_ulong, &info) } != 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument.
        unsafe { libc::ioctl(fd, LOOP_CLR_FD as libc::c_ulong, 0) };
        return Err(err);
    }
    Ok(())
}

/// A pause of 0 to `10 × attempt` ms, from the clock's low bits (no random crate for this).
fn jitter(attempt: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Duration::from_millis(u64::from(nanos) % (u64::from(attempt) * 10 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing_flags(dev: &Path) -> Option<(String, u32)> {
        let name = dev.file_name()?.to_str()?;
        let sys = Path::new("/sys/block").join(name).join("loop");
        let file = std::fs::read_to_string(sys.join("backing_file")).ok()?;
        let autoclear = std::fs::read_to_string(sys.join("autoclear")).ok()?;
        Some((file.trim().to_string(), autoclear.trim().parse().ok()?))
    }

    #[test]
    fn an_image_is_bound_autoclear_and_freed_with_the_last_descriptor() {
        if !Path::new("/dev/loop-control").exists() || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root and /dev/loop-control");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let dev = LoopDevice::attach(
            &image,
            LoopParams {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let path = dev.path().to_path_buf();
        let (file, autoclear) = backing_flags(&path).expect("bound device in /sys/block");
        assert_eq!(Path::new(&file), image.canonicalize().unwrap());
        assert_eq!(autoclear, 1);
        let ro = std::fs::read_to_string(
            Path::new("/sys/block")
                .join(path.file_name().unwrap())
                .join("ro"),
        )
        .unwrap();
        assert_eq!(ro.trim(), "1");
        drop(dev);
        // Autoclear detaches on the last close; the kernel does it before close returns.
        assert!(
            backing_flags(&path).is_none_or(|(f, _)| Path::new(&f) != image),
            "{} still bound after its last descriptor closed",
            path.display()
        );
    }

    #[test]
    fn a_missing_image_is_named() {
        let e = LoopDevice::attach(Path::new("/nonexistent/layer.erofs"), LoopParams::default())
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/layer.erofs"), "{e}");
    }
}
