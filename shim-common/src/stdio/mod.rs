//! A process's stdio: pipes the shim owns between the process and where containerd wants
//! its output.
//!
//! containerd sends each stream of `Create`/`Exec` as a string:
//! - a plain path: one of containerd's fifos per stream (the default; module `fifo`);
//! - `file:///path`: stdout and stderr appended to one file (module `file`);
//! - `binary:///path?k=v` or `binary-v2:///path?k=v`: a logging binary the shim starts, which
//!   reads both streams (module `binary`).
//!
//! Whatever the destination, the process only ever writes to pipes the shim holds a reader
//! for. If the far end goes away (containerd or `ctr` exits, a logger dies) the shim keeps
//! draining, so the container is never killed by `SIGPIPE` nor blocked on a full pipe.
//!
//! Each process's copies report to its [`Drain`], which tells the task service when the
//! output has all reached its destination: the exit is published only then (module `drain`).
//!
//! ```no_run
//! use shim_common::stdio::{IoContext, IoOwner, ProcessIo, StdioPaths};
//! let paths = StdioPaths {
//!     stdout: "file:///var/log/c1.log".into(),
//!     stderr: "file:///var/log/c1.log".into(),
//!     ..Default::default()
//! };
//! let ctx = IoContext { id: "c1", namespace: "default" };
//! let (io, child) = ProcessIo::open(&paths, IoOwner::default(), ctx)?;
//! // Give `child` to the process; keep `io` until the process is deleted.
//! # drop((io, child));
//! # Ok::<(), shim_common::Error>(())
//! ```

mod binary;
mod drain;
mod fifo;
mod file;
mod pump;

pub use drain::{Copying, Drain};
pub(crate) use fifo::StdinFifo;

use std::ffi::OsString;
use std::io::{self, PipeReader, PipeWriter};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::process::{Command, Stdio as ProcStdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Context, Error, Result};

/// Where containerd wants a process's stdio, as sent in `Create` and `Exec`: fifo paths or
/// log URIs (`file://`, `binary://`, `binary-v2://`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// Fifo for the process's stdin; empty: none.
    pub stdin: String,
    /// Fifo or log URI for stdout; empty: `/dev/null`.
    pub stdout: String,
    /// Fifo or log URI for stderr; empty: `/dev/null` (unused with a terminal).
    pub stderr: String,
    /// The process gets a console; its output arrives on stdout.
    pub terminal: bool,
}

/// Ownership of the pipes the process writes to, for `io_uid`/`io_gid` (user namespaces).
#[derive(Debug, Clone, Copy, Default)]
pub struct IoOwner {
    /// Owner of the pipes; `None` keeps the shim's.
    pub uid: Option<u32>,
    /// Group of the pipes; `None` keeps the shim's.
    pub gid: Option<u32>,
}

/// Whose stdio this is: a logging binary gets these as `CONTAINER_ID` and
/// `CONTAINER_NAMESPACE`, which is how it knows where to file the lines it reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoContext<'a> {
    /// The container's id.
    pub id: &'a str,
    /// Its containerd namespace.
    pub namespace: &'a str,
}

/// The fds a backend gives the process (or the runtime that starts it) as fds 0, 1, 2.
/// `None` means `/dev/null`.
#[derive(Debug, Default)]
pub struct ChildStdio {
    /// fd 0.
    pub stdin: Option<OwnedFd>,
    /// fd 1.
    pub stdout: Option<OwnedFd>,
    /// fd 2.
    pub stderr: Option<OwnedFd>,
}

impl ChildStdio {
    /// Wires these fds into `cmd`; the shim's copies close when `cmd` is dropped.
    pub fn apply(self, cmd: &mut Command) {
        let to = |fd: Option<OwnedFd>| fd.map_or_else(ProcStdio::null, ProcStdio::from);
        cmd.stdin(to(self.stdin))
            .stdout(to(self.stdout))
            .stderr(to(self.stderr));
    }
}

