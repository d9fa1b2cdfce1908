//! containerd restarts and crashes around running containers on our shim.

use std::time::Duration;

use integration::checks::{mounts_mentioning, processes_mentioning, runc_state, wait_until};
use integration::fixture::{sleep_in_group, task_pid, task_status, with_our_shims, LONG};
use integration::{unique_id, BUSYBOX_REF};

#[test]
fn containers_survive_a_containerd_restart_and_exits_during_downtime_are_reported() {
    let mut c = with_our_shims();
    let (keep, dies) = (unique_id("keep"), unique_id("dies"));
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &keep, "sleep", "1000"]);
    // Exits with 9 once /go exists, which the test makes while containerd is down.
    c.ctr_ok(&[
        "run",
        "-d",
        BUSYBOX_REF,
        &dies,
        "sh",
        "-c",
        "while [ ! -e /go ]; do sleep 0.05; done; exit 9",
    ]);
    let pid = task_pid(&c, &dies).expect("pid of the container that exits");
    let shims = c.shim_pids();
    assert_eq!(shims.len(), 2);

    c.stop_containerd();
    assert_eq!(c.pid(), None, "containerd is down");
    std::fs::write(format!("/proc/{pid}/root/go"), b"").expect("tell the container to exit");
    // Reaped by its shim (a subreaper): the exit happened, and was collected, while
    // containerd was down.
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    assert!(
        wait_until(LONG, || !proc_dir.exists()),
        "container init {pid} still there"
    );
    assert_eq!(c.shim_pids(), shims, "shims must outlive containerd");
    c.restart_containerd().expect("restart containerd");

    // containerd reconnected to both shims (Connect/State): the running one answers.
    assert_eq!(task_status(&c, &keep).as_deref(), Some("RUNNING"));
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        &keep,
        "echo",
        "still-here",
    ]);
    assert_eq!(out.stdout.trim(), "still-here");
    // The exit that happened while containerd was down is there, with its status.
    assert!(wait_until(LONG, || task_status(&c, &dies).as_deref()
        == Some("STOPPED")));
    let del = c.ctr(&["task", "delete", &dies]);
    assert!(del.stderr.contains("exit code 9"), "{del:?}");
    c.ctr_ok(&["container", "delete", &dies]);

    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &keep]);
    assert!(wait_until(LONG, || task_status(&c, &keep).as_deref()
        == Some("STOPPED")));
    c.ctr_ok(&["task", "delete", &keep]);
    c.ctr_ok(&["container", "delete", &keep]);
    assert!(wait_until(LONG, || c.shim_pids().is_empty()));
}

/// A SIGKILLed shim: containerd cleans up through our `delete` action and nothing of the
/// container remains — no process, mount, cgroup, socket or runc state.
#[test]
fn killed_shim_leaves_no_cgroup_socket_or_state() {
    let c = with_our_shims();
    let id = unique_id("crash");
    // A duration no other test uses, so the leftover check sees only this container.
    let nap = 100_000 + std::process::id();
    c.ctr_ok(&[
        "run",
        "-d",
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        &format!("sleep {nap} & sleep {nap}"),
    ]);
    let shim = c.shim_pids();
    assert_eq!(shim.len(), 1);
    let address = std::fs::read_to_string(
        c.state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(c.namespace())
            .join(&id)
            .join("address"),
    )
    .unwrap();
    let socket = address.trim().trim_start_matches("unix://").to_string();
    let cgroup = format!("/sys/fs/cgroup/pids/{}/{}", c.namespace(), id);
    assert!(std::path::Path::new(&cgroup).exists(), "cgroup {cgroup}");
    unsafe { libc::kill(shim[0], libc::SIGKILL) };
    assert!(
        wait_until(LONG, || task_status(&c, &id).is_none()),
        "task still listed"
    );
    c.ctr_ok(&["container", "delete", &id]);
    assert!(wait_until(LONG, || processes_mentioning(&format!(
        "sleep {nap}"
    ))
    .is_empty()));
    let state = runc_state(c.namespace(), &id);
    assert!(
        wait_until(LONG, || !state.exists()),
        "runc state left: {:?}",
        std::fs::read_dir(&state).map(|d| d.count())
    );
    // containerd runs our `delete` action and unmounts the rootfs while it cleans up the
    // dead shim, which may finish after the task has left its list.
    assert!(
        wait_until(LONG, || mounts_mentioning(&id).is_empty()),
        "mounts left"
    );
    assert!(
        wait_until(LONG, || !std::path::Path::new(&socket).exists()),
        "socket {socket} left"
    );
    assert!(
        wait_until(LONG, || !std::path::Path::new(&cgroup).exists()),
        "cgroup {cgroup} left"
    );
}

