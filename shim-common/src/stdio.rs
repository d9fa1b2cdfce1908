//! A process's stdio: pipes the shim owns between the process and containerd's fifos.
//!
//! The process never writes to containerd's fifos directly. If containerd (or `ctr`) goes
//! away, the shim's copy fails with `EPIPE`, the shim keeps draining the pipe, and the
//! container is never killed by `SIGPIPE` nor blocked on a full pipe.

use std::fs::{File, OpenOptions};
use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio as ProcStdio};
use std::sync::{Arc, Mutex};

use crate::error::{Context, Error, Result};

/// Where containerd wants a process's stdio, as sent in `Create` and `Exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Ownership of the pipes the process writes to, for `io_uid`/`io_gid` (user namespaces).
#[derive(Debug, Clone, Copy, Default)]
pub struct IoOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The fds a backend gives the process (or the runtime that starts it) as fds 0, 1, 2.
/// `None` means `/dev/null`.
#[derive(Debug, Default)]
pub struct ChildStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
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

/// The shim's side of a process's stdio. Dropping it does not stop the copies: they end
/// on their own when the process (and everything sharing its stdio) has exited.
#[derive(Debug, Default)]
pub struct ProcessIo {
    stdin: Arc<Mutex<Option<PipeWriter>>>,
}

impl ProcessIo {
    /// Opens the stdio containerd asked for and starts the copies.
    pub fn open(paths: &StdioPaths, owner: IoOwner) -> Result<(ProcessIo, ChildStdio)> {
        if paths.terminal {
            return Err(Error::Unimplemented("terminal stdio".into()));
        }
        let mut child = ChildStdio::default();
        let io = ProcessIo::default();
        if !paths.stdin.is_empty() {
            let (r, w) = io::pipe().context("create stdin pipe")?;
            *lock(&io.stdin) = Some(w);
            child.stdin = Some(r.into());
            copy_stdin(paths.stdin.clone(), io.stdin.clone())?;
        }
        if !paths.stdout.is_empty() {
            let (r, w) = io::pipe().context("create stdout pipe")?;
            chown(&w, owner)?;
            child.stdout = Some(w.into());
            copy_output(r, paths.stdout.clone())?;
        }
        if !paths.stderr.is_empty() {
            let (r, w) = io::pipe().context("create stderr pipe")?;
            chown(&w, owner)?;
            child.stderr = Some(w.into());
            copy_output(r, paths.stderr.clone())?;
        }
        Ok((io, child))
    }

    /// Closes the process's stdin so it reads EOF (`CloseIO`).
    pub fn close_stdin(&self) {
        lock(&self.stdin).take();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        .context("spawn stdio copy thread")?;
    Ok(())
}

/// containerd's stdin fifo → the process's stdin pipe, until EOF or `CloseIO`.
fn copy_stdin(path: String, pipe: Arc<Mutex<Option<PipeWriter>>>) -> Result<()> {
    spawn("stdin", move || {
        // Blocks until containerd opens its end for writing.
        let Ok(mut fifo) = File::open(&path) else {
            lock(&pipe).take();
            return;
        };
        let mut buf = [0u8; 8192];
        loop {
            let n = match fifo.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut guard = lock(&pipe);
            let Some(w) = guard.as_mut() else { break };
            if w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        lock(&pipe).take();
    })
}

/// The process's output pipe → containerd's fifo. When the fifo's reader is gone, keep
/// draining so the process never blocks or dies of `SIGPIPE`.
fn copy_output(mut pipe: PipeReader, path: String) -> Result<()> {
    spawn("stdout", move || {
        // Blocks until containerd opens its end for reading.
        let mut sink = OpenOptions::new().write(true).open(&path).ok();
        let mut buf = [0u8; 8192];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if let Some(f) = sink.as_mut() {
                if f.write_all(&buf[..n]).is_err() {
                    sink = None;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn mkfifo(p: &std::path::Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(std::fs::metadata(p).unwrap().file_type().is_fifo());
    }

    #[test]
    fn output_reaches_fifo_and_stdin_reaches_process() {
        let dir = tempfile::tempdir().unwrap();
        let (i, o) = (dir.path().join("in"), dir.path().join("out"));
        mkfifo(&i);
        mkfifo(&o);
        let paths = StdioPaths {
            stdin: i.to_string_lossy().into(),
            stdout: o.to_string_lossy().into(),
            ..Default::default()
        };
        let (_io, child) = ProcessIo::open(&paths, IoOwner::default()).unwrap();
        let reader = std::thread::spawn(move || std::fs::read(o).unwrap());
        let mut cmd = Command::new("cat");
        child.apply(&mut cmd);
        let mut proc = cmd.spawn().unwrap();
        drop(cmd); // close the shim's copies of the child's ends
        let mut w = OpenOptions::new().write(true).open(&i).unwrap();
        w.write_all(b"ping\n").unwrap();
        drop(w);
        proc.wait().unwrap();
        assert_eq!(reader.join().unwrap(), b"ping\n");
    }

    #[test]
    fn process_survives_reader_going_away() {
        let dir = tempfile::tempdir().unwrap();
        let o = dir.path().join("out");
        mkfifo(&o);
        let paths = StdioPaths {
            stdout: o.to_string_lossy().into(),
            ..Default::default()
        };
        let (_io, child) = ProcessIo::open(&paths, IoOwner::default()).unwrap();
        // A reader that reads a little and goes away, like a ctr that was killed.
        let reader = std::thread::spawn(move || {
            let mut f = File::open(o).unwrap();
            let mut b = [0u8; 16];
            f.read_exact(&mut b).unwrap();
        });
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done; exit 7",
        ]);
        child.apply(&mut cmd);
        let status = cmd.spawn().unwrap().wait().unwrap();
        reader.join().unwrap();
        assert_eq!(
            status.code(),
            Some(7),
            "the process must not die of SIGPIPE"
        );
    }
}
