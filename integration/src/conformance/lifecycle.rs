//! One container's whole life, walked as containerd of one generation walks it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::Enum;
use protocol::shim::{
    ConnectRequest, ConnectResponse, CreateTaskResponse, DeleteRequest, DeleteResponse,
    ExecProcessRequest, KillRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, WaitRequest, WaitResponse,
};

use super::events::ForwardedEvent;
use super::generation::{parse_answer, Generation};
use super::layers::check_layers;
use super::playground::{process_alive, Playground};
use super::report::{Report, Step};
use super::task_api::{describe, TaskApi};
use crate::checks::wait_until;

/// What to run: which shim, as which containerd, with which options.
#[derive(Debug, Clone)]
pub struct Config {
    pub shim: PathBuf,
    pub generation: Generation,
    /// The runtime options `Any` containerd would pass (stdin of `start` and `Create`).
    pub runtime_options: Option<Any>,
    /// Container id; runc state is host-wide, so make it unique.
    pub id: String,
    /// Play a daemon that has only its ttrpc socket, as containerd-compatible daemons and
    /// shim test tools do: `-address` and `GRPC_ADDRESS` name the socket its events service
    /// listens on, which speaks no gRPC.
    pub one_socket: bool,
    /// The shim runs pods in VMs: the pids it reports are guest pids, which the host's
    /// `/proc` knows nothing of (the sandbox walk checks from inside instead).
    pub in_vm: bool,
    /// How containerd hands over the container's root filesystem.
    pub rootfs: RootfsLayout,
}

/// How the playground hands a container its root filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RootfsLayout {
    /// A host directory in the spec's `root.path`, no mounts (containerd with no snapshotter).
    #[default]
    HostDir,
    /// Image files, as containerd's EROFS snapshotter in block mode hands them over: the
    /// busybox layer as `layer.erofs` (`ro,loop`), a writable ext4 `rwlayer.img` the shim
    /// makes (`mkfs/ext4`, `rw,loop`), and an overlay of the two whose paths are templates
    /// (`format/mkdir/overlay`). The init writes `/layered` into it.
    Layered,
}

impl std::str::FromStr for RootfsLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dir" => Ok(RootfsLayout::HostDir),
            "layered" => Ok(RootfsLayout::Layered),
            other => Err(format!(
                "unknown rootfs layout {other:?} (want dir or layered)"
            )),
        }
    }
}

pub(super) const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// The namespace the runner plays in (runc keeps its state under `/run/containerd/runc/<ns>`).
pub const NAMESPACE: &str = "conformance";

/// Name prefix of a playground's directory (under the temp dir); the sweep of leftovers
/// finds dead runs' directories by it.
pub const DIR_PREFIX: &str = "shim-conformance-";

/// Walks one container through its whole life as containerd of `config.generation` would,
/// recording a [`Step`] per check. Never panics; a failed step ends the walk where going on
/// makes no sense, and [`Playground`]'s drop cleans up.
pub fn run_lifecycle(config: &Config) -> Report {
    let mut report = Report::default();
    let pg = match Playground::new(&config.shim, config.generation, &config.id) {
        Ok(mut pg) => {
            if config.one_socket {
                pg.containerd_address = pg.ttrpc_address.clone();
            }
            pg
        }
        Err(e) => {
            report.check("setup", Err(e));
            return report;
        }
    };
    if config.rootfs == RootfsLayout::Layered {
        if let Err(e) = pg.use_layered_rootfs() {
            report.check("setup", Err(e));
            return report;
        }
    }
    report.check(
        "setup",
        Ok(format!(
            "bundle {} rootfs {} ({:?}) events {}",
            pg.bundle().display(),
            pg.rootfs().display(),
            config.rootfs,
            pg.ttrpc_address
        )),
    );
    let walked = walk(&pg, config, &mut report);
    if !walked {
        let log = pg.shim_log();
        if !log.trim().is_empty() {
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            report.steps.push(Step {
                name: "shim log (tail)".into(),
                ok: true,
                detail: format!("\n    {}", tail.join("\n    ")),
            });
        }
    }
    report
}

