//! Playing containerd to a shim binary, without containerd: the pieces of the
//! `shim-conformance` runner, reusable from tests.
//!
//! A [`Playground`] holds what containerd would have prepared: a temp dir with a busybox
//! rootfs (laid out from `/usr/bin/busybox`, no snapshotter and no mounts — `root.path`
//! points at it), a bundle with `config.json` and the `log` fifo, a ttrpc events service
//! (`containerd.services.events.ttrpc.v1.Events/Forward`) on its own socket, and stdio
//! fifos. It runs the shim's `start` with the flags, env and stdin of one containerd
//! [`Generation`], parses the answer as that generation would, and talks the task API
//! (`containerd.task.v2.Task` or `v3`, as the answer selects). [`run_lifecycle`] walks one
//! container through create, start, exec, kill, wait, delete and shutdown, then the `delete`
//! action, and reports a [`Step`] per check.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::{Enum, Message};
use protocol::bootstrap::{BootstrapParams, BootstrapResult, Extension};
use protocol::events::{Envelope, ForwardRequest};
use protocol::events_ttrpc::{create_events, Events};
use protocol::shim::{
    ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, ExecProcessRequest, KillRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, WaitRequest, WaitResponse,
};
use sha2::{Digest, Sha256};

use crate::checks::wait_until;

mod sandbox;
pub use sandbox::run_sandbox_pod;

/// The containerd release whose shim contract to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// 1.6: env `TTRPC_ADDRESS`; stdin the options `Any`; only a plain address is understood.
    V1_6,
    /// 1.7: adds `GRPC_ADDRESS`, `NAMESPACE`, `MAX_SHIM_VERSION=2`; JSON answers up to version 2.
    V1_7,
    /// 2.0–2.2: same env and stdin as 1.7; JSON answers up to version 3 (task API v3).
    V2_0,
    /// 2.3+: stdin is a protobuf `BootstrapParams`; the answer may be a `BootstrapResult`.
    V2_3,
}

impl Generation {
    /// Every generation, oldest first.
    pub const ALL: [Generation; 4] = [
        Generation::V1_6,
        Generation::V1_7,
        Generation::V2_0,
        Generation::V2_3,
    ];

    /// The `ociVersion` this generation writes into `config.json`: the runtime-spec its Go
    /// module vendors (1.6.20 writes 1.0.2-dev, as measured here; 2.3 writes 1.3.0).
    pub fn oci_version(self) -> &'static str {
        match self {
            Generation::V1_6 => "1.0.2-dev",
            Generation::V1_7 => "1.1.0",
            Generation::V2_0 => "1.2.0",
            Generation::V2_3 => "1.3.0",
        }
    }
}

impl std::str::FromStr for Generation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.6" => Ok(Generation::V1_6),
            "1.7" => Ok(Generation::V1_7),
            "2.0" | "2.1" | "2.2" => Ok(Generation::V2_0),
            "2.3" => Ok(Generation::V2_3),
            other => Err(format!(
                "unknown containerd generation {other:?} (want 1.6, 1.7, 2.0 or 2.3)"
            )),
        }
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Generation::V1_6 => "1.6",
            Generation::V1_7 => "1.7",
            Generation::V2_0 => "2.0",
            Generation::V2_3 => "2.3",
        })
    }
}

/// The form `start` answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerForm {
    Plain,
    Json,
    BootstrapResult,
}

/// What containerd of a generation makes of `start`'s stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub form: AnswerForm,
    pub address: String,
    /// The task API version containerd will use: 2 → `containerd.task.v2.Task`, 3 → v3.
    pub version: u32,
}

/// Parses `stdout` of `start` exactly as containerd of `generation` does, refusing what it
/// would refuse.
pub fn parse_answer(generation: Generation, stdout: &[u8]) -> Result<Answer, String> {
    if generation == Generation::V2_3 {
        // 2.3 tries the protobuf first (a plain or JSON answer fails to decode as one).
        if let Ok(r) = BootstrapResult::parse_from_bytes(stdout) {
            if !r.address.is_empty() {
                let version = u32::try_from(r.version).unwrap_or(0);
                return check_answer(
                    generation,
                    AnswerForm::BootstrapResult,
                    r.address,
                    version,
                    &r.protocol,
                );
            }
        }
    }
    let text = String::from_utf8_lossy(stdout).trim().to_string();
    if generation == Generation::V1_6 {
        if text.starts_with('{') {
            return Err(format!(
                "containerd 1.6 only understands a plain address, got JSON {text:?}"
            ));
        }
        return check_answer(generation, AnswerForm::Plain, text, 2, "ttrpc");
    }
    let json = serde_json::from_str::<serde_json::Value>(&text).ok();
    let field = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let version = json
        .as_ref()
        .and_then(|j| j.get("version"))
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0);
    match json {
        Some(_) if version >= 2 => check_answer(
            generation,
            AnswerForm::Json,
            field("address"),
            u32::try_from(version).unwrap_or(u32::MAX),
            &field("protocol"),
        ),
        // containerd takes anything else as a legacy plain address, version 2 over ttrpc.
        _ => check_answer(generation, AnswerForm::Plain, text, 2, "ttrpc"),
    }
}