/// The shim's side of a process's stdio; keep it until the process is deleted.
///
/// Dropping it does not stop fifo and file copies: they end on their own when the process
/// (and everything sharing its stdio) has exited. It does end a logging binary (`SIGTERM`,
/// then `SIGKILL` after 12 s), as containerd's Go shim does when it closes a process's IO.
#[derive(Debug, Default)]
pub struct ProcessIo {
    stdin: Arc<Mutex<Option<PipeWriter>>>,
    /// The shim's own writer of the stdin fifo, closed at `CloseIO` or with this.
    stdin_fifo: Option<StdinFifo>,
    logger: Option<binary::Logger>,
    /// The fifo and file copies. A logging binary reads the process's pipes itself: the
    /// bytes are in its hands the moment they are written, and flushing them is its part
    /// of the contract (it is told with `SIGTERM`, and `Delete` waits for it to exit).
    drain: Drain,
}

impl ProcessIo {
    /// Opens the stdio containerd asked for and starts the copies (or the logging binary).
    ///
    /// Everything is checked here, before the process exists: an unknown scheme, a log file
    /// whose directory is missing or a logging binary that fails to start is an error of
    /// `Create`/`Exec`, and nothing opened so far is left behind.
    pub fn open(
        paths: &StdioPaths,
        owner: IoOwner,
        ctx: IoContext<'_>,
    ) -> Result<(ProcessIo, ChildStdio)> {
        if paths.terminal {
            return Err(Error::Unimplemented("terminal stdio".into()));
        }
        let mut child = ChildStdio::default();
        let mut io = ProcessIo::default();
        match Output::parse(paths)? {
            Output::Fifo => fifo::open_outputs(paths, owner, &io.drain, &mut child)?,
            Output::File(path) => file::open_outputs(&path, paths, owner, &io.drain, &mut child)?,
            Output::Binary(spec) => {
                io.logger = Some(binary::Logger::start(&spec, owner, ctx, &mut child)?);
            }
        }
        // Last: once its thread runs, an error above could no longer undo it.
        if !paths.stdin.is_empty() {
            let (r, w) = io::pipe().context("create stdin pipe")?;
            *lock(&io.stdin) = Some(w);
            child.stdin = Some(r.into());
            io.stdin_fifo = Some(fifo::copy_stdin(&paths.stdin, io.stdin.clone())?);
        }
        Ok((io, child))
    }

    /// `CloseIO`: the process reads EOF once what clients wrote into the stdin fifo is
    /// copied (and every client closed its end). Closing the process's pipe at once would
    /// drop the input still in the fifo: clients write, close, then call `CloseIO`.
    pub fn close_stdin(&self) {
        match &self.stdin_fifo {
            Some(fifo) => fifo.close(),
            None => drop(lock(&self.stdin).take()),
        }
    }

    /// The copies of the process's output, to wait for once it has exited.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }
}

/// A process's stdio that the backend carries itself ([`crate::Backend::HOST_STDIO`]
/// `= false`): a VM backend forwards containerd's fifos into its guest, where the process
/// is. The SDK opens nothing on the host then; it keeps the accounting: the process's exit
/// is published, and `Wait` answered, once every [`CarriedStdio::copying`] taken has caught
/// up (bounded by [`crate::service::OUTPUT_GRACE`]), and `CloseIO` reaches the backend's
/// [`crate::Backend::close_io`].
///
/// ```
/// use shim_common::stdio::{CarriedStdio, StdioPaths};
/// let stdio = CarriedStdio::new(StdioPaths {
///     stdout: "/run/containerd/fifo/c1-stdout".into(),
///     ..Default::default()
/// });
/// let stdout = stdio.copying();
/// std::thread::spawn(move || {
///     // ... forward the guest's stdout into `stdio.paths.stdout` until its end ...
///     drop(stdout); // everything the process wrote is delivered
/// });
/// ```
#[derive(Debug, Clone)]
pub struct CarriedStdio {
    /// Where containerd wants the stdio (its fifos or log URIs), and whether the process
    /// has a terminal.
    pub paths: StdioPaths,
    drain: Drain,
}

impl CarriedStdio {
    /// Stdio for `paths` with nothing being copied yet.
    pub fn new(paths: StdioPaths) -> CarriedStdio {
        CarriedStdio {
            paths,
            drain: Drain::new(),
        }
    }

    /// Registers one stream the backend copies (stdout, stderr): the exit waits until it
    /// is dropped or reports [`Copying::caught_up`].
    pub fn copying(&self) -> Copying {
        self.drain.copying()
    }

