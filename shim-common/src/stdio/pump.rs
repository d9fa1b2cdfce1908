//! One thread copies every output pipe of every process to where it goes.
//!
//! A thread per stream would cost a pod's shim two threads (and their stacks) per
//! container. Here one poll loop serves them all; writes are non-blocking, so a reader that
//! stops reading holds up its own stream only: its pipe is not read until the sink takes
//! the pending bytes, which is the back-pressure a thread blocked in `write` gave.
//!
//! A stream reports to its process's [`Drain`] once it is done: at EOF with every byte
//! written (or its sink gone), or — after the process exited — as soon as it has read its
//! pipe empty and written what it read, whoever else still holds the pipe open.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, PipeReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};

use super::drain::Copying;
use super::lock;
use crate::error::{Context, Result};

/// Where a pipe's bytes go.
pub(super) enum Sink {
    /// Read and dropped (nobody wants them, or the reader went away).
    Discard,
    /// A file appended to.
    File(File),
    /// containerd's fifo, opened for writing once it has a reader.
    Fifo(String),
}

/// Copies `pipe` to `sink` until every writer of the pipe is gone, reporting to `copying`
/// (see the module doc).
pub(super) fn copy(pipe: PipeReader, sink: Sink, copying: Option<Copying>) -> Result<()> {
    set_nonblocking(pipe.as_raw_fd())?;
    let sink = match sink {
        Sink::Discard => None,
        Sink::File(f) => Some(f),
        Sink::Fifo(path) => {
            let nonblocking = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path);
            match nonblocking {
                Ok(f) => Some(f),
                // No reader yet: wait for one off the pump, as a blocking open would.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    return open_later(pipe, path, copying);
                }
                Err(e) => {
                    log::warn!("open stdio fifo {path}: {e}; discarding its output");
                    None
                }
            }
        }
    };
    pump()?.add(Stream::new(pipe, sink, copying))
}

/// Waits (off the pump) for the fifo's reader, as a blocking open would. Until one comes,
/// the pipe is not read: the process blocks once it is full, and its exit waits out its
/// grace, as with containerd's Go shim, whose open blocks the same way.
fn open_later(pipe: PipeReader, path: String, copying: Option<Copying>) -> Result<()> {
    super::spawn("stdout-open", move || {
        let sink = OpenOptions::new().write(true).open(&path).ok();
        let sink = sink.filter(|f| set_nonblocking(f.as_raw_fd()).is_ok());
        let stream = Stream::new(pipe, sink, copying);
        if let Err(e) = pump().and_then(|p| p.add(stream)) {
            log::error!("stdio for {path}: {e}");
        }
    })
}

struct Stream {
    src: PipeReader,
    sink: Option<File>,
    /// Read from `src`, not yet taken by `sink`.
    pending: Vec<u8>,
    eof: bool,
    /// Reports when the stream is done; dropped with it at the latest.
    copying: Option<Copying>,
}

struct Pump {
    new: Mutex<Vec<Stream>>,
    wake: File,
}

fn pump() -> Result<&'static Pump> {
    static PUMP: OnceLock<std::result::Result<Pump, String>> = OnceLock::new();
    PUMP.get_or_init(|| Pump::start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| crate::Error::Runtime(e.clone()))
}

impl Pump {
    fn start() -> Result<Pump> {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("create stdio eventfd");
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let wake = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let pump = Pump {
            new: Mutex::new(Vec::new()),
            wake,
        };
        let wake = pump.wake.try_clone().context("dup stdio eventfd")?;
        super::spawn("stdio", move || run(wake))?;
        Ok(pump)
    }

    fn add(&self, s: Stream) -> Result<()> {
        lock(&self.new).push(s);
        self.wake()
    }

    fn wake(&self) -> Result<()> {
        (&self.wake)
            .write_all(&1u64.to_ne_bytes())
            .context("wake stdio thread")
    }
}

/// Makes the pump look at every stream now: a process exited, and its streams must check
/// whether they have caught up even if their pipes stay quiet.
pub(super) fn wake() {
    if let Err(e) = pump().and_then(Pump::wake) {
        log::error!("{e}");
    }
}

fn run(mut wake: File) {
    let mut streams: Vec<Stream> = Vec::new();
    let mut buf = if super::batched() {
        if let Err(e) = crate::os::batch_this_thread() {
            log::warn!("{e}: output is copied in smaller batches");
        }
        vec![0u8; super::BATCH_PIPE]
    } else {
        vec![0u8; 16 * 1024]
    };
    loop {
        let Ok(p) = pump() else { return };
        streams.append(&mut lock(&p.new));
        let mut fds = vec![libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        fds.extend(streams.iter().map(|s| {
            let (fd, events) = match &s.sink {
                Some(sink) if !s.pending.is_empty() => (sink.as_raw_fd(), libc::POLLOUT),
                _ => (s.src.as_raw_fd(), libc::POLLIN),
            };
            libc::pollfd {
                fd,
                events,
                revents: 0,
            }
        }));
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let mut n = [0u8; 8];
            let _ = wake.read(&mut n);
        }
        let mut ready = fds[1..].iter().map(|p| p.revents != 0);
        streams.retain_mut(|s| {
            if ready.next().unwrap_or(false) {
                s.service(&mut buf);
            }
            s.report_if_caught_up(&mut buf);
            !(s.eof && (s.pending.is_empty() || s.sink.is_none()))
        });
    }
}

impl Stream {
    fn new(src: PipeReader, sink: Option<File>, copying: Option<Copying>) -> Stream {
        Stream {
            src,
            sink,
            pending: Vec::new(),
            eof: false,
            copying,
        }
    }

    /// After the process's exit: done once a read finds the pipe empty with nothing
    /// pending. The read is made here, not on `POLLIN`, since an empty pipe raises none.
    /// At EOF the stream is dropped, which reports.
    fn report_if_caught_up(&mut self, buf: &mut [u8]) {
        match &self.copying {
            Some(c) if c.asked() && !c.reported() => {}
            _ => return,
        }
        // Bounded, so a child that keeps writing cannot keep the pump here: what is left
        // raises POLLIN and brings it back.
        for _ in 0..16 {
            if self.eof || (!self.pending.is_empty() && self.sink.is_some()) {
                return; // dropped soon, or waiting for POLLOUT
            }
            match self.src.read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(c) = self.copying.as_mut() {
                        c.caught_up();
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    self.flush();
                }
            }
        }
    }

    fn service(&mut self, buf: &mut [u8]) {
        if !self.pending.is_empty() {
            self.flush();
            return;
        }
        match self.src.read(buf) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.flush();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => self.eof = true,
        }
    }

    /// Writes what the sink takes now; the rest waits for `POLLOUT`.
    fn flush(&mut self) {
        let Some(sink) = self.sink.as_mut() else {
            self.pending.clear();
            return;
        };
        while !self.pending.is_empty() {
            match sink.write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // The reader is gone or the disk is full: keep draining, drop the bytes.
                    self.sink = None;
                    self.pending.clear();
                    return;
                }
            }
        }
        // Give a large burst's buffer back once it is written.
        if self.pending.capacity() > 64 * 1024 {
            self.pending = Vec::new();
        }
    }
}

fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own only change its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error()).context("set stdio pipe non-blocking");
        }
    }
    Ok(())
}
