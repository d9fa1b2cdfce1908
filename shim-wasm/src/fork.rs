//! libcontainer runs in a fresh process: the shim re-executes its own binary as a helper
//! that creates the container (or exec process) and answers with its pid.
//!
//! A fork of the threaded shim is no place for it. A fork copies every lock as it stands,
//! held or not, and only glibc repairs its own; the Rust runtime's stay as they were. One is
//! the lock of std's per-thread stack-overflow records, held for a moment by every thread
//! that starts or ends: libcontainer's intermediate process leaves through
//! `std::process::exit`, whose runtime cleanup takes that lock, so a fork taken while an SDK
//! thread was starting left the intermediate waiting on it forever, libcontainer waiting
//! for the intermediate, and `Create` waiting for libcontainer. Between fork and `execve`
//! the child here makes only async-signal-safe calls.
//!
//! A fork also copies every fd of the shim — its listener, its ttrpc connections to
//! containerd, other containers' pipes and fifos — and libcontainer's clones would inherit
//! them: a native init holds them until it execs at `Start`, a Wasm init until its guest
//! runs. Should the shim exit meanwhile (containerd shuts a group's shim down when its last
//! task goes, even while another container's `Create` is in flight), containerd never sees
//! the connection close and waits for that call forever. So the helper gets fds 0–2 (the
//! shim log is fd 2) and the ones it is given, nothing else.

use std::ffi::{CStr, CString};
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{fork, pipe2, ForkResult, Pid};
use serde_json::Value;

use shim_common::{Context, Error, Result};

/// The helper's first argument; containerd never passes it.
const HELPER: &str = "--libcontainer-helper";

/// Runs `job` (a JSON object for [`crate::youki::run_job`]) in a helper process that holds
/// fds 0–2 and `keep` at the same numbers, and returns its answer (a pid), or its error as
/// [`Error::Runtime`] with the same text.
pub fn in_helper(mut job: Value, keep: &[RawFd]) -> Result<u32> {
    let (r, w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    job["answer_fd"] = w.as_raw_fd().into();
    // All the child needs is made here: after the fork it may not allocate.
    let cstring = |bytes: Vec<u8>| {
        CString::new(bytes)
            .map_err(|_| Error::InvalidArgument("a NUL byte in the helper's job".into()))
    };
    let args = [
        cstring(b"containerd-shim-wasm-v2".to_vec())?,
        cstring(HELPER.into())?,
        cstring(job.to_string().into_bytes())?,
    ];
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect();
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let mut keep: Vec<u32> = keep
        .iter()
        .chain([&w.as_raw_fd()])
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    // SAFETY: the child makes only async-signal-safe calls, then execs or `_exit`s.
    match unsafe { fork() }.context("fork")? {
        // SAFETY: this is the child; `argv` and `envp` end with NULL.
        ForkResult::Child => unsafe { exec_helper(&keep, c"/proc/self/exe", &argv, &envp) },
        ForkResult::Parent { child } => {
            drop(w);
            // The helper is reaped by the SDK's reaper like any other; only its answer matters.
            read_answer(r, child)
        }
    }
}

/// In the forked child: `keep` (sorted) survives the exec, every other fd above 2 is closed.
/// `/proc/self/exe` is this very binary, even if a newer one has replaced it on disk.
///
/// # Safety
/// Only in the child of a fork; `argv` and `envp` are NULL-terminated arrays of C strings.
unsafe fn exec_helper(
    keep: &[u32],
    exe: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let mut first = 3;
    for &fd in keep {
        // SAFETY: fcntl, close_range, execve and _exit are async-signal-safe; on an old
        // kernel without close_range, only the close-on-exec fds (all of Rust's) close.
        unsafe {
            libc::fcntl(fd as RawFd, libc::F_SETFD, 0);
            if fd > first {
                libc::syscall(libc::SYS_close_range, first, fd - 1, 0);
            }
        }
        first = fd + 1;
    }
    // SAFETY: as above.
    unsafe {
        libc::syscall(libc::SYS_close_range, first, u32::MAX, 0);
        libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(127)
    }
}

/// The helper's side, first thing in `main`: runs the job on the command line and answers
/// on the fd it names. `None` in every process that is not the helper.
pub fn helper_main() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != HELPER {
        return None;
    }
    let Some(job) = args
        .next()
        .and_then(|j| serde_json::from_slice::<Value>(&j.into_vec()).ok())
    else {
        return Some(2);
    };
    let Some(fd) = job["answer_fd"]
        .as_i64()
        .and_then(|fd| RawFd::try_from(fd).ok())
    else {
        return Some(2);
    };
    // SAFETY: the shim opened this fd for our answer alone and kept it across the exec.
    let mut answer = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let result = cloexec(fd).and_then(|()| crate::youki::run_job(&job));
    let line = match result {
        Ok(pid) => format!("ok {pid}\n"),
        Err(e) => format!("err {}\n", e.to_string().replace('\n', " ")),
    };
    let _ = answer.write_all(line.as_bytes());
    Some(0)
}

/// Gives an fd the helper was handed back its close-on-exec flag (it had it in the shim):
/// a native init's program must not inherit it.
pub fn cloexec(fd: RawFd) -> Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .with_context(|| format!("set close-on-exec on fd {fd}"))
}

/// One line: the container's init inherits the pipe's write end (it execs, or closes stray
/// fds, only after `Start`), so end of file cannot mark the end of the answer — nor the
/// helper's death: a helper that dies without answering is seen through its pidfd instead.
fn read_answer(r: OwnedFd, child: Pid) -> Result<u32> {
    let died = || Error::Runtime("libcontainer's process died before answering".to_string());
    // SAFETY: pidfd_open only creates a new fd, which `OwnedFd` owns from here on.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
    let (pidfd, exited) = match (fd, nix::Error::last()) {
        // SAFETY: a new fd that nothing else owns.
        (fd, _) if fd >= 0 => (Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }), false),
        // Exited and reaped already: whatever it wrote is in the pipe.
        (_, nix::Error::ESRCH) => (None, true),
        // No pidfds (kernel < 5.3): wait on the pipe alone.
        _ => (None, false),
    };
    let timeout = if exited {
        PollTimeout::ZERO
    } else {
        PollTimeout::NONE
    };
    let answered = loop {
        let mut fds = vec![PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        if let Some(p) = &pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e).context("wait for libcontainer's answer"),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            break true;
        }
        if exited || fds.get(1).is_some_and(ready) {
            // It wrote its answer, if any, before exiting: the pipe shows it now or never.
            let mut again = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            break poll(&mut again, PollTimeout::ZERO).is_ok_and(|n| n > 0);
        }
    };
    if !answered {
        return Err(died());
    }
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
    match answer.strip_prefix("err ") {
        Some(msg) => Err(Error::Runtime(msg.to_string())),
        None => Err(died()),
    }
}