    /// What the exit waits for: every [`CarriedStdio::copying`] taken.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }
}

/// Where a process's output goes. Like containerd, the stdout string decides for both
/// streams (stderr's when there is no stdout): a log URI names one destination for both.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    Fifo,
    File(PathBuf),
    Binary(binary::Spec),
}

impl Output {
    fn parse(paths: &StdioPaths) -> Result<Output> {
        let s = if paths.stdout.is_empty() {
            &paths.stderr
        } else {
            &paths.stdout
        };
        let Some(uri) = Uri::split(s) else {
            return Ok(Output::Fifo);
        };
        match uri.scheme.to_ascii_lowercase().as_str() {
            "file" => Ok(Output::File(uri.absolute_path(s)?)),
            "binary" => binary::Spec::new(&uri, s, binary::Ready::Close).map(Output::Binary),
            "binary-v2" => binary::Spec::new(&uri, s, binary::Ready::Byte).map(Output::Binary),
            other => Err(Error::InvalidArgument(format!(
                "unknown stdio scheme {other:?} in {s:?}: want a fifo path, \
                 file:///path, binary:///path?k=v or binary-v2:///path?k=v"
            ))),
        }
    }
}

/// A stdio string cut the way Go's `url.Parse` cuts it, which is how containerd reads it;
/// only what log URIs use (no user info, no opaque forms).
#[derive(Debug, PartialEq, Eq)]
struct Uri<'a> {
    scheme: &'a str,
    /// `Some` when the URI has an authority (`scheme://host/...`), even an empty one.
    host: Option<&'a str>,
    /// Still percent-encoded.
    path: &'a str,
    /// Still percent-encoded.
    query: &'a str,
}

impl<'a> Uri<'a> {
    /// `None` when `s` has no scheme: a plain path, which containerd means as a fifo.
    fn split(s: &'a str) -> Option<Uri<'a>> {
        let colon = s.find(':')?;
        let scheme = &s[..colon];
        let mut chars = scheme.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) {
            return None;
        }
        let rest = &s[colon + 1..];
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, path) = match rest.strip_prefix("//") {
            Some(auth) => {
                let end = auth.find('/').unwrap_or(auth.len());
                (Some(&auth[..end]), &auth[end..])
            }
            None => (None, rest),
        };
        Some(Uri {
            scheme,
            host,
            path,
            query,
        })
    }

    /// The decoded path, which must be absolute and on this host (`scheme:///abs/path`).
    /// `file://tmp/x.log` is refused rather than read as `/x.log`, as Go would.
    fn absolute_path(&self, whole: &str) -> Result<PathBuf> {
        if self.host.is_some_and(|h| !h.is_empty()) || !self.path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "{whole:?}: a {scheme} URI needs an absolute local path: {scheme}:///path",
                scheme = self.scheme
            )));
        }
        let bytes = unescape(self.path, false).ok_or_else(|| {
            Error::InvalidArgument(format!("{whole:?}: invalid percent-encoding in the path"))
        })?;
        Ok(PathBuf::from(OsString::from_vec(bytes)))
    }
}

