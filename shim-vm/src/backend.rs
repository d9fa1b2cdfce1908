//! The host backend: every container of the group runs in the group's VM. The SDK keeps
//! containerd's state machine and stdio on the host as for any backend; each call is
//! forwarded to the guest's task service (the same SDK, with the runc backend) with only
//! what crosses the VM boundary changed — the bundle (a share of the VM's shared
//! directory) and the stdio (guest fifos, relayed). A CRI pod's pause container is the
//! exception: the guest holds the pod's namespaces without it ([`crate::holder`]), and its
//! task is that holder.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::{Message, MessageField};
use protocol::agent::{OpenStdioRequest, OpenStdioResponse, StdioRequest};
use protocol::options::Options as RuncOptions;
use protocol::shim::*;
use shim_common::bundle::string_map;
use shim_common::pod::{PodConfig, PodRole};
use shim_common::prelude::*;
use shim_common::stdio::ChildStdio;

use crate::guest::{Guest, CALL_TIMEOUT};
use crate::holder;
use crate::options::VmOptions;
use crate::pod::{self, Pod};
use crate::relay::{self, Process};
use crate::sandbox::VmSandboxes;
use crate::share::{self, Share};
use shim_common::sandbox::Sandboxes;

/// Where the `delete` action finds a container's VM after a crash: a file in its bundle.
const VM_DIR_FILE: &str = "vm-dir";

/// Records the VM's directory in `bundle`, for the `delete` action after a crash.
pub(crate) fn record_vm_dir(bundle: &Path, vm_dir: &Path) -> Result<()> {
    std::fs::write(
        bundle.join(VM_DIR_FILE),
        vm_dir.to_string_lossy().as_bytes(),
    )
    .context("record the VM's directory in the bundle")
}

/// Runs each container group in a QEMU microvm.
pub struct VmBackend {
    pod: Arc<Pod>,
    sandboxes: VmSandboxes,
}

/// A container in the VM.
pub struct Container {
    id: String,
    guest: Arc<Guest>,
    share: std::path::PathBuf,
    /// For a CRI pod's pause container: the guest pid of the holder standing for it.
    holder: Option<u32>,
}

impl Container {
    /// Refuses `what` on a pause container, which has no container in the guest.
    fn not_holder(&self, what: &str) -> Result<()> {
        match self.holder {
            Some(_) => Err(Error::FailedPrecondition(format!(
                "{what} {}: it is the pod's sandbox, whose namespaces the VM holds without a \
                 container",
                self.id
            ))),
            None => Ok(()),
        }
    }
}

impl Backend for VmBackend {
    type Container = Container;
    type Options = VmOptions;
    const HOST_PROCESSES: bool = false;

    fn new(ctx: &ShimContext) -> Result<Self> {
        let pod = Arc::new(Pod::new(
            &ctx.address,
            &ctx.namespace,
            &ctx.id,
            ctx.exits.clone(),
        ));
        Ok(VmBackend {
            sandboxes: VmSandboxes::new(pod.clone()),
            pod,
        })
    }

