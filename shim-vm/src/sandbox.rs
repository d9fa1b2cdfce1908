//! containerd 2.x's sandbox API on the VM shim (`sandboxer = "shim"`): the VM is the pod,
//! and no pause container runs. `StartSandbox` boots the VM, sized from the pod's
//! `PodSandboxConfig`, and has the guest hold the pod's namespaces: the guest's own SDK
//! serves the sandbox API too (the runc backend's host pods), so the holder is a guest
//! process, and the pid containerd gets is that holder's guest pid, like every pid the VM
//! shim reports. CRI builds each container's namespace paths from it (`/proc/<pid>/ns/*`),
//! which in the guest name the holder ([`crate::share`] keeps them). `StopSandbox` stops
//! the holder; the VM stops with the shim, once the pod's last sandbox and task are gone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protobuf::well_known_types::any::Any;
use protobuf::MessageField;
use protocol::sandbox::{
    CreateSandboxRequest, CreateSandboxResponse, SandboxMetricsRequest, SandboxMetricsResponse,
    ShutdownSandboxRequest, ShutdownSandboxResponse, StartSandboxRequest, StartSandboxResponse,
    StopSandboxRequest, StopSandboxResponse, WaitSandboxRequest, WaitSandboxResponse,
};
use shim_common::pod::PodConfig;
use shim_common::sandbox::{SandboxCreate, SandboxExit, Sandboxes};
use shim_common::{options, Context, Error, Result};

use crate::options::{
    Size, VmOptions, CRI_CPU_PERIOD_ANNOTATION, CRI_CPU_QUOTA_ANNOTATION, CRI_MEMORY_ANNOTATION,
};
use crate::pod::Pod;
use crate::share::GUEST_SHARED;

/// The network namespace the guest's holder joins: the guest's own (its PID 1's), which is
/// the pod's network in a VM.
const GUEST_NETNS: &str = "/proc/1/ns/net";

/// Exit status reported for a sandbox whose VM died: killed.
const KILLED: u32 = 137;

/// The pod sandboxes of one VM shim.
pub struct VmSandboxes {
    pod: Arc<Pod>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
}

struct Sandbox {
    /// The sandbox's bundle on the host, where the `delete` action finds the VM.
    bundle: PathBuf,
    options: VmOptions,
    /// The VM's size, from the pod config and annotations, found at create.
    size: Size,
    config: Option<Any>,
    annotations: HashMap<String, String>,
    /// The sandbox's directory in the VM's shared directory: the guest sandbox's bundle.
    share: PathBuf,
    /// The guest's answer to `StartSandbox`'s spec, once started.
    spec: Option<serde_json::Value>,
    started: bool,
}

