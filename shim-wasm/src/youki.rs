//! youki's `libcontainer`, driven for one namespace: create (init waits for start), start,
//! exec into a running container, signal, pause, update, delete.
//!
//! State lives under `/run/containerd/wasm/<namespace>/<id>`, next to runc's
//! `/run/containerd/runc/<namespace>`. Cgroups are plain cgroupfs paths (`with_systemd(false)`):
//! containerd's `cgroupsPath` is honoured as written, and PID 1 need not be systemd.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::LinuxResources;

use shim_common::stdio::ChildStdio;
use shim_common::{Context, Error, Result};

use crate::executor::WasmExecutor;
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
        let created = fork::isolated(|| {
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
        });
        match created.and_then(|pid| Ok((self.load(id)?, pid))) {
            Ok(c) => Ok(c),
            Err(e) => {
                // Leave no half-made state behind (an existing id keeps its own).
                if !e.to_string().contains("already exists") {
                    let _ = self.delete(id);
                }
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
        fork::isolated(|| {
            let pid = self
                .builder(id, stdio, console)?
                .with_executor(WasmExecutor { guest: None })
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| runtime("exec", e))?;
            Ok(pid.as_raw() as u32)
        })
    }

    pub fn load(&self, id: &str) -> Result<Container> {
        Container::load(self.root.join(id)).map_err(|e| runtime("load container state", e))
    }

    pub fn start(container: &mut Container) -> Result<()> {
        container.start().map_err(|e| runtime("start container", e))
    }

    /// Signals every process of the container.
    pub fn kill_all(container: &mut Container, signal: u32) -> Result<()> {
        let sig = Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("signal {signal}")))?;
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
