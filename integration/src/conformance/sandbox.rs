//! containerd 2.x's `shim` sandboxer, played: a CRI pod without a pause container.
//!
//! The calls and their order are CRI's with `sandboxer = "shim"`: `start` for the sandbox id
//! (the bundle has no `config.json`), then on that connection `CreateSandbox` (the pod's
//! `PodSandboxConfig` as options, CRI's `netns_path`), `StartSandbox`, `WaitSandbox` left
//! pending (no timeout), `SandboxStatus`; a pod container on a connection of its own (its
//! bundle's `sandbox` file names the pod), its spec joining `/proc/<sandbox pid>/ns/*` and the
//! netns; the runner reconnecting as a restarted containerd does (task `Connect` with the
//! sandbox id, then `SandboxStatus`); StopPodSandbox's `StopSandbox` (timeout 0) after the
//! container is gone, RemovePodSandbox's `ShutdownSandbox`, then the `delete` action that
//! closing the connection sets off. Checked as containerd 2.3 reads them: the sandbox spec
//! in `StartSandboxResponse.spec` (NRI), `SandboxStatus.info["info"]` (CRI's `SandboxInfo`),
//! `Stats` of the container after its exit and before its delete (CRI's OOM check), a second
//! `CreateSandbox` through a second `start` refused, and a host-network sandbox in the
//! host's network and UTS namespaces. The pod has a cgroup parent, its container's cgroup
//! nests in it, and `SandboxMetrics` (which containerd 2.4's CRI asks for pod stats) gives
//! that cgroup's figures.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::Message;
use protocol::shim::{
    ConnectRequest, ConnectResponse, CreateTaskResponse, DeleteRequest, DeleteResponse,
    KillRequest, StartRequest, StartResponse, WaitRequest, WaitResponse,
};

use crate::checks::wait_until;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;

use protocol::platform::Platform;
use protocol::sandbox::*;
use protocol::{sandbox_state, SANDBOX_SERVICE};

use super::lifecycle::EXIT_TIMEOUT;
use super::*;

/// What CRI sends as `CreateSandbox.options`: a `PodSandboxConfig` with only `hostname`
/// (field 2), a `metadata` (field 1) and, unless empty, `linux.cgroup_parent` (fields 8, 1)
/// and `linux.sysctls` (fields 8, 3: map entries, key 1 and value 2) set; a shim must skip
/// what it does not read.
fn pod_config(hostname: &str, cgroup_parent: &str, sysctls: &[(&str, &str)]) -> Any {
    // Every length here is under 128, so each fits one varint byte.
    let field = |out: &mut Vec<u8>, tag: u8, bytes: &[u8]| {
        out.push(tag);
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    };
    let mut value = vec![0x0a, 0x05, 0x0a, 0x03, b'p', b'o', b'd'];
    field(&mut value, 0x12, hostname.as_bytes());
    let mut linux = Vec::new();
    if !cgroup_parent.is_empty() {
        field(&mut linux, 0x0a, cgroup_parent.as_bytes());
    }
    for (key, val) in sysctls {
        let mut entry = Vec::new();
        field(&mut entry, 0x0a, key.as_bytes());
        field(&mut entry, 0x12, val.as_bytes());
        field(&mut linux, 0x1a, &entry);
    }
    if !linux.is_empty() {
        field(&mut value, 0x42, &linux);
    }
    Any {
        type_url: "type.googleapis.com/runtime.v1.PodSandboxConfig".into(),
        value,
        ..Default::default()
    }
}

/// The pod's sysctls, one of IPC's and one of the network's, both off their defaults; the
/// pod's container reads them back.
const SYSCTLS: [(&str, &str); 2] = [
    ("kernel.shm_rmid_forced", "1"),
    ("net.ipv4.ip_unprivileged_port_start", "80"),
];

/// The pod's cgroup as the kubelet names one (`cgroup_parent`, cgroupfs style), removed
/// from every hierarchy on drop: runc removes a container's cgroup, not its parent.
struct PodCgroup(String);

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let rel = self.0.trim_start_matches('/');
        let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
        if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
            roots.extend(entries.flatten().map(|e| e.path()));
        }
        for dir in roots.iter().map(|r| r.join(rel)).filter(|d| d.is_dir()) {
            // A container's cgroup a killed shim left, then the pod's.
            if let Ok(children) = fs::read_dir(&dir) {
                for c in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = fs::remove_dir(c.path());
                }
            }
            let _ = fs::remove_dir(&dir);
        }
    }
}

