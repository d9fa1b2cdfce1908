//! containerd restarts and crashes around running containers on our shim.

use std::time::Duration;

use integration::checks::{mounts_mentioning, processes_mentioning, runc_state, wait_until};
use integration::fixture::{task_status, with_our_shims, LONG};
use integration::{unique_id, BUSYBOX_REF};

#[test]
fn containers_survive_a_containerd_restart_and_exits_during_downtime_are_reported() {
    let mut c = with_our_shims();
    let (keep, dies) = (unique_id("keep"), unique_id("dies"));
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &keep, "sleep", "1000"]);
    // Exits with 9 while containerd is down.
    c.ctr_ok(&[
        "run",
        "-d",
        BUSYBOX_REF,
        &dies,
        "sh",
        "-c",
        "sleep 2; exit 9",
    ]);
    let shims = c.shim_pids();
    assert_eq!(shims.len(), 2);

    c.stop_containerd();
    std::thread::sleep(Duration::from_secs(3));
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
