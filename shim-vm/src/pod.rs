//! The VM of one container group: booted for its first container, serving every later
//! one, stopped with the shim. It owns QEMU, virtiofsd, the shared directory and the
//! connection to the agent, and it reports the guest's exits to the SDK — all of them, as
//! killed, if the VM dies.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protobuf::well_known_types::empty::Empty;
use protobuf::Message;
use protocol::agent::ConfigureNetworkRequest;
use protocol::events::Envelope;
use protocol::task_events::{TaskExit, TaskOOM};
use shim_common::reaper::{self, ExitSink};
use shim_common::{Context, Error, Result};

use crate::agent::NETWORK_TIMEOUT;
use crate::guest::{Dial, Guest};
use crate::network::{self, PodNetwork, POD_INTERFACE};
use crate::options::{Size, VmOptions};
use crate::virtiofsd::{self, Cache};
use crate::vmm::{self, Accel, NetDevice, Vm, VmChannel, VmConfig};
use crate::vsock;

/// Where every VM's runtime directory lives.
pub const RUN_DIR: &str = "/run/shim-vm";
/// The virtiofs tag of the shared directory.
pub const SHARE_TAG: &str = "shared";
/// Exit status reported for the processes of a VM that died: killed (`128 + SIGKILL`).
pub const KILLED: u32 = 137;
/// How long an orderly stop may take before QEMU is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The VM's runtime directory for container group `group` of namespace `namespace` of the
/// containerd at `address`: short, because its sockets' paths must fit `sun_path`
/// (108 bytes) whatever the ids (a Kubernetes pod's are 64 characters).
pub fn run_dir(address: &str, namespace: &str, group: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{address}\0{namespace}\0{group}"));
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Path::new(RUN_DIR).join(hex)
}

/// One container group's VM, booted on first use.
pub struct Pod {
    namespace: String,
    dir: PathBuf,
    exits: ExitSink,
    state: Mutex<State>,
    changed: Condvar,
    /// Guest pids that have not exited, reported as killed if the VM dies.
    live: Mutex<Pids>,
    /// Guest pid of the CRI pod's sandbox (0: none), whose namespaces the pod shares.
    sandbox: AtomicU32,
}

#[derive(Default)]
struct Pids {
    running: HashSet<u32>,
    /// Exits that came before the call that started the process returned its pid.
    early: HashSet<u32>,
}

enum State {
    Down,
    Booting,
    Up(Arc<Running>),
    /// The VM died; the group's containers are gone with it.
    Dead(String),
}

/// A booted VM.
struct Running {
    guest: Arc<Guest>,
    /// Taken by [`Pod::stop`]; dropped when QEMU exits by itself (which ends virtiofsd).
    vm: Mutex<Option<Vm>>,
    /// The pod's network joined to the VM's device; detached when the VM stops or dies.
    network: Mutex<Option<PodNetwork>>,
}

impl Pod {
    /// The VM of group `group` in `namespace`; nothing runs until [`Pod::guest`].
    pub fn new(address: &str, namespace: &str, group: &str, exits: ExitSink) -> Pod {
        Pod {
            namespace: namespace.to_string(),
            dir: run_dir(address, namespace, group),
            exits,
            state: Mutex::new(State::Down),
            changed: Condvar::new(),
            live: Mutex::new(Pids::default()),
            sandbox: AtomicU32::new(0),
        }
    }