/// `SandboxMetrics` while the pod's container runs: its pod cgroup's figures, as containerd
/// 2.4's CRI decodes them (cgroups v1 or v2 `Metrics`), with the container's memory and
/// processes in them.
fn sandbox_metrics(api: &TaskApi, id: &str) -> Result<String, String> {
    let r = sandbox_call::<_, SandboxMetricsResponse>(
        api,
        "SandboxMetrics",
        &SandboxMetricsRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        },
    )?;
    let metric = r.metrics.into_option().ok_or("no metrics")?;
    if metric.id != id {
        return Err(format!("metrics of {:?}", metric.id));
    }
    let data = metric.data.into_option().ok_or("no data")?;
    let (memory, pids) = match data.type_url.as_str() {
        protocol::type_urls::CGROUPS_V1_METRICS => {
            let m = protocol::cgroups_v1::Metrics::parse_from_bytes(&data.value)
                .map_err(|e| format!("decode {}: {e}", data.type_url))?;
            (m.memory.usage.usage, m.pids.current)
        }
        protocol::type_urls::CGROUPS_V2_METRICS => {
            let m = protocol::cgroups_v2::Metrics::parse_from_bytes(&data.value)
                .map_err(|e| format!("decode {}: {e}", data.type_url))?;
            (m.memory.usage, m.pids.current)
        }
        other => return Err(format!("type {other:?}")),
    };
    match (memory > 0, pids > 0) {
        (true, true) => Ok(format!("{}: memory {memory} B, {pids} pids", data.type_url)),
        _ => Err(format!("{}: memory {memory} B, {pids} pids", data.type_url)),
    }
}

/// A network namespace of the test's own (`ip netns add`), removed on drop.
struct NetNs(String);

