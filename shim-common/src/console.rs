//! Terminals: the console socket a runtime sends a pty master through, and the copies
//! between that master and containerd's fifos.
//!
//! runc (and crun, youki, runj) create the pty inside the container and send its master end
//! over a unix socket (`--console-socket`) with `SCM_RIGHTS`; the shim keeps the master,
//! copies it to and from containerd's fifos, and resizes it on `ResizePty`.

use std::fs::{File, OpenOptions};
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::error::{Context, Error, Result};
use crate::stdio::{Drain, StdinFifo, StdioPaths};

/// Plays the runtime's part: sends `master` over the console socket at `path`, as runc
/// does. For a backend that makes the pty itself — one relaying a terminal that lives
/// elsewhere (a VM guest's) through a host pty the SDK then serves as any other.
pub fn send_master(path: &Path, master: &OwnedFd) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let conn = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connect console socket {}", path.display()))?;
    let fds = [master.as_raw_fd()];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[std::io::IoSlice::new(b"/dev/ptmx")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| Error::Sys {
        context: format!("send the pty master over {}", path.display()),
        source: e,
    })?;
    Ok(())
}

/// A listening socket for one process's pty master; its file is removed on drop.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Binds a fresh socket in the temp directory (bundle paths can exceed `sun_path`).
    pub fn new() -> Result<ConsoleSocket> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("shim-pty-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("bind console socket {}", path.display()))?;
        listener.set_nonblocking(true).context("console socket")?;
        Ok(ConsoleSocket { listener, path })
    }

    /// What to pass as `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the pty master the runtime sent. Call once the runtime's create/exec returned;
    /// the runtime has connected and sent by then, so this does not wait long.
    pub fn receive_master(&self, timeout: Duration) -> Result<OwnedFd> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e).context("runtime never sent the pty master"),
            }
        };
        stream.set_nonblocking(false).context("console socket")?;
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receive pty master")?;
        for cmsg in msg.cmsgs().context("read pty master message")? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    for &extra in &fds[1..] {
                        // SAFETY: fds received with SCM_RIGHTS are ours to close.
                        drop(unsafe { OwnedFd::from_raw_fd(extra) });
                    }
                    // SAFETY: as above; this one we keep.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(Error::Runtime(
            "console socket message carried no fd".into(),
        ))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A process's terminal as the shim holds it.
pub struct Console {
    master: Arc<File>,
    stdin_open: Arc<Mutex<bool>>,
    /// The shim's own writer of the stdin fifo ([`StdinFifo`]), closed at `CloseIO`.
    stdin_fifo: Option<StdinFifo>,
    /// The master → stdout copy. It reports when the master reads EIO (every slave fd
    /// closed): a blocking read cannot tell "caught up" from "quiet", and the master is
    /// shared with the stdin copy, so it cannot be made non-blocking for the pump. A child
    /// left holding the terminal makes the exit wait out its grace.
    drain: Drain,
}

impl Console {
    /// Starts copying containerd's stdin fifo into the master and the master into the
    /// stdout fifo (a terminal has no separate stderr).
    pub fn start(master: OwnedFd, paths: &StdioPaths) -> Result<Console> {
        let master = Arc::new(File::from(master));
        let stdin_open = Arc::new(Mutex::new(true));
        let mut stdin_fifo = None;
        if !paths.stdin.is_empty() {
            let (fifo, mut reader) = StdinFifo::open(&paths.stdin)?;
            stdin_fifo = Some(fifo);
            let (m, open) = (master.clone(), stdin_open.clone());
            spawn("pty-in", move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    if !*open.lock().unwrap_or_else(|e| e.into_inner())
                        || (&*m).write_all(&buf[..n]).is_err()
                    {
                        return;
                    }
                }
            })?;
        }
        let drain = Drain::new();
        if !paths.stdout.is_empty() {
            let (m, path) = (master.clone(), paths.stdout.clone());
            let copying = drain.copying();
            spawn("pty-out", move || {
                let _copying = copying;
                let mut sink = OpenOptions::new().write(true).open(&path).ok();
                let mut buf = [0u8; 8192];
                // EIO once every slave fd is closed: the process and its children are gone.
                while let Ok(n @ 1..) = (&*m).read(&mut buf) {
                    if let Some(f) = sink.as_mut() {
                        if f.write_all(&buf[..n]).is_err() {
                            sink = None;
                        }
                    }
                }
            })?;
        }
        Ok(Console {
            master,
            stdin_open,
            stdin_fifo,
            drain,
        })
    }

    /// The copy of the terminal's output, to wait for once the process has exited.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// `ResizePty`.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("resize pty");
        }
        Ok(())
    }

    /// `CloseIO` on a terminal: a terminal has no "close", so send the EOF character, which
    /// a reader in canonical mode sees as end of input; later stdin is dropped.
    pub fn close_stdin(&self) {
        let mut open = self.stdin_open.lock().unwrap_or_else(|e| e.into_inner());
        if *open {
            *open = false;
            let _ = (&*self.master).write_all(&[4]);
        }
        if let Some(fifo) = &self.stdin_fifo {
            fifo.close();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(64 * 1024)
        .spawn(f)
        .context("spawn console copy thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;

    #[test]
    fn master_arrives_over_the_socket_and_resize_applies() {
        let sock = ConsoleSocket::new().unwrap();
        let pty = openpty(None, None).unwrap();
        // Play the runtime: connect and send the master with SCM_RIGHTS.
        send_master(sock.path(), &pty.master).unwrap();
        let master = sock.receive_master(Duration::from_secs(5)).unwrap();
        let console = Console::start(master, &StdioPaths::default()).unwrap();
        console.resize(132, 43).unwrap();
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) },
            0
        );
        assert_eq!((ws.ws_col, ws.ws_row), (132, 43));
        let path = sock.path().to_path_buf();
        drop(sock);
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn nothing_sent_is_a_clear_error() {
        let sock = ConsoleSocket::new().unwrap();
        let err = sock
            .receive_master(Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(err.contains("never sent"), "{err}");
    }
}