fn check_answer(
    generation: Generation,
    form: AnswerForm,
    address: String,
    version: u32,
    protocol: &str,
) -> Result<Answer, String> {
    let max = match generation {
        Generation::V1_6 | Generation::V1_7 => 2,
        Generation::V2_0 | Generation::V2_3 => 3,
    };
    if version > max {
        return Err(format!(
            "unsupported shim version ({version}): containerd {generation} accepts up to {max}"
        ));
    }
    if !protocol.eq_ignore_ascii_case("ttrpc") {
        return Err(format!(
            "protocol {protocol:?}: this runner speaks ttrpc only"
        ));
    }
    if address.is_empty() || address.contains('\n') {
        return Err(format!("{address:?} is not an address"));
    }
    Ok(Answer {
        form,
        address,
        version,
    })
}

/// One check of the run.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Every check of a run, in order.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    /// Records a check and returns whether it passed.
    pub fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.steps.push(Step {
            name: name.to_string(),
            ok,
            detail,
        });
        ok
    }

    pub fn passed(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.ok)
    }

    pub fn failures(&self) -> Vec<&Step> {
        self.steps.iter().filter(|s| !s.ok).collect()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.steps {
            writeln!(
                f,
                "{} {:<22} {}",
                if s.ok { "PASS" } else { "FAIL" },
                s.name,
                s.detail
            )?;
        }
        Ok(())
    }
}

/// One event the shim forwarded.
#[derive(Debug, Clone)]
pub struct ForwardedEvent {
    pub namespace: String,
    pub topic: String,
    pub event: Any,
    /// The `traceparent` the `Forward` request carried in its metadata.
    pub traceparent: Option<String>,
}

impl ForwardedEvent {
    /// `(container_id, id or exec_id, exit_status)` of a task event, by its type.
    pub fn ids(&self) -> (String, String, u32) {
        use protocol::task_events::*;
        let name = self.event.type_url.rsplit('/').next().unwrap_or_default();
        let v = &self.event.value;
        match name {
            "containerd.events.TaskCreate" => TaskCreate::parse_from_bytes(v)
                .map(|e| (e.container_id, String::new(), 0))
                .unwrap_or_default(),
            "containerd.events.TaskStart" => TaskStart::parse_from_bytes(v)
                .map(|e| (e.container_id, String::new(), 0))
                .unwrap_or_default(),
            "containerd.events.TaskExit" => TaskExit::parse_from_bytes(v)
                .map(|e| (e.container_id, e.id, e.exit_status))
                .unwrap_or_default(),
            "containerd.events.TaskDelete" => TaskDelete::parse_from_bytes(v)
                .map(|e| (e.container_id, e.id, e.exit_status))
                .unwrap_or_default(),
            "containerd.events.TaskExecAdded" => TaskExecAdded::parse_from_bytes(v)
                .map(|e| (e.container_id, e.exec_id, 0))
                .unwrap_or_default(),
            "containerd.events.TaskExecStarted" => TaskExecStarted::parse_from_bytes(v)
                .map(|e| (e.container_id, e.exec_id, 0))
                .unwrap_or_default(),
            _ => Default::default(),
        }
    }
}

/// containerd's side of `Events/Forward`: records every envelope.
#[derive(Default, Clone)]
pub struct EventSink {
    events: Arc<Mutex<Vec<ForwardedEvent>>>,
}

impl EventSink {
    pub fn events(&self) -> Vec<ForwardedEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `topic` of each event about `container`, in arrival order.
    pub fn topics(&self, container: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.ids().0 == container)
            .map(|e| e.topic)
            .collect()
    }
}

impl Events for EventSink {
    fn forward(&self, ctx: &ttrpc::TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        let traceparent = ctx
            .metadata
            .get("traceparent")
            .and_then(|v| v.first().cloned());
        let Envelope {
            namespace,
            topic,
            event,
            ..
        } = req.envelope.unwrap_or_default();
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ForwardedEvent {
                namespace,
                topic,
                event: event.unwrap_or_default(),
                traceparent,
            });
        Ok(Empty::new())
    }
}

/// The task API under the name the answer selected (`containerd.task.v2.Task` or `v3`):
/// the generated client hard-codes v2, so requests are built here.
pub struct TaskApi {
    client: ttrpc::Client,
    service: &'static str,
    namespace: String,
    /// Metadata sent with every call besides the namespace (a `traceparent`).
    metadata: Vec<(String, String)>,
}

/// How long a task API call may take before the runner calls it a failure.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl TaskApi {
    pub fn connect(address: &str, version: u32, namespace: &str) -> Result<TaskApi, String> {
        let service = if version >= 3 {
            protocol::TASK_SERVICE_V3
        } else {
            protocol::TASK_SERVICE_V2
        };
        let client =
            ttrpc::Client::connect(address).map_err(|e| format!("connect to {address}: {e}"))?;
        Ok(TaskApi {
            client,
            service,
            namespace: namespace.to_string(),
            metadata: Vec::new(),
        })
    }

    /// Sends `key: value` in the metadata of every later call, as containerd 2.x's client
    /// interceptor sends `traceparent`.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value.to_string()));
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    /// One unary call; the namespace travels in the metadata, as containerd sends it.
    pub fn call<Req: Message, Resp: Message>(
        &self,
        method: &str,
        req: &Req,
    ) -> ttrpc::Result<Resp> {
        self.call_on(self.service, method, req, Some(CALL_TIMEOUT))
    }

    /// A unary call of another service on the same connection (the sandbox API), with
    /// `timeout` (`None`: none, as containerd's `WaitSandbox`).
    pub fn call_on<Req: Message, Resp: Message>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> ttrpc::Result<Resp> {
        let payload = req
            .write_to_bytes()
            .map_err(|e| ttrpc::Error::Others(format!("encode {method}: {e}")))?;
        let mut creq = ttrpc::Request::new();
        creq.set_service(service.to_string());
        creq.set_method(method.to_string());
        creq.set_timeout_nano(timeout.map_or(0, |t| t.as_nanos() as i64));
        let mut md = HashMap::new();
        md.insert(
            "containerd-namespace-ttrpc".to_string(),
            vec![self.namespace.clone()],
        );
        for (k, v) in &self.metadata {
            md.insert(k.clone(), vec![v.clone()]);
        }
        creq.set_metadata(ttrpc::context::to_pb(md));
        creq.payload = payload;
        let res = self.client.request(creq)?;
        Resp::parse_from_bytes(&res.payload)
            .map_err(|e| ttrpc::Error::Others(format!("decode {method} answer: {e}")))
    }
}

