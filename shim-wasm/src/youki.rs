//! youki's `libcontainer`, driven for one namespace: create (init waits for start), start,
//! exec into a running container, signal, pause, update, delete.
//!
//! State lives under `/run/containerd/wasm/<namespace>/<id>`, next to runc's
//! `/run/containerd/runc/<namespace>`. Cgroups are plain cgroupfs paths (`with_systemd(false)`):
//! containerd's `cgroupsPath` is honoured as written, and PID 1 need not be systemd.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::LinuxResources;
use serde_json::{json, Value};

use shim_common::stdio::ChildStdio;
use shim_common::{Context, Error, Result};

use crate::engine::Kind;
use crate::executor::WasmExecutor;
use crate::guest::Guest;
use crate::{fork, loopback};

/// The root of one namespace's container states.
#[derive(Debug, Clone)]
pub struct Youki {
    root: PathBuf,
}

/// A libcontainer error with every cause, since its top-level messages are terse.
fn runtime(what: &str, e: impl std::error::Error) -> Error {
    let mut msg = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::Runtime(msg)
}

/// The fds libcontainer hands the process as its stdio: with a Wasm init's artifact, all
/// the helper keeps of the shim's (see `fork`).
fn stdio_fds(stdio: &ChildStdio) -> Vec<RawFd> {
    [&stdio.stdin, &stdio.stdout, &stdio.stderr]
        .into_iter()
        .flatten()
        .map(|fd| fd.as_raw_fd())
        .collect()
}

/// `stdio` for the helper's job: the fd numbers it inherits, `null` for /dev/null.
fn stdio_json(stdio: &ChildStdio) -> Value {
    let fd = |f: &Option<OwnedFd>| f.as_ref().map(|f| f.as_raw_fd());
    json!([fd(&stdio.stdin), fd(&stdio.stdout), fd(&stdio.stderr)])
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| Error::InvalidArgument(format!("path {} is not UTF-8", path.display())))
}

