//! The trait a runtime implements to become a shim.
//!
//! The SDK owns everything containerd sees: task state, exit codes, `Wait`, event order,
//! stdio, sockets. A backend only makes containers and processes exist and go away.

use std::path::Path;

use protobuf::well_known_types::any::Any;
use protocol::mount::Mount;

use crate::error::{Error, Result};
use crate::stdio::{ChildStdio, IoOwner};

/// Who this shim is serving: the flags containerd started it with.
#[derive(Debug, Clone)]
pub struct ShimContext {
    pub namespace: String,
    /// The id containerd started the shim for (the first container of its group).
    pub id: String,
    pub bundle: String,
    pub debug: bool,
    /// containerd's gRPC socket, for backends that read its content store (empty when the
    /// shim runs without a containerd, e.g. inside a VM).
    pub address: String,
}

/// A container's init process, as `Create` asks for it.
pub struct CreateRequest<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub rootfs: &'a [Mount],
    /// Runtime options (`containerd.runc.v1.Options`, ...) exactly as containerd sent them.
    pub options: Option<&'a Any>,
    /// A checkpoint image directory to restore from instead of creating afresh (empty: none).
    pub checkpoint: &'a str,
    pub terminal: bool,
    /// With a terminal: where the runtime must send the pty master (`--console-socket`).
    pub console_socket: Option<&'a Path>,
    /// The fds the process must get as stdin, stdout and stderr (unused with a terminal).
    pub stdio: ChildStdio,
}

/// An extra process in a running container, as `Exec` + `Start` ask for it.
pub struct ExecRequest<'a> {
    pub id: &'a str,
    pub exec_id: &'a str,
    /// The OCI runtime-spec `Process`, JSON, as containerd sent it.
    pub spec: &'a [u8],
    pub terminal: bool,
    /// With a terminal: where the runtime must send the pty master (`--console-socket`).
    pub console_socket: Option<&'a Path>,
    pub stdio: ChildStdio,
}

/// Which process a signal is for.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Init,
    Exec { exec_id: &'a str, pid: u32 },
}

