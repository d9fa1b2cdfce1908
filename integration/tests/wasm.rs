//! `containerd-shim-wasm-v2` through a real containerd 1.6: WASI modules and components
//! from a rootfs and from OCI Wasm images, `wasi:http` components serving in the container's
//! network namespace, signals, the precompile cache, exec, stats, a CRI pod mixing Wasm and
//! native containers, and bad input.
//!
//! Every program is built from source by `integration::wasm_modules` (WAT, C through clang
//! and wasi-libc, components through wit-component). Each test runs its own containerd.

use std::time::{Duration, Instant};

use integration::checks::{mounts_mentioning, wait_until};
use integration::cri::{container_config, log_text, pod_config, HANDLER_WASM};
use integration::fixture::{assert_nothing_left, task_pid, task_status, wait_status, LONG};
use integration::procfs::cpu_ticks;
use integration::wasm_fixture::{
    import_busybox_wasm, import_wasm_bytes, import_wasm_image, require_wasm_shim, shim_daemons,
    with_wasm_shim, BUSYBOX_WASM_REF, HELLO_WAT_PATH,
};
use integration::wasm_image::{layer_digest, WasmImage};
use integration::wasm_modules::{
    self, Program, EXIT42_STATUS, GREET_OUTPUT, HELLO_OUTPUT, HTTP_BODY, HTTP_LOG_LINE,
    UNKNOWN_IMPORT,
};
use integration::{
    require_root, target_bin_dir, unique_id, Containerd, CtrOutput, BUSYBOX_REF, WASM_RUNTIME,
};

/// CPU time (clock ticks, 10 ms each) that says a guest spins: more than its start takes
/// while the test looks.
const SPINNING: u64 = 20;

/// `ctr run --rm --runtime io.containerd.wasm.v2 [flags] <image> <id> [args]`.
fn run_rm(c: &Containerd, flags: &[&str], image: &str, id: &str, args: &[&str]) -> CtrOutput {
    let mut a = vec!["run", "--rm", "--runtime", WASM_RUNTIME];
    a.extend_from_slice(flags);
    a.push(image);
    a.push(id);
    a.extend_from_slice(args);
    c.ctr(&a)
}

/// [`run_rm`] that must succeed; returns stdout.
fn run_ok(c: &Containerd, flags: &[&str], image: &str, id: &str, args: &[&str]) -> String {
    let out = run_rm(c, flags, image, id, args);
    assert!(
        out.success(),
        "ctr run {args:?} failed ({}): {}\n--- containerd log ---\n{}",
        out.status,
        out.stderr,
        c.log_tail(40)
    );
    out.stdout
}

/// `ctr run -d` of `args` in the busybox-wasm image.
fn run_detached(c: &Containerd, id: &str, image: &str, args: &[&str]) {
    let mut a = vec!["run", "-d", "--runtime", WASM_RUNTIME, image, id];
    a.extend_from_slice(args);
    c.ctr_ok(&a);
}