/// Percent-decoding as Go's `url.PathUnescape` (`plus_is_space` false) and
/// `url.QueryUnescape` (true). `None` for a malformed `%` escape.
fn unescape(s: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
                continue;
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Some(out)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether [`batch_output`] was called.
static BATCHED: AtomicBool = AtomicBool::new(false);

/// What an output pipe holds when output is batched: what a process writes before it waits.
pub(crate) const BATCH_PIPE: usize = 1 << 20;

/// Tunes output for a machine whose processes and copies share one CPU on which each
/// context switch is dear (a VM's guest under emulation). The copy thread runs
/// `SCHED_BATCH`, so a process that writes as fast as it can is no longer preempted by the
/// wake-up each small write causes, only at its tick; output pipes hold 1 MiB
/// (`BATCH_PIPE`), so it writes that much before it waits, and the copy moves it in one read. A
/// process that blocks (a shell between keystrokes) leaves the CPU idle, and the copy runs
/// at once: an echo is not held back. Call it before the first process starts.
pub fn batch_output() {
    BATCHED.store(true, Ordering::Relaxed);
}

fn batched() -> bool {
    BATCHED.load(Ordering::Relaxed)
}

/// A pipe for one output stream, its write end owned as `io_uid`/`io_gid` ask.
fn output_pipe(owner: IoOwner) -> Result<(PipeReader, PipeWriter)> {
    let (r, w) = io::pipe().context("create output pipe")?;
    chown(&w, owner)?;
    if batched() {
        // Best effort: the default size still works, with more switches.
        let _ = crate::os::set_pipe_size(&r, BATCH_PIPE);
    }
    Ok((r, w))
}

fn chown(fd: &impl AsFd, owner: IoOwner) -> Result<()> {
    if owner.uid.is_none() && owner.gid.is_none() {
        return Ok(());
    }
    std::os::unix::fs::fchown(fd, owner.uid, owner.gid).context("chown stdio pipe")
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(64 * 1024)
        .spawn(f)
        .context("spawn stdio thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn batched_output_pipes_hold_what_a_writer_writes_before_it_waits() {
        batch_output();
        let (r, _w) = output_pipe(IoOwner::default()).unwrap();
        // SAFETY: F_GETPIPE_SZ only reads the pipe's capacity.
        let size = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&r), libc::F_GETPIPE_SZ) };
        assert_eq!(size, BATCH_PIPE as libc::c_int);
    }

    fn out(stdout: &str) -> Result<Output> {
        Output::parse(&StdioPaths {
            stdout: stdout.into(),
            stderr: stdout.into(),
            ..Default::default()
        })
    }

    #[test]
    fn plain_paths_are_fifos() {
        assert_eq!(
            out("/run/containerd/fifo/1/c-stdout").unwrap(),
            Output::Fifo
        );
        assert_eq!(out("").unwrap(), Output::Fifo);
        assert_eq!(out("relative/x:y").unwrap(), Output::Fifo);
    }

    #[test]
    fn file_uri_is_one_file_for_both_streams() {
        assert_eq!(
            out("file:///var/log/a%20b.log").unwrap(),
            Output::File("/var/log/a b.log".into())
        );
        assert_eq!(
            out("FILE:///x.log?ignored#frag").unwrap(),
            Output::File("/x.log".into())
        );
    }

    #[test]
    fn file_uri_without_absolute_local_path_is_refused() {
        for bad in ["file://tmp/x.log", "file:x.log", "file://", "file:///a%zz"] {
            let e = out(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn binary_uris_name_the_logger_and_protocol() {
        let Output::Binary(spec) = out("binary:///usr/bin/log?a=1").unwrap() else {
            panic!("not binary")
        };
        assert_eq!(spec.path, PathBuf::from("/usr/bin/log"));
        assert_eq!(spec.args, ["a", "1"]);
        assert_eq!(spec.ready, binary::Ready::Close);
        let Output::Binary(spec) = out("binary-v2:///usr/bin/log").unwrap() else {
            panic!("not binary-v2")
        };
        assert!(spec.args.is_empty());
        assert_eq!(spec.ready, binary::Ready::Byte);
    }

    #[test]
    fn unknown_scheme_is_invalid_argument() {
        let e = out("http://x").unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("\"http\""), "{e}");
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
    }

    #[test]
    fn stderr_decides_when_there_is_no_stdout() {
        let o = Output::parse(&StdioPaths {
            stderr: "file:///e.log".into(),
            ..Default::default()
        });
        assert_eq!(o.unwrap(), Output::File("/e.log".into()));
    }

    #[test]
    fn terminal_is_still_unimplemented() {
        let paths = StdioPaths {
            terminal: true,
            ..Default::default()
        };
        let e = ProcessIo::open(&paths, IoOwner::default(), IoContext::default()).unwrap_err();
        assert!(matches!(e, Error::Unimplemented(_)), "{e}");
    }

    #[test]
    fn unescape_like_go() {
        assert_eq!(unescape("a%2Fb+c", false).unwrap(), b"a/b+c");
        assert_eq!(unescape("a%2fb+c", true).unwrap(), b"a/b c");
        assert!(unescape("%4", true).is_none());
        assert!(unescape("%g0", true).is_none());
    }
}