/// How a failed call reads in a report: the status code and message.
pub fn describe(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

/// What `start` printed and how it exited.
#[derive(Debug, Clone)]
pub struct StartOutput {
    pub success: bool,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// A fifo the runner reads like containerd's stdio copier, kept open for reading and writing
/// so it never reports EOF before the shim opens it.
struct FifoReader {
    path: PathBuf,
    data: Arc<Mutex<Vec<u8>>>,
}

impl FifoReader {
    fn new(path: PathBuf) -> Result<FifoReader, String> {
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| format!("mkfifo {}: {e}", path.display()))?;
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let data = Arc::new(Mutex::new(Vec::new()));
        let sink = data.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Ok(FifoReader { path, data })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// containerd's part of a shim's life, in a temp dir.
pub struct Playground {
    pub shim: PathBuf,
    pub generation: Generation,
    pub namespace: String,
    pub id: String,
    /// The stand-in for containerd's gRPC address: only hashed into the socket name.
    pub containerd_address: String,
    /// Where the events service listens (a plain path, as containerd passes it).
    pub ttrpc_address: String,
    pub events: EventSink,
    dir: tempfile::TempDir,
    server: Option<ttrpc::Server>,
    log: FifoReader,
    fifos: Mutex<Vec<FifoReader>>,
    /// The shim daemon's pid, once `Connect` told it.
    shim_pid: Mutex<Option<u32>>,
    /// The address `start` answered with, once it did.
    address: Mutex<Option<String>>,
    /// `CreateTaskRequest.rootfs`: none unless [`Playground::use_layered_rootfs`].
    rootfs_mounts: Mutex<Vec<protocol::mount::Mount>>,
    /// Environment the shim binary gets besides containerd's (`OTEL_*`).
    env: Mutex<Vec<(String, String)>>,
}

impl Playground {
    /// Lays out rootfs, bundle and events service for container `id`.
    pub fn new(shim: &Path, generation: Generation, id: &str) -> Result<Playground, String> {
        if !shim.is_file() {
            return Err(format!("shim binary {} not found", shim.display()));
        }
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        // A run killed before drop (a test ended at its time bound) is swept by the next.
        crate::containerd::write_owner(dir.path()).map_err(|e| e.to_string())?;
        let rootfs = dir.path().join("rootfs");
        busybox_rootfs(&rootfs)?;
        // containerd's layout, `<state>/<namespace>/<id>`: Go shims find the container by
        // the bundle directory's name in their `delete` action.
        let bundle = dir.path().join(NAMESPACE).join(id);
        // containerd always makes bundle/rootfs; shims unmount it in `delete`.
        fs::create_dir_all(bundle.join("rootfs")).map_err(|e| format!("create bundle: {e}"))?;
        let mut spec = spec(&rootfs, &["sh", "-c", "echo init-out; exec sleep 1000"]);
        spec["ociVersion"] = generation.oci_version().into();
        fs::write(bundle.join("config.json"), spec.to_string())
            .map_err(|e| format!("write config.json: {e}"))?;
        // containerd creates the shim log fifo before `start` and copies it to its own log;
        // Go shims open it and fail if it is missing.
        let log = FifoReader::new(bundle.join("log"))?;

        let events_sock = dir.path().join("events.sock");
        let sink = EventSink::default();
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", events_sock.display()))
            .map_err(|e| format!("bind events service: {e}"))?
            .register_service(create_events(Arc::new(sink.clone())));
        server
            .start()
            .map_err(|e| format!("start events service: {e}"))?;
        Ok(Playground {
            shim: shim.to_path_buf(),
            generation,
            namespace: NAMESPACE.into(),
            id: id.to_string(),
            containerd_address: dir.path().join("containerd.sock").display().to_string(),
            ttrpc_address: events_sock.display().to_string(),
            events: sink,
            dir,
            server: Some(server),
            log,
            fifos: Mutex::new(Vec::new()),
            shim_pid: Mutex::new(None),
            address: Mutex::new(None),
            rootfs_mounts: Mutex::new(Vec::new()),
            env: Mutex::new(Vec::new()),
        })
    }

    /// Where [`Playground::use_layered_rootfs`] keeps its image files.
    pub fn layers(&self) -> PathBuf {
        self.dir.path().join("layers")
    }

    /// Switches the container to [`RootfsLayout::Layered`]: makes `layer.erofs` from the
    /// busybox rootfs with `mkfs.erofs`, points the spec's `root.path` at `<bundle>/rootfs`,
    /// has the init write `/layered`, and sends the EROFS snapshotter's block-mode mounts.
    pub fn use_layered_rootfs(&self) -> Result<Vec<protocol::mount::Mount>, String> {
        use protocol::mount::Mount;
        let layers = self.layers();
        fs::create_dir_all(&layers).map_err(|e| format!("create {}: {e}", layers.display()))?;
        let erofs = layers.join("layer.erofs");
        let out = Command::new("mkfs.erofs")
            .args(["--quiet", "-Enoinline_data"])
            .arg(&erofs)
            .arg(self.rootfs())
            .output()
            .map_err(|e| format!("run mkfs.erofs (apt install erofs-utils): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mkfs.erofs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let config = self.bundle().join("config.json");
        let mut spec: serde_json::Value = fs::read(&config)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("read back config.json")?;
        spec["root"]["path"] = "rootfs".into();
        spec["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "echo layered > /layered; echo init-out; exec sleep 1000"
        ]);
        fs::write(&config, spec.to_string()).map_err(|e| format!("write config.json: {e}"))?;
        let m = |type_: &str, source: &Path, options: &[&str]| Mount {
            type_: type_.into(),
            source: source.display().to_string(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        };
        let mounts = vec![
            m(
                "mkfs/ext4",
                &layers.join("rwlayer.img"),
                &[
                    "X-containerd.mkfs.fs=ext4",
                    "X-containerd.mkfs.size=16777216",
                    "rw",
                    "loop",
                ],
            ),
            m("erofs", &erofs, &["ro", "loop"]),
            m(
                "format/mkdir/overlay",
                Path::new("overlay"),
                &[
                    "X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
                    "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
                    "workdir={{ mount 0 }}/work",
                    "upperdir={{ mount 0 }}/upper",
                    "lowerdir={{ mount 1 }}",
                ],
            ),
        ];
        *self.rootfs_mounts.lock().unwrap_or_else(|p| p.into_inner()) = mounts.clone();
        Ok(mounts)
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join(&self.namespace).join(&self.id)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// What the shim wrote to the bundle's `log` fifo so far.
    pub fn shim_log(&self) -> String {
        self.log.text()
    }

    /// The socket a shim following containerd's naming (sha256 of address/namespace/id under
    /// `/run/containerd/s`) binds for this container.
    pub fn default_socket(&self) -> PathBuf {
        let digest = Sha256::digest(
            format!("{}/{}/{}", self.containerd_address, self.namespace, self.id).as_bytes(),
        );
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// What containerd of this generation writes on `start`'s stdin.
    pub fn start_stdin(&self, options: Option<&Any>) -> Vec<u8> {
        match self.generation {
            Generation::V2_3 => {
                let mut p = BootstrapParams {
                    instance_id: self.id.clone(),
                    namespace: self.namespace.clone(),
                    containerd_version: "v2.3.0".into(),
                    containerd_ttrpc_address: self.ttrpc_address.clone(),
                    containerd_grpc_address: self.containerd_address.clone(),
                    containerd_binary: self.publish_binary(),
                    ..Default::default()
                };
                if let Some(o) = options {
                    p.extensions.push(Extension {
                        value: protobuf::MessageField::some(o.clone()),
                        ..Default::default()
                    });
                }
                p.write_to_bytes().unwrap_or_default()
            }
            _ => options
                .and_then(|o| o.write_to_bytes().ok())
                .unwrap_or_default(),
        }
    }

    fn publish_binary(&self) -> String {
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Runs `<shim> ... start` with this generation's flags, env and `stdin`.
    pub fn run_start(&self, stdin: &[u8]) -> Result<StartOutput, String> {
        let out = self.shim_command("start", stdin)?;
        Ok(out)
    }

    /// Runs `<shim> ... -bundle <bundle> delete` and decodes its `DeleteResponse`.
    pub fn run_delete_action(&self) -> Result<(StartOutput, Option<DeleteResponse>), String> {
        let out = self.shim_command("delete", &[])?;
        let resp = if out.success {
            DeleteResponse::parse_from_bytes(&out.stdout).ok()
        } else {
            None
        };
        Ok((out, resp))
    }

    fn shim_command(&self, action: &str, stdin: &[u8]) -> Result<StartOutput, String> {
        let mut cmd = Command::new(&self.shim);
        cmd.args(["-namespace", &self.namespace])
            .args(["-address", &self.containerd_address])
            .args(["-publish-binary", &self.publish_binary()])
            .args(["-id", &self.id]);
        if action == "delete" {
            cmd.args(["-bundle", &self.bundle().display().to_string()]);
        }
        cmd.arg(action).current_dir(self.bundle());
        for k in [
            "TTRPC_ADDRESS",
            "GRPC_ADDRESS",
            "NAMESPACE",
            "MAX_SHIM_VERSION",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("GOMAXPROCS", "2")
            .env("TTRPC_ADDRESS", &self.ttrpc_address);
        for (k, v) in self.env.lock().unwrap().iter() {
            cmd.env(k, v);
        }
        if self.generation != Generation::V1_6 {
            cmd.env("GRPC_ADDRESS", &self.containerd_address)
                .env("NAMESPACE", &self.namespace)
                .env("MAX_SHIM_VERSION", "2");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("run {} {action}: {e}", self.shim.display()))?;
        if let Some(mut w) = child.stdin.take() {
            let data = stdin.to_vec();
            // A shim that never reads stdin must not block us: write from a thread.
            std::thread::spawn(move || {
                let _ = std::io::Write::write_all(&mut w, &data);
            });
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait for {action}: {e}"))?;
        Ok(StartOutput {
            success: out.status.success(),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// Runs the shim binary with `key=value` in its environment, as if containerd had it.
    pub fn set_env(&self, key: &str, value: &str) {
        self.env
            .lock()
            .unwrap()
            .push((key.to_string(), value.to_string()));
    }

    /// A new fifo for a process's stdout or stderr, read in the background.
    pub fn fifo(&self, name: &str) -> Result<String, String> {
        let path = self.dir.path().join(name);
        let reader = FifoReader::new(path.clone())?;
        self.fifos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reader);
        Ok(path.display().to_string())
    }

    /// What arrived on the fifo named `name` so far.
    pub fn fifo_text(&self, name: &str) -> String {
        let path = self.dir.path().join(name);
        self.fifos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|f| f.path == path)
            .map(FifoReader::text)
            .unwrap_or_default()
    }

    /// A `CreateTaskRequest` for the init process with stdout/stderr on fresh fifos.
    pub fn create_request(&self, options: Option<&Any>) -> Result<CreateTaskRequest, String> {
        Ok(CreateTaskRequest {
            id: self.id.clone(),
            bundle: self.bundle().display().to_string(),
            stdout: self.fifo("init-stdout")?,
            stderr: self.fifo("init-stderr")?,
            options: options.cloned().into(),
            rootfs: self
                .rootfs_mounts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            ..Default::default()
        })
    }

    /// Remembers the daemon's pid so [`Drop`] can make sure it is gone.
    pub fn set_shim_pid(&self, pid: u32) {
        *self.shim_pid.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
    }

    pub fn shim_pid(&self) -> Option<u32> {
        *self.shim_pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The daemon serving the address `start` answered, found by its command line (it is
    /// started with `-socket ADDRESS`): for a walk that failed before `Connect` told it.
    pub fn daemon_pid(&self) -> Option<u32> {
        let address = self
            .address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let found = crate::checks::processes_mentioning(&format!("-socket {address}"));
        found.first().map(|(pid, _)| *pid as u32)
    }

    /// Remembers where the shim serves so [`Drop`] can remove a socket a killed shim left.
    pub fn set_address(&self, address: &str) {
        *self.address.lock().unwrap_or_else(|p| p.into_inner()) = Some(address.to_string());
    }
}

impl Drop for Playground {
    /// A failed run must not leave a daemon or container behind: SIGKILL the daemon (its
    /// container dies with its pid namespace), clean runc's state, stop the events service.
    fn drop(&mut self) {
        if let Some(pid) = self.shim_pid() {
            if process_alive(pid) {
                // SAFETY: plain kill(2) of a pid this playground's shim reported as its own.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let state = PathBuf::from("/run/containerd/runc")
            .join(&self.namespace)
            .join(&self.id);
        if state.exists() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(PathBuf::from("/run/containerd/runc").join(&self.namespace))
                .args(["delete", "--force", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let socket = self
            .address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .map(|a| PathBuf::from(a.trim_start_matches("unix://")))
            .unwrap_or_else(|| self.default_socket());
        if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let _ = fs::remove_file(&socket);
        }
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
    }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A busybox rootfs in `dir`: the static binary and a link per applet the run uses.
pub fn busybox_rootfs(dir: &Path) -> Result<(), String> {
    let busybox = Path::new(crate::image::BUSYBOX_BINARY);
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        fs::create_dir_all(dir.join(d)).map_err(|e| format!("create rootfs/{d}: {e}"))?;
    }
    let target = dir.join("bin/busybox");
    fs::copy(busybox, &target).map_err(|e| {
        format!(
            "copy {} (apt install busybox-static): {e}",
            busybox.display()
        )
    })?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod busybox: {e}"))?;
    for applet in [
        "sh", "echo", "sleep", "true", "cat", "ls", "kill", "hostname", "ip", "grep", "ping",
    ] {
        symlink("busybox", dir.join("bin").join(applet))
            .map_err(|e| format!("link {applet}: {e}"))?;
    }
    File::create(dir.join("etc/passwd")).map_err(|e| format!("create etc/passwd: {e}"))?;
    Ok(())
}

/// An OCI runtime spec like `runc spec`'s, running `args`, with `root.path` at `rootfs`.
pub fn spec(rootfs: &Path, args: &[&str]) -> serde_json::Value {
    let caps = serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs.display().to_string(), "readonly": false},
        "hostname": "conformance",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// What to run: which shim, as which containerd, with which options.
#[derive(Debug, Clone)]
pub struct Config {
    pub shim: PathBuf,
    pub generation: Generation,
    /// The runtime options `Any` containerd would pass (stdin of `start` and `Create`).
    pub runtime_options: Option<Any>,
    /// Container id; runc state is host-wide, so make it unique.
    pub id: String,
    /// Play a daemon that has only its ttrpc socket, as containerd-compatible daemons and
    /// shim test tools do: `-address` and `GRPC_ADDRESS` name the socket its events service
    /// listens on, which speaks no gRPC.
    pub one_socket: bool,
    /// The shim runs pods in VMs: the pids it reports are guest pids, which the host's
    /// `/proc` knows nothing of (the sandbox walk checks from inside instead).
    pub in_vm: bool,
    /// How containerd hands over the container's root filesystem.
    pub rootfs: RootfsLayout,
}

/// How the playground hands a container its root filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RootfsLayout {
    /// A host directory in the spec's `root.path`, no mounts (containerd with no snapshotter).
    #[default]
    HostDir,
    /// Image files, as containerd's EROFS snapshotter in block mode hands them over: the
    /// busybox layer as `layer.erofs` (`ro,loop`), a writable ext4 `rwlayer.img` the shim
    /// makes (`mkfs/ext4`, `rw,loop`), and an overlay of the two whose paths are templates
    /// (`format/mkdir/overlay`). The init writes `/layered` into it.
    Layered,
}

impl std::str::FromStr for RootfsLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dir" => Ok(RootfsLayout::HostDir),
            "layered" => Ok(RootfsLayout::Layered),
            other => Err(format!(
                "unknown rootfs layout {other:?} (want dir or layered)"
            )),
        }
    }
}

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// The namespace the runner plays in (runc keeps its state under `/run/containerd/runc/<ns>`).
pub const NAMESPACE: &str = "conformance";

/// Name prefix of a playground's directory (under the temp dir); the sweep of leftovers
/// finds dead runs' directories by it.
pub const DIR_PREFIX: &str = "shim-conformance-";

/// Walks one container through its whole life as containerd of `config.generation` would,
/// recording a [`Step`] per check. Never panics; a failed step ends the walk where going on
/// makes no sense, and [`Playground`]'s drop cleans up.
pub fn run_lifecycle(config: &Config) -> Report {
    let mut report = Report::default();
    let pg = match Playground::new(&config.shim, config.generation, &config.id) {
        Ok(mut pg) => {
            if config.one_socket {
                pg.containerd_address = pg.ttrpc_address.clone();
            }
            pg
        }
        Err(e) => {
            report.check("setup", Err(e));
            return report;
        }
    };
    if config.rootfs == RootfsLayout::Layered {
        if let Err(e) = pg.use_layered_rootfs() {
            report.check("setup", Err(e));
            return report;
        }
    }
    report.check(
        "setup",
        Ok(format!(
            "bundle {} rootfs {} ({:?}) events {}",
            pg.bundle().display(),
            pg.rootfs().display(),
            config.rootfs,
            pg.ttrpc_address
        )),
    );
    let walked = walk(&pg, config, &mut report);
    if !walked {
        let log = pg.shim_log();
        if !log.trim().is_empty() {
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            report.steps.push(Step {
                name: "shim log (tail)".into(),
                ok: true,
                detail: format!("\n    {}", tail.join("\n    ")),
            });
        }
    }
    report
}

fn walk(pg: &Playground, config: &Config, report: &mut Report) -> bool {
    let opts = config.runtime_options.as_ref();
    let id = pg.id.clone();

    // start
    let t = Instant::now();
    let out = match pg.run_start(&pg.start_stdin(opts)) {
        Ok(o) => o,
        Err(e) => return report.check("start", Err(e)),
    };
    if !out.success {
        return report.check(
            "start",
            Err(format!("exit status non-zero: {}", out.stderr)),
        );
    }
    let answer = match parse_answer(pg.generation, &out.stdout) {
        Ok(a) => a,
        Err(e) => return report.check("start", Err(e)),
    };
    report.check(
        "start",
        Ok(format!(
            "{:?} answer, task API v{}, {} in {:?}",
            answer.form,
            answer.version,
            answer.address,
            t.elapsed()
        )),
    );

    pg.set_address(&answer.address);

    // connect
    let api = match TaskApi::connect(&answer.address, answer.version, &pg.namespace) {
        Ok(a) => a,
        Err(e) => return report.check("connect", Err(e)),
    };
    let shim_pid = match api.call::<_, ConnectResponse>(
        "Connect",
        &ConnectRequest {
            id: id.clone(),
            ..Default::default()
        },
    ) {
        Ok(c) => {
            pg.set_shim_pid(c.shim_pid);
            report.check(
                "connect",
                Ok(format!("{} shim pid {}", api.service(), c.shim_pid)),
            );
            c.shim_pid
        }
        Err(e) => return report.check("connect", Err(describe(&e))),
    };

    // create
    let req = match pg.create_request(opts) {
        Ok(r) => r,
        Err(e) => return report.check("create", Err(e)),
    };
    let init_pid = match api.call::<_, CreateTaskResponse>("Create", &req) {
        Ok(r) if r.pid > 0 => {
            report.check("create", Ok(format!("init pid {}", r.pid)));
            r.pid
        }
        Ok(r) => return report.check("create", Err(format!("pid {} from Create", r.pid))),
        Err(e) => return report.check("create", Err(describe(&e))),
    };

    // start
    let start = api.call::<_, StartResponse>(
        "Start",
        &StartRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    let ok = report.check(
        "start task",
        match start {
            Ok(r) if r.pid == init_pid => Ok(format!("pid {}", r.pid)),
            Ok(r) => Err(format!("Start says pid {}, Create said {init_pid}", r.pid)),
            Err(e) => Err(describe(&e)),
        },
    );
    if !ok {
        return false;
    }
    let state = api.call::<_, StateResponse>(
        "State",
        &StateRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    report.check(
        "state",
        match state {
            Ok(s) if s.status.value() == protocol::task::Status::RUNNING.value() => {
                Ok("RUNNING".into())
            }
            Ok(s) => Err(format!("status {:?}, want RUNNING", s.status)),
            Err(e) => Err(describe(&e)),
        },
    );

    // exec
    // containerd passes every non-terminal stdio it has; Go shims open each one given.
    let (exec_out, exec_err) = match (pg.fifo("exec-stdout"), pg.fifo("exec-stderr")) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return report.check("exec", Err(e)),
    };
    let exec_spec = serde_json::json!({
        "args": ["sh", "-c", "echo exec-out; exit 3"],
        "cwd": "/",
        "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
        "user": {"uid": 0, "gid": 0},
    });
    let exec = api.call::<_, Empty>(
        "Exec",
        &ExecProcessRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            stdout: exec_out,
            stderr: exec_err,
            spec: protobuf::MessageField::some(Any {
                type_url: protocol::type_urls::OCI_PROCESS.into(),
                value: exec_spec.to_string().into_bytes(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    if !report.check(
        "exec",
        exec.map(|_| "exec1 added".into()).map_err(|e| describe(&e)),
    ) {
        return false;
    }
    let exec_start = api.call::<_, StartResponse>(
        "Start",
        &StartRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            ..Default::default()
        },
    );
    if !report.check(
        "start exec",
        exec_start
            .map(|r| format!("pid {}", r.pid))
            .map_err(|e| describe(&e)),
    ) {
        return false;
    }
    let wait_exec = api.call::<_, WaitResponse>(
        "Wait",
        &WaitRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            ..Default::default()
        },
    );
    report.check(
        "wait exec",
        match wait_exec {
            Ok(w) if w.exit_status == 3 => Ok("exit status 3".into()),
            Ok(w) => Err(format!("exit status {}, want 3", w.exit_status)),
            Err(e) => Err(describe(&e)),
        },
    );
    let del_exec = api.call::<_, DeleteResponse>(
        "Delete",
        &DeleteRequest {
            id: id.clone(),
            exec_id: "exec1".into(),
            ..Default::default()
        },
    );
    report.check(
        "delete exec",
        match del_exec {
            Ok(d) if d.exit_status == 3 => Ok(format!("exit status 3, pid {}", d.pid)),
            Ok(d) => Err(format!("exit status {}, want 3", d.exit_status)),
            Err(e) => Err(describe(&e)),
        },
    );
    report.check(
        "exec output",
        if wait_until(Duration::from_secs(5), || {
            pg.fifo_text("exec-stdout").contains("exec-out")
        }) {
            Ok("\"exec-out\" on its stdout fifo".into())
        } else {
            Err(format!(
                "stdout fifo holds {:?}",
                pg.fifo_text("exec-stdout")
            ))
        },
    );

    // kill, wait, delete of the init
    let kill = api.call::<_, Empty>(
        "Kill",
        &KillRequest {
            id: id.clone(),
            signal: libc::SIGKILL as u32,
            ..Default::default()
        },
    );
    report.check(
        "kill",
        kill.map(|_| "SIGKILL".into()).map_err(|e| describe(&e)),
    );
    let wait = api.call::<_, WaitResponse>(
        "Wait",
        &WaitRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    report.check(
        "wait",
        match wait {
            Ok(w) if w.exit_status == 137 => Ok("exit status 137".into()),
            Ok(w) => Err(format!("exit status {}, want 137", w.exit_status)),
            Err(e) => Err(describe(&e)),
        },
    );
    report.check("stats after exit", stats_after_exit(&api, &id));
    let del = api.call::<_, DeleteResponse>(
        "Delete",
        &DeleteRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    report.check(
        "delete",
        match del {
            Ok(d) if d.exit_status == 137 && d.pid == init_pid => {
                Ok(format!("exit status 137, pid {}", d.pid))
            }
            Ok(d) => Err(format!(
                "exit status {} pid {}, want 137 pid {init_pid}",
                d.exit_status, d.pid
            )),
            Err(e) => Err(describe(&e)),
        },
    );
    report.check(
        "init output",
        if pg.fifo_text("init-stdout").contains("init-out") {
            Ok("\"init-out\" on its stdout fifo".into())
        } else {
            Err(format!(
                "stdout fifo holds {:?}",
                pg.fifo_text("init-stdout")
            ))
        },
    );

    if config.rootfs == RootfsLayout::Layered {
        report.check("layered rootfs", check_layers(pg));
    }

    // events and their order
    report.check("events", check_events(pg, &id));

    // shutdown
    let shutdown = api.call::<_, Empty>(
        "Shutdown",
        &ShutdownRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    // The shim may exit before it answers: a closed connection is a fine answer.
    let answered = match shutdown {
        Ok(_) => Ok(()),
        Err(ttrpc::Error::RpcStatus(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Ok(()),
    };
    drop(api);
    let socket = PathBuf::from(answer.address.trim_start_matches("unix://"));
    report.check(
        "shutdown",
        answered.and_then(|_| {
            if !wait_until(EXIT_TIMEOUT, || !process_alive(shim_pid)) {
                return Err(format!("shim {shim_pid} still running"));
            }
            if !wait_until(Duration::from_secs(5), || !socket.exists()) {
                return Err(format!("socket {} left behind", socket.display()));
            }
            Ok(format!("shim {shim_pid} exited, socket removed"))
        }),
    );

    // the delete action containerd runs for a shim that went away
    let delete_action = pg.run_delete_action();
    report.check(
        "delete action",
        match delete_action {
            Ok((_, Some(d))) if d.exit_status == 137 => {
                Ok(format!("DeleteResponse exit status 137, pid {}", d.pid))
            }
            Ok((_, Some(d))) => Err(format!(
                "DeleteResponse exit status {}, want 137",
                d.exit_status
            )),
            Ok((out, None)) if out.success => Err(format!(
                "stdout is not a DeleteResponse: {:?}",
                String::from_utf8_lossy(&out.stdout)
            )),
            Ok((out, None)) => Err(format!("failed: {}", out.stderr)),
            Err(e) => Err(e),
        },
    );
    report.passed()
}

/// How long a loop device may stay bound after its file system's unmount.
pub const LOOP_RELEASE: Duration = Duration::from_secs(5);

/// The loop devices bound to files under `dir` that are still bound [`LOOP_RELEASE`] after
/// the unmount. Autoclear frees a device when its file system's last reference goes, and a
/// mount namespace another process was cloning at the unmount (a container starting in a
/// parallel test) holds one until it drops its copy.
pub fn loop_devices_left(dir: &Path) -> Vec<String> {
    wait_until(LOOP_RELEASE, || loop_devices_of(dir).is_empty());
    loop_devices_of(dir)
}

/// After the init's delete: the container wrote into the ext4 upper layer, and nothing of the
/// rootfs is left mounted or bound to a loop device.
pub fn check_layers(pg: &Playground) -> Result<String, String> {
    let rw = pg.layers().join("rwlayer.img");
    let left = leftover_mounts(&pg.bundle());
    if !left.is_empty() {
        return Err(format!("still mounted: {left:?}"));
    }
    let bound = loop_devices_left(&pg.layers());
    if !bound.is_empty() {
        return Err(format!(
            "loop devices still bound {LOOP_RELEASE:?} after the delete: {bound:?}"
        ));
    }
    let stages = pg.bundle().join("rootfs-mounts");
    if stages.exists() {
        return Err(format!("{} left behind", stages.display()));
    }
    let out = Command::new("debugfs")
        .args(["-R", "cat /upper/layered"])
        .arg(&rw)
        .output()
        .map_err(|e| format!("run debugfs (apt install e2fsprogs): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim() != "layered" {
        return Err(format!(
            "{} holds {:?} at upper/layered, want \"layered\" ({})",
            rw.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok("the init's /layered in rwlayer.img's upper/; nothing mounted, no loop device left".into())
}

/// Mount points at or under `dir`, from this mount namespace's table.
pub fn leftover_mounts(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// Loop devices whose backing file is under `dir`, as `loopN=<file>`.
pub fn loop_devices_of(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let file = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
            file.trim()
                .starts_with(&prefix)
                .then(|| format!("{name}={}", file.trim()))
        })
        .collect()
}

/// `Stats` of a container whose init has exited and which is not yet deleted: containerd's
/// CRI asks then (its OOM check on a container's exit) and logs "no metrics received" when
/// the shim has none. The Go shim reads the container's cgroup, which lives until delete.
pub fn stats_after_exit(api: &TaskApi, id: &str) -> Result<String, String> {
    let r = api
        .call::<_, StatsResponse>(
            "Stats",
            &StatsRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .map_err(|e| describe(&e))?;
    let stats = r.stats.into_option().ok_or("an answer without stats")?;
    match stats.type_url.as_str() {
        protocol::type_urls::CGROUPS_V1_METRICS | protocol::type_urls::CGROUPS_V2_METRICS => {
            Ok(format!("{} ({} bytes)", stats.type_url, stats.value.len()))
        }
        other => Err(format!("stats of type {other:?}")),
    }
}

/// containerd's order: create < start < exec-added < exec-started < exit(exec) <
/// exit(init) < delete, all in our namespace, each exactly once.
fn check_events(pg: &Playground, id: &str) -> Result<String, String> {
    use protocol::topics::*;
    let want = [
        TASK_CREATE,
        TASK_START,
        TASK_EXEC_ADDED,
        TASK_EXEC_STARTED,
        TASK_EXIT,
        TASK_EXIT,
        TASK_DELETE,
    ];
    // Events are forwarded asynchronously: give the last one a moment.
    wait_until(Duration::from_secs(5), || {
        pg.events.topics(id).iter().any(|t| t == TASK_DELETE)
    });
    let events: Vec<ForwardedEvent> = pg
        .events
        .events()
        .into_iter()
        .filter(|e| e.ids().0 == id)
        .collect();
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    if topics != want {
        return Err(format!("got {topics:?}, want {want:?}"));
    }
    if let Some(e) = events.iter().find(|e| e.namespace != pg.namespace) {
        return Err(format!("{} in namespace {:?}", e.topic, e.namespace));
    }
    let exits: Vec<(String, u32)> = events
        .iter()
        .filter(|e| e.topic == TASK_EXIT)
        .map(|e| {
            let (_, pid_id, status) = e.ids();
            (pid_id, status)
        })
        .collect();
    if exits != [("exec1".to_string(), 3), (id.to_string(), 137)] {
        return Err(format!("exits {exits:?}, want exec1=3 then {id}=137"));
    }
    Ok(topics.join(" < "))
}