fn remove(c: &Containerd, id: &str) {
    c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    wait_until(LONG, || task_status(c, id).as_deref() != Some("RUNNING"));
    c.ctr(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
}

/// Nothing of container `id` is left: no shim, no mount, no process, no container.
fn assert_gone(c: &Containerd, id: &str) {
    assert_nothing_left(c, id);
    let containers = c.ctr(&["containers", "ls", "-q"]).stdout;
    assert!(
        !containers.lines().any(|l| l.trim() == id),
        "container {id} left behind"
    );
}

/// `out` is a failure whose stderr names the problem with one of `needles` (lowercase).
fn assert_clear_error(c: &Containerd, out: &CtrOutput, needles: &[&str]) {
    assert!(!out.timed_out, "ctr hung: {}", out.stderr);
    assert!(
        !out.success(),
        "expected a failure, got success: {}",
        out.stdout
    );
    let text = format!("{}\n{}", out.stderr, out.stdout).to_lowercase();
    assert!(
        needles.iter().any(|n| text.contains(n)),
        "error does not say what is wrong (wanted one of {needles:?}):\n{}\n--- containerd log ---\n{}",
        out.stderr,
        c.log_tail(30)
    );
}

/// containerd's log (which carries the shim log) from byte `from` on.
fn log_since(c: &Containerd, from: usize) -> String {
    let all = std::fs::read(c.log_path()).unwrap_or_default();
    String::from_utf8_lossy(all.get(from..).unwrap_or_default()).into_owned()
}

fn log_len(c: &Containerd) -> usize {
    std::fs::metadata(c.log_path()).map_or(0, |m| m.len() as usize)
}

// ---------------------------------------------------------------------------------------
// Running programs

#[test]
fn module_from_rootfs_prints_and_leaves_nothing() {
    let c = with_wasm_shim();
    let id = unique_id("hello");
    let out = run_ok(&c, &[], BUSYBOX_WASM_REF, &id, &["/hello.wasm"]);
    assert_eq!(out, HELLO_OUTPUT);
    assert_gone(&c, &id);
}

#[test]
fn wat_text_and_exported_function_run() {
    let c = with_wasm_shim();
    let out = run_ok(
        &c,
        &[],
        BUSYBOX_WASM_REF,
        &unique_id("wat"),
        &[HELLO_WAT_PATH],
    );
    assert_eq!(out, HELLO_OUTPUT);
    let out = run_ok(
        &c,
        &[],
        BUSYBOX_WASM_REF,
        &unique_id("func"),
        &["/hello.wasm#greet"],
    );
    assert_eq!(out, GREET_OUTPUT);
}

#[test]
fn args_and_env_reach_the_guest_not_the_shims() {
    let c = with_wasm_shim();
    for (program, args) in [
        (Program::Echo, vec!["/echo.wasm", "one", "two words"]),
        (Program::CTool, vec!["/ctool.wasm", "echo", "two words"]),
        (
            Program::CToolComponent,
            vec!["/ctool-component.wasm", "echo", "two words"],
        ),
    ] {
        let id = unique_id("echo");
        let out = run_ok(
            &c,
            &["--env", "GREETING=hi there"],
            BUSYBOX_WASM_REF,
            &id,
            &args,
        );
        let lines: Vec<&str> = out.lines().collect();
        for a in &args {
            assert!(
                lines.contains(&format!("arg={a}").as_str()),
                "{program:?}: arg {a:?} missing in {out:?}"
            );
        }
        assert!(
            lines.contains(&"env=GREETING=hi there"),
            "{program:?}: env missing in {out:?}"
        );
        // containerd's variables go to the shim, never to the guest.
        for leaked in ["TTRPC_ADDRESS", "GRPC_ADDRESS", "NAMESPACE="] {
            assert!(
                !out.contains(&format!("env={leaked}")),
                "{program:?}: shim environment {leaked} leaked into the guest: {out:?}"
            );
        }
    }
}

#[test]
fn files_in_rootfs_and_in_a_bind_mount() {
    let c = with_wasm_shim();
    let out = run_ok(
        &c,
        &[],
        BUSYBOX_WASM_REF,
        &unique_id("fileio"),
        &["/fileio.wasm"],
    );
    assert_eq!(out, "read back: written by wasm\n");

    let host = c.dir().join("shared");
    std::fs::create_dir(&host).expect("mkdir");
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        host.display()
    );
    let out = run_ok(
        &c,
        &["--mount", &mount],
        BUSYBOX_WASM_REF,
        &unique_id("cfile"),
        &["/ctool.wasm", "write", "/data/out.txt", "through the mount"],
    );
    assert_eq!(out, "read back: through the mount\n");
    assert_eq!(
        std::fs::read_to_string(host.join("out.txt")).expect("file written by the guest"),
        "through the mount"
    );
}

#[test]
fn file_bind_mount_leaves_the_module_running() {
    // CRI bind-mounts files (/etc/hosts, /etc/resolv.conf, /dev/termination-log): a file
    // mount is reachable through the rootfs preopen and must not fail the start.
    let c = with_wasm_shim();
    let hosts = c.dir().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("write hosts");
    let mount = format!(
        "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
        hosts.display()
    );
    let out = run_ok(
        &c,
        &["--mount", &mount],
        BUSYBOX_WASM_REF,
        &unique_id("filemnt"),
        &["/ctool.wasm", "read", "/etc/hosts"],
    );
    assert_eq!(out, "read back: 127.0.0.1 localhost\n\n");
}

