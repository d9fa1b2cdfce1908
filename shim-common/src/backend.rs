//! The trait a runtime implements to become a shim.
//!
//! The SDK owns everything containerd sees: task state, exit codes, `Wait`, event order,
//! stdio, sockets. A backend only makes containers and processes exist and go away.

use std::path::Path;

use protobuf::well_known_types::any::Any;
use protocol::mount::Mount;

use crate::error::{Error, Result};
use crate::options::RuntimeOptions;
use crate::reaper::ExitSink;
use crate::stdio::{CarriedStdio, ChildStdio};

/// Who this shim is serving: the flags containerd started it with.
#[derive(Debug, Clone)]
pub struct ShimContext {
    /// The containerd namespace of every container this shim serves.
    pub namespace: String,
    /// The id containerd started the shim for (the first container of its group).
    pub id: String,
    /// That container's bundle.
    pub bundle: String,
    /// Whether containerd runs with debug logging (the shim log then says more).
    pub debug: bool,
    /// containerd's gRPC socket, for backends that read its content store (empty when the
    /// shim runs without a containerd, e.g. inside a VM, or under a daemon whose only socket
    /// is its ttrpc one).
    pub address: String,
    /// Where a backend whose processes are not host children (a VM's, a remote runtime's)
    /// reports their exits; the SDK sets it for the task service it serves. See
    /// [`ExitSink`].
    pub exits: ExitSink,
}

/// A container's init process, as `Create` asks for it. By the time a backend sees it, the
/// SDK has reserved the id, opened the stdio, mounted the rootfs at `bundle/rootfs` (when
/// [`Backend::MOUNTS_ROOTFS`]) and kept the options in the bundle.
pub struct CreateRequest<'a, O> {
    /// The container's id, unique in the shim.
    pub id: &'a str,
    /// The OCI bundle: `config.json`, and `rootfs`.
    pub bundle: &'a Path,
    /// The rootfs mounts as containerd sent them (already mounted when the SDK mounts them).
    pub rootfs: &'a [Mount],
    /// The runtime options, decoded.
    pub options: &'a O,
    /// A checkpoint image directory to restore from instead of creating afresh (empty: none).
    pub checkpoint: &'a str,
    /// Whether the process gets a pty instead of pipes.
    pub terminal: bool,
    /// With a terminal: where the runtime must send the pty master (`--console-socket`).
    pub console_socket: Option<&'a Path>,
    /// The fds the process must get as stdin, stdout and stderr (unused with a terminal;
    /// all `None` when the backend carries the stdio itself).
    pub stdio: ChildStdio,
    /// When [`Backend::HOST_STDIO`] is `false`: the stdio containerd asked for, which the
    /// backend carries itself, and the SDK's accounting of it. `None` otherwise.
    pub carried: Option<CarriedStdio>,
}

/// What `create` made: the backend's container, which the SDK keeps and hands back to every
/// later call, and the init's pid.
pub struct Created<C> {
    /// The backend's own state of the container.
    pub container: C,
    /// The init process, which exists (stopped before the user's program) — or `None` when
    /// it only comes to exist at `start` (a restore from a checkpoint).
    pub pid: Option<u32>,
}

/// An extra process in a running container, as `Exec` + `Start` ask for it.
pub struct ExecRequest<'a> {
    /// The process's id within its container.
    pub exec_id: &'a str,
    /// The OCI runtime-spec `Process`, JSON, as containerd sent it.
    pub spec: &'a [u8],
    /// Whether the process gets a pty instead of pipes.
    pub terminal: bool,
    /// With a terminal: where the runtime must send the pty master (`--console-socket`).
    pub console_socket: Option<&'a Path>,
    /// The fds the process must get as stdin, stdout and stderr (unused with a terminal;
    /// all `None` when the backend carries the stdio itself).
    pub stdio: ChildStdio,
    /// When [`Backend::HOST_STDIO`] is `false`: the stdio containerd asked for, which the
    /// backend carries itself, and the SDK's accounting of it. `None` otherwise.
    pub carried: Option<CarriedStdio>,
}

/// Which process a signal is for.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The container's init process.
    Init {
        /// Its pid; `0` once its exit is in (a `kill --all` after it, or the end of what
        /// it left behind): the number may be another process's by then.
        pid: u32,
    },
    /// An exec'd process.
    Exec {
        /// Its exec id.
        exec_id: &'a str,
        /// Its pid.
        pid: u32,
    },
}

impl Target<'_> {
    /// The target's pid.
    pub fn pid(&self) -> u32 {
        match *self {
            Target::Init { pid } | Target::Exec { pid, .. } => pid,
        }
    }
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Init { pid } => write!(f, "init (pid {pid})"),
            Target::Exec { exec_id, pid } => write!(f, "exec {exec_id} (pid {pid})"),
        }
    }
}

/// A signal number the host knows (real-time signals included), checked by the SDK before a
/// backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(i32);

impl Signal {
    /// `SIGKILL`.
    pub const KILL: Signal = Signal(libc::SIGKILL);

