//! The sandbox API against a test backend: order of calls, exits, waits, the daemon's end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use protocol::sandbox::*;
use protocol::sandbox_state;

use super::*;
use crate::backend::ShimContext;
use crate::sandbox::{SandboxCreate, SandboxExit, Sandboxes};

/// A backend whose sandboxes are make-believe processes: pid 5000 + n, ended by `stop`
/// through the [`SandboxExit`] the SDK gave, or by a test through the service's exits.
#[derive(Default)]
struct Pods {
    exits: Mutex<HashMap<String, SandboxExit>>,
    created: Mutex<Vec<String>>,
    shut: Mutex<Vec<String>>,
    /// `stop` does not end the process (a hung sandbox).
    hang: bool,
}

impl Sandboxes for Pods {
    fn create(&self, req: &SandboxCreate<'_>) -> Result<()> {
        if req.id == "refused" {
            return Err(Error::InvalidArgument("refused by the backend".into()));
        }
        lock(&self.created).push(format!(
            "{} {}",
            req.id,
            req.netns
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
        Ok(())
    }
    fn start(&self, id: &str, exit: SandboxExit) -> Result<u32> {
        let mut exits = lock(&self.exits);
        exits.insert(id.to_string(), exit);
        Ok(5000 + exits.len() as u32)
    }
    fn stop(&self, id: &str, _: Duration) -> Result<()> {
        if !self.hang {
            if let Some(exit) = lock(&self.exits).get(id) {
                exit.exited(137);
            }
        }
        Ok(())
    }
    fn shutdown(&self, id: &str) -> Result<()> {
        lock(&self.shut).push(id.to_string());
        Ok(())
    }
}

impl Backend for Pods {
    type Container = ();
    type Options = ();
    fn new(_: &ShimContext) -> Result<Self> {
        Ok(Pods::default())
    }
    fn host_cgroups(&self) -> bool {
        false
    }
    fn create(&self, _: CreateRequest<'_, ()>) -> Result<crate::Created<()>> {
        Ok(crate::Created {
            container: (),
            pid: Some(4242),
        })
    }
    fn start(&self, _: &()) -> Result<u32> {
        Ok(4242)
    }
    fn pids(&self, _: &()) -> Result<Vec<u32>> {
        Ok(vec![])
    }
    fn sandboxes(&self) -> Option<&dyn Sandboxes> {
        Some(self)
    }
}

struct Quiet;

impl Publisher for Quiet {
    fn publish(&self, _: &str, _: protobuf::well_known_types::any::Any) {}
}

fn service(pods: Pods) -> (TaskService<Pods>, Arc<AtomicUsize>) {
    let exited = Arc::new(AtomicUsize::new(0));
    let hook = exited.clone();
    let svc = TaskService::new(
        "ns",
        pods,
        Arc::new(Quiet),
        Box::new(move || {
            hook.fetch_add(1, Ordering::SeqCst);
        }),
        Exits::reported(),
    )
    .unwrap();
    (svc, exited)
}

fn create(id: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        sandbox_id: id.into(),
        bundle_path: "/run/sandboxes/x".into(),
        netns_path: "/var/run/netns/cni-1".into(),
        ..Default::default()
    }
}

fn start(id: &str) -> StartSandboxRequest {
    StartSandboxRequest {
        sandbox_id: id.into(),
        ..Default::default()
    }
}

fn status(inner: &Inner<Pods>, id: &str) -> Result<SandboxStatusResponse> {
    inner.sandbox_status(SandboxStatusRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
}

fn shutdown(inner: &Inner<Pods>, id: &str) -> Result<ShutdownSandboxResponse> {
    inner.shutdown_sandbox(ShutdownSandboxRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
}

/// A `WaitSandbox` whose answer arrives on the returned channel.
fn wait(inner: &Inner<Pods>, id: &str) -> mpsc::Receiver<Result<WaitSandboxResponse>> {
    let (tx, rx) = mpsc::channel();
    let req = WaitSandboxRequest {
        sandbox_id: id.into(),
        ..Default::default()
    };
    inner.wait_sandbox_later(
        req,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> ttrpc::Code {
    r.unwrap_err().code()
}

#[test]
fn a_sandbox_goes_create_start_stop_shutdown_and_then_the_daemon_exits() {
    let (svc, daemon_exits) = service(Pods::default());
    let inner = &svc.inner;
    assert_eq!(
        code(inner.start_sandbox(start("p1"))),
        ttrpc::Code::FAILED_PRECONDITION
    );
    inner.create_sandbox(create("p1")).unwrap();
    assert_eq!(
        lock(&inner.backend.created).as_slice(),
        ["p1 /var/run/netns/cni-1"]
    );
    assert_eq!(
        code(inner.create_sandbox(create("p1"))),
        ttrpc::Code::ALREADY_EXISTS
    );
    let s = status(inner, "p1").unwrap();
    assert_eq!((s.state.as_str(), s.pid), (sandbox_state::NOT_READY, 0));
    assert!(s.created_at.is_none());

    let started = inner.start_sandbox(start("p1")).unwrap();
    assert_eq!(started.pid, 5001);
    assert!(started.created_at.is_some());
    assert_eq!(
        code(inner.start_sandbox(start("p1"))),
        ttrpc::Code::FAILED_PRECONDITION
    );
    let s = status(inner, "p1").unwrap();
    assert_eq!((s.state.as_str(), s.pid), (sandbox_state::READY, 5001));
    assert_eq!(s.sandbox_id, "p1");
    let ping = PingRequest {
        sandbox_id: "p1".into(),
        ..Default::default()
    };
    inner.ping_sandbox(ping.clone()).unwrap();
    let platform = inner
        .platform(PlatformRequest {
            sandbox_id: "p1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(platform.platform.os, "linux");

    // A task's `Shutdown` leaves a shim that holds a sandbox.
    inner.shutdown(ShutdownRequest::default()).unwrap();
    assert_eq!(daemon_exits.load(Ordering::SeqCst), 0);

    let waited = wait(inner, "p1");
    assert!(
        waited.try_recv().is_err(),
        "answered before the sandbox stopped"
    );
    inner
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: "p1".into(),
            timeout_secs: 3,
            ..Default::default()
        })
        .unwrap();
    let w = waited.recv().unwrap().unwrap();
    assert_eq!(w.exit_status, 137);
    assert!(w.exited_at.is_some());
    let s = status(inner, "p1").unwrap();
    assert_eq!(s.state, sandbox_state::NOT_READY);
    assert!(s.exited_at.is_some() && s.created_at.is_some());
    assert_eq!(
        code(inner.ping_sandbox(ping)),
        ttrpc::Code::FAILED_PRECONDITION
    );
    // Stopping again, and waiting after the fact, are answered at once.
    inner
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: "p1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(wait(inner, "p1").recv().unwrap().unwrap().exit_status, 137);

    shutdown(inner, "p1").unwrap();
    assert_eq!(lock(&inner.backend.shut).as_slice(), ["p1"]);
    assert_eq!(code(status(inner, "p1")), ttrpc::Code::NOT_FOUND);
    assert_eq!(daemon_exits.load(Ordering::SeqCst), 1);
}

#[test]
fn a_sandbox_process_that_dies_on_its_own_is_not_ready_and_its_wait_answers() {
    let (svc, daemon_exits) = service(Pods::default());
    let inner = &svc.inner;
    inner.create_sandbox(create("p1")).unwrap();
    let pid = inner.start_sandbox(start("p1")).unwrap().pid;
    let waited = wait(inner, "p1");
    // Reaped by the shim, as a host child is.
    inner.on_exit(Exit {
        pid: pid as i32,
        status: 9,
        at: std::time::SystemTime::now(),
    });
    assert_eq!(waited.recv().unwrap().unwrap().exit_status, 9);
    assert_eq!(status(inner, "p1").unwrap().state, sandbox_state::NOT_READY);
    // Shutdown of a dead sandbox needs no stop.
    shutdown(inner, "p1").unwrap();
    assert_eq!(daemon_exits.load(Ordering::SeqCst), 1);
}

#[test]
fn bad_sandbox_calls_are_refused_and_change_nothing() {
    let (svc, _) = service(Pods::default());
    let inner = &svc.inner;
    for id in ["", "../x", "a/b"] {
        assert_eq!(
            code(inner.create_sandbox(create(id))),
            ttrpc::Code::INVALID_ARGUMENT,
            "{id:?}"
        );
    }
    // A backend's refusal leaves no sandbox: the same id is refused again for that reason.
    for _ in 0..2 {
        assert_eq!(
            code(inner.create_sandbox(create("refused"))),
            ttrpc::Code::INVALID_ARGUMENT
        );
    }
    assert_eq!(code(status(inner, "refused")), ttrpc::Code::NOT_FOUND);
    let stop = inner.stop_sandbox(StopSandboxRequest {
        sandbox_id: "nope".into(),
        ..Default::default()
    });
    assert_eq!(code(stop), ttrpc::Code::NOT_FOUND);
    assert_eq!(code(shutdown(inner, "nope")), ttrpc::Code::NOT_FOUND);
    assert_eq!(
        code(wait(inner, "nope").recv().unwrap()),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(inner.sandbox_metrics(SandboxMetricsRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        })),
        ttrpc::Code::NOT_FOUND
    );

    // Stopped before it was started: nothing runs, the wait is answered, start is refused.
    inner.create_sandbox(create("p2")).unwrap();
    let waited = wait(inner, "p2");
    inner
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: "p2".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(waited.recv().unwrap().unwrap().exit_status, 0);
    assert_eq!(
        code(inner.start_sandbox(start("p2"))),
        ttrpc::Code::FAILED_PRECONDITION
    );
    assert!(lock(&inner.backend.exits).is_empty());
}

#[test]
fn a_sandbox_that_outlives_its_stop_is_still_ready() {
    let (svc, _) = service(Pods {
        hang: true,
        ..Default::default()
    });
    let inner = &svc.inner;
    inner.create_sandbox(create("p1")).unwrap();
    inner.start_sandbox(start("p1")).unwrap();
    // STOP_GRACE bounds this test's length; it asserts the outcome, not the time.
    let stopped = inner.stop_sandbox(StopSandboxRequest {
        sandbox_id: "p1".into(),
        ..Default::default()
    });
    assert_eq!(code(stopped), ttrpc::Code::DEADLINE_EXCEEDED);
    assert_eq!(status(inner, "p1").unwrap().state, sandbox_state::READY);
}

#[test]
fn only_a_backend_with_sandboxes_serves_the_sandbox_api() {
    let with = service(Pods::default()).0.methods();
    let name = format!("/{}/CreateSandbox", protocol::SANDBOX_SERVICE);
    assert!(with.contains_key(&name));
    assert_eq!(
        with.keys()
            .filter(|k| k.starts_with(&format!("/{}/", protocol::SANDBOX_SERVICE)))
            .count(),
        9
    );
    let without = TaskService::new(
        "ns",
        super::tests::Minimal::default(),
        Arc::new(Quiet),
        Box::new(|| {}),
        Exits::reported(),
    )
    .unwrap()
    .methods();
    assert!(!without.contains_key(&name));
}

#[test]
fn a_create_announced_by_start_is_answered_even_when_refused_and_the_daemon_still_exits() {
    let (svc, daemon_exits) = service(Pods::default());
    let inner = &svc.inner;
    inner.create_sandbox(create("p1")).unwrap();
    // A second `start` for the same id finds this shim and announces the sandbox.
    inner
        .join(ConnectRequest {
            id: "p1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        code(inner.create_sandbox(create("p1"))),
        ttrpc::Code::ALREADY_EXISTS
    );
    shutdown(inner, "p1").unwrap();
    assert_eq!(daemon_exits.load(Ordering::SeqCst), 1);
}

#[test]
fn a_verbose_status_tells_containerds_sandbox_info() {
    let (svc, _) = service(Pods::default());
    let inner = &svc.inner;
    inner.create_sandbox(create("p1")).unwrap();
    let pid = inner.start_sandbox(start("p1")).unwrap().pid;
    let s = inner
        .sandbox_status(SandboxStatusRequest {
            sandbox_id: "p1".into(),
            verbose: true,
            ..Default::default()
        })
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&s.info["info"]).unwrap();
    assert_eq!(info["pid"], pid);
    assert_eq!(info["processStatus"], "running");
    // The test's netns path does not exist: containerd's `netNamespaceClosed`.
    assert_eq!(info["netNamespaceClosed"], true);
    assert!(info["runtimeType"].is_string());
    // Not verbose: no info, as containerd's own controller.
    assert!(status(inner, "p1").unwrap().info.is_empty());
}