#[test]
fn exit_codes_propagate() {
    let c = with_wasm_shim();
    let out = run_rm(
        &c,
        &[],
        BUSYBOX_WASM_REF,
        &unique_id("exit"),
        &["/exit42.wasm"],
    );
    // A C program's `exit(7)` is in the lifecycle tests, with every backend's.
    assert_eq!(out.status, EXIT42_STATUS, "stderr: {}", out.stderr);
}

#[test]
fn trap_exits_137_with_the_trap_in_the_shim_log() {
    let c = with_wasm_shim();
    let id = unique_id("trap");
    let mark = log_len(&c);
    let out = run_rm(&c, &[], BUSYBOX_WASM_REF, &id, &["/trap.wasm"]);
    assert_eq!(out.status, 137, "stderr: {}", out.stderr);
    assert!(
        wait_until(LONG, || log_since(&c, mark).contains("unreachable")),
        "trap message not in the shim log:\n{}",
        log_since(&c, mark)
    );
    assert_gone(&c, &id);
}

#[test]
fn component_runs_wasi_cli_run() {
    let c = with_wasm_shim();
    let out = run_ok(
        &c,
        &[],
        BUSYBOX_WASM_REF,
        &unique_id("comp"),
        &["/hello-component.wasm"],
    );
    assert_eq!(out, HELLO_OUTPUT);
}

#[test]
fn native_entrypoint_runs_through_the_same_shim() {
    let c = with_wasm_shim();
    let out = run_ok(
        &c,
        &[],
        BUSYBOX_WASM_REF,
        &unique_id("native"),
        &["/bin/echo", "native", "too"],
    );
    assert_eq!(out, "native too\n");
}

#[test]
fn module_and_component_from_oci_wasm_images() {
    let c = with_wasm_shim();
    let ns = c.namespace().to_string();
    for (kind, program) in [
        (WasmImage::Module, Program::Hello),
        (WasmImage::Component, Program::HelloComponent),
    ] {
        let image = format!(
            "localhost/shimtest/{}:1",
            program.file_name().replace('.', "-")
        );
        import_wasm_image(&c, &ns, &image, kind, program).expect("import wasm image");
        let id = unique_id("oci");
        let out = run_ok(&c, &[], &image, &id, &[]);
        assert_eq!(out, HELLO_OUTPUT, "{kind:?}");
        assert_gone(&c, &id);
    }
}

/// busybox `wget -q -O- <url>` run inside container `id` through exec.
fn wget(c: &Containerd, id: &str, url: &str) -> CtrOutput {
    let exec_id = unique_id("wget");
    c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        &exec_id,
        id,
        "wget",
        "-q",
        "-O-",
        url,
    ])
}

/// Asks `url` from inside `id` until the component answers (its server binds after the
/// task is RUNNING); the answer's body.
fn wait_for_answer(c: &Containerd, id: &str, url: &str) -> String {
    wait_status(c, id, "RUNNING");
    let mut last = None;
    let answered = wait_until(LONG, || {
        let out = wget(c, id, url);
        let ok = out.success();
        last = Some(out);
        ok || task_status(c, id).as_deref() != Some("RUNNING")
    });
    let out = last.expect("at least one request");
    assert!(
        answered && out.success(),
        "no answer from the wasi:http component on {url} ({:?}): {}\n--- containerd log ---\n{}",
        task_status(c, id),
        out.stderr,
        c.log_tail(30)
    );
    out.stdout
}

#[test]
fn http_component_answers_on_loopback() {
    let c = with_wasm_shim();
    let id = unique_id("http");
    // Default address 0.0.0.0:8080, in the container's own network namespace: asked from
    // inside it by busybox's wget, run through exec.
    run_detached(&c, &id, BUSYBOX_WASM_REF, &["/http-component.wasm"]);
    assert_eq!(
        wait_for_answer(&c, &id, "http://127.0.0.1:8080/"),
        HTTP_BODY
    );
    // A fresh instance per request: the second answers the same.
    assert_eq!(
        wait_for_answer(&c, &id, "http://127.0.0.1:8080/again?x=1"),
        HTTP_BODY
    );
    remove(&c, &id);
    assert_gone(&c, &id);
}

