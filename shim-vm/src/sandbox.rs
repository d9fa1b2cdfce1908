//! containerd 2.x's sandbox API on the VM shim (`sandboxer = "shim"`): the VM is the pod,
//! and no pause container runs. `StartSandbox` boots the VM, sized from the pod's
//! `PodSandboxConfig`, and has the guest hold the pod's namespaces ([`crate::holder`]), so
//! the pid containerd gets is that holder's guest pid, like every pid the VM shim reports.
//! CRI builds each container's namespace paths from it (`/proc/<pid>/ns/*`). `StopSandbox`
//! stops the holder; the VM stops with the shim, once the pod's last sandbox and task are
//! gone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protobuf::well_known_types::any::Any;
use shim_common::pod::PodConfig;
use shim_common::sandbox::{SandboxCreate, SandboxExit, Sandboxes};
use shim_common::{options, Error, Result};

use crate::holder;
use crate::options::{
    Size, VmOptions, CRI_CPU_PERIOD_ANNOTATION, CRI_CPU_QUOTA_ANNOTATION, CRI_MEMORY_ANNOTATION,
};
use crate::pod::{Pod, KILLED};

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
    /// The pod's network namespace (CRI's, after CNI ran), whose interface the VM takes.
    netns: Option<PathBuf>,
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
fn size_of(
    req: &SandboxCreate<'_>,
    config: Option<&PodConfig>,
    options: &VmOptions,
) -> Result<Size> {
    let mut annotations = req.annotations.clone();
    let pod = config.map(|c| c.resources).unwrap_or_default();
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
            // The pod's network namespace, whose interface the VM takes over when it boots:
            // checked here so a bad one fails CreateSandbox, as for a host pod.
            std::fs::File::open(netns).map_err(|e| {
                Error::InvalidArgument(format!("network namespace {}: {e}", netns.display()))
            })?;
        }
        let options = options::load(req.bundle);
        let config = req.options.map(PodConfig::of).transpose()?.flatten();
        // The VM's network is the pod's own: its sysctls are checked as for such a pod.
        if let Some(c) = &config {
            shim_common::host_pods::check_sysctls(&c.sysctls, true)?;
        }
        // The size is checked now: a pod no VM here can hold fails at CreateSandbox.
        let size = size_of(req, config.as_ref(), &options)?;
        let sandbox = Sandbox {
            bundle: req.bundle.to_path_buf(),
            options,
            size,
            netns: req.netns.map(Path::to_path_buf),
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
        let (bundle, options, config, annotations, share, size, netns) = {
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
                s.netns.clone(),
            )
        };
        let guest = self.pod.guest(&options, netns.as_deref(), || Ok(size))?;
        crate::backend::record_vm_dir(&bundle, self.pod.dir())?;
        let started = holder::start(&guest, &share, id, config, annotations)?;
        let pid = started.pid;
        self.pod.set_sandbox(pid);
        if let Some(s) = self.lock().get_mut(id) {
            s.spec = started.spec;
            s.started = true;
        }
        // The holder's end, as the guest sees it; the VM's, as killed.
        holder::wait(guest, id, move |status| {
            exit.exited(status.unwrap_or_else(|e| {
                log::warn!("the pod's holder in the VM: {e}; reported killed");
                KILLED
            }))
        })?;
        Ok(pid)
    }

    fn stop(&self, id: &str, timeout: Duration) -> Result<()> {
        holder::stop(self.pod.running(), id, timeout)
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
                holder::release(&guest, id);
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
        holder::metrics(self.pod.running(), id)
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
