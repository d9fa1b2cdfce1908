//! A pod's namespaces in the guest, held without a container: the guest's own SDK serves
//! containerd's sandbox API too (the runc backend's host pods), whose holder is a process
//! the agent forks — no image, no OCI runtime call. Both ways a pod reaches the VM shim
//! use it: containerd 2.x's sandbox ([`crate::sandbox`]) and, under containerd 1.x's CRI,
//! the pod's pause container ([`crate::backend`]), which so costs the guest no `crun
//! create` and `crun start` (~0.6 s of a pod's start under TCG here).
//!
//! The holder joins the guest's network namespace (the VM's network is the pod's) and
//! has IPC, UTS (the pod's hostname) and PID namespaces of its own, with the pod's
//! sysctls set in them. Containers join it by `/proc/<pid>/ns/*`, which in the guest name
//! the holder ([`crate::share`] keeps such paths).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protobuf::well_known_types::any::Any;
use protobuf::MessageField;
use protocol::sandbox::{
    CreateSandboxRequest, CreateSandboxResponse, SandboxMetricsRequest, SandboxMetricsResponse,
    ShutdownSandboxRequest, ShutdownSandboxResponse, StartSandboxRequest, StartSandboxResponse,
    StopSandboxRequest, StopSandboxResponse, WaitSandboxRequest, WaitSandboxResponse,
};
use shim_common::{Context, Error, Result};

use crate::guest::Guest;
use crate::share::GUEST_SHARED;

/// The network namespace the guest's holder joins: the guest's own (its PID 1's), which is
/// the pod's network in a VM.
const GUEST_NETNS: &str = "/proc/1/ns/net";

/// A started holder: its guest pid, and the spec the guest describes it with.
pub struct Started {
    pub pid: u32,
    pub spec: Option<serde_json::Value>,
}

/// Has the guest hold sandbox `id`, configured by `config` (CRI's `PodSandboxConfig`);
/// `dir`, a directory of the VM's shared directory made here, is its bundle in the guest.
pub fn start(
    guest: &Guest,
    dir: &Path,
    id: &str,
    config: Option<Any>,
    annotations: HashMap<String, String>,
) -> Result<Started> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let create = CreateSandboxRequest {
        sandbox_id: id.to_string(),
        bundle_path: format!("{GUEST_SHARED}/{name}"),
        options: MessageField::from_option(config),
        netns_path: GUEST_NETNS.to_string(),
        annotations,
        ..Default::default()
    };
    guest.sandbox::<CreateSandboxResponse>("CreateSandbox", &create)?;
    let started = guest.sandbox::<StartSandboxResponse>(
        "StartSandbox",
        &StartSandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        },
    );
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            release(guest, id);
            return Err(e);
        }
    };
    let spec = started
        .spec
        .as_ref()
        .and_then(|a| serde_json::from_slice(&a.value).ok());
    Ok(Started {
        pid: started.pid,
        spec,
    })
}

/// Calls `exited` on a thread of its own once the holder of `id` ends: `Ok` with its exit
/// status, or the error that left the guest unable to say (the VM died, say).
pub fn wait(
    guest: Arc<Guest>,
    id: &str,
    exited: impl FnOnce(Result<u32>) + Send + 'static,
) -> Result<()> {
    let wait = WaitSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("holder-wait".into())
        .spawn(move || {
            exited(
                guest
                    .sandbox_wait::<WaitSandboxResponse>("WaitSandbox", &wait)
                    .map(|w| w.exit_status),
            )
        })
        .context("spawn holder wait thread")?;
    Ok(())
}

/// Stops the holder of `id`. A VM that is gone took the holder with it: nothing to do.
pub fn stop(guest: Option<Arc<Guest>>, id: &str, timeout: Duration) -> Result<()> {
    let Some(guest) = guest else {
        return Ok(());
    };
    let stop = StopSandboxRequest {
        sandbox_id: id.to_string(),
        timeout_secs: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    match guest.sandbox::<StopSandboxResponse>("StopSandbox", &stop) {
        Ok(_) => Ok(()),
        Err(_) if guest.retired() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Has the guest forget the holder of `id` (stopped before); failures are logged only.
pub fn release(guest: &Guest, id: &str) {
    let req = ShutdownSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    };
    if let Err(e) = guest.sandbox::<ShutdownSandboxResponse>("ShutdownSandbox", &req) {
        log::warn!("release sandbox {id} in the VM: {e}");
    }
}

/// The pod's cgroup metrics, as the guest's sandbox service reads them from the pod's
/// `cgroup_parent` there.
pub fn metrics(guest: Option<Arc<Guest>>, id: &str) -> Result<Any> {
    let guest =
        guest.ok_or_else(|| Error::Unavailable(format!("sandbox {id}: its VM is not running")))?;
    let req = SandboxMetricsRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    };
    let r: SandboxMetricsResponse = guest.sandbox("SandboxMetrics", &req)?;
    r.metrics
        .into_option()
        .and_then(|m| m.data.into_option())
        .ok_or_else(|| Error::NotFound(format!("sandbox {id}: the guest gave no metrics")))
}