impl VmSandboxes {
    pub fn new(pod: Arc<Pod>) -> VmSandboxes {
        VmSandboxes {
            pod,
            sandboxes: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The VM's size for a pod: its `PodSandboxConfig`'s resources and the sandbox's
/// annotations, read as a pause container's would be (one sizing rule, in
/// [`VmOptions::size`]).
fn size_of(req: &SandboxCreate<'_>, options: &VmOptions) -> Result<Size> {
    let mut annotations = req.annotations.clone();
    let pod = req
        .options
        .map(PodConfig::of)
        .transpose()?
        .flatten()
        .map(|c| c.resources)
        .unwrap_or_default();
    for (key, value) in [
        (CRI_MEMORY_ANNOTATION, pod.memory_limit),
        (CRI_CPU_QUOTA_ANNOTATION, pod.cpu_quota),
        (CRI_CPU_PERIOD_ANNOTATION, pod.cpu_period),
    ] {
        if value > 0 {
            annotations.insert(key.to_string(), value.to_string());
        }
    }
    options.size(&annotations, None)
}

impl Sandboxes for VmSandboxes {
    fn create(&self, req: &SandboxCreate<'_>) -> Result<()> {
        if let Some(netns) = req.netns {
            // The pod's network namespace: checked here so a bad one fails CreateSandbox,
            // as for a host pod. (Carrying it into the VM is pod networking's part.)
            std::fs::File::open(netns).map_err(|e| {
                Error::InvalidArgument(format!("network namespace {}: {e}", netns.display()))
            })?;
        }
        let options = options::load(req.bundle);
        // The size is checked now: a pod no VM here can hold fails at CreateSandbox.
        let size = size_of(req, &options)?;
        let sandbox = Sandbox {
            bundle: req.bundle.to_path_buf(),
            options,
            size,
            config: req.options.cloned(),
            annotations: req.annotations.clone(),
            share: self.pod.shared().join(format!(".sandbox-{}", req.id)),
            spec: None,
            started: false,
        };
        self.lock().insert(req.id.to_string(), sandbox);
        Ok(())
    }

    fn start(&self, id: &str, exit: SandboxExit) -> Result<u32> {
        let (bundle, options, config, annotations, share, size) = {
            let t = self.lock();
            let s = t
                .get(id)
                .ok_or_else(|| Error::NotFound(format!("sandbox {id}")))?;
            (
                s.bundle.clone(),
                s.options.clone(),
                s.config.clone(),
                s.annotations.clone(),
                s.share.clone(),
                s.size,
            )
        };
        let guest = self.pod.guest(&options, || Ok(size))?;
        crate::backend::record_vm_dir(&bundle, self.pod.dir())?;
        std::fs::create_dir_all(&share).with_context(|| format!("create {}", share.display()))?;
        let name = share
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
        let started: StartSandboxResponse = guest.sandbox(
            "StartSandbox",
            &StartSandboxRequest {
                sandbox_id: id.to_string(),
                ..Default::default()
            },
        )?;
        let pid = started.pid;
        self.pod.set_sandbox(pid);
        let spec = started
            .spec
            .as_ref()
            .and_then(|a| serde_json::from_slice(&a.value).ok());
        if let Some(s) = self.lock().get_mut(id) {
            s.spec = spec;
            s.started = true;
        }
        // The holder's end, as the guest sees it; the VM's, as killed.
        let wait = WaitSandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        };
        std::thread::Builder::new()
            .name("sandbox-wait".into())
            .spawn(move || {
                let status = match guest.sandbox_wait::<WaitSandboxResponse>("WaitSandbox", &wait) {
                    Ok(w) => w.exit_status,
                    Err(e) => {
                        log::warn!("the pod's holder in the VM: {e}; reported killed");
                        KILLED
                    }
                };
                exit.exited(status);
            })
            .context("spawn sandbox wait thread")?;
        Ok(pid)
    }

    fn stop(&self, id: &str, timeout: Duration) -> Result<()> {
        let Some(guest) = self.pod.running() else {
            return Ok(()); // the VM is gone, and the holder with it
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

    fn shutdown(&self, id: &str) -> Result<()> {
        let (share, others) = {
            let mut t = self.lock();
            let s = t.remove(id);
            let others = t.values().any(|s| s.started);
            (s.map(|s| s.share), others)
        };
        // The pod's last sandbox: the VM stops with the shim, which exits next. Another's:
        // the guest releases this one's holder record.
        if others {
            if let Some(guest) = self.pod.running() {
                let req = ShutdownSandboxRequest {
                    sandbox_id: id.to_string(),
                    ..Default::default()
                };
                if let Err(e) = guest.sandbox::<ShutdownSandboxResponse>("ShutdownSandbox", &req) {
                    log::warn!("release sandbox {id} in the VM: {e}");
                }
            }
        }
        if let Some(share) = share {
            crate::share::remove(&share);
        }
        Ok(())
    }

    /// The pod's cgroup in the guest, where its containers' cgroups nest: the guest's
    /// sandbox service reads it as on a host.
    fn metrics(&self, id: &str) -> Result<Any> {
        let guest = self
            .pod
            .running()
            .ok_or_else(|| Error::Unavailable(format!("sandbox {id}: its VM is not running")))?;
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

    fn info(&self, _id: &str) -> HashMap<String, String> {
        HashMap::from([(
            "vm".to_string(),
            serde_json::json!({"dir": self.pod.dir().display().to_string()}).to_string(),
        )])
    }

    fn spec(&self, id: &str) -> Option<serde_json::Value> {
        self.lock().get(id).and_then(|s| s.spec.clone())
    }
}
