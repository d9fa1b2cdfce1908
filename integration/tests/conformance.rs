//! Every containerd generation's `start` contract, through the `shim-conformance` runner's
//! pieces (no containerd): our shim passes as 1.6, 1.7, 2.0 and 2.3; Debian's Go shim passes
//! as 1.6 (a check of the runner itself); bad bootstrap input and malformed runtime options
//! get clear errors and leave nothing behind.

use std::path::PathBuf;
use std::time::Duration;

use integration::checks::{processes_mentioning, runc_state, wait_until};
use integration::conformance::{
    parse_answer, process_alive, run_lifecycle, AnswerForm, Config, Generation, Playground,
    TaskApi, NAMESPACE,
};
use integration::{require_root, target_bin_dir, unique_id, GO_SHIM_BINARY};
use protobuf::well_known_types::empty::Empty;
use protobuf::Message;
use protocol::bootstrap::BootstrapParams;
use protocol::introspection::RuntimeInfo;
use protocol::shim::{ConnectRequest, ConnectResponse, CreateTaskResponse, ShutdownRequest};

fn our_shim() -> PathBuf {
    require_root();
    let shim = target_bin_dir().join("containerd-shim-runc-v2");
    assert!(
        shim.exists(),
        "build the shims first: {} is missing",
        shim.display()
    );
    shim
}

fn passes(shim: PathBuf, generation: Generation) -> integration::conformance::Report {
    let report = run_lifecycle(&Config {
        shim,
        generation,
        runtime_options: None,
        id: unique_id("conf"),
    });
    assert!(report.passed(), "as containerd {generation}:\n{report}");
    report
}

fn detail<'a>(report: &'a integration::conformance::Report, step: &str) -> &'a str {
    report
        .steps
        .iter()
        .find(|s| s.name == step)
        .map(|s| s.detail.as_str())
        .unwrap_or_default()
}

#[test]
fn ours_passes_as_containerd_16_with_a_plain_address() {
    let r = passes(our_shim(), Generation::V1_6);
    assert!(
        detail(&r, "start").starts_with("Plain answer, task API v2"),
        "{r}"
    );
}

#[test]
fn ours_passes_as_containerd_17() {
    passes(our_shim(), Generation::V1_7);
}

#[test]
fn ours_passes_as_containerd_20() {
    // MAX_SHIM_VERSION=2 as 2.0 sets it: the plain address, which 2.0 reads as version 2.
    let r = passes(our_shim(), Generation::V2_0);
    assert!(
        detail(&r, "start").starts_with("Plain answer, task API v2"),
        "{r}"
    );
}

#[test]
fn ours_passes_as_containerd_23_over_task_api_v3() {
    let r = passes(our_shim(), Generation::V2_3);
    assert!(
        detail(&r, "start").starts_with("BootstrapResult answer, task API v3"),
        "{r}"
    );
    assert!(
        detail(&r, "connect").starts_with("containerd.task.v3.Task"),
        "{r}"
    );
}

#[test]
fn debians_go_shim_passes_as_containerd_16() {
    require_root();
    passes(PathBuf::from(GO_SHIM_BINARY), Generation::V1_6);
}

/// Nothing of the container is left: no daemon, no socket, no runc state.
fn assert_nothing_left(pg: &Playground, socket: &std::path::Path) {
    let procs: Vec<_> = processes_mentioning(&pg.id)
        .into_iter()
        .filter(|(_, cmd)| !cmd.contains("cargo") && !cmd.contains("/deps/"))
        .collect();
    assert!(procs.is_empty(), "processes left: {procs:?}");
    assert!(!socket.exists(), "socket {} left", socket.display());
    assert!(
        !runc_state(NAMESPACE, &pg.id).exists(),
        "runc state of {} left",
        pg.id
    );
}

