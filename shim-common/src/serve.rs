//! The daemon: serve the task API on the listener `start` handed over until shut down.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use crate::backend::{Backend, ShimContext};
use crate::error::{Context, Error, Result};
use crate::events::RemotePublisher;
use crate::flags::Flags;
use crate::service::TaskService;
use crate::{logger, reaper, signals, socket};

/// The fd on which the daemon finds its listening socket.
pub const LISTENER_FD: i32 = 3;

/// Why the daemon stops.
const SIGNAL: &str = "signal";
const SHUTDOWN_REQUEST: &str = "shutdown request";

/// Serves until `Shutdown` (with no task left), `SIGTERM` or `SIGINT`, then exits.
pub fn serve<B: Backend>(flags: &Flags) -> Result<()> {
    limit_malloc_arenas();
    signals::block()?;
    logger::redirect_stderr_to_fifo(Path::new(&flags.bundle));
    logger::init(flags.debug);
    check_listener()?;
    reaper::install()?;

    let (tx, rx) = mpsc::channel::<&'static str>();
    let on_signal = Mutex::new(tx.clone());
    signals::spawn(move || {
        let _ = on_signal.lock().map(|tx| tx.send(SIGNAL));
    })?;
    let publisher = RemotePublisher::new(&flags.ttrpc_address, &flags.namespace)?;
    let backend = B::new(&context(flags))?;
    let on_shutdown = Mutex::new(tx);
    let address = flags.socket.clone();
    let service = TaskService::new(
        flags.namespace.clone(),
        backend,
        publisher.clone(),
        // Runs while the service refuses new containers: once the name is gone, the next
        // `start` of this group binds it afresh instead of finding a shim about to exit.
        Box::new(move || {
            remove_socket(&address);
            let _ = on_shutdown.lock().map(|tx| tx.send(SHUTDOWN_REQUEST));
        }),
    )?;
    // SAFETY: fd 3 is the listening socket `start` handed over (checked above); nothing
    // else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(LISTENER_FD) };
    let idle = service.into_server().spawn(Some(listener), Vec::new())?;
    log::info!("serving {} for namespace {}", flags.socket, flags.namespace);

    let why = rx.recv().unwrap_or(SIGNAL);
    log::info!("shutting down ({why})");
    // After a shutdown request the name may already be another shim's.
    if why != SHUTDOWN_REQUEST {
        remove_socket(&flags.socket);
    }
    // The Shutdown's own answer, and any call that raced it (a Delete), must reach
    // containerd before the connection closes with the process.
    if !idle.wait(Duration::from_secs(2)) {
        log::warn!("exiting with requests still being handled");
    }
    publisher.close(Duration::from_secs(2));
    std::process::exit(0)
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
        address: if flags.address.is_empty() {
            flags.grpc_address.clone()
        } else {
            flags.address.clone()
        },
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
