//! The jail backend: translate the spec, then let runj do the rest.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protobuf::well_known_types::any::Any;
use serde_json::Value;
use shim_common::pod::PodRole;
use shim_common::prelude::*;
use shim_common::runtime_cli::RuntimeCli;

use crate::options::{JailConfig, EXT_FILE};
use crate::runj;
use crate::spec;

pub struct Container {
    id: String,
    bundle: PathBuf,
    init_pid: u32,
    runj: RuntimeCli,
    /// runj signals only a running jail; before `start`, the init is ours to signal.
    started: AtomicBool,
    /// Exec pids, for `pids` (runj has no `ps`).
    execs: Mutex<Vec<u32>>,
}

pub struct JailBackend;

/// Rewrites `bundle/config.json` for runj and logs what runj will not apply.
fn prepare_spec(id: &str, bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).context("read config.json")?;
    let mut config: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
    // A pod's sandbox was created by this same shim, in a sibling bundle.
    let sandbox = match PodRole::of(&config) {
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
    let out = serde_json::to_vec(&config)
        .map_err(|e| Error::Runtime(format!("encode config.json: {e}")))?;
    std::fs::write(&path, out).context("write config.json")
}

impl Backend for JailBackend {
    type Container = Container;
    type Options = JailConfig;

    fn new(_ctx: &ShimContext) -> Result<Self> {
        Ok(JailBackend)
    }

    fn create(&self, req: CreateRequest<'_, JailConfig>) -> Result<Created<Container>> {
        let runj = runj::resolve(&req.options.binary)?;
        prepare_spec(req.id, req.bundle)?;
        if let Some(ext) = req.options.ext() {
            std::fs::write(req.bundle.join(EXT_FILE), ext.to_string())
                .context("write runj.ext.json")?;
        }
        // runj's create takes the id and bundle as arguments, in that order.
        let args = [req.id.as_ref(), req.bundle.as_os_str()];
        let pid = runj
            .create(req.bundle, req.console_socket, &args, req.stdio)
            .inspect_err(|_| {
                // Leave no half-created jail behind.
                let _ = runj::delete(&runj, req.id);
            })?;
        let container = Container {
            id: req.id.to_string(),
            bundle: req.bundle.to_path_buf(),
            init_pid: pid,
            runj,
            started: AtomicBool::new(false),
            execs: Mutex::new(Vec::new()),
        };
        Ok(Created {
            container,
            pid: Some(pid),
        })
    }

    fn start(&self, c: &Container) -> Result<u32> {
        c.runj.start(&c.id)?;
        c.started.store(true, Ordering::Release);
        Ok(c.init_pid)
    }

    fn exec(&self, c: &Container, req: ExecRequest<'_>) -> Result<u32> {
        if let Ok(process) = serde_json::from_slice::<Value>(req.spec) {
            let ignored = spec::process_unsupported(&process);
            if !ignored.is_empty() {
                log::warn!(
                    "exec {} in {}: runj does not apply these process fields: {}",
                    req.exec_id,
                    c.id,
                    ignored.join(", ")
                );
            }
        }
        let file = c.bundle.join(format!(".exec-{}.json", req.exec_id));
        std::fs::write(&file, req.spec).context("write exec process spec")?;
        let pid = runj::exec(&c.runj, &c.id, &file, req.console_socket, req.stdio)?;
        c.execs.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
        Ok(pid)
    }

    fn kill(&self, c: &Container, target: Target<'_>, signal: Signal, all: bool) -> Result<()> {
        match target {
            Target::Init { .. } if c.started.load(Ordering::Acquire) => {
                c.runj.kill(&c.id, signal, all)
            }
            Target::Init { pid } => signal.send(pid, &format!("container {}", c.id)),
            Target::Exec { exec_id, pid } => signal.send(pid, &format!("exec {exec_id}")),
        }
    }

    fn delete(&self, c: &Container) -> Result<()> {
        runj::delete(&c.runj, &c.id)?;
        remove_exec_specs(&c.bundle);
        Ok(())
    }

    fn pids(&self, c: &Container) -> Result<Vec<u32>> {
        let alive = |pid: &u32| {
            let pid = nix::unistd::Pid::from_raw(*pid as i32);
            nix::sys::signal::kill(pid, None).is_ok()
        };
        let mut pids = vec![c.init_pid];
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        pids.extend(execs.iter().filter(|p| alive(p)));
        Ok(pids)
    }

    fn pause(&self, _c: &Container) -> Result<()> {
        Err(Error::Unimplemented(
            "Pause (runj has no pause: a FreeBSD jail cannot be frozen as a whole)".into(),
        ))
    }

    fn resume(&self, _c: &Container) -> Result<()> {
        Err(Error::Unimplemented(
            "Resume (runj has no pause, so nothing to resume)".into(),
        ))
    }

    fn update(&self, _c: &Container, _resources: &[u8]) -> Result<()> {
        Err(Error::Unimplemented(
            "Update (runj has no update; a jail's rctl(8) limits are fixed at create)".into(),
        ))
    }

    fn host_cgroups(&self) -> bool {
        false
    }

    fn stats(&self, _c: &Container, _init_pid: u32) -> Result<Any> {
        Err(Error::Unimplemented(
            "Stats (FreeBSD jails have no cgroups and runj reports no rctl usage)".into(),
        ))
    }

    fn cleanup(_ctx: &ShimContext, id: &str, bundle: &Path, options: &JailConfig) -> Result<()> {
        let result = match runj::resolve(&options.binary) {
            Ok(runj) => remove_jail(&runj, id),
            // Without runj there can be no jail of ours to remove.
            Err(_) => Ok(()),
        };
        remove_exec_specs(bundle);
        result
    }
}

/// After a dead daemon: end whatever still runs in the jail, then delete it.
fn remove_jail(runj: &RuntimeCli, id: &str) -> Result<()> {
    let Some(state) = runj.state(id)? else {
        return Ok(());
    };
    if state.status == "running" {
        let _ = runj.kill(id, Signal::KILL, true);
    } else if state.status == "created" && state.pid != 0 {
        let _ = Signal::KILL.send(state.pid, &format!("container {id}"));
    }
    // runj refuses to delete a jail until its processes are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match runj.delete(id, false)? {
            Err(r) if Instant::now() < deadline && r.says(&["not stopped"]) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(r) if !r.says(&["invalid jail id"]) => return Err(r.into()),
            _ => return Ok(()),
        }
    }
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
