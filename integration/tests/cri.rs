//! Pods through containerd's CRI plugin, as a kubelet makes them, with RuntimeClass handlers:
//! `runc` and `runc-alt` reach our `containerd-shim-runc-v2`.
//!
//! Every test starts its own containerd with CRI, a CNI bridge of its own and the images
//! pre-imported (no pull is ever attempted), and drives it through `integration::cri`.

use std::collections::BTreeSet;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use integration::checks::{mounts_mentioning, processes_mentioning, runc_state, wait_until};
use integration::cri::{api, log_text, CRI_NAMESPACE, HANDLER_ALT, HANDLER_OURS};
use integration::cri_fixture::{
    assert_all_gone, containerd_with_cri, delete_pod, delete_pod_retrying, run_pod, run_pod_with,
    sleeper, start_busybox, LONG,
};
use integration::{target_bin_dir, unique_id, Containerd};

fn containerd() -> Containerd {
    containerd_with_cri(&["containerd-shim-runc-v2", "pause"])
}

fn shim_set(c: &Containerd) -> BTreeSet<i32> {
    c.shim_pids().into_iter().collect()
}

/// Every shim of this containerd is our binary, not Debian's.
fn assert_ours(c: &Containerd) {
    let ours = std::fs::canonicalize(target_bin_dir().join("containerd-shim-runc-v2")).unwrap();
    let pids = c.shim_pids();
    assert!(!pids.is_empty(), "no shim runs");
    for pid in pids {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(exe, ours, "shim {pid} is not ours");
    }
}

/// The ttrpc address containerd recorded for task `id` (its shim's socket).
fn shim_address(c: &Containerd, id: &str) -> String {
    let p = c
        .state_dir()
        .join("io.containerd.runtime.v2.task")
        .join(CRI_NAMESPACE)
        .join(id)
        .join("address");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(address.trim_start_matches("unix://"))
}

#[test]
fn five_containers_share_one_shim_and_leave_nothing() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let pod = run_pod(&c, &cri, "five", HANDLER_OURS);
    assert_ours(&c);
    let shims = shim_set(&c);
    assert_eq!(shims.len(), 1, "the sandbox runs in one shim: {shims:?}");

    let mut ids = Vec::new();
    for i in 1..=5 {
        let id = sleeper(&cri, &pod, &format!("c{i}"));
        // StartContainer returns after containerd ran the shim's `start` and created the task,
        // so a second daemon would be visible now; `start` itself has exited.
        assert_eq!(shim_set(&c), shims, "container {i} changed the shim set");
        assert_eq!(
            shim_address(&c, &id),
            shim_address(&c, &pod.id),
            "container {i} is served elsewhere than its sandbox"
        );
        ids.push(id);
    }
    let listed = cri.list_containers(Some(&pod.id)).expect("ListContainers");
    let running = listed
        .iter()
        .filter(|k| k.state == api::ContainerState::ContainerRunning as i32)
        .count();
    assert_eq!(running, 5, "{listed:?}");
    for id in &ids {
        assert_eq!(cri.exec_sync(id, &["true"], 10).expect("exec").exit_code, 0);
    }
    assert_eq!(shim_set(&c), shims, "execs changed the shim set");

    delete_pod(&cri, &pod);
    ids.push(pod.id.clone());
    assert_all_gone(&c, &cri, &ids);
    let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
    assert!(
        !log.contains("PullImage"),
        "CRI tried to pull an image:\n{}",
        c.log_tail(40)
    );
}

#[test]
fn exec_sync_logs_and_stats() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let pod = run_pod(&c, &cri, "exec", HANDLER_OURS);
    let id = start_busybox(
        &cri,
        &pod,
        "talker",
        &[
            "sh",
            "-c",
            "echo hello-stdout; echo hello-stderr >&2; exec sleep 100000",
        ],
    );

    let out = cri
        .exec_sync(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"], 10)
        .expect("ExecSync");
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );
    let host = cri.exec_sync(&id, &["hostname"], 10).expect("ExecSync");
    assert_eq!(
        String::from_utf8_lossy(&host.stdout).trim(),
        pod.config.hostname
    );

    // The pod is on this containerd's CNI bridge network, with lo up (loopback plugin).
    let ip = cri
        .pod_sandbox_status(&pod.id)
        .expect("PodSandboxStatus")
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(ip.starts_with("10.231.0."), "pod IP {ip:?}");
    let addrs = cri
        .exec_sync(&id, &["ip", "-o", "addr"], 10)
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");
    assert!(addrs.contains("inet 127.0.0.1/8"), "lo is not up: {addrs}");

    let path = cri.container_log_path(&id).expect("log path");
    assert!(
        path.starts_with(&pod.config.log_directory),
        "{} is not in the pod's log directory",
        path.display()
    );
    let mut lines = Vec::new();
    let complete = wait_until(LONG, || {
        lines = cri.container_log(&id).unwrap_or_default();
        log_text(&lines, Some("stderr")) == "hello-stderr\n"
            && log_text(&lines, Some("stdout")) == "hello-stdout\n"
    });
    assert!(complete, "log of {id} at {}: {lines:?}", path.display());

    let stats = cri.container_stats(&id).expect("ContainerStats");
    let memory = stats.memory.expect("memory stats");
    let usage = memory.usage_bytes.map(|v| v.value).unwrap_or_default();
    let working_set = memory
        .working_set_bytes
        .map(|v| v.value)
        .unwrap_or_default();
    assert!(usage > 0 && working_set > 0, "memory stats: {memory:?}");
    let cpu = stats.cpu.expect("cpu stats");
    assert!(
        cpu.usage_core_nano_seconds
            .map(|v| v.value)
            .unwrap_or_default()
            > 0,
        "cpu stats: {cpu:?}"
    );

    delete_pod(&cri, &pod);
    assert_all_gone(&c, &cri, &[id, pod.id.clone()]);
}

