//! What an operator sees of a shim. Tracing: task calls sent with a `traceparent` in their
//! ttrpc metadata, as containerd 2.x's client interceptor sends them, come back as server
//! spans of that trace (exported over OTLP/HTTP to a receiver on loopback), with the
//! runtime's commands as child spans and the context carried on in the events the shim
//! forwards; the same through containerd 1.6.20 for the runc and the Wasm shim; with tracing
//! turned off, nothing is sent anywhere. The log: `SIGUSR1` writes
//! the shim's state, naming every container; lines about a request name its container.

use std::path::PathBuf;
use std::time::Duration;

use integration::checks::wait_until;
use integration::conformance::{parse_answer, process_alive, Generation, Playground, TaskApi};
use integration::otlp::{Receiver, Span};
use integration::{require_root, target_bin_dir, unique_id};
use protobuf::well_known_types::empty::Empty;
use protocol::shim::{
    ConnectRequest, ConnectResponse, CreateTaskResponse, DeleteRequest, DeleteResponse,
    KillRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse,
    WaitRequest, WaitResponse,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const V3: &str = "containerd.task.v3.Task";
const V2: &str = "containerd.task.v2.Task";

fn shim(name: &str) -> PathBuf {
    require_root();
    let shim = target_bin_dir().join(name);
    assert!(
        shim.exists(),
        "build the shims first: {} is missing",
        shim.display()
    );
    shim
}

/// A playground for our runc shim with `env` in its environment, as if containerd had it.
fn runc_playground(prefix: &str, env: &[(&str, &str)]) -> Playground {
    let pg = Playground::new(
        &shim("containerd-shim-runc-v2"),
        Generation::V2_3,
        &unique_id(prefix),
    )
    .unwrap();
    for (k, v) in env {
        pg.set_env(k, v);
    }
    pg
}

/// A container's whole life through the daemon, every call carrying our `traceparent`;
/// returns once the daemon has exited (its spans flushed on the way out).
fn traced_lifecycle(pg: &Playground) {
    traced_lifecycle_with(pg, None)
}

/// [`traced_lifecycle`], with `options` on `start`'s stdin.
fn traced_lifecycle_with(pg: &Playground, options: Option<&protobuf::well_known_types::any::Any>) {
    let out = pg.run_start(&pg.start_stdin(options)).unwrap();
    assert!(out.success, "start: {}", out.stderr);
    let answer = parse_answer(pg.generation, &out.stdout).unwrap();
    pg.set_address(&answer.address);
    let mut api = TaskApi::connect(&answer.address, answer.version, &pg.namespace).unwrap();
    api.set_metadata("traceparent", &format!("00-{TRACE}-{PARENT}-01"));
    let id = pg.id.clone();
    let c: ConnectResponse = api
        .call(
            "Connect",
            &ConnectRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    pg.set_shim_pid(c.shim_pid);
    let _: CreateTaskResponse = api
        .call("Create", &pg.create_request(None).unwrap())
        .unwrap();
    let _: StartResponse = api
        .call(
            "Start",
            &StartRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    // A request that fails: its span says so.
    let missing = StateRequest {
        id: "no-such-task".into(),
        ..Default::default()
    };
    assert!(api.call::<_, StateResponse>("State", &missing).is_err());
    let kill = KillRequest {
        id: id.clone(),
        signal: 9,
        ..Default::default()
    };
    let _: Empty = api.call("Kill", &kill).unwrap();
    let _: WaitResponse = api
        .call(
            "Wait",
            &WaitRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    let _: DeleteResponse = api
        .call(
            "Delete",
            &DeleteRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    let _ = api.call::<_, Empty>(
        "Shutdown",
        &ShutdownRequest {
            id,
            ..Default::default()
        },
    );
    assert!(
        wait_until(Duration::from_secs(20), || !process_alive(c.shim_pid)),
        "shim {} still running",
        c.shim_pid
    );
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name} among {spans:#?}"))
}

#[test]
fn task_calls_join_the_callers_trace_with_runtime_commands_and_events_under_them() {
    let receiver = Receiver::start().unwrap();
    // OTEL_SERVICE_NAME: what containerd's own docs set for containerd; the shim names
    // itself instead.
    let pg = runc_playground(
        "traced",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_SERVICE_NAME", "containerd"),
        ],
    );
    traced_lifecycle(&pg);

    let create = format!("{V3}/Create");
    let start = format!("{V3}/Start");
    let kill = format!("{V3}/Kill");
    // runc's start is the shim opening runc's exec fifo: no command, so no span of its own.
    let wanted = [
        create.as_str(),
        start.as_str(),
        kill.as_str(),
        "runc create",
        "runc kill",
    ];
    let spans = receiver.wait_for(&wanted, Duration::from_secs(10));
    eprintln!(
        "the trace as received:\n{}",
        integration::otlp::tree(&spans)
    );
    let create = named(&spans, &create);
    assert_eq!(
        (create.trace_id.as_str(), create.parent_span_id.as_str()),
        (TRACE, PARENT),
        "{create:#?}"
    );
    assert_eq!(create.kind, 2, "a server span: {create:#?}");
    assert_eq!(create.service, "containerd-shim-runc-v2");
    assert_eq!(create.attribute("rpc.system"), Some("ttrpc"));
    assert_eq!(create.attribute("rpc.method"), Some("Create"));
    assert_eq!(create.attribute("rpc.grpc.status_code"), Some("0"));
    let runc_create = named(&spans, "runc create");
    assert_eq!(runc_create.trace_id, TRACE);
    assert_eq!(
        runc_create.parent_span_id, create.span_id,
        "{runc_create:#?}"
    );
    assert_eq!(runc_create.attribute("process.exit.code"), Some("0"));
    let kill = named(&spans, &kill);
    assert_eq!(named(&spans, "runc kill").parent_span_id, kill.span_id);
    let start = named(&spans, &start);
    // Every call became a span of the caller's trace.
    for method in ["Connect", "Start", "Kill", "Wait", "Delete", "Shutdown"] {
        let s = named(&spans, &format!("{V3}/{method}"));
        assert_eq!(
            (s.trace_id.as_str(), s.parent_span_id.as_str()),
            (TRACE, PARENT)
        );
    }
    let state = named(&spans, &format!("{V3}/State"));
    assert_eq!(
        state.status, 2,
        "a failed call is an error span: {state:#?}"
    );
    assert_eq!(
        state.attribute("rpc.grpc.status_code"),
        Some("5"),
        "NOT_FOUND"
    );

    // The events carry the context of the call that caused them: each is forwarded in a
    // client span under that call.
    let events = pg.events.events();
    let forwarded_under = |topic: &str, call: &Span| {
        let traceparent = events
            .iter()
            .find(|e| e.topic == topic)
            .and_then(|e| e.traceparent.clone())
            .unwrap_or_else(|| panic!("{topic} without traceparent: {events:#?}"));
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!((parts[1], parts[3]), (TRACE, "01"), "{traceparent}");
        let forward = spans
            .iter()
            .find(|s| s.span_id == parts[2])
            .unwrap_or_else(|| panic!("{topic}: no span {traceparent} among {spans:#?}"));
        assert!(forward.name.ends_with("/Forward"), "{forward:#?}");
        assert_eq!(forward.kind, 3, "a client span: {forward:#?}");
        assert_eq!(forward.parent_span_id, call.span_id, "{forward:#?}");
        assert_eq!(forward.attribute("rpc.grpc.status_code"), Some("0"));
    };
    forwarded_under("/tasks/create", create);
    forwarded_under("/tasks/start", start);
}

#[test]
fn with_tracing_disabled_the_shim_never_calls_the_endpoint() {
    let receiver = Receiver::start().unwrap();
    let pg = runc_playground(
        "untraced",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    );
    traced_lifecycle(&pg);
    assert_eq!(receiver.requests(), 0, "{:#?}", receiver.spans());
    let events = pg.events.events();
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e.traceparent.is_none()),
        "{events:#?}"
    );
}

#[test]
fn a_collector_that_is_not_there_costs_the_shim_nothing() {
    // Nothing listens on the endpoint: exports fail on the exporter's thread, calls go on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let pg = runc_playground("nocollector", &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    traced_lifecycle(&pg);
    assert!(pg
        .events
        .topics(&pg.id)
        .contains(&"/tasks/exit".to_string()));
}

/// A CRI runtime handler's options can turn tracing on for its shims (a `Tracing` table of
/// `OTEL_*` variables, over containerd's environment): `start` reads them from its stdin
/// and hands them to the daemon it spawns.
#[test]
fn the_runtime_options_can_turn_tracing_on() {
    let receiver = Receiver::start().unwrap();
    let pg = runc_playground("optstraced", &[]);
    let body = format!(
        "[Tracing]\nOTEL_EXPORTER_OTLP_ENDPOINT = {:?}\nOTEL_SERVICE_NAME = \"node-shims\"\n",
        receiver.endpoint()
    );
    let options = protocol::pack(&protocol::runtimeoptions::Options {
        config_body: body.into_bytes(),
        ..Default::default()
    })
    .unwrap();
    traced_lifecycle_with(&pg, Some(&options));
    let create = format!("{V3}/Create");
    let spans = receiver.wait_for(&[&create, "runc create"], Duration::from_secs(10));
    let create = named(&spans, &create);
    assert_eq!(create.service, "node-shims");
    assert_eq!(
        (create.trace_id.as_str(), create.parent_span_id.as_str()),
        (TRACE, PARENT)
    );
    assert_eq!(named(&spans, "runc create").parent_span_id, create.span_id);
}

/// A private containerd whose environment names `receiver` as the OTLP endpoint, so its
/// shims inherit it.
fn traced_containerd(receiver: &Receiver) -> integration::Containerd {
    integration::Containerd::builder()
        .bin_dir(target_bin_dir())
        .otlp_endpoint(receiver.endpoint())
        .start()
        .expect("start containerd")
}

/// What containerd 1.6 gives a shim to trace with: its environment (the shim inherits
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), but no trace context — its shim client has no tracing
/// interceptor, so every call arrives without `traceparent` and each becomes a root span.
/// (Debian's 1.6.20 build also has no tracing plugin: containerd itself exports nothing.)
#[test]
fn through_containerd_16_each_call_is_a_root_span_with_its_runtime_commands_under_it() {
    require_root();
    let receiver = Receiver::start().unwrap();
    let c = traced_containerd(&receiver);
    c.import_busybox().expect("import busybox image");
    let id = unique_id("ctd-traced");
    c.ctr_ok(&["run", "--rm", integration::BUSYBOX_REF, &id, "true"]);
    let wanted = [
        format!("{V2}/Create"),
        format!("{V2}/Start"),
        format!("{V2}/Delete"),
        "runc create".to_string(),
        "runc delete".to_string(),
    ];
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let spans = receiver.wait_for(&wanted, Duration::from_secs(15));
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "containerd-shim-runc-v2")
        .collect();
    for s in ours.iter().filter(|s| s.name.starts_with(V2)) {
        assert!(
            s.parent_span_id.is_empty(),
            "containerd 1.6 sent a parent: {s:#?}"
        );
    }
    let create = named(&spans, &format!("{V2}/Create"));
    let runc = named(&spans, "runc create");
    assert_eq!(
        (runc.trace_id.as_str(), runc.parent_span_id.as_str()),
        (create.trace_id.as_str(), create.span_id.as_str())
    );
    let delete = named(&spans, &format!("{V2}/Delete"));
    assert_eq!(named(&spans, "runc delete").parent_span_id, delete.span_id);
}

