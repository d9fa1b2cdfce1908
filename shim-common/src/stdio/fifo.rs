//! containerd's default: a fifo per stream, which containerd (or `ctr`) reads and writes.
//!
//! The process never touches the fifos: the shim copies between them and the process's
//! pipes, so a reader that goes away costs the process nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::pump::{self, Sink};
use super::{lock, output_pipe, spawn, ChildStdio, Drain, IoOwner, StdioPaths};
use crate::error::{Context, Result};

/// Gives the process a pipe for each output stream containerd asked for, copied to its fifo
/// under `drain`.
pub(super) fn open_outputs(
    paths: &StdioPaths,
    owner: IoOwner,
    drain: &Drain,
    child: &mut ChildStdio,
) -> Result<()> {
    if !paths.stdout.is_empty() {
        let (r, w) = output_pipe(owner)?;
        child.stdout = Some(w.into());
        copy_output(r, paths.stdout.clone(), drain)?;
    }
    if !paths.stderr.is_empty() {
        let (r, w) = output_pipe(owner)?;
        child.stderr = Some(w.into());
        copy_output(r, paths.stderr.clone(), drain)?;
    }
    Ok(())
}

/// containerd's stdin fifo, held open for writing by the shim itself as well, so that a
/// client closing its end is not the end of the input: a second client (`ctr task attach`
/// after a detach) writes into the same fifo and is read. The input ends once the shim's
/// own writer is closed — `CloseIO`, or the process's stdio dropped — and every client's
/// is too. containerd's Go shim keeps the same writer (`openStdin`).
#[derive(Debug)]
pub(crate) struct StdinFifo {
    writer: Mutex<Option<File>>,
}

impl StdinFifo {
    /// Opens `path` for reading (blocking reads) and for the shim's own writer; neither
    /// open waits for a client. Returns the reader for the copy.
    pub(crate) fn open(path: &str) -> Result<(StdinFifo, File)> {
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("open stdin fifo {path}"))?;
        // Non-blocking only so that the open does not wait for a writer.
        fcntl(reader.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_RDONLY))
            .map_err(std::io::Error::from)
            .with_context(|| format!("make stdin fifo {path} blocking"))?;
        let writer = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("hold stdin fifo {path} open"))?;
        let fifo = StdinFifo {
            writer: Mutex::new(Some(writer)),
        };
        Ok((fifo, reader))
    }

    /// Lets the copy see EOF once the clients' writers are closed.
    pub(crate) fn close(&self) {
        lock(&self.writer).take();
    }
}

/// containerd's stdin fifo → the process's stdin pipe, until EOF (see [`StdinFifo`]) or
/// `CloseIO`.
pub(super) fn copy_stdin(
    path: &str,
    pipe: Arc<Mutex<Option<std::io::PipeWriter>>>,
) -> Result<StdinFifo> {
    let (fifo, mut reader) = StdinFifo::open(path)?;
    spawn("stdin", move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match reader.read(&mut buf) {
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
    })?;
    Ok(fifo)
}

/// The process's output pipe → containerd's fifo. When the fifo's reader is gone, keep
/// draining so the process never blocks or dies of `SIGPIPE`.
fn copy_output(pipe: std::io::PipeReader, path: String, drain: &Drain) -> Result<()> {
    pump::copy(pipe, Sink::Fifo(path), Some(drain.copying()))
}

#[cfg(test)]
mod tests {
    use super::super::{IoContext, ProcessIo};
    use super::*;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    use std::process::Command;

    fn mkfifo(p: &std::path::Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(std::fs::metadata(p).unwrap().file_type().is_fifo());
    }

    fn open(paths: &StdioPaths) -> (ProcessIo, ChildStdio) {
        ProcessIo::open(paths, IoOwner::default(), IoContext::default()).unwrap()
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
        let (io, child) = open(&paths);
        let reader = std::thread::spawn(move || std::fs::read(o).unwrap());
        let mut cmd = Command::new("cat");
        child.apply(&mut cmd);
        let mut proc = cmd.spawn().unwrap();
        drop(cmd); // close the shim's copies of the child's ends
                   // Two clients one after the other (a detach, then an attach): both are read.
        for line in [&b"ping\n"[..], b"pong\n"] {
            let mut w = std::fs::OpenOptions::new().write(true).open(&i).unwrap();
            w.write_all(line).unwrap();
        }
        // Only CloseIO ends the input.
        io.close_stdin();
        proc.wait().unwrap();
        assert_eq!(reader.join().unwrap(), b"ping\npong\n");
    }

    /// A child left holding the pipe (`sleep &`) must not hold the exit: once the process
    /// is gone, the copy is caught up as soon as it has read the pipe empty, and by then
    /// every byte is in the fifo.
    #[test]
    fn drain_reports_once_output_is_in_the_fifo_even_if_a_child_holds_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let o = dir.path().join("out");
        mkfifo(&o);
        // Read-write and never read until the end, like a client that never sees EOF: the
        // output (48,890 bytes) fits in the fifo, so only the drain says "all there".
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&o)
            .unwrap();
        let paths = StdioPaths {
            stdout: o.to_string_lossy().into(),
            ..Default::default()
        };
        let (io, child) = open(&paths);
        let pidfile = dir.path().join("bg.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "sleep 60 & echo $! > {}; i=0; while [ $i -lt 5000 ]; do echo line-$i; i=$((i+1)); done",
            pidfile.display()
        ));
        child.apply(&mut cmd);
        let mut proc = cmd.spawn().unwrap();
        drop(cmd);
        assert!(proc.wait().unwrap().success());
        // EOF is 60 s away (the background `sleep` holds the pipe).
        let caught_up = io.drain().wait(std::time::Duration::from_secs(30));
        let mut got = Vec::new();
        let _ = reader.read_to_end(&mut got); // WouldBlock once the fifo is empty
        if let Ok(pid) = std::fs::read_to_string(&pidfile) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        assert!(caught_up, "the drain waited for the background child");
        let want: Vec<u8> = (0..5000)
            .flat_map(|i| format!("line-{i}\n").into_bytes())
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "output differs");
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
        let (_io, child) = open(&paths);
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