impl NetNs {
    fn new(name: &str) -> Result<NetNs, String> {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .map_err(|e| format!("ip netns add (apt install iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(NetNs(name.to_string()))
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// The pod interface's MAC, address and its peer's address (a private subnet, in the
/// test's own namespaces only).
const POD_MAC: &str = "02:00:0a:fa:09:02";
const POD_ADDRESS: &str = "10.250.9.2/24";
const PEER_ADDRESS: &str = "10.250.9.1/24";

/// `eth0` in `pod` as CNI's bridge plugin would leave it (a veth with an address, up, a
/// default route), its peer in `peer`.
fn pod_interface(pod: &NetNs, peer: &NetNs) -> Result<(), String> {
    let ip = |ns: &NetNs, args: &[&str]| -> Result<(), String> {
        let out = Command::new("ip")
            .args(["-n", &ns.0])
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "ip -n {} {args:?}: {}",
                ns.0,
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    };
    ip(
        pod,
        &[
            "link", "add", "eth0", "address", POD_MAC, "type", "veth", "peer", "name", "peer0",
            "netns", &peer.0,
        ],
    )?;
    ip(peer, &["addr", "add", PEER_ADDRESS, "dev", "peer0"])?;
    ip(peer, &["link", "set", "peer0", "up"])?;
    ip(pod, &["addr", "add", POD_ADDRESS, "dev", "eth0"])?;
    ip(pod, &["link", "set", "eth0", "up"])?;
    let gateway = PEER_ADDRESS.split('/').next().unwrap_or_default();
    ip(pod, &["route", "add", "default", "via", gateway])
}

/// The namespace `/proc/<pid>/ns/<kind>` names (`net:[4026…]`).
fn ns(pid: u32, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

fn sandbox_call<Req: Message, Resp: Message>(
    api: &TaskApi,
    method: &str,
    req: &Req,
) -> Result<Resp, String> {
    api.call_on(SANDBOX_SERVICE, method, req, Some(CALL_TIMEOUT))
        .map_err(|e| describe(&e))
}

/// A call that must fail with `code`.
fn refused<Req: Message>(
    api: &TaskApi,
    method: &str,
    req: &Req,
    code: ttrpc::Code,
) -> Result<String, String> {
    match api.call_on::<_, Empty>(SANDBOX_SERVICE, method, req, Some(CALL_TIMEOUT)) {
        Err(ttrpc::Error::RpcStatus(s)) if s.code() == code => {
            Ok(format!("{method}: {code:?} ({})", s.message()))
        }
        Err(e) => Err(format!("{method}: {} instead of {code:?}", describe(&e))),
        Ok(_) => Err(format!("{method}: accepted instead of {code:?}")),
    }
}

/// Walks one pod (sandbox `config.id`, one container) through its life as containerd 2.x's
/// CRI with `sandboxer = "shim"` would; `kill_shim` instead SIGKILLs the shim while the pod
/// runs and checks that the `delete` action stops what it left. Never panics.
pub fn run_sandbox_pod(config: &Config, kill_shim: bool) -> Report {
    let mut report = Report::default();
    let pg = match Playground::new(&config.shim, config.generation, &config.id) {
        Ok(pg) => pg,
        Err(e) => {
            report.check("playground", Err(e));
            return report;
        }
    };
    let ctr_id = format!("{}-c", config.id);
    let ctr = match Playground::new(&config.shim, config.generation, &ctr_id) {
        Ok(c) => c,
        Err(e) => {
            report.check("playground", Err(e));
            return report;
        }
    };
    // `ip netns` names are host-wide; the id is unique. The pod's gets an `eth0` as CNI
    // would make it, whose veth peer is in a namespace of its own (the "bridge").
    let made = NetNs::new(&format!("shimconf-{}", config.id)).and_then(|pod| {
        let peer = NetNs::new(&format!("shimconf-{}-p", config.id))?;
        pod_interface(&pod, &peer)?;
        Ok((pod, peer))
    });
    let (netns, _peer) = match made {
        Ok(n) => n,
        Err(e) => {
            report.check("netns", Err(e));
            return report;
        }
    };
    walk_pod(&pg, &ctr, &netns, config, kill_shim, &mut report);
    report
}

fn walk_pod(
    pg: &Playground,
    ctr: &Playground,
    netns: &NetNs,
    config: &Config,
    kill_shim: bool,
    report: &mut Report,
) -> Option<()> {
    let id = pg.id.clone();
    let hostname = "pod-host";
    let cgroup = PodCgroup(format!("/shimconf-{id}"));
    // A sandbox bundle has no spec.
    let _ = fs::remove_file(pg.bundle().join("config.json"));

    let out = pg.run_start(&pg.start_stdin(config.runtime_options.as_ref()));
    let answer = out
        .and_then(|o| {
            if o.success {
                parse_answer(pg.generation, &o.stdout)
            } else {
                Err(format!("exit status non-zero: {}", o.stderr))
            }
        })
        .map_err(|e| report.check("start", Err(e)))
        .ok()?;
    report.check(
        "start",
        Ok(format!(
            "task API v{} at {}",
            answer.version, answer.address
        )),
    );
    pg.set_address(&answer.address);
    let connect = |what: &str, report: &mut Report| {
        TaskApi::connect(&answer.address, answer.version, &pg.namespace)
            .map_err(|e| report.check(what, Err(e)))
            .ok()
    };
    let api = connect("connect", report)?;

    // CreateSandbox, and what must be refused around it.
    let create = CreateSandboxRequest {
        sandbox_id: id.clone(),
        bundle_path: pg.bundle().display().to_string(),
        options: protobuf::MessageField::some(pod_config(hostname, &cgroup.0, &SYSCTLS)),
        netns_path: netns.path().display().to_string(),
        annotations: HashMap::from([(ANNOTATION.0.to_string(), ANNOTATION.1.to_string())]),
        ..Default::default()
    };
    let start = StartSandboxRequest {
        sandbox_id: id.clone(),
        ..Default::default()
    };
    report.check(
        "start before create",
        refused(
            &api,
            "StartSandbox",
            &start,
            ttrpc::Code::FAILED_PRECONDITION,
        ),
    );
    // Bad input is refused and leaves nothing: the same id is created right after.
    let mut bad = create.clone();
    bad.netns_path = "/nonexistent/netns".into();
    report.check(
        "bad netns refused",
        refused(&api, "CreateSandbox", &bad, ttrpc::Code::INVALID_ARGUMENT),
    );
    let mut bad = create.clone();
    let mut cut = pod_config(hostname, &cgroup.0, &SYSCTLS);
    cut.value.truncate(cut.value.len() - 2);
    bad.options = protobuf::MessageField::some(cut);
    report.check(
        "bad pod config refused",
        refused(&api, "CreateSandbox", &bad, ttrpc::Code::INVALID_ARGUMENT),
    );
    // A sysctl of no namespace the pod holds would change the node's (or VM's) kernel.
    let mut bad = create.clone();
    let global = pod_config(hostname, &cgroup.0, &[("vm.swappiness", "1")]);
    bad.options = protobuf::MessageField::some(global);
    report.check(
        "global sysctl refused",
        refused(&api, "CreateSandbox", &bad, ttrpc::Code::INVALID_ARGUMENT),
    );
    let created = sandbox_call::<_, CreateSandboxResponse>(&api, "CreateSandbox", &create);
    if !report.check("create sandbox", created.map(|_| "created".into())) {
        return None;
    }
    report.check(
        "create twice",
        refused(&api, "CreateSandbox", &create, ttrpc::Code::ALREADY_EXISTS),
    );
    let status_req = SandboxStatusRequest {
        sandbox_id: id.clone(),
        ..Default::default()
    };
    let unknown = SandboxStatusRequest {
        sandbox_id: "no-such-sandbox".into(),
        ..Default::default()
    };
    report.check(
        "status of an unknown sandbox",
        refused(&api, "SandboxStatus", &unknown, ttrpc::Code::NOT_FOUND),
    );

    // StartSandbox: the pid whose namespaces the pod's containers join.
    let started = sandbox_call::<_, StartSandboxResponse>(&api, "StartSandbox", &start).and_then(
        |r| match (r.pid, r.created_at.is_some()) {
            (0, _) => Err("pid 0".into()),
            (_, false) => Err("no created_at".into()),
            (_, true) => Ok(r),
        },
    );
    let (pid, spec) = match started {
        Ok(r) if config.in_vm => {
            report.check("start sandbox", Ok(format!("pid {} in the VM", r.pid)));
            (r.pid, r.spec.into_option())
        }
        Ok(r) => {
            let pid = r.pid;
            let same = fs::metadata(netns.path()).map(|m| m.ino()).ok()
                == fs::metadata(format!("/proc/{pid}/ns/net"))
                    .map(|m| m.ino())
                    .ok();
            let checked = if same {
                Ok(format!("pid {pid}, in {}", ns(pid, "net")))
            } else {
                Err(format!(
                    "pid {pid} is in {}, not the pod's netns",
                    ns(pid, "net")
                ))
            };
            report.check("start sandbox", checked);
            (pid, r.spec.into_option())
        }
        Err(e) => {
            report.check("start sandbox", Err(e));
            // containerd's controller then releases the sandbox (`cleanupShim`):
            // ShutdownSandbox, the shim's exit, the `delete` action.
            shut_down(pg, api, &id, netns, report);
            return None;
        }
    };
    report.check("sandbox spec", check_spec(spec.as_ref(), pid, true));
    report.check(
        "start twice",
        refused(
            &api,
            "StartSandbox",
            &start,
            ttrpc::Code::FAILED_PRECONDITION,
        ),
    );

    // WaitSandbox, pending until the end, on its own connection as a goroutine would.
    let waiter = connect("wait", report)?;
    let (tx, waited) = mpsc::channel();
    let wait_req = WaitSandboxRequest {
        sandbox_id: id.clone(),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let r = waiter.call_on::<_, WaitSandboxResponse>(
            SANDBOX_SERVICE,
            "WaitSandbox",
            &wait_req,
            None,
        );
        let _ = tx.send(r.map_err(|e| describe(&e)));
    });

    let platform = sandbox_call::<_, PlatformResponse>(
        &api,
        "Platform",
        &PlatformRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        },
    )
    .and_then(|p| {
        let p: Platform = p.platform.unwrap_or_default();
        match p.os.as_str() {
            "linux" => Ok(format!("{}/{}", p.os, p.architecture)),
            _ => Err(format!("platform {p:?}")),
        }
    });
    report.check("platform", platform);
    let ready = |api: &TaskApi, what: &str, report: &mut Report| {
        let r = sandbox_call::<_, SandboxStatusResponse>(api, "SandboxStatus", &status_req)
            .and_then(|s| {
                if s.state == sandbox_state::READY && s.pid == pid && s.sandbox_id == id {
                    Ok(format!("{} pid {}", s.state, s.pid))
                } else {
                    Err(format!("{:?} pid {} id {:?}", s.state, s.pid, s.sandbox_id))
                }
            });
        report.check(what, r)
    };
    ready(&api, "status ready", report);
    report.check("status info", status_info(&api, &id, pid));
    report.check("create through a second start", create_again(pg, &create));
    report.check(
        "host-network sandbox",
        host_network_sandbox(pg, &api, config.in_vm),
    );

    // A container of the pod, as CRI's spec for it and containerd's connection per task.
    let mut spec = super::spec(
        &ctr.rootfs(),
        &[
            "sh",
            "-c",
            &format!(
                "hostname; cat /proc/1/comm /proc/sys/kernel/shm_rmid_forced \
                 /proc/sys/net/ipv4/ip_unprivileged_port_start /sys/class/net/eth0/address; \
                 ip -4 -o addr show dev eth0 | grep -o 'inet [0-9./]*'; \
                 ping -c 1 -W 5 {} >/dev/null && echo reached; exec sleep 1000",
                PEER_ADDRESS.split('/').next().unwrap_or_default()
            ),
        ],
    );
    spec["ociVersion"] = config.generation.oci_version().into();
    spec["hostname"] = serde_json::Value::Null;
    spec["linux"]["cgroupsPath"] = format!("{}/{}", cgroup.0, ctr.id).into();
    // `ping`'s raw socket.
    for set in ["bounding", "effective", "permitted"] {
        if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
            caps.push("CAP_NET_RAW".into());
        }
    }
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid", "path": format!("/proc/{pid}/ns/pid")},
        {"type": "network", "path": netns.path()},
        {"type": "ipc", "path": format!("/proc/{pid}/ns/ipc")},
        {"type": "uts", "path": format!("/proc/{pid}/ns/uts")},
        {"type": "mount"}
    ]);
    let written = fs::write(ctr.bundle().join("config.json"), spec.to_string())
        .and_then(|()| fs::write(ctr.bundle().join("sandbox"), &id));
    if let Err(e) = written {
        report.check("pod container", Err(format!("write its bundle: {e}")));
        return None;
    }
    let task = connect("pod container", report)?;
    let create = ctr
        .create_request(config.runtime_options.as_ref())
        .map_err(|e| report.check("pod container", Err(e)))
        .ok()?;
    let task_pid = task
        .call::<_, CreateTaskResponse>("Create", &create)
        .and_then(|r| {
            task.call::<_, StartResponse>(
                "Start",
                &StartRequest {
                    id: ctr.id.clone(),
                    ..Default::default()
                },
            )
            .map(|_| r.pid)
        })
        .map_err(|e| report.check("pod container", Err(describe(&e))))
        .ok()?;
    // In a VM, the output is the check: the pod's hostname, its holder as PID 1, and the
    // pod's sysctls.
    let joined: Vec<String> = ["net", "ipc", "uts", "pid"]
        .into_iter()
        .filter(|k| !config.in_vm && ns(task_pid, k) != ns(pid, k))
        .map(str::to_string)
        .collect();
    let want = format!("{hostname}\npod-holder\n1\n80\n{POD_MAC}\ninet {POD_ADDRESS}\nreached\n");
    let seen = wait_until(EXIT_TIMEOUT, || ctr.fifo_text("init-stdout") == want);
    report.check(
        "pod container",
        if joined.is_empty() && seen {
            Ok(format!(
                "pid {task_pid}: hostname {hostname}, pid 1 the holder, same netns, the pod's sysctls, \
                 its eth0 ({POD_MAC}, {POD_ADDRESS}) reaching the peer"
            ))
        } else {
            Err(format!(
                "namespaces not shared: {joined:?}; output {:?}",
                ctr.fifo_text("init-stdout")
            ))
        },
    );

