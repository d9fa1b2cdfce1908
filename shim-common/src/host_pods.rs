//! Pods without a pause container, for backends whose containers are host processes (runc,
//! Wasm in youki containers): a sandbox of containerd's sandbox API is a small *holder*
//! process that sits in the pod's network namespace (CRI's `netns_path`) and in IPC, UTS
//! (named after the pod's hostname) and PID namespaces of its own. CRI builds the pod's
//! container specs from the pid `StartSandbox` returns (`/proc/<pid>/ns/*`), so they join
//! those namespaces as they would a pause container's. A host-network pod (no `netns_path`)
//! keeps the host's network and UTS namespaces, hence the node's hostname, as containerd's
//! own pod sandbox controller leaves its pause container.
//!
//! The pod's sysctls (`PodSandboxConfig.linux.sysctls`, which a pause container's spec would
//! carry) are set in those namespaces before the holder runs; only namespaced ones are
//! taken (IPC's; `net.*` with a network namespace of the pod's own; `kernel.domainname`
//! with a UTS namespace), as runc allows them: any other would change the node's kernel.
//!
//! The holder is forked, not executed: it runs only raw system calls, keeps no file of the
//! shim's open (the shim's sockets close when the shim goes), and as the init of the pod's
//! PID namespace reaps the orphans of containers sharing it. It ends on `SIGTERM` or
//! `SIGKILL`; its end ends every process left in that PID namespace. Its pid and start time
//! are kept in the sandbox's bundle, so that the `delete` action can stop a holder whose shim
//! was killed.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use protobuf::well_known_types::any::Any;

use crate::error::{Context, Error, Result};
use crate::pidfd::PidFd;
use crate::pod::PodConfig;
use crate::sandbox::{SandboxCreate, SandboxExit, Sandboxes};

/// The file in a sandbox's bundle that names its holder: `<pid> <start time>`.
pub const HOLDER_FILE: &str = "holder";

/// The backend's sandboxes, one holder each.
#[derive(Default)]
pub struct HostPods {
    pods: Mutex<HashMap<String, Pod>>,
}

struct Pod {
    bundle: PathBuf,
    netns: Option<PathBuf>,
    hostname: Option<String>,
    /// The pod's cgroup (CRI's `cgroup_parent`), where its containers' cgroups nest.
    cgroup_parent: Option<String>,
    /// `/proc/sys` files and values, checked at create.
    sysctls: Vec<(CString, CString)>,
    annotations: HashMap<String, String>,
    holder: Option<Holder>,
}

