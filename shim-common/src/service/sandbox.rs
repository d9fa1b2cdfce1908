//! containerd 2.x's sandbox API (`containerd.runtime.sandbox.v1.Sandbox`) on a backend's
//! [`Sandboxes`]: each sandbox's phase, its exit and who waits for it (see
//! [`crate::sandbox`]).

use std::path::{Path, PathBuf};
use std::sync::Condvar;
use std::time::SystemTime;

use protobuf::well_known_types::any::Any;
use protocol::metrics::Metric;
use protocol::sandbox::*;
use protocol::sandbox_state;

use super::*;
use crate::pod::{PodConfig, PodMetadata};
use crate::sandbox::{SandboxCreate, SandboxExit, Sandboxes};

/// How long `StopSandbox` waits for the sandbox's exit beyond the timeout it was given,
/// after the backend said the process is on its way out.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where a sandbox is. A phase ending in -ing has a backend call running for it: other
/// calls that would change it are refused meanwhile, queries go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Creating,
    Created,
    Starting,
    Ready,
    Stopping,
    Stopped,
    ShuttingDown,
}

/// The answer to a `WaitSandbox`, delivered when the sandbox's process ends.
type SandboxWaiter = Box<dyn FnOnce(Result<WaitSandboxResponse>) + Send>;

pub(super) struct SandboxState {
    phase: Phase,
    pid: u32,
    created_at: Option<SystemTime>,
    exit: Option<Exit>,
    waiters: Vec<SandboxWaiter>,
    /// The pod's network namespace, as `CreateSandbox` named it.
    netns: Option<PathBuf>,
    /// The backend's spec of the started sandbox, JSON.
    spec: Option<serde_json::Value>,
    /// Who the pod is, from CRI's `PodSandboxConfig` (none for other clients).
    pod: Option<PodMetadata>,
}

/// One sandbox; `exited` is signalled with its exit (for `StopSandbox`).
pub(super) struct SandboxCell {
    state: Mutex<SandboxState>,
    exited: Condvar,
}

fn wait_sandbox_response(exit: Exit) -> WaitSandboxResponse {
    WaitSandboxResponse {
        exit_status: exit.status,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    }
}

/// The sandbox's spec as containerd's `typeurl` decodes a runtime-spec `Spec`.
fn spec_any(spec: serde_json::Value) -> Any {
    Any {
        type_url: protocol::type_urls::OCI_SPEC.into(),
        value: spec.to_string().into_bytes(),
        ..Default::default()
    }
}

/// `info["info"]` of a verbose `SandboxStatus`: the JSON of containerd's CRI `SandboxInfo`,
/// which containerd decodes (a field of the wrong type fails `PodSandboxStatus`) and
/// `crictl inspectp` prints. Only fields the SDK knows are set; containerd adds the rest
/// (`overhead`, `resources`). `sandboxMetadata` is containerd's versioned store record, which
/// it refuses in any other form.
fn sandbox_info(id: &str, s: &SandboxState) -> serde_json::Value {
    // containerd's process statuses, as its pause container's task would report them.
    let status = match s.phase {
        Phase::Creating | Phase::Created | Phase::Starting => "created",
        Phase::Ready | Phase::Stopping => "running",
        Phase::Stopped | Phase::ShuttingDown => "stopped",
    };
    let runtime = std::env::args_os()
        .next()
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map(|n| crate::bootstrap::runtime_name(&n.to_string_lossy()))
        .unwrap_or_default();
    let mut info = serde_json::json!({
        "pid": s.pid,
        "processStatus": status,
        "netNamespaceClosed": s.netns.as_deref().is_some_and(|p| !p.exists()),
        "runtimeType": runtime,
    });
    if let Some(spec) = &s.spec {
        info["runtimeSpec"] = spec.clone();
    }
    if let Some(pod) = &s.pod {
        // containerd's sandbox store record, in the versioned form it decodes.
        info["sandboxMetadata"] = serde_json::json!({
            "Version": "v1",
            "Metadata": {
                "ID": id,
                "Name": pod.sandbox_name(),
                "NetNSPath": s.netns.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            },
        });
    }
    info
}

fn busy(id: &str, phase: Phase) -> Error {
    Error::FailedPrecondition(format!("sandbox {id} is {phase:?}"))
}