    report.check("sandbox metrics", sandbox_metrics(&api, &id));

    if kill_shim {
        return killed_shim(pg, &api, pid, task_pid, config.in_vm, report);
    }

    // containerd restarts: a new connection, task `Connect` by the sandbox's id, status.
    drop(api);
    let api = connect("reconnect", report)?;
    let r = api
        .call::<_, ConnectResponse>(
            "Connect",
            &ConnectRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| describe(&e))
        .and_then(|c| {
            pg.set_shim_pid(c.shim_pid);
            match c.task_pid == pid {
                true => Ok(format!(
                    "shim pid {}, sandbox pid {}",
                    c.shim_pid, c.task_pid
                )),
                false => Err(format!("task_pid {} for the sandbox", c.task_pid)),
            }
        });
    report.check("reconnect", r);
    ready(&api, "status after reconnect", report);

    // StopPodSandbox: the container first, then StopSandbox with no timeout.
    let killed = task
        .call::<_, Empty>(
            "Kill",
            &KillRequest {
                id: ctr.id.clone(),
                signal: 9,
                ..Default::default()
            },
        )
        .and_then(|_| {
            task.call::<_, WaitResponse>(
                "Wait",
                &WaitRequest {
                    id: ctr.id.clone(),
                    ..Default::default()
                },
            )
        })
        .map_err(|e| describe(&e));
    if killed.is_ok() {
        report.check("stats after exit", stats_after_exit(&task, &ctr.id));
    }
    let killed = killed.and_then(|_| {
        task.call::<_, DeleteResponse>(
            "Delete",
            &DeleteRequest {
                id: ctr.id.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| describe(&e))
    });
    report.check(
        "container gone",
        killed.map(|d| format!("exit {}", d.exit_status)),
    );
    drop(task);
    let stop = StopSandboxRequest {
        sandbox_id: id.clone(),
        ..Default::default()
    };
    let stopped = sandbox_call::<_, StopSandboxResponse>(&api, "StopSandbox", &stop);
    report.check("stop sandbox", stopped.map(|_| "stopped".into()));
    let w = waited
        .recv_timeout(EXIT_TIMEOUT)
        .map_err(|_| "WaitSandbox not answered after StopSandbox".to_string())
        .and_then(|r| r)
        .and_then(|w| match w.exited_at.is_some() {
            true => Ok(format!("exit status {}", w.exit_status)),
            false => Err("no exited_at".into()),
        });
    report.check("wait sandbox", w);
    let status = sandbox_call::<_, SandboxStatusResponse>(&api, "SandboxStatus", &status_req)
        .and_then(|s| match (s.state.as_str(), s.exited_at.is_some()) {
            (sandbox_state::NOT_READY, true) => Ok(s.state),
            _ => Err(format!("{:?}, exited_at {:?}", s.state, s.exited_at)),
        });
    report.check("status after stop", status);
    report.check(
        "holder gone",
        match config.in_vm || wait_until(EXIT_TIMEOUT, || !process_alive(pid)) {
            true if config.in_vm => Ok(format!("pid {pid} in the VM: not ready above")),
            true => Ok(format!("pid {pid}")),
            false => Err(format!("pid {pid} still alive")),
        },
    );

    // RemovePodSandbox: ShutdownSandbox; the shim exits; the connection's close runs `delete`.
    shut_down(pg, api, &id, netns, report)
}

/// ShutdownSandbox, the shim's exit, then the `delete` action, as containerd releases a
/// sandbox (RemovePodSandbox, or a failed start).
fn shut_down(
    pg: &Playground,
    api: TaskApi,
    id: &str,
    netns: &NetNs,
    report: &mut Report,
) -> Option<()> {
    let shim = pg.shim_pid().or_else(|| pg.daemon_pid());
    let shut = sandbox_call::<_, ShutdownSandboxResponse>(
        &api,
        "ShutdownSandbox",
        &ShutdownSandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        },
    );
    report.check("shutdown sandbox", shut.map(|_| "shut down".into()));
    report.check(
        "shim exits",
        match shim {
            None => Err("the shim's pid is unknown".into()),
            Some(shim) if wait_until(EXIT_TIMEOUT, || !process_alive(shim)) => {
                Ok(format!("pid {shim}"))
            }
            Some(shim) => Err(format!("shim {shim} still alive")),
        },
    );
    report.check("netns as CNI left it", netns_as_cni_left_it(netns));
    drop(api);
    delete_action(pg, report)
}

