//! The ttrpc task service: containerd's `Task` API on top of a [`Backend`].
//!
//! It owns what containerd observes — task state, exit statuses, `Wait`, event order — so
//! every backend gets the same semantics:
//! - create < start < exit < delete, and exec-added < exec-started < exit;
//! - a process that exits before `Start` returns still gets its start event first (the
//!   container's lock is held across the backend call and the event);
//! - an init process's exit is published only after the exits of all its execs;
//! - an exit reaped before the backend even reported the pid is kept and applied;
//! - an exit is published, and `Wait` answered, only once the process's output has all
//!   reached its destination (or [`OUTPUT_GRACE`] ran out), so a client that takes the exit
//!   as the end of the output loses nothing ([`crate::stdio::Drain`]).
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
use crate::events::{publish, timestamp, Publisher};
use crate::mount::{unmount_all, BundleRootfs};
use crate::options::{self, RuntimeOptions};
use crate::os::OomWatcher;
use crate::reaper::{Exit, Exits};
use crate::rpc;
use crate::stdio::{CarriedStdio, ChildStdio, Drain, IoContext, IoOwner, ProcessIo, StdioPaths};

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

struct Proc {
    pid: u32,
    status: Status,
    /// Reaped, its exit waiting for its output to be delivered: its pid may already belong
    /// to another process, so it is never signalled again.
    reaped: bool,
    /// An exec between `Start` and the runtime's answer (the container is not locked then).
    starting: bool,
    exit: Option<Exit>,
    paths: StdioPaths,
    io: Option<Io>,
    /// The OCI process spec of an exec, kept from `Exec` until `Start`.
    spec: Vec<u8>,
}

impl Proc {
    fn new(paths: StdioPaths) -> Proc {
        Proc {
            pid: 0,
            status: Status::CREATED,
            reaped: false,
            starting: false,
            exit: None,
            paths,
            io: None,
            spec: Vec::new(),
        }
    }
}

/// The shim's side of a process's stdio.
enum Io {
    Pipes(ProcessIo),
    Console(Console),
    /// The backend's ([`Backend::HOST_STDIO`] `= false`).
    Carried(Drain),
}

impl Io {
    fn drain(&self) -> &Drain {
        match self {
            Io::Pipes(io) => io.drain(),
            Io::Console(console) => console.drain(),
            Io::Carried(drain) => drain,
        }
    }
}

/// Stdio set up before the runtime runs: pipes are ready; a terminal arrives later through
/// the console socket.
enum PendingIo {
    Pipes(ProcessIo),
    Console(ConsoleSocket),
    Carried(CarriedStdio),
}

impl PendingIo {
    /// `host`: [`Backend::HOST_STDIO`]; otherwise nothing is opened here.
    fn open(
        host: bool,
        paths: &StdioPaths,
        owner: IoOwner,
        ctx: IoContext<'_>,
    ) -> Result<(PendingIo, ChildStdio)> {
        if !host {
            let carried = CarriedStdio::new(paths.clone());
            return Ok((PendingIo::Carried(carried), ChildStdio::default()));
        }
        if paths.terminal {
            return Ok((
                PendingIo::Console(ConsoleSocket::new()?),
                ChildStdio::default(),
            ));
        }
        let (io, stdio) = ProcessIo::open(paths, owner, ctx)?;
        Ok((PendingIo::Pipes(io), stdio))
    }

    fn console_socket(&self) -> Option<&std::path::Path> {
        match self {
            PendingIo::Console(s) => Some(s.path()),
            PendingIo::Pipes(_) | PendingIo::Carried(_) => None,
        }
    }

    /// The backend's share of stdio it carries itself.
    fn carried(&self) -> Option<CarriedStdio> {
        match self {
            PendingIo::Carried(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Completes the set-up once the runtime created the process.
    fn finish(self, paths: &StdioPaths) -> Result<Io> {
        match self {
            PendingIo::Pipes(io) => Ok(Io::Pipes(io)),
            PendingIo::Carried(c) => Ok(Io::Carried(c.drain().clone())),
            PendingIo::Console(sock) => {
                let master = sock.receive_master(std::time::Duration::from_secs(10))?;
                Ok(Io::Console(Console::start(master, paths)?))
            }
        }
    }
}

/// A container as the SDK keeps it; `C` is the backend's own state of it.
struct Container<C> {
    id: String,
    bundle: String,
    /// The backend's container, for every backend call about it. Cloned out of the lock, so
    /// a call that takes its time does not hold the container.
    runtime: Arc<C>,
    /// Whether the SDK mounted the rootfs (and unmounts it after the backend's delete).
    rootfs_mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
    /// Execs started (or starting) and not yet exited: the init's exit waits for them.
    running_execs: usize,
    deferred_init_exit: Option<Exit>,
    /// Owner of the stdio pipes of every process of the container (`io_uid`/`io_gid`).
    io_owner: IoOwner,
    /// `Wait` calls answered when their process exits (or is deleted), by exec id.
    waiters: Vec<(String, Waiter)>,
    /// Deleted: waits that arrive now find nothing.
    deleted: bool,
    /// No pid namespace of its own ([`shares_pid_namespace`]).
    kill_all_on_exit: bool,
}

/// The answer to a `Wait`, delivered whenever the process exits.
type Waiter = Box<dyn FnOnce(Result<WaitResponse>) + Send>;

fn wait_response(exit: Exit) -> WaitResponse {
    WaitResponse {
        exit_status: exit.status,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    }
}

impl<C> Container<C> {
    fn process(&self, exec_id: &str) -> Result<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    fn process_mut(&mut self, exec_id: &str) -> Result<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = &self.id;
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {id}")))
    }
}

struct Cell<C> {
    state: Mutex<Container<C>>,
    /// Exits reaped for this container and not yet applied, in reap order.
    exits: Mutex<ExitQueue>,
}

/// A container's exits wait here while the container is busy in another call (its lock
/// is held across `runc pause`, `runc delete`, ...): the exits thread never waits for one
/// container, so no other container's exit events or `Wait` answers wait behind it. One
/// thread at a time applies a container's queue, so its exits keep their order.
#[derive(Default)]
struct ExitQueue {
    queue: VecDeque<(String, Exit)>,
    /// A thread is applying the queue; whoever adds to it leaves the rest to that thread.
    applying: bool,
}

/// The shim's containers, and the ones on their way: what `Shutdown` must not abandon.
///
/// containerd shuts a group's shim down when its last task is deleted, while `start` for
/// the group's next container may already have found that shim, or its `Create` may be in
/// flight. So a `Create` reserves its id here before anything runs (a duplicate is refused,
/// not let through to undo the first), `start` announces the container it found the shim
/// for (`Join`), and `Shutdown` declines while either is pending. Once it accepts, new
/// containers are refused and `start` makes a new shim.
struct Table<C> {
    cells: HashMap<String, Arc<Cell<C>>>,
    creating: HashSet<String>,
    /// Containers `start` found this shim for, and when, until their `Create` arrives.
    joined: HashMap<String, Instant>,
    /// Shutdown accepted: the shim is exiting.
    closing: bool,
}

impl<C> Default for Table<C> {
    fn default() -> Self {
        Table {
            cells: HashMap::new(),
            creating: HashSet::new(),
            joined: HashMap::new(),
            closing: false,
        }
    }
}

impl<C> Table<C> {
    /// Why the shim may not exit now, or `None` if it may. Forgets expired joins.
    fn busy(&mut self) -> Option<String> {
        self.joined.retain(|_, at| at.elapsed() < JOIN_TIMEOUT);
        if let Some(id) = self.cells.keys().chain(&self.creating).next() {
            return Some(format!("container {id}"));
        }
        self.joined
            .keys()
            .next()
            .map(|id| format!("container {id} announced by start"))
    }
}

/// Which process each pid belongs to, and exits reaped before their pid was known.
#[derive(Default)]
struct PidTable {
    owners: HashMap<i32, (String, String)>,
    early: HashMap<i32, Exit>,
    /// Backend calls in flight that will report a new pid.
    starting: usize,
}

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

/// An id reserved for a `Create` in flight ([`Inner::reserve`]).
struct Reserved<'a, B: Backend> {
    inner: &'a Inner<B>,
    id: String,
}

impl<B: Backend> Drop for Reserved<'_, B> {
    fn drop(&mut self) {
        lock(&self.inner.containers).creating.remove(&self.id);
    }
}