#[test]
fn two_pods_get_two_shims() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let a = run_pod(&c, &cri, "twoa", HANDLER_OURS);
    let b = run_pod(&c, &cri, "twob", HANDLER_OURS);
    let ca = sleeper(&cri, &a, "a");
    let cb = sleeper(&cri, &b, "b");
    assert_ours(&c);
    assert_eq!(c.shim_pids().len(), 2, "{:?}", c.shim_pids());
    assert_ne!(shim_address(&c, &a.id), shim_address(&c, &b.id));
    assert_eq!(shim_address(&c, &ca), shim_address(&c, &a.id));
    assert_eq!(shim_address(&c, &cb), shim_address(&c, &b.id));

    // One pod going away takes exactly its own shim with it.
    delete_pod(&cri, &a);
    assert!(
        wait_until(LONG, || c.shim_pids().len() == 1),
        "{:?}",
        c.shim_pids()
    );
    assert_eq!(
        cri.exec_sync(&cb, &["true"], 10).expect("exec").exit_code,
        0
    );
    delete_pod(&cri, &b);
    assert_all_gone(&c, &cri, &[ca, cb, a.id.clone(), b.id.clone()]);
}

#[test]
fn alternative_handler_reaches_our_shim() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let pod = run_pod(&c, &cri, "alt", HANDLER_ALT);
    let id = sleeper(&cri, &pod, "alt");
    assert_ours(&c);
    let listed = cri.list_pod_sandboxes().expect("ListPodSandbox");
    assert_eq!(
        listed
            .iter()
            .find(|p| p.id == pod.id)
            .map(|p| p.runtime_handler.as_str()),
        Some(HANDLER_ALT)
    );
    let out = cri.exec_sync(&id, &["echo", "alt"], 10).expect("ExecSync");
    assert_eq!(out.stdout, b"alt\n");
    delete_pod(&cri, &pod);
    assert_all_gone(&c, &cri, &[id, pod.id.clone()]);
}

/// A pod whose shim group maps to the socket of a shim that died (SIGKILL) gets a new shim
/// on that very address: the stale socket is replaced, not mistaken for a live shim.
#[test]
fn stale_socket_of_a_killed_shim_is_replaced() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let group = unique_id("grp");
    let annotate = |cfg: &mut api::PodSandboxConfig| {
        cfg.annotations
            .insert("io.containerd.runc.v2.group".into(), group.clone());
    };
    let first = run_pod_with(&c, &cri, "stale1", HANDLER_OURS, annotate);
    let first_ctr = sleeper(&cri, &first, "victim");
    let address = shim_address(&c, &first.id);
    let sock = socket_path(&address);
    let dead: Vec<i32> = c.shim_pids();
    assert_eq!(dead.len(), 1, "{dead:?}");

    let show = |pids: &[i32]| -> Vec<String> {
        pids.iter()
            .map(|p| {
                let raw = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                format!("{p}: {}", String::from_utf8_lossy(&raw).replace('\0', " "))
            })
            .collect()
    };
    // SAFETY: kill(2) of the shim daemon we just looked up.
    assert_eq!(unsafe { libc::kill(dead[0], libc::SIGKILL) }, 0);
    let notready = wait_until(LONG, || {
        cri.pod_sandbox_status(&first.id)
            .is_ok_and(|s| s.state == api::PodSandboxState::SandboxNotready as i32)
    });
    assert!(notready, "CRI never noticed the dead shim");
    // containerd cleans up after the dead shim by running our `delete` action once per task
    // it served (sandbox and container); wait for all of them, so the next pod's `start`
    // does not race one that is still deciding whether the socket is stale.
    assert!(
        wait_until(LONG, || c.shim_pids().is_empty()),
        "cleanup after the dead shim still runs: {:#?}",
        show(&c.shim_pids())
    );
    // containerd runs our `delete` action after a shim dies, which removes a socket nobody
    // answers on. What a crash before that cleanup (or a crash of containerd too) leaves is
    // a socket file without a listener: put exactly that back if it is gone.
    let left_by_kill = sock.exists();
    if !left_by_kill {
        drop(UnixListener::bind(&sock).expect("recreate the stale socket file"));
    }
    eprintln!(
        "stale socket {}: left by the kill: {left_by_kill}",
        sock.display()
    );
    assert!(
        sock.exists() && UnixStream::connect(&sock).is_err(),
        "socket is not stale"
    );

    let second = run_pod_with(&c, &cri, "stale2", HANDLER_OURS, annotate);
    let id = sleeper(&cri, &second, "survivor");
    assert_eq!(
        shim_address(&c, &second.id),
        address,
        "not the same group socket"
    );
    let now = c.shim_pids();
    assert_eq!(now.len(), 1, "{:#?}", show(&now));
    assert_ne!(now, dead, "the dead shim's pid is back?");
    assert_ours(&c);
    UnixStream::connect(&sock).expect("the new shim listens on the replaced socket");
    let out = cri
        .exec_sync(&id, &["echo", "alive"], 10)
        .expect("ExecSync");
    assert_eq!((out.stdout.as_slice(), out.exit_code), (&b"alive\n"[..], 0));

    delete_pod_retrying(&cri, &first);
    delete_pod(&cri, &second);
    assert_all_gone(
        &c,
        &cri,
        &[first_ctr, id, first.id.clone(), second.id.clone()],
    );
    assert!(!sock.exists(), "socket {} left behind", sock.display());
}

