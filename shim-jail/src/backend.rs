//! The jail backend: translate the spec, mount the rootfs, then let runj do the rest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protobuf::well_known_types::any::Any;
use serde_json::Value;
use shim_common::mount::{unmount_all, BundleRootfs};
use shim_common::{
    Backend, Context, CreateRequest, Error, ExecRequest, Result, ShimContext, Target,
};

use crate::options::{JailConfig, EXT_FILE};
use crate::runj::Runj;
use crate::spec::{self, PodRole};

struct Container {
    bundle: PathBuf,
    init_pid: u32,
    runj: Runj,
    mounted: bool,
    /// runj signals only a running jail; before `start`, the init is ours to signal.
    started: AtomicBool,
    /// Exec pids, for `pids` (runj has no `ps`).
    execs: Mutex<Vec<u32>>,
}

pub struct JailBackend {
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl JailBackend {
    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }
}

/// Rewrites `bundle/config.json` for runj and logs what runj will not apply.
fn prepare_spec(id: &str, bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).context("read config.json")?;
    let mut config: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
    // A pod's sandbox was created by this same shim, in a sibling bundle.
    let sandbox = match spec::pod_role(&config) {
        PodRole::Container { sandbox_id } => bundle
            .parent()
            .map(|p| p.join(&sandbox_id).join("config.json"))
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok()),
        _ => None,
    };
    let t = spec::translate(&mut config, sandbox.as_ref())
        .map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
    if !t.unsupported.is_empty() {
        log::warn!(
            "container {id}: runj does not apply these config.json fields: {}",
            t.unsupported.join(", ")
        );
    }
    for note in &t.notes {
        log::warn!("container {id}: {note}");
    }
    if !t.stripped.is_empty() {
        log::debug!(
            "container {id}: removed Linux mounts {}",
            t.stripped.join(" ")
        );
    }
    let out = serde_json::to_vec(&config).context_json()?;
    std::fs::write(&path, out).context("write config.json")
}

trait JsonContext<T> {
    fn context_json(self) -> Result<T>;
}

impl<T> JsonContext<T> for std::result::Result<T, serde_json::Error> {
    fn context_json(self) -> Result<T> {
        self.map_err(|e| Error::Runtime(format!("encode config.json: {e}")))
    }
}

impl Backend for JailBackend {
    fn new(_ctx: &ShimContext) -> Result<Self> {
        Ok(JailBackend {
            containers: Mutex::new(HashMap::new()),
        })
    }

