//! Mounting the rootfs containerd describes in `CreateTaskRequest.rootfs`, with the host's
//! own mount calls (`mount(2)` on Linux, `nmount(2)` on FreeBSD: see `os/`). Entries with
//! the `loop` option are image files bound to a loop device first (Linux); lists that use
//! containerd's mount transforms and templates are mounted in stages (see [`staged`]).
//!
//! ```no_run
//! use shim_common::mount::{mount_rootfs, unmount_rootfs};
//! # let (mounts, rootfs): (Vec<shim_common::protocol::mount::Mount>, std::path::PathBuf) = Default::default();
//! mount_rootfs(&mounts, &rootfs)?;
//! // ... the container runs ...
//! unmount_rootfs(&rootfs)?;
//! # Ok::<(), shim_common::Error>(())
//! ```

pub mod staged;

pub use crate::os::unmount_all;

use std::path::{Path, PathBuf};

use protocol::mount::Mount;

use crate::error::{Context, Result};

/// Mounts `mounts` on `rootfs`: in stages when the list uses containerd's transforms or
/// templates (the entries before the last beside `rootfs`, in `rootfs-mounts/`), else every
/// entry on `rootfs` in order. On failure, undoes what it mounted.
pub fn mount_rootfs(mounts: &[Mount], rootfs: &Path) -> Result<()> {
    if staged::is_staged(mounts) {
        staged::mount(mounts, rootfs)
    } else {
        crate::os::mount_rootfs(mounts, rootfs)
    }
}

/// Unmounts what [`mount_rootfs`] mounted on `rootfs` (and its stages, if any). Nothing
/// mounted is fine.
pub fn unmount_rootfs(rootfs: &Path) -> Result<()> {
    staged::unmount(rootfs)
}

/// The rootfs of a container being created, mounted at `<bundle>/rootfs`. If creation fails
/// and the guard is dropped, the mounts go with it; [`BundleRootfs::keep`] hands them over
/// to the container once the runtime has it.
pub struct BundleRootfs {
    target: PathBuf,
    mounted: bool,
}

impl BundleRootfs {
    /// Mounts `mounts` on `<bundle>/rootfs` (nothing to do when containerd sent none: the
    /// spec's `root.path` is then a host directory).
    pub fn mount(bundle: &Path, mounts: &[Mount]) -> Result<BundleRootfs> {
        let target = bundle.join("rootfs");
        if mounts.is_empty() {
            return Ok(BundleRootfs {
                target,
                mounted: false,
            });
        }
        std::fs::create_dir_all(&target).context("create rootfs directory")?;
        mount_rootfs(mounts, &target)?;
        Ok(BundleRootfs {
            target,
            mounted: true,
        })
    }

    /// Keeps the mounts; returns whether there are any to unmount at delete.
    pub fn keep(mut self) -> bool {
        std::mem::take(&mut self.mounted)
    }
}

impl Drop for BundleRootfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = unmount_rootfs(&self.target);
        }
    }
}
