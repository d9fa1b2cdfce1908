//! containerd's default: a fifo per stream, which containerd (or `ctr`) reads and writes.
//!
//! The process never touches the fifos: the shim copies between them and the process's
//! pipes, so a reader that goes away costs the process nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use super::pump::{self, Sink};
use super::{lock, output_pipe, spawn, ChildStdio, IoOwner, StdioPaths};
use crate::error::Result;

/// Gives the process a pipe for each output stream containerd asked for, copied to its fifo.
pub(super) fn open_outputs(
    paths: &StdioPaths,
    owner: IoOwner,
    child: &mut ChildStdio,
) -> Result<()> {
    if !paths.stdout.is_empty() {
        let (r, w) = output_pipe(owner)?;
        child.stdout = Some(w.into());
        copy_output(r, paths.stdout.clone())?;
    }
    if !paths.stderr.is_empty() {
        let (r, w) = output_pipe(owner)?;
        child.stderr = Some(w.into());
        copy_output(r, paths.stderr.clone())?;
    }
    Ok(())
}

/// containerd's stdin fifo → the process's stdin pipe, until EOF or `CloseIO`.
pub(super) fn copy_stdin(
    path: String,
    pipe: Arc<Mutex<Option<std::io::PipeWriter>>>,
) -> Result<()> {
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
fn copy_output(pipe: std::io::PipeReader, path: String) -> Result<()> {
    pump::copy(pipe, Sink::Fifo(path))
}

#[cfg(test)]
mod tests {
    use super::super::{IoContext, ProcessIo};
    use super::*;
    use std::os::unix::fs::FileTypeExt;
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
        let (_io, child) = open(&paths);
        let reader = std::thread::spawn(move || std::fs::read(o).unwrap());
        let mut cmd = Command::new("cat");
        child.apply(&mut cmd);
        let mut proc = cmd.spawn().unwrap();
        drop(cmd); // close the shim's copies of the child's ends
        let mut w = std::fs::OpenOptions::new().write(true).open(&i).unwrap();
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
