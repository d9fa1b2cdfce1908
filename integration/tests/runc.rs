//! `containerd-shim-runc-v2` (ours) driven through a real containerd 1.6 with `ctr`.
//!
//! Every test gets its own private containerd whose PATH puts our `target/` binaries first,
//! so `io.containerd.runc.v2` resolves to our shim.

use std::path::Path;

use sha2::{Digest, Sha256};

use integration::checks::{mounts_mentioning, processes_mentioning, runc_state, wait_until};
use integration::fixture::{
    assert_nothing_left, assert_ours, task_status, wait_status, with_our_shims, LONG,
};
use integration::shim_client::{bundle, code, connect, ctx, process_spec};
use integration::{require_root, target_bin_dir, unique_id, Containerd, BUSYBOX_REF};
use protocol::shim::{DeleteRequest, ExecProcessRequest, PidsRequest, StateRequest, WaitRequest};

/// Nothing of container `id` is left: no shim, no runc state, no mount, no process.
fn assert_gone(c: &Containerd, id: &str) {
    assert_nothing_left(c, id);
    assert!(
        !runc_state(c.namespace(), id).exists(),
        "runc state of {id} left behind"
    );
}

fn run_detached(c: &Containerd, id: &str, args: &[&str]) {
    let mut a = vec!["run", "-d", BUSYBOX_REF, id];
    a.extend_from_slice(args);
    c.ctr_ok(&a);
    assert_ours(c);
}

fn remove(c: &Containerd, id: &str) -> String {
    let out = c.ctr(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
    out.stderr
}

#[test]
fn stdin_reaches_the_process() {
    let c = with_our_shims();
    let id = unique_id("stdin");
    let out = c.ctr_with_stdin(
        &[
            "run",
            "--rm",
            BUSYBOX_REF,
            &id,
            "sh",
            "-c",
            "read l; echo got:$l",
        ],
        b"ping\n",
    );
    assert_eq!(out.stdout.trim(), "got:ping", "stderr={}", out.stderr);
}

#[test]
fn detached_task_dies_by_sigterm_with_its_own_status() {
    let c = with_our_shims();
    let id = unique_id("term");
    // `wait` is interruptible by a trapped signal; the trap's exit code is what we expect back.
    run_detached(
        &c,
        &id,
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; touch /tmp/ready; while true; do sleep 1 & wait $!; done",
        ],
    );
    wait_status(&c, &id, "RUNNING");
    assert!(wait_until(LONG, || c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            &id,
            "test",
            "-e",
            "/tmp/ready"
        ])
        .success()));
    c.ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]);
    wait_status(&c, &id, "STOPPED");
    let warn = remove(&c, &id);
    assert!(warn.contains("exit code 42"), "{warn}");
    assert_gone(&c, &id);
}

