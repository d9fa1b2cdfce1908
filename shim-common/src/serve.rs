//! The daemon: serve the task API on the listener `start` handed over until shut down; and
//! [`serve_on`], the same service on any connected byte stream (a VM's guest agent), or
//! [`serve_each`], on each of a succession of them (an agent whose host reconnects).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::backend::{Backend, ShimContext};
use crate::error::{Context, Error, Result};
use crate::events::{Publisher, RemotePublisher};
use crate::flags::Flags;
use crate::reaper::{self, Exits, Reaper};
use crate::rpc;
use crate::service::TaskService;
use crate::{logger, signals, socket, trace};

/// The fd on which the daemon finds its listening socket.
pub const LISTENER_FD: i32 = 3;

/// How long answers in flight get to reach the caller once serving stops.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// Why serving stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Signal,
    ShutdownRequest,
    /// The peer of [`serve_on`]'s stream closed it.
    Closed,
}

/// What `serve` and [`serve_on`] share: the backend built for `ctx` with an exit sink into
/// the service's exits, and the service's ttrpc server (with `extra` methods beside it).
/// `before_shutdown` runs when `Shutdown` is accepted, before `Why::ShutdownRequest` is
/// sent on `stop`.
fn server<B: Backend>(
    mut ctx: ShimContext,
    publisher: Arc<dyn Publisher>,
    reaper: Option<&'static Reaper>,
    extra: rpc::Methods,
    before_shutdown: impl Fn() + Send + Sync + 'static,
    stop: Sender<Why>,
) -> Result<Served> {
    let exits = match reaper {
        Some(reaper) if B::HOST_PROCESSES => Exits::reaped(reaper),
        _ => Exits::reported(),
    };
    ctx.exits = exits.sink_publishing(publisher.clone());
    let backend = B::new(&ctx)?;
    let stop = Mutex::new(stop);
    let service = TaskService::new(
        ctx.namespace.clone(),
        backend,
        publisher,
        Box::new(move || {
            before_shutdown();
            let _ = stop.lock().map(|tx| tx.send(Why::ShutdownRequest));
        }),
        exits,
    )?;
    let stopper = service.stopper();
    let reporter = service.reporter();
    let mut methods = service.methods();
    methods.extend(extra);
    Ok(Served {
        server: rpc::Server::new(methods),
        stopper,
        reporter,
    })
}

/// The ttrpc server of a task service, how to stop its backend and how to report its state.
struct Served {
    server: rpc::Server,
    stopper: Box<dyn Fn() + Send + Sync>,
    reporter: Reporter,
}

/// The service's state report ([`TaskService::reporter`]).
type Reporter = Box<dyn Fn() -> Vec<String> + Send + Sync>;

/// Serves the task service of backend `B` on `stream`, an already-connected byte stream (a
/// VM's virtio-serial port, one end of a socketpair), until the peer closes it or a
/// `Shutdown` is accepted. Events go to `publisher` (for a guest agent: back over its own
/// channel to the host); exits come from `reaper` when given (and the backend's processes
/// are host processes, [`Backend::HOST_PROCESSES`]) — which the caller installed
/// ([`reaper::install`]) and whose `SIGCHLD` it delivers ([`crate::signals::spawn`]) — and
/// from the backend through [`ShimContext::exits`], which this sets. `methods` are served
/// beside the task service: a guest agent's [`crate::peer_events::PeerEvents::methods`],
/// through which the host fetches the events on this same stream.
///
/// Nothing process-wide is touched here: no signals, no logger, no socket names. After a
/// `Shutdown`, calls in flight are answered (up to 2 s) and a socket `stream` is shut down;
/// the caller is expected to exit.
///
/// ```no_run
/// # fn f<B: shim_common::Backend>(fd: std::os::fd::OwnedFd) -> shim_common::Result<()> {
/// use shim_common::{peer_events::PeerEvents, reaper, serve_on, signals, ShimContext};
/// // A guest agent, PID 1: reap every orphan, and serve the host on the port it opened.
/// signals::block()?;
/// let reaper = reaper::install()?;
/// signals::spawn(|| {}, || {})?;
/// let ctx = ShimContext {
///     namespace: "default".into(),
///     id: "pod".into(),
///     bundle: "/run/agent".into(),
///     debug: false,
///     address: String::new(),
///     exits: Default::default(),
/// };
/// let events = PeerEvents::new(&ctx.namespace);
/// serve_on::<B>(ctx, fd, events.clone(), Some(reaper), events.methods())
/// # }
/// ```
pub fn serve_on<B: Backend>(
    ctx: ShimContext,
    stream: OwnedFd,
    publisher: Arc<dyn Publisher>,
    reaper: Option<&'static Reaper>,
    methods: rpc::Methods,
) -> Result<()> {
    let mut once = Some(stream);
    serve_connections::<B>(ctx, move || once.take().map(Ok), publisher, reaper, methods)
}