fn walk(pg: &Playground, config: &Config, report: &mut Report) -> bool {
    let opts = config.runtime_options.as_ref();
    let id = pg.id.clone();

    // start
    let t = Instant::now();
    let out = match pg.run_start(&pg.start_stdin(opts)) {
        Ok(o) => o,
        Err(e) => return report.check("start", Err(e)),
    };
    if !out.success {
        return report.check(
            "start",
            Err(format!("exit status non-zero: {}", out.stderr)),
        );
    }
    let answer = match parse_answer(pg.generation, &out.stdout) {
        Ok(a) => a,
        Err(e) => return report.check("start", Err(e)),
    };
    report.check(
        "start",
        Ok(format!(
            "{:?} answer, task API v{}, {} in {:?}",
            answer.form,
            answer.version,
            answer.address,
            t.elapsed()
        )),
    );

    pg.set_address(&answer.address);

    // connect
    let api = match TaskApi::connect(&answer.address, answer.version, &pg.namespace) {
        Ok(a) => a,
        Err(e) => return report.check("connect", Err(e)),
    };
    let shim_pid = match api.call::<_, ConnectResponse>(
        "Connect",
        &ConnectRequest {
            id: id.clone(),
            ..Default::default()
        },
    ) {
        Ok(c) => {
            pg.set_shim_pid(c.shim_pid);
            report.check(
                "connect",
                Ok(format!("{} shim pid {}", api.service(), c.shim_pid)),
            );
            c.shim_pid
        }
        Err(e) => return report.check("connect", Err(describe(&e))),
    };

    // create
    let req = match pg.create_request(opts) {
        Ok(r) => r,
        Err(e) => return report.check("create", Err(e)),
    };
    let init_pid = match api.call::<_, CreateTaskResponse>("Create", &req) {
        Ok(r) if r.pid > 0 => {
            report.check("create", Ok(format!("init pid {}", r.pid)));
            r.pid
        }
        Ok(r) => return report.check("create", Err(format!("pid {} from Create", r.pid))),
        Err(e) => return report.check("create", Err(describe(&e))),
    };

    // start
    let start = api.call::<_, StartResponse>(
        "Start",
        &StartRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    let ok = report.check(
        "start task",
        match start {
            Ok(r) if r.pid == init_pid => Ok(format!("pid {}", r.pid)),
            Ok(r) => Err(format!("Start says pid {}, Create said {init_pid}", r.pid)),
            Err(e) => Err(describe(&e)),
        },
    );
    if !ok {
        return false;
    }
    let state = api.call::<_, StateResponse>(
        "State",
        &StateRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    report.check(
        "state",
        match state {
            Ok(s) if s.status.value() == protocol::task::Status::RUNNING.value() => {
                Ok("RUNNING".into())
            }
            Ok(s) => Err(format!("status {:?}, want RUNNING", s.status)),
            Err(e) => Err(describe(&e)),
        },
    );

    // exec
    // containerd passes every non-terminal stdio it has; Go shims open each one given.
    let (exec_out, exec_err) = match (pg.fifo("exec-stdout"), pg.fifo("exec-stderr")) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return report.check("exec", Err(e)),
    };
    let exec_spec = serde_json::json!({
        "args": ["sh", "-c", "echo exec-out; exit 3"],
        "cwd": "/",
        "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
        "user": {"uid": 0, "gid": 0},
    });
    let exec = api.call::<_, Empty>(
        "Exec",
        &ExecProcessRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            stdout: exec_out,
            stderr: exec_err,
            spec: protobuf::MessageField::some(Any {
                type_url: protocol::type_urls::OCI_PROCESS.into(),
                value: exec_spec.to_string().into_bytes(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    if !report.check(
        "exec",
        exec.map(|_| "exec1 added".into()).map_err(|e| describe(&e)),
    ) {
        return false;
    }
    let exec_start = api.call::<_, StartResponse>(
        "Start",
        &StartRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            ..Default::default()
        },
    );
    if !report.check(
        "start exec",
        exec_start
            .map(|r| format!("pid {}", r.pid))
            .map_err(|e| describe(&e)),
    ) {
        return false;
    }
    let wait_exec = api.call::<_, WaitResponse>(
        "Wait",
        &WaitRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            ..Default::default()
        },
    );
    report.check(
        "wait exec",
        match wait_exec {
            Ok(w) if w.exit_status == 3 => Ok("exit status 3".into()),
            Ok(w) => Err(format!("exit status {}, want 3", w.exit_status)),
            Err(e) => Err(describe(&e)),
        },
    );
    let del_exec = api.call::<_, DeleteResponse>(
        "Delete",
        &DeleteRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            ..Default::default()
        },
    );
    report.check(
        "delete exec",
        match del_exec {
            Ok(d) if d.exit_status == 3 => Ok(format!("exit status 3, pid {}", d.pid)),
            Ok(d) => Err(format!("exit status {}, want 3", d.exit_status)),
            Err(e) => Err(describe(&e)),
        },
    );
    report.check(
        "exec output",
        if wait_until(Duration::from_secs(5), || {
            pg.fifo_text("exec-stdout").contains("exec-out")
        }) {
            Ok("\"exec-out\" on its stdout fifo".into())
        } else {
            Err(format!(
                "stdout fifo holds {:?}",
                pg.fifo_text("exec-stdout")
            ))
        },
    );

    // kill, wait, delete of the init
    let kill = api.call::<_, Empty>(
        "Kill",
        &KillRequest {
            id: id.clone(),
            signal: libc::SIGKILL as u32,
            ..Default::default()
        },
    );
    report.check(
        "kill",
        kill.map(|_| "SIGKILL".into()).map_err(|e| describe(&e)),
    );
    let wait = api.call::<_, WaitResponse>(
        "Wait",
        &WaitRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    report.check(
        "wait",
        match wait {
            Ok(w) if w.exit_status == 137 => Ok("exit status 137".into()),
            Ok(w) => Err(format!("exit status {}, want 137", w.exit_status)),
            Err(e) => Err(describe(&e)),
        },
    );
    report.check("stats after exit", stats_after_exit(&api, &id));
    let del = api.call::<_, DeleteResponse>(
        "Delete",
        &DeleteRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    report.check(
        "delete",
        match del {
            Ok(d) if d.exit_status == 137 && d.pid == init_pid => {
                Ok(format!("exit status 137, pid {}", d.pid))
            }
            Ok(d) => Err(format!(
                "exit status {} pid {}, want 137 pid {init_pid}",
                d.exit_status, d.pid
            )),
            Err(e) => Err(describe(&e)),
        },
    );
    report.check(
        "init output",
        if pg.fifo_text("init-stdout").contains("init-out") {
            Ok("\"init-out\" on its stdout fifo".into())
        } else {
            Err(format!(
                "stdout fifo holds {:?}",
                pg.fifo_text("init-stdout")
            ))
        },
    );

    if config.rootfs == RootfsLayout::Layered {
        report.check("layered rootfs", check_layers(pg));
    }

    // events and their order
    report.check("events", check_events(pg, &id));

    // shutdown
    let shutdown = api.call::<_, Empty>(
        "Shutdown",
        &ShutdownRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    // The shim may exit before it answers: a closed connection is a fine answer.
    let answered = match shutdown {
        Ok(_) => Ok(()),
        Err(ttrpc::Error::RpcStatus(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Ok(()),
    };
    drop(api);
    let socket = PathBuf::from(answer.address.trim_start_matches("unix://"));
    report.check(
        "shutdown",
        answered.and_then(|_| {
            if !wait_until(EXIT_TIMEOUT, || !process_alive(shim_pid)) {
                return Err(format!("shim {shim_pid} still running"));
            }
            if !wait_until(Duration::from_secs(5), || !socket.exists()) {
                return Err(format!("socket {} left behind", socket.display()));
            }
            Ok(format!("shim {shim_pid} exited, socket removed"))
        }),
    );

    // the delete action containerd runs for a shim that went away
    let delete_action = pg.run_delete_action();
    report.check(
        "delete action",
        match delete_action {
            Ok((_, Some(d))) if d.exit_status == 137 => {
                Ok(format!("DeleteResponse exit status 137, pid {}", d.pid))
            }
            Ok((_, Some(d))) => Err(format!(
                "DeleteResponse exit status {}, want 137",
                d.exit_status
            )),
            Ok((out, None)) if out.success => Err(format!(
                "stdout is not a DeleteResponse: {:?}",
                String::from_utf8_lossy(&out.stdout)
            )),
            Ok((out, None)) => Err(format!("failed: {}", out.stderr)),
            Err(e) => Err(e),
        },
    );
    report.passed()
}

/// `Stats` of a container whose init has exited and which is not yet deleted: containerd's
/// CRI asks then (its OOM check on a container's exit) and logs "no metrics received" when
/// the shim has none. The Go shim reads the container's cgroup, which lives until delete.
pub fn stats_after_exit(api: &TaskApi, id: &str) -> Result<String, String> {
    let r = api
        .call::<_, StatsResponse>(
            "Stats",
            &StatsRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .map_err(|e| describe(&e))?;
    let stats = r.stats.into_option().ok_or("an answer without stats")?;
    match stats.type_url.as_str() {
        protocol::type_urls::CGROUPS_V1_METRICS | protocol::type_urls::CGROUPS_V2_METRICS => {
            Ok(format!("{} ({} bytes)", stats.type_url, stats.value.len()))
        }
        other => Err(format!("stats of type {other:?}")),
    }
}

/// containerd's order: create < start < exec-added < exec-started < exit(exec) <
/// exit(init) < delete, all in our namespace, each exactly once.
fn check_events(pg: &Playground, id: &str) -> Result<String, String> {
    use protocol::topics::*;
    let want = [
        TASK_CREATE,
        TASK_START,
        TASK_EXEC_ADDED,
        TASK_EXEC_STARTED,
        TASK_EXIT,
        TASK_EXIT,
        TASK_DELETE,
    ];
    // Events are forwarded asynchronously: give the last one a moment.
    wait_until(Duration::from_secs(5), || {
        pg.events.topics(id).iter().any(|t| t == TASK_DELETE)
    });
    let events: Vec<ForwardedEvent> = pg
        .events
        .events()
        .into_iter()
        .filter(|e| e.ids().0 == id)
        .collect();
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    if topics != want {
        return Err(format!("got {topics:?}, want {want:?}"));
    }
    if let Some(e) = events.iter().find(|e| e.namespace != pg.namespace) {
        return Err(format!("{} in namespace {:?}", e.topic, e.namespace));
    }
    let exits: Vec<(String, u32)> = events
        .iter()
        .filter(|e| e.topic == TASK_EXIT)
        .map(|e| {
            let (_, pid_id, status) = e.ids();
            (pid_id, status)
        })
        .collect();
    if exits != [("exec1".to_string(), 3), (id.to_string(), 137)] {
        return Err(format!("exits {exits:?}, want exec1=3 then {id}=137"));
    }
    Ok(topics.join(" < "))
}
