//! Every containerd generation's `start` contract, through the `shim-conformance` runner's
//! pieces (no containerd): our shim passes as 1.6, 1.7, 2.0 and 2.3; Debian's Go shim passes
//! as 1.6 (a check of the runner itself); bad bootstrap input and malformed runtime options
//! get clear errors and leave nothing behind; a rootfs of image files (an erofs layer, an
//! ext4 upper the shim makes) mounts through loop devices, as containerd's EROFS snapshotter
//! hands it over, and leaves no mount or loop device.

use std::path::PathBuf;
use std::time::Duration;

use integration::checks::{processes_mentioning, runc_state, wait_until};
use integration::conformance::{
    leftover_mounts, loop_devices_left, parse_answer, process_alive, run_lifecycle, AnswerForm,
    Config, Generation, Playground, RootfsLayout, TaskApi, NAMESPACE,
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
        one_socket: false,
        in_vm: false,
        rootfs: Default::default(),
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

/// Reads `start`'s answer, connects to the daemon and learns its pid (kept by `pg`, whose
/// drop kills a daemon a failed test leaves).
fn connected(
    pg: &Playground,
    start_stdout: &[u8],
) -> (integration::conformance::Answer, TaskApi, u32) {
    let answer = parse_answer(pg.generation, start_stdout).unwrap();
    pg.set_address(&answer.address);
    let (api, pid) = connect_daemon(pg, &answer.address, answer.version);
    (answer, api, pid)
}

/// Connects to the daemon at `address` and learns its pid (which `pg` kills if a test fails).
fn connect_daemon(pg: &Playground, address: &str, version: u32) -> (TaskApi, u32) {
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
    (api, c.shim_pid)
}

/// Connects, learns the daemon's pid, shuts it down and waits until it and its socket are gone.
fn shut_down(pg: &Playground, address: &str, version: u32) {
    let (api, shim_pid) = connect_daemon(pg, address, version);
    let _ = api.call::<_, Empty>(
        "Shutdown",
        &ShutdownRequest {
            id: pg.id.clone(),
            ..Default::default()
        },
    );
    drop(api);
    assert!(
        wait_until(Duration::from_secs(20), || !process_alive(shim_pid)),
        "shim {} still running",
        shim_pid
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

/// `containerd-shim-runc-v2 -info` with runc options naming `binary`, as containerd 2.x runs it.
fn info_for(binary: &str) -> std::process::Output {
    let options = protocol::pack(&protocol::options::Options {
        binary_name: binary.into(),
        ..Default::default()
    })
    .unwrap();
    let mut child = std::process::Command::new(our_shim())
        .arg("-info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        &options.write_to_bytes().unwrap(),
    )
    .unwrap();
    child.wait_with_output().unwrap()
}

/// containerd 2.x's introspection: the runtime's name and version, the options echoed, and
/// `runc features` as an OCI `features.Features` (JSON in an `Any`), which clients decode.
#[test]
fn info_prints_runtime_info_with_runc_features() {
    let out = info_for("runc");
    assert!(out.status.success(), "{out:?}");
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(info.name, "io.containerd.runc.v2");
    assert!(!info.version.version.is_empty());
    assert_eq!(info.options.type_url, "containerd.runc.v1.Options");
    assert_eq!(info.features.type_url, protocol::type_urls::OCI_FEATURES);
    let got: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
    let runc = std::process::Command::new("runc")
        .arg("features")
        .output()
        .unwrap();
    let want: serde_json::Value = serde_json::from_slice(&runc.stdout).unwrap();
    assert_eq!(got, want, "not what `runc features` prints");
    assert!(got["ociVersionMax"].is_string(), "{got}");

    // A runtime without the command (Debian's crun 1.8): no features, no error.
    let out = info_for("crun");
    assert!(out.status.success(), "{out:?}");
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).unwrap();
    assert!(info.features.is_none(), "{:?}", info.features);

    // No runtime at all: a clear error, as containerd shows it.
    let out = info_for("/nonexistent/runc");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/runc") && err.contains("not found"),
        "{err}"
    );
}

/// A cgroup made the way containerd's `TestShimInCgroup` makes one: in every cgroup v1
/// hierarchy (or the one v2 tree), removed on drop.
struct TestCgroup {
    path: String,
    dirs: Vec<PathBuf>,
}

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let root = PathBuf::from("/sys/fs/cgroup");
        let roots: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
            vec![root]
        } else {
            std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| !p.is_symlink() && p.join("cgroup.procs").exists())
                // A hybrid host's v2 tree is not one of runc's v1 hierarchies.
                .filter(|p| !p.join("cgroup.controllers").exists())
                .collect()
        };
        let dirs: Vec<PathBuf> = roots.iter().map(|r| r.join(name)).collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            // A new v1 cpuset has no cpus or mems, and takes no process until it has: copy
            // the parent's, as containerd's cgroup library does.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let parent = d.parent().unwrap().join(file);
                if let Ok(v) = std::fs::read_to_string(&parent) {
                    std::fs::write(d.join(file), v.trim()).unwrap();
                }
            }
        }
        TestCgroup {
            path: format!("/{name}"),
            dirs,
        }
    }

    /// The hierarchies whose `cgroup.procs` does not list `pid`.
    fn missing(&self, pid: u32) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter(|d| {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                !procs.lines().any(|l| l.trim() == pid.to_string())
            })
            .cloned()
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Starts `shim` as `generation` with runc options naming `cgroup` as `ShimCgroup`.
fn start_in_cgroup(
    shim: &std::path::Path,
    generation: Generation,
    cgroup: &str,
) -> (Playground, integration::conformance::StartOutput) {
    let pg = Playground::new(shim, generation, &unique_id("shimcg")).unwrap();
    let options = protocol::pack(&protocol::options::Options {
        shim_cgroup: cgroup.into(),
        ..Default::default()
    })
    .unwrap();
    let out = pg.run_start(&pg.start_stdin(Some(&options))).unwrap();
    (pg, out)
}