/// A running holder, by pidfd (its pid cannot be reused under us).
struct Holder {
    pid: u32,
    pidfd: PidFd,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sandboxes for HostPods {
    fn create(&self, req: &SandboxCreate<'_>) -> Result<()> {
        if let Some(netns) = req.netns {
            // Now, not at start: a wrong path is the caller's error, reported at once.
            File::open(netns).map_err(|e| {
                Error::InvalidArgument(format!("network namespace {}: {e}", netns.display()))
            })?;
        }
        let config = req.options.map(PodConfig::of).transpose()?.flatten();
        let sysctls = match &config {
            Some(c) => sysctl_files(&c.sysctls, req.netns.is_some())?,
            None => Vec::new(),
        };
        // A host-network pod has the node's hostname (kubelet sends none for it).
        let hostname = match req.netns {
            Some(_) => config
                .as_ref()
                .map(|c| c.hostname.clone())
                .filter(|h| !h.is_empty()),
            None => None,
        };
        let pod = Pod {
            bundle: req.bundle.to_path_buf(),
            netns: req.netns.map(Path::to_path_buf),
            hostname,
            cgroup_parent: config.map(|c| c.cgroup_parent).filter(|p| !p.is_empty()),
            sysctls,
            annotations: req.annotations.clone(),
            holder: None,
        };
        lock(&self.pods).insert(req.id.to_string(), pod);
        Ok(())
    }

    fn start(&self, id: &str, _exit: SandboxExit) -> Result<u32> {
        let (netns, hostname, sysctls, bundle) = {
            let pods = lock(&self.pods);
            let pod = pods
                .get(id)
                .ok_or_else(|| Error::NotFound(format!("sandbox {id}")))?;
            (
                pod.netns.clone(),
                pod.hostname.clone(),
                pod.sysctls.clone(),
                pod.bundle.clone(),
            )
        };
        let pid = spawn_holder(netns.as_deref(), hostname.as_deref(), &sysctls)?;
        let pidfd = pidfd_open(pid)?;
        let started = start_time(pid).unwrap_or_default();
        if let Err(e) = std::fs::write(bundle.join(HOLDER_FILE), format!("{pid} {started}")) {
            log::warn!("sandbox {id}: cannot record its holder: {e}");
        }
        if let Some(pod) = lock(&self.pods).get_mut(id) {
            pod.holder = Some(Holder { pid, pidfd });
        }
        Ok(pid)
    }

    fn stop(&self, id: &str, _timeout: Duration) -> Result<()> {
        // The holder has nothing to save: the timeout is for what the pod's containers do
        // on their own stop, which containerd asks for before this.
        let pods = lock(&self.pods);
        match pods.get(id).and_then(|p| p.holder.as_ref()) {
            Some(h) => pidfd_kill(&h.pidfd, h.pid),
            None => Ok(()),
        }
    }

    fn shutdown(&self, id: &str) -> Result<()> {
        if let Some(pod) = lock(&self.pods).remove(id) {
            let _ = std::fs::remove_file(pod.bundle.join(HOLDER_FILE));
        }
        Ok(())
    }

    /// The pod's cgroup: what its containers use together, as containerd's own pod
    /// sandbox controller reads it. A pod without one has no figures (`NotFound`, which
    /// CRI's `ListPodSandboxStats` skips).
    fn metrics(&self, id: &str) -> Result<Any> {
        let parent = lock(&self.pods)
            .get(id)
            .and_then(|p| p.cgroup_parent.clone());
        match parent {
            Some(parent) => crate::cgroups::metrics_at(&parent),
            None => Err(Error::NotFound(format!(
                "sandbox {id}: its pod config names no cgroup_parent"
            ))),
        }
    }

    fn info(&self, id: &str) -> HashMap<String, String> {
        let pods = lock(&self.pods);
        let mut info = HashMap::new();
        if let Some(pod) = pods.get(id) {
            if let Some(netns) = &pod.netns {
                // JSON, as `crictl inspectp` embeds each value.
                info.insert(
                    "netns".into(),
                    serde_json::Value::from(netns.display().to_string()).to_string(),
                );
            }
            if let Some(h) = &pod.holder {
                info.insert("holder".into(), h.pid.to_string());
            }
        }
        info
    }

    fn spec(&self, id: &str) -> Option<serde_json::Value> {
        let pods = lock(&self.pods);
        let pod = pods.get(id)?;
        let pid = pod.holder.as_ref()?.pid;
        Some(holder_spec(pod, pid))
    }
}

/// The holder as a pause container's spec would describe it: the namespaces a container
/// of the pod joins (by the holder's `/proc/<pid>/ns/*`, as CRI's container specs name
/// them), the hostname, the pod's annotations.
fn holder_spec(pod: &Pod, pid: u32) -> serde_json::Value {
    let ns = |kind: &str, file: &str| serde_json::json!({"type": kind, "path": format!("/proc/{pid}/ns/{file}")});
    let mut namespaces = vec![ns("pid", "pid"), ns("ipc", "ipc")];
    if pod.netns.is_some() {
        namespaces.push(ns("network", "net"));
        namespaces.push(ns("uts", "uts"));
    }
    let mut spec = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {"args": ["pod-holder"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/", "readonly": true},
        "annotations": pod.annotations,
        "linux": {"namespaces": namespaces},
    });
    if let Some(h) = &pod.hostname {
        spec["hostname"] = h.clone().into();
    }
    spec
}

/// The `delete` action for a sandbox: stops the holder its dead shim left, if the pid in the
/// bundle is still that holder (same start time). Nothing recorded: nothing to do.
pub fn cleanup(bundle: &Path) -> Result<()> {
    let path = bundle.join(HOLDER_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let mut f = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(started))) = (
        f.next().map(str::parse::<u32>),
        f.next().map(str::parse::<u64>),
    ) else {
        return Err(Error::InvalidArgument(format!(
            "{}: {text:?}",
            path.display()
        )));
    };
    if let Ok(pidfd) = pidfd_open(pid) {
        if start_time(pid) == Some(started) {
            pidfd_kill(&pidfd, pid)?;
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn pidfd_open(pid: u32) -> Result<PidFd> {
    PidFd::open(pid).with_context(|| format!("pidfd_open {pid}"))
}

fn pidfd_kill(pidfd: &PidFd, pid: u32) -> Result<()> {
    pidfd
        .signal(libc::SIGKILL)
        .map(drop)
        .with_context(|| format!("kill holder {pid}"))
}

/// Field 22 of `/proc/<pid>/stat`: the process's start, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Checks a pod's sysctls as [`HostPods`] takes them (see the module's docs); `own_net`:
/// the pod has network and UTS namespaces of its own.
pub fn check_sysctls(
    sysctls: &std::collections::BTreeMap<String, String>,
    own_net: bool,
) -> Result<()> {
    sysctl_files(sysctls, own_net).map(drop)
}

/// The `/proc/sys` file and value of each of a pod's sysctls (`net.ipv4.ip_forward` or
/// `net/ipv4/ip_forward`), refusing any the pod's namespaces do not hold: with
/// `own_net`, the pod has network and UTS namespaces of its own.
fn sysctl_files(
    sysctls: &std::collections::BTreeMap<String, String>,
    own_net: bool,
) -> Result<Vec<(CString, CString)>> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    sysctls
        .iter()
        .map(|(key, value)| {
            let name = key.replace('/', ".");
            let bad = |why: &str| Error::InvalidArgument(format!("sysctl {key:?}: {why}"));
            if name.split('.').any(|part| part.is_empty() || part == "..") {
                return Err(bad("not a sysctl name"));
            }
            let namespaced = IPC.contains(&name.as_str())
                || name.starts_with("fs.mqueue.")
                || (own_net && (name.starts_with("net.") || name == "kernel.domainname"));
            if !namespaced {
                return Err(bad(if name.starts_with("net.") {
                    "a host-network pod shares the node's network namespace"
                } else {
                    "not in a namespace the pod holds; it would change the node's kernel"
                }));
            }
            let path = format!("/proc/sys/{}", name.replace('.', "/"));
            let c = |s: String| CString::new(s).map_err(|_| bad("contains a NUL byte"));
            Ok((c(path)?, c(value.clone())?))
        })
        .collect()
}

/// Which step of the holder's setup failed, as the intermediate child reports it; steps
/// from [`SYSCTL_STEP`] on are the pod's sysctls, in order.
const SYSCTL_STEP: u32 = 100;
const STEPS: [&str; 5] = [
    "enter the network namespace",
    "unshare IPC, UTS (unless host network) and PID namespaces",
    "set the hostname",
    "fork the holder",
    "open /dev/null",
];

/// Forks the holder and returns its pid. An intermediate child enters and unshares the
/// namespaces (a new PID namespace takes effect for children only) and forks the holder,
/// which the shim, as subreaper, inherits when the intermediate exits.
fn spawn_holder(
    netns: Option<&Path>,
    hostname: Option<&str>,
    sysctls: &[(CString, CString)],
) -> Result<u32> {
    let netns = netns
        .map(|p| File::open(p).with_context(|| format!("network namespace {}", p.display())))
        .transpose()?;
    let hostname = hostname
        .map(|h| CString::new(h).map_err(|_| Error::InvalidArgument(format!("hostname {h:?}"))))
        .transpose()?;
    let devnull = File::open("/dev/null").context("open /dev/null")?;
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: the child runs only async-signal-safe system calls until it exits or becomes
    // the holder, which never returns into Rust code that could allocate or lock.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(Error::Io {
            context: "fork the holder's parent".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if child == 0 {
        // SAFETY: see above; every value used was prepared before the fork.
        unsafe {
            intermediate(
                netns.as_ref().map(|f| f.as_raw_fd()),
                hostname.as_ref().map(|h| h.as_ptr()),
                sysctls,
                devnull.as_raw_fd(),
                tx.as_raw_fd(),
            )
        }
    }
    drop(tx);
    let mut report = [0u8; 8];
    let read = nix::unistd::read(rx.as_raw_fd(), &mut report).context("read the holder's pid")?;
    // The intermediate is reaped by the reaper; its exit is nobody's.
    if read != report.len() {
        return Err(Error::Runtime(
            "the holder's parent died before reporting".into(),
        ));
    }
    let (step, value) = (
        u32::from_ne_bytes([report[0], report[1], report[2], report[3]]),
        i32::from_ne_bytes([report[4], report[5], report[6], report[7]]),
    );
    if step == u32::MAX {
        return Ok(value as u32);
    }
    let what = match step.checked_sub(SYSCTL_STEP) {
        Some(i) => sysctls
            .get(i as usize)
            .map(|(path, _)| format!("set sysctl {}", path.to_string_lossy())),
        None => STEPS.get(step as usize).map(|s| s.to_string()),
    };
    Err(Error::Io {
        context: format!(
            "pod holder: {}",
            what.unwrap_or_else(|| format!("step {step}"))
        ),
        source: std::io::Error::from_raw_os_error(value),
    })
}

/// Reports `(step, value)` on `tx` and exits: step `u32::MAX` with the holder's pid, or a
/// failed step with its errno.
unsafe fn report(tx: i32, step: u32, value: i32) -> ! {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&step.to_ne_bytes());
    buf[4..].copy_from_slice(&value.to_ne_bytes());
    libc::write(tx, buf.as_ptr().cast(), buf.len());
    libc::_exit(if step == u32::MAX { 0 } else { 1 })
}

unsafe fn errno() -> i32 {
    *libc::__errno_location()
}

unsafe fn intermediate(
    netns: Option<i32>,
    hostname: Option<*const libc::c_char>,
    sysctls: &[(CString, CString)],
    devnull: i32,
    tx: i32,
) -> ! {
    if let Some(fd) = netns {
        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
            report(tx, 0, errno());
        }
    }
    // A host-network pod keeps the host's UTS namespace too.
    let uts = if netns.is_some() {
        libc::CLONE_NEWUTS
    } else {
        0
    };
    if libc::unshare(libc::CLONE_NEWIPC | uts | libc::CLONE_NEWPID) != 0 {
        report(tx, 1, errno());
    }
    if let Some(name) = hostname {
        if libc::sethostname(name, libc::strlen(name)) != 0 {
            report(tx, 2, errno());
        }
    }
    // In the namespaces just entered: /proc/sys resolves namespaced entries by the caller's.
    for (i, (path, value)) in sysctls.iter().enumerate() {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        let len = value.as_bytes().len();
        if fd < 0 || libc::write(fd, value.as_ptr().cast(), len) != len as isize {
            report(tx, SYSCTL_STEP + i as u32, errno());
        }
        libc::close(fd);
    }
    let holder = libc::fork();
    if holder < 0 {
        report(tx, 3, errno());
    }
    if holder == 0 {
        hold(devnull)
    }
    report(tx, u32::MAX, holder)
}