    /// `number` if it is a signal of this host; `InvalidArgument` otherwise.
    pub fn new(number: u32) -> Result<Signal> {
        let max = max_signal();
        match i32::try_from(number) {
            Ok(n) if (1..=max).contains(&n) => Ok(Signal(n)),
            _ => Err(Error::InvalidArgument(format!(
                "signal {number}: not a signal of this host (1 to {max})"
            ))),
        }
    }

    /// The signal's number.
    pub fn number(self) -> i32 {
        self.0
    }

    /// Sends the signal to the process `pid` (`what` names it in errors). A process that is
    /// gone (or pid `0`: none, see [`Target::Init`]) is `NotFound`, which is what containerd
    /// expects of a finished process.
    pub fn send(self, pid: u32, what: &str) -> Result<()> {
        let gone = || Error::NotFound(format!("{what}: process already finished"));
        let pid = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(gone)?;
        // SAFETY: kill(2) takes plain integers.
        if unsafe { libc::kill(pid, self.0) } == 0 {
            return Ok(());
        }
        match nix::Error::last() {
            nix::Error::ESRCH => Err(gone()),
            e => Err(Error::Sys {
                context: format!("signal {} to {what}", self.0),
                source: e,
            }),
        }
    }
}

/// The highest signal number: real-time signals end at `SIGRTMAX`.
#[cfg(target_os = "linux")]
fn max_signal() -> i32 {
    libc::SIGRTMAX()
}