/// Marks a backend call that will report a new pid; exits of unknown pids are kept meanwhile.
struct Starting<'a, B: Backend>(&'a Inner<B>);

impl<B: Backend> Drop for Starting<'_, B> {
    fn drop(&mut self) {
        let mut t = lock(&self.0.pids);
        t.starting -= 1;
        if t.starting == 0 {
            t.early.clear();
        }
    }
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

    /// The ttrpc method table, under both `containerd.task.v2.Task` and
    /// `containerd.task.v3.Task` (containerd 2.x). `Wait` is answered when the process
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
    rpc::unary(move |req| answer(method, f(&inner, req)))
}

impl<B: Backend> Inner<B> {
    fn cell(&self, id: &str) -> Result<Arc<Cell<B::Container>>> {
        lock(&self.containers)
            .cells
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    /// The OOM watcher, started on first use; it publishes `TaskOOM` for each kill.
    fn oom_watcher(&self) -> Option<&OomWatcher> {
        self.oom
            .get_or_init(|| {
                let publisher = self.publisher.clone();
                let watcher = OomWatcher::new(move |id| {
                    let event = TaskOOM {
                        container_id: id.to_string(),
                        ..Default::default()
                    };
                    publish(&*publisher, topics::TASK_OOM, &event);
                });
                watcher
                    .map_err(|e| log::warn!("OOM events disabled: {e}"))
                    .ok()
            })
            .as_ref()
    }

    fn starting(&self) -> Starting<'_, B> {
        lock(&self.pids).starting += 1;
        Starting(self)
    }

    /// Records who owns `pid`, or returns its exit if it was reaped already.
    fn claim(&self, pid: u32, id: &str, exec_id: &str) -> Option<Exit> {
        let mut t = lock(&self.pids);
        let pid = pid as i32;
        t.early.remove(&pid).or_else(|| {
            t.owners.insert(pid, (id.to_string(), exec_id.to_string()));
            None
        })
    }

