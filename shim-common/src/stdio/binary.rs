//! `binary:///path?k=v` and `binary-v2:///path?k=v`: containerd's logging-driver contract.
//!
//! The shim starts the logging binary as its own child, as containerd's Go shim does:
//! - argv: each query key followed by its first value (`?a=1&b` → `a 1 b ""`); Go ranges
//!   over a map, so containerd's order is random — here it is the order in the URI;
//! - env: the shim's, plus `CONTAINER_ID` and `CONTAINER_NAMESPACE`;
//! - fd 3: read end of the process's stdout pipe, fd 4: read end of its stderr pipe,
//!   fd 5: write end of a "ready" pipe. The logger closes fd 5 when it is ready (`binary`),
//!   or writes one byte to it (`binary-v2`, which tells "ready" from "died");
//! - `Create` returns only once the logger is ready, and fails if it exits instead;
//! - when the process is deleted, the logger gets `SIGTERM`, then `SIGKILL` after 12 s.
//!
//! The shim is a subreaper whose one reaper owns `waitpid`, so the logger's exit is taken
//! from a [`reaper::subscribe`] made before the spawn, never from `Child::wait`.
//!
//! The shim keeps its own copy of the pipes' read ends. If the logger dies early the shim
//! drains them, so the container neither blocks on a full pipe nor dies of `SIGPIPE`.

use std::ffi::OsString;
use std::io::{self, PipeReader, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pump::{self, Sink};
use super::{lock, output_pipe, spawn, unescape, ChildStdio, IoContext, IoOwner, Uri};
use crate::error::{Context, Error, Result};
use crate::reaper::{self, Subscription};

/// How long a logger has to flush and exit after `SIGTERM` (containerd's figure).
const TERM_GRACE: Duration = Duration::from_secs(12);
/// How long a `SIGKILL`ed logger may take to be reaped before we stop waiting.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long after "ready" a logger that exits anyway still fails `Create`: long enough for
/// one that exits right after signalling, short enough not to slow every `Create` much.
const SETTLE: Duration = Duration::from_millis(20);
/// The fds the contract puts the pipes on.
const LOGGER_FDS: [RawFd; 3] = [3, 4, 5];

/// How a logger says it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ready {
    /// `binary://`: closing fd 5 (a byte is accepted too, as Go's shim does).
    Close,
    /// `binary-v2://`: one byte on fd 5; EOF alone means it failed.
    Byte,
}

/// A logging binary, as its URI names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Spec {
    pub(super) path: PathBuf,
    pub(super) args: Vec<OsString>,
    pub(super) ready: Ready,
}

impl Spec {
    pub(super) fn new(uri: &Uri<'_>, whole: &str, ready: Ready) -> Result<Spec> {
        Ok(Spec {
            path: uri.absolute_path(whole)?,
            args: query_args(uri.query),
            ready,
        })
    }
}

/// The logger's argv from the URI query, as containerd's `NewBinaryCmd` builds it: each
/// distinct key, then its first value (empty when it has none). Pairs Go's `url.Query`
/// drops (a `;`, a malformed escape) are dropped too.
fn query_args(query: &str) -> Vec<OsString> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for pair in query.split('&') {
        if pair.is_empty() || pair.contains(';') {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (unescape(k, true), unescape(v, true)) else {
            continue;
        };
        if !pairs.iter().any(|(seen, _)| *seen == k) {
            pairs.push((k, v));
        }
    }
    pairs
        .into_iter()
        .flat_map(|(k, v)| [OsString::from_vec(k), OsString::from_vec(v)])
        .collect()
}

/// A running logger. Dropping it ends the logger: `SIGTERM`, then `SIGKILL` after 12 s,
/// and waits for it, so nothing outlives the process's deletion.
#[derive(Debug)]
pub(super) struct Logger {
    pid: i32,
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    /// The logger's exit status, once, from the watcher thread.
    exits: Receiver<u32>,
    status: Option<u32>,
}

/// What the watcher thread and the shim share about a logger.
#[derive(Debug)]
struct Shared {
    /// Set once the logger was reaped: its pid may be reused, never signal it again.
    exited: bool,
    /// The shim's copies of the pipes' read ends, drained if the logger dies first.
    readers: Option<[PipeReader; 2]>,
}