/// containerd's `TestDeleteContainerExecCreated`: the Go client's `task.Exec` with null IO,
/// then `process.Delete` without `Start` (ctr cannot do that). containerd's runc shim answers
/// exit status 0, pid 0 and Go's zero time (0001-01-01, the exec never exited), and forgets
/// the exec.
#[test]
fn delete_of_an_exec_never_started() {
    let c = with_our_shims();
    let id = unique_id("execnew");
    run_detached(&c, &id, &["sleep", "1000"]);
    let shim = connect(&c, &id);
    let exec = ExecProcessRequest {
        id: id.clone(),
        exec_id: "never".into(),
        spec: protobuf::MessageField::some(process_spec(&["sh", "-c", "exit 6"])),
        ..Default::default()
    };
    shim.exec(ctx(), &exec).unwrap();
    let delete = DeleteRequest {
        id: id.clone(),
        exec_id: "never".into(),
        ..Default::default()
    };
    let deleted = shim.delete(ctx(), &delete).unwrap();
    assert_eq!(deleted.exit_status, 0, "{deleted:?}");
    assert_eq!(deleted.pid, 0, "{deleted:?}");
    let at = deleted.exited_at.as_ref().expect("exited_at");
    assert_eq!((at.seconds, at.nanos), (-62_135_596_800, 0), "{deleted:?}");
    // Nothing is left of it: unknown to the shim, no process, no file in the bundle.
    let state = StateRequest {
        id: id.clone(),
        exec_id: "never".into(),
        ..Default::default()
    };
    let r = shim.state(ctx(), &state);
    assert_eq!(code(&r), Some(ttrpc::Code::NOT_FOUND), "{r:?}");
    let r = shim.delete(ctx(), &delete);
    assert_eq!(code(&r), Some(ttrpc::Code::NOT_FOUND), "{r:?}");
    let pids = PidsRequest {
        id: id.clone(),
        ..Default::default()
    };
    assert_eq!(shim.pids(ctx(), &pids).unwrap().processes.len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(bundle(&c, &id))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.contains("never"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The id is free again, and the init's exit is not held back by the deleted exec.
    shim.exec(ctx(), &exec).unwrap();
    shim.delete(ctx(), &delete).unwrap();
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let wait = WaitRequest {
        id: id.clone(),
        ..Default::default()
    };
    assert_eq!(shim.wait(ctx(), &wait).unwrap().exit_status, 137);
    remove(&c, &id);
    assert_gone(&c, &id);
}

/// containerd's `TestContainerAttach`: a client writes to an exec's stdin fifo and closes
/// it without `CloseIO` (a detach); a second client opens the fifo again and is read too.
/// Only `CloseIO` ends the input. Before the shim held its own writer of the fifo, the
/// first close was an EOF for the process, and the second open found no reader.
#[test]
fn stdin_is_read_again_after_a_client_reattaches() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let c = with_our_shims();
    let id = unique_id("attach");
    run_detached(&c, &id, &["sleep", "1000"]);
    let shim = connect(&c, &id);
    let stdin = c.dir().join(format!("{id}.stdin"));
    nix::unistd::mkfifo(&stdin, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let log = c.dir().join(format!("{id}.log"));
    let uri = format!("file://{}", log.display());
    let exec = ExecProcessRequest {
        id: id.clone(),
        exec_id: "cat".into(),
        stdin: stdin.to_string_lossy().into(),
        stdout: uri.clone(),
        stderr: uri,
        spec: protobuf::MessageField::some(process_spec(&["cat"])),
        ..Default::default()
    };
    shim.exec(ctx(), &exec).unwrap();
    let (cid, eid) = (id.clone(), "cat".to_string());
    let start = protocol::shim::StartRequest {
        id: cid.clone(),
        exec_id: eid.clone(),
        ..Default::default()
    };
    shim.start(ctx(), &start).unwrap();
    for (attach, line) in ["first\n", "second\n", "third\n"].into_iter().enumerate() {
        // Non-blocking: with no reader left on the fifo this fails (ENXIO) instead of hanging.
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&stdin)
            .unwrap_or_else(|e| panic!("attach {}: nobody reads the stdin fifo: {e}", attach + 1));
        w.write_all(line.as_bytes()).unwrap();
        drop(w); // the client detaches without CloseIO
                 // Once cat has echoed it, the shim has read past this client's close.
        let want = ["first\n", "second\n", "third\n"][..=attach].concat();
        assert!(
            wait_until(LONG, || std::fs::read_to_string(&log).unwrap_or_default()
                == want),
            "attach {}: cat never echoed {line:?}",
            attach + 1
        );
    }
    let close = protocol::shim::CloseIORequest {
        id: cid.clone(),
        exec_id: eid.clone(),
        stdin: true,
        ..Default::default()
    };
    shim.close_io(ctx(), &close).unwrap();
    let wait = WaitRequest {
        id: cid.clone(),
        exec_id: eid.clone(),
        ..Default::default()
    };
    assert_eq!(shim.wait(ctx(), &wait).unwrap().exit_status, 0);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "first\nsecond\nthird\n",
        "what cat read from its three writers"
    );
    let delete = DeleteRequest {
        id: cid,
        exec_id: eid,
        ..Default::default()
    };
    shim.delete(ctx(), &delete).unwrap();
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    remove(&c, &id);
    assert_gone(&c, &id);
}