/// A container runtime behind the shim SDK.
///
/// Only `create`, `start`, `exec`, `kill`, `delete` and `pids` are required; what a runtime
/// cannot do answers ttrpc `Unimplemented` by default.
///
/// Every process a backend creates must be a descendant of the shim (directly, or
/// re-parented to it as the subreaper), and any helper command it runs must go through
/// [`crate::reaper::run`], so the SDK sees every exit.
pub trait Backend: Send + Sync + 'static {
    /// Builds the backend for a daemon serving `ctx`.
    fn new(ctx: &ShimContext) -> Result<Self>
    where
        Self: Sized;

    /// Owner of the stdio pipes (`io_uid`/`io_gid`) for a container created with `options`.
    fn io_owner(&self, _options: Option<&Any>) -> Result<IoOwner> {
        Ok(IoOwner::default())
    }

    /// Creates the container; its init process must exist (stopped before the user's
    /// program) when this returns. Returns the init's pid — or 0 when the init only comes
    /// to exist at `start` (a restore from a checkpoint).
    fn create(&self, req: CreateRequest<'_>) -> Result<u32>;

    /// Lets the init process run the user's program. Returns the init's pid (new for a
    /// restore, the created one otherwise).
    fn start(&self, id: &str) -> Result<u32>;

    /// Starts an extra process in the container and returns its pid.
    fn exec(&self, req: ExecRequest<'_>) -> Result<u32>;

    /// Sends `signal` to the target; with `all`, to every process of the container.
    fn kill(&self, id: &str, target: Target<'_>, signal: u32, all: bool) -> Result<()>;

    /// Removes the container and everything the backend set up for it (mounts, state).
    fn delete(&self, id: &str) -> Result<()>;

    /// Pids of every process in the container.
    fn pids(&self, id: &str) -> Result<Vec<u32>>;

    fn pause(&self, _id: &str) -> Result<()> {
        Err(Error::Unimplemented("Pause".into()))
    }

    fn resume(&self, _id: &str) -> Result<()> {
        Err(Error::Unimplemented("Resume".into()))
    }

    /// New resource limits for a running container; [`linux_resources`] checks the payload.
    fn update(&self, _id: &str, _resources: Option<&Any>) -> Result<()> {
        Err(Error::Unimplemented("Update".into()))
    }

    /// Whether the container's processes live in host cgroups the SDK can read: then the
    /// SDK answers `Stats` and watches for OOM kills itself. A VM backend says `false`.
    fn host_cgroups(&self) -> bool {
        true
    }

    /// Metrics for `Stats`. The default reads the cgroup of the init process (`init_pid`)
    /// when [`Backend::host_cgroups`] holds.
    fn stats(&self, _id: &str, init_pid: u32) -> Result<Any> {
        if !self.host_cgroups() {
            return Err(Error::Unimplemented("Stats".into()));
        }
        crate::os::metrics(init_pid)
    }

    fn checkpoint(&self, _id: &str, _path: &str, _options: Option<&Any>) -> Result<()> {
        Err(Error::Unimplemented("Checkpoint".into()))
    }

    fn resize_pty(&self, _id: &str, _exec_id: &str, _width: u32, _height: u32) -> Result<()> {
        Err(Error::Unimplemented("ResizePty".into()))
    }

    /// The `delete` action: containerd found the shim dead and asks the binary to remove
    /// whatever the dead daemon left for container `id` in `bundle`. Runs without a daemon.
    fn cleanup(ctx: &ShimContext, id: &str, bundle: &Path) -> Result<()>
    where
        Self: Sized;

    /// The cgroup the shim daemon must run in, from the runtime options `start` received
    /// (runc's `ShimCgroup`, relative to the cgroup root). `None`: where containerd started
    /// it. Options this cannot read are for `Create` to refuse, not `start`.
    fn shim_cgroup(_options: Option<&Any>) -> Option<String>
    where
        Self: Sized,
    {
        None
    }

    /// The runtime's features for `-info` (containerd 2.x introspection), for the runtime
    /// `options` would select: an `Any` clients read, such as an OCI runtime's `features`
    /// JSON ([`protocol::type_urls::OCI_FEATURES`]). `None`: nothing to tell. Runs without
    /// a daemon.
    fn features(_options: Option<&Any>) -> Result<Option<Any>>
    where
        Self: Sized,
    {
        Ok(None)
    }
}

/// The type containerd (and CRI's `UpdateContainerResources`) sends in `Update`.
pub const LINUX_RESOURCES_TYPE: &str = "LinuxResources";

/// The OCI `LinuxResources` JSON of an `Update` request, checked to be a JSON object of that
/// type: anything else is `InvalidArgument` before a runtime or cgroup sees it.
pub fn linux_resources(resources: Option<&Any>) -> Result<&[u8]> {
    let any = resources.ok_or_else(|| Error::InvalidArgument("update: no resources".into()))?;
    // `types.containerd.io/opencontainers/runtime-spec/1/LinuxResources`; older clients
    // leave the URL empty.
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if !any.type_url.is_empty() && name != LINUX_RESOURCES_TYPE {
        return Err(Error::InvalidArgument(format!(
            "update resources of type {:?}: expected {LINUX_RESOURCES_TYPE}",
            any.type_url
        )));
    }
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("update resources: {e}")))?;
    Ok(&any.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: &str) -> Any {
        Any {
            type_url: type_url.into(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn update_payload_must_be_linux_resources_json() {
        let url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
        let ok = any(url, r#"{"pids":{"limit":7}}"#);
        assert_eq!(linux_resources(Some(&ok)).unwrap(), ok.value.as_slice());
        assert!(linux_resources(Some(&any("", "{}"))).is_ok());
        for bad in [
            any(url, "not json"),
            any(url, "[1]"),
            any(
                "types.containerd.io/opencontainers/runtime-spec/1/WindowsResources",
                "{}",
            ),
        ] {
            let e = linux_resources(Some(&bad)).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
        }
        assert!(linux_resources(None).is_err());
    }
}
