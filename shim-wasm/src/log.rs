//! The shim log, reachable from inside a container, and libcontainer's `tracing` routed to it.
//!
//! A container init is cloned from the shim and never execs when it runs Wasm, so its fd 2
//! is the workload's stderr, not the shim log. The shim keeps a duplicate of its own stderr
//! (the bundle's `log` fifo) on a close-on-exec fd: a Wasm init still holds it and writes
//! trap messages there; a native entrypoint loses it at `execve`, as it should.

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::OnceLock;

static LOG_FD: OnceLock<RawFd> = OnceLock::new();

/// Keeps a close-on-exec duplicate of stderr for [`write`], and sends libcontainer's
/// `tracing` events there (errors only, everything with `debug`).
pub fn init(debug: bool) {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on fd 2 creates a new fd we own for the process's life.
    let fd = unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 10) };
    if fd < 0 || LOG_FD.set(fd).is_err() {
        return;
    }
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::ERROR
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_writer(|| LogWriter)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// The kept fd (-1 before [`init`]).
pub fn fd() -> RawFd {
    LOG_FD.get().copied().unwrap_or(-1)
}

/// Writes one line to the shim log from any process that inherited the kept fd.
pub fn write(level: &str, msg: &str) {
    let line = shim_common::logger::format_line(level, msg);
    let _ = LogWriter.write_all(line.as_bytes());
}

/// The kept fd as a writer (stderr if [`init`] did not run).
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let fd = LOG_FD.get().copied().unwrap_or(libc::STDERR_FILENO);
        // SAFETY: the fd stays open for the process's life; ManuallyDrop never closes it.
        let mut file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
