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
//!
//! A process's exit waits for its output ([`catch_up`]): when the guest reports it, the
//! guest task service has written all the process's output into the agent's fifos, and the
//! agent says how many bytes each stream holds (`StdioWritten`); the exit goes on to the
//! SDK once the relays have written that many into their pipes, which the SDK's copies
//! then drain before publishing it. Without this, a `ctr task exec` could see the exit
//! and stop reading while the output's tail was still in the guest.

use std::collections::HashMap;
use std::fs::File;
use std::io::{PipeReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protobuf::well_known_types::empty::Empty;
use protocol::agent::{
    ReadStdioRequest, ReadStdioResponse, StdioRequest, StdioWrittenResponse, Stream,
    WriteStdinRequest,
};
use protocol::shim::CloseIORequest;
use shim_common::{Context, Result};

use crate::guest::Guest;
use crate::stoppable::{wait_readable, Woke};

/// Bytes of stdin per `WriteStdin`.
const STDIN_CHUNK: usize = 256 * 1024;
/// An answer this large or larger is a stream pouring out, not a terminal's echo.
const STREAMING: usize = 4096;
/// An answer this large needs no company.
const FULL: usize = 256 * 1024;
/// How long a stream pouring out small pieces is left to gather in the guest before it is
/// asked again: each call costs the guest's one emulated CPU a round of wake-ups (~0.5 ms
/// under TCG), so a writer of 4 KiB pieces answered a piece or two per call spent half its
/// CPU on the calls (`head -c` to stdout: 0.2 of its speed into `/dev/null`; 0.68 with
/// this). A terminal's echo, smaller, is asked for again at once; a stream that fills
/// [`FULL`] in less time is asked at once too, so this caps no stream's speed.
const LINGER: Duration = Duration::from_millis(20);
/// The longest an exit waits for its output to be relayed (a host that cannot keep up,
/// a pipe nobody drains): then it is published anyway, and logged.
const CATCH_UP: Duration = Duration::from_secs(10);
/// What the pipe to the SDK's copy holds: a whole answer, so writing it does not wait for
/// containerd's reader before the next call goes out.
const PIPE: usize = 1 << 20;

/// Which process, in the guest.
#[derive(Debug, Clone)]
pub struct Process {
    /// Its container.
    pub container: String,
    /// Its exec id; empty for the init.
    pub exec: String,
}

/// The relays of a VM's processes, by container and exec id.
#[derive(Default)]
pub struct Relays {
    outputs: Mutex<Outputs>,
}

/// Each process's output relays.
type Outputs = HashMap<(String, String), Vec<(Stream, Arc<Progress>)>>;

/// How far one output relay got.
#[derive(Default)]
struct Progress {
    state: Mutex<Stand>,
    moved: Condvar,
}

#[derive(Default)]
struct Stand {
    /// Bytes of the stream written into the SDK's pipe.
    written: u64,
    /// An exit waits for the relay to reach this: no lingering until then.
    wanted: u64,
    /// The relay ended: nothing more will be written.
    ended: bool,
}

impl Progress {
    fn stand(&self) -> MutexGuard<'_, Stand> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wrote(&self, upto: u64) {
        self.stand().written = upto;
        self.moved.notify_all();
    }

    fn end(&self) {
        self.stand().ended = true;
        self.moved.notify_all();
    }

    /// Waits `linger` before the next call, unless an exit wants more than was written.
    fn linger(&self, linger: Duration) {
        let stand = self.stand();
        let _ = self
            .moved
            .wait_timeout_while(stand, linger, |s| s.wanted <= s.written);
    }

    /// Waits until `upto` bytes were written or the relay ended, up to `deadline`.
    fn reach(&self, upto: u64, deadline: Instant) -> bool {
        let mut stand = self.stand();
        stand.wanted = stand.wanted.max(upto);
        self.moved.notify_all();
        let left = deadline.saturating_duration_since(Instant::now());
        let (stand, _) = self
            .moved
            .wait_timeout_while(stand, left, |s| s.written < upto && !s.ended)
            .unwrap_or_else(|e| e.into_inner());
        stand.written >= upto || stand.ended
    }
}

impl Relays {
    fn add(&self, p: &Process, stream: Stream) -> Arc<Progress> {
        let progress = Arc::new(Progress::default());
        self.lock()
            .entry((p.container.clone(), p.exec.clone()))
            .or_default()
            .push((stream, progress.clone()));
        progress
    }