    fn on_exit(&self, exit: Exit) {
        let (id, exec_id) = {
            let mut t = lock(&self.pids);
            match t.owners.remove(&exit.pid) {
                Some(owner) => owner,
                None => {
                    if t.starting > 0 {
                        t.early.insert(exit.pid, exit);
                    }
                    return;
                }
            }
        };
        let Ok(cell) = self.cell(&id) else { return };
        {
            let mut q = lock(&cell.exits);
            q.queue.push_back((exec_id, exit));
            if q.applying {
                return;
            }
            q.applying = true;
        }
        // A free container's exit is applied here; a busy one's on a thread of its own.
        let busy = matches!(cell.state.try_lock(), Err(TryLockError::WouldBlock));
        if busy {
            let me = self.me.clone();
            let queued = cell.clone();
            let spawned = std::thread::Builder::new()
                .name("exits-busy".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    if let Some(inner) = me.upgrade() {
                        inner.apply_queued_exits(&queued);
                    }
                });
            match spawned {
                Ok(_) => return,
                Err(e) => log::warn!("container {id}: exits applied in line: {e}"),
            }
        }
        self.apply_queued_exits(&cell);
    }

    /// Applies `cell`'s queued exits in order until none is left (see [`ExitQueue`]).
    fn apply_queued_exits(&self, cell: &Arc<Cell<B::Container>>) {
        loop {
            let (exec_id, exit) = {
                let mut q = lock(&cell.exits);
                match q.queue.pop_front() {
                    Some(next) => next,
                    None => {
                        q.applying = false;
                        return;
                    }
                }
            };
            let drain = reaped(&mut lock(&cell.state), &exec_id);
            self.exit_after_output(cell.clone(), exec_id, exit, drain);
        }
    }

    /// Applies `exit` once the process's output is delivered (see [`OUTPUT_GRACE`]), at
    /// once if it is already. Call without holding the container's lock: the wait runs on
    /// the drain thread, so neither this caller nor other containers' exits wait for it.
    fn exit_after_output(
        &self,
        cell: Arc<Cell<B::Container>>,
        exec_id: String,
        exit: Exit,
        drain: Option<Drain>,
    ) {
        let (id, kill_all, runtime, pid) = {
            let c = lock(&cell.state);
            (
                c.id.clone(),
                c.kill_all_on_exit,
                c.runtime.clone(),
                c.init.pid,
            )
        };
        if exec_id.is_empty() && kill_all {
            // No pid namespace of its own: the init's end is not the end of its processes.
            // End them before its exit is published, as containerd's runc shim does.
            let target = Target::Init { pid };
            if let Err(e) = self.backend.kill(&runtime, target, Signal::KILL, true) {
                log::warn!("container {id}: kill what is left after its init exited: {e}");
            }
        }
        let what = drain.as_ref().map(|_| {
            if exec_id.is_empty() {
                format!("container {id}")
            } else {
                format!("exec {exec_id} of container {id}")
            }
        });
        let me = self.me.clone();
        let apply = move |_delivered: bool| {
            if let Some(inner) = me.upgrade() {
                let mut c = lock(&cell.state);
                inner.apply_exit(&mut c, &exec_id, exit);
            }
        };
        match (drain, what) {
            (Some(drain), Some(what)) => drain.after_exit(&what, OUTPUT_GRACE, apply),
            _ => apply(true),
        }
    }

    fn apply_exit(&self, c: &mut Container<B::Container>, exec_id: &str, exit: Exit) {
        if exec_id.is_empty() {
            if c.running_execs > 0 {
                // Execs outlive init only in a shared pid namespace; end them, then report init.
                for (exec_id, p) in &c.execs {
                    if p.status == Status::RUNNING && !p.reaped {
                        self.kill_exec(&c.runtime, exec_id, p.pid);
                    }
                }
                c.deferred_init_exit = Some(exit);
                return;
            }
            self.finish(c, "", exit);
            return;
        }
        self.finish(c, exec_id, exit);
        c.running_execs = c.running_execs.saturating_sub(1);
        self.release_init_exit(c);
    }

    /// SIGKILLs an exec's process; it is gone or going either way, so errors are moot.
    fn kill_exec(&self, runtime: &B::Container, exec_id: &str, pid: u32) {
        let target = Target::Exec { exec_id, pid };
        let _ = self.backend.kill(runtime, target, Signal::KILL, false);
    }

    fn release_init_exit(&self, c: &mut Container<B::Container>) {
        if c.running_execs == 0 {
            if let Some(exit) = c.deferred_init_exit.take() {
                self.finish(c, "", exit);
            }
        }
    }

    fn finish(&self, c: &mut Container<B::Container>, exec_id: &str, exit: Exit) {
        let id = c.id.clone();
        let Ok(p) = c.process_mut(exec_id) else {
            return;
        };
        p.status = Status::STOPPED;
        p.exit = Some(exit);
        if exec_id.is_empty() {
            // An OOM kill the watcher has not reported yet goes out before the exit.
            if let Some(Some(w)) = self.oom.get() {
                w.check(&id);
            }
        }
        let event = TaskExit {
            container_id: id.clone(),
            id: if exec_id.is_empty() {
                id
            } else {
                exec_id.to_string()
            },
            pid: p.pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_EXIT, &event);
        let (done, waiting) = std::mem::take(&mut c.waiters)
            .into_iter()
            .partition(|(e, _)| e == exec_id);
        c.waiters = waiting;
        for (_, w) in done {
            w(Ok(wait_response(exit)));
        }
    }

    /// A chain of steps, each undone by a guard if a later one fails: reserve the id (a
    /// duplicate is refused before anything runs), decode and keep the options, open the
    /// stdio, mount the rootfs, let the backend create; a terminal's master comes last.
    fn create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        validate_id("container", &req.id)?;
        let reserved = self.reserve(&req.id)?;
        let options: B::Options = options::decode(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        options::save(&bundle, &options)?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let owner = options.io_owner();
        let ctx = IoContext {
            id: &req.id,
            namespace: &self.namespace,
        };
        let (pending, stdio) = PendingIo::open(B::HOST_STDIO, &paths, owner, ctx)?;
        let rootfs = match B::MOUNTS_ROOTFS {
            true => Some(BundleRootfs::mount(&bundle, &req.rootfs)?),
            false => None,
        };
        let starting = self.starting();
        let created = self.backend.create(CreateRequest {
            id: &req.id,
            bundle: &bundle,
            rootfs: &req.rootfs,
            options: &options,
            checkpoint: &req.checkpoint,
            terminal: req.terminal,
            console_socket: pending.console_socket(),
            stdio,
            carried: pending.carried(),
        })?;
        let runtime = Arc::new(created.container);
        let io = match pending.finish(&paths) {
            Ok(io) => io,
            Err(e) => {
                // Before the rootfs guard unmounts what the container still uses.
                let _ = self.backend.delete(&runtime);
                return Err(e);
            }
        };
        let rootfs_mounted = rootfs.is_some_and(BundleRootfs::keep);
        let pid = created.pid.unwrap_or(0);
        let early = created.pid.and_then(|pid| self.claim(pid, &req.id, ""));
        let mut init = Proc::new(paths.clone());
        init.pid = pid;
        init.io = Some(io);
        let cell = Arc::new(Cell {
            exits: Mutex::new(ExitQueue::default()),
            state: Mutex::new(Container {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                runtime,
                rootfs_mounted,
                init,
                execs: HashMap::new(),
                running_execs: 0,
                deferred_init_exit: None,
                io_owner: owner,
                waiters: Vec::new(),
                deleted: false,
                kill_all_on_exit: shares_pid_namespace(&bundle),
            }),
        });
        lock(&self.containers)
            .cells
            .insert(req.id.clone(), cell.clone());
        drop(reserved);
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: paths.stdin,
                stdout: paths.stdout,
                stderr: paths.stderr,
                terminal: paths.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_CREATE, &event);
        if self.backend.host_cgroups() {
            if let Some(w) = self.oom_watcher() {
                if let Err(e) = w.add(&req.id, pid) {
                    log::warn!("no OOM events for container {}: {e}", req.id);
                }
            }
        }
        if let Some(exit) = early {
            let drain = reaped(&mut lock(&cell.state), "");
            self.exit_after_output(cell, String::new(), exit, drain);
        }
        drop(starting);
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, req: StartRequest) -> Result<StartResponse> {
        let cell = self.cell(&req.id)?;
        let mut c = lock(&cell.state);
        if req.exec_id.is_empty() {
            if c.init.status != Status::CREATED {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is not in created state",
                    req.id
                )));
            }
            let starting = self.starting();
            let pid = self.backend.start(&c.runtime)?;
            // A restored init is born here: claim its pid like create does.
            let early = if pid != c.init.pid {
                c.init.pid = pid;
                self.claim(pid, &req.id, "")
            } else {
                None
            };
            c.init.status = Status::RUNNING;
            let event = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            publish(&*self.publisher, topics::TASK_START, &event);
            if let Some(exit) = early {
                let drain = reaped(&mut c, "");
                drop(c);
                self.exit_after_output(cell.clone(), String::new(), exit, drain);
            }
            drop(starting);
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        if c.init.status != Status::RUNNING {
            return Err(Error::FailedPrecondition(format!(
                "cannot start exec {} in container {}: container is not running",
                req.exec_id, req.id
            )));
        }
        let p = c.process(&req.exec_id)?;
        if p.status != Status::CREATED {
            return Err(Error::FailedPrecondition(format!(
                "exec {} is already started",
                req.exec_id
            )));
        }
        if p.starting {
            return Err(Error::FailedPrecondition(format!(
                "exec {} is already starting",
                req.exec_id
            )));
        }
        let (paths, spec, owner) = (p.paths.clone(), p.spec.clone(), c.io_owner);
        let runtime = c.runtime.clone();
        c.running_execs += 1;
        c.process_mut(&req.exec_id)?.starting = true;
        // Not under the container's lock: `runc exec` can take seconds, and State, Pids or
        // another exec of the container must not wait for it. `starting` keeps the exec
        // from being started twice or deleted meanwhile.
        drop(c);
        let ctx = IoContext {
            id: &req.id,
            namespace: &self.namespace,
        };
        let launched =
            PendingIo::open(B::HOST_STDIO, &paths, owner, ctx).and_then(|(pending, stdio)| {
                let starting = self.starting();
                let exec = ExecRequest {
                    exec_id: &req.exec_id,
                    spec: &spec,
                    terminal: paths.terminal,
                    console_socket: pending.console_socket(),
                    stdio,
                    carried: pending.carried(),
                };
                let pid = self.backend.exec(&runtime, exec)?;
                match pending.finish(&paths) {
                    Ok(io) => Ok((io, pid, starting)),
                    Err(e) => {
                        self.kill_exec(&runtime, &req.exec_id, pid);
                        Err(e)
                    }
                }
            });
        let mut c = lock(&cell.state);
        if let Ok(p) = c.process_mut(&req.exec_id) {
            p.starting = false;
        }
        let (io, pid, starting) = match launched {
            Ok(s) => s,
            Err(e) => {
                c.running_execs -= 1;
                self.release_init_exit(&mut c);
                return Err(e);
            }
        };
        // Under the lock, so the exit (held as early until now, or waiting for the lock)
        // is applied after the start event.
        let early = self.claim(pid, &req.id, &req.exec_id);
        drop(starting);
        if early.is_none() && c.deferred_init_exit.is_some() {
            // The init exited while this started: end it, as the init's exit did the others.
            self.kill_exec(&runtime, &req.exec_id, pid);
        }
        let p = c.process_mut(&req.exec_id)?;
        p.pid = pid;
        p.status = Status::RUNNING;
        p.io = Some(io);
        p.spec = Vec::new();
        let event = TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_EXEC_STARTED, &event);
        if let Some(exit) = early {
            let drain = reaped(&mut c, &req.exec_id);
            drop(c);
            self.exit_after_output(cell.clone(), req.exec_id.clone(), exit, drain);
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, req: ExecProcessRequest) -> Result<()> {
        validate_id("exec", &req.exec_id)?;
        let spec = req
            .spec
            .as_ref()
            .map(|s| s.value.as_slice())
            .unwrap_or_default();
        let spec = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(spec)
            .and_then(|mut spec| {
                // The request decides, as in containerd's runc shim: the Go client sends the
                // container's process spec (`terminal: false`) with `terminal` on the request.
                spec.insert("terminal".into(), req.terminal.into());
                serde_json::to_vec(&spec)
            })
            .map_err(|e| {
                Error::InvalidArgument(format!("exec {} process spec: {e}", req.exec_id))
            })?;
        let cell = self.cell(&req.id)?;
        let mut c = lock(&cell.state);
        if c.init.status == Status::STOPPED {
            return Err(Error::FailedPrecondition(format!(
                "container {} is stopped",
                req.id
            )));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!("exec {}", req.exec_id)));
        }
        let mut p = Proc::new(StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        });
        p.spec = spec;
        c.execs.insert(req.exec_id.clone(), p);
        let event = TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_EXEC_ADDED, &event);
        Ok(())
    }

    fn kill(&self, req: KillRequest) -> Result<()> {
        let signal = Signal::new(req.signal)?;
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        if p.status == Status::STOPPED && !req.all {
            return Err(Error::NotFound(format!(
                "process {}: process already finished",
                if req.exec_id.is_empty() {
                    &req.id
                } else {
                    &req.exec_id
                }
            )));
        }
        if p.reaped && !req.exec_id.is_empty() {
            return Err(Error::NotFound(format!(
                "process {}: process already finished",
                req.exec_id
            )));
        }
        if req.exec_id.is_empty() {
            let (runtime, pid) = (c.runtime.clone(), p.pid);
            drop(c); // runc kill takes a while; do not block the container meanwhile
            if pid == 0 {
                // A restore's init is born at start.
                return Err(Error::NotFound(format!(
                    "container {}: process not started",
                    req.id
                )));
            }
            let target = Target::Init { pid };
            return self.backend.kill(&runtime, target, signal, req.all);
        }
        if p.status == Status::CREATED {
            return Err(Error::FailedPrecondition(format!(
                "exec {} is not started",
                req.exec_id
            )));
        }
        // Hold the lock: the pid cannot be reaped and reused while we signal it.
        let target = Target::Exec {
            exec_id: &req.exec_id,
            pid: p.pid,
        };
        self.backend.kill(&c.runtime, target, signal, req.all)
    }

    fn delete(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        let cell = self.cell(&req.id)?;
        let mut c = lock(&cell.state);
        let response = |pid: u32, exit: Option<Exit>| {
            let exit = exit.unwrap_or(Exit {
                pid: pid as i32,
                status: 128 + libc::SIGKILL as u32,
                at: std::time::SystemTime::now(),
            });
            DeleteResponse {
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }
        };
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.starting {
                return Err(Error::FailedPrecondition(format!(
                    "exec {} is starting",
                    req.exec_id
                )));
            }
            if p.status == Status::RUNNING {
                return Err(Error::FailedPrecondition(format!(
                    "exec {} is running; kill it first",
                    req.exec_id
                )));
            }
            let resp = match p.exit {
                Some(exit) => response(p.pid, Some(exit)),
                // Never started: containerd's runc shim answers its exec's zero values,
                // status 0 and Go's zero time (0001-01-01T00:00:00Z).
                None => DeleteResponse {
                    pid: p.pid,
                    exit_status: 0,
                    exited_at: MessageField::some(
                        protobuf::well_known_types::timestamp::Timestamp {
                            seconds: -62_135_596_800,
                            ..Default::default()
                        },
                    ),
                    ..Default::default()
                },
            };
            let proc = c.execs.remove(&req.exec_id);
            let (gone, waiting) = std::mem::take(&mut c.waiters)
                .into_iter()
                .partition(|(e, _)| e == &req.exec_id);
            c.waiters = waiting;
            for (_, w) in gone {
                w(Err(Error::NotFound(format!("exec {}", req.exec_id))));
            }
            // Outside the lock: closing a logging binary waits for it to exit.
            drop(c);
            drop(proc);
            return Ok(resp);
        }
        if matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
            return Err(Error::FailedPrecondition(format!(
                "container {} is running; kill it first",
                req.id
            )));
        }
        self.backend.delete(&c.runtime)?;
        if c.rootfs_mounted {
            unmount_all(&std::path::Path::new(&c.bundle).join("rootfs"))?;
            c.rootfs_mounted = false;
        }
        if let Some(Some(w)) = self.oom.get() {
            w.remove(&req.id);
        }
        {
            let mut t = lock(&self.pids);
            t.owners.retain(|_, (id, _)| id != &req.id);
        }
        let resp = response(c.init.pid, c.init.exit);
        let event = TaskDelete {
            container_id: req.id.clone(),
            pid: resp.pid,
            exit_status: resp.exit_status,
            exited_at: resp.exited_at.clone(),
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_DELETE, &event);
        c.deleted = true;
        for (_, w) in std::mem::take(&mut c.waiters) {
            w(Err(Error::NotFound(format!("container {}", req.id))));
        }
        drop(c);
        lock(&self.containers).cells.remove(&req.id);
        Ok(resp)
    }

    fn state(&self, req: StateRequest) -> Result<StateResponse> {
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        let (status, at) = p
            .exit
            .map(|e| (e.status, Some(timestamp(e.at))))
            .unwrap_or((0, None));
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.clone(),
            pid: p.pid,
            status: p.status.into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status: status,
            exited_at: at.into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    /// `Wait` without a thread: `done` gets the answer now if the process has exited, or
    /// when it exits or is deleted.
    fn wait_later(&self, req: WaitRequest, done: Waiter) {
        let cell = match self.cell(&req.id) {
            Ok(cell) => cell,
            Err(e) => return done(Err(e)),
        };
        let mut c = lock(&cell.state);
        if c.deleted {
            drop(c);
            return done(Err(Error::NotFound(format!("container {}", req.id))));
        }
        match c.process(&req.exec_id).map(|p| p.exit) {
            Ok(Some(exit)) => {
                drop(c);
                done(Ok(wait_response(exit)))
            }
            Ok(None) => c.waiters.push((req.exec_id, done)),
            Err(e) => {
                drop(c);
                done(Err(e))
            }
        }
    }

    fn pids(&self, req: PidsRequest) -> Result<PidsResponse> {
        let cell = self.cell(&req.id)?;
        let runtime = lock(&cell.state).runtime.clone();
        let pids = self.backend.pids(&runtime)?;
        let c = lock(&cell.state);
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let exec = c
                .execs
                .iter()
                .find(|(_, p)| p.pid == pid && p.status == Status::RUNNING);
            let info = match exec {
                Some((exec_id, _)) => {
                    let details = protocol::options::ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    protocol::pack(&details).ok().into()
                }
                None => MessageField::none(),
            };
            processes.push(ProcessInfo {
                pid,
                info,
                ..Default::default()
            });
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn close_io(&self, req: CloseIORequest) -> Result<()> {
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            match &p.io {
                Some(Io::Pipes(io)) => io.close_stdin(),
                Some(Io::Console(console)) => console.close_stdin(),
                Some(Io::Carried(_)) => {
                    let runtime = c.runtime.clone();
                    drop(c); // the backend may have to ask its guest
                    return self.backend.close_io(&runtime, &req.exec_id);
                }
                None => {}
            }
        }
        Ok(())
    }

    fn resize_pty(&self, req: ResizePtyRequest) -> Result<()> {
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        match &p.io {
            Some(Io::Console(console)) => console.resize(req.width, req.height),
            // Nothing to resize, and no error: containerd's runc shim does the same, and
            // clients resize without asking first.
            _ if !p.paths.terminal => Ok(()),
            // A terminal the shim does not hold (a VM guest's, say): the backend's.
            _ => self
                .backend
                .resize_pty(&c.runtime, &req.exec_id, req.width, req.height),
        }
    }

    fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let cell = self.cell(id)?;
        let mut c = lock(&cell.state);
        if paused {
            self.backend.pause(&c.runtime)?;
            c.init.status = Status::PAUSED;
            let e = TaskPaused {
                container_id: id.into(),
                ..Default::default()
            };
            publish(&*self.publisher, topics::TASK_PAUSED, &e);
        } else {
            self.backend.resume(&c.runtime)?;
            c.init.status = Status::RUNNING;
            let e = TaskResumed {
                container_id: id.into(),
                ..Default::default()
            };
            publish(&*self.publisher, topics::TASK_RESUMED, &e);
        }
        Ok(())
    }

    fn runtime(&self, id: &str) -> Result<Arc<B::Container>> {
        Ok(lock(&self.cell(id)?.state).runtime.clone())
    }

    fn checkpoint(&self, r: CheckpointTaskRequest) -> Result<Empty> {
        let runtime = self.runtime(&r.id)?;
        empty(
            self.backend
                .checkpoint(&runtime, &r.path, r.options.as_ref()),
        )
    }

    fn update(&self, r: UpdateTaskRequest) -> Result<Empty> {
        let runtime = self.runtime(&r.id)?;
        let resources = linux_resources(r.resources.as_ref())?;
        empty(self.backend.update(&runtime, resources))
    }

    fn stats(&self, r: StatsRequest) -> Result<StatsResponse> {
        let (runtime, pid) = {
            let cell = self.cell(&r.id)?;
            let c = lock(&cell.state);
            (c.runtime.clone(), c.init.pid)
        };
        Ok(StatsResponse {
            stats: MessageField::some(self.backend.stats(&runtime, pid)?),
            ..Default::default()
        })
    }

    fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse> {
        let task_pid = match self.cell(&req.id) {
            Ok(cell) => lock(&cell.state).init.pid,
            Err(_) => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    /// Exits (through the hook) unless a container is there or on its way ([`Table`]). A
    /// shutdown declined only for a container `start` announced is tried again when that
    /// announcement expires, so a `Create` that never comes does not keep the shim alive.
    fn shutdown(&self, _req: ShutdownRequest) -> Result<()> {
        let mut t = lock(&self.containers);
        match t.busy() {
            None => {
                t.closing = true;
                (self.on_shutdown)();
            }
            Some(why) => {
                log::debug!("shutdown declined: {why}");
                let only_joined = t.cells.is_empty() && t.creating.is_empty();
                if only_joined {
                    self.shutdown_after(JOIN_TIMEOUT);
                }
            }
        }
        Ok(())
    }

    /// Tries [`Inner::shutdown`] again after `delay`, if the service is still there.
    fn shutdown_after(&self, delay: Duration) {
        let me = self.me.clone();
        let spawned = std::thread::Builder::new()
            .name("shutdown-retry".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                std::thread::sleep(delay);
                if let Some(inner) = me.upgrade() {
                    let _ = inner.shutdown(ShutdownRequest::default());
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot schedule a later shutdown: {e}");
        }
    }

    /// `start` found this shim for container `id` ([`GROUP_SERVICE`]): refused once the
    /// shim is exiting, so `start` makes a new one; otherwise shutdown waits for its `Create`.
    fn join(&self, req: ConnectRequest) -> Result<()> {
        validate_id("container", &req.id)?;
        let mut t = lock(&self.containers);
        if t.closing {
            return Err(Error::FailedPrecondition(
                "the shim is shutting down".into(),
            ));
        }
        t.joined.insert(req.id, Instant::now());
        Ok(())
    }

    /// Reserves `id` for a `Create`: refused if the container exists or is being created,
    /// or the shim is exiting. The reservation ends with the returned guard.
    fn reserve(&self, id: &str) -> Result<Reserved<'_, B>> {
        let mut t = lock(&self.containers);
        if t.closing {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: the shim is shutting down"
            )));
        }
        if t.cells.contains_key(id) || !t.creating.insert(id.to_string()) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        t.joined.remove(id);
        Ok(Reserved {
            inner: self,
            id: id.to_string(),
        })
    }
}