/// The pod's namespace once its sandbox is gone: CNI's `eth0` still there, and nothing of a
/// VM's (its tap, the `tc` redirects) for CNI's DEL to trip on.
fn netns_as_cni_left_it(netns: &NetNs) -> Result<String, String> {
    let run = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &netns.0])
            .args(args)
            .output()
            .map_err(|e| format!("ip netns exec: {e}"))?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    };
    let links = run(&["ip", "-o", "link", "show"])?;
    let qdiscs = run(&["tc", "qdisc", "show", "dev", "eth0"])?;
    let tap = shim_vm::network::TAP_NAME;
    if !links.contains("eth0") {
        Err(format!("eth0 is gone: {links}"))
    } else if links.contains(tap) || qdiscs.contains("ingress") {
        Err(format!("left: {links}{qdiscs}"))
    } else {
        Ok(format!("eth0, no {tap}, no ingress qdisc"))
    }
}

/// The shim SIGKILLed under a running pod: containerd's `delete` action must stop the holder
/// (and with it the pod's processes, which die with their PID namespace's init).
fn killed_shim(
    pg: &Playground,
    api: &TaskApi,
    pid: u32,
    task_pid: u32,
    in_vm: bool,
    report: &mut Report,
) -> Option<()> {
    let shim = api
        .call::<_, ConnectResponse>(
            "Connect",
            &ConnectRequest {
                id: pg.id.clone(),
                ..Default::default()
            },
        )
        .map(|c| c.shim_pid)
        .map_err(|e| report.check("kill shim", Err(describe(&e))))
        .ok()?;
    pg.set_shim_pid(shim);
    // SAFETY: plain kill(2) of the pid the shim reported as its own.
    unsafe { libc::kill(shim as i32, libc::SIGKILL) };
    let dead = wait_until(EXIT_TIMEOUT, || !process_alive(shim));
    // What the shim leaves running: the holder and the container, or in a VM, QEMU and its
    // helpers, which stay in the shim's session (their command lines name the shim's
    // runtime directory, which the runner cannot know).
    let (what, left): (String, Box<dyn Fn() -> bool>) = if in_vm {
        (
            "its VM".into(),
            Box::new(move || !children_of(shim).is_empty()),
        )
    } else {
        (
            format!("holder {pid} and container {task_pid}"),
            Box::new(move || process_alive(pid) || process_alive(task_pid)),
        )
    };
    let there = left();
    report.check(
        "kill shim",
        match (dead, there) {
            (true, true) => Ok(format!("shim {shim} gone, {what} still there")),
            _ => Err(format!("shim dead {dead}, {what} left {there}")),
        },
    );
    delete_action(pg, report)?;
    let gone = wait_until(EXIT_TIMEOUT, || !left());
    report.check(
        "pod stopped by delete",
        match gone {
            true => Ok(format!("{what} gone")),
            false => Err(format!("{what} still there")),
        },
    );
    Some(())
}