/// Events the shim publishes while containerd is down wait for it, and arrive in the order
/// they happened once it is back. containerd stays stopped for 30 s while, through the shim's
/// own socket, an exec exits, a container is paused and resumed, and both containers of the
/// shim exit; containerd's debug log names every event a shim forwards, and the topics tell
/// the five apart. Before, an event was given up after ~10 s of retries, so the first three
/// of the outage were lost.
#[test]
fn events_of_a_30_s_outage_arrive_in_order_when_containerd_returns() {
    use integration::shim_client::{connect, ctx, start_exec};
    use integration::{target_bin_dir, Containerd};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use protocol::shim::*;
    let mut c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .log_level("debug")
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox image");
    let (a, b) = (unique_id("outage"), unique_id("outage"));
    for id in [&a, &b] {
        sleep_in_group(&c, &a, id);
    }
    let shim = connect(&c, &a);
    let exec_pid = start_exec(&shim, &a, "e", &["sleep", "1000"]) as i32;
    let log = c.log_path().to_path_buf();
    let namespace = format!("ns={}", c.namespace());
    // The exec's start is not an event of the outage: it reaches containerd before it stops
    // (on a loaded machine it may take a moment).
    assert!(
        wait_until(LONG, || forwarded(&log, &namespace, 0)
            .iter()
            .any(|t| t == "/tasks/exec-started")),
        "exec-started never forwarded: {:?}",
        forwarded(&log, &namespace, 0)
    );
    let pid_of = |id: &str| {
        let req = StateRequest {
            id: id.into(),
            ..Default::default()
        };
        shim.state(ctx(), &req).unwrap().pid as i32
    };
    let (a_pid, b_pid) = (pid_of(&a), pid_of(&b));
    let wait = |id: &str, exec_id: &str| {
        let req = WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        shim.wait(ctx(), &req).unwrap().exit_status
    };

    c.stop_containerd();
    let mark = std::fs::metadata(c.log_path())
        .map(|m| m.len())
        .unwrap_or(0) as usize;
    kill(Pid::from_raw(exec_pid), Signal::SIGKILL).unwrap();
    assert_eq!(wait(&a, "e"), 137);
    let pause = PauseRequest {
        id: a.clone(),
        ..Default::default()
    };
    shim.pause(ctx(), &pause).unwrap();
    let resume = ResumeRequest {
        id: a.clone(),
        ..Default::default()
    };
    shim.resume(ctx(), &resume).unwrap();
    kill(Pid::from_raw(b_pid), Signal::SIGKILL).unwrap();
    assert_eq!(wait(&b, ""), 137);
    kill(Pid::from_raw(a_pid), Signal::SIGKILL).unwrap();
    assert_eq!(wait(&a, ""), 137);
    // The outage itself: a length of time, not a stand-in for an event.
    std::thread::sleep(Duration::from_secs(30));
    c.restart_containerd().expect("restart containerd");

    let want = [
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/exit",
    ];
    let forwarded = || forwarded(&log, &namespace, mark);
    assert!(
        wait_until(LONG, || forwarded().len() >= want.len()),
        "forwarded after the restart: {:?}",
        forwarded()
    );
    assert_eq!(forwarded(), want);
    for id in [&a, &b] {
        c.ctr_ok(&["task", "delete", id]);
        c.ctr_ok(&["container", "delete", id]);
    }
}

/// The topics of the events containerd's debug `log` says it forwarded for `namespace`
/// (`ns=<name>`), from byte `from` on.
fn forwarded(log: &std::path::Path, namespace: &str, from: usize) -> Vec<String> {
    let log = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&log[from.min(log.len())..])
        .lines()
        .filter(|l| l.contains("msg=\"event forwarded\"") && l.contains(namespace))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("topic="))
                .map(|t| t.trim_matches('"').to_string())
        })
        .collect()
}
