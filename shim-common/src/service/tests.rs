//! The service against test backends: states, event order, waits, exits and stdio.

use super::*;
use crate::backend::ShimContext;

/// A backend with only the required methods, living outside host cgroups.
/// Answers every call; keeps the init's stdio, so that a test can play the process.
#[derive(Default)]
pub(super) struct Minimal(Mutex<Option<ChildStdio>>);

impl Backend for Minimal {
    type Container = ();
    type Options = ();
    fn new(_: &ShimContext) -> Result<Self> {
        Ok(Minimal::default())
    }
    fn host_cgroups(&self) -> bool {
        false
    }
    fn create(&self, req: CreateRequest<'_, ()>) -> Result<crate::Created<()>> {
        *lock(&self.0) = Some(req.stdio);
        Ok(crate::Created {
            container: (),
            pid: Some(4242),
        })
    }
    fn start(&self, _: &()) -> Result<u32> {
        Ok(4242)
    }
    fn exec(&self, _: &(), _: ExecRequest<'_>) -> Result<u32> {
        Ok(4343)
    }
    fn kill(&self, _: &(), _: Target<'_>, _: Signal, _: bool) -> Result<()> {
        Ok(())
    }
    fn pids(&self, _: &()) -> Result<Vec<u32>> {
        Ok(vec![4242])
    }
}

/// A bundle directory for the tests' containers (the SDK keeps their options there).
fn bundle() -> String {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    dir.path().to_str().unwrap().to_string()
}

struct Events(Mutex<Vec<String>>);

impl Publisher for Events {
    fn publish(&self, topic: &str, _: protobuf::well_known_types::any::Any) {
        lock(&self.0).push(topic.to_string());
    }
}

