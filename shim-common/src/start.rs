//! The `start` action: find or spawn the daemon serving this container's group.

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{Context, Error, Result};
use crate::flags::Flags;
use crate::socket::{self, Bound};

/// Annotation that puts containers in one shim (containerd's runc shim honours it too).
pub const GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";
/// Annotation the CRI plugin sets on every container of a pod.
pub const SANDBOX_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The key that decides which containers share a shim: the group annotation, else the
/// pod's sandbox id, else the container's own id.
pub fn group_id(bundle: &Path, id: &str) -> Result<String> {
    let path = bundle.join("config.json");
    let text = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let spec: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("parse {}: {e}", path.display())))?;
    let annotation = |k: &str| {
        spec.get("annotations")
            .and_then(|a| a.get(k))
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    Ok(annotation(GROUP_ANNOTATION)
        .or_else(|| annotation(SANDBOX_ANNOTATION))
        .unwrap_or_else(|| id.to_string()))
}

/// Runs `start` and returns the address to print.
pub fn start(flags: &Flags) -> Result<String> {
    // containerd writes the runtime options on stdin; drain it so its writer never blocks.
    let mut _options = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut _options);

    let bundle = Path::new(&flags.bundle);
    let group = group_id(bundle, &flags.id)?;
    let address = socket::address(&flags.address, &flags.namespace, &group);
    match socket::bind(&address)? {
        Bound::Existing => {}
        Bound::New(listener) => {
            if let Err(e) = spawn_daemon(flags, &address, listener.into()) {
                let _ = socket::remove(&address);
                return Err(e);
            }
        }
    }
    // containerd reads this back when it restarts and reconnects.
    fs::write(bundle.join("address"), &address).context("write address file")?;
    Ok(address)
}

/// Re-executes this binary as the daemon: its own session (a signal to containerd's process
/// group must not reach it), the bundle as cwd, the listener as fd 3.
fn spawn_daemon(flags: &Flags, address: &str, listener: OwnedFd) -> Result<()> {
    let exe = std::env::current_exe().context("find own executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", address])
        .current_dir(&flags.bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    let fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == crate::serve::LISTENER_FD {
                libc::fcntl(fd, libc::F_SETFD, 0);
            } else if libc::dup2(fd, crate::serve::LISTENER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The daemon is not waited for: once `start` exits it is re-parented to containerd.
    cmd.spawn().context("spawn shim daemon")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    #[test]
    fn grouping_prefers_group_then_sandbox_then_id() {
        let b = bundle(
            r#"{"annotations":{"io.containerd.runc.v2.group":"g","io.kubernetes.cri.sandbox-id":"s"}}"#,
        );
        assert_eq!(group_id(b.path(), "c").unwrap(), "g");
        let b = bundle(r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"s"}}"#);
        assert_eq!(group_id(b.path(), "c").unwrap(), "s");
        let b = bundle(r#"{"ociVersion":"1.0.2"}"#);
        assert_eq!(group_id(b.path(), "c").unwrap(), "c");
    }

    #[test]
    fn malformed_config_is_a_clear_error() {
        let b = bundle("{ not json");
        let err = group_id(b.path(), "c").unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