#[test]
fn bootstrap_params_with_unknown_version_are_refused_before_anything_starts() {
    let pg = Playground::new(&our_shim(), Generation::V2_3, &unique_id("badver")).unwrap();
    let params = BootstrapParams {
        instance_id: pg.id.clone(),
        namespace: pg.namespace.clone(),
        containerd_version: "unknown-version".into(),
        containerd_ttrpc_address: pg.ttrpc_address.clone(),
        containerd_grpc_address: pg.containerd_address.clone(),
        ..Default::default()
    };
    let out = pg.run_start(&params.write_to_bytes().unwrap()).unwrap();
    assert!(!out.success, "start accepted it: {:?}", out.stdout);
    assert!(
        out.stderr.contains("containerd_version") && out.stderr.contains("\"unknown-version\""),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    assert_nothing_left(&pg, &pg.default_socket());
}

#[test]
fn bootstrap_params_for_another_container_are_refused() {
    let pg = Playground::new(&our_shim(), Generation::V2_3, &unique_id("badid")).unwrap();
    let params = BootstrapParams {
        instance_id: "someone-else".into(),
        namespace: pg.namespace.clone(),
        containerd_version: "v2.3.0".into(),
        ..Default::default()
    };
    let out = pg.run_start(&params.write_to_bytes().unwrap()).unwrap();
    assert!(
        !out.success && out.stderr.contains("someone-else"),
        "{}",
        out.stderr
    );
    assert_nothing_left(&pg, &pg.default_socket());
}

#[test]
fn bootstrap_params_with_unknown_fields_are_accepted() {
    let pg = Playground::new(&our_shim(), Generation::V2_3, &unique_id("newfield")).unwrap();
    let mut stdin = pg.start_stdin(None);
    // Field 200, a string: what a newer containerd may add.
    stdin.extend([0xc2, 0x0c, 3, b'n', b'e', b'w']);
    let out = pg.run_start(&stdin).unwrap();
    assert!(out.success, "{}", out.stderr);
    let answer = parse_answer(Generation::V2_3, &out.stdout).unwrap();
    assert_eq!(answer.form, AnswerForm::BootstrapResult);
    pg.set_address(&answer.address);
    shut_down(&pg, &answer.address, answer.version);
}

/// Connects, learns the daemon's pid, shuts it down and waits until it and its socket are gone.
fn shut_down(pg: &Playground, address: &str, version: u32) {
    let api = TaskApi::connect(address, version, &pg.namespace).unwrap();
    let c: ConnectResponse = api
        .call(
            "Connect",
            &ConnectRequest {
                id: pg.id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    pg.set_shim_pid(c.shim_pid);
    let _ = api.call::<_, Empty>(
        "Shutdown",
        &ShutdownRequest {
            id: pg.id.clone(),
            ..Default::default()
        },
    );
    drop(api);
    assert!(
        wait_until(Duration::from_secs(20), || !process_alive(c.shim_pid)),
        "shim {} still running",
        c.shim_pid
    );
    let socket = PathBuf::from(address.trim_start_matches("unix://"));
    assert!(
        wait_until(Duration::from_secs(5), || !socket.exists()),
        "socket {} left",
        socket.display()
    );
}

#[test]
fn malformed_runtimeoptions_toml_fails_create_and_leaves_nothing() {
    let pg = Playground::new(&our_shim(), Generation::V2_3, &unique_id("badtoml")).unwrap();
    let options = protocol::pack(&protocol::runtimeoptions::Options {
        config_body: b"BinaryName = \"runc\"\nSystemdCgroup = tru".to_vec(),
        ..Default::default()
    })
    .unwrap();
    // `start` does not read the options: containerd learns of the problem at Create.
    let out = pg.run_start(&pg.start_stdin(Some(&options))).unwrap();
    assert!(out.success, "{}", out.stderr);
    let answer = parse_answer(Generation::V2_3, &out.stdout).unwrap();
    pg.set_address(&answer.address);
    let api = TaskApi::connect(&answer.address, answer.version, &pg.namespace).unwrap();
    let req = pg.create_request(Some(&options)).unwrap();
    let err = api
        .call::<_, CreateTaskResponse>("Create", &req)
        .expect_err("Create with malformed TOML succeeded");
    let ttrpc::Error::RpcStatus(status) = &err else {
        panic!("not a status: {err:?}");
    };
    assert_eq!(status.code(), ttrpc::Code::INVALID_ARGUMENT, "{status:?}");
    assert!(
        status.message().contains("config_body") && status.message().contains("malformed TOML"),
        "{}",
        status.message()
    );
    drop(api);
    shut_down(&pg, &answer.address, answer.version);
    assert_nothing_left(
        &pg,
        &PathBuf::from(answer.address.trim_start_matches("unix://")),
    );
}

#[test]
fn info_prints_runtime_info() {
    let shim = our_shim();
    let options = protocol::pack(&protocol::options::Options {
        binary_name: "crun".into(),
        ..Default::default()
    })
    .unwrap();
    let mut child = std::process::Command::new(&shim)
        .arg("-info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        &options.write_to_bytes().unwrap(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(info.name, "io.containerd.runc.v2");
    assert!(!info.version.version.is_empty());
    assert_eq!(info.options.type_url, "containerd.runc.v1.Options");
}