impl<B: Backend> Inner<B> {
    fn sandboxes(&self) -> Result<&dyn Sandboxes> {
        self.backend
            .sandboxes()
            .ok_or_else(|| Error::Unimplemented("the sandbox API".into()))
    }

    fn sandbox(&self, id: &str) -> Result<Arc<SandboxCell>> {
        lock(&self.containers)
            .sandboxes
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("sandbox {id}")))
    }

    /// The pid of sandbox `id`'s process, once started.
    pub(super) fn sandbox_pid(&self, id: &str) -> Option<u32> {
        let cell = self.sandbox(id).ok()?;
        let pid = lock(&cell.state).pid;
        (pid != 0).then_some(pid)
    }

    /// Moves the sandbox from one of `from` to `to`, or says why not.
    fn enter(&self, id: &str, from: &[Phase], to: Phase) -> Result<Arc<SandboxCell>> {
        let cell = self.sandbox(id)?;
        {
            let mut s = lock(&cell.state);
            if !from.contains(&s.phase) {
                return Err(busy(id, s.phase));
            }
            s.phase = to;
        }
        Ok(cell)
    }

    pub(super) fn create_sandbox(&self, r: CreateSandboxRequest) -> Result<CreateSandboxResponse> {
        validate_id("sandbox", &r.sandbox_id)?;
        let sandboxes = self.sandboxes()?;
        let id = r.sandbox_id.as_str();
        let pod = r.options.as_ref().map(PodConfig::of).transpose()?.flatten();
        {
            let mut t = lock(&self.containers);
            if t.closing {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id}: the shim is shutting down"
                )));
            }
            // The `CreateSandbox` that `start` announced has come, whatever its answer.
            t.joined.remove(id);
            if t.sandboxes.contains_key(id) {
                return Err(Error::AlreadyExists(format!("sandbox {id}")));
            }
            let cell = SandboxCell {
                state: Mutex::new(SandboxState {
                    phase: Phase::Creating,
                    pid: 0,
                    created_at: None,
                    exit: None,
                    waiters: Vec::new(),
                    netns: (!r.netns_path.is_empty()).then(|| PathBuf::from(&r.netns_path)),
                    spec: None,
                    pod: pod.map(|p| p.metadata),
                }),
                exited: Condvar::new(),
            };
            t.sandboxes.insert(id.to_string(), Arc::new(cell));
        }
        let netns = (!r.netns_path.is_empty()).then(|| Path::new(&r.netns_path));
        let created = sandboxes.create(&SandboxCreate {
            id,
            bundle: Path::new(&r.bundle_path),
            rootfs: &r.rootfs,
            options: r.options.as_ref(),
            netns,
            annotations: &r.annotations,
        });
        let mut t = lock(&self.containers);
        match created {
            Ok(()) => {
                if let Some(cell) = t.sandboxes.get(id) {
                    lock(&cell.state).phase = Phase::Created;
                }
                Ok(CreateSandboxResponse::new())
            }
            Err(e) => {
                t.sandboxes.remove(id);
                Err(e)
            }
        }
    }

    pub(super) fn start_sandbox(&self, r: StartSandboxRequest) -> Result<StartSandboxResponse> {
        let sandboxes = self.sandboxes()?;
        let id = r.sandbox_id.as_str();
        // Before `CreateSandbox` is out of order rather than unknown.
        let cell = self
            .enter(id, &[Phase::Created], Phase::Starting)
            .map_err(|e| match e {
                Error::NotFound(_) => {
                    Error::FailedPrecondition(format!("sandbox {id}: not created"))
                }
                e => e,
            })?;
        let starting = self.starting();
        let me = self.me.clone();
        let owner = id.to_string();
        let exit = SandboxExit::new(move |status| {
            if let Some(inner) = me.upgrade() {
                inner.sandbox_exited(&owner, status, SystemTime::now());
            }
        });
        let started = sandboxes.start(id, exit);
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                lock(&cell.state).phase = Phase::Created;
                return Err(e);
            }
        };
        if B::HOST_PROCESSES {
            if let Some(early) = self.claim_sandbox(pid, id) {
                self.sandbox_exited(id, early.status, early.at);
            }
        }
        drop(starting);
        let spec = sandboxes.spec(id);
        let now = SystemTime::now();
        let mut s = lock(&cell.state);
        s.pid = pid;
        s.created_at = Some(now);
        s.phase = match s.exit {
            Some(_) => Phase::Stopped,
            None => Phase::Ready,
        };
        s.spec = spec.clone();
        Ok(StartSandboxResponse {
            pid,
            created_at: MessageField::some(timestamp(now)),
            spec: spec.map(spec_any).into(),
            ..Default::default()
        })
    }

    /// Records the end of sandbox `id`'s process (the first report counts) and answers
    /// whoever waits for it.
    pub(super) fn sandbox_exited(&self, id: &str, status: u32, at: SystemTime) {
        let Ok(cell) = self.sandbox(id) else { return };
        let (exit, waiters) = {
            let mut s = lock(&cell.state);
            if s.exit.is_some() {
                return;
            }
            let exit = Exit {
                pid: s.pid as i32,
                status,
                at,
            };
            s.exit = Some(exit);
            if matches!(s.phase, Phase::Ready | Phase::Stopping) {
                s.phase = Phase::Stopped;
            }
            cell.exited.notify_all();
            (exit, std::mem::take(&mut s.waiters))
        };
        log::info!("sandbox {id}: exited with status {status}");
        for w in waiters {
            w(Ok(wait_sandbox_response(exit)));
        }
    }

    pub(super) fn stop_sandbox(&self, r: StopSandboxRequest) -> Result<StopSandboxResponse> {
        let sandboxes = self.sandboxes()?;
        let id = r.sandbox_id.as_str();
        let cell = self.sandbox(id)?;
        {
            let mut s = lock(&cell.state);
            match s.phase {
                Phase::Stopped => return Ok(StopSandboxResponse::new()),
                Phase::Created => {
                    // Never started: nothing runs, and a `WaitSandbox` has its answer.
                    s.phase = Phase::Stopped;
                    drop(s);
                    self.sandbox_exited(id, 0, SystemTime::now());
                    return Ok(StopSandboxResponse::new());
                }
                Phase::Ready => s.phase = Phase::Stopping,
                phase => return Err(busy(id, phase)),
            }
        }
        let timeout = Duration::from_secs(r.timeout_secs.into());
        let stopped = sandboxes.stop(id, timeout);
        let deadline = Instant::now() + timeout + STOP_GRACE;
        let mut s = lock(&cell.state);
        while s.exit.is_none() && stopped.is_ok() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = cell
                .exited
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if s.exit.is_some() {
            s.phase = Phase::Stopped;
            return Ok(StopSandboxResponse::new());
        }
        s.phase = Phase::Ready;
        stopped?;
        Err(Error::DeadlineExceeded(format!(
            "sandbox {id}: still running {:?} after it was stopped",
            timeout + STOP_GRACE
        )))
    }

    pub(super) fn wait_sandbox_later(&self, r: WaitSandboxRequest, done: SandboxWaiter) {
        let cell = match self.sandbox(&r.sandbox_id) {
            Ok(cell) => cell,
            Err(e) => return done(Err(e)),
        };
        let mut s = lock(&cell.state);
        match s.exit {
            Some(exit) => {
                drop(s);
                done(Ok(wait_sandbox_response(exit)))
            }
            None => s.waiters.push(done),
        }
    }

    pub(super) fn sandbox_status(&self, r: SandboxStatusRequest) -> Result<SandboxStatusResponse> {
        let sandboxes = self.sandboxes()?;
        let cell = self.sandbox(&r.sandbox_id)?;
        let (phase, pid, created_at, exit) = {
            let s = lock(&cell.state);
            (s.phase, s.pid, s.created_at, s.exit)
        };
        let ready = matches!(phase, Phase::Ready | Phase::Stopping);
        let info = match r.verbose {
            true => {
                let mut info = sandboxes.info(&r.sandbox_id);
                info.insert(
                    "info".into(),
                    sandbox_info(&r.sandbox_id, &lock(&cell.state)).to_string(),
                );
                info
            }
            false => HashMap::new(),
        };
        Ok(SandboxStatusResponse {
            state: if ready {
                sandbox_state::READY
            } else {
                sandbox_state::NOT_READY
            }
            .into(),
            pid,
            created_at: created_at.map(timestamp).into(),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            info,
            sandbox_id: r.sandbox_id,
            ..Default::default()
        })
    }

    pub(super) fn ping_sandbox(&self, r: PingRequest) -> Result<PingResponse> {
        let cell = self.sandbox(&r.sandbox_id)?;
        let phase = lock(&cell.state).phase;
        match phase {
            Phase::Ready | Phase::Stopping => Ok(PingResponse::new()),
            phase => Err(busy(&r.sandbox_id, phase)),
        }
    }

    pub(super) fn platform(&self, r: PlatformRequest) -> Result<PlatformResponse> {
        let sandboxes = self.sandboxes()?;
        self.sandbox(&r.sandbox_id)?;
        Ok(PlatformResponse {
            platform: MessageField::some(sandboxes.platform(&r.sandbox_id)?),
            ..Default::default()
        })
    }

    pub(super) fn sandbox_metrics(
        &self,
        r: SandboxMetricsRequest,
    ) -> Result<SandboxMetricsResponse> {
        let sandboxes = self.sandboxes()?;
        self.sandbox(&r.sandbox_id)?;
        let data = sandboxes.metrics(&r.sandbox_id)?;
        Ok(SandboxMetricsResponse {
            metrics: MessageField::some(Metric {
                timestamp: MessageField::some(timestamp(SystemTime::now())),
                id: r.sandbox_id,
                data: MessageField::some(data),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Stops the sandbox if it runs, releases it, and exits the daemon when nothing else is
    /// left (containerd's `ShutdownSandbox` "must shutdown shim instance").
    pub(super) fn shutdown_sandbox(
        &self,
        r: ShutdownSandboxRequest,
    ) -> Result<ShutdownSandboxResponse> {
        let sandboxes = self.sandboxes()?;
        let id = r.sandbox_id.as_str();
        let cell = self.sandbox(id)?;
        if lock(&cell.state).phase == Phase::Ready {
            self.stop_sandbox(StopSandboxRequest {
                sandbox_id: id.to_string(),
                ..Default::default()
            })?;
        }
        let previous = {
            let mut s = lock(&cell.state);
            match s.phase {
                Phase::Created | Phase::Stopped => {
                    std::mem::replace(&mut s.phase, Phase::ShuttingDown)
                }
                phase => return Err(busy(id, phase)),
            }
        };
        if let Err(e) = sandboxes.shutdown(id) {
            lock(&cell.state).phase = previous;
            return Err(e);
        }
        let waiters = std::mem::take(&mut lock(&cell.state).waiters);
        for w in waiters {
            w(Err(Error::NotFound(format!("sandbox {id}: shut down"))));
        }
        lock(&self.containers).sandboxes.remove(id);
        self.shutdown(ShutdownRequest::default())?;
        Ok(ShutdownSandboxResponse::new())
    }
}

/// Adds the sandbox API's routes to `methods`.
pub(super) fn routes<B: Backend>(inner: &Arc<Inner<B>>, methods: &mut rpc::Methods) {
    let mut add = |name: &str, handler: rpc::Handler| {
        methods.insert(format!("/{}/{name}", protocol::SANDBOX_SERVICE), handler);
    };
    macro_rules! unary {
        ($($name:literal => $f:path),* $(,)?) => {
            $(add($name, route(inner, $name, $f));)*
        };
    }
    unary! {
        "CreateSandbox" => Inner::create_sandbox,
        "StartSandbox" => Inner::start_sandbox,
        "Platform" => Inner::platform,
        "StopSandbox" => Inner::stop_sandbox,
        "SandboxStatus" => Inner::sandbox_status,
        "PingSandbox" => Inner::ping_sandbox,
        "ShutdownSandbox" => Inner::shutdown_sandbox,
        "SandboxMetrics" => Inner::sandbox_metrics,
    }
    let inner = inner.clone();
    add(
        "WaitSandbox",
        Box::new(
            move |req, reply| match rpc::decode::<WaitSandboxRequest>(&req) {
                Ok(r) => inner.wait_sandbox_later(
                    r,
                    Box::new(move |res| reply.send(answer("WaitSandbox", res))),
                ),
                Err(e) => reply.send::<WaitSandboxResponse>(Err(e)),
            },
        ),
    );
}
