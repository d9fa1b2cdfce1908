//! Mounting the rootfs containerd describes in `CreateTaskRequest.rootfs`, with the host's
//! own mount calls (`mount(2)` on Linux, `nmount(2)` on FreeBSD: see `os/`).
//!
//! ```no_run
//! use shim_common::mount::{mount_rootfs, unmount_all};
//! # let (mounts, rootfs): (Vec<shim_common::protocol::mount::Mount>, std::path::PathBuf) = Default::default();
//! mount_rootfs(&mounts, &rootfs)?;
//! // ... the container runs ...
//! unmount_all(&rootfs)?;
//! # Ok::<(), shim_common::Error>(())
//! ```

pub use crate::os::{mount_rootfs, unmount_all};
