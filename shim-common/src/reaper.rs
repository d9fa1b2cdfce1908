//! Child reaping for a subreaper shim, without ever losing an exit status.
//!
//! A shim is the subreaper of its containers, so it must `waitpid(-1)` to collect them —
//! which would also steal the exit status of any command the shim runs itself (`runc create`).
//! Every exit therefore goes through one [`Reaper`]: it broadcasts each reaped exit to all
//! subscribers, and [`run`] subscribes *before* spawning, so a command's exit can never slip
//! past it.
//!
//! Every process the shim starts goes through [`spawn`]. std's `Command::spawn` reaps a
//! child whose `execve` failed itself, with `waitpid(pid)`, and panics if that child is
//! already gone — which it is when the reaper's `waitpid(-1)` got there first. So a spawn
//! and a reap never overlap: a logging binary or runtime that is missing is then a clear
//! error for its request, not the end of the shim.

use std::io::Read;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Context, Result};
use crate::events::Publisher;

/// One reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The process that exited.
    pub pid: i32,
    /// Exit code, or 128 + signal number for a process killed by a signal (137 = SIGKILL).
    pub status: u32,
    /// When the shim learned of it.
    pub at: SystemTime,
}

impl Exit {
    fn from_wait(ws: WaitStatus) -> Option<Exit> {
        let (pid, status) = match ws {
            WaitStatus::Exited(pid, code) => (pid, code as u32),
            WaitStatus::Signaled(pid, sig, _) => (pid, 128 + sig as u32),
            _ => return None,
        };
        Some(Exit {
            pid: pid.as_raw(),
            status,
            at: SystemTime::now(),
        })
    }
}

/// The process-wide reaper. There is one because `SIGCHLD` and `waitpid(-1)` are process-wide.
///
/// Whoever runs the process installs it ([`install`]: the daemon, or a guest agent that is
/// PID 1) and hands it to the task service it serves ([`Exits::reaped`]); [`spawn`] and
/// [`run`] find it themselves, because they must hold off the reap whoever calls them.
pub struct Reaper {
    subscribers: Mutex<Vec<(u64, Sender<Exit>)>>,
    next_id: AtomicU64,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Spawns hold it shared, the reaper exclusively (see the module's doc). A spawn holds it
/// from fork until `execve` succeeded or failed: a millisecond or two.
static SPAWNING: RwLock<()> = RwLock::new(());

/// Makes this process the subreaper of its descendants and enables exit subscriptions.
/// Installing twice returns the same reaper.
///
/// The caller must deliver `SIGCHLD` to [`reap`] (the SDK's signal thread does,
/// [`crate::signals::spawn`]).
pub fn install() -> Result<&'static Reaper> {
    crate::os::set_subreaper()?;
    Ok(REAPER.get_or_init(|| Reaper {
        subscribers: Mutex::new(Vec::new()),
        next_id: AtomicU64::new(0),
    }))
}

/// The reaper, if one is installed.
pub fn installed() -> Option<&'static Reaper> {
    REAPER.get()
}

/// Collects every exited child and tells every subscriber. Call on `SIGCHLD`.
pub fn reap() {
    let Some(reaper) = REAPER.get() else { return };
    let _no_spawn = SPAWNING.write().unwrap_or_else(|e| e.into_inner());
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(ws) => {
                if let Some(exit) = Exit::from_wait(ws) {
                    reaper.broadcast(exit);
                }
            }
        }
    }
}

impl Reaper {
    fn broadcast(&self, exit: Exit) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|(_, tx)| tx.send(exit).is_ok());
    }

    /// Sends every exit reaped from now on to `tx`, until [`Reaper::remove`] of the id.
    fn add(&self, tx: Sender<Exit>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, tx));
        id
    }

    fn remove(&self, id: u64) {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
    }

    /// A stream of every exit this reaper reaps from now on.
    pub fn subscribe(&'static self) -> Subscription {
        let (tx, rx) = mpsc::channel();
        Subscription {
            id: self.add(tx),
            rx,
            reaper: self,
        }
    }
}