/// The processes of the session `pid` led: the shim daemon runs in a session of its own,
/// and what it spawned (QEMU, virtiofsd) stays in it after the shim dies.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid pgrp session: comm may hold spaces.
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(3)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn delete_action(pg: &Playground, report: &mut Report) -> Option<()> {
    let r = pg.run_delete_action().and_then(|(out, resp)| match resp {
        Some(d) => Ok(format!("exit status {}", d.exit_status)),
        None => Err(format!("failed: {}", out.stderr)),
    });
    report.check("delete action", r).then_some(())
}

/// An annotation CRI puts on every pod, sent in `CreateSandbox.annotations`.
const ANNOTATION: (&str, &str) = ("io.kubernetes.cri.sandbox-name", "conformance-pod");

/// `StartSandboxResponse.spec` as containerd 2.3's NRI decodes it: an `Any` of the
/// runtime-spec `Spec` type holding JSON, whose namespaces are the sandbox pid's (network and
/// UTS only for a pod with its own netns) and whose annotations are the pod's.
fn check_spec(spec: Option<&Any>, pid: u32, own_netns: bool) -> Result<String, String> {
    let spec = spec.ok_or("no spec: containerd 2.3 logs `type with url : not found`")?;
    if spec.type_url != protocol::type_urls::OCI_SPEC {
        return Err(format!("spec type {:?}", spec.type_url));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&spec.value).map_err(|e| format!("spec is not JSON: {e}"))?;
    let mut kinds: Vec<String> = Vec::new();
    for n in json["linux"]["namespaces"].as_array().into_iter().flatten() {
        let kind = n["type"].as_str().unwrap_or_default();
        let path = n["path"].as_str().unwrap_or_default();
        let file = if kind == "network" { "net" } else { kind };
        if path != format!("/proc/{pid}/ns/{file}") {
            return Err(format!("namespace {kind} at {path:?}"));
        }
        kinds.push(kind.into());
    }
    kinds.sort();
    let want: &[&str] = match own_netns {
        true => &["ipc", "network", "pid", "uts"],
        false => &["ipc", "pid"],
    };
    if kinds != want {
        return Err(format!("namespaces {kinds:?}, want {want:?}"));
    }
    if own_netns && json["annotations"][ANNOTATION.0] != ANNOTATION.1 {
        return Err(format!("annotations {}", json["annotations"]));
    }
    Ok(format!("{} with namespaces {kinds:?}", spec.type_url))
}

