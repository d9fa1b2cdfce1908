//! What a release holds: the shims, the files each needs on the node, and how containerd
//! runs it. A release directory (unpacked `make dist` tarball, or the DaemonSet image's
//! `/release`) has these files and a `SHA256SUMS` listing every one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::files::{self, FileError};

/// One shim of the release.
#[derive(Debug)]
pub struct Shim {
    /// What `--shims` names it.
    pub name: &'static str,
    /// containerd's runtime type, which containerd maps to the shim's binary name on its
    /// `PATH` (`io.containerd.rs-runc.v2` → `containerd-shim-rs-runc-v2`). Ours are named
    /// apart from every other shim's, so nothing the node has is shadowed; CRI then passes a
    /// handler's options as its TOML section, which every shim of ours reads.
    pub runtime_type: &'static str,
    /// The name containerd looks up: a link in its `PATH` to the installed binary. containerd
    /// 1.6 ignores a handler's `runtime_path` (containerd#8207), so the name is what works
    /// on every version; the binary stays beside its support files, which the VM shim finds
    /// through its resolved path.
    pub link: &'static str,
    /// Its files, relative to the release and to the install directory; the first is the
    /// shim binary, which the handler's `runtime_path` names.
    pub files: &'static [&'static str],
    /// Handler settings it is installed with (overridable with `--set`).
    pub settings: &'static [(&'static str, &'static str)],
    /// Runs on this OS only.
    pub os: &'static str,
}

pub const SHIMS: &[Shim] = &[
    Shim {
        name: "runc",
        runtime_type: "io.containerd.rs-runc.v2",
        link: "containerd-shim-rs-runc-v2",
        files: &["containerd-shim-runc-v2"],
        settings: &[],
        os: "linux",
    },
    Shim {
        name: "wasm",
        runtime_type: "io.containerd.rs-wasm.v2",
        link: "containerd-shim-rs-wasm-v2",
        files: &["containerd-shim-wasm-v2"],
        settings: &[],
        os: "linux",
    },
    Shim {
        name: "vm",
        runtime_type: "io.containerd.rs-vm.v2",
        link: "containerd-shim-rs-vm-v2",
        // The shim finds its guest image, virtiofsd and vhost-device-vsock beside itself.
        files: &[
            "containerd-shim-vm-v2",
            "virtiofsd",
            "vhost-device-vsock",
            "vm-guest/vmlinux",
            "vm-guest/initramfs.cpio",
        ],
        // A pod may size its VM (io.containerd.vm.memory_mib, io.containerd.vm.vcpus).
        settings: &[("pod_annotations", r#"["io.containerd.vm.*"]"#)],
        os: "linux",
    },
    Shim {
        name: "jail",
        runtime_type: "io.containerd.rs-jail.v2",
        link: "containerd-shim-rs-jail-v2",
        files: &["containerd-shim-jail-v2"],
        settings: &[],
        os: "freebsd",
    },
];

/// The installer's own file in a release; installed beside the shims.
pub const INSTALLER: &str = "shim-installer";

/// The shim called `name`.
pub fn shim(name: &str) -> Option<&'static Shim> {
    SHIMS.iter().find(|s| s.name == name)
}

impl Shim {
    /// Whether it runs on the OS this installer was built for.
    pub fn for_this_os(&self) -> bool {
        self.os == std::env::consts::OS
    }

    /// The mode a file of it gets: binaries executable, the guest image read-only.
    pub fn mode(file: &str) -> u32 {
        if file.starts_with("vm-guest/") {
            0o644
        } else {
            0o755
        }
    }
}

/// A release directory and its checksums.
#[derive(Debug)]
pub struct Release {
    pub dir: PathBuf,
    pub sums: HashMap<String, String>,
}

impl Release {
    pub fn open(dir: &Path) -> Result<Release, FileError> {
        Ok(Release {
            dir: dir.to_path_buf(),
            sums: files::read_sums(&dir.join("SHA256SUMS"))?,
        })
    }

    /// The files of `shim` this release lacks (absent or not in `SHA256SUMS`).
    pub fn missing(&self, shim: &Shim) -> Vec<&'static str> {
        shim.files
            .iter()
            .copied()
            .filter(|f| !self.sums.contains_key(*f) || !self.dir.join(f).is_file())
            .collect()
    }
}
