//! Teardown of a private containerd, alive (pods, tasks, daemon) or dead (processes,
//! shim sockets, runc state, cgroups, mounts, CNI left behind).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::cni::cleanup_cni;
use super::ctr::run_with_timeout;
use super::mounts::unmount_all;
use super::Containerd;
use crate::cri::{CriClient, CRI_NAMESPACE};
use crate::procfs::{cmdline, contains, list_pids, proc_stat};

/// Where containerd 1.6 shims put their ttrpc sockets (hard-coded in
/// containerd as `<DefaultStateDir>/s`, independent of our config).
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// The runc state root the runc v2 shim uses by default (`<root>/<namespace>/<id>`).
const RUNC_ROOT: &str = "/run/containerd/runc";

impl Containerd {
    /// Whether the daemon runs and accepts connections: ctr waits ~10 s to connect to a
    /// dead socket, so teardown skips the polite steps when it is gone.
    pub(super) fn daemon_alive(&mut self) -> bool {
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
            || self.restarted_pid().is_some();
        alive && UnixStream::connect(&self.address).is_ok()
    }

    /// The daemon [`restart_command`](Self::restart_command)'s script started, while it runs.
    pub(super) fn restarted_pid(&self) -> Option<i32> {
        let pid = fs::read_to_string(self.dir_path.join("containerd.pid"))
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&*self.config_path().to_string_lossy())
            .then_some(pid)
    }

    /// Best-effort StopPodSandbox + RemovePodSandbox of every pod, so CRI runs CNI DEL
    /// (veth, IPAM lease, cached result) before the daemon goes.
    fn remove_pods(&mut self) {
        if !self.cri || !self.daemon_alive() {
            return;
        }
        let r = CriClient::connect_with_timeout(&self.address, Duration::from_secs(10))
            .and_then(|c| c.remove_all_pods());
        if let Err(e) = r {
            eprintln!("integration: removing CRI pods: {e}");
        }
    }

    /// Best-effort removal of all tasks and containers in our namespaces, with
    /// short timeouts so a broken shim cannot hang the teardown.
    fn remove_tasks_and_containers(&mut self) {
        if !self.daemon_alive() {
            return;
        }
        let mut namespaces = vec![self.namespace.clone()];
        if self.cri && self.namespace != CRI_NAMESPACE {
            namespaces.push(CRI_NAMESPACE.to_string());
        }
        let t = Duration::from_secs(10);
        for ns in &namespaces {
            let ctr = |args: &[&str]| run_with_timeout(self.ctr_command_in(ns, args), t);
            let tasks = ctr(&["tasks", "ls", "-q"]);
            if !tasks.success() {
                return; // containerd is not answering; the process sweep handles it
            }
            let ids: Vec<&str> = tasks.stdout.split_whitespace().collect();
            for id in &ids {
                ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            }
            for id in &ids {
                ctr(&["tasks", "delete", "-f", id]);
            }
            let containers = ctr(&["containers", "ls", "-q"]);
            for id in containers.stdout.split_whitespace() {
                ctr(&["containers", "delete", id]);
            }
        }
    }

    fn stop_daemon(&mut self) {
        // A daemon that `restart_command`'s script started is not our child: it is signalled
        // until /proc shows it gone (a zombie has no cmdline).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut signal = Some(libc::SIGTERM);
        while let Some(pid) = self.restarted_pid() {
            if Instant::now() > deadline {
                signal = Some(libc::SIGKILL);
            }
            if let Some(sig) = signal.take() {
                // SAFETY: kill(2) on the recorded pid, still running this containerd's config.
                unsafe { libc::kill(pid, sig) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_pods();
        self.remove_tasks_and_containers();
        self.stop_daemon();
        let clean = cleanup_dir(&self.dir_path, &self.address).clean;
        if let Some(dir) = self.dir.take() {
            if clean {
                if let Err(e) = dir.close() {
                    eprintln!("integration: removing {}: {e}", self.dir_path.display());
                }
            } else {
                // Never remove_dir_all through a mount: it could be a bind
                // mount of something outside the test directory.
                let kept = dir.keep();
                eprintln!(
                    "integration: mounts remain under {}; leaving it in place",
                    kept.display()
                );
            }
        }
    }
}

/// Kills every process whose command line mentions `dir` or `address`, plus
/// all their descendants (container processes do not mention either), then
/// waits briefly for them to disappear. Returns each one killed with its command line.
fn kill_referencing(dir: &Path, address: &Path) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let dir_b = dir.as_os_str().as_bytes();
    let addr_b = address.as_os_str().as_bytes();
    let pids = list_pids();
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for &pid in &pids {
        if let Some((_, ppid, _)) = proc_stat(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut victims: BTreeSet<i32> = BTreeSet::new();
    let mut stack: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            cmdline(pid).is_some_and(|args| {
                args.iter()
                    .any(|a| contains(a, dir_b) || contains(a, addr_b))
            })
        })
        .collect();
    while let Some(pid) = stack.pop() {
        if pid != me && pid > 1 && victims.insert(pid) {
            stack.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    let killed: Vec<(i32, String)> = victims
        .iter()
        .map(|&pid| {
            let args = cmdline(pid).unwrap_or_default();
            let line = args
                .iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
                .join(" ");
            (pid, line)
        })
        .collect();
    for &pid in &victims {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let alive = victims
            .iter()
            .any(|&p| proc_stat(p).is_some_and(|(state, _, _)| state != 'Z'));
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

/// `(namespace, container id)` pairs that have a task bundle in `dir`'s state.
fn bundles(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let base = dir.join("state").join("io.containerd.runtime.v2.task");
    let names = |p: &Path| -> Vec<String> {
        fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ns in names(&base) {
        for id in names(&base.join(&ns)) {
            out.push((ns.clone(), id));
        }
    }
    out
}

/// What [`cleanup_dir`] did.
pub(super) struct Teardown {
    /// Nothing is mounted under the directory any more: it may be removed. When false,
    /// the caller must not delete it.
    pub(super) clean: bool,
    /// The processes it killed, with their command lines.
    pub(super) killed: Vec<(i32, String)>,
}

/// Full teardown of a (dead or alive) containerd's directory, minus removing
/// the directory.
pub(super) fn cleanup_dir(dir: &Path, address: &Path) -> Teardown {
    let leftovers = bundles(dir);
    let killed = kill_referencing(dir, address);
    for (ns, id) in &leftovers {
        // Sockets of killed shims: containerd 1.6 names them
        // sha256(<address>/<ns>/<id>) under /run/containerd/s.
        let key = Path::new(address).join(ns).join(id);
        let hash = Sha256::digest(key.as_os_str().as_bytes());
        let sock = Path::new(SHIM_SOCKET_DIR).join(hex(&hash));
        let _ = fs::remove_file(&sock);
        let _ = fs::remove_file(sock.with_extension("debug"));
        // A shim grouped by pod (CRI) or group annotation listens elsewhere: the bundle
        // records where. Its daemon was killed above, so nobody answers there any more.
        let bundle = dir
            .join("state")
            .join("io.containerd.runtime.v2.task")
            .join(ns)
            .join(id);
        if let Ok(a) = fs::read_to_string(bundle.join("address")) {
            let p = Path::new(a.trim().trim_start_matches("unix://"));
            if p.starts_with(SHIM_SOCKET_DIR) && UnixStream::connect(p).is_err() {
                let _ = fs::remove_file(p);
            }
        }
        // runc state of killed containers (the Go shim's default runc root is
        // /run/containerd/runc/<ns>); left alone if its init still runs, which
        // means another containerd uses the same namespace and id.
        let runc_state = Path::new(RUNC_ROOT).join(ns).join(id);
        if !runc_init_alive(&runc_state.join("state.json")) {
            let _ = fs::remove_dir_all(&runc_state);
        }
        // cgroups of killed containers (runc's default path /<ns>/<id>).
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for ctl in rd.filter_map(Result::ok) {
                let _ = fs::remove_dir(ctl.path().join(ns).join(id));
            }
        }
    }
    sweep_runc_states(dir);
    let clean = unmount_all(dir);
    cleanup_cni(dir);
    Teardown { clean, killed }
}

/// Removes runc state (and kills the container, cgroups too) of every container whose
/// bundle lies in `dir`, whatever namespace or id it has.
///
/// The per-bundle pass above misses containers whose bundle containerd already removed
/// while their cleanup was cut short: a shim killed with SIGKILL orphans its containers to
/// PID 1 (out of reach of the process sweep), and the `delete` action containerd runs for
/// it may itself be killed by the sweep mid-way. runc labels each state with its bundle,
/// which is how ours are told apart from other containerds'.
fn sweep_runc_states(dir: &Path) {
    let Ok(namespaces) = fs::read_dir(RUNC_ROOT) else {
        return;
    };
    let prefix = format!("bundle={}/", dir.display());
    for ns in namespaces.filter_map(Result::ok) {
        let Ok(ids) = fs::read_dir(ns.path()) else {
            continue;
        };
        for state_dir in ids.filter_map(Result::ok).map(|e| e.path()) {
            let Ok(text) = fs::read_to_string(state_dir.join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let ours = v["config"]["labels"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|x| x.as_str().is_some_and(|x| x.starts_with(&prefix)))
            });
            if !ours {
                continue;
            }
            if runc_init_alive(&state_dir.join("state.json")) {
                if let Some(pid) = v["init_process_pid"]
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                {
                    // SAFETY: kill(2) of a container init verified by pid and start time.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while runc_init_alive(&state_dir.join("state.json"))
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            if let Some(paths) = v["cgroup_paths"].as_object() {
                for p in paths.values().filter_map(|p| p.as_str()) {
                    let _ = fs::remove_dir(p);
                }
            }
            let _ = fs::remove_dir_all(&state_dir);
        }
    }
}

/// Whether the init process recorded in a runc `state.json` still runs
/// (same pid *and* start time, so pid reuse does not fool it).
fn runc_init_alive(state_json: &Path) -> bool {
    let Ok(text) = fs::read_to_string(state_json) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let pid = v["init_process_pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok());
    let start = v["init_process_start"].as_u64();
    match (pid, start) {
        (Some(pid), Some(start)) if pid > 0 => {
            proc_stat(pid).is_some_and(|(state, _, st)| st == start && state != 'Z')
        }
        _ => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