/// containerd's `TestShimInCgroup`: runc options' `ShimCgroup` (on `start`'s stdin up to
/// 2.2, a `BootstrapParams` extension from 2.3) puts the shim daemon in that cgroup, on
/// every hierarchy. Debian's Go shim, as 1.6, checks the test itself.
#[test]
fn shim_cgroup_option_moves_the_daemon_into_that_cgroup() {
    let ours = our_shim();
    let go = PathBuf::from(GO_SHIM_BINARY);
    let mut cases = vec![
        (ours.clone(), Generation::V1_6),
        (ours.clone(), Generation::V2_0),
        (ours, Generation::V2_3),
    ];
    if go.exists() {
        cases.push((go, Generation::V1_6));
    }
    for (shim, generation) in cases {
        let cg = TestCgroup::new(&unique_id("shimtest-cg"));
        let (pg, out) = start_in_cgroup(&shim, generation, &cg.path);
        assert!(
            out.success,
            "{} as {generation:?}: {}",
            shim.display(),
            out.stderr
        );
        let (answer, api, shim_pid) = connected(&pg, &out.stdout);
        drop(api);
        let missing = cg.missing(shim_pid);
        assert!(
            missing.is_empty(),
            "{} as {generation:?}: shim {} not in {missing:?}",
            shim.display(),
            shim_pid
        );
        shut_down(&pg, &answer.address, answer.version);
    }
}

/// A `ShimCgroup` that does not exist fails `start` with a clear error, and no daemon or
/// socket is left behind.
#[test]
fn missing_shim_cgroup_fails_start_and_leaves_nothing() {
    let path = format!("/{}", unique_id("shimtest-nocg"));
    let (pg, out) = start_in_cgroup(&our_shim(), Generation::V1_6, &path);
    assert!(!out.success, "start succeeded: {:?}", out.stdout);
    assert!(
        out.stderr.contains(&path) && out.stderr.contains("does not exist"),
        "{}",
        out.stderr
    );
    assert_nothing_left(&pg, &pg.default_socket());
}