/// A verbose `SandboxStatus`'s `info["info"]`, as containerd's CRI decodes it into its
/// `SandboxInfo` (a field of the wrong type fails `PodSandboxStatus`) and `crictl inspectp`
/// shows it.
fn status_info(api: &TaskApi, id: &str, pid: u32) -> Result<String, String> {
    let s: SandboxStatusResponse = sandbox_call(
        api,
        "SandboxStatus",
        &SandboxStatusRequest {
            sandbox_id: id.into(),
            verbose: true,
            ..Default::default()
        },
    )?;
    let text = s.info.get("info").ok_or("no info[\"info\"]")?;
    let info: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("info is not JSON: {e}: {text}"))?;
    for (key, value) in &s.info {
        serde_json::from_str::<serde_json::Value>(value)
            .map_err(|e| format!("info[{key:?}] is not JSON ({e}): crictl would break on it"))?;
    }
    let typed = info["pid"].as_u64() == Some(pid.into())
        && info["processStatus"] == "running"
        && info["netNamespaceClosed"] == false
        && info["runtimeType"]
            .as_str()
            .is_some_and(|t| t.starts_with("io.containerd."))
        && info["runtimeSpec"].is_object()
        && info["sandboxMetadata"]["Version"] == "v1"
        && info["sandboxMetadata"]["Metadata"]["ID"] == id
        && info["sandboxMetadata"]["Metadata"]["Name"] == "pod___0";
    match typed {
        true => Ok(format!(
            "pid {pid}, {}, runtimeType {}, name {}",
            info["processStatus"], info["runtimeType"], info["sandboxMetadata"]["Metadata"]["Name"]
        )),
        false => Err(format!("info {info}")),
    }
}