#[test]
fn http_component_serves_on_the_address_from_its_env() {
    let c = with_wasm_shim();
    let id = unique_id("httpaddr");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        WASM_RUNTIME,
        "--env",
        "WASI_HTTP_ADDR=127.0.0.1:9090",
        BUSYBOX_WASM_REF,
        &id,
        "/http-component.wasm",
    ]);
    assert_eq!(
        wait_for_answer(&c, &id, "http://127.0.0.1:9090/"),
        HTTP_BODY
    );
    let out = wget(&c, &id, "http://127.0.0.1:8080/");
    assert!(
        !out.success(),
        "the default address answered too: {}",
        out.stdout
    );
    remove(&c, &id);
    assert_gone(&c, &id);
}

#[test]
fn http_component_with_a_bad_address_says_so_in_the_shim_log() {
    let c = with_wasm_shim();
    let id = unique_id("httpbad");
    let mark = log_len(&c);
    let out = run_rm(
        &c,
        &["--env", "WASI_HTTP_ADDR=nowhere"],
        BUSYBOX_WASM_REF,
        &id,
        &["/http-component.wasm"],
    );
    assert_eq!(out.status, 137, "stderr: {}", out.stderr);
    assert!(
        wait_until(LONG, || log_since(&c, mark)
            .contains("WASI_HTTP_ADDR=nowhere")),
        "the bad address is not in the shim log:\n{}",
        log_since(&c, mark)
    );
    assert_gone(&c, &id);
}

#[test]
fn http_component_stops_on_sigterm() {
    let c = with_wasm_shim();
    let id = unique_id("httpterm");
    std::thread::scope(|s| {
        // Attached, so ctr's exit status is the container's.
        let run = s.spawn(|| run_rm(&c, &[], BUSYBOX_WASM_REF, &id, &["/http-component.wasm"]));
        assert_eq!(
            wait_for_answer(&c, &id, "http://127.0.0.1:8080/"),
            HTTP_BODY
        );
        c.ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]);
        // `--rm` deletes the task right after its exit: STOPPED or gone.
        let stopped = wait_until(LONG, || {
            !matches!(task_status(&c, &id).as_deref(), Some("RUNNING"))
        });
        assert!(stopped, "the server ignored SIGTERM for {LONG:?}");
        let out = run.join().expect("ctr run thread");
        assert_eq!(
            out.status,
            0,
            "a server stopped by SIGTERM exits cleanly: {}\n--- containerd log ---\n{}",
            out.stderr,
            c.log_tail(30)
        );
        // The guest's stdout is the container's, as for `wasi:cli/run`.
        assert!(
            out.stdout.contains(HTTP_LOG_LINE),
            "no request line on the container's stdout: {:?}",
            out.stdout
        );
    });
    assert_gone(&c, &id);
}

#[test]
fn busy_http_handler_stops_on_sigterm() {
    let c = with_wasm_shim();
    let id = unique_id("httpbusy");
    run_detached(&c, &id, BUSYBOX_WASM_REF, &["/http-busy-component.wasm"]);
    wait_status(&c, &id, "RUNNING");
    let init = task_pid(&c, &id).expect("the server's pid");
    std::thread::scope(|s| {
        // A request whose handler spins on the server's only thread: wget waits while the
        // init burns CPU. One that ends first found no server yet: ask again.
        let mut hanging = None;
        let deadline = Instant::now() + LONG;
        while hanging.is_none() && Instant::now() < deadline {
            let before = cpu_ticks(init).unwrap_or(0);
            let request = s.spawn(|| wget(&c, &id, "http://127.0.0.1:8080/"));
            wait_until(LONG, || {
                request.is_finished() || cpu_ticks(init).unwrap_or(0) >= before + SPINNING
            });
            if !request.is_finished() {
                hanging = Some(request);
            }
        }
        let request = hanging.expect("the busy handler never got a request");
        c.ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]);
        let stopped = wait_until(LONG, || task_status(&c, &id).as_deref() == Some("STOPPED"));
        assert!(
            stopped,
            "a busy handler kept the server from stopping for {LONG:?}"
        );
        let out = request.join().expect("wget thread");
        assert!(!out.success(), "a busy handler answered: {}", out.stdout);
    });
    remove(&c, &id);
    assert_gone(&c, &id);
}

// ---------------------------------------------------------------------------------------
// Signals, exec, stats