/// Serves one task service of backend `B` on each connection `next` hands over, one after
/// the other, until a `Shutdown` is accepted (then returns `Ok`) or `next` fails (returns its
/// error). As [`serve_on`] otherwise; but when a peer closes its connection the service
/// stays: its containers, their processes and stdio, and the events queued for the peer
/// ([`crate::peer_events::PeerEvents`]) are there for the next connection, which `next`
/// waits for (a guest agent's `accept` on its vsock listener, or its virtio-serial port
/// turning readable again). Answers to calls of a closed connection are dropped, never
/// written to the next one.
///
/// ```no_run
/// # fn f<B: shim_common::Backend>(listener: std::os::unix::net::UnixListener) -> shim_common::Result<()> {
/// use shim_common::{peer_events::PeerEvents, serve_each, Context, ShimContext};
/// let ctx = ShimContext {
///     namespace: "default".into(),
///     id: "pod".into(),
///     bundle: "/run/agent".into(),
///     debug: false,
///     address: String::new(),
///     exits: Default::default(),
/// };
/// let events = PeerEvents::new(&ctx.namespace);
/// let next = move || {
///     let (stream, _) = listener.accept().context("accept the host")?;
///     Ok(stream.into())
/// };
/// serve_each::<B>(ctx, next, events.clone(), None, events.methods())
/// # }
/// ```
pub fn serve_each<B: Backend>(
    ctx: ShimContext,
    mut next: impl FnMut() -> Result<OwnedFd> + Send + 'static,
    publisher: Arc<dyn Publisher>,
    reaper: Option<&'static Reaper>,
    methods: rpc::Methods,
) -> Result<()> {
    serve_connections::<B>(ctx, move || Some(next()), publisher, reaper, methods)
}

