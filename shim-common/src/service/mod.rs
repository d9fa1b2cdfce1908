//! The ttrpc task service: containerd's `Task` API on top of a [`Backend`].
//!
//! It owns what containerd observes — task state, exit statuses, `Wait`, event order — so
//! every backend gets the same semantics:
//! - create < start < exit < delete, and exec-added < exec-started < exit;
//! - a process that exits before `Start` returns still gets its start event first (its
//!   exit is held until the event is out);
//! - no container's lock is held across a backend call that runs a command: the process is
//!   marked busy instead, conflicting calls are refused at once and the rest go on (the
//!   state machine: `lifecycle`);
//! - an init process's exit is published only after the exits of all its execs;
//! - an exit reaped before the backend even reported the pid is kept and applied;
//! - an exit is published, and `Wait` answered, only once the process's output has all
//!   reached its destination (or [`OUTPUT_GRACE`] ran out), so a client that takes the exit
//!   as the end of the output loses nothing ([`crate::stdio::Drain`]).
//!
//! The modules hold one concept each: the routes and the shared state here; `lifecycle`
//! (the per-process state machine, pure), `container`, `io` (stdio staged before the
//! runtime runs), `exits` (pids, early and held exits, their order), `table` (containers
//! and the ones on their way); then one module per kind of call.
//!
//! Nothing here assumes a unix socket or the host's containerd: the service takes a
//! [`Publisher`] and a shutdown callback, and serves whatever ttrpc transport it is given.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError, Weak};
use std::time::{Duration, Instant};

use protobuf::well_known_types::empty::Empty;
use protobuf::{Message, MessageField};
use protocol::shim::*;
use protocol::task::{ProcessInfo, Status};
use protocol::task_events::*;
use protocol::topics;

use crate::backend::{linux_resources, Backend, CreateRequest, ExecRequest, Signal, Target};
use crate::console::{Console, ConsoleSocket};
use crate::error::{Error, Result};
use crate::events::{publish, publish_oom, timestamp, Publisher};
use crate::mount::{unmount_rootfs, BundleRootfs};
use crate::options::{self, RuntimeOptions};
use crate::os::OomWatcher;
use crate::reaper::{Exit, Exits};
use crate::stdio::{CarriedStdio, ChildStdio, Drain, IoContext, IoOwner, ProcessIo, StdioPaths};
use crate::{logger, rpc, trace};

mod container;
mod control;
mod create;
mod delete;
mod exits;
mod io;
mod lifecycle;
mod query;
mod report;
mod sandbox;
#[cfg(test)]
mod sandbox_tests;
mod start;
mod table;
#[cfg(test)]
mod tests;

use container::*;
use exits::*;
use io::*;
use lifecycle::Lifecycle;
use sandbox::SandboxCell;
use table::*;

/// Called when `Shutdown` finds no task left and nothing on its way: the daemon stops
/// serving and exits. It runs while new containers are refused, so it can take the daemon's
/// address away before anyone else finds it.
pub type ShutdownHook = Box<dyn Fn() + Send + Sync>;

/// The SDK's own ttrpc service next to containerd's task API, for its own `start` action.
pub const GROUP_SERVICE: &str = "containerd.shim.sdk.v1.Group";

/// How long a container announced by `start` ([`GROUP_SERVICE`]'s `Join`) holds off the
/// shim's shutdown while containerd has not sent its `Create`. containerd sends it right
/// after `start` answers; this bounds a daemon that then never does.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an exit waits for the process's output to reach its destination. Once the
/// process is gone at most a pipe's worth (64 KiB) per stream is left to copy, which a live
/// reader takes in milliseconds; what this bounds is a destination that takes nothing (a
/// fifo nobody opened) or a child still writing into the stream without pause. Go's shim
/// gives an init's IO 2 s; this leaves room for a loaded machine.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(5);