#[test]
fn busy_loop_stops_on_sigterm() {
    let c = with_wasm_shim();
    for args in [&["/busy.wasm"][..], &["/ctool.wasm", "busy"][..]] {
        let id = unique_id("busy");
        run_detached(&c, &id, BUSYBOX_WASM_REF, args);
        wait_status(&c, &id, "RUNNING");
        // The guest is in its loop once its init burns CPU.
        let init = task_pid(&c, &id).expect("the guest's pid");
        let before = cpu_ticks(init).unwrap_or(0);
        assert!(
            wait_until(LONG, || cpu_ticks(init).unwrap_or(0) >= before + SPINNING),
            "{args:?} never spun"
        );
        c.ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]);
        let stopped = wait_until(LONG, || task_status(&c, &id).as_deref() == Some("STOPPED"));
        assert!(stopped, "{args:?} ignored SIGTERM for {LONG:?}");
        remove(&c, &id);
        assert_gone(&c, &id);
    }
}

#[test]
fn sigkill_always_works() {
    let c = with_wasm_shim();
    let id = unique_id("kill");
    run_detached(&c, &id, BUSYBOX_WASM_REF, &["/busy.wasm"]);
    wait_status(&c, &id, "RUNNING");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    remove(&c, &id);
    assert_gone(&c, &id);
}

#[test]
fn stats_are_not_empty() {
    let c = with_wasm_shim();
    let id = unique_id("stats");
    run_detached(&c, &id, BUSYBOX_WASM_REF, &["/idle.wasm"]);
    wait_status(&c, &id, "RUNNING");
    let out = c.ctr_ok(&["task", "metrics", &id]).stdout;
    let usage = out
        .lines()
        .filter(|l| l.starts_with("memory.usage"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .max();
    assert!(
        usage.is_some_and(|u| u > 0),
        "no memory usage in ctr task metrics:\n{out}"
    );
    remove(&c, &id);
    assert_gone(&c, &id);
}

/// The content of cgroup file `file` of `controller` for process `pid` (v1 hierarchy, or the
/// unified one with `v2_file`).
fn cgroup_file(pid: u32, controller: &str, file: &str, v2_file: &str) -> String {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = cg.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, names, path) = (f.next()?, f.next()?, f.next()?);
        names.split(',').any(|n| n == controller).then_some(path)
    });
    let path = match v1 {
        Some(path) => format!("/sys/fs/cgroup/{controller}{path}/{file}"),
        None => {
            let path = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            format!("/sys/fs/cgroup{path}/{v2_file}")
        }
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .to_string()
}

#[test]
fn update_writes_new_limits_to_the_cgroup_and_refuses_bad_input() {
    use integration::shim_client::{code, connect, ctx, update_request};
    use protocol::shim::{StateRequest, UpdateTaskRequest};
    let c = with_wasm_shim();
    let id = unique_id("update");
    run_detached(&c, &id, BUSYBOX_WASM_REF, &["/idle.wasm"]);
    wait_status(&c, &id, "RUNNING");
    let shim = connect(&c, &id);
    let update = |json: &str| update_request(&id, json);
    let state = StateRequest {
        id: id.clone(),
        ..Default::default()
    };
    let pid = shim.state(ctx(), &state).unwrap().pid;
    let limit = 96 * 1024 * 1024;
    shim.update(
        ctx(),
        &update(&format!(
            r#"{{"pids":{{"limit":77}},"memory":{{"limit":{limit}}}}}"#
        )),
    )
    .unwrap_or_else(|e| panic!("update: {e:?}\n{}", c.log_tail(20)));
    assert_eq!(cgroup_file(pid, "pids", "pids.max", "pids.max"), "77");
    assert_eq!(
        cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max"),
        limit.to_string()
    );
    for bad in ["not json", r#"{"memory":{"limit":"lots"}}"#] {
        let r = shim.update(ctx(), &update(bad));
        assert_eq!(
            code(&r),
            Some(ttrpc::Code::INVALID_ARGUMENT),
            "{bad}: {r:?}"
        );
    }
    // Unknown container: NOT_FOUND; the limits and the guest are untouched.
    let r = shim.update(
        ctx(),
        &UpdateTaskRequest {
            id: "nope".into(),
            ..update("{}")
        },
    );
    assert_eq!(code(&r), Some(ttrpc::Code::NOT_FOUND), "{r:?}");
    assert_eq!(cgroup_file(pid, "pids", "pids.max", "pids.max"), "77");
    assert_eq!(task_status(&c, &id).as_deref(), Some("RUNNING"));
    remove(&c, &id);
    assert_gone(&c, &id);
}