    /// The guest pid of the CRI pod's sandbox, once it runs.
    pub fn sandbox(&self) -> Option<u32> {
        Some(self.sandbox.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Records `pid` as the pod's sandbox.
    pub fn set_sandbox(&self, pid: u32) {
        self.sandbox.store(pid, Ordering::Relaxed);
    }

    /// The VM's runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host directory the guest sees at [`crate::share::GUEST_SHARED`].
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// The agent of the running VM, booting it first (sized by `size`, with the network of
    /// namespace `netns` if given) if it is not up.
    pub fn guest(
        self: &Arc<Self>,
        options: &VmOptions,
        netns: Option<&Path>,
        size: impl FnOnce() -> Result<Size>,
    ) -> Result<Arc<Guest>> {
        let mut s = lock(&self.state);
        loop {
            match &*s {
                State::Up(r) => return Ok(r.guest.clone()),
                State::Dead(why) => return Err(Error::FailedPrecondition(why.clone())),
                State::Booting => s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                State::Down => break,
            }
        }
        *s = State::Booting;
        drop(s);
        let booted = {
            let span = shim_common::trace::span("vm boot");
            let _current = span.enter();
            size().and_then(|size| self.boot(options, size, netns))
        };
        let mut s = lock(&self.state);
        let res = match booted {
            Ok(running) => {
                let guest = running.guest.clone();
                *s = State::Up(running);
                Ok(guest)
            }
            Err(e) => {
                *s = State::Down;
                Err(e)
            }
        };
        drop(s);
        self.changed.notify_all();
        res
    }

    /// The running VM's agent, if it is up.
    pub fn running(&self) -> Option<Arc<Guest>> {
        match &*lock(&self.state) {
            State::Up(r) => Some(r.guest.clone()),
            _ => None,
        }
    }

    fn boot(
        self: &Arc<Self>,
        options: &VmOptions,
        size: Size,
        netns: Option<&Path>,
    ) -> Result<Arc<Running>> {
        let started = Instant::now();
        let image = options.image()?;
        if self.dir.exists() {
            // A VM of this group that died with its shim: nothing of it may survive.
            cleanup_dir(&self.dir);
        }
        fs::create_dir_all(self.shared())
            .with_context(|| format!("create {}", self.dir.display()))?;
        if let Err(e) = crate::share::provide_runtime(&self.shared(), &options.guest_runtime) {
            cleanup_dir(&self.dir);
            return Err(e);
        }
        let mut network = match netns.map(attach).transpose() {
            Ok(n) => n.flatten(),
            Err(e) => {
                cleanup_dir(&self.dir);
                return Err(e);
            }
        };
        let result = (|| {
            let virtiofsd = match options.virtiofsd_path.as_str() {
                "" => virtiofsd::locate()?,
                path => PathBuf::from(path),
            };
            let qemu = match options.qemu_path.as_str() {
                "" => PathBuf::from("qemu-system-x86_64"),
                path => PathBuf::from(path),
            };
            let debug = log::log_enabled!(log::Level::Debug);
            let config = VmConfig {
                qemu,
                kernel: image.kernel,
                initrd: image.initrd,
                cmdline: format!(
                    "shim_vm.ns={}{}",
                    self.namespace,
                    if debug { " shim_vm.debug=1" } else { "" }
                ),
                vcpus: size.vcpus,
                memory_mib: size.memory_mib,
                runtime_dir: self.dir.clone(),
                share: Some(vmm::Share {
                    dir: self.shared(),
                    tag: SHARE_TAG.into(),
                    virtiofsd,
                    cache: Cache::default(),
                }),
                accel: options.force_tcg.then_some(Accel::Tcg),
                tcg_tb_mib: (options.tcg_tb_mib > 0).then_some(options.tcg_tb_mib),
                channel: VmChannel::from_option(options.channel, &options.vhost_vsock_path),
                network: network.as_ref().map(|n| NetDevice {
                    tap: n.tap.clone(),
                    mac: n.interface.mac.clone(),
                }),
            };
            // Subscribed before QEMU exists, so its exit cannot be missed.
            let exits = reaper::subscribe();
            let vm = Vm::start(&config)?;
            write_pids(&self.dir, vm.pid(), &[vm.virtiofsd_pid(), vm.vsock_pid()]);
            let address = vm.agent_address().clone();
            log::info!("dialling the VM's agent: {address}");
            let dial: Dial = Box::new(move |timeout| address.dial(timeout));
            let timeout = Duration::from_millis(u64::from(options.dial_timeout_ms));
            let (guest, hello) = Guest::connect(dial, timeout)
                .map_err(|e| Error::Unavailable(format!("{e} ({})", vm.diagnostics())))?;
            match vm.page_out_boot_files() {
                Ok(n) => log::info!(
                    "reclaimed QEMU's copies of the kernel and initramfs ({} MiB)",
                    n >> 20
                ),
                Err(e) => log::debug!("{e}"),
            }
            if let Some(n) = &network {
                let req = ConfigureNetworkRequest {
                    interfaces: network::to_proto(std::slice::from_ref(&n.interface)),
                    ..Default::default()
                };
                guest
                    .agent::<Empty>(
                        "ConfigureNetwork",
                        &req,
                        NETWORK_TIMEOUT + Duration::from_secs(5),
                    )
                    .map_err(|e| {
                        Error::Unavailable(format!(
                            "the guest took no pod network: {e} ({})",
                            vm.diagnostics()
                        ))
                    })?;
            }
            let accel = vm.accel();
            log::info!(
                "VM up in {:?} ({:?}: {}; guest kernel {}, agent {} serving {:?} after the kernel started)",
                started.elapsed(),
                accel.accel,
                accel.reason,
                hello.kernel,
                hello.version,
                Duration::from_nanos(hello.boot_ns)
            );
            let running = Arc::new(Running {
                guest,
                vm: Mutex::new(Some(vm)),
                network: Mutex::new(network.take()),
            });
            self.watch(&running, exits)?;
            Ok(running)
        })();
        if result.is_err() {
            cleanup_dir(&self.dir);
            detach(network);
        }
        result
    }

    /// Two threads per VM: one applies the guest's events, one waits for QEMU's exit. A
    /// device process that dies under a running VM (virtiofsd: the containers' root
    /// filesystems; vhost-device-vsock: the agent's channel) leaves a VM that cannot serve
    /// its containers, and QEMU does not stop for it: the VM is stopped then, as if QEMU
    /// had died.
    fn watch(
        self: &Arc<Self>,
        running: &Arc<Running>,
        exits: Option<reaper::Subscription>,
    ) -> Result<()> {
        let (me, guest) = (self.clone(), running.guest.clone());
        std::thread::Builder::new()
            .name("guest-events".into())
            .spawn(move || {
                while let Ok(event) = guest.next_event() {
                    me.on_event(&event);
                }
            })
            .context("spawn guest events thread")?;
        let (pid, helpers) = match lock(&running.vm).as_ref() {
            Some(vm) => (
                vm.pid(),
                [
                    vm.virtiofsd_pid().map(|p| (p, virtiofsd::BINARY)),
                    vm.vsock_pid().map(|p| (p, vsock::BINARY)),
                ],
            ),
            None => (0, [None, None]),
        };
        let (me, running) = (self.clone(), running.clone());
        std::thread::Builder::new()
            .name("vmm-watch".into())
            .spawn(move || {
                let Some(sub) = exits else {
                    return me.on_vm_exit(None, None);
                };
                let mut why = None;
                let status = loop {
                    let Some(exit) = sub.recv() else { break None };
                    if exit.pid == pid as i32 {
                        break Some(exit.status);
                    }
                    let helper = helpers
                        .iter()
                        .flatten()
                        .find(|(p, _)| *p as i32 == exit.pid);
                    if let Some((_, name)) = helper {
                        if why.is_none() && !running.guest.retired() {
                            let w = format!("{name} exited (status {})", exit.status);
                            log::error!("{w} under the running VM: stopping the VM");
                            why = Some(w);
                            if let Some(vm) = lock(&running.vm).as_ref() {
                                vm.kill_vmm();
                            }
                        }
                    }
                };
                me.on_vm_exit(status, why);
            })
            .context("spawn VMM watch thread")?;
        Ok(())
    }

    fn on_event(&self, event: &Envelope) {
        let Some(any) = event.event.as_ref() else {
            return;
        };
        match event.topic.as_str() {
            "/tasks/exit" => {
                let Ok(exit) = TaskExit::parse_from_bytes(&any.value) else {
                    return;
                };
                {
                    let mut live = lock(&self.live);
                    if !live.running.remove(&exit.pid) {
                        live.early.insert(exit.pid);
                    }
                }
                if let Some(guest) = self.running() {
                    // The init's exit names the container as its id, an exec's its exec id.
                    let exec = match exit.id == exit.container_id {
                        true => "",
                        false => exit.id.as_str(),
                    };
                    crate::relay::catch_up(&guest, &exit.container_id, exec);
                }
                self.exits.report(exit.pid, exit.exit_status);
            }
            "/tasks/oom" => {
                if let Ok(oom) = TaskOOM::parse_from_bytes(&any.value) {
                    log::warn!("container {} in the VM was OOM-killed", oom.container_id);
                    self.exits.oom_killed(&oom.container_id);
                }
            }
            shim_common::trace::SPANS_TOPIC => shim_common::trace::forward(any),
            _ => {}
        }
    }

    /// A process the guest started: reported as killed if the VM dies before it exits.
    pub fn started(&self, pid: u32) {
        let mut live = lock(&self.live);
        if !live.early.remove(&pid) {
            live.running.insert(pid);
        }
    }

    /// A process [`Pod::started`] ended with `status`, as the guest told other than by an
    /// event (a pod's holder). Reported once: not if the VM's end reported it already.
    pub fn exited(&self, pid: u32, status: u32) {
        if lock(&self.live).running.remove(&pid) {
            self.exits.report(pid, status);
        }
    }

    /// QEMU exited with `status`; `why`, if the shim stopped it.
    fn on_vm_exit(&self, status: Option<u32>, why: Option<String>) {
        let what = match &why {
            Some(why) => format!("the VM was stopped: {why}"),
            None => format!("the VM exited (status {status:?})"),
        };
        let mut s = lock(&self.state);
        let running = match std::mem::replace(&mut *s, State::Dead(what.clone())) {
            State::Up(r) => Some(r),
            _ => None,
        };
        drop(s);
        self.changed.notify_all();
        if let Some(r) = &running {
            r.guest.retire();
        }
        let vm = running.as_ref().and_then(|r| lock(&r.vm).take());
        if let Some(vm) = vm {
            log::error!(
                "{what}, unexpectedly; its processes are reported killed: {}",
                vm.diagnostics()
            );
            drop(vm); // ends virtiofsd, removes the sockets
        }
        if let Some(r) = &running {
            detach(lock(&r.network).take());
        }
        let pids: Vec<u32> = lock(&self.live).running.drain().collect();
        for pid in pids {
            self.exits.report(pid, KILLED);
        }
        remove_runtime_files(&self.dir);
    }

    /// Stops the VM: the agent powers it off, QEMU is killed if it does not go in time.
    pub fn stop(&self) {
        let running = match &*lock(&self.state) {
            State::Up(r) => r.clone(),
            _ => return,
        };
        running.guest.retire();
        let _ = running
            .guest
            .agent::<Empty>("PowerOff", &Empty::new(), Duration::from_secs(2));
        let vm = lock(&running.vm).take();
        if let Some(vm) = vm {
            if let Err(e) = vm.shutdown(STOP_TIMEOUT) {
                log::warn!("stop the VM: {e}");
            }
        }
        cleanup_dir(&self.dir);
        detach(lock(&running.network).take());
    }
}

/// The pod's interface of namespace `netns` joined to a tap for the VM; `None` if the
/// namespace has none (no CNI ran: the pod has loopback only).
fn attach(netns: &Path) -> Result<Option<PodNetwork>> {
    match PodNetwork::attach(netns, POD_INTERFACE) {
        Ok(n) => {
            log::info!(
                "pod network of {}: {} {:?} into the VM",
                netns.display(),
                POD_INTERFACE,
                n.interface.addresses
            );
            Ok(Some(n))
        }
        Err(Error::NotFound(why)) => {
            log::info!("{why}: the pod's VM has loopback only");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Undoes [`attach`]; what is gone already (the namespace, after CNI's DEL) is no error.
fn detach(network: Option<PodNetwork>) {
    if let Some(n) = network {
        if let Err(e) = n.detach() {
            log::warn!("detach the pod's network: {e}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const PIDS: &str = "pids";
const SHIM_PID: &str = "shim.pid";

/// The pid of the shim that booted the VM in `dir`, once it has booted.
pub fn owner_pid(dir: &Path) -> Option<u32> {
    fs::read_to_string(dir.join(SHIM_PID))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
}

/// Whether the shim that owns the VM in `dir` still runs (then it stops the VM itself).
pub fn owner_alive(dir: &Path) -> bool {
    let Some(pid) = owner_pid(dir) else {
        return false;
    };
    let ours = std::env::current_exe()
        .ok()
        .and_then(|e| e.file_name().map(|n| n.to_owned()));
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    let running = exe
        .as_ref()
        .and_then(|e| e.file_name().map(|n| n.to_owned()));
    pid != std::process::id() && running.is_some() && running == ours
}

/// QEMU's and its helpers' (virtiofsd, vhost-device-vsock) pids, for the `delete` action
/// of a shim that died; and the shim's own, since containerd runs that action for every
/// container whose connection closes — after an ordinary `Delete` too, while the shim
/// still serves the others.
fn write_pids(dir: &Path, qemu: u32, helpers: &[Option<u32>]) {
    let helpers: Vec<String> = helpers.iter().flatten().map(u32::to_string).collect();
    if let Err(e) = fs::write(dir.join(SHIM_PID), std::process::id().to_string()) {
        log::warn!("write {}: {e}", dir.join(SHIM_PID).display());
    }
    if let Err(e) = fs::write(dir.join(PIDS), format!("{qemu} {}\n", helpers.join(" "))) {
        log::warn!("write {}: {e}", dir.join(PIDS).display());
    }
}

/// Kills what a VM left running (its pids file; only processes that still name the
/// directory on their command line, so a reused pid is never hit) and removes the
/// directory: shares unmounted first, so nothing below a mount is deleted.
pub fn cleanup_dir(dir: &Path) {
    if let Ok(text) = fs::read_to_string(dir.join(PIDS)) {
        let needle = dir.to_string_lossy().into_owned();
        for pid in text
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if pid > 0 && String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let shared = dir.join("shared");
    if let Ok(entries) = fs::read_dir(&shared) {
        for e in entries.flatten() {
            crate::share::remove(&e.path());
        }
    }
    let _ = fs::remove_dir(&shared);
    remove_runtime_files(dir);
    let _ = fs::remove_dir(dir);
}

/// The sockets, logs and pid file of a VM; never the shared directory.
fn remove_runtime_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.file_name().is_some_and(|n| n == "shared") {
            continue;
        }
        if e.file_type().is_ok_and(|t| !t.is_dir()) {
            let _ = fs::remove_file(&path);
        }
    }
}