/// containerd's `shim` sandboxer starts a shim per `CreateSandbox`: a second `start` with
/// the same id reaches the same shim, which must refuse the sandbox it already has.
fn create_again(pg: &Playground, create: &CreateSandboxRequest) -> Result<String, String> {
    let out = pg.run_start(&pg.start_stdin(None))?;
    if !out.success {
        return Err(format!("second start: {}", out.stderr));
    }
    let answer = parse_answer(pg.generation, &out.stdout)?;
    let api = TaskApi::connect(&answer.address, answer.version, &pg.namespace)?;
    refused(&api, "CreateSandbox", create, ttrpc::Code::ALREADY_EXISTS)
        .map(|r| format!("{r} at {}", answer.address))
}

/// A host-network pod (no `netns_path`) beside the first in the same shim: its holder stays
/// in the host's network and UTS namespaces (containerd's own controller gives the pause
/// container neither), with IPC and PID of its own; then it is stopped and released.
fn host_network_sandbox(pg: &Playground, api: &TaskApi, in_vm: bool) -> Result<String, String> {
    let id = format!("{}-hostnet", pg.id);
    let bundle = pg.bundle().with_file_name(&id);
    fs::create_dir_all(&bundle).map_err(|e| format!("create {}: {e}", bundle.display()))?;
    let create = CreateSandboxRequest {
        sandbox_id: id.clone(),
        bundle_path: bundle.display().to_string(),
        options: protobuf::MessageField::some(pod_config("not-used", "", &[])),
        annotations: HashMap::from([(ANNOTATION.0.to_string(), ANNOTATION.1.to_string())]),
        ..Default::default()
    };
    sandbox_call::<_, CreateSandboxResponse>(api, "CreateSandbox", &create)?;
    let started = sandbox_call::<_, StartSandboxResponse>(
        api,
        "StartSandbox",
        &StartSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        },
    );
    let checked = started.and_then(|r| {
        if in_vm {
            // The VM is the pod's host: a host-network pod has the VM's network and a UTS
            // namespace of its own there.
            return check_spec(r.spec.as_ref(), r.pid, true)
                .map(|spec| format!("holder {} in the VM; spec {spec}", r.pid));
        }
        let me = std::process::id();
        let pid = r.pid;
        let host: Vec<&str> = ["net", "uts"]
            .into_iter()
            .filter(|k| ns(pid, k) != ns(me, k))
            .collect();
        let own: Vec<&str> = ["ipc", "pid"]
            .into_iter()
            .filter(|k| ns(pid, k) == ns(me, k))
            .collect();
        if !host.is_empty() || !own.is_empty() {
            return Err(format!(
                "holder {pid}: not in the host's {host:?}, not its own {own:?}"
            ));
        }
        check_spec(r.spec.as_ref(), pid, false)
            .map(|spec| format!("holder {pid} in the host's net and uts; spec {spec}"))
    });
    // Released either way; the shim stays for the first pod.
    let stop = sandbox_call::<_, StopSandboxResponse>(
        api,
        "StopSandbox",
        &StopSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        },
    );
    let shut = sandbox_call::<_, ShutdownSandboxResponse>(
        api,
        "ShutdownSandbox",
        &ShutdownSandboxRequest {
            sandbox_id: id,
            ..Default::default()
        },
    );
    let checked = checked?;
    stop?;
    shut?;
    Ok(checked)
}