/// FreeBSD's `SIGRTMAX` (`<sys/signal.h>`).
#[cfg(not(target_os = "linux"))]
fn max_signal() -> i32 {
    126
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A container runtime behind the shim SDK.
///
/// Only `new`, `create`, `start` and `pids` are required; what a runtime cannot do (`exec`
/// included) answers ttrpc `Unimplemented` by default, `kill` signals the target's pid, and
/// a runtime that keeps nothing outside the container value has nothing to `delete` or
/// `cleanup`. The SDK keeps each
/// container's [`Backend::Container`] and hands it to every call about that container; it
/// never holds a container's lock while a backend call runs (a signal to a host exec's pid
/// aside, so that the pid is not reaped and reused meanwhile), so a backend may take its time.
///
/// Every process a backend creates must be a descendant of the shim (directly, or
/// re-parented to it as the subreaper), and any command it runs must go through
/// [`crate::reaper::spawn`] or [`crate::reaper::run`], so the SDK sees every exit — unless
/// its processes live elsewhere (a VM's guest, another machine): then it says
/// [`Backend::HOST_PROCESSES`] `= false` and reports their exits through
/// [`ShimContext::exits`].
pub trait Backend: Send + Sync + 'static {
    /// The backend's state of one container.
    type Container: Send + Sync + 'static;
    /// The runtime options, decoded and kept by the SDK; `()` for none.
    type Options: RuntimeOptions;

    /// Whether the SDK mounts `Create`'s rootfs at `bundle/rootfs` before `create`, and
    /// unmounts it after `delete` and `cleanup`. A backend that hands the mounts to someone
    /// else (a VM's guest) says `false`.
    const MOUNTS_ROOTFS: bool = true;

    /// Whether the pids `create`, `start` and `exec` return are host processes the shim
    /// reaps. A backend whose processes are not host children (a micro-VM's, whose guest
    /// agent sees their exits) says `false`: the reaper's exits are then never taken for
    /// its processes (a guest pid may equal a host one), and the backend reports each exit
    /// through [`ShimContext::exits`] instead.
    const HOST_PROCESSES: bool = true;

    /// Whether the SDK opens each process's stdio on the host (containerd's fifos, log
    /// files, logging binaries) and hands the backend fds ([`CreateRequest::stdio`]), or
    /// for a terminal a console socket. A backend whose processes are elsewhere says
    /// `false` and gets [`CreateRequest::carried`] / [`ExecRequest::carried`] instead:
    /// the paths and the terminal flag, to forward itself.
    const HOST_STDIO: bool = true;

    /// Builds the backend for a daemon serving `ctx`.
    fn new(ctx: &ShimContext) -> Result<Self>
    where
        Self: Sized;

    /// Creates the container. A failure must leave nothing of the backend's behind; the SDK
    /// undoes its own steps.
    fn create(&self, req: CreateRequest<'_, Self::Options>) -> Result<Created<Self::Container>>;

    /// Lets the init process run the user's program. Returns the init's pid (new for a
    /// restore, the created one otherwise).
    fn start(&self, c: &Self::Container) -> Result<u32>;

    /// Starts an extra process in the container and returns its pid.
    fn exec(&self, _c: &Self::Container, _req: ExecRequest<'_>) -> Result<u32> {
        Err(Error::Unimplemented("Exec".into()))
    }

    /// Sends `signal` to the target; with `all`, to every process of the container.
    ///
    /// The default signals the target's host pid ([`Target::pid`], the init's or the exec's)
    /// with [`Signal::send`]: a process that is gone is `NotFound`. It has no way to find
    /// every process of a container, so `all` signals the target alone; a backend whose
    /// containers have other processes (a runtime's `kill --all`, a cgroup to signal) or
    /// whose pids are not host processes ([`Backend::HOST_PROCESSES`] `= false`) overrides it.
    fn kill(
        &self,
        _c: &Self::Container,
        target: Target<'_>,
        signal: Signal,
        _all: bool,
    ) -> Result<()> {
        signal.send(target.pid(), &target.to_string())
    }

    /// Removes the container and everything the backend set up for it (beyond the container
    /// value, which the SDK drops afterwards). The default has nothing to remove.
    fn delete(&self, _c: &Self::Container) -> Result<()> {
        Ok(())
    }

    /// Removes what the backend keeps for exec `exec_id` of `c` once containerd deleted it
    /// (it exited, and its exit was reported): a VM's guest forgets the process, so the id
    /// can be used again and probes that exec every few seconds leave nothing behind. The
    /// default keeps nothing per exec. A failure is logged; the exec is gone either way.
    fn delete_exec(&self, _c: &Self::Container, _exec_id: &str) -> Result<()> {
        Ok(())
    }

    /// Pids of every process in the container.
    fn pids(&self, c: &Self::Container) -> Result<Vec<u32>>;

    /// Freezes every process of the container.
    fn pause(&self, _c: &Self::Container) -> Result<()> {
        Err(Error::Unimplemented("Pause".into()))
    }

    /// Thaws a paused container.
    fn resume(&self, _c: &Self::Container) -> Result<()> {
        Err(Error::Unimplemented("Resume".into()))
    }

    /// New resource limits for a running container: an OCI `LinuxResources` JSON object,
    /// checked by the SDK.
    fn update(&self, _c: &Self::Container, _resources: &[u8]) -> Result<()> {
        Err(Error::Unimplemented("Update".into()))
    }

    /// Whether the container's processes live in host cgroups the SDK can read: then the
    /// SDK answers `Stats` and watches for OOM kills itself. A VM backend says `false`.
    fn host_cgroups(&self) -> bool {
        true
    }

    /// Metrics for `Stats`. The default reads the cgroup of the init process (`init_pid`)
    /// when [`Backend::host_cgroups`] holds.
    fn stats(&self, _c: &Self::Container, init_pid: u32) -> Result<Any> {
        if !self.host_cgroups() {
            return Err(Error::Unimplemented("Stats".into()));
        }
        crate::os::metrics(init_pid)
    }

    /// Dumps the container to `path` (the request's options as containerd sent them).
    fn checkpoint(&self, _c: &Self::Container, _path: &str, _options: Option<&Any>) -> Result<()> {
        Err(Error::Unimplemented("Checkpoint".into()))
    }

    /// `CloseIO` of the stdin of a process whose stdio the backend carries
    /// ([`Backend::HOST_STDIO`] `= false`; exec id empty for the init): it reads EOF once
    /// what containerd wrote is delivered.
    fn close_io(&self, _c: &Self::Container, _exec_id: &str) -> Result<()> {
        Err(Error::Unimplemented("CloseIO".into()))
    }

    /// Resizes a terminal the SDK does not hold itself (a VM guest's, say) — or, for a
    /// backend whose processes are elsewhere ([`Backend::HOST_PROCESSES`] `= false`), the
    /// one behind the pty it relays (the SDK has resized that pty already).
    fn resize_pty(&self, _c: &Self::Container, _exec_id: &str, _w: u32, _h: u32) -> Result<()> {
        Err(Error::Unimplemented("ResizePty".into()))
    }

    /// The backend's pods for containerd 2.x's sandbox API (`sandboxer = "shim"`), served
    /// beside the task service when there are any. The default: none, and the shim answers
    /// that API as unknown, like containerd's runc shim.
    fn sandboxes(&self) -> Option<&dyn crate::sandbox::Sandboxes> {
        None
    }

    /// The daemon is about to exit, its containers deleted (`Shutdown`) or not (a
    /// signal): stop what the backend runs beside them — a VM. The default has nothing.
    fn shutdown(&self) {}

    /// The `delete` action: containerd found the shim dead and asks the binary to remove
    /// whatever the dead daemon left for container `id` in `bundle`, created with `options`.
    /// Runs without a daemon; the SDK unmounts the rootfs afterwards. The default has nothing
    /// to remove: override it if the backend keeps state outside the bundle (runc's state dir).
    fn cleanup(
        _ctx: &ShimContext,
        _id: &str,
        _bundle: &Path,
        _options: &Self::Options,
    ) -> Result<()>
    where
        Self: Sized,
    {
        Ok(())
    }

    /// The cgroup the shim daemon must run in, from the options `start` received (runc's
    /// `ShimCgroup`, relative to the cgroup root). `None`: where containerd started it.
    fn shim_cgroup(_options: &Self::Options) -> Option<String>
    where
        Self: Sized,
    {
        None
    }

    /// The runtime's features for `-info` (containerd 2.x introspection), for the runtime
    /// `options` select: an `Any` clients read, such as an OCI runtime's `features` JSON
    /// ([`protocol::type_urls::OCI_FEATURES`]). `None`: nothing to tell. Runs without a
    /// daemon.
    fn features(_options: &Self::Options) -> Result<Option<Any>>
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