/// The holder: stdio on /dev/null and no other fd, then reaps orphans until `SIGTERM`.
unsafe fn hold(devnull: i32) -> ! {
    for fd in 0..3 {
        if libc::dup2(devnull, fd) < 0 {
            libc::_exit(1);
        }
    }
    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    libc::chdir(c"/".as_ptr());
    libc::prctl(libc::PR_SET_NAME, c"pod-holder".as_ptr());
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigfillset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    let mut wanted: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut wanted);
    for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
        libc::sigaddset(&mut wanted, s);
    }
    loop {
        match libc::sigwaitinfo(&wanted, std::ptr::null_mut()) {
            libc::SIGTERM | libc::SIGINT => libc::_exit(0),
            _ => while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn files(pairs: &[(&str, &str)], own_net: bool) -> Result<Vec<(String, String)>> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(sysctl_files(&map, own_net)?
            .into_iter()
            .map(|(p, v)| (p.into_string().unwrap(), v.into_string().unwrap()))
            .collect())
    }

    #[test]
    fn only_sysctls_of_the_pod_s_namespaces_are_taken() {
        let ok = files(
            &[
                ("kernel.shm_rmid_forced", "1"),
                ("net/ipv4/ip_unprivileged_port_start", "0"),
                ("fs.mqueue.msg_max", "20"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(
            ok,
            [
                ("/proc/sys/fs/mqueue/msg_max".into(), "20".into()),
                ("/proc/sys/kernel/shm_rmid_forced".into(), "1".into()),
                (
                    "/proc/sys/net/ipv4/ip_unprivileged_port_start".into(),
                    "0".into()
                ),
            ]
        );
        // Host network: the node's own network sysctls are not the pod's.
        let e = files(&[("net.ipv4.ip_forward", "1")], false).unwrap_err();
        assert!(e.to_string().contains("host-network"), "{e}");
        for global in [
            "vm.swappiness",
            "kernel.pid_max",
            "net..x",
            "kernel.hostname",
        ] {
            let e = files(&[(global, "1")], true).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{global}: {e}");
        }
    }
}