struct Inner<B: Backend> {
    /// Itself, for exits applied later from the drain thread.
    me: Weak<Inner<B>>,
    /// The containerd namespace served, told to logging binaries.
    namespace: String,
    backend: B,
    publisher: Arc<dyn Publisher>,
    containers: Mutex<Table<B::Container>>,
    pids: Mutex<PidTable>,
    on_shutdown: ShutdownHook,
    /// One OOM watcher for every container of the shim, started with the first container
    /// in host cgroups; `None` inside when it could not start (OOM events are then lost,
    /// the containers still run).
    oom: OnceLock<Option<OomWatcher>>,
}

/// containerd's task service for backend `B`.
pub struct TaskService<B: Backend> {
    inner: Arc<Inner<B>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn validate_id(kind: &str, id: &str) -> Result<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains(['/', '\0']) || id.len() > 255 {
        return Err(Error::InvalidArgument(format!("invalid {kind} id {id:?}")));
    }
    Ok(())
}

impl<B: Backend> TaskService<B> {
    /// Builds the service and the thread that turns `exits` (reaped, or reported by the
    /// backend through the [`Exits::sink`] it was given) into task exits. The thread ends
    /// once nothing can report an exit any more (the backend and its sinks are gone).
    ///
    /// ```no_run
    /// # fn f<B: shim_common::Backend>(backend: B, publisher: std::sync::Arc<dyn shim_common::events::Publisher>) -> shim_common::Result<()> {
    /// use shim_common::{reaper::{self, Exits}, TaskService};
    /// let exits = Exits::reaped(reaper::install()?);
    /// let service = TaskService::new("default", backend, publisher, Box::new(|| {}), exits)?;
    /// # Ok(()) }
    /// ```
    pub fn new(
        namespace: impl Into<String>,
        backend: B,
        publisher: Arc<dyn Publisher>,
        on_shutdown: ShutdownHook,
        mut exits: Exits,
    ) -> Result<Self> {
        exits.seal();
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            namespace: namespace.into(),
            backend,
            publisher,
            containers: Mutex::new(Table::default()),
            pids: Mutex::new(PidTable::default()),
            on_shutdown,
            oom: OnceLock::new(),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("exits".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                while let Some(exit) = exits.recv() {
                    let Some(inner) = weak.upgrade() else { return };
                    // A bug applying one exit must not stop every later one.
                    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        inner.on_exit(exit)
                    }));
                    if applied.is_err() {
                        log::error!("applying the exit of pid {} panicked", exit.pid);
                    }
                }
            })
            .map_err(|e| Error::Io {
                context: "spawn exit thread".into(),
                source: e,
            })?;
        Ok(TaskService { inner })
    }

    /// A ttrpc server for this service.
    pub fn into_server(self) -> rpc::Server {
        rpc::Server::new(self.methods())
    }

    /// What the daemon calls as it exits: the backend's [`Backend::shutdown`].
    pub fn stopper(&self) -> Box<dyn Fn() + Send + Sync> {
        let inner = self.inner.clone();
        Box::new(move || inner.backend.shutdown())
    }

    /// The ttrpc method table, under both `containerd.task.v2.Task` and
    /// `containerd.task.v3.Task` (containerd 2.x), with containerd 2.x's sandbox API when
    /// the backend has [`crate::sandbox::Sandboxes`]. `Wait` is answered when the process
    /// exits rather than by a thread blocked until then.
    pub fn methods(self) -> rpc::Methods {
        let mut methods = rpc::Methods::new();
        for service in [protocol::TASK_SERVICE_V2, protocol::TASK_SERVICE_V3] {
            let mut add = |name: &str, handler: rpc::Handler| {
                methods.insert(format!("/{service}/{name}"), handler);
            };
            let inner = &self.inner;
            add("State", route(inner, "State", Inner::state));
            add("Create", route(inner, "Create", Inner::create));
            add("Start", route(inner, "Start", Inner::start));
            add("Delete", route(inner, "Delete", Inner::delete));
            add("Pids", route(inner, "Pids", Inner::pids));
            add(
                "Pause",
                route(inner, "Pause", |i, r: PauseRequest| {
                    empty(i.set_paused(&r.id, true))
                }),
            );
            add(
                "Resume",
                route(inner, "Resume", |i, r: ResumeRequest| {
                    empty(i.set_paused(&r.id, false))
                }),
            );
            add("Checkpoint", route(inner, "Checkpoint", Inner::checkpoint));
            add("Kill", route(inner, "Kill", |i, r| empty(i.kill(r))));
            add("Exec", route(inner, "Exec", |i, r| empty(i.exec(r))));
            add(
                "ResizePty",
                route(inner, "ResizePty", |i, r| empty(i.resize_pty(r))),
            );
            add(
                "CloseIO",
                route(inner, "CloseIO", |i, r| empty(i.close_io(r))),
            );
            add("Update", route(inner, "Update", Inner::update));
            add("Stats", route(inner, "Stats", Inner::stats));
            add("Connect", route(inner, "Connect", Inner::connect));
            add(
                "Shutdown",
                route(inner, "Shutdown", |i, r| empty(i.shutdown(r))),
            );
            let inner = inner.clone();
            add(
                "Wait",
                Box::new(move |req, reply| match rpc::decode::<WaitRequest>(&req) {
                    Ok(r) => {
                        inner.wait_later(r, Box::new(move |res| reply.send(answer("Wait", res))))
                    }
                    Err(e) => reply.send::<WaitResponse>(Err(e)),
                }),
            );
        }
        if self.inner.backend.sandboxes().is_some() {
            sandbox::routes(&self.inner, &mut methods);
        }
        methods.insert(
            format!("/{GROUP_SERVICE}/Join"),
            route(&self.inner, "Join", |i, r| empty(i.join(r))),
        );
        methods
    }
}