/// A process of a container without a pid namespace of its own is dead, or has SIGKILL
/// on its way (pending), or is a zombie: what containerd's runc shim guarantees for each
/// of them when it publishes the init's exit.
fn doomed(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let pending = |name: &str| u64::from_str_radix(&field(name), 16).unwrap_or(0);
    let sigkill = 1u64 << (libc::SIGKILL - 1);
    field("State:").starts_with(['Z', 'X'])
        || (pending("SigPnd:") | pending("ShdPnd:")) & sigkill != 0
}

/// containerd's `TestContainerKillInitPidHost`: without a pid namespace of its own (here
/// the host's: the spec has none) the kernel does not end a container's processes with its
/// init, so the shim must: when `Wait` answers for the init, every other process of the
/// container is dead or has SIGKILL pending. Repeated, since the init's exit and the kill
/// race; Debian's Go shim runs it too, as a check of the test.
#[test]
fn host_pid_namespace_processes_die_with_the_init() {
    let go = PathBuf::from(GO_SHIM_BINARY);
    let mut cases = vec![(our_shim(), 12)];
    if go.exists() {
        cases.push((go, 3));
    }
    for (shim, rounds) in cases {
        for round in 1..=rounds {
            host_pid_round(
                &shim,
                &format!("{} round {round} of {rounds}", shim.display()),
            );
        }
    }
}

fn host_pid_round(shim: &std::path::Path, what: &str) {
    use integration::conformance::spec;
    use protocol::shim::{DeleteRequest, KillRequest, StartRequest, WaitRequest, WaitResponse};
    let pg = Playground::new(shim, Generation::V1_6, &unique_id("hostpid")).unwrap();
    // Numbers nobody else sleeps for, to find the container's processes by.
    let n = std::process::id() % 100_000;
    let (child, init) = (
        format!("sleep {}", 4_100_000 + n),
        format!("sleep {}", 4_200_000 + n),
    );
    let script = format!("{child} & {child} & exec {init}");
    let mut config = spec(&pg.rootfs(), &["sh", "-c", &script]);
    config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != "pid");
    std::fs::write(pg.bundle().join("config.json"), config.to_string()).unwrap();
    let out = pg.run_start(&pg.start_stdin(None)).unwrap();
    assert!(out.success, "{what}: start: {}", out.stderr);
    let (answer, api, _) = connected(&pg, &out.stdout);
    let _: CreateTaskResponse = api
        .call("Create", &pg.create_request(None).unwrap())
        .unwrap();
    let key = StartRequest {
        id: pg.id.clone(),
        ..Default::default()
    };
    let _: protocol::shim::StartResponse = api.call("Start", &key).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || processes_mentioning(&child)
            .len()
            == 2
            && processes_mentioning(&init).len() == 1),
        "{what}: the container never started its processes"
    );
    let children: Vec<i32> = processes_mentioning(&child)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let kill = KillRequest {
        id: pg.id.clone(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    };
    let _: Empty = api.call("Kill", &kill).unwrap();
    let wait = WaitRequest {
        id: pg.id.clone(),
        ..Default::default()
    };
    let waited: WaitResponse = api.call("Wait", &wait).unwrap();
    assert_eq!(waited.exit_status, 137, "{what}");
    let alive: Vec<i32> = children.iter().copied().filter(|&p| !doomed(p)).collect();
    assert!(
        alive.is_empty(),
        "{what}: the init's exit answered while {alive:?} still live"
    );
    let delete = DeleteRequest {
        id: pg.id.clone(),
        ..Default::default()
    };
    let _: protocol::shim::DeleteResponse = api.call("Delete", &delete).unwrap();
    drop(api);
    shut_down(&pg, &answer.address, answer.version);
    assert!(
        wait_until(Duration::from_secs(20), || processes_mentioning(&child)
            .is_empty()),
        "{what}: processes left: {:?}",
        processes_mentioning(&child)
    );
}