#[test]
fn exec_without_a_native_binary_is_a_clear_error() {
    let c = with_wasm_shim();
    let ns = c.namespace().to_string();
    let image = "localhost/shimtest/idle-module:1";
    import_wasm_image(&c, &ns, image, WasmImage::Module, Program::Idle).expect("import");
    let id = unique_id("noexec");
    run_detached(&c, &id, image, &[]);
    wait_status(&c, &id, "RUNNING");
    let out = c.ctr_timeout(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "/bin/sh",
            "-c",
            "true",
        ],
        Duration::from_secs(60),
    );
    assert_clear_error(
        &c,
        &out,
        &["/bin/sh", "no such file", "not found", "native"],
    );
    // The container is still fine.
    assert_eq!(task_status(&c, &id).as_deref(), Some("RUNNING"));
    remove(&c, &id);
    assert_gone(&c, &id);
}

// ---------------------------------------------------------------------------------------
// Precompile cache

/// `(digest, labels)` of each blob in `ctr content ls`.
fn content(c: &Containerd) -> Vec<(String, String)> {
    c.ctr_ok(&["content", "ls"])
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').filter(|f| !f.is_empty()).collect();
            Some((f.first()?.to_string(), f.last()?.to_string()))
        })
        .collect()
}

/// The digest a precompile label on `layer` points to, if any: a label whose key mentions
/// "precompile" and whose value is a digest.
fn precompiled_of(c: &Containerd, layer: &str) -> Option<String> {
    let (_, labels) = content(c).into_iter().find(|(d, _)| d == layer)?;
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.to_lowercase().contains("precompile") && v.starts_with("sha256:")).then(|| v.to_string())
    })
}

/// Imports hello as an OCI Wasm image whose module no other test uses (the shim also keeps
/// a node-wide cache, shared by parallel tests); returns the layer digest.
fn import_unique_hello(c: &Containerd, image: &str) -> String {
    let hello = wasm_modules::bytes(Program::Hello).expect("hello");
    let id = unique_id(image);
    let module = wasm_modules::with_custom_section(&hello, "shimtest", id.as_bytes());
    let ns = c.namespace().to_string();
    import_wasm_bytes(c, &ns, image, WasmImage::Module, &module, "/hello.wasm").expect("import");
    layer_digest(&module)
}

#[test]
fn second_run_loads_the_precompiled_artifact() {
    let c = with_wasm_shim();
    let image = "localhost/shimtest/hello-precompile:1";
    let layer = import_unique_hello(&c, image);

    let mark = log_len(&c);
    assert_eq!(run_ok(&c, &[], image, &unique_id("pc1"), &[]), HELLO_OUTPUT);
    let first = log_since(&c, mark);
    assert!(
        first.contains(&format!("compiled {layer}")),
        "first run did not log `compiled {layer}`:\n{first}"
    );
    let artifact = precompiled_of(&c, &layer).unwrap_or_else(|| {
        panic!(
            "no precompile label on layer {layer}:\n{}",
            c.ctr(&["content", "ls"]).stdout
        )
    });
    assert!(
        content(&c).iter().any(|(d, _)| *d == artifact),
        "label points at {artifact}, which is not in the content store"
    );

    let mark = log_len(&c);
    assert_eq!(run_ok(&c, &[], image, &unique_id("pc2"), &[]), HELLO_OUTPUT);
    let second = log_since(&c, mark);
    assert!(
        second.contains("precompiled: cache hit"),
        "second run did not hit the cache:\n{second}"
    );
    assert!(
        !second.contains(&format!("compiled {layer}")),
        "second run compiled again:\n{second}"
    );
}

