//! containerd 2.x's sandbox API as a backend sees it: the part of a pod its containers share
//! (a micro-VM, a set of namespaces), which containerd's `shim` sandboxer (CRI with
//! `sandboxer = "shim"`) creates, starts, stops and releases through the shim instead of a
//! pause container.
//!
//! The SDK serves the protocol (`containerd.runtime.sandbox.v1.Sandbox`, beside the task
//! service on the same connection) and owns what containerd observes: each sandbox's state
//! (`SANDBOX_READY` / `SANDBOX_NOTREADY`), pid and times, calls out of order refused
//! (`AlreadyExists`, `FailedPrecondition`, `NotFound`), `WaitSandbox` answered when the
//! sandbox's process ends, the daemon's exit once the last sandbox and task are gone. A
//! backend implements [`Sandboxes`] for what runs and returns it from
//! [`crate::Backend::sandboxes`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protobuf::well_known_types::any::Any;
use protocol::mount::Mount;
use protocol::platform::Platform;

use crate::error::{Error, Result};

/// `CreateSandbox`, as containerd sent it.
#[derive(Debug)]
pub struct SandboxCreate<'a> {
    /// The sandbox id (CRI's pod sandbox id).
    pub id: &'a str,
    /// The sandbox's directory, made by containerd.
    pub bundle: &'a Path,
    /// Mounts for a sandbox root filesystem, if containerd prepared one (none for CRI).
    pub rootfs: &'a [Mount],
    /// CRI's `PodSandboxConfig`, as an `Any`, for CRI pods.
    pub options: Option<&'a Any>,
    /// The pod's network namespace, made by CRI (`None`: host network, or none asked for).
    pub netns: Option<&'a Path>,
    /// The sandbox's annotations (CRI's pod annotations, and its own).
    pub annotations: &'a HashMap<String, String>,
}

/// Tells the SDK that a sandbox's process ended (its exit status, 128 + signal when killed).
/// A backend whose sandbox process the shim reaps itself (a host child, with
/// [`crate::Backend::HOST_PROCESSES`]) need not call it: the SDK sees that exit anyway.
/// Later calls than the first, and calls for a sandbox gone, change nothing.
#[derive(Clone)]
pub struct SandboxExit(Arc<dyn Fn(u32) + Send + Sync>);

impl SandboxExit {
    pub(crate) fn new(f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        SandboxExit(Arc::new(f))
    }

    /// Reports the exit.
    pub fn exited(&self, status: u32) {
        (self.0)(status)
    }
}

impl std::fmt::Debug for SandboxExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SandboxExit")
    }
}

/// What a backend does for each sandbox call. The SDK calls it in order (create, start,
/// stop, shutdown; stop may be skipped for a sandbox never started) and never twice at once
/// for one sandbox; calls for different sandboxes may overlap.
pub trait Sandboxes: Send + Sync {
    /// Prepares the sandbox; nothing need run yet. A failure leaves nothing behind.
    fn create(&self, req: &SandboxCreate<'_>) -> Result<()>;

    /// Starts what holds the sandbox and returns its pid; `exit` reports its end.
    fn start(&self, id: &str, exit: SandboxExit) -> Result<u32>;

    /// Ends the sandbox's process: politely for up to `timeout`, then for sure. The SDK
    /// waits for the exit afterwards.
    fn stop(&self, id: &str, timeout: Duration) -> Result<()>;

    /// Releases everything the backend keeps for the sandbox; its process is gone.
    fn shutdown(&self, id: &str) -> Result<()>;

    /// The platform the sandbox runs containers on. The default: the shim's own.
    fn platform(&self, _id: &str) -> Result<Platform> {
        Ok(host_platform())
    }

    /// The sandbox's metrics (containerd's cgroup metrics types, say) for `SandboxMetrics`.
    fn metrics(&self, _id: &str) -> Result<Any> {
        Err(Error::Unimplemented("SandboxMetrics".into()))
    }

    /// What `SandboxStatus` tells in `info` when asked to be verbose, beside the SDK's
    /// `info` key (containerd's `SandboxInfo`: pid, process status, runtime type and
    /// spec). Values show best in `crictl inspectp` when they are JSON.
    fn info(&self, _id: &str) -> HashMap<String, String> {
        HashMap::new()
    }

    /// The sandbox's OCI runtime spec once started, as containerd keeps a pause container's:
    /// its namespaces, cgroups path, resources and annotations, which containerd 2.3's NRI
    /// reads from `StartSandboxResponse.spec`. `None`: the sandbox has none.
    fn spec(&self, _id: &str) -> Option<serde_json::Value> {
        None
    }
}

/// This shim's platform as containerd spells it (GOOS/GOARCH names).
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        os: std::env::consts::OS.into(),
        architecture: architecture.into(),
        ..Default::default()
    }
}