/// A stream of every exit reaped after it was created. Unsubscribes on drop.
pub struct Subscription {
    id: u64,
    rx: Receiver<Exit>,
    reaper: &'static Reaper,
}

/// Subscribes to exits; `None` when no reaper is installed (plain, non-subreaper processes).
pub fn subscribe() -> Option<Subscription> {
    Some(REAPER.get()?.subscribe())
}

impl Subscription {
    /// The next exit, blocking.
    pub fn recv(&self) -> Option<Exit> {
        self.rx.recv().ok()
    }

    /// Blocks until `pid` exits, discarding other exits.
    pub fn wait_for(&self, pid: i32) -> Option<Exit> {
        self.rx.iter().find(|e| e.pid == pid)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.reaper.remove(self.id);
    }
}

/// Every exit a task service applies, from one queue: the ones a [`Reaper`] reaps (when the
/// service was given one) and the ones its backend reports through an [`ExitSink`] — a
/// VM's guest agent telling of a container process the host never sees. Both take the same
/// path through the service, so the same ordering rules hold for both.
///
/// ```
/// use shim_common::reaper::Exits;
/// // A service whose processes are not host children: only the backend reports exits.
/// let exits = Exits::reported();
/// exits.sink().report(42, 0);
/// assert_eq!(exits.recv().map(|e| (e.pid, e.status)), Some((42, 0)));
/// ```
pub struct Exits {
    rx: Receiver<Exit>,
    /// For new sinks; `None` once the queue's consumer took it ([`Exits::seal`]).
    tx: Option<Sender<Exit>>,
    /// The reaper feeding `tx`, and the id to unsubscribe with.
    reaper: Option<(&'static Reaper, u64)>,
}

impl Exits {
    /// Only the exits reported through [`Exits::sink`].
    pub fn reported() -> Exits {
        let (tx, rx) = mpsc::channel();
        Exits {
            rx,
            tx: Some(tx),
            reaper: None,
        }
    }

    /// The exits `reaper` reaps from now on, and those reported through [`Exits::sink`].
    pub fn reaped(reaper: &'static Reaper) -> Exits {
        let (tx, rx) = mpsc::channel();
        let id = reaper.add(tx.clone());
        Exits {
            rx,
            tx: Some(tx),
            reaper: Some((reaper, id)),
        }
    }

    /// Where a backend reports exits into this queue. Take it before the queue goes to
    /// its [`crate::TaskService`]; a sink taken after reports to nobody.
    pub fn sink(&self) -> ExitSink {
        ExitSink {
            tx: self.tx.clone(),
            events: None,
        }
    }

    /// A sink that also publishes the OOM kills it is told of to `events`.
    pub(crate) fn sink_publishing(&self, events: Arc<dyn Publisher>) -> ExitSink {
        ExitSink {
            events: Some(events),
            ..self.sink()
        }
    }

    /// No more sinks: [`Exits::recv`] ends (`None`) once every sink and the reaper's
    /// subscription are gone, so the service's exit thread ends with its backend.
    pub(crate) fn seal(&mut self) {
        self.tx = None;
    }

    /// The next exit, blocking; `None` once nothing can report one any more.
    pub fn recv(&self) -> Option<Exit> {
        self.rx.recv().ok()
    }
}

impl Drop for Exits {
    fn drop(&mut self) {
        if let Some((reaper, id)) = self.reaper {
            reaper.remove(id);
        }
    }
}

/// How a backend reports the exit of a process the host reaper cannot see (one in a VM,
/// on another machine): by the pid it returned from `create`, `start` or `exec`. The task
/// service then applies it exactly as a reaped exit: `Wait` answers, `TaskExit` follows,
/// an init's exit after its execs'. A backend finds it in [`crate::ShimContext::exits`].
///
/// ```
/// # fn guest_said_exited(_: &shim_common::ShimContext) -> (u32, u32) { (7, 0) }
/// # fn f(ctx: &shim_common::ShimContext) {
/// let (pid, status) = guest_said_exited(ctx);
/// ctx.exits.report(pid, status);
/// # }
/// ```
///
/// The same backend tells of the OOM kills the host's cgroups cannot see through
/// [`ExitSink::oom_killed`].
///
/// The default sink belongs to no service: what it is told is dropped (a `cleanup` context).
#[derive(Clone, Default)]
pub struct ExitSink {
    tx: Option<Sender<Exit>>,
    /// Where the service publishes its events, for the OOM kills.
    events: Option<Arc<dyn Publisher>>,
}

impl std::fmt::Debug for ExitSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitSink")
            .field("service", &self.tx.is_some())
            .finish()
    }
}