    fn create(&self, req: CreateRequest<'_>) -> Result<u32> {
        let config = JailConfig::from_any(req.options)?;
        let runj = Runj::new(&config.binary)?;
        config.save(req.bundle)?;
        prepare_spec(req.id, req.bundle)?;
        if let Some(ext) = config.ext() {
            std::fs::write(req.bundle.join(EXT_FILE), ext.to_string())
                .context("write runj.ext.json")?;
        }
        let rootfs = BundleRootfs::mount(req.bundle, req.rootfs)?;
        let pid = match runj.create(req.id, req.bundle, req.console_socket, req.stdio) {
            Ok(pid) => pid,
            Err(e) => {
                // Leave nothing behind: no half-created jail (the mount goes with `rootfs`).
                let _ = runj.delete(req.id);
                return Err(e);
            }
        };
        let mounted = rootfs.keep();
        let container = Container {
            bundle: req.bundle.to_path_buf(),
            init_pid: pid,
            runj,
            mounted,
            started: AtomicBool::new(false),
            execs: Mutex::new(Vec::new()),
        };
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.to_string(), Arc::new(container));
        Ok(pid)
    }

    fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        c.runj.start(id)?;
        c.started.store(true, Ordering::Release);
        Ok(c.init_pid)
    }

    fn exec(&self, req: ExecRequest<'_>) -> Result<u32> {
        let c = self.get(req.id)?;
        if let Ok(process) = serde_json::from_slice::<Value>(req.spec) {
            let ignored = spec::process_unsupported(&process);
            if !ignored.is_empty() {
                log::warn!(
                    "exec {} in {}: runj does not apply these process fields: {}",
                    req.exec_id,
                    req.id,
                    ignored.join(", ")
                );
            }
        }
        let file = c.bundle.join(format!(".exec-{}.json", req.exec_id));
        std::fs::write(&file, req.spec).context("write exec process spec")?;
        let pid = c.runj.exec(req.id, &file, req.console_socket, req.stdio)?;
        c.execs.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
        Ok(pid)
    }

    fn kill(&self, id: &str, target: Target<'_>, signal: u32, all: bool) -> Result<()> {
        let c = self.get(id)?;
        match target {
            Target::Init if c.started.load(Ordering::Acquire) => c.runj.kill(id, signal, all),
            Target::Init => signal_pid(c.init_pid, signal, id),
            Target::Exec { exec_id, pid } => signal_pid(pid, signal, exec_id),
        }
    }

    fn delete(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        c.runj.delete(id)?;
        if c.mounted {
            unmount_all(&c.bundle.join("rootfs"))?;
        }
        remove_exec_specs(&c.bundle);
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        let alive = |pid: &u32| kill(Pid::from_raw(*pid as i32), None).is_ok();
        let mut pids = vec![c.init_pid];
        pids.extend(
            c.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|p| alive(p)),
        );
        Ok(pids)
    }

    fn pause(&self, _id: &str) -> Result<()> {
        Err(Error::Unimplemented(
            "Pause (runj has no pause: a FreeBSD jail cannot be frozen as a whole)".into(),
        ))
    }

    fn resume(&self, _id: &str) -> Result<()> {
        Err(Error::Unimplemented(
            "Resume (runj has no pause, so nothing to resume)".into(),
        ))
    }

    fn update(&self, _id: &str, _resources: Option<&Any>) -> Result<()> {
        Err(Error::Unimplemented(
            "Update (runj has no update; a jail's rctl(8) limits are fixed at create)".into(),
        ))
    }

    fn host_cgroups(&self) -> bool {
        false
    }

    fn stats(&self, _id: &str, _init_pid: u32) -> Result<Any> {
        Err(Error::Unimplemented(
            "Stats (FreeBSD jails have no cgroups and runj reports no rctl usage)".into(),
        ))
    }

    fn cleanup(_ctx: &ShimContext, id: &str, bundle: &Path) -> Result<()> {
        let config = JailConfig::load(bundle);
        let result = match Runj::new(&config.binary) {
            Ok(runj) => remove_jail(&runj, id),
            // Without runj there can be no jail of ours to remove.
            Err(_) => Ok(()),
        };
        // Unmount even if runj failed: a leaked mount outlives everything else.
        unmount_all(&bundle.join("rootfs"))?;
        remove_exec_specs(bundle);
        result
    }
}

/// After a dead daemon: end whatever still runs in the jail, then delete it.
fn remove_jail(runj: &Runj, id: &str) -> Result<()> {
    let Some(state) = runj.state(id)? else {
        return Ok(());
    };
    if state.status == "running" {
        let _ = runj.kill(id, Signal::SIGKILL as u32, true);
    } else if state.status == "created" && state.pid != 0 {
        let _ = kill(Pid::from_raw(state.pid as i32), Signal::SIGKILL);
    }
    // runj refuses to delete a jail until its processes are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match runj.delete(id) {
            Err(e) if Instant::now() < deadline && e.to_string().contains("not stopped") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn signal_pid(pid: u32, signal: u32, name: &str) -> Result<()> {
    let sig = Signal::try_from(signal as i32)
        .map_err(|_| Error::InvalidArgument(format!("signal {signal}")))?;
    kill(Pid::from_raw(pid as i32), sig).map_err(|e| match e {
        nix::Error::ESRCH => Error::NotFound(format!("{name}: process already finished")),
        e => Error::Sys {
            context: format!("kill {name}"),
            source: e,
        },
    })
}

fn remove_exec_specs(bundle: &Path) {
    let Ok(dir) = std::fs::read_dir(bundle) else {
        return;
    };
    for e in dir.flatten() {
        if e.file_name().to_string_lossy().starts_with(".exec-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