    fn remove(&self, p: &Process, progress: &Arc<Progress>) {
        let mut outputs = self.lock();
        let key = (p.container.clone(), p.exec.clone());
        if let Some(list) = outputs.get_mut(&key) {
            list.retain(|(_, q)| !Arc::ptr_eq(q, progress));
            if list.is_empty() {
                outputs.remove(&key);
            }
        }
    }

    fn of(&self, container: &str, exec: &str) -> Vec<(Stream, Arc<Progress>)> {
        let key = (container.to_string(), exec.to_string());
        self.lock().get(&key).cloned().unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Outputs> {
        self.outputs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Waits until the output the guest had for process `exec` of `container` (its init when
/// empty) when it exited is in the SDK's pipes: call before handing the exit to the SDK.
pub fn catch_up(guest: &Guest, container: &str, exec: &str) {
    let relays = guest.relays.of(container, exec);
    if relays.is_empty() {
        return;
    }
    let req = StdioRequest {
        container_id: container.to_string(),
        exec_id: exec.to_string(),
        ..Default::default()
    };
    let written: StdioWrittenResponse =
        match guest.agent("StdioWritten", &req, crate::guest::CALL_TIMEOUT) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("output of {container}/{exec:?} at its exit: {e}");
                return;
            }
        };
    let deadline = Instant::now() + CATCH_UP;
    for (stream, progress) in relays {
        let upto = match stream {
            Stream::STDOUT => written.stdout,
            Stream::STDERR => written.stderr,
        };
        if !progress.reach(upto, deadline) {
            log::warn!(
                "{stream:?} of {container}/{exec:?}: not all relayed within {CATCH_UP:?} of \
                 its exit; publishing the exit"
            );
        }
    }
}

/// Starts relaying: `stdout` and `stderr` get what the guest process writes, `stdin`'s
/// bytes go to it. On a `terminal` (`stdin` and `stdout` are one pty's slave), input
/// stops when output ends: the SDK's copy of the pty ends only once every slave fd is
/// closed, and until then the client (`ctr task exec -t`) waits for it, so a slave held
/// open by the input relay would hold the exec forever.
pub fn start(
    guest: &Arc<Guest>,
    process: &Process,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    terminal: bool,
) -> Result<()> {
    // Its write end goes with the stdout relay: closed when that ends.
    let (output_ended, mut output_ending) = match terminal {
        true => {
            let (r, w) = std::io::pipe().context("create the terminal's stop pipe")?;
            (Some(r), Some(w))
        }
        false => (None, None),
    };
    for (fd, stream) in [(stdout, Stream::STDOUT), (stderr, Stream::STDERR)] {
        if let Some(fd) = fd {
            let ending = match stream {
                Stream::STDOUT => output_ending.take(),
                Stream::STDERR => None,
            };
            let (guest, process) = (guest.clone(), process.clone());
            let progress = guest.relays.add(&process, stream);
            let (registered, relays, p) = (progress.clone(), guest.clone(), process.clone());
            let spawned = std::thread::Builder::new()
                .name("relay-out".into())
                .spawn(move || {
                    output(&guest, &process, stream, File::from(fd), &progress);
                    progress.end();
                    guest.relays.remove(&process, &progress);
                    drop(ending);
                });
            if let Err(e) = spawned {
                relays.relays.remove(&p, &registered);
                return Err(e).context("spawn stdio relay");
            }
        }
    }
    if let Some(fd) = stdin {
        let (guest, process) = (guest.clone(), process.clone());
        std::thread::Builder::new()
            .name("relay-in".into())
            .spawn(move || input(&guest, &process, File::from(fd), output_ended))
            .context("spawn stdin relay")?;
    }
    Ok(())
}

fn output(guest: &Guest, p: &Process, stream: Stream, mut to: File, progress: &Progress) {
    let mut req = ReadStdioRequest {
        container_id: p.container.clone(),
        exec_id: p.exec.clone(),
        stream: stream.into(),
        ..Default::default()
    };
    let mut writable = true;
    let _ = shim_common::set_pipe_size(&to, PIPE);
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
        progress.wrote(req.offset);
        if got.eof {
            break;
        }
        if (STREAMING..FULL).contains(&new.len()) {
            progress.linger(LINGER);
        }
    }
}

fn input(guest: &Guest, p: &Process, mut from: File, output_ended: Option<PipeReader>) {
    let mut buf = vec![0u8; STDIN_CHUNK];
    let mut offset = 0u64;
    loop {
        if let Some(ended) = &output_ended {
            if wait_readable(from.as_fd(), ended.as_fd()) != Ok(Woke::Readable) {
                break;
            }
        }
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
