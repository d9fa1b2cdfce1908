//! Event order through a real containerd, including the races containerd's own runc shim
//! regressed on (containerd issues 9103 and 10589), made deterministic with a runc wrapper
//! that delays chosen commands.

use std::path::PathBuf;
use std::time::Duration;

use integration::checks::wait_until;
use integration::events::EventLog;
use integration::fixture::with_our_shims;
use integration::{target_bin_dir, unique_id, Containerd, BUSYBOX_REF};

/// Installs the runc wrapper in the test's directory with `conf`; returns its path.
fn wrapper(c: &Containerd, conf: &str) -> PathBuf {
    let dir = c.dir().join(unique_id("wrap"));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("runc");
    std::fs::copy(target_bin_dir().join("runc-wrapper"), &bin).unwrap();
    std::fs::write(dir.join("runc-wrapper.conf"), conf).unwrap();
    bin
}

/// `ctr run -d` of a sleeping busybox with `runc` as its runtime binary.
fn sleep_detached(c: &Containerd, runc: &std::path::Path, id: &str) {
    sleep_detached_with(c, runc, id, &[]);
}

/// [`sleep_detached`] with more `ctr run` flags.
fn sleep_detached_with(c: &Containerd, runc: &std::path::Path, id: &str, flags: &[&str]) {
    let runc = runc.to_string_lossy();
    let mut args = vec!["run", "-d", "--runc-binary", &runc];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[BUSYBOX_REF, id, "sleep", "1000"]);
    c.ctr_ok(&args);
}

fn task_topics(log: &EventLog, id: &str) -> Vec<String> {
    log.topics(id)
        .into_iter()
        .filter(|t| t.starts_with("/tasks/"))
        .collect()
}

#[test]
fn lifecycle_events_in_order_even_when_the_process_exits_at_once() {
    let c = with_our_shims();
    let log = EventLog::start(&c);
    let ids: Vec<String> = (0..8).map(|_| unique_id("order")).collect();
    for id in &ids {
        c.ctr_ok(&["run", "--rm", BUSYBOX_REF, id, "true"]);
    }
    for id in &ids {
        assert!(
            log.wait_for(id, "/tasks/delete"),
            "no delete event for {id}"
        );
        assert_eq!(
            task_topics(&log, id),
            [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exit",
                "/tasks/delete"
            ],
            "container {id}"
        );
    }
}

/// The exec's process exits while `runc exec` is still running (the wrapper holds it
/// back), so its exit is reaped before the shim knows its pid. It must still be reported,
/// with its own status, after exec-started.
#[test]
fn exec_that_exits_before_its_start_returns() {
    let c = with_our_shims();
    let runc = wrapper(&c, "delay exec 0 400\n");
    let id = unique_id("early");
    let log = EventLog::start(&c);
    sleep_detached(&c, &runc, &id);
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "quick",
        &id,
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.status, 7, "{out:?}");
    let events = log.for_container(&id);
    let exec_topics: Vec<&str> = events
        .iter()
        .filter(|e| e.body["exec_id"] == "quick" || e.body["id"] == "quick")
        .map(|e| e.topic.as_str())
        .collect();
    assert_eq!(
        exec_topics,
        ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    );
    let exit = events.iter().find(|e| e.topic == "/tasks/exit").unwrap();
    assert_eq!(exit.body["exit_status"], 7);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}

/// The init exits while an exec still runs: every exec's exit is published before the
/// init's, so containerd never sees a stopped task with live processes.
#[test]
fn init_exit_is_published_after_exec_exits() {
    let c = with_our_shims();
    let id = unique_id("initlast");
    let log = EventLog::start(&c);
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &id, "sh", "-c", "sleep 2"]);
    for n in 0..3 {
        c.ctr_ok(&[
            "task",
            "exec",
            "-d",
            "--exec-id",
            &format!("long{n}"),
            &id,
            "sleep",
            "1000",
        ]);
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            log.topics(&id)
                .iter()
                .filter(|t| *t == "/tasks/exit")
                .count()
                == 4
        }),
        "expected 3 exec exits and the init's: {:?}",
        log.topics(&id)
    );
    let exits: Vec<String> = log
        .for_container(&id)
        .into_iter()
        .filter(|e| e.topic == "/tasks/exit")
        .map(|e| e.body["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        exits.last().map(String::as_str),
        Some(id.as_str()),
        "{exits:?}"
    );
    let warn = c.ctr(&["task", "delete", &id]).stderr;
    assert!(
        !warn.contains("non-zero"),
        "init exited 0 by itself: {warn}"
    );
}