/// [`serve_on`] and [`serve_each`]: one service on each connection of `next` in turn, until
/// `Shutdown`, an error from `next`, or `next` has no more (`None`).
fn serve_connections<B: Backend>(
    ctx: ShimContext,
    mut next: impl FnMut() -> Option<Result<OwnedFd>> + Send + 'static,
    publisher: Arc<dyn Publisher>,
    reaper: Option<&'static Reaper>,
    methods: rpc::Methods,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let Served {
        server,
        stopper: stop_backend,
        ..
    } = server::<B>(ctx, publisher, reaper, methods, || {}, tx.clone())?;
    let idle = server.idle();
    // The connection being served (a duplicate, to end it after a Shutdown), and why
    // `next` could not give another.
    let current: Arc<Mutex<Option<OwnedFd>>> = Arc::default();
    let failed: Arc<Mutex<Option<Error>>> = Arc::default();
    {
        let (current, failed) = (current.clone(), failed.clone());
        std::thread::Builder::new()
            .name("ttrpc".into())
            .spawn(move || loop {
                let stream = match next() {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        *lock(&failed) = Some(e);
                        let _ = tx.send(Why::Closed);
                        return;
                    }
                    None => {
                        let _ = tx.send(Why::Closed);
                        return;
                    }
                };
                let raw = stream.as_raw_fd();
                match stream.try_clone() {
                    Ok(dup) => *lock(&current) = Some(dup),
                    Err(e) => log::warn!("duplicate served stream fd {raw}: {e}"),
                }
                log::info!("serving a connection on fd {raw}");
                server.run(None, vec![stream]);
                lock(&current).take();
                log::info!("the connection on fd {raw} closed");
            })
            .context("spawn ttrpc server")?;
    }
    let why = rx.recv().unwrap_or(Why::Closed);
    log::info!("stopped serving connections ({why:?})");
    if why == Why::ShutdownRequest {
        if !idle.wait(ANSWER_GRACE) {
            log::warn!("stopping with requests still being handled");
        }
        if let Some(peer) = lock(&current).take() {
            // SAFETY: shutdown(2) on an fd we own (a no-op on a character device).
            unsafe { libc::shutdown(peer.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
    stop_backend();
    let failed = lock(&failed).take();
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves until `Shutdown` (with no task left), `SIGTERM` or `SIGINT`, then exits.
pub fn serve<B: Backend>(flags: &Flags) -> Result<()> {
    limit_malloc_arenas();
    signals::block()?;
    logger::redirect_stderr_to_fifo(Path::new(&flags.bundle));
    logger::init(flags.debug);
    if let Err(e) = trace::init(&shim_name()) {
        log::warn!("{e}; serving without tracing");
    }
    check_listener()?;
    let reaper = reaper::install()?;

    let (tx, rx) = mpsc::channel::<Why>();
    let on_signal = Mutex::new(tx.clone());
    let publisher = RemotePublisher::new(&flags.ttrpc_address, &flags.namespace)?;
    // The report needs the service, which is built after the signal thread runs (a
    // backend may run commands while it is built: their exits come through that thread).
    let reporter: Arc<OnceLock<Reporter>> = Arc::default();
    let (report, events) = (reporter.clone(), publisher.clone());
    signals::spawn(
        move || {
            let _ = on_signal.lock().map(|tx| tx.send(Why::Signal));
        },
        move || {
            let service = report.get().map(|r| r()).unwrap_or_default();
            for line in process_report(events.queued()).into_iter().chain(service) {
                log::info!("state: {line}");
            }
        },
    )?;
    let address = flags.socket.clone();
    // Runs while the service refuses new containers: once the name is gone, the next
    // `start` of this group binds it afresh instead of finding a shim about to exit.
    let before_shutdown = move || remove_socket(&address);
    let Served {
        server,
        stopper: stop_backend,
        reporter: report,
    } = server::<B>(
        context(flags),
        publisher.clone(),
        Some(reaper),
        rpc::Methods::new(),
        before_shutdown,
        tx,
    )?;
    let _ = reporter.set(report);
    // SAFETY: fd 3 is the listening socket `start` handed over (checked above); nothing
    // else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(LISTENER_FD) };
    let idle = server.spawn(Some(listener), Vec::new())?;
    log::info!("serving {} for namespace {}", flags.socket, flags.namespace);

    let why = wait(&rx);
    log::info!("shutting down ({why:?})");
    // After a shutdown request the name may already be another shim's.
    if why != Why::ShutdownRequest {
        remove_socket(&flags.socket);
    }
    // The Shutdown's own answer, and any call that raced it (a Delete), must reach
    // containerd before the connection closes with the process.
    if !idle.wait(ANSWER_GRACE) {
        log::warn!("exiting with requests still being handled");
    }
    stop_backend();
    publisher.close(Duration::from_secs(2));
    trace::shutdown();
    std::process::exit(0)
}

/// The process's own line of the `SIGUSR1` report: its threads, its memory, and the events
/// waiting for containerd.
#[cold]
fn process_report(events_queued: usize) -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    vec![format!(
        "shim pid {}: {} threads, rss {}, {events_queued} events queued for containerd{}",
        std::process::id(),
        field("Threads:"),
        field("VmRSS:"),
        if trace::enabled() { ", tracing on" } else { "" },
    )]
}

/// The binary's file name (`containerd-shim-runc-v2`): the service that spans come from.
fn shim_name() -> String {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "containerd-shim".into())
}

fn wait(rx: &Receiver<Why>) -> Why {
    rx.recv().unwrap_or(Why::Signal)
}

fn remove_socket(address: &str) {
    if !address.is_empty() {
        if let Err(e) = socket::remove(address) {
            log::warn!("{e}");
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core). A shim's
/// threads come and go with every exec, and memory freed in one arena is not reused by
/// another, so RSS creeps up exec after exec. The shim allocates little: one arena it is.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

pub(crate) fn context(flags: &Flags) -> ShimContext {
    ShimContext {
        namespace: flags.namespace.clone(),
        id: flags.id.clone(),
        bundle: flags.bundle.clone(),
        debug: flags.debug,
        address: grpc_address(flags),
        exits: Default::default(),
    }
}

/// containerd's gRPC socket: `-address`, else `GRPC_ADDRESS`; empty when that is the ttrpc
/// socket too, as a daemon other than containerd that has only one socket passes it: a gRPC
/// client would wait there for an answer that never comes.
fn grpc_address(flags: &Flags) -> String {
    let address = if flags.address.is_empty() {
        &flags.grpc_address
    } else {
        &flags.address
    };
    if crate::socket::path(address) == crate::socket::path(&flags.ttrpc_address) {
        String::new()
    } else {
        address.clone()
    }
}

/// The daemon only ever runs with a listener from `start`; say so instead of failing obscurely.
fn check_listener() -> Result<()> {
    let st = nix::sys::stat::fstat(LISTENER_FD).map_err(|_| {
        Error::FailedPrecondition(format!(
            "no listening socket on fd {LISTENER_FD}: the daemon is started by the `start` action"
        ))
    })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Error::FailedPrecondition(format!(
            "fd {LISTENER_FD} is not a socket: the daemon is started by the `start` action"
        )));
    }
    // Children (runc, loggers) must not inherit the listener.
    nix::fcntl::fcntl(
        LISTENER_FD,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("set close-on-exec on listener")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CreateRequest, Created, ExecRequest, Signal, Target};
    use crate::rpc::Client;
    use protobuf::Message;
    use protocol::shim::*;
    use std::os::unix::net::UnixStream;

    /// A backend whose one process is pretend: it lives nowhere the host reaper could see,
    /// so a signal "ends" it by reporting its exit.
    struct Remote(crate::reaper::ExitSink);

    impl Backend for Remote {
        type Container = ();
        type Options = ();
        const MOUNTS_ROOTFS: bool = false;
        const HOST_PROCESSES: bool = false;
        const HOST_STDIO: bool = false;
        fn new(ctx: &ShimContext) -> Result<Self> {
            Ok(Remote(ctx.exits.clone()))
        }
        fn host_cgroups(&self) -> bool {
            false
        }
        fn create(&self, _: CreateRequest<'_, ()>) -> Result<Created<()>> {
            Ok(Created {
                container: (),
                pid: Some(7),
            })
        }
        fn start(&self, _: &()) -> Result<u32> {
            Ok(7)
        }
        fn exec(&self, _: &(), _: ExecRequest<'_>) -> Result<u32> {
            Ok(8)
        }
        fn kill(&self, _: &(), t: Target<'_>, sig: Signal, _: bool) -> Result<()> {
            self.0.report(t.pid(), 128 + sig.number() as u32);
            Ok(())
        }
        fn pids(&self, _: &()) -> Result<Vec<u32>> {
            Ok(vec![7])
        }
    }

    #[test]
    fn the_grpc_address_is_empty_when_it_is_the_ttrpc_socket() {
        let flags = |address: &str, grpc: &str, ttrpc: &str| Flags {
            address: address.into(),
            grpc_address: grpc.into(),
            ttrpc_address: ttrpc.into(),
            ..Default::default()
        };
        // containerd: two sockets.
        let sock = "/run/containerd/containerd.sock";
        let ttrpc = "/run/containerd/containerd.sock.ttrpc";
        assert_eq!(grpc_address(&flags(sock, sock, ttrpc)), sock);
        assert_eq!(grpc_address(&flags("", sock, ttrpc)), sock);
        // A daemon with one socket, however it spells it.
        assert_eq!(
            grpc_address(&flags("/run/d.sock", "", "unix:///run/d.sock")),
            ""
        );
        assert_eq!(grpc_address(&flags("", "/run/d.sock", "/run/d.sock")), "");
    }

    fn ctx() -> ShimContext {
        ShimContext {
            namespace: "ns".into(),
            id: "c1".into(),
            bundle: String::new(),
            debug: false,
            address: String::new(),
            exits: Default::default(),
        }
    }

    fn call<Req: Message, Res: Message>(c: &Client, method: &str, req: &Req) -> Result<Res> {
        let bytes = c.call(
            protocol::TASK_SERVICE_V2,
            method,
            req,
            Duration::from_secs(10),
        )?;
        Res::parse_from_bytes(&bytes).map_err(|e| Error::Runtime(e.to_string()))
    }

    /// Serves on one end of a socketpair on a thread; the client gets the other end.
    fn serving() -> (Client, std::thread::JoinHandle<Result<()>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || {
            let events = crate::peer_events::PeerEvents::new("ns");
            let methods = events.methods();
            serve_on::<Remote>(ctx(), OwnedFd::from(theirs), events, None, methods)
        });
        (Client::new(ours.into()).unwrap(), served)
    }

    #[test]
    fn serve_on_a_stream_answers_task_calls_and_returns_on_shutdown() {
        let bundle = tempfile::tempdir().unwrap();
        let (client, served) = serving();
        let connect: ConnectResponse = call(&client, "Connect", &ConnectRequest::new()).unwrap();
        assert_eq!(connect.shim_pid, std::process::id());
        let create = CreateTaskRequest {
            id: "c1".into(),
            bundle: bundle.path().to_str().unwrap().into(),
            ..Default::default()
        };
        let created: CreateTaskResponse = call(&client, "Create", &create).unwrap();
        assert_eq!(created.pid, 7);
        let state: StateResponse = call(
            &client,
            "State",
            &StateRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            state.status.enum_value(),
            Ok(protocol::task::Status::CREATED)
        );
        // A container is there: Shutdown declines, and serving goes on.
        let _: protobuf::well_known_types::empty::Empty =
            call(&client, "Shutdown", &ShutdownRequest::new()).unwrap();
        assert!(!served.is_finished());
        let delete = DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        };
        let _: DeleteResponse = call(&client, "Delete", &delete).unwrap();
        let _: protobuf::well_known_types::empty::Empty =
            call(&client, "Shutdown", &ShutdownRequest::new()).unwrap();
        served.join().unwrap().unwrap();
    }

    fn next_event(c: &Client, timeout: Duration) -> Result<protocol::events::Envelope> {
        let empty = protobuf::well_known_types::empty::Empty::new();
        let bytes = c.call(crate::peer_events::EVENTS_SERVICE, "Next", &empty, timeout)?;
        protocol::events::Envelope::parse_from_bytes(&bytes)
            .map_err(|e| Error::Runtime(e.to_string()))
    }

    #[test]
    fn serve_each_keeps_containers_and_events_for_the_next_connection() {
        let bundle = tempfile::tempdir().unwrap();
        let (connect, connections) = mpsc::channel::<OwnedFd>();
        let served = std::thread::spawn(move || {
            let events = crate::peer_events::PeerEvents::new("ns");
            let methods = events.methods();
            let next = move || {
                connections
                    .recv()
                    .map_err(|_| Error::Unavailable("no more connections".into()))
            };
            serve_each::<Remote>(ctx(), next, events, None, methods)
        });
        let dial = || {
            let (ours, theirs) = UnixStream::pair().unwrap();
            connect.send(OwnedFd::from(theirs)).unwrap();
            Client::new(ours.into()).unwrap()
        };
        let id = || "c1".to_string();

        let first = dial();
        let create = CreateTaskRequest {
            id: id(),
            bundle: bundle.path().to_str().unwrap().into(),
            ..Default::default()
        };
        let _: CreateTaskResponse = call(&first, "Create", &create).unwrap();
        assert_eq!(
            next_event(&first, Duration::from_secs(10)).unwrap().topic,
            protocol::topics::TASK_CREATE
        );
        // A `Next` left waiting when the connection goes: its event must not go with it.
        let e = next_event(&first, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");
        drop(first);

        // Served only once the first connection is done with.
        let second = dial();
        let start = StartRequest {
            id: id(),
            ..Default::default()
        };
        let _: StartResponse = call(&second, "Start", &start).unwrap();
        let state: StateResponse = call(
            &second,
            "State",
            &StateRequest {
                id: id(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            state.status.enum_value(),
            Ok(protocol::task::Status::RUNNING)
        );
        assert_eq!(
            next_event(&second, Duration::from_secs(10)).unwrap().topic,
            protocol::topics::TASK_START
        );
        drop(second);

        // Events published while nobody is connected wait, in order.
        let third = dial();
        let kill = KillRequest {
            id: id(),
            signal: 9,
            ..Default::default()
        };
        let _: protobuf::well_known_types::empty::Empty = call(&third, "Kill", &kill).unwrap();
        let waited: WaitResponse = call(
            &third,
            "Wait",
            &WaitRequest {
                id: id(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(waited.exit_status, 137);
        drop(third);
        let fourth = dial();
        assert_eq!(
            next_event(&fourth, Duration::from_secs(10)).unwrap().topic,
            protocol::topics::TASK_EXIT
        );
        let delete = DeleteRequest {
            id: id(),
            ..Default::default()
        };
        let _: DeleteResponse = call(&fourth, "Delete", &delete).unwrap();
        let _: protobuf::well_known_types::empty::Empty =
            call(&fourth, "Shutdown", &ShutdownRequest::new()).unwrap();
        served.join().unwrap().unwrap();
    }

    #[test]
    fn serve_each_returns_the_error_of_a_connection_source_that_fails() {
        let events = crate::peer_events::PeerEvents::new("ns");
        let methods = events.methods();
        let next = || Err(Error::Unavailable("the port went away".into()));
        let e = serve_each::<Remote>(ctx(), next, events, None, methods).unwrap_err();
        assert!(e.to_string().contains("the port went away"), "{e}");
    }

    #[test]
    fn serve_on_returns_when_the_peer_closes() {
        let (client, served) = serving();
        let _: ConnectResponse = call(&client, "Connect", &ConnectRequest::new()).unwrap();
        drop(client);
        served.join().unwrap().unwrap();
    }

    #[test]
    fn serve_on_answers_wait_with_the_exit_the_backend_reported() {
        let bundle = tempfile::tempdir().unwrap();
        let (client, served) = serving();
        let id = || "c1".to_string();
        let create = CreateTaskRequest {
            id: id(),
            bundle: bundle.path().to_str().unwrap().into(),
            stdout: "/nonexistent/fifo".into(),
            ..Default::default()
        };
        let _: CreateTaskResponse = call(&client, "Create", &create).unwrap();
        let start = StartRequest {
            id: id(),
            ..Default::default()
        };
        let _: StartResponse = call(&client, "Start", &start).unwrap();
        let kill = KillRequest {
            id: id(),
            signal: 9,
            ..Default::default()
        };
        let _: protobuf::well_known_types::empty::Empty = call(&client, "Kill", &kill).unwrap();
        let wait = WaitRequest {
            id: id(),
            ..Default::default()
        };
        let waited: WaitResponse = call(&client, "Wait", &wait).unwrap();
        assert_eq!(waited.exit_status, 137);
        // The events, fetched over the same stream, in order.
        let mut topics = Vec::new();
        while topics.last().map(String::as_str) != Some(protocol::topics::TASK_EXIT) {
            let next = client.call(
                crate::peer_events::EVENTS_SERVICE,
                "Next",
                &protobuf::well_known_types::empty::Empty::new(),
                Duration::from_secs(10),
            );
            let envelope = protocol::events::Envelope::parse_from_bytes(&next.unwrap()).unwrap();
            assert_eq!(envelope.namespace, "ns");
            topics.push(envelope.topic);
        }
        assert_eq!(
            topics,
            [
                protocol::topics::TASK_CREATE,
                protocol::topics::TASK_START,
                protocol::topics::TASK_EXIT
            ]
        );
        drop(client);
        served.join().unwrap().unwrap();
    }
}
