//! libcontainer's clones, taken from a single-threaded copy of the shim.
//!
//! libcontainer clones the container's processes with raw `clone3`, which skips glibc's fork
//! handlers: cloned from a threaded shim, a child could inherit the malloc lock held by
//! another thread and hang in its first allocation. A `fork()` (which runs those handlers)
//! gives libcontainer a process with one thread and consistent locks; it exits as soon as
//! the container exists, and the shim, as subreaper, becomes the container init's parent.

use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;

use nix::unistd::{fork, pipe2, ForkResult};

use shim_common::{Context, Error, Result};

/// Runs `f` in a forked child and returns its answer (a pid), or its error as
/// [`Error::Runtime`] with the same text.
pub fn isolated(f: impl FnOnce() -> Result<u32>) -> Result<u32> {
    let (r, w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: the child only runs `f` (libcontainer, which expects a fresh process) and
    // leaves through `_exit`, never returning into the shim's threads' state.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(r);
            let answer = match f() {
                Ok(pid) => format!("ok {pid}\n"),
                Err(e) => format!("err {}\n", e.to_string().replace('\n', " ")),
            };
            let mut w = std::fs::File::from(w);
            let _ = w.write_all(answer.as_bytes());
            // SAFETY: leaves without running the shim's exit handlers or destructors.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { .. } => {
            drop(w);
            // The child is reaped by the SDK's reaper like any other; only its answer matters.
            read_answer(r)
        }
    }
}

/// One line: the container's init inherits the pipe's write end (it execs, or closes stray
/// fds, only after `Start`), so end of file cannot mark the end of the answer.
fn read_answer(r: OwnedFd) -> Result<u32> {
    let mut answer = String::new();
    std::io::BufReader::new(std::fs::File::from(r))
        .read_line(&mut answer)
        .context("read libcontainer's answer")?;
    let answer = answer.trim_end();
    if let Some(pid) = answer.strip_prefix("ok ") {
        return pid
            .trim()
            .parse()
            .map_err(|_| Error::Runtime(format!("bad answer from libcontainer: {answer:?}")));
    }
    Err(Error::Runtime(match answer.strip_prefix("err ") {
        Some(msg) => msg.to_string(),
        None => "libcontainer's process died before answering".to_string(),
    }))
}