/// A slow `runc create` (held back by the wrapper) delays everything but reorders nothing.
#[test]
fn slow_create_keeps_order() {
    let c = with_our_shims();
    let runc = wrapper(&c, "delay create 200 300\n");
    let id = unique_id("slow");
    let log = EventLog::start(&c);
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        runc.to_str().unwrap(),
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "exit 4",
    ]);
    assert_eq!(out.status, 4);
    assert!(log.wait_for(&id, "/tasks/delete"));
    assert_eq!(
        task_topics(&log, &id),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let calls = std::fs::read_to_string(runc.with_file_name("runc-calls.log")).unwrap();
    assert!(calls.lines().any(|l| l.contains(" create ")), "{calls}");
}

/// While one exec's `runc exec` is slow (held by the wrapper until the test lets it go),
/// the task's State, the exec's own State and Pids answer at once, and the exec cannot be
/// started twice or deleted; once runc answers, the exec runs. Before, every call on the
/// container waited behind the exec's start (its lock was held across `runc exec`).
#[test]
fn state_answers_while_an_exec_is_starting() {
    use integration::fixture::{wait_status, LONG};
    use integration::shim_client::{code, connect, ctx, process_spec};
    use protocol::shim::{
        DeleteRequest, ExecProcessRequest, KillRequest, PidsRequest, StartRequest, StateRequest,
    };
    use protocol::task::Status;
    let c = with_our_shims();
    let runc = wrapper(&c, "hold exec\n");
    let dir = runc.parent().unwrap().to_path_buf();
    let id = unique_id("slowexec");
    sleep_detached(&c, &runc, &id);
    let shim = connect(&c, &id);
    let exec = ExecProcessRequest {
        id: id.clone(),
        exec_id: "slow".into(),
        spec: protobuf::MessageField::some(process_spec(&["sleep", "1000"])),
        ..Default::default()
    };
    shim.exec(ctx(), &exec).unwrap();
    let start = StartRequest {
        id: id.clone(),
        exec_id: "slow".into(),
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let starter = {
        let (shim, start) = (connect(&c, &id), start.clone());
        std::thread::spawn(move || tx.send(shim.start(ctx(), &start)))
    };
    assert!(
        wait_until(LONG, || dir.join("held-exec").exists()),
        "runc exec never ran"
    );
    // runc exec is held now; each call below fails with a timeout if it waits behind it.
    let state = |exec_id: &str| {
        let req = StateRequest {
            id: id.clone(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        shim.state(ctx(), &req)
            .unwrap_or_else(|e| panic!("State of {exec_id:?} while the exec starts: {e}"))
    };
    assert_eq!(state("").status, Status::RUNNING.into());
    assert_eq!(state("slow").status, Status::CREATED.into());
    let pids = PidsRequest {
        id: id.clone(),
        ..Default::default()
    };
    assert!(!shim.pids(ctx(), &pids).unwrap().processes.is_empty());
    let again = shim.start(ctx(), &start);
    assert_eq!(
        code(&again),
        Some(ttrpc::Code::FAILED_PRECONDITION),
        "{again:?}"
    );
    let delete = DeleteRequest {
        id: id.clone(),
        exec_id: "slow".into(),
        ..Default::default()
    };
    let deleted = shim.delete(ctx(), &delete);
    assert_eq!(
        code(&deleted),
        Some(ttrpc::Code::FAILED_PRECONDITION),
        "{deleted:?}"
    );
    assert!(
        rx.try_recv().is_err(),
        "Start answered while runc exec was still held"
    );
    std::fs::write(dir.join("release-exec"), "").unwrap();
    let started = rx
        .recv_timeout(LONG)
        .expect("Start never answered")
        .unwrap();
    assert!(started.pid > 0);
    starter.join().unwrap().unwrap();
    assert_eq!(state("slow").status, Status::RUNNING.into());
    let kill = KillRequest {
        id: id.clone(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    };
    shim.kill(ctx(), &kill).unwrap();
    wait_status(&c, &id, "STOPPED");
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
}

/// Two containers in one shim. While A is busy in a slow runtime call (`runc resume`, held
/// by the wrapper until the test lets it go), an exec of A exits, and then B's init: B's
/// `Wait` answers before A's resume returns, and so do A's own `State`, its exec's `Wait`
/// and a refused second `Resume`. Before, A's lock was held across `runc resume`: the one
/// exits thread waited for it to apply the exec's exit, and B's exit waited behind it.
#[test]
fn exits_are_applied_while_another_container_is_busy() {
    use integration::fixture::{wait_status, LONG};
    use integration::shim_client::{connect, ctx, start_exec};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use protocol::shim::{PauseRequest, ResumeRequest, StateRequest, WaitRequest};
    use protocol::task::Status;
    let c = with_our_shims();
    let runc = wrapper(&c, "hold resume\n");
    let dir = runc.parent().unwrap().to_path_buf();
    let a = unique_id("busy");
    let b = format!("{a}-b");
    let annotation = format!("io.containerd.runc.v2.group={a}");
    for id in [&a, &b] {
        sleep_detached_with(&c, &runc, id, &["--annotation", &annotation]);
    }
    let shim = connect(&c, &a);
    let exec_pid = start_exec(&shim, &a, "e", &["sleep", "1000"]) as i32;
    let state = StateRequest {
        id: b.clone(),
        ..Default::default()
    };
    let b_pid = shim.state(ctx(), &state).unwrap().pid as i32;
    let pause = PauseRequest {
        id: a.clone(),
        ..Default::default()
    };
    shim.pause(ctx(), &pause).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let resumer = {
        let shim = connect(&c, &a);
        let resume = ResumeRequest {
            id: a.clone(),
            ..Default::default()
        };
        std::thread::spawn(move || tx.send(shim.resume(ctx(), &resume)))
    };
    assert!(
        wait_until(LONG, || dir.join("held-resume").exists()),
        "runc resume never ran"
    );
    // A is thawed and its lock held. Its exec exits first (reaped: gone from /proc)...
    kill(Pid::from_raw(exec_pid), Signal::SIGKILL).unwrap();
    let gone = |pid: i32| !std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(
        wait_until(LONG, || gone(exec_pid)),
        "the exec was not reaped"
    );
    // ...then B's init, whose exit must not wait for A.
    kill(Pid::from_raw(b_pid), Signal::SIGKILL).unwrap();
    let wait = |id: &str, exec_id: &str| {
        let req = WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        shim.wait(ctx(), &req)
            .unwrap_or_else(|e| panic!("Wait of {id} {exec_id:?}: {e}"))
            .exit_status
    };
    assert_eq!(wait(&b, ""), 137);
    // A itself is not held either: its State answers (paused still: the resume has not
    // returned), its exec's exit is applied, and a second Resume is refused at once.
    let a_state = StateRequest {
        id: a.clone(),
        ..Default::default()
    };
    let status = shim.state(ctx(), &a_state).unwrap().status;
    assert_eq!(status.enum_value_or_default(), Status::PAUSED);
    assert_eq!(wait(&a, "e"), 137);
    let again = ResumeRequest {
        id: a.clone(),
        ..Default::default()
    };
    let refused = shim.resume(ctx(), &again).unwrap_err().to_string();
    assert!(refused.contains("is resuming"), "{refused}");
    assert!(
        rx.try_recv().is_err(),
        "Resume answered before B's exit: A was not busy, the test proved nothing"
    );
    std::fs::write(dir.join("release-resume"), "").unwrap();
    rx.recv_timeout(LONG)
        .expect("Resume never answered")
        .unwrap();
    resumer.join().unwrap().unwrap();
    assert_eq!(wait(&a, "e"), 137);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &a]);
    wait_status(&c, &a, "STOPPED");
    for id in [&a, &b] {
        c.ctr_ok(&["task", "delete", id]);
        c.ctr_ok(&["container", "delete", id]);
    }
}