#[test]
fn task_ps_lists_the_processes() {
    let c = with_our_shims();
    let id = unique_id("ps");
    run_detached(&c, &id, &["sh", "-c", "sleep 1000 & wait"]);
    wait_status(&c, &id, "RUNNING");
    let init: u32 = c
        .ctr_ok(&["task", "ls"])
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    let mut pids = Vec::new();
    assert!(
        wait_until(LONG, || {
            let out = c.ctr_ok(&["task", "ps", &id]);
            pids = out
                .stdout
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
                .collect();
            pids.len() >= 2
        }),
        "expected init and its sleep child, got {pids:?}"
    );
    assert!(pids.contains(&init), "init {init} missing from {pids:?}");
    c.ctr_ok(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    remove(&c, &id);
    assert_gone(&c, &id);
}

#[test]
fn delete_removes_task_container_mounts_and_shim() {
    let c = with_our_shims();
    let id = unique_id("del");
    run_detached(&c, &id, &["sleep", "1000"]);
    wait_status(&c, &id, "RUNNING");
    assert!(runc_state(c.namespace(), &id).exists());
    assert_eq!(
        mounts_mentioning(&id).len(),
        1,
        "the rootfs is mounted while the task runs"
    );
    // A running task cannot be deleted: containerd gets a clear precondition error.
    let out = c.ctr(&["task", "delete", &id]);
    assert!(!out.success() && out.stderr.contains("stopped"), "{out:?}");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    remove(&c, &id);
    assert!(c.ctr_ok(&["task", "ls", "-q"]).stdout.trim().is_empty());
    assert!(c
        .ctr_ok(&["container", "ls", "-q"])
        .stdout
        .trim()
        .is_empty());
    assert_gone(&c, &id);
}

#[test]
fn same_group_shares_one_shim() {
    let c = with_our_shims();
    let group = unique_id("group");
    let (a, b) = (unique_id("ga"), unique_id("gb"));
    let ann = format!("io.containerd.runc.v2.group={group}");
    for id in [&a, &b] {
        c.ctr_ok(&[
            "run",
            "-d",
            "--annotation",
            &ann,
            BUSYBOX_REF,
            id,
            "sleep",
            "1000",
        ]);
    }
    assert_eq!(
        c.shim_pids().len(),
        1,
        "one shim for the group: {:?}",
        c.shim_pids()
    );
    assert_ours(&c);
    // A container outside the group gets its own shim.
    let solo = unique_id("solo");
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &solo, "sleep", "1000"]);
    assert_eq!(c.shim_pids().len(), 2);
    for id in [&a, &b, &solo] {
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_status(&c, id, "STOPPED");
        remove(&c, id);
    }
    for id in [&a, &b, &solo] {
        assert_gone(&c, id);
    }
}

#[test]
fn killed_shim_is_cleaned_up_by_delete_action() {
    let c = with_our_shims();
    let id = unique_id("dead");
    run_detached(&c, &id, &["sleep", "1000"]);
    wait_status(&c, &id, "RUNNING");
    let shim = c.shim_pids();
    assert_eq!(shim.len(), 1);
    unsafe { libc::kill(shim[0], libc::SIGKILL) };
    // containerd notices, runs our binary's `delete` action, and drops the task.
    assert!(
        wait_until(LONG, || task_status(&c, &id).is_none()),
        "task still listed after its shim died"
    );
    c.ctr_ok(&["container", "delete", &id]);
    assert_gone(&c, &id);
    assert!(c.log_tail(400).contains("cleaning up dead shim"));
}

#[test]
fn missing_runc_binary_is_a_clear_error_and_leaks_nothing() {
    let c = with_our_shims();
    let id = unique_id("nobin");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        "/nonexistent/runc",
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    assert!(!out.success());
    assert!(
        out.stderr.contains("\"/nonexistent/runc\" not found"),
        "unclear error: {}",
        out.stderr
    );
    let _ = c.ctr(&["container", "delete", &id]);
    assert_gone(&c, &id);
}

#[test]
fn invalid_config_json_is_a_clear_error_and_leaks_nothing() {
    let c = with_our_shims();
    let id = unique_id("badcfg");
    // Valid JSON for ctr, nonsense for the runtime: an unknown namespace type.
    let cfg = c.dir().join("bad-config.json");
    std::fs::write(&cfg, bad_spec()).unwrap();
    let out = c.ctr(&["run", "--rm", "--config", cfg.to_str().unwrap(), &id]);
    assert!(!out.success());
    assert!(
        out.stderr.contains("bogus"),
        "runc's reason must reach the user: {}",
        out.stderr
    );
    let _ = c.ctr(&["container", "delete", &id]);
    assert_gone(&c, &id);
}

fn bad_spec() -> String {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/nonexistent-rootfs"},
        "linux": {"namespaces": [{"type": "bogus"}]}
    })
    .to_string()
}

#[test]
fn shim_log_reaches_containerd() {
    let c = with_our_shims();
    let id = unique_id("log");
    c.ctr_ok(&["run", "--rm", BUSYBOX_REF, &id, "true"]);
    assert!(
        c.log_tail(400)
            .contains("serving unix:///run/containerd/s/"),
        "shim log missing"
    );
}

