//! Bad input to the runc shim: each request gets a clear error and loses nothing.
//! Requests `ctr` cannot make go to the shim's ttrpc socket directly, beside containerd.

use std::time::Duration;

use integration::checks::{processes_mentioning, runc_state, wait_until};
use integration::fixture::{sleep_in_group, with_our_shims, GROUP_ANNOTATION};
use integration::shim_client::{bundle, code, connect, ctx, process_spec, update_request};
use integration::{unique_id, Containerd, BUSYBOX_REF};
use protocol::shim::*;
use ttrpc::Code;

fn running(c: &Containerd) -> String {
    let id = unique_id("bad");
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &id, "sleep", "1000"]);
    id
}

/// The container the bad request named (or stood beside) did not notice.
fn assert_still_running(shim: &protocol::shim_ttrpc::TaskClient, id: &str) {
    let req = StateRequest {
        id: id.into(),
        ..Default::default()
    };
    let state = shim.state(ctx(), &req).unwrap();
    assert_eq!(
        state.status.enum_value(),
        Ok(protocol::task::Status::RUNNING)
    );
}

fn exec_req(id: &str, exec_id: &str, args: &[&str]) -> ExecProcessRequest {
    ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: protobuf::MessageField::some(process_spec(args)),
        ..Default::default()
    }
}