#[test]
fn corrupt_precompiled_artifact_is_recompiled() {
    let c = with_wasm_shim();
    let image = "localhost/shimtest/hello-corrupt:1";
    let layer = import_unique_hello(&c, image);
    assert_eq!(run_ok(&c, &[], image, &unique_id("cc1"), &[]), HELLO_OUTPUT);
    let artifact = precompiled_of(&c, &layer).expect("precompile label after the first run");

    // The content store keeps blobs as plain files named by digest; overwrite in place, same
    // size, so only the bytes are wrong (containerd does not re-verify on read).
    let blob = c
        .root()
        .join("io.containerd.content.v1.content/blobs/sha256")
        .join(artifact.trim_start_matches("sha256:"));
    let len = std::fs::metadata(&blob).expect("artifact blob").len() as usize;
    std::fs::write(&blob, vec![0xA5u8; len]).expect("corrupt the artifact");

    let mark = log_len(&c);
    let id = unique_id("cc2");
    assert_eq!(run_ok(&c, &[], image, &id, &[]), HELLO_OUTPUT);
    let log = log_since(&c, mark);
    assert!(
        log.contains(&format!("compiled {layer}")),
        "corrupt artifact was not recompiled:\n{log}"
    );
    assert_gone(&c, &id);
}

// ---------------------------------------------------------------------------------------
// Bad input

#[test]
fn not_a_module_is_a_clear_error() {
    let c = with_wasm_shim();
    let id = unique_id("notwasm");
    let out = run_rm(&c, &[], BUSYBOX_WASM_REF, &id, &["/not-a-module.wasm"]);
    assert_clear_error(
        &c,
        &out,
        &[
            "magic",
            "not a wasm",
            "not a webassembly",
            "exec format",
            "invalid",
            "not-a-module",
        ],
    );
    assert_gone(&c, &id);
}

#[test]
fn unknown_host_import_is_a_clear_error() {
    let c = with_wasm_shim();
    let id = unique_id("import");
    let out = run_rm(&c, &[], BUSYBOX_WASM_REF, &id, &["/unknown-import.wasm"]);
    assert_clear_error(&c, &out, &[UNKNOWN_IMPORT]);
    assert_gone(&c, &id);
}

#[test]
fn component_without_run_is_a_clear_error() {
    let c = with_wasm_shim();
    let id = unique_id("norun");
    let out = run_rm(&c, &[], BUSYBOX_WASM_REF, &id, &["/no-run-component.wasm"]);
    assert_clear_error(&c, &out, &["wasi:cli/run", "incoming-handler", "run"]);
    assert_gone(&c, &id);
}

#[test]
fn wasm_image_without_wasm_layer_is_a_clear_error() {
    let c = with_wasm_shim();
    let ns = c.namespace().to_string();
    let image = "localhost/shimtest/no-layer:1";
    import_wasm_image(&c, &ns, image, WasmImage::NoWasmLayer, Program::Hello).expect("import");
    let id = unique_id("nolayer");
    let out = run_rm(&c, &[], image, &id, &[]);
    assert_clear_error(&c, &out, &["layer", "no wasm", "hello.wasm"]);
    assert_gone(&c, &id);
}

#[test]
fn wasm_artifact_config_is_imported() {
    // The CNCF artifact shape imports (our stream processor unpacks it), but ctr 1.6 cannot
    // build a spec from a non-OCI config: what reaches the shim is covered by the OCI shape.
    let c = with_wasm_shim();
    let ns = c.namespace().to_string();
    let image = "localhost/shimtest/artifact:1";
    import_wasm_image(&c, &ns, image, WasmImage::ArtifactV0, Program::Hello).expect("import");
    let images = c.ctr_ok(&["images", "ls", "-q"]).stdout;
    assert!(images.lines().any(|l| l.trim() == image), "{images}");
}

// ---------------------------------------------------------------------------------------
// CRI