impl ExitSink {
    /// Reports that process `pid` exited now with `status` (exit code, or 128 + signal).
    pub fn report(&self, pid: u32, status: u32) {
        self.report_exit(Exit {
            pid: pid as i32,
            status,
            at: SystemTime::now(),
        });
    }

    /// Reports that the OOM killer struck in container `id` (a guest kernel's, say), published
    /// as `TaskOOM` at once: called before reporting the exit it caused, it comes before
    /// that exit's `TaskExit`, as containerd expects.
    pub fn oom_killed(&self, id: &str) {
        match &self.events {
            Some(events) => crate::events::publish_oom(&**events, id),
            None => log::debug!("OOM kill in {id} reported to no task service"),
        }
    }

    /// Reports `exit`, with the time it happened (a guest's clock, say).
    pub fn report_exit(&self, exit: Exit) {
        match &self.tx {
            Some(tx) if tx.send(exit).is_ok() => {}
            _ => log::debug!("exit of pid {} reported to no task service", exit.pid),
        }
    }
}

/// Starts `cmd` with a fresh process's signal state ([`crate::signals::reset_in_child`])
/// and never collides with the reaper (see the module's doc): a program that cannot be run
/// is an error (its `execve`'s), nothing worse. Its exit is the reaper's: subscribe before
/// the spawn to learn of it, and never `wait` on the [`Child`] while a reaper is installed.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    crate::signals::reset_in_child(cmd);
    let _no_reap = SPAWNING.read().unwrap_or_else(|e| e.into_inner());
    cmd.spawn()
}

/// What a command run through [`run`] left behind.
#[derive(Debug, Default)]
pub struct Output {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// What it wrote to stdout, if piped.
    pub stdout: Vec<u8>,
    /// What it wrote to stderr, if piped.
    pub stderr: Vec<u8>,
}

impl Output {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Runs `cmd` to completion and returns its status and whatever of stdout/stderr the
/// caller piped. Safe inside a subreaper: the exit is taken from the reaper, not `wait`.
///
/// ```
/// use std::process::{Command, Stdio};
/// let out = shim_common::reaper::run(Command::new("echo").arg("hi").stdout(Stdio::piped())).unwrap();
/// assert_eq!((out.status, out.stdout.as_slice()), (0, &b"hi\n"[..]));
/// ```
pub fn run(cmd: &mut Command) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let Some(sub) = subscribe() else {
        crate::signals::reset_in_child(cmd);
        let out = cmd.output().with_context(|| format!("run {program}"))?;
        let status = out
            .status
            .code()
            .map(|c| c as u32)
            .or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                out.status.signal().map(|s| 128 + s as u32)
            })
            .unwrap_or(255);
        return Ok(Output {
            status,
            stdout: out.stdout,
            stderr: out.stderr,
        });
    };
    let mut child = spawn(cmd).with_context(|| format!("run {program}"))?;
    let (stdout, stderr) = collect(&mut child);
    let pid = child.id() as i32;
    // Never call child.wait(): the reaper owns waitpid.
    let exit = sub.wait_for(pid).map(|e| e.status).unwrap_or(255);
    Ok(Output {
        status: exit,
        stdout,
        stderr,
    })
}

fn collect(child: &mut Child) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let (so, se) = (child.stdout.take(), child.stderr.take());
    let err_ref = &mut err;
    std::thread::scope(|s| {
        if let Some(mut se) = se {
            s.spawn(move || se.read_to_end(err_ref));
        }
        if let Some(mut so) = so {
            let _ = so.read_to_end(&mut out);
        }
    });
    (out, err)
}