/// A daemon other than containerd that has only its ttrpc socket, and passes it as the gRPC
/// address too (issue 30, item 2): every shim of the SDK walks the whole lifecycle under it.
/// The Wasm shim used to ask that socket for the container's image on every `Create` and
/// wait 120 s for an answer a ttrpc server never gives.
#[test]
fn under_a_daemon_with_only_a_ttrpc_socket_every_shim_passes() {
    require_root();
    for binary in ["containerd-shim-runc-v2", "containerd-shim-wasm-v2"] {
        let shim = target_bin_dir().join(binary);
        assert!(shim.exists(), "build the shims first: {}", shim.display());
        for generation in Generation::ALL {
            let report = run_lifecycle(&Config {
                shim: shim.clone(),
                generation,
                runtime_options: None,
                id: unique_id("one-socket"),
                one_socket: true,
                in_vm: false,
                rootfs: Default::default(),
            });
            assert!(
                report.passed(),
                "{binary} as containerd {generation} with one socket:\n{report}"
            );
        }
    }
}

/// containerd's EROFS snapshotter in block mode, as each generation: the runner's
/// `layered rootfs` step checks the init's write landed in the ext4 upper and that after
/// the delete nothing is mounted or bound to a loop device.
#[test]
fn an_erofs_layer_and_ext4_upper_mount_on_loop_devices_and_leave_nothing() {
    let shim = our_shim();
    for generation in Generation::ALL {
        let report = run_lifecycle(&Config {
            shim: shim.clone(),
            generation,
            runtime_options: None,
            id: unique_id("layered"),
            one_socket: false,
            in_vm: false,
            rootfs: RootfsLayout::Layered,
        });
        assert!(report.passed(), "as containerd {generation}:\n{report}");
        assert!(
            detail(&report, "layered rootfs").contains("upper/"),
            "{report}"
        );
    }
}

/// A layer image that is not erofs: `Create` fails naming the image, and what was mounted
/// before it (the ext4 upper, on its loop device) is taken down again. Repeated: the loop
/// devices are a host-wide pool.
#[test]
fn a_corrupt_erofs_layer_fails_create_and_leaves_no_mount_or_loop_device() {
    for round in 0..3 {
        let pg = Playground::new(&our_shim(), Generation::V2_3, &unique_id("badlayer")).unwrap();
        pg.use_layered_rootfs().unwrap();
        let layer = pg.layers().join("layer.erofs");
        std::fs::write(&layer, vec![0x5au8; 64 << 10]).unwrap();
        let out = pg.run_start(&pg.start_stdin(None)).unwrap();
        assert!(out.success, "{}", out.stderr);
        let (answer, api, _) = connected(&pg, &out.stdout);
        let req = pg.create_request(None).unwrap();
        let err = api
            .call::<_, CreateTaskResponse>("Create", &req)
            .expect_err("Create on a corrupt erofs layer succeeded");
        let ttrpc::Error::RpcStatus(status) = &err else {
            panic!("not a status: {err:?}");
        };
        assert!(
            status.message().contains("layer.erofs"),
            "round {round}: {}",
            status.message()
        );
        assert_eq!(leftover_mounts(&pg.bundle()), Vec::<String>::new());
        assert_eq!(loop_devices_left(&pg.layers()), Vec::<String>::new());
        assert!(!pg.bundle().join("rootfs-mounts").exists());
        // The upper image was made before the failure and stays, as containerd's snapshot.
        assert!(pg.layers().join("rwlayer.img").exists());
        drop(api);
        shut_down(&pg, &answer.address, answer.version);
    }
}