#[test]
fn duplicate_exec_id_is_already_exists() {
    let c = with_our_shims();
    let id = running(&c);
    let shim = connect(&c, &id);
    shim.exec(ctx(), &exec_req(&id, "dup", &["sleep", "100"]))
        .unwrap();
    let again = shim.exec(ctx(), &exec_req(&id, "dup", &["true"]));
    assert_eq!(code(&again), Some(Code::ALREADY_EXISTS), "{again:?}");
    // The first exec is untouched and still starts.
    let start = StartRequest {
        id: id.clone(),
        exec_id: "dup".into(),
        ..Default::default()
    };
    assert!(shim.start(ctx(), &start).unwrap().pid > 0);
    c.ctr_ok(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
}

#[test]
fn start_twice_is_failed_precondition() {
    let c = with_our_shims();
    let id = running(&c);
    let shim = connect(&c, &id);
    let r = shim.start(
        ctx(),
        &StartRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(&r), Some(Code::FAILED_PRECONDITION), "{r:?}");
    assert_still_running(&shim, &id);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}

#[test]
fn unknown_ids_are_not_found() {
    let c = with_our_shims();
    let id = running(&c);
    let shim = connect(&c, &id);
    let kill = KillRequest {
        id: "nope".into(),
        signal: 9,
        ..Default::default()
    };
    assert_eq!(code(&shim.kill(ctx(), &kill)), Some(Code::NOT_FOUND));
    let kill = KillRequest {
        id: id.clone(),
        exec_id: "nope".into(),
        signal: 9,
        ..Default::default()
    };
    assert_eq!(code(&shim.kill(ctx(), &kill)), Some(Code::NOT_FOUND));
    let del = DeleteRequest {
        id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(code(&shim.delete(ctx(), &del)), Some(Code::NOT_FOUND));
    let del = DeleteRequest {
        id: id.clone(),
        exec_id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(code(&shim.delete(ctx(), &del)), Some(Code::NOT_FOUND));
    let wait = WaitRequest {
        id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(code(&shim.wait(ctx(), &wait)), Some(Code::NOT_FOUND));
    // And the real container did not notice.
    assert_still_running(&shim, &id);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}

#[test]
fn kill_of_a_finished_process_is_not_found() {
    let c = with_our_shims();
    let id = running(&c);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let shim = connect(&c, &id);
    let wait = WaitRequest {
        id: id.clone(),
        ..Default::default()
    };
    assert_eq!(shim.wait(ctx(), &wait).unwrap().exit_status, 137);
    let kill = KillRequest {
        id: id.clone(),
        signal: 15,
        ..Default::default()
    };
    let r = shim.kill(ctx(), &kill);
    assert_eq!(code(&r), Some(Code::NOT_FOUND), "{r:?}");
}

/// A client that resizes without asking whether the process has a terminal gets success and
/// nothing happens, as from containerd's runc shim (its `Resize` is a no-op without a console).
#[test]
fn resize_of_a_process_without_terminal_is_a_no_op() {
    let c = with_our_shims();
    let id = running(&c);
    let shim = connect(&c, &id);
    let resize = |id: &str, exec_id: &str| {
        shim.resize_pty(
            ctx(),
            &ResizePtyRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                width: 80,
                height: 24,
                ..Default::default()
            },
        )
    };
    resize(&id, "").expect("resize of the init, not a tty");
    shim.exec(ctx(), &exec_req(&id, "plain", &["sleep", "100"]))
        .unwrap();
    resize(&id, "plain").expect("resize of a created exec, not a tty");
    let start = StartRequest {
        id: id.clone(),
        exec_id: "plain".into(),
        ..Default::default()
    };
    shim.start(ctx(), &start).unwrap();
    resize(&id, "plain").expect("resize of a running exec, not a tty");
    // Unknown ids are still NotFound.
    let r = resize("nope", "");
    assert_eq!(code(&r), Some(Code::NOT_FOUND), "{r:?}");
    let r = resize(&id, "nope");
    assert_eq!(code(&r), Some(Code::NOT_FOUND), "{r:?}");
    assert_still_running(&shim, &id);
    c.ctr_ok(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
}

#[test]
fn update_applies_valid_resources_and_refuses_invalid_ones() {
    let c = with_our_shims();
    let id = running(&c);
    let shim = connect(&c, &id);
    let update = |json: &str| update_request(&id, json);
    shim.update(ctx(), &update(r#"{"pids":{"limit":77}}"#))
        .unwrap();
    let pid = shim
        .state(
            ctx(),
            &StateRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap()
        .pid;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let pids_cg = cg.lines().find_map(|l| {
        l.strip_prefix("8:pids:")
            .or_else(|| l.split_once(":pids:").map(|x| x.1))
    });
    if let Some(path) = pids_cg {
        let max = std::fs::read_to_string(format!("/sys/fs/cgroup/pids{path}/pids.max")).unwrap();
        assert_eq!(max.trim(), "77");
    }
    let r = shim.update(ctx(), &update("not json"));
    assert_eq!(code(&r), Some(Code::INVALID_ARGUMENT), "{r:?}");
    let r = shim.update(ctx(), &update(r#"{"memory":{"limit":"lots"}}"#));
    assert!(r.is_err(), "runc must refuse a string memory limit");
    assert_still_running(&shim, &id);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}

#[test]
fn unknown_options_type_is_invalid_argument_and_leaks_nothing() {
    let c = with_our_shims();
    let id = running(&c);
    let shim = connect(&c, &id);
    // A second container in the same shim, with options of a type nobody knows.
    let other = unique_id("opts");
    let dir = c.dir().join(&other);
    std::fs::create_dir_all(dir.join("rootfs")).unwrap();
    std::fs::copy(bundle(&c, &id).join("config.json"), dir.join("config.json")).unwrap();
    let req = CreateTaskRequest {
        id: other.clone(),
        bundle: dir.to_string_lossy().into(),
        options: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
            type_url: "example.com/acme.Options".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = shim.create(ctx(), &req);
    assert_eq!(code(&r), Some(Code::INVALID_ARGUMENT), "{r:?}");
    let msg = format!("{r:?}");
    assert!(msg.contains("example.com/acme.Options"), "{msg}");
    assert!(!runc_state(c.namespace(), &other).exists());
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}

#[test]
fn non_executable_runc_binary_is_a_clear_error() {
    let c = with_our_shims();
    let id = unique_id("noexec");
    let bin = c.dir().join("runc-not-executable");
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        bin.to_str().unwrap(),
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    assert!(!out.success());
    assert!(out.stderr.contains("not executable"), "{}", out.stderr);
    let _ = c.ctr(&["container", "delete", &id]);
    assert!(wait_until(Duration::from_secs(20), || c
        .shim_pids()
        .is_empty()));
    assert!(processes_mentioning(&id).is_empty());
}

/// A container of its own group (`ctr run -d ... sleep 1000`); returns its id and the
/// `--annotation` that puts another container beside it.
fn running_in_group(c: &Containerd) -> (String, String) {
    let id = unique_id("pod");
    sleep_in_group(c, &id, &id);
    (id.clone(), format!("{GROUP_ANNOTATION}={id}"))
}

fn shim_pid(shim: &protocol::shim_ttrpc::TaskClient, id: &str) -> u32 {
    let req = ConnectRequest {
        id: id.into(),
        ..Default::default()
    };
    shim.connect(ctx(), &req).unwrap().shim_pid
}

/// A logging binary that does not exist costs its own container's create, with an error
/// naming it, and nothing else: the group's shim keeps serving its running container.
/// Before the fix std's spawn panicked when the reaper took the failed child first, and the
/// shim died with the pod within a few rounds.
#[test]
fn missing_logging_binary_fails_its_container_not_the_pod() {
    let c = with_our_shims();
    let (anchor, annotation) = running_in_group(&c);
    let shim = connect(&c, &anchor);
    let pid = shim_pid(&shim, &anchor);
    for round in 0..40 {
        let id = format!("{anchor}-log{round}");
        let out = c.ctr(&[
            "run",
            "--rm",
            "--annotation",
            &annotation,
            "--log-uri",
            "binary:///nonexistent/logger",
            BUSYBOX_REF,
            &id,
            "true",
        ]);
        assert!(!out.success(), "round {round}: the container ran");
        assert!(
            out.stderr
                .contains("start logging binary /nonexistent/logger"),
            "round {round}: {}",
            out.stderr
        );
        let _ = c.ctr(&["container", "delete", &id]);
        assert!(!runc_state(c.namespace(), &id).exists(), "round {round}");
        assert_still_running(&shim, &anchor);
    }
    assert_eq!(shim_pid(&shim, &anchor), pid, "the pod's shim was replaced");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &anchor]);
}

/// A bundle for a container `id` of its own beside the running `anchor` (a `sleep 1000`
/// on the anchor's rootfs, read-only: no snapshot needed), to create through the shim.
fn bundle_beside(c: &Containerd, anchor: &str, id: &str) -> std::path::PathBuf {
    let dir = c.dir().join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle(c, anchor).join("config.json")).unwrap())
            .unwrap();
    spec["root"] = serde_json::json!({
        "path": bundle(c, anchor).join("rootfs"),
        "readonly": true,
    });
    spec["process"]["args"] = serde_json::json!(["sleep", "1000"]);
    spec["linux"]["cgroupsPath"] = format!("/{}/{id}", c.namespace()).into();
    std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
    dir
}

/// Two `Create`s of one id at once, in the shim of a running pod: one creates the
/// container, the other is `AlreadyExists` before anything runs — its undo must not
/// destroy the first (runc's state, the rootfs).
#[test]
fn concurrent_create_of_one_id_creates_it_once() {
    let c = with_our_shims();
    let (anchor, _) = running_in_group(&c);
    let shim = connect(&c, &anchor);
    for round in 0..5 {
        let id = format!("{anchor}-dup{round}");
        let dir = bundle_beside(&c, &anchor, &id);
        let req = CreateTaskRequest {
            id: id.clone(),
            bundle: dir.to_string_lossy().into(),
            ..Default::default()
        };
        let results: Vec<_> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..2)
                .map(|_| s.spawn(|| shim.create(ctx(), &req)))
                .collect();
            calls.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let created: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
        let refused: Vec<_> = results
            .iter()
            .filter(|r| code(r) == Some(Code::ALREADY_EXISTS))
            .collect();
        assert_eq!(
            (created.len(), refused.len()),
            (1, 1),
            "round {round}: {results:?}"
        );
        // The one created is whole: runc knows it, and it starts and runs.
        assert!(runc_state(c.namespace(), &id).exists(), "round {round}");
        let start = StartRequest {
            id: id.clone(),
            ..Default::default()
        };
        assert!(shim.start(ctx(), &start).unwrap().pid > 0, "round {round}");
        assert_still_running(&shim, &id);
        kill_and_delete(&shim, &id);
        assert!(!runc_state(c.namespace(), &id).exists(), "round {round}");
    }
    assert_still_running(&shim, &anchor);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &anchor]);
}

/// The runtime binary removed between `Create` and `Delete`: the delete fails with an error
/// naming it — not `NotFound`, which containerd takes for "already gone" and forgets a task
/// whose runc state is still there. Once the binary is back, the delete goes through.
#[test]
fn runc_removed_before_delete_is_a_clear_error_not_not_found() {
    let c = with_our_shims();
    let id = unique_id("norunc");
    let runc = c.dir().join("runc-copy");
    std::fs::copy("/usr/sbin/runc", &runc)
        .or_else(|_| std::fs::copy("/usr/bin/runc", &runc))
        .expect("copy runc");
    let runc_arg = runc.to_str().unwrap();
    c.ctr_ok(&[
        "run",
        "-d",
        "--runc-binary",
        runc_arg,
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    // The container's own `true` exits; its task is then stopped.
    let shim = connect(&c, &id);
    let wait = WaitRequest {
        id: id.clone(),
        ..Default::default()
    };
    assert_eq!(shim.wait(ctx(), &wait).unwrap().exit_status, 0);
    let moved = c.dir().join("runc-moved");
    std::fs::rename(&runc, &moved).unwrap();
    let out = c.ctr(&["task", "delete", &id]);
    assert!(!out.success(), "the delete claimed success without runc");
    assert!(out.stderr.contains(runc_arg), "{}", out.stderr);
    assert!(!out.stderr.contains("not found"), "{}", out.stderr);
    assert!(runc_state(c.namespace(), &id).exists());
    std::fs::rename(&moved, &runc).unwrap();
    c.ctr_ok(&["task", "delete", &id]);
    assert!(!runc_state(c.namespace(), &id).exists());
    c.ctr_ok(&["container", "delete", &id]);
}

/// runc options naming a CRIU that does not exist: checkpoint is refused with an error
/// naming it, 10 times over, and neither the container nor its pod notices.
#[test]
fn missing_criu_path_is_a_clear_checkpoint_error() {
    let c = with_our_shims();
    let (anchor, _) = running_in_group(&c);
    let shim = connect(&c, &anchor);
    let id = format!("{anchor}-criu");
    let dir = bundle_beside(&c, &anchor, &id);
    let options = protocol::options::Options {
        criu_path: "/nonexistent/criu".into(),
        ..Default::default()
    };
    let req = CreateTaskRequest {
        id: id.clone(),
        bundle: dir.to_string_lossy().into(),
        options: protobuf::MessageField::some(protocol::pack(&options).unwrap()),
        ..Default::default()
    };
    shim.create(ctx(), &req).unwrap();
    let start = StartRequest {
        id: id.clone(),
        ..Default::default()
    };
    shim.start(ctx(), &start).unwrap();
    for round in 0..10 {
        let req = CheckpointTaskRequest {
            id: id.clone(),
            path: c.dir().join("ckpt").to_string_lossy().into(),
            ..Default::default()
        };
        let r = shim.checkpoint(ctx(), &req);
        assert_eq!(
            code(&r),
            Some(Code::FAILED_PRECONDITION),
            "round {round}: {r:?}"
        );
        let msg = format!("{r:?}");
        assert!(msg.contains("/nonexistent/criu"), "round {round}: {msg}");
        assert_still_running(&shim, &id);
        assert_still_running(&shim, &anchor);
    }
    kill_and_delete(&shim, &id);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &anchor]);
}

/// SIGKILLs container `id` through the shim, waits for its 137 and deletes it.
fn kill_and_delete(shim: &protocol::shim_ttrpc::TaskClient, id: &str) {
    let kill = KillRequest {
        id: id.into(),
        signal: 9,
        ..Default::default()
    };
    shim.kill(ctx(), &kill).unwrap();
    let wait = WaitRequest {
        id: id.into(),
        ..Default::default()
    };
    assert_eq!(shim.wait(ctx(), &wait).unwrap().exit_status, 137);
    let delete = DeleteRequest {
        id: id.into(),
        ..Default::default()
    };
    shim.delete(ctx(), &delete).unwrap();
}
