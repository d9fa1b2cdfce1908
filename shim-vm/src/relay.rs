//! The host's half of stdio: the SDK opens containerd's fifos, files or logging binary as
//! for any host process and hands over the pipes (or, for a terminal, takes a pty master);
//! this relays them to and from the guest agent's calls.
//!
//! Output ends when the guest says end-of-file: then the pipe is closed, the SDK's copy
//! catches up, and only then does the SDK publish the exit. Input ends when the SDK closes
//! the stdin pipe (`CloseIO`): the agent is told after everything was written, and the
//! guest task service closes the process's stdin behind it.
//!
//! Both count the bytes they carried, so a connection cut mid-call costs nothing: the
//! call is made again on the next connection, from where it stood.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use protobuf::well_known_types::empty::Empty;
use protocol::agent::{
    ReadStdioRequest, ReadStdioResponse, StdioRequest, Stream, WriteStdinRequest,
};
use protocol::shim::CloseIORequest;
use shim_common::{Context, Result};

use crate::guest::Guest;

/// Bytes of stdin per `WriteStdin`.
const STDIN_CHUNK: usize = 256 * 1024;

/// Which process, in the guest.
#[derive(Debug, Clone)]
pub struct Process {
    /// Its container.
    pub container: String,
    /// Its exec id; empty for the init.
    pub exec: String,
}

/// Starts relaying: `stdout` and `stderr` get what the guest process writes, `stdin`'s
/// bytes go to it.
pub fn start(
    guest: &Arc<Guest>,
    process: &Process,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
) -> Result<()> {
    for (fd, stream) in [(stdout, Stream::STDOUT), (stderr, Stream::STDERR)] {
        if let Some(fd) = fd {
            let (guest, process) = (guest.clone(), process.clone());
            std::thread::Builder::new()
                .name("relay-out".into())
                .spawn(move || output(&guest, &process, stream, File::from(fd)))
                .context("spawn stdio relay")?;
        }
    }
    if let Some(fd) = stdin {
        let (guest, process) = (guest.clone(), process.clone());
        std::thread::Builder::new()
            .name("relay-in".into())
            .spawn(move || input(&guest, &process, File::from(fd)))
            .context("spawn stdin relay")?;
    }
    Ok(())
}

fn output(guest: &Guest, p: &Process, stream: Stream, mut to: File) {
    let mut req = ReadStdioRequest {
        container_id: p.container.clone(),
        exec_id: p.exec.clone(),
        stream: stream.into(),
        ..Default::default()
    };
    let mut writable = true;
    loop {
        let got: ReadStdioResponse = match guest.agent_again("ReadStdio", &req, Duration::MAX) {
            Ok(got) => got,
            Err(e) => {
                log::debug!("{stream:?} of {}/{:?}: {e}", p.container, p.exec);
                break;
            }
        };
        // The agent answers from where we asked; should it not, never write a byte twice.
        let skip = usize::try_from(req.offset.saturating_sub(got.offset)).unwrap_or(usize::MAX);
        let new = got.data.get(skip..).unwrap_or_default();
        req.offset = got.offset.max(req.offset) + new.len() as u64;
        // The SDK drains its end whatever happens to containerd's; if even that is gone,
        // keep reading so the guest process is never blocked on us.
        if writable && !new.is_empty() && to.write_all(new).is_err() {
            writable = false;
        }
        if got.eof {
            break;
        }
    }
}

fn input(guest: &Guest, p: &Process, mut from: File) {
    let mut buf = vec![0u8; STDIN_CHUNK];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let req = WriteStdinRequest {
            container_id: p.container.clone(),
            exec_id: p.exec.clone(),
            data: buf[..n].to_vec(),
            offset,
            ..Default::default()
        };
        if let Err(e) = guest.agent_again::<Empty>("WriteStdin", &req, Duration::MAX) {
            log::debug!("stdin of {}/{:?}: {e}", p.container, p.exec);
            return;
        }
        offset += n as u64;
    }
    let close = StdioRequest {
        container_id: p.container.clone(),
        exec_id: p.exec.clone(),
        ..Default::default()
    };
    let _ = guest.agent_again::<Empty>("CloseStdin", &close, crate::guest::CALL_TIMEOUT);
    let req = CloseIORequest {
        id: p.container.clone(),
        exec_id: p.exec.clone(),
        stdin: true,
        ..Default::default()
    };
    if let Err(e) = guest.task::<Empty>("CloseIO", &req) {
        log::debug!("CloseIO of {}/{:?}: {e}", p.container, p.exec);
    }
}
