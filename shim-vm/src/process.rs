//! A helper process of the host shim (QEMU, virtiofsd): spawned through the SDK's reaper,
//! watched through a pidfd, so that waiting with a timeout and killing never race the
//! subreaper's `waitpid(-1)` nor hit a reused pid.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use shim_common::pidfd::PidFd;
use shim_common::{reaper, Context, Result};

/// A running (or exited, not yet dropped) child.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pidfd: PidFd,
    exited: bool,
    name: String,
}

impl Process {
    /// Spawns `cmd` via [`reaper::spawn`]; `name` is for errors.
    pub fn spawn(cmd: &mut Command, name: &str) -> std::io::Result<Process> {
        let child = reaper::spawn(cmd)?;
        let pidfd = match PidFd::open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                if reaper::installed().is_none() {
                    let _ = child.wait();
                }
                return Err(e);
            }
        };
        Ok(Process {
            child,
            pidfd,
            exited: false,
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit; true once it has (and is reaped, or
    /// left to the installed reaper).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<bool> {
        if self.exited {
            return Ok(true);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                .unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) if left.is_zero() => return Ok(false),
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(e).with_context(|| format!("wait for {}", self.name)),
            }
        }
        self.exited = true;
        // With a subreaper installed, its waitpid(-1) collects the zombie; otherwise we must.
        if reaper::installed().is_none() {
            let _ = self.child.wait();
        }
        Ok(true)
    }

    /// Waits up to 10 s for the daemon to open its listening `socket`; if it exits or
    /// never does, it is killed and the error quotes what it wrote to `log`.
    pub fn wait_for_socket(&mut self, name: &str, socket: &Path, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if self.wait_timeout(Duration::from_millis(5))? || Instant::now() >= deadline {
                let _ = self.kill();
                let said = std::fs::read_to_string(log).unwrap_or_default();
                return Err(shim_common::Error::Runtime(format!(
                    "{name} did not open {}: {}",
                    socket.display(),
                    said.trim()
                )));
            }
        }
        Ok(())
    }

    /// Whether it has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.wait_timeout(Duration::ZERO).unwrap_or(false)
    }

    /// Sends `signal` through the pidfd (never to a reused pid).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        if self.exited {
            return Ok(());
        }
        self.pidfd
            .signal(signal)
            .map(drop)
            .with_context(|| format!("signal {}", self.name))
    }

    /// `process_madvise(2)` `MADV_PAGEOUT` of `ranges` (address, length) of its memory:
    /// reclaims those pages now. The bytes advised.
    pub fn page_out(&self, ranges: &[(usize, usize)]) -> std::io::Result<usize> {
        let iov: Vec<libc::iovec> = ranges
            .iter()
            .map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: process_madvise reads `iov.len()` iovecs from `iov`, which lives across
        // the call; the addresses are the other process's, never dereferenced here.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                self.pidfd.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                libc::MADV_PAGEOUT,
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// SIGKILL, then waits (bounded) for it to be gone.
    pub fn kill(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL)?;
        self.wait_timeout(Duration::from_secs(5))?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        self.signal(libc::SIGTERM)?;
        if !self.wait_timeout(timeout)? {
            self.kill()?;
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.kill();
        }
    }
}