#[test]
fn cri_pod_with_pause_wasm_and_native_sidecar() {
    require_root();
    require_wasm_shim();
    assert!(
        target_bin_dir().join("pause").exists(),
        "build the pause binary first"
    );
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .cri(true)
        .start()
        .expect("start containerd with CRI");
    import_busybox_wasm(&c, integration::cri::CRI_NAMESPACE).expect("import busybox-wasm");
    let cri = c.cri_client().expect("CRI client");

    let name = unique_id("wasmpod");
    let pod_cfg = pod_config(&name, &c.dir().join("pods").join(&name));
    let pod = cri
        .run_pod_sandbox(&pod_cfg, HANDLER_WASM)
        .unwrap_or_else(|e| panic!("{e}\n--- containerd log ---\n{}", c.log_tail(30)));
    let start = |name: &str, image: &str, cmd: &[&str]| {
        let id = cri
            .create_container(&pod, &container_config(name, image, cmd), &pod_cfg)
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", c.log_tail(30)));
        cri.start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", c.log_tail(30)));
        id
    };
    let hello = start("hello", BUSYBOX_WASM_REF, &["/hello.wasm"]);
    let idle = start("idle", BUSYBOX_WASM_REF, &["/idle.wasm"]);
    let sidecar = start("sidecar", BUSYBOX_REF, &["sleep", "100000"]);

    assert!(
        wait_until(LONG, || cri.container_status(&hello).is_ok_and(
            |s| s.state == integration::cri::api::ContainerState::ContainerExited as i32
        )),
        "wasm container never exited"
    );
    let status = cri.container_status(&hello).expect("status");
    let log = cri.container_log(&hello).expect("log");
    assert_eq!(
        status.exit_code,
        0,
        "wasm container failed: {status:?}\n--- its log ---\n{}\n--- containerd log ---\n{}",
        log_text(&log, None),
        c.log_tail(40)
    );
    assert_eq!(log_text(&log, Some("stdout")), HELLO_OUTPUT);

    let running = integration::cri::api::ContainerState::ContainerRunning as i32;
    for id in [&idle, &sidecar] {
        assert_eq!(
            cri.container_status(id).expect("status").state,
            running,
            "{id}"
        );
    }
    let out = cri
        .exec_sync(&sidecar, &["echo", "side"], 10)
        .expect("exec");
    assert_eq!((out.stdout.as_slice(), out.exit_code), (&b"side\n"[..], 0));
    // The sidecar shares pause's pid namespace (no namespace options: CRI's POD mode), and
    // still sees its own memory cgroup, read-only, at the usual place.
    let cgroup = "grep -qx \"$(pidof sleep)\" /sys/fs/cgroup/memory/cgroup.procs && echo own; \
                  grep -q ' /sys/fs/cgroup/memory cgroup ro,' /proc/mounts && echo ro; \
                  pidof pause >/dev/null && echo pod";
    let out = cri
        .exec_sync(&sidecar, &["sh", "-c", cgroup], 10)
        .expect("exec");
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), out.exit_code),
        ("own\nro\npod\n", 0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = cri.container_stats(&idle).expect("stats");
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .is_some_and(|w| w.value > 0),
        "no memory figure for the wasm container"
    );
    assert_eq!(shim_daemons(&c).len(), 1, "one shim serves the whole pod");

    cri.stop_pod_sandbox(&pod).expect("stop pod");
    cri.remove_pod_sandbox(&pod).expect("remove pod");
    assert!(
        wait_until(LONG, || c.shim_pids().is_empty()),
        "shim outlived its pod: {:?}",
        c.shim_pids()
    );
    assert_eq!(mounts_mentioning(&pod), Vec::<String>::new());
}

/// A module that grows its linear memory 1 MiB at a time and touches every page.
const GROW_FOREVER_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory 1 65536)
  (func (export "_start")
    (local $p i32)
    (loop $grow
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1))
        (then (call $exit (i32.const 3))))
      (local.set $p (i32.mul (i32.sub (memory.size) (i32.const 16)) (i32.const 65536)))
      (loop $touch
        (i32.store8 (local.get $p) (i32.const 1))
        (local.set $p (i32.add (local.get $p) (i32.const 4096)))
        (br_if $touch (i32.lt_u (local.get $p) (i32.mul (memory.size) (i32.const 65536)))))
      (br $grow))))"#;

#[test]
fn oom_kill_of_a_module_is_reported_before_its_exit() {
    let c = with_wasm_shim();
    c.import_busybox()
        .expect("import busybox (the event log's probe runs it)");
    let events = integration::events::EventLog::start(&c);
    let image = "localhost/shimtest/grow:1";
    let module = wat::parse_str(GROW_FOREVER_WAT).expect("assemble the module");
    let ns = c.namespace().to_string();
    import_wasm_bytes(&c, &ns, image, WasmImage::Module, &module, "/grow.wasm").expect("import");
    let id = unique_id("wasmoom");
    // 64 MiB: the guest's memory lives in the init, so the init is the OOM killer's victim.
    let out = run_rm(&c, &["--memory-limit", "67108864"], image, &id, &[]);
    assert_eq!(out.status, 137, "{out:?}");
    events.assert_oom_before_exit(&id);
}