impl Logger {
    /// Starts the logger with the process's output pipes and waits until it is ready; on
    /// success `child` holds the pipes' write ends for the process.
    pub(super) fn start(
        spec: &Spec,
        owner: IoOwner,
        ctx: IoContext<'_>,
        child: &mut ChildStdio,
    ) -> Result<Logger> {
        let (out_r, out_w) = output_pipe(owner)?;
        let (err_r, err_w) = output_pipe(owner)?;
        let (ready_r, ready_w) = io::pipe().context("create logger ready pipe")?;
        // Above fd 5, so putting them on 3, 4, 5 in the child never overwrites one of them.
        let fds = [
            dup_above(&out_r, 6)?,
            dup_above(&err_r, 6)?,
            dup_above(&ready_w, 6)?,
        ];
        drop(ready_w);
        let raw = fds.each_ref().map(|fd| fd.as_raw_fd());
        let mut cmd = Command::new(&spec.path);
        cmd.args(&spec.args)
            .env("CONTAINER_ID", ctx.id)
            .env("CONTAINER_NAMESPACE", ctx.namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only dup2, which is async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (src, dst) in raw.into_iter().zip(LOGGER_FDS) {
                    if libc::dup2(src, dst) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        // Subscribe before the spawn: a logger that exits at once must not slip past.
        let sub = reaper::subscribe();
        let proc = reaper::spawn(&mut cmd).map_err(|e| {
            Error::InvalidArgument(format!("start logging binary {}: {e}", spec.path.display()))
        })?;
        // From here only the logger holds the ready pipe's write end: EOF means it let go.
        drop(cmd);
        drop(fds);
        let pid = proc.id() as i32;
        let shared = Arc::new(Mutex::new(Shared {
            exited: false,
            readers: Some([out_r, err_r]),
        }));
        let (tx, exits) = mpsc::sync_channel(1);
        let watch = match sub {
            Some(sub) => Watch::Reaper(sub),
            None => Watch::Child(proc),
        };
        let watched = shared.clone();
        let watcher = spawn("logger", move || {
            let status = watch.wait(pid);
            let readers = {
                let mut s = lock(&watched);
                s.exited = true;
                s.readers.take()
            };
            let _ = tx.send(status);
            if let Some([out, err]) = readers {
                // The process may still write: keep its pipes flowing.
                for pipe in [out, err] {
                    // Nobody is waiting for these bytes: the logger was their destination.
                    if let Err(e) = pump::copy(pipe, Sink::Discard, None) {
                        log::error!("drain output after the logger exited: {e}");
                    }
                }
            }
        });
        if let Err(e) = watcher {
            // Nothing would ever learn of its exit; the reaper still collects it.
            let _ = nix::sys::signal::kill(nix_pid(pid), nix::sys::signal::SIGKILL);
            return Err(e);
        }
        let mut logger = Logger {
            pid,
            path: spec.path.clone(),
            shared,
            exits,
            status: None,
        };
        logger.wait_ready(ready_r, spec.ready)?;
        child.stdout = Some(out_w.into());
        child.stderr = Some(err_w.into());
        Ok(logger)
    }

    /// Blocks until the logger signals ready; an error (the logger killed and reaped) if it
    /// exits before, or within [`SETTLE`] after.
    fn wait_ready(&mut self, mut ready: PipeReader, protocol: Ready) -> Result<()> {
        let mut byte = [0u8; 1];
        let got_byte = loop {
            match ready.read(&mut byte) {
                Ok(n) => break n == 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.kill();
                    return Err(e).context("read the logging binary's ready pipe");
                }
            }
        };
        drop(ready);
        if !got_byte {
            // A v1 logger's fd 5 also closes when it dies; binary-v2 needs the byte.
            let dying = crate::os::exiting(self.pid);
            if dying || protocol == Ready::Byte {
                let why = match dying.then(|| self.wait_exit(KILL_GRACE)).flatten() {
                    Some(status) => format!("exited before it was ready (exit status {status})"),
                    None => {
                        self.kill();
                        "closed fd 5 without writing the ready byte (binary-v2)".to_string()
                    }
                };
                return Err(Error::Runtime(format!(
                    "logging binary {} {why}",
                    self.path.display()
                )));
            }
        }
        if let Some(status) = self.wait_exit(SETTLE) {
            return Err(Error::Runtime(format!(
                "logging binary {} exited right after signalling ready (exit status {status})",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// The logger's exit status, waiting up to `timeout` for it.
    fn wait_exit(&mut self, timeout: Duration) -> Option<u32> {
        if self.status.is_none() {
            self.status = match self.exits.recv_timeout(timeout) {
                Ok(status) => Some(status),
                Err(RecvTimeoutError::Timeout) => None,
                // The watcher is gone without a word: treat the logger as lost.
                Err(RecvTimeoutError::Disconnected) => Some(255),
            };
        }
        self.status
    }

    /// Sends `sig` unless the logger was already reaped (its pid may belong to someone else
    /// now). Holding the lock orders this against the watcher marking the exit; only the
    /// instant between the reaper's `waitpid` and that mark remains, as in containerd.
    fn signal(&self, sig: nix::sys::signal::Signal) -> bool {
        let s = lock(&self.shared);
        !s.exited && nix::sys::signal::kill(nix_pid(self.pid), sig).is_ok()
    }

    /// `SIGKILL` and wait for the reaper to collect it, for the error paths of `start`.
    fn kill(&mut self) {
        if self.signal(nix::sys::signal::SIGKILL) {
            self.wait_exit(KILL_GRACE);
        }
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        // The process is gone: nothing is left to drain for.
        lock(&self.shared).readers.take();
        if !self.signal(nix::sys::signal::SIGTERM) || self.wait_exit(TERM_GRACE).is_some() {
            return;
        }
        log::warn!(
            "logging binary {} (pid {}) ignored SIGTERM for {TERM_GRACE:?}; killing it",
            self.path.display(),
            self.pid
        );
        self.kill();
    }
}

/// How the watcher learns the logger's exit.
enum Watch {
    /// The shim's reaper owns `waitpid`: wait for its broadcast.
    Reaper(Subscription),
    /// No reaper in this process (a plain program, unit tests): nobody else will collect
    /// the child, so the watcher must.
    Child(Child),
}

impl Watch {
    fn wait(self, pid: i32) -> u32 {
        match self {
            Watch::Reaper(sub) => sub.wait_for(pid).map_or(255, |e| e.status),
            Watch::Child(mut child) => match child.wait() {
                Ok(st) => st
                    .code()
                    .map(|c| c as u32)
                    .or_else(|| st.signal().map(|s| 128 + s as u32))
                    .unwrap_or(255),
                Err(_) => 255,
            },
        }
    }
}

fn nix_pid(pid: i32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(pid)
}

/// A close-on-exec duplicate of `fd` numbered `min` or above.
fn dup_above(fd: &impl AsFd, min: RawFd) -> Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(
        fd.as_fd().as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min),
    )
    .context("duplicate a logger pipe")?;
    // SAFETY: fcntl just returned this new fd, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::super::{ProcessIo, StdioPaths};
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Instant;

    fn args(q: &str) -> Vec<String> {
        query_args(q)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn args_are_each_key_then_its_first_value() {
        assert_eq!(args("a=1&b=2"), ["a", "1", "b", "2"]);
        assert_eq!(args("flag"), ["flag", ""]);
        assert_eq!(args("a=1&a=2&b="), ["a", "1", "b", ""]);
        assert_eq!(
            args("p=%2Fvar%2Flog+x&k%3D=v=w"),
            ["p", "/var/log x", "k=", "v=w"]
        );
        assert_eq!(args(""), Vec::<String>::new());
        assert_eq!(args("&&a=1&"), ["a", "1"]);
        // Dropped by Go's url.Query too.
        assert_eq!(args("a=1;b=2&c=%zz&d=4"), ["d", "4"]);
    }

    /// A logger written in sh: args are `out <file>`; it records its env and argv, signals
    /// ready with `ready` (shell code), then copies fd 3 and 4 into the file.
    fn logger(dir: &Path, ready: &str) -> PathBuf {
        let script = dir.join("logger.sh");
        let body = format!(
            "#!/bin/sh\nout=$2\n\
             echo \"env $CONTAINER_ID $CONTAINER_NAMESPACE\" > \"$out.env\"\n\
             echo \"argv $*\" >> \"$out.env\"\n\
             {ready}\n\
             exec 5>&-\n\
             sed 's/^/stdout:/' <&3 >> \"$out\" &\n\
             sed 's/^/stderr:/' <&4 >> \"$out\" &\n\
             wait\n"
        );
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn open(uri: &str) -> Result<(ProcessIo, ChildStdio)> {
        let paths = StdioPaths {
            stdout: uri.into(),
            stderr: uri.into(),
            ..Default::default()
        };
        let ctx = IoContext {
            id: "c1",
            namespace: "ns1",
        };
        ProcessIo::open(&paths, IoOwner::default(), ctx)
    }

    fn run(child: ChildStdio, script: &str) -> Option<i32> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        child.apply(&mut cmd);
        let mut proc = cmd.spawn().unwrap();
        drop(cmd);
        proc.wait().unwrap().code()
    }

    fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= n || Instant::now() > deadline {
                lines.sort();
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn protocol_round_trip(scheme: &str, ready: &str) {
        let dir = tempfile::tempdir().unwrap();
        let script = logger(dir.path(), ready);
        let out = dir.path().join("log.txt");
        let uri = format!("{scheme}://{}?out={}", script.display(), out.display());
        let (io, child) = open(&uri).unwrap();
        assert_eq!(run(child, "echo out; echo err >&2"), Some(0));
        assert_eq!(wait_for_lines(&out, 2), ["stderr:err", "stdout:out"]);
        let env = std::fs::read_to_string(format!("{}.env", out.display())).unwrap();
        assert_eq!(
            env,
            format!("env c1 ns1\nargv out {}\n", out.display()),
            "{env}"
        );
        let pid = io.logger.as_ref().unwrap().pid;
        drop(io);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "logger {pid} survived its ProcessIo"
        );
    }

    #[test]
    fn v1_logger_is_ready_when_it_closes_fd5() {
        protocol_round_trip("binary", ":");
    }

    #[test]
    fn v2_logger_is_ready_when_it_writes_a_byte() {
        protocol_round_trip("binary-v2", "printf x >&5");
    }

    #[test]
    fn create_waits_for_ready() {
        let dir = tempfile::tempdir().unwrap();
        let script = logger(dir.path(), "sleep 0.3");
        let out = dir.path().join("log.txt");
        let t = Instant::now();
        let (_io, _child) = open(&format!(
            "binary://{}?out={}",
            script.display(),
            out.display()
        ))
        .unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }

    fn assert_fails(uri_scheme: &str, ready: &str, want: &str) {
        let dir = tempfile::tempdir().unwrap();
        let script = logger(dir.path(), ready);
        let out = dir.path().join("log.txt");
        let uri = format!("{uri_scheme}://{}?out={}", script.display(), out.display());
        let e = open(&uri).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(e.contains(&script.display().to_string()), "{e}");
    }

    #[test]
    fn logger_exiting_at_once_fails_create() {
        assert_fails(
            "binary",
            "exit 3",
            "exited before it was ready (exit status 3)",
        );
        assert_fails(
            "binary-v2",
            "exit 3",
            "exited before it was ready (exit status 3)",
        );
    }

    #[test]
    fn logger_exiting_right_after_ready_fails_create() {
        assert_fails("binary", "exec 5>&-; exit 4", "exited");
        assert_fails(
            "binary-v2",
            "printf x >&5; exit 4",
            "right after signalling ready",
        );
    }

    #[test]
    fn v2_logger_closing_without_the_byte_fails_create() {
        // Alive but silent on fd 5: binary-v2 says that is not ready.
        assert_fails(
            "binary-v2",
            "exec 5>&-; sleep 5",
            "without writing the ready byte",
        );
    }

    #[test]
    fn missing_logger_binary_is_a_clear_error() {
        let e = open("binary:///nonexistent/logger?x=1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("start logging binary /nonexistent/logger"),
            "{e}"
        );
    }

    #[test]
    fn process_survives_its_logger_dying() {
        let dir = tempfile::tempdir().unwrap();
        // Ready, then gone before the process has written much.
        let script = dir.path().join("short.sh");
        std::fs::write(&script, "#!/bin/sh\nexec 5>&-\nsleep 0.1\nexit 0\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (_io, child) = open(&format!("binary://{}", script.display())).unwrap();
        let code = run(
            child,
            "sleep 0.3; i=0; while [ $i -lt 20000 ]; do echo line-$i; echo e >&2; \
             i=$((i+1)); done; exit 7",
        );
        assert_eq!(
            code,
            Some(7),
            "the process must not die of SIGPIPE or block"
        );
    }

    #[test]
    fn dropping_the_io_terminates_the_logger() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("idle.sh");
        std::fs::write(&script, "#!/bin/sh\nexec 5>&-\nexec sleep 100\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (io, _child) = open(&format!("binary://{}", script.display())).unwrap();
        let pid = io.logger.as_ref().unwrap().pid;
        let t = Instant::now();
        drop(io);
        assert!(t.elapsed() < TERM_GRACE, "SIGTERM should have ended sleep");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