/// A unary task method answered by `f` on the service's state.
fn route<B, Req, Res>(
    inner: &Arc<Inner<B>>,
    method: &'static str,
    f: fn(&Inner<B>, Req) -> Result<Res>,
) -> rpc::Handler
where
    B: Backend,
    Req: Message,
    Res: Message,
{
    let inner = inner.clone();
    Box::new(move |req, reply| {
        // Log lines and the trace span of the request name the container it is about.
        let _scope = logger::Scope::enter(request_id(&req.payload));
        reply.send(rpc::decode::<Req>(&req).and_then(|r| answer(method, f(&inner, r))))
    })
}

/// The container or sandbox a request is about. Every request of the task API has it as
/// field 1 (`id`), and every one of the sandbox API too (`sandbox_id`): read from the wire,
/// it costs neither a second decode nor protobuf's reflection tables.
fn request_id(payload: &[u8]) -> String {
    let mut input = protobuf::CodedInputStream::from_bytes(payload);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire_type) = (tag >> 3, tag & 7);
        if field == 1 && wire_type == 2 {
            return input.read_string().unwrap_or_default();
        }
        let skipped = protobuf::rt::WireType::new(wire_type).map(|w| input.skip_field(w));
        if !matches!(skipped, Some(Ok(()))) {
            break;
        }
    }
    String::new()
}

impl<B: Backend> Inner<B> {
    /// The OOM watcher, started on first use; it publishes `TaskOOM` for each kill.
    fn oom_watcher(&self) -> Option<&OomWatcher> {
        self.oom
            .get_or_init(|| {
                let publisher = self.publisher.clone();
                let watcher = OomWatcher::new(move |id| publish_oom(&*publisher, id));
                watcher
                    .map_err(|e| log::warn!("OOM events disabled: {e}"))
                    .ok()
            })
            .as_ref()
    }
}

fn answer<T>(method: &str, r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        log::debug!("{method}: {e}");
        e.into()
    })
}

fn empty(r: Result<()>) -> Result<Empty> {
    r.map(|()| Empty::new())
}
