//! Test harness for the shims in this workspace.
//!
//! The integration tests and benchmarks need three things that must not depend
//! on the state of the host or on the network:
//!
//! * a container image, built offline from Debian's static busybox
//!   ([`image::busybox_oci_archive`]);
//! * a containerd that belongs to the test alone, so tests never touch (or get
//!   confused by) a system containerd, and everything it creates is removed
//!   afterwards ([`containerd::Containerd`]);
//! * a way to find the shim binaries cargo just built ([`target_bin_dir`]), so
//!   they can be put first on containerd's `PATH`.
//!
//! Everything here is test-support code: functions return [`Error`] where a
//! caller might reasonably want to react, and the few helpers that panic say so
//! in their docs.

pub mod backends;
pub mod bench;
pub mod checks;
pub mod conformance;
pub mod containerd;
pub mod cri;
pub mod cri_fixture;
pub mod dist;
pub mod error;
pub mod events;
pub mod fixture;
pub mod image;
pub mod leftovers;
pub mod otlp;
pub mod output;
pub mod procfs;
pub mod shim_client;
pub mod soak;
pub mod terminal;
pub mod wasm_fixture;
pub mod wasm_image;
pub mod wasm_modules;

use std::path::PathBuf;

pub use containerd::{
    pss_kb, rss_kb, Containerd, ContainerdBuilder, CtrOutput, DEFAULT_NAMESPACE, GO_RUNTIME,
    GO_SHIM_BINARY, OUR_RUNTIME, VM_RUNTIME, WASM_RUNTIME, WASM_SHIM_BINARY,
};
pub use error::Error;
pub use image::{busybox_oci_archive, cached_busybox_archive, BUSYBOX_REF};

/// Directory that holds the workspace's built binaries (`target/<profile>`).
///
/// Resolution order:
/// 1. `$SHIM_BIN_DIR`, so CI or a developer can point the tests at binaries
///    built elsewhere (e.g. a release build, or another target dir);
/// 2. derived from [`std::env::current_exe`]: integration tests run from
///    `target/<profile>/deps/<test>-<hash>`, benches and examples from
///    `target/<profile>/...`, so the `target/<profile>` directory is the parent
///    of `deps` (or of the executable itself).
///
/// It does not check that any particular binary exists there: callers know
/// which binary they need and can give a better message.
pub fn target_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHIM_BIN_DIR") {
        if !dir.is_empty() {
            return PathBuf::from(dir);
        }
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| {
        // Test-only panic: without our own path there is nothing sensible to return.
        panic!("cannot determine current executable (set SHIM_BIN_DIR): {e}")
    });
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir.pop();
    }
    dir
}

/// A container id unique on this host for the life of this process:
/// `<prefix>-<pid>-<n>`.
///
/// Container ids must not collide between containerds running at the same time
/// in the same namespace, even though each has its own root: runc's state
/// (`/run/containerd/runc/<ns>/<id>`) and the default cgroup path
/// (`/<ns>/<id>`) are host-wide. Tests running in parallel should use this.
pub fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Panics with a clear message unless running as root (effective uid 0).
///
/// The tests start containerd, mount overlayfs and create cgroups, none of
/// which works unprivileged. Failing loudly is preferred over silently skipping:
/// a CI run that "passes" because every test skipped is worse than a red one.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests need root (euid 0, have {euid}): they run a private containerd, \
         mount overlayfs and create cgroups; run them as root, e.g. `sudo -E cargo test`"
    );
}

/// Returns true if the current process runs as root; for callers that prefer
/// to decide themselves what to do without root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn target_bin_dir_is_profile_dir() {
        if std::env::var_os("SHIM_BIN_DIR").is_some() {
            return;
        }
        let dir = super::target_bin_dir();
        assert!(
            dir.join("deps").is_dir(),
            "{} is not target/<profile>",
            dir.display()
        );
    }

    #[test]
    fn unique_ids_differ() {
        assert_ne!(super::unique_id("a"), super::unique_id("a"));
    }
}