/// Runs a job of [`Youki::create`] or [`Youki::exec`] in the helper process (see `fork`),
/// which inherited the fds the job names; returns the new process's pid.
pub fn run_job(job: &Value) -> Result<u32> {
    let field = |k: &str| {
        job[k]
            .as_str()
            .ok_or_else(|| Error::InvalidArgument(format!("helper job without {k:?}")))
    };
    let debug = job["debug"].as_bool().unwrap_or(false);
    shim_common::logger::init(debug);
    crate::log::init(debug);
    let inherited = |v: &Value| -> Result<Option<OwnedFd>> {
        let Some(fd) = v.as_i64().and_then(|fd| RawFd::try_from(fd).ok()) else {
            return Ok(None);
        };
        fork::cloexec(fd)?;
        // SAFETY: the shim kept this fd open across the exec for this job alone.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    };
    let stdio = ChildStdio {
        stdin: inherited(&job["stdio"][0])?,
        stdout: inherited(&job["stdio"][1])?,
        stderr: inherited(&job["stdio"][2])?,
    };
    let youki = Youki {
        root: PathBuf::from(field("root")?),
    };
    let console = job["console"].as_str().map(Path::new);
    match field("op")? {
        "create" => {
            let g = &job["guest"];
            let guest = if g.is_null() {
                None
            } else {
                let artifact = inherited(&g["artifact_fd"])?.ok_or_else(|| {
                    Error::InvalidArgument("helper job: guest without artifact".into())
                })?;
                Some(Guest {
                    id: g["id"].as_str().unwrap_or_default().to_string(),
                    kind: match g["kind"].as_str() {
                        Some("component") => Kind::Component,
                        _ => Kind::Module,
                    },
                    // The init reads it after the clone; this process only hands it on.
                    artifact_fd: artifact.into_raw_fd(),
                    func: g["func"].as_str().map(str::to_string),
                })
            };
            let executor = WasmExecutor { guest };
            youki.create_here(
                field("id")?,
                Path::new(field("bundle")?),
                stdio,
                console,
                executor,
            )
        }
        "exec" => youki.exec_here(field("id")?, Path::new(field("process")?), stdio, console),
        op => Err(Error::InvalidArgument(format!("helper job {op:?}"))),
    }
}

impl Youki {
    pub fn new(namespace: &str) -> Youki {
        Youki {
            root: Path::new("/run/containerd/wasm").join(namespace),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn builder(
        &self,
        id: &str,
        stdio: ChildStdio,
        console: Option<&Path>,
    ) -> Result<ContainerBuilder> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("create {}", self.root.display()))?;
        // An fd libcontainer is not given would be the shim's own: /dev/null instead.
        let null = || -> Result<OwnedFd> {
            Ok(File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .context("open /dev/null")?
                .into())
        };
        let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(&self.root)
            .map_err(|e| runtime("container state root", e))?
            .with_console_socket(console);
        if console.is_none() {
            b = b
                .with_stdin(stdio.stdin.map_or_else(null, Ok)?)
                .with_stdout(stdio.stdout.map_or_else(null, Ok)?)
                .with_stderr(stdio.stderr.map_or_else(null, Ok)?);
        }
        Ok(b)
    }

    /// Creates the container; its init waits for [`Youki::start`]. Returns it and the pid.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ChildStdio,
        console: Option<&Path>,
        executor: WasmExecutor,
    ) -> Result<(Container, u32)> {
        // State of that id is another container's (or one a dead shim left): not ours to
        // undo on failure.
        if self.root.join(id).exists() {
            return Err(Error::AlreadyExists(format!(
                "container {id} state in {}",
                self.root.display()
            )));
        }
        let mut keep = stdio_fds(&stdio);
        keep.extend(executor.guest.as_ref().map(|g| g.artifact_fd));
        let guest = executor.guest.as_ref().map(|g| {
            json!({
                "id": g.id,
                "kind": match g.kind { Kind::Module => "module", Kind::Component => "component" },
                "artifact_fd": g.artifact_fd,
                "func": g.func,
            })
        });
        let mut job = self.job("create", id, &stdio, console)?;
        job["bundle"] = utf8(bundle)?.into();
        job["guest"] = guest.into();
        // `stdio` stays open until the helper has answered: its copies are the init's.
        let created = fork::in_helper(job, &keep);
        drop(stdio);
        match created.and_then(|pid| Ok((self.load(id)?, pid))) {
            Ok(c) => Ok(c),
            Err(e) => {
                // Leave no half-made state behind.
                let _ = self.delete(id);
                Err(e)
            }
        }
    }

    /// Runs `process` (an OCI `Process` JSON file) in the namespaces of running container
    /// `id`. Returns once the program has been executed, or with the reason it was not.
    pub fn exec(
        &self,
        id: &str,
        process: &Path,
        stdio: ChildStdio,
        console: Option<&Path>,
    ) -> Result<u32> {
        let mut job = self.job("exec", id, &stdio, console)?;
        job["process"] = utf8(process)?.into();
        let pid = fork::in_helper(job, &stdio_fds(&stdio));
        drop(stdio);
        pid
    }

    /// What every helper job ([`run_job`]) says: which container, its stdio, the log level.
    fn job(&self, op: &str, id: &str, stdio: &ChildStdio, console: Option<&Path>) -> Result<Value> {
        Ok(json!({
            "op": op,
            "root": utf8(&self.root)?,
            "id": id,
            "console": console.map(utf8).transpose()?,
            "stdio": stdio_json(stdio),
            "debug": ::log::max_level() >= ::log::LevelFilter::Debug,
        }))
    }

    /// [`Youki::create`]'s work, in the helper.
    fn create_here(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ChildStdio,
        console: Option<&Path>,
        executor: WasmExecutor,
    ) -> Result<u32> {
        let container = self
            .builder(id, stdio, console)?
            .with_executor(executor)
            .as_init(bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| runtime("create container", e))?;
        let pid = container.pid().ok_or_else(|| {
            Error::Runtime("libcontainer created a container without a pid".into())
        })?;
        let pid = pid.as_raw() as u32;
        // Last: it moves this throwaway process into the container's network namespace.
        loopback::up_in(pid)?;
        Ok(pid)
    }

    /// [`Youki::exec`]'s work, in the helper.
    fn exec_here(
        &self,
        id: &str,
        process: &Path,
        stdio: ChildStdio,
        console: Option<&Path>,
    ) -> Result<u32> {
        let pid = self
            .builder(id, stdio, console)?
            .with_executor(WasmExecutor { guest: None })
            .as_tenant()
            .with_process(Some(process))
            .with_detach(true)
            .build()
            .map_err(|e| runtime("exec", e))?;
        Ok(pid.as_raw() as u32)
    }

    pub fn load(&self, id: &str) -> Result<Container> {
        Container::load(self.root.join(id)).map_err(|e| runtime("load container state", e))
    }

    /// Tells the init to run. libcontainer's start changes the whole process's cwd (into
    /// the container's state dir, to reach its notify socket by a short name, and back to
    /// where it was): callers must hold the lock every fork and start hold, or two starts
    /// interleave and one connects to the other's socket or returns into a removed dir.
    /// The shim's own cwd is the bundle of the container it was started for, which goes
    /// with that container; the state root stays, so the start begins there.
    pub fn start(&self, container: &mut Container) -> Result<()> {
        nix::unistd::chdir(&self.root)
            .with_context(|| format!("chdir {} to start", self.root.display()))?;
        container.start().map_err(|e| runtime("start container", e))
    }

    /// Signals every process of the container.
    pub fn kill_all(container: &mut Container, signal: shim_common::Signal) -> Result<()> {
        let sig = Signal::try_from(signal.number()).map_err(|_| {
            Error::InvalidArgument(format!("signal {signal}: libcontainer cannot send it"))
        })?;
        container.kill(sig, true).map_err(|e| runtime("kill", e))
    }

    /// Writes new limits to the container's cgroup (CRI `UpdateContainerResources`), through
    /// the same cgroup manager libcontainer used at create.
    pub fn update(container: &Container, resources: &LinuxResources) -> Result<()> {
        let config = container
            .spec()
            .map_err(|e| runtime("container config", e))?;
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: config.cgroup_path,
            systemd_cgroup: container.systemd(),
            container_name: container.id().to_string(),
        })
        .map_err(|e| runtime("cgroup manager", e))?;
        manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| runtime("update resources", e))
    }

    pub fn pause(container: &mut Container) -> Result<()> {
        container.pause().map_err(|e| runtime("pause", e))
    }

    pub fn resume(container: &mut Container) -> Result<()> {
        container.resume().map_err(|e| runtime("resume", e))
    }

    /// Removes the container's state and cgroup, killing what is left; nothing to do when
    /// there is no state.
    pub fn delete(&self, id: &str) -> Result<()> {
        if !self.root.join(id).exists() {
            return Ok(());
        }
        let mut c = self.load(id)?;
        c.delete(true).map_err(|e| runtime("delete container", e))
    }
}