/// The Wasm shim traces the same way, its work under each call: the module prepared
/// (compiled or its precompiled artifact fetched) and libcontainer's create, start, delete.
#[test]
fn through_containerd_16_the_wasm_shims_calls_have_its_work_under_them() {
    require_root();
    integration::wasm_fixture::require_wasm_shim();
    let receiver = Receiver::start().unwrap();
    let c = traced_containerd(&receiver);
    let ns = c.namespace().to_string();
    integration::wasm_fixture::import_busybox_wasm(&c, &ns).expect("import busybox-wasm");
    let id = unique_id("wasm-traced");
    let ref_ = integration::wasm_fixture::BUSYBOX_WASM_REF;
    let run = [
        "run",
        "--rm",
        "--runtime",
        integration::WASM_RUNTIME,
        ref_,
        &id,
        "/hello.wasm",
    ];
    c.ctr_ok(&run);
    let calls = ["Create", "Start", "Delete"].map(|m| format!("{V2}/{m}"));
    let work = [
        ("Create", "wasm prepare"),
        ("Create", "libcontainer create"),
        ("Start", "libcontainer start"),
        ("Delete", "libcontainer delete"),
    ];
    let mut wanted: Vec<&str> = calls.iter().map(String::as_str).collect();
    wanted.extend(work.iter().map(|(_, w)| *w));
    let spans = receiver.wait_for(&wanted, Duration::from_secs(15));
    let spans: Vec<Span> = spans
        .into_iter()
        .filter(|s| s.service == "containerd-shim-wasm-v2")
        .collect();
    for (call, child) in work {
        let call = named(&spans, &format!("{V2}/{call}"));
        let child = named(&spans, child);
        assert_eq!(
            (child.trace_id.as_str(), child.parent_span_id.as_str()),
            (call.trace_id.as_str(), call.span_id.as_str()),
            "{child:#?} is not under {call:#?}"
        );
    }
}