/// What a panicking test body saw before it panicked.
struct Seen {
    dir: PathBuf,
    bridge: String,
    ids: Vec<String>,
    inits: Vec<i32>,
    sock: PathBuf,
}

/// Runs a pod with one container, optionally SIGKILLs its shim (orphaning the containers
/// and racing containerd's cleanup), panics, and checks the harness's drop left nothing.
fn panic_with_pod_running(kill_shim: bool) {
    let seen = std::sync::Mutex::new(None::<Seen>);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = containerd();
        let cri = c.cri_client().expect("CRI client");
        let pod = run_pod(&c, &cri, "panic", HANDLER_OURS);
        let id = sleeper(&cri, &pod, "doomed");
        let ids = vec![pod.id.clone(), id];
        let inits = ids
            .iter()
            .map(|id| {
                let state =
                    std::fs::read_to_string(runc_state(CRI_NAMESPACE, id).join("state.json"))
                        .expect("runc state");
                let v: serde_json::Value = serde_json::from_str(&state).expect("json");
                v["init_process_pid"].as_i64().expect("init pid") as i32
            })
            .collect();
        *seen.lock().unwrap() = Some(Seen {
            dir: c.dir().to_path_buf(),
            bridge: c.cni_bridge().expect("bridge"),
            ids,
            inits,
            sock: socket_path(&shim_address(&c, &pod.id)),
        });
        if kill_shim {
            for pid in c.shim_pids() {
                // SAFETY: kill(2) of this containerd's shim.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        panic!("deliberate panic with a pod running");
    }));
    assert!(r.is_err());
    let seen = seen.into_inner().unwrap().expect("the pod ran");
    let dir = seen.dir.to_string_lossy().into_owned();
    assert!(!seen.dir.exists(), "{dir} left behind");
    assert!(
        !Path::new("/sys/class/net").join(&seen.bridge).exists(),
        "bridge {} left behind",
        seen.bridge
    );
    assert!(
        !seen.sock.exists(),
        "shim socket {} left behind",
        seen.sock.display()
    );
    for id in &seen.ids {
        assert!(
            !runc_state(CRI_NAMESPACE, id).exists(),
            "runc state of {id}"
        );
        let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path().join(CRI_NAMESPACE).join(id))
                    .filter(|p| p.exists())
                    .collect()
            })
            .unwrap_or_default();
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    }
    for pid in &seen.inits {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = state
            .rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z') && !s.is_empty());
        assert!(!alive, "container init {pid} still runs: {state}");
    }
    let procs: Vec<_> = processes_mentioning(&dir)
        .into_iter()
        .filter(|(_, cmd)| !cmd.contains("cargo") && !cmd.contains("/deps/cri-"))
        .collect();
    assert!(procs.is_empty(), "{procs:?}");
    assert!(mounts_mentioning(&dir).is_empty());
}

/// A test that panics with a pod running leaves nothing behind: the harness's drop removes
/// the pod through CRI, then the shim, the bridge and the directory.
#[test]
fn panicking_test_leaves_nothing() {
    panic_with_pod_running(false);
}

/// The same when the shim was SIGKILLed just before: its containers are orphans of PID 1
/// and containerd's cleanup after the dead shim is still running when the drop starts.
#[test]
fn panicking_test_after_shim_crash_leaves_nothing() {
    panic_with_pod_running(true);
}