    fn create(&self, req: CreateRequest<'_, VmOptions>) -> Result<Created<Container>> {
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented("restore into a VM".into()));
        }
        // Only the group's first container sizes (and boots) the VM.
        let spec = shim_common::bundle::spec(req.bundle)?;
        let size = || {
            let (annotations, limit) = sizing(&spec);
            req.options.size(&annotations, limit)
        };
        if PodRole::of(&spec) == PodRole::Sandbox {
            let config = PodConfig::of_sandbox_spec(&spec);
            // Refused before a VM boots for it. The VM's network is the pod's own: its
            // sysctls are checked as for such a pod.
            shim_common::host_pods::check_sysctls(&config.sysctls, true)?;
            let netns = network_namespace(&spec);
            let guest = self.pod.guest(req.options, netns.as_deref(), size)?;
            return self.create_holder(req.id, req.bundle, &spec, config, guest);
        }
        let guest = self.pod.guest(req.options, None, size)?;
        let share = Share::create(
            &self.pod.shared(),
            req.id,
            req.bundle,
            spec.clone(),
            self.pod.sandbox(),
        )?;
        record_vm_dir(req.bundle, self.pod.dir())?;
        let process = Process {
            container: req.id.to_string(),
            exec: String::new(),
        };
        let stdio = Stdio::open(
            &guest,
            &process,
            req.terminal,
            req.console_socket,
            req.stdio,
        )?;
        let create = CreateTaskRequest {
            id: req.id.to_string(),
            bundle: share.guest_bundle().to_string(),
            terminal: req.terminal,
            stdin: stdio.paths.stdin.clone(),
            stdout: stdio.paths.stdout.clone(),
            stderr: stdio.paths.stderr.clone(),
            options: MessageField::some(guest_options(req.options)?),
            ..Default::default()
        };
        let created: CreateTaskResponse = match guest.task("Create", &create) {
            Ok(c) => c,
            Err(e) => {
                stdio.forget(&guest, &process);
                return Err(e);
            }
        };
        stdio.relay(&guest, &process)?;
        self.pod.started(created.pid);
        Ok(Created {
            container: Container {
                id: req.id.to_string(),
                guest,
                share: share.keep(),
                holder: None,
            },
            pid: Some(created.pid),
        })
    }

    fn start(&self, c: &Container) -> Result<u32> {
        if let Some(pid) = c.holder {
            return Ok(pid); // running since create
        }
        let res: StartResponse = c.guest.task(
            "Start",
            &StartRequest {
                id: c.id.clone(),
                ..Default::default()
            },
        )?;
        Ok(res.pid)
    }

    fn exec(&self, c: &Container, req: ExecRequest<'_>) -> Result<u32> {
        c.not_holder("exec in")?;
        let process = Process {
            container: c.id.clone(),
            exec: req.exec_id.to_string(),
        };
        let stdio = Stdio::open(
            &c.guest,
            &process,
            req.terminal,
            req.console_socket,
            req.stdio,
        )?;
        let exec = ExecProcessRequest {
            id: c.id.clone(),
            exec_id: req.exec_id.to_string(),
            terminal: req.terminal,
            stdin: stdio.paths.stdin.clone(),
            stdout: stdio.paths.stdout.clone(),
            stderr: stdio.paths.stderr.clone(),
            spec: MessageField::some(Any {
                type_url: protocol::type_urls::OCI_PROCESS.into(),
                value: req.spec.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let start = StartRequest {
            id: c.id.clone(),
            exec_id: req.exec_id.to_string(),
            ..Default::default()
        };
        let started = c
            .guest
            .task::<Empty>("Exec", &exec)
            .and_then(|_| c.guest.task::<StartResponse>("Start", &start));
        match started {
            Ok(res) => {
                stdio.relay(&c.guest, &process)?;
                self.pod.started(res.pid);
                Ok(res.pid)
            }
            Err(e) => {
                drop(stdio);
                if let Err(e) = forget_in_guest(c, req.exec_id) {
                    log::warn!("forget exec {} of {} in the guest: {e}", req.exec_id, c.id);
                }
                Err(e)
            }
        }
    }

    fn kill(&self, c: &Container, target: Target<'_>, signal: Signal, all: bool) -> Result<()> {
        let exec_id = match target {
            Target::Init { .. } => String::new(),
            Target::Exec { exec_id, .. } => exec_id.to_string(),
        };
        if c.holder.is_some() {
            // Any signal ends the holder: it has nothing else to do with one (CRI sends
            // SIGKILL to stop a pod's sandbox).
            if !exec_id.is_empty() {
                return Err(Error::NotFound(format!("exec {exec_id} in {}", c.id)));
            }
            return match self.pod.running() {
                Some(guest) => holder::stop(Some(guest), &c.id, Duration::ZERO),
                None => Err(Error::NotFound(format!(
                    "process already finished: the VM of {} is gone",
                    c.id
                ))),
            };
        }
        let killed = c.guest.task::<Empty>(
            "Kill",
            &KillRequest {
                id: c.id.clone(),
                exec_id,
                signal: signal.number() as u32,
                all,
                ..Default::default()
            },
        );
        match killed {
            Ok(_) => Ok(()),
            // What ran in a VM that is gone has finished: containerd (CRI's exit handling
            // kills before it deletes) reads NotFound as that, anything else as a failure.
            Err(e) if c.guest.retired() => Err(Error::NotFound(format!(
                "process already finished: the VM of {} is gone ({e})",
                c.id
            ))),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, c: &Container) -> Result<()> {
        if c.holder.is_some() {
            if let Some(guest) = self.pod.running() {
                holder::release(&guest, &c.id);
            }
            share::remove(&c.share);
            return Ok(());
        }
        if self.pod.running().is_some() {
            forget_in_guest(c, "")?;
        }
        share::remove(&c.share);
        Ok(())
    }

    fn delete_exec(&self, c: &Container, exec_id: &str) -> Result<()> {
        match self.pod.running() {
            Some(_) => forget_in_guest(c, exec_id),
            None => Ok(()),
        }
    }

    fn pids(&self, c: &Container) -> Result<Vec<u32>> {
        if let Some(pid) = c.holder {
            return Ok(vec![pid]);
        }
        let res: PidsResponse = c.guest.task(
            "Pids",
            &PidsRequest {
                id: c.id.clone(),
                ..Default::default()
            },
        )?;
        Ok(res.processes.iter().map(|p| p.pid).collect())
    }

    fn pause(&self, c: &Container) -> Result<()> {
        c.not_holder("pause")?;
        c.guest.task::<Empty>(
            "Pause",
            &PauseRequest {
                id: c.id.clone(),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    fn resume(&self, c: &Container) -> Result<()> {
        c.not_holder("resume")?;
        c.guest.task::<Empty>(
            "Resume",
            &ResumeRequest {
                id: c.id.clone(),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    fn update(&self, c: &Container, resources: &[u8]) -> Result<()> {
        c.not_holder("update")?;
        c.guest.task::<Empty>(
            "Update",
            &UpdateTaskRequest {
                id: c.id.clone(),
                resources: MessageField::some(Any {
                    type_url: shim_common::backend::LINUX_RESOURCES_TYPE.into(),
                    value: resources.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    fn host_cgroups(&self) -> bool {
        false
    }

    fn stats(&self, c: &Container, _init_pid: u32) -> Result<Any> {
        if c.holder.is_some() {
            return holder::metrics(self.pod.running(), &c.id);
        }
        let res: StatsResponse = c.guest.task(
            "Stats",
            &StatsRequest {
                id: c.id.clone(),
                ..Default::default()
            },
        )?;
        res.stats
            .into_option()
            .ok_or_else(|| Error::Runtime("the guest answered Stats without metrics".into()))
    }

    fn resize_pty(&self, c: &Container, exec_id: &str, w: u32, h: u32) -> Result<()> {
        c.not_holder("resize the terminal of")?;
        c.guest.task::<Empty>(
            "ResizePty",
            &ResizePtyRequest {
                id: c.id.clone(),
                exec_id: exec_id.to_string(),
                width: w,
                height: h,
                ..Default::default()
            },
        )?;
        Ok(())
    }

    fn cleanup(_ctx: &ShimContext, id: &str, bundle: &Path, _options: &VmOptions) -> Result<()> {
        let Ok(dir) = std::fs::read_to_string(bundle.join(VM_DIR_FILE)) else {
            return Ok(()); // never reached the VM
        };
        let dir = Path::new(dir.trim());
        if pod::owner_alive(dir) {
            // containerd runs this for every container whose connection closed, after a
            // plain Delete too: the shim lives on and serves the group's other containers.
            share::remove(&dir.join("shared").join(id));
            return Ok(());
        }
        // The daemon is dead: so is the VM, and every container of the group with it.
        pod::cleanup_dir(dir);
        log::info!("cleaned up the VM of {id} at {}", dir.display());
        Ok(())
    }

    fn sandboxes(&self) -> Option<&dyn Sandboxes> {
        Some(&self.sandboxes)
    }

    fn shutdown(&self) {
        self.pod.stop();
    }
}

impl VmBackend {
    /// The pod's pause container `id`: the guest holds the pod's namespaces as its spec
    /// asks (hostname, sysctls, the cgroup its containers nest in), and the holder is the
    /// container's process. Its stdio, if any, has nothing to carry.
    fn create_holder(
        &self,
        id: &str,
        bundle: &Path,
        spec: &serde_json::Value,
        config: PodConfig,
        guest: Arc<Guest>,
    ) -> Result<Created<Container>> {
        let annotations = string_map(&spec["annotations"]);
        record_vm_dir(bundle, self.pod.dir())?;
        let dir = self.pod.shared().join(id);
        let started = match holder::start(&guest, &dir, id, Some(config.to_any()), annotations) {
            Ok(s) => s,
            Err(e) => {
                share::remove(&dir);
                return Err(e);
            }
        };
        let pid = started.pid;
        self.pod.started(pid);
        self.pod.set_sandbox(pid);
        let pod = self.pod.clone();
        holder::wait(guest.clone(), id, move |status| match status {
            Ok(status) => pod.exited(pid, status),
            // The VM died (its exit reports every process it ran) or the agent cannot
            // say: reported killed, once.
            Err(e) => {
                log::warn!("the pod's holder in the VM: {e}");
                pod.exited(pid, pod::KILLED);
            }
        })?;
        Ok(Created {
            container: Container {
                id: id.to_string(),
                guest,
                share: dir,
                holder: Some(pid),
            },
            pid: Some(pid),
        })
    }
}

/// The network namespace a pause container's spec names: the pod's, where CNI set up its
/// interface (none for a host-network pod).
fn network_namespace(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The first container's annotations and memory limit, which size the VM.
fn sizing(spec: &serde_json::Value) -> (HashMap<String, String>, Option<u64>) {
    let limit = spec["linux"]["resources"]["memory"]["limit"]
        .as_i64()
        .and_then(|l| u64::try_from(l).ok());
    (string_map(&spec["annotations"]), limit)
}

/// The guest's runc backend options: the OCI runtime inside the VM. The guest's root is its
/// initramfs, which `pivot_root(2)` cannot leave: the runtime moves the rootfs and chroots
/// instead (`--no-pivot`); the VM, not the mount namespace, is the isolation boundary.
fn guest_options(o: &VmOptions) -> Result<Any> {
    let runc = RuncOptions {
        binary_name: crate::share::guest_runtime(&o.guest_runtime),
        no_pivot_root: true,
        ..Default::default()
    };
    Ok(Any {
        type_url: protocol::type_urls::RUNC_OPTIONS.into(),
        value: runc
            .write_to_bytes()
            .context("encode the guest's runc options")?,
        ..Default::default()
    })
}

/// A process's stdio across the boundary: the guest fifos the agent made, and the host
/// ends to relay them to.
struct Stdio {
    paths: OpenStdioResponse,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// `stdin` and `stdout` are one pty's slave.
    terminal: bool,
}

impl Stdio {
    /// For a terminal the host end is a pty of our own whose master the SDK takes over
    /// the console socket, as from runc: it serves it as any console.
    fn open(
        guest: &Guest,
        p: &Process,
        terminal: bool,
        console_socket: Option<&Path>,
        fds: ChildStdio,
    ) -> Result<Stdio> {
        let pty = terminal && console_socket.is_some();
        let (stdin, stdout, stderr) = match (terminal, console_socket) {
            (true, Some(socket)) => {
                let pty = nix::pty::openpty(None, None).map_err(|e| Error::Sys {
                    context: "open a pty".into(),
                    source: e,
                })?;
                raw(&pty.slave)?;
                shim_common::console::send_master(socket, &pty.master)?;
                let input = pty.slave.try_clone().context("duplicate the pty")?;
                (Some(input), Some(pty.slave), None)
            }
            _ => (fds.stdin, fds.stdout, fds.stderr),
        };
        let req = OpenStdioRequest {
            container_id: p.container.clone(),
            exec_id: p.exec.clone(),
            stdin: stdin.is_some(),
            stdout: stdout.is_some(),
            stderr: stderr.is_some(),
            ..Default::default()
        };
        let paths = guest.agent("OpenStdio", &req, CALL_TIMEOUT)?;
        Ok(Stdio {
            paths,
            terminal: pty,
            stdin,
            stdout,
            stderr,
        })
    }

    fn relay(self, guest: &Arc<Guest>, p: &Process) -> Result<()> {
        relay::start(
            guest,
            p,
            self.stdin,
            self.stdout,
            self.stderr,
            self.terminal,
        )
    }

    fn forget(self, guest: &Guest, p: &Process) {
        forget_stdio(guest, &p.container, &p.exec);
    }
}

/// Has the guest delete process `exec_id` of `c` (its init when empty) and its stdio.
/// Gone already is no failure: the VM is what is gone, or the process never started there.
fn forget_in_guest(c: &Container, exec_id: &str) -> Result<()> {
    let deleted = c.guest.task::<DeleteResponse>(
        "Delete",
        &DeleteRequest {
            id: c.id.clone(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        },
    );
    match deleted {
        Ok(_) => {}
        Err(Error::Remote {
            code: ttrpc::Code::NOT_FOUND,
            ..
        }) => {}
        Err(Error::Unavailable(_)) => {}
        Err(e) => return Err(e),
    }
    forget_stdio(&c.guest, &c.id, exec_id);
    Ok(())
}

/// Has the agent stop carrying the process's stdio (a container's every process when
/// `exec` is empty) and remove its fifos. Best effort: a guest that is gone has none.
fn forget_stdio(guest: &Guest, container: &str, exec: &str) {
    let req = StdioRequest {
        container_id: container.to_string(),
        exec_id: exec.to_string(),
        ..Default::default()
    };
    let _ = guest.agent::<Empty>("CloseStdio", &req, CALL_TIMEOUT);
}

/// The host pty only carries bytes: the guest's own pty does the terminal's work.
fn raw(fd: &OwnedFd) -> Result<()> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let mut t = tcgetattr(fd).map_err(|e| Error::Sys {
        context: "read pty settings".into(),
        source: e,
    })?;
    cfmakeraw(&mut t);
    tcsetattr(fd, SetArg::TCSANOW, &t).map_err(|e| Error::Sys {
        context: "set the pty raw".into(),
        source: e,
    })?;
    Ok(())
}
