//! Bad input to the runc shim: each request gets a clear error and loses nothing.
//! Requests `ctr` cannot make go to the shim's ttrpc socket directly, beside containerd.

use std::time::Duration;

use integration::checks::{processes_mentioning, runc_state, wait_until};
use integration::fixture::with_our_shims;
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