/// The binary contract without containerd: a syntactically broken config.json makes
/// `start` fail with the file named, and no daemon or socket is left.
#[test]
fn start_action_rejects_malformed_config_json() {
    require_root();
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(bundle.path().join("config.json"), "{ this is not json").unwrap();
    let id = unique_id("malformed");
    let shim = target_bin_dir().join("containerd-shim-runc-v2");
    let out = std::process::Command::new(&shim)
        .args([
            "-namespace",
            "shimtest",
            "-address",
            "/nonexistent/c.sock",
            "-id",
            &id,
            "start",
        ])
        .current_dir(bundle.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "start must not print an address on failure"
    );
    assert!(!bundle.path().join("address").exists());
    let digest = Sha256::digest(format!("/nonexistent/c.sock/shimtest/{id}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        !Path::new("/run/containerd/s").join(hex).exists(),
        "socket left behind"
    );
    assert!(processes_mentioning(&id).is_empty(), "daemon left behind");
}

#[test]
fn pause_resume_and_exec_ids_in_pids() {
    let c = with_our_shims();
    let log = integration::events::EventLog::start(&c);
    let id = unique_id("pause");
    run_detached(&c, &id, &["sleep", "1000"]);
    c.ctr_ok(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "side",
        &id,
        "sleep",
        "1000",
    ]);
    // Pids names the exec's process by its exec id.
    let ps = c.ctr_ok(&["task", "ps", &id]).stdout;
    assert!(ps.contains("side"), "exec id missing from pids: {ps}");
    c.ctr_ok(&["task", "pause", &id]);
    wait_status(&c, &id, "PAUSED");
    c.ctr_ok(&["task", "resume", &id]);
    wait_status(&c, &id, "RUNNING");
    assert!(log.wait_for(&id, "/tasks/resumed"));
    let topics = log.topics(&id);
    let at = |t: &str| topics.iter().position(|x| x == t);
    assert!(at("/tasks/paused") < at("/tasks/resumed"), "{topics:?}");
    c.ctr_ok(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    remove(&c, &id);
    assert_gone(&c, &id);
}

/// `binary_name = crun` (`ctr run --runc-binary crun`): crun's start protocol differs from
/// runc's (its init reads the exec fifo), so the shim must leave `start` to crun itself.
/// crun refuses cgroup v1 hybrid hosts (this machine is one): there, its own error reaches
/// the user and nothing is left; the start path is then exercised by the VM shim's tests,
/// whose guest runs crun on pure cgroup v2.
#[test]
fn crun_as_the_runtime_runs_and_starts_containers() {
    let c = with_our_shims();
    let hybrid = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup/unified ") && l.contains(" cgroup2 "));
    let id = unique_id("crun-run");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        "crun",
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "echo hi from crun; exit 5",
    ]);
    if hybrid {
        assert_ne!(out.status, 0, "{out:?}");
        assert!(out.stderr.contains("hybrid mode not supported"), "{out:?}");
        c.ctr(&["container", "delete", &id]);
        assert_nothing_left(&c, &id);
        return;
    }
    assert_eq!(out.status, 5, "{out:?}");
    assert_eq!(out.stdout.trim(), "hi from crun", "{out:?}");
    let id = unique_id("crun-detach");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runc-binary",
        "crun",
        BUSYBOX_REF,
        &id,
        "sleep",
        "1000",
    ]);
    wait_status(&c, &id, "RUNNING");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
}

/// The kernel's OOM killer must pick a shim before containerd: a shim's `oom_score_adj` is
/// containerd's plus one, at most 1000, as containerd's client tests expect
/// (`TestShimOOMScore`) and its Go shim does in `start`. Checked beside Debian's Go shim,
/// with containerd's score raised (root here lacks CAP_SYS_RESOURCE, so only raising works).
#[test]
fn shim_oom_score_is_containerds_plus_one() {
    let c = integration::fixture::with_our_and_go_shims();
    let containerd = c.pid().expect("containerd runs");
    let score = |pid: u32| -> i32 {
        let path = format!("/proc/{pid}/oom_score_adj");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.trim().parse().expect("a number")
    };
    for (daemon, expected) in [(300, 301), (1000, 1000)] {
        std::fs::write(
            format!("/proc/{containerd}/oom_score_adj"),
            daemon.to_string(),
        )
        .expect("raise containerd's oom_score_adj");
        assert_eq!(score(containerd), daemon);
        for runtime in [integration::OUR_RUNTIME, integration::GO_RUNTIME] {
            let before = c.shim_pids();
            let id = unique_id("oom");
            integration::fixture::run_sleeping(&c, runtime, &id);
            let new: Vec<i32> = c
                .shim_pids()
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect();
            assert_eq!(new.len(), 1, "one new shim for {id}: {new:?}");
            assert_eq!(
                score(new[0] as u32),
                expected,
                "{runtime}'s shim with containerd at {daemon}"
            );
            c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
            wait_status(&c, &id, "STOPPED");
            remove(&c, &id);
        }
    }
}