fn shim_log_lines(c: &integration::Containerd, needle: &str) -> Vec<String> {
    std::fs::read_to_string(c.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn sigusr1_writes_the_shims_state_naming_every_container_and_the_shim_serves_on() {
    let c = integration::fixture::with_our_shims();
    let ids = [unique_id("usr1-a"), unique_id("usr1-b")];
    for id in &ids {
        integration::fixture::run_sleeping(&c, "io.containerd.runc.v2", id);
    }
    let shims = c.shim_pids();
    assert_eq!(shims.len(), 2, "one shim per container: {shims:?}");
    for pid in &shims {
        // SAFETY: kill(2) on a pid of a shim this test's containerd started.
        assert_eq!(unsafe { libc::kill(*pid, libc::SIGUSR1) }, 0);
    }
    for id in &ids {
        let needle = format!("state: container {id}: init pid");
        let logged = || !shim_log_lines(&c, &needle).is_empty();
        assert!(
            wait_until(Duration::from_secs(10), logged),
            "no state line for {id}:\n{}",
            c.log_tail(40)
        );
        let line = shim_log_lines(&c, &needle).remove(0);
        assert!(
            line.contains(" running;") && line.contains("0 exits queued"),
            "{line}"
        );
    }
    let summaries = shim_log_lines(&c, "state: shim pid");
    assert_eq!(summaries.len(), 2, "{summaries:#?}");
    assert!(
        summaries.iter().all(|l| l.contains("threads, rss")),
        "{summaries:#?}"
    );
    assert!(shim_log_lines(&c, "state: 1 containers (0 being created").len() == 2);
    // The shims go on serving: each container still answers and ends as asked.
    for id in &ids {
        let out = c.ctr_ok(&["task", "ls"]);
        assert!(out.stdout.contains(id.as_str()), "{}", out.stdout);
        c.ctr_ok(&["task", "kill", "-s", "KILL", id]);
        integration::fixture::wait_status(&c, id, "STOPPED");
        c.ctr_ok(&["task", "delete", id]);
        c.ctr_ok(&["container", "delete", id]);
    }
}

#[test]
fn a_debug_shims_log_lines_about_a_request_name_its_container() {
    require_root();
    let c = integration::Containerd::builder()
        .bin_dir(target_bin_dir())
        .log_level("debug")
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox image");
    let id = unique_id("logid");
    integration::fixture::run_sleeping(&c, "io.containerd.runc.v2", &id);
    let out = c.ctr(&["task", "exec", "--exec-id", "nope", &id, "/no/such/binary"]);
    assert!(!out.success(), "{out:?}");
    let needle = format!("id={id}");
    let logged = || !shim_log_lines(&c, &needle).is_empty();
    assert!(
        wait_until(Duration::from_secs(10), logged),
        "no shim line names {id}:\n{}",
        c.log_tail(60)
    );
    c.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    integration::fixture::wait_status(&c, &id, "STOPPED");
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
}