fn service() -> (TaskService<Minimal>, Arc<Events>) {
    let events = Arc::new(Events(Mutex::new(Vec::new())));
    let svc = TaskService::new(
        "ns",
        Minimal::default(),
        events.clone(),
        Box::new(|| {}),
        Exits::reported(),
    )
    .unwrap();
    let create = CreateTaskRequest {
        id: "c1".into(),
        bundle: bundle(),
        ..Default::default()
    };
    svc.inner.create(create).unwrap();
    (svc, events)
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> ttrpc::Code {
    r.unwrap_err().code()
}

#[test]
fn shutdown_waits_for_containers_on_their_way_and_then_refuses_them() {
    let events = Arc::new(Events(Mutex::new(Vec::new())));
    let exits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook = exits.clone();
    let svc = TaskService::new(
        "ns",
        Minimal::default(),
        events,
        Box::new(move || {
            hook.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }),
        Exits::reported(),
    )
    .unwrap();
    let i = &svc.inner;
    let exited = || exits.load(std::sync::atomic::Ordering::SeqCst);
    let join = |id: &str| {
        i.join(ConnectRequest {
            id: id.into(),
            ..Default::default()
        })
    };
    let create = |id: &str| {
        i.create(CreateTaskRequest {
            id: id.into(),
            bundle: bundle(),
            ..Default::default()
        })
    };
    // Announced by `start`: shutdown waits for its Create.
    join("c1").unwrap();
    i.shutdown(ShutdownRequest::default()).unwrap();
    assert_eq!(exited(), 0);
    // A Create in flight holds it too, and its id cannot be created twice meanwhile.
    let in_flight = i.reserve("c1").unwrap();
    assert_eq!(code(create("c1")), ttrpc::Code::ALREADY_EXISTS);
    i.shutdown(ShutdownRequest::default()).unwrap();
    assert_eq!(exited(), 0);
    // It failed: nothing is left, so the shim may go.
    drop(in_flight);
    i.shutdown(ShutdownRequest::default()).unwrap();
    assert_eq!(exited(), 1);
    // Exiting: `start` and containerd are sent elsewhere.
    assert_eq!(code(join("c2")), ttrpc::Code::FAILED_PRECONDITION);
    assert_eq!(code(create("c2")), ttrpc::Code::FAILED_PRECONDITION);
}

#[test]
fn what_a_backend_leaves_out_answers_unimplemented() {
    let (svc, _) = service();
    let start = StartRequest {
        id: "c1".into(),
        ..Default::default()
    };
    svc.inner.start(start).unwrap();
    assert_eq!(
        code(svc.inner.set_paused("c1", true)),
        ttrpc::Code::UNIMPLEMENTED
    );
    // The refusal left it running, so resume is refused by the SDK itself.
    assert_eq!(
        code(svc.inner.set_paused("c1", false)),
        ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code(svc.inner.backend.stats(&(), 4242)),
        ttrpc::Code::UNIMPLEMENTED
    );
    let resources = protobuf::well_known_types::any::Any {
        value: b"{}".to_vec(),
        ..Default::default()
    };
    let update = UpdateTaskRequest {
        id: "c1".into(),
        resources: MessageField::some(resources),
        ..Default::default()
    };
    assert_eq!(
        code(svc.inner.update(update.clone())),
        ttrpc::Code::UNIMPLEMENTED
    );
    let bad = UpdateTaskRequest {
        resources: MessageField::none(),
        ..update
    };
    assert_eq!(code(svc.inner.update(bad)), ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(
        code(svc.inner.backend.checkpoint(&(), "/x", None)),
        ttrpc::Code::UNIMPLEMENTED
    );
    // ...and what the SDK knows is absent is NotFound, not Unimplemented.
    assert_eq!(
        code(svc.inner.set_paused("nope", true)),
        ttrpc::Code::NOT_FOUND
    );
}

#[test]
fn resize_of_a_process_without_terminal_does_nothing() {
    let (svc, _) = service();
    let req = |exec_id: &str| ResizePtyRequest {
        id: "c1".into(),
        exec_id: exec_id.into(),
        width: 80,
        height: 24,
        ..Default::default()
    };
    svc.inner.resize_pty(req("")).unwrap();
    assert_eq!(
        code(svc.inner.resize_pty(req("nope"))),
        ttrpc::Code::NOT_FOUND
    );
}

#[test]
fn exec_spec_takes_terminal_from_the_request_and_delete_before_start_is_zero() {
    let (svc, events) = service();
    let spec = protobuf::well_known_types::any::Any {
        value: br#"{"args":["sh"],"cwd":"/","terminal":false}"#.to_vec(),
        ..Default::default()
    };
    svc.inner
        .exec(ExecProcessRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            terminal: true,
            spec: MessageField::some(spec),
            ..Default::default()
        })
        .unwrap();
    {
        let cell = svc.inner.cell("c1").unwrap();
        let c = lock(&cell.state);
        let spec: serde_json::Value = serde_json::from_slice(&c.execs["e1"].spec).unwrap();
        assert_eq!(spec["terminal"], true);
        assert_eq!(spec["args"][0], "sh");
    }
    let del = svc
        .inner
        .delete(DeleteRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!((del.pid, del.exit_status), (0, 0));
    assert_eq!(del.exited_at.seconds, -62_135_596_800, "Go's zero time");
    assert!(!lock(&events.0).contains(&topics::TASK_EXIT.to_string()));
}

#[test]
fn lifecycle_events_and_states_in_order() {
    let (svc, events) = service();
    svc.inner
        .start(StartRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    let again = svc.inner.start(StartRequest {
        id: "c1".into(),
        ..Default::default()
    });
    assert_eq!(code(again), ttrpc::Code::FAILED_PRECONDITION);
    let state = svc
        .inner
        .state(StateRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(state.status.enum_value(), Ok(Status::RUNNING));
    let del = svc.inner.delete(DeleteRequest {
        id: "c1".into(),
        ..Default::default()
    });
    assert_eq!(
        code(del),
        ttrpc::Code::FAILED_PRECONDITION,
        "running tasks are not deleted"
    );
    // The reaper is not installed in unit tests: deliver the exit by hand.
    svc.inner.on_exit(Exit {
        pid: 4242,
        status: 3,
        at: std::time::SystemTime::now(),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let req = WaitRequest {
        id: "c1".into(),
        ..Default::default()
    };
    svc.inner
        .wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
    assert_eq!(rx.try_recv().unwrap().unwrap().exit_status, 3);
    svc.inner
        .delete(DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        *lock(&events.0),
        [
            topics::TASK_CREATE,
            topics::TASK_START,
            topics::TASK_EXIT,
            topics::TASK_DELETE
        ]
    );
}
#[test]
fn waits_are_answered_on_exit_and_on_delete_without_a_thread() {
    let (svc, _) = service();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = |tx: std::sync::mpsc::Sender<Result<WaitResponse>>| -> Waiter {
        Box::new(move |r| tx.send(r).unwrap())
    };
    let req = |id: &str| WaitRequest {
        id: id.into(),
        ..Default::default()
    };
    // Created, not started: no answer yet.
    svc.inner.wait_later(req("c1"), waiter(tx.clone()));
    assert!(rx.try_recv().is_err(), "answered before any exit");
    svc.inner
        .start(StartRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    svc.inner.wait_later(req("c1"), waiter(tx.clone()));
    svc.inner.on_exit(Exit {
        pid: 4242,
        status: 7,
        at: std::time::SystemTime::now(),
    });
    for _ in 0..2 {
        assert_eq!(rx.try_recv().unwrap().unwrap().exit_status, 7);
    }
    // After the exit: answered at once.
    svc.inner.wait_later(req("c1"), waiter(tx.clone()));
    assert_eq!(rx.try_recv().unwrap().unwrap().exit_status, 7);
    svc.inner.wait_later(req("nope"), waiter(tx.clone()));
    assert_eq!(code(rx.try_recv().unwrap()), ttrpc::Code::NOT_FOUND);
}

/// The exit waits for the copy: when `Wait` answers, every byte the process wrote is
/// in the log — even though a "child" still holds the pipe open, so no EOF comes.
#[test]
fn wait_answers_only_once_the_output_is_in_its_file() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("c.log");
    let uri = format!("file://{}", log.display());
    let events = Arc::new(Events(Mutex::new(Vec::new())));
    let svc = TaskService::new(
        "ns",
        Minimal::default(),
        events.clone(),
        Box::new(|| {}),
        Exits::reported(),
    )
    .unwrap();
    svc.inner
        .create(CreateTaskRequest {
            id: "c1".into(),
            bundle: bundle(),
            stdout: uri,
            ..Default::default()
        })
        .unwrap();
    svc.inner
        .start(StartRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    let stdout = lock(&svc.inner.backend.0)
        .take()
        .and_then(|s| s.stdout)
        .unwrap();
    let _child_holds_it = stdout.try_clone().unwrap();
    // 4 MiB through a 64 KiB pipe: when this returns, the last of it is still in the pipe.
    let data = vec![b'x'; 4 << 20];
    std::fs::File::from(stdout).write_all(&data).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    svc.inner.on_exit(Exit {
        pid: 4242,
        status: 0,
        at: std::time::SystemTime::now(),
    });
    let req = WaitRequest {
        id: "c1".into(),
        ..Default::default()
    };
    svc.inner
        .wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
    let waited = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    assert_eq!(waited.unwrap().exit_status, 0);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), data.len() as u64);
    assert!(lock(&events.0).contains(&topics::TASK_EXIT.to_string()));
}

#[test]
fn delete_answers_pending_waits() {
    let (svc, _) = service();
    let (tx, rx) = std::sync::mpsc::channel();
    let req = WaitRequest {
        id: "c1".into(),
        ..Default::default()
    };
    svc.inner.wait_later(
        req,
        Box::new(move |r: Result<WaitResponse>| tx.send(r).unwrap()),
    );
    svc.inner
        .delete(DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(code(rx.try_recv().unwrap()), ttrpc::Code::NOT_FOUND);
}

/// A backend whose processes are not host children (a VM's guest): it reports their
/// exits itself. The exec started with `e-quick` exits before `exec` returns.
struct Guest {
    exits: crate::reaper::ExitSink,
}

impl Backend for Guest {
    type Container = ();
    type Options = ();
    const MOUNTS_ROOTFS: bool = false;
    const HOST_PROCESSES: bool = false;
    fn new(ctx: &ShimContext) -> Result<Self> {
        Ok(Guest {
            exits: ctx.exits.clone(),
        })
    }
    fn host_cgroups(&self) -> bool {
        false
    }
    fn create(&self, _: CreateRequest<'_, ()>) -> Result<crate::Created<()>> {
        Ok(crate::Created {
            container: (),
            pid: Some(10),
        })
    }
    fn start(&self, _: &()) -> Result<u32> {
        Ok(10)
    }
    fn exec(&self, _: &(), req: ExecRequest<'_>) -> Result<u32> {
        if req.exec_id == "e-quick" {
            self.exits.report(12, 5);
            return Ok(12);
        }
        Ok(11)
    }
    fn kill(&self, _: &(), _: Target<'_>, _: Signal, _: bool) -> Result<()> {
        Ok(())
    }
    fn pids(&self, _: &()) -> Result<Vec<u32>> {
        Ok(vec![10])
    }
}

/// Topics, with the process id of each `TaskExit`.
struct Exited(Mutex<Vec<String>>);

impl Publisher for Exited {
    fn publish(&self, topic: &str, event: protobuf::well_known_types::any::Any) {
        let entry = match topic {
            topics::TASK_EXIT => {
                let exit = TaskExit::parse_from_bytes(&event.value).unwrap();
                format!("{topic} {}", exit.id)
            }
            _ => topic.to_string(),
        };
        lock(&self.0).push(entry);
    }
}

#[test]
fn exits_a_backend_reports_are_applied_like_reaped_ones() {
    let exits = Exits::reported();
    let ctx = ShimContext {
        namespace: "ns".into(),
        id: "c1".into(),
        bundle: bundle(),
        debug: false,
        address: String::new(),
        exits: exits.sink(),
    };
    let sink = ctx.exits.clone();
    let events = Arc::new(Exited(Mutex::new(Vec::new())));
    let backend = Guest::new(&ctx).unwrap();
    let svc = TaskService::new("ns", backend, events.clone(), Box::new(|| {}), exits).unwrap();
    let i = &svc.inner;
    i.create(CreateTaskRequest {
        id: "c1".into(),
        bundle: bundle(),
        ..Default::default()
    })
    .unwrap();
    let start = |exec_id: &str| {
        i.start(StartRequest {
            id: "c1".into(),
            exec_id: exec_id.into(),
            ..Default::default()
        })
    };
    start("").unwrap();
    let spec = protobuf::well_known_types::any::Any {
        value: br#"{"args":["sh"],"cwd":"/"}"#.to_vec(),
        ..Default::default()
    };
    for exec_id in ["e1", "e-quick"] {
        i.exec(ExecProcessRequest {
            id: "c1".into(),
            exec_id: exec_id.into(),
            spec: MessageField::some(spec.clone()),
            ..Default::default()
        })
        .unwrap();
        start(exec_id).unwrap();
    }
    let wait = |exec_id: &str| {
        let (tx, rx) = std::sync::mpsc::channel();
        let req = WaitRequest {
            id: "c1".into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        i.wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
        rx
    };
    let long = std::time::Duration::from_secs(10);
    // Exited before `exec` returned its pid: kept, and applied after its start.
    let quick = wait("e-quick").recv_timeout(long).unwrap().unwrap();
    assert_eq!(quick.exit_status, 5);
    // The init goes first, yet its exit waits for its exec's.
    let init = wait("");
    sink.report(10, 9);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(init.try_recv().is_err(), "init's exit before its exec's");
    sink.report(11, 0);
    assert_eq!(init.recv_timeout(long).unwrap().unwrap().exit_status, 9);
    assert_eq!(
        wait("e1").recv_timeout(long).unwrap().unwrap().exit_status,
        0
    );
    let exit = |id: &str| format!("{} {id}", topics::TASK_EXIT);
    let seen = lock(&events.0).clone();
    let at = |entry: &str| seen.iter().position(|e| e == entry).unwrap();
    assert!(at(topics::TASK_START) < at(&exit("e-quick")));
    assert!(at(&exit("e1")) < at(&exit("c1")), "{seen:?}");
    assert_eq!(seen.last(), Some(&exit("c1")));
}

/// A backend that carries its processes' stdio itself: keeps what it was given.
#[derive(Default)]
struct Carrier {
    given: Mutex<Vec<(bool, bool, CarriedStdio)>>,
    closed: Mutex<Vec<String>>,
}

impl Backend for Carrier {
    type Container = ();
    type Options = ();
    const MOUNTS_ROOTFS: bool = false;
    const HOST_STDIO: bool = false;
    fn new(_: &ShimContext) -> Result<Self> {
        Ok(Carrier::default())
    }
    fn host_cgroups(&self) -> bool {
        false
    }
    fn create(&self, req: CreateRequest<'_, ()>) -> Result<crate::Created<()>> {
        let host_fds = req.stdio.stdin.is_some() || req.stdio.stdout.is_some();
        let carried = req.carried.unwrap();
        lock(&self.given).push((host_fds, req.console_socket.is_some(), carried));
        Ok(crate::Created {
            container: (),
            pid: Some(20),
        })
    }
    fn start(&self, _: &()) -> Result<u32> {
        Ok(20)
    }
    fn exec(&self, _: &(), _: ExecRequest<'_>) -> Result<u32> {
        Ok(21)
    }
    fn kill(&self, _: &(), _: Target<'_>, _: Signal, _: bool) -> Result<()> {
        Ok(())
    }
    fn pids(&self, _: &()) -> Result<Vec<u32>> {
        Ok(vec![20])
    }
    fn close_io(&self, _: &(), exec_id: &str) -> Result<()> {
        lock(&self.closed).push(exec_id.to_string());
        Ok(())
    }
}

/// Nothing is opened on the host (the fifos do not even exist, and a terminal gets no
/// console socket); the backend gets the paths, and the exit waits for its copy.
#[test]
fn a_backend_carrying_stdio_gets_the_paths_and_the_exit_waits_for_its_copy() {
    let events = Arc::new(Events(Mutex::new(Vec::new())));
    let svc = TaskService::new(
        "ns",
        Carrier::default(),
        events,
        Box::new(|| {}),
        Exits::reported(),
    )
    .unwrap();
    let i = &svc.inner;
    i.create(CreateTaskRequest {
        id: "c1".into(),
        bundle: bundle(),
        stdin: "/nonexistent/stdin".into(),
        stdout: "/nonexistent/stdout".into(),
        terminal: true,
        ..Default::default()
    })
    .unwrap();
    let (host_fds, console_socket, carried) = lock(&i.backend.given).pop().unwrap();
    assert!(!host_fds && !console_socket);
    assert_eq!(carried.paths.stdout, "/nonexistent/stdout");
    assert!(carried.paths.terminal);
    i.start(StartRequest {
        id: "c1".into(),
        ..Default::default()
    })
    .unwrap();
    i.close_io(CloseIORequest {
        id: "c1".into(),
        stdin: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(*lock(&i.backend.closed), [""]);
    let stdout = carried.copying();
    i.on_exit(Exit {
        pid: 20,
        status: 1,
        at: std::time::SystemTime::now(),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let req = WaitRequest {
        id: "c1".into(),
        ..Default::default()
    };
    i.wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        rx.try_recv().is_err(),
        "answered before the output was delivered"
    );
    drop(stdout);
    let waited = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(waited.unwrap().exit_status, 1);
}

/// A backend whose processes are elsewhere (exits reported) and whose `start` of pid 10,
/// `pause`, and `delete` of pid 20 each say they began and then wait for the test's word.
struct Gated {
    began: Mutex<std::sync::mpsc::Sender<&'static str>>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Gated {
    fn gate(&self, call: &'static str) {
        lock(&self.began).send(call).unwrap();
        // Bounded, so that a failing test ends rather than waits here for ever.
        let _ = lock(&self.go).recv_timeout(Duration::from_secs(10));
    }
}

impl Backend for Gated {
    /// The init's pid: 10 for c1, 20 for c2, 30 for c3.
    type Container = u32;
    type Options = ();
    const MOUNTS_ROOTFS: bool = false;
    const HOST_PROCESSES: bool = false;
    fn new(_: &ShimContext) -> Result<Self> {
        unreachable!("built by the test")
    }
    fn host_cgroups(&self) -> bool {
        false
    }
    fn create(&self, req: CreateRequest<'_, ()>) -> Result<crate::Created<u32>> {
        let pid = 10 * req.id[1..].parse::<u32>().unwrap();
        Ok(crate::Created {
            container: pid,
            pid: Some(pid),
        })
    }
    fn start(&self, pid: &u32) -> Result<u32> {
        if *pid == 10 {
            self.gate("start");
        }
        Ok(*pid)
    }
    fn pause(&self, _: &u32) -> Result<()> {
        self.gate("pause");
        Ok(())
    }
    fn resume(&self, _: &u32) -> Result<()> {
        Ok(())
    }
    fn delete(&self, pid: &u32) -> Result<()> {
        if *pid == 20 {
            self.gate("delete");
        }
        Ok(())
    }
    fn kill(&self, _: &u32, _: Target<'_>, _: Signal, _: bool) -> Result<()> {
        Ok(())
    }
    fn pids(&self, pid: &u32) -> Result<Vec<u32>> {
        Ok(vec![*pid])
    }
}

/// No container's lock is held across a backend's `start`, `pause` or `delete`: while one
/// runs, `State` of that container answers and conflicting calls are refused at once; an
/// exit reaped during the start is published after the start event.
#[test]
fn slow_backend_calls_do_not_hold_their_container() {
    let exits = Exits::reported();
    let sink = exits.sink();
    let (began_tx, began) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let backend = Gated {
        began: Mutex::new(began_tx),
        go: Mutex::new(go_rx),
    };
    let events = Arc::new(Exited(Mutex::new(Vec::new())));
    let svc = TaskService::new("ns", backend, events.clone(), Box::new(|| {}), exits).unwrap();
    let i = &svc.inner;
    for id in ["c1", "c2", "c3"] {
        i.create(CreateTaskRequest {
            id: id.into(),
            bundle: bundle(),
            ..Default::default()
        })
        .unwrap();
    }
    let start = |id: &str| {
        i.start(StartRequest {
            id: id.into(),
            ..Default::default()
        })
    };
    let status = |id: &str| {
        let req = StateRequest {
            id: id.into(),
            ..Default::default()
        };
        i.state(req).map(|s| s.status.enum_value_or_default())
    };
    let delete = |id: &str| {
        i.delete(DeleteRequest {
            id: id.into(),
            ..Default::default()
        })
    };
    let wait = |id: &str| {
        let (tx, rx) = std::sync::mpsc::channel();
        let req = WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        i.wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
        rx
    };
    let long = Duration::from_secs(10);
    start("c2").unwrap();
    start("c3").unwrap();
    std::thread::scope(|s| {
        // c1's start in flight: State answers, a second start and a delete are refused,
        // and its init's exit waits for the start event.
        let starting = s.spawn(|| start("c1"));
        assert_eq!(began.recv_timeout(long).unwrap(), "start");
        assert_eq!(status("c1").unwrap(), Status::CREATED);
        let again = start("c1").unwrap_err().to_string();
        assert!(again.contains("container c1 is starting"), "{again}");
        assert_eq!(code(delete("c1")), ttrpc::Code::FAILED_PRECONDITION);
        let c3 = wait("c3");
        sink.report(10, 3);
        sink.report(30, 0);
        // One exits thread, in order: once c3's exit is answered, c1's was handled.
        c3.recv_timeout(long).unwrap().unwrap();
        assert!(!lock(&events.0).iter().any(|e| e == "/tasks/exit c1"));
        go.send(()).unwrap();
        assert_eq!(starting.join().unwrap().unwrap().pid, 10);
        assert_eq!(
            wait("c1").recv_timeout(long).unwrap().unwrap().exit_status,
            3
        );
        let c1: Vec<_> = lock(&events.0)
            .iter()
            .filter(|e| ["/tasks/start", "/tasks/exit c1"].contains(&e.as_str()))
            .cloned()
            .collect();
        assert_eq!(
            c1.last().map(String::as_str),
            Some("/tasks/exit c1"),
            "{c1:?}"
        );

        // c2's pause in flight: State answers, a second pause and a resume are refused.
        let pausing = s.spawn(|| i.set_paused("c2", true));
        assert_eq!(began.recv_timeout(long).unwrap(), "pause");
        assert_eq!(status("c2").unwrap(), Status::RUNNING);
        let again = i.set_paused("c2", true).unwrap_err().to_string();
        assert!(again.contains("container c2 is pausing"), "{again}");
        assert_eq!(
            code(i.set_paused("c2", false)),
            ttrpc::Code::FAILED_PRECONDITION
        );
        go.send(()).unwrap();
        pausing.join().unwrap().unwrap();
        assert_eq!(status("c2").unwrap(), Status::PAUSED);
        assert_eq!(code(delete("c2")), ttrpc::Code::FAILED_PRECONDITION);
        i.set_paused("c2", false).unwrap();
        let c2 = wait("c2");
        sink.report(20, 0);
        c2.recv_timeout(long).unwrap().unwrap();

        // c2's delete in flight: State answers, a second delete is refused.
        let deleting = s.spawn(|| delete("c2"));
        assert_eq!(began.recv_timeout(long).unwrap(), "delete");
        assert_eq!(status("c2").unwrap(), Status::STOPPED);
        let twice = delete("c2").unwrap_err().to_string();
        assert!(twice.contains("container c2 is being deleted"), "{twice}");
        go.send(()).unwrap();
        deleting.join().unwrap().unwrap();
        assert_eq!(code(status("c2")), ttrpc::Code::NOT_FOUND);
    });
    let topics: Vec<_> = lock(&events.0).clone();
    let paused = topics.iter().position(|e| e == "/tasks/paused").unwrap();
    let resumed = topics.iter().position(|e| e == "/tasks/resumed").unwrap();
    assert!(paused < resumed, "{topics:?}");
}

#[test]
fn the_request_id_is_field_1_of_task_and_sandbox_requests_wherever_it_is_on_the_wire() {
    let create = CreateTaskRequest {
        id: "c1".into(),
        bundle: "/run/b".into(),
        terminal: true,
        ..Default::default()
    };
    assert_eq!(request_id(&create.write_to_bytes().unwrap()), "c1");
    let kill = KillRequest {
        id: "c2".into(),
        exec_id: "e1".into(),
        signal: 9,
        ..Default::default()
    };
    assert_eq!(request_id(&kill.write_to_bytes().unwrap()), "c2");
    let stop = protocol::sandbox::StopSandboxRequest {
        sandbox_id: "pod".into(),
        timeout_secs: 3,
        ..Default::default()
    };
    assert_eq!(request_id(&stop.write_to_bytes().unwrap()), "pod");
    // Field 2 (exec_id "x") and a varint field before field 1: skipped.
    assert_eq!(request_id(b"\x12\x01x\x20\x09\x0a\x02id"), "id");
    assert_eq!(request_id(b""), "");
    assert_eq!(request_id(b"\xff\xff\xff"), "");
}