/// Whether the processes of the container in `bundle` can outlive its init: it has no pid
/// namespace of its own (the host's, or one it joins by path), so the kernel does not end
/// them with the init. An unreadable spec counts as yes, the safe side; containerd's runc
/// shim decides the same way (`ShouldKillAllOnExit`).
fn shares_pid_namespace(bundle: &std::path::Path) -> bool {
    let path = bundle.join("config.json");
    let spec = std::fs::read(&path)
        .ok()
        .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok());
    let Some(spec) = spec else {
        return true;
    };
    let own = spec["linux"]["namespaces"].as_array().is_some_and(|ns| {
        ns.iter()
            .any(|n| n["type"] == "pid" && n["path"].as_str().is_none_or(str::is_empty))
    });
    !own
}

/// Marks `exec_id`'s process reaped; the drain its exit must wait for, if it has stdio.
fn reaped<C>(c: &mut Container<C>, exec_id: &str) -> Option<Drain> {
    let p = c.process_mut(exec_id).ok()?;
    p.reaped = true;
    p.io.as_ref().map(|io| io.drain().clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ShimContext;

    /// A backend with only the required methods, living outside host cgroups.
    /// Answers every call; keeps the init's stdio, so that a test can play the process.
    #[derive(Default)]
    struct Minimal(Mutex<Option<ChildStdio>>);

    impl Backend for Minimal {
        type Container = ();
        type Options = ();
        fn new(_: &ShimContext) -> Result<Self> {
            Ok(Minimal::default())
        }
        fn host_cgroups(&self) -> bool {
            false
        }
        fn create(&self, req: CreateRequest<'_, ()>) -> Result<crate::Created<()>> {
            *lock(&self.0) = Some(req.stdio);
            Ok(crate::Created {
                container: (),
                pid: Some(4242),
            })
        }
        fn start(&self, _: &()) -> Result<u32> {
            Ok(4242)
        }
        fn exec(&self, _: &(), _: ExecRequest<'_>) -> Result<u32> {
            Ok(4343)
        }
        fn kill(&self, _: &(), _: Target<'_>, _: Signal, _: bool) -> Result<()> {
            Ok(())
        }
        fn pids(&self, _: &()) -> Result<Vec<u32>> {
            Ok(vec![4242])
        }
    }

    /// A bundle directory for the tests' containers (the SDK keeps their options there).
    fn bundle() -> String {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
        dir.path().to_str().unwrap().to_string()
    }

    struct Events(Mutex<Vec<String>>);

    impl Publisher for Events {
        fn publish(&self, topic: &str, _: protobuf::well_known_types::any::Any) {
            lock(&self.0).push(topic.to_string());
        }
    }

    fn service() -> (TaskService<Minimal>, Arc<Events>) {
        let events = Arc::new(Events(Mutex::new(Vec::new())));
        let svc = TaskService::new(
            "ns",
            Minimal::default(),
            events.clone(),
            Box::new(|| {}),
            Exits::reported(),
        )
        .unwrap();
        let create = CreateTaskRequest {
            id: "c1".into(),
            bundle: bundle(),
            ..Default::default()
        };
        svc.inner.create(create).unwrap();
        (svc, events)
    }

    fn code<T: std::fmt::Debug>(r: Result<T>) -> ttrpc::Code {
        r.unwrap_err().code()
    }

    #[test]
    fn shutdown_waits_for_containers_on_their_way_and_then_refuses_them() {
        let events = Arc::new(Events(Mutex::new(Vec::new())));
        let exits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hook = exits.clone();
        let svc = TaskService::new(
            "ns",
            Minimal::default(),
            events,
            Box::new(move || {
                hook.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
            Exits::reported(),
        )
        .unwrap();
        let i = &svc.inner;
        let exited = || exits.load(std::sync::atomic::Ordering::SeqCst);
        let join = |id: &str| {
            i.join(ConnectRequest {
                id: id.into(),
                ..Default::default()
            })
        };
        let create = |id: &str| {
            i.create(CreateTaskRequest {
                id: id.into(),
                bundle: bundle(),
                ..Default::default()
            })
        };
        // Announced by `start`: shutdown waits for its Create.
        join("c1").unwrap();
        i.shutdown(ShutdownRequest::default()).unwrap();
        assert_eq!(exited(), 0);
        // A Create in flight holds it too, and its id cannot be created twice meanwhile.
        let in_flight = i.reserve("c1").unwrap();
        assert_eq!(code(create("c1")), ttrpc::Code::ALREADY_EXISTS);
        i.shutdown(ShutdownRequest::default()).unwrap();
        assert_eq!(exited(), 0);
        // It failed: nothing is left, so the shim may go.
        drop(in_flight);
        i.shutdown(ShutdownRequest::default()).unwrap();
        assert_eq!(exited(), 1);
        // Exiting: `start` and containerd are sent elsewhere.
        assert_eq!(code(join("c2")), ttrpc::Code::FAILED_PRECONDITION);
        assert_eq!(code(create("c2")), ttrpc::Code::FAILED_PRECONDITION);
    }

    #[test]
    fn what_a_backend_leaves_out_answers_unimplemented() {
        let (svc, _) = service();
        assert_eq!(
            code(svc.inner.set_paused("c1", true)),
            ttrpc::Code::UNIMPLEMENTED
        );
        assert_eq!(
            code(svc.inner.backend.stats(&(), 4242)),
            ttrpc::Code::UNIMPLEMENTED
        );
        let resources = protobuf::well_known_types::any::Any {
            value: b"{}".to_vec(),
            ..Default::default()
        };
        let update = UpdateTaskRequest {
            id: "c1".into(),
            resources: MessageField::some(resources),
            ..Default::default()
        };
        assert_eq!(
            code(svc.inner.update(update.clone())),
            ttrpc::Code::UNIMPLEMENTED
        );
        let bad = UpdateTaskRequest {
            resources: MessageField::none(),
            ..update
        };
        assert_eq!(code(svc.inner.update(bad)), ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(
            code(svc.inner.backend.checkpoint(&(), "/x", None)),
            ttrpc::Code::UNIMPLEMENTED
        );
        // ...and what the SDK knows is absent is NotFound, not Unimplemented.
        assert_eq!(
            code(svc.inner.set_paused("nope", true)),
            ttrpc::Code::NOT_FOUND
        );
    }

    #[test]
    fn resize_of_a_process_without_terminal_does_nothing() {
        let (svc, _) = service();
        let req = |exec_id: &str| ResizePtyRequest {
            id: "c1".into(),
            exec_id: exec_id.into(),
            width: 80,
            height: 24,
            ..Default::default()
        };
        svc.inner.resize_pty(req("")).unwrap();
        assert_eq!(
            code(svc.inner.resize_pty(req("nope"))),
            ttrpc::Code::NOT_FOUND
        );
    }

    #[test]
    fn exec_spec_takes_terminal_from_the_request_and_delete_before_start_is_zero() {
        let (svc, events) = service();
        let spec = protobuf::well_known_types::any::Any {
            value: br#"{"args":["sh"],"cwd":"/","terminal":false}"#.to_vec(),
            ..Default::default()
        };
        svc.inner
            .exec(ExecProcessRequest {
                id: "c1".into(),
                exec_id: "e1".into(),
                terminal: true,
                spec: MessageField::some(spec),
                ..Default::default()
            })
            .unwrap();
        {
            let cell = svc.inner.cell("c1").unwrap();
            let c = lock(&cell.state);
            let spec: serde_json::Value = serde_json::from_slice(&c.execs["e1"].spec).unwrap();
            assert_eq!(spec["terminal"], true);
            assert_eq!(spec["args"][0], "sh");
        }
        let del = svc
            .inner
            .delete(DeleteRequest {
                id: "c1".into(),
                exec_id: "e1".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((del.pid, del.exit_status), (0, 0));
        assert_eq!(del.exited_at.seconds, -62_135_596_800, "Go's zero time");
        assert!(!lock(&events.0).contains(&topics::TASK_EXIT.to_string()));
    }

    #[test]
    fn lifecycle_events_and_states_in_order() {
        let (svc, events) = service();
        svc.inner
            .start(StartRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        let again = svc.inner.start(StartRequest {
            id: "c1".into(),
            ..Default::default()
        });
        assert_eq!(code(again), ttrpc::Code::FAILED_PRECONDITION);
        let state = svc
            .inner
            .state(StateRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(state.status.enum_value(), Ok(Status::RUNNING));
        let del = svc.inner.delete(DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        });
        assert_eq!(
            code(del),
            ttrpc::Code::FAILED_PRECONDITION,
            "running tasks are not deleted"
        );
        // The reaper is not installed in unit tests: deliver the exit by hand.
        svc.inner.on_exit(Exit {
            pid: 4242,
            status: 3,
            at: std::time::SystemTime::now(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let req = WaitRequest {
            id: "c1".into(),
            ..Default::default()
        };
        svc.inner
            .wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
        assert_eq!(rx.try_recv().unwrap().unwrap().exit_status, 3);
        svc.inner
            .delete(DeleteRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            *lock(&events.0),
            [
                topics::TASK_CREATE,
                topics::TASK_START,
                topics::TASK_EXIT,
                topics::TASK_DELETE
            ]
        );
    }
    #[test]
    fn waits_are_answered_on_exit_and_on_delete_without_a_thread() {
        let (svc, _) = service();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = |tx: std::sync::mpsc::Sender<Result<WaitResponse>>| -> Waiter {
            Box::new(move |r| tx.send(r).unwrap())
        };
        let req = |id: &str| WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        // Created, not started: no answer yet.
        svc.inner.wait_later(req("c1"), waiter(tx.clone()));
        assert!(rx.try_recv().is_err(), "answered before any exit");
        svc.inner
            .start(StartRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        svc.inner.wait_later(req("c1"), waiter(tx.clone()));
        svc.inner.on_exit(Exit {
            pid: 4242,
            status: 7,
            at: std::time::SystemTime::now(),
        });
        for _ in 0..2 {
            assert_eq!(rx.try_recv().unwrap().unwrap().exit_status, 7);
        }
        // After the exit: answered at once.
        svc.inner.wait_later(req("c1"), waiter(tx.clone()));
        assert_eq!(rx.try_recv().unwrap().unwrap().exit_status, 7);
        svc.inner.wait_later(req("nope"), waiter(tx.clone()));
        assert_eq!(code(rx.try_recv().unwrap()), ttrpc::Code::NOT_FOUND);
    }

    /// The exit waits for the copy: when `Wait` answers, every byte the process wrote is
    /// in the log — even though a "child" still holds the pipe open, so no EOF comes.
    #[test]
    fn wait_answers_only_once_the_output_is_in_its_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let uri = format!("file://{}", log.display());
        let events = Arc::new(Events(Mutex::new(Vec::new())));
        let svc = TaskService::new(
            "ns",
            Minimal::default(),
            events.clone(),
            Box::new(|| {}),
            Exits::reported(),
        )
        .unwrap();
        svc.inner
            .create(CreateTaskRequest {
                id: "c1".into(),
                bundle: bundle(),
                stdout: uri,
                ..Default::default()
            })
            .unwrap();
        svc.inner
            .start(StartRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        let stdout = lock(&svc.inner.backend.0)
            .take()
            .and_then(|s| s.stdout)
            .unwrap();
        let _child_holds_it = stdout.try_clone().unwrap();
        // 4 MiB through a 64 KiB pipe: when this returns, the last of it is still in the pipe.
        let data = vec![b'x'; 4 << 20];
        std::fs::File::from(stdout).write_all(&data).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        svc.inner.on_exit(Exit {
            pid: 4242,
            status: 0,
            at: std::time::SystemTime::now(),
        });
        let req = WaitRequest {
            id: "c1".into(),
            ..Default::default()
        };
        svc.inner
            .wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
        let waited = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(waited.unwrap().exit_status, 0);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), data.len() as u64);
        assert!(lock(&events.0).contains(&topics::TASK_EXIT.to_string()));
    }

    #[test]
    fn delete_answers_pending_waits() {
        let (svc, _) = service();
        let (tx, rx) = std::sync::mpsc::channel();
        let req = WaitRequest {
            id: "c1".into(),
            ..Default::default()
        };
        svc.inner.wait_later(
            req,
            Box::new(move |r: Result<WaitResponse>| tx.send(r).unwrap()),
        );
        svc.inner
            .delete(DeleteRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(code(rx.try_recv().unwrap()), ttrpc::Code::NOT_FOUND);
    }

    /// A backend whose processes are not host children (a VM's guest): it reports their
    /// exits itself. The exec started with `e-quick` exits before `exec` returns.
    struct Guest {
        exits: crate::reaper::ExitSink,
    }

    impl Backend for Guest {
        type Container = ();
        type Options = ();
        const MOUNTS_ROOTFS: bool = false;
        const HOST_PROCESSES: bool = false;
        fn new(ctx: &ShimContext) -> Result<Self> {
            Ok(Guest {
                exits: ctx.exits.clone(),
            })
        }
        fn host_cgroups(&self) -> bool {
            false
        }
        fn create(&self, _: CreateRequest<'_, ()>) -> Result<crate::Created<()>> {
            Ok(crate::Created {
                container: (),
                pid: Some(10),
            })
        }
        fn start(&self, _: &()) -> Result<u32> {
            Ok(10)
        }
        fn exec(&self, _: &(), req: ExecRequest<'_>) -> Result<u32> {
            if req.exec_id == "e-quick" {
                self.exits.report(12, 5);
                return Ok(12);
            }
            Ok(11)
        }
        fn kill(&self, _: &(), _: Target<'_>, _: Signal, _: bool) -> Result<()> {
            Ok(())
        }
        fn pids(&self, _: &()) -> Result<Vec<u32>> {
            Ok(vec![10])
        }
    }

    /// Topics, with the process id of each `TaskExit`.
    struct Exited(Mutex<Vec<String>>);

    impl Publisher for Exited {
        fn publish(&self, topic: &str, event: protobuf::well_known_types::any::Any) {
            let entry = match topic {
                topics::TASK_EXIT => {
                    let exit = TaskExit::parse_from_bytes(&event.value).unwrap();
                    format!("{topic} {}", exit.id)
                }
                _ => topic.to_string(),
            };
            lock(&self.0).push(entry);
        }
    }

    #[test]
    fn exits_a_backend_reports_are_applied_like_reaped_ones() {
        let exits = Exits::reported();
        let ctx = ShimContext {
            namespace: "ns".into(),
            id: "c1".into(),
            bundle: bundle(),
            debug: false,
            address: String::new(),
            exits: exits.sink(),
        };
        let sink = ctx.exits.clone();
        let events = Arc::new(Exited(Mutex::new(Vec::new())));
        let backend = Guest::new(&ctx).unwrap();
        let svc = TaskService::new("ns", backend, events.clone(), Box::new(|| {}), exits).unwrap();
        let i = &svc.inner;
        i.create(CreateTaskRequest {
            id: "c1".into(),
            bundle: bundle(),
            ..Default::default()
        })
        .unwrap();
        let start = |exec_id: &str| {
            i.start(StartRequest {
                id: "c1".into(),
                exec_id: exec_id.into(),
                ..Default::default()
            })
        };
        start("").unwrap();
        let spec = protobuf::well_known_types::any::Any {
            value: br#"{"args":["sh"],"cwd":"/"}"#.to_vec(),
            ..Default::default()
        };
        for exec_id in ["e1", "e-quick"] {
            i.exec(ExecProcessRequest {
                id: "c1".into(),
                exec_id: exec_id.into(),
                spec: MessageField::some(spec.clone()),
                ..Default::default()
            })
            .unwrap();
            start(exec_id).unwrap();
        }
        let wait = |exec_id: &str| {
            let (tx, rx) = std::sync::mpsc::channel();
            let req = WaitRequest {
                id: "c1".into(),
                exec_id: exec_id.into(),
                ..Default::default()
            };
            i.wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
            rx
        };
        let long = std::time::Duration::from_secs(10);
        // Exited before `exec` returned its pid: kept, and applied after its start.
        let quick = wait("e-quick").recv_timeout(long).unwrap().unwrap();
        assert_eq!(quick.exit_status, 5);
        // The init goes first, yet its exit waits for its exec's.
        let init = wait("");
        sink.report(10, 9);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(init.try_recv().is_err(), "init's exit before its exec's");
        sink.report(11, 0);
        assert_eq!(init.recv_timeout(long).unwrap().unwrap().exit_status, 9);
        assert_eq!(
            wait("e1").recv_timeout(long).unwrap().unwrap().exit_status,
            0
        );
        let exit = |id: &str| format!("{} {id}", topics::TASK_EXIT);
        let seen = lock(&events.0).clone();
        let at = |entry: &str| seen.iter().position(|e| e == entry).unwrap();
        assert!(at(topics::TASK_START) < at(&exit("e-quick")));
        assert!(at(&exit("e1")) < at(&exit("c1")), "{seen:?}");
        assert_eq!(seen.last(), Some(&exit("c1")));
    }

    /// A backend that carries its processes' stdio itself: keeps what it was given.
    #[derive(Default)]
    struct Carrier {
        given: Mutex<Vec<(bool, bool, CarriedStdio)>>,
        closed: Mutex<Vec<String>>,
    }

    impl Backend for Carrier {
        type Container = ();
        type Options = ();
        const MOUNTS_ROOTFS: bool = false;
        const HOST_STDIO: bool = false;
        fn new(_: &ShimContext) -> Result<Self> {
            Ok(Carrier::default())
        }
        fn host_cgroups(&self) -> bool {
            false
        }
        fn create(&self, req: CreateRequest<'_, ()>) -> Result<crate::Created<()>> {
            let host_fds = req.stdio.stdin.is_some() || req.stdio.stdout.is_some();
            let carried = req.carried.unwrap();
            lock(&self.given).push((host_fds, req.console_socket.is_some(), carried));
            Ok(crate::Created {
                container: (),
                pid: Some(20),
            })
        }
        fn start(&self, _: &()) -> Result<u32> {
            Ok(20)
        }
        fn exec(&self, _: &(), _: ExecRequest<'_>) -> Result<u32> {
            Ok(21)
        }
        fn kill(&self, _: &(), _: Target<'_>, _: Signal, _: bool) -> Result<()> {
            Ok(())
        }
        fn pids(&self, _: &()) -> Result<Vec<u32>> {
            Ok(vec![20])
        }
        fn close_io(&self, _: &(), exec_id: &str) -> Result<()> {
            lock(&self.closed).push(exec_id.to_string());
            Ok(())
        }
    }

    /// Nothing is opened on the host (the fifos do not even exist, and a terminal gets no
    /// console socket); the backend gets the paths, and the exit waits for its copy.
    #[test]
    fn a_backend_carrying_stdio_gets_the_paths_and_the_exit_waits_for_its_copy() {
        let events = Arc::new(Events(Mutex::new(Vec::new())));
        let svc = TaskService::new(
            "ns",
            Carrier::default(),
            events,
            Box::new(|| {}),
            Exits::reported(),
        )
        .unwrap();
        let i = &svc.inner;
        i.create(CreateTaskRequest {
            id: "c1".into(),
            bundle: bundle(),
            stdin: "/nonexistent/stdin".into(),
            stdout: "/nonexistent/stdout".into(),
            terminal: true,
            ..Default::default()
        })
        .unwrap();
        let (host_fds, console_socket, carried) = lock(&i.backend.given).pop().unwrap();
        assert!(!host_fds && !console_socket);
        assert_eq!(carried.paths.stdout, "/nonexistent/stdout");
        assert!(carried.paths.terminal);
        i.start(StartRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
        i.close_io(CloseIORequest {
            id: "c1".into(),
            stdin: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(*lock(&i.backend.closed), [""]);
        let stdout = carried.copying();
        i.on_exit(Exit {
            pid: 20,
            status: 1,
            at: std::time::SystemTime::now(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let req = WaitRequest {
            id: "c1".into(),
            ..Default::default()
        };
        i.wait_later(req, Box::new(move |r| tx.send(r).unwrap()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            rx.try_recv().is_err(),
            "answered before the output was delivered"
        );
        drop(stdout);
        let waited = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(waited.unwrap().exit_status, 1);
    }
}
