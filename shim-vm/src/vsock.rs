//! vsock, the agent's channel where the host can give the guest one (`Channel = "vsock"`):
//! the guest agent listens on an `AF_VSOCK` port and accepts each host connection in turn,
//! so a host that reconnects simply connects again.
//!
//! Two host sides: the kernel's vhost-vsock (QEMU `vhost-vsock-device`; needs
//! `/dev/vhost-vsock` and KVM), where the host connects to `AF_VSOCK` `cid:port` itself; or,
//! anywhere else (TCG, this machine), `vhost-device-vsock` (rust-vmm, crates.io) as a
//! vhost-user backend of QEMU's `vhost-user-vsock-device`, which maps the guest's vsock onto
//! a unix socket on the host: connect to it, send `CONNECT <port>\n`, read `OK <port>\n`, and
//! the rest of the stream is the guest's (Firecracker's "hybrid vsock").
//!
//! ```no_run
//! # fn main() -> shim_common::Result<()> {
//! use std::time::Duration;
//! // The host's end, through vhost-device-vsock's unix socket:
//! let stream = shim_vm::vsock::connect_hybrid(
//!     std::path::Path::new("/run/shim-vm/0123/agent.vsock"),
//!     shim_vm::vsock::AGENT_PORT,
//!     Duration::from_secs(2),
//! )?;
//! # drop(stream); Ok(()) }
//! ```

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use shim_common::{Context, Error, Result};

use crate::process::Process;

/// The agent's vsock port.
pub const AGENT_PORT: u32 = 1024;
/// The user-space vsock device's binary, next to the shim or on `PATH`.
pub const BINARY: &str = "vhost-device-vsock";
/// The guest's CID behind `vhost-device-vsock`: each VM has its own device process, so
/// every guest can have the same one.
pub const USER_GUEST_CID: u32 = 3;
/// The kernel's vhost-vsock device.
pub const KERNEL_DEVICE: &str = "/dev/vhost-vsock";

/// Listens on vsock `port` of the guest (any CID): the agent's side.
pub fn listen(port: u32) -> Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("create an AF_VSOCK socket (is vmw_vsock_virtio_transport loaded?)")?;
    socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
        .with_context(|| format!("bind vsock port {port}"))?;
    socket::listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .with_context(|| format!("listen on vsock port {port}"))?;
    Ok(fd)
}

/// The next connection on `listener` (from [`listen`]).
pub fn accept(listener: &OwnedFd) -> Result<OwnedFd> {
    loop {
        match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => return Err(e).context("accept on the agent's vsock port"),
        }
    }
}

/// Connects to the guest's vsock `cid:port` through the kernel's vhost-vsock. The kernel
/// gives up after its own connect timeout (2 s by default).
pub fn connect(cid: u32, port: u32) -> Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("create an AF_VSOCK socket")?;
    loop {
        match socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
            Ok(()) => return Ok(fd),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).with_context(|| format!("connect to vsock {cid}:{port}")),
        }
    }
}

/// Connects to guest port `port` through `vhost-device-vsock`'s unix socket `uds`: the
/// `CONNECT`/`OK` handshake, within `timeout`. A guest not listening (yet) closes the
/// connection instead of answering: an error, to try again.
pub fn connect_hybrid(uds: &Path, port: u32, timeout: Duration) -> Result<OwnedFd> {
    let what = || format!("vsock port {port} through {}", uds.display());
    let mut stream = UnixStream::connect(uds).with_context(|| format!("connect to {}", what()))?;
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .with_context(what)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .with_context(what)?;
    // Byte by byte: what follows the line is the guest's, and belongs to the caller.
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(Error::Unavailable(format!(
                    "{}: closed before answering CONNECT (nothing listens there yet)",
                    what()
                )))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::DeadlineExceeded(format!(
                    "{}: no answer to CONNECT within {timeout:?}",
                    what()
                )))
            }
            Err(e) => return Err(e).with_context(what),
        }
        if line.len() > 64 {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&line);
    if !answer.starts_with("OK ") {
        return Err(Error::Unavailable(format!(
            "{}: CONNECT answered {:?}",
            what(),
            answer.trim_end()
        )));
    }
    stream.set_read_timeout(None).with_context(what)?;
    Ok(OwnedFd::from(stream))
}

/// Whether the kernel's vhost-vsock can serve a guest here: `/dev/vhost-vsock` opens. (QEMU
/// needs KVM for it too; the caller checks that.)
pub fn kernel_device() -> std::result::Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KERNEL_DEVICE)
        .map(drop)
        .map_err(|e| format!("{KERNEL_DEVICE}: {e}"))
}

/// A CID for a kernel vhost-vsock guest: CIDs are host-wide there, so each VM gets its own,
/// derived from its runtime directory (a collision makes QEMU fail to start, saying so).
pub fn kernel_guest_cid(runtime_dir: &Path) -> u32 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(runtime_dir.as_os_str().as_encoded_bytes());
    let n = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    // 0-2 are reserved, and u32::MAX is VMADDR_CID_ANY.
    3 + n % (u32::MAX - 4)
}

/// `vhost-device-vsock`: `configured` if set, else next to the running executable, else on
/// `PATH`; `None` if it is nowhere (the caller says what to do, when it needs it).
pub fn locate(configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        return Some(PathBuf::from(configured));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(BINARY)));
    if let Some(b) = beside.filter(|b| b.is_file()) {
        return Some(b);
    }
    shim_common::executable::resolve(BINARY, BINARY).ok()
}

/// The error for a vsock channel without its device.
pub fn missing_binary(looked: Option<&Path>) -> Error {
    let looked = match looked {
        Some(p) => format!("{} not found", p.display()),
        None => format!("{BINARY} not found next to the shim or on PATH"),
    };
    Error::FailedPrecondition(format!(
        "Channel = \"vsock\" needs {BINARY} on a host without {KERNEL_DEVICE} and KVM: {looked}; \
         `make vhost-device-vsock` builds it"
    ))
}

/// A running `vhost-device-vsock` serving one VM.
#[derive(Debug)]
pub struct VhostUserVsock {
    process: Process,
    socket: PathBuf,
    uds: PathBuf,
}

impl VhostUserVsock {
    /// Starts `binary` with its vhost-user socket for QEMU at `socket` and the guest's
    /// ports on unix socket `uds`; returns once `socket` exists. Its output goes to `socket`
    /// with `.log` appended.
    pub fn start(binary: &Path, socket: &Path, uds: &Path, cid: u32) -> Result<VhostUserVsock> {
        if !binary.is_file() {
            return Err(missing_binary(Some(binary)));
        }
        for s in [socket, uds] {
            let _ = std::fs::remove_file(s);
        }
        let log = socket.with_extension("sock.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.args(["--guest-cid", &cid.to_string()])
            .arg("--socket")
            .arg(socket)
            .arg("--uds-path")
            .arg(uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut process = Process::spawn(&mut cmd, BINARY).map_err(|e| Error::Io {
            context: format!("start {}", binary.display()),
            source: e,
        })?;
        process.wait_for_socket(BINARY, socket, &log)?;
        Ok(VhostUserVsock {
            process,
            socket: socket.to_path_buf(),
            uds: uds.to_path_buf(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The unix socket the host connects to.
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    fn stop(&mut self) {
        if !self.process.wait_timeout(Duration::ZERO).unwrap_or(true) {
            let _ = self.process.terminate(Duration::from_secs(1));
        }
        for s in [&self.socket, &self.uds] {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl Drop for VhostUserVsock {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// Plays vhost-device-vsock's side of the handshake with `answer`.
    fn device(
        answer: &'static str,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let served = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut w = s;
            if !answer.is_empty() {
                w.write_all(answer.as_bytes()).unwrap();
            }
            line
        });
        (dir, path, served)
    }

    #[test]
    fn the_hybrid_handshake_leaves_the_guest_bytes_to_the_caller() {
        let (_dir, path, served) = device("OK 1073741824\nttrpc bytes");
        let fd = connect_hybrid(&path, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(served.join().unwrap(), "CONNECT 1024\n");
        let mut rest = String::new();
        std::fs::File::from(fd).read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "ttrpc bytes");
    }

    #[test]
    fn a_guest_not_listening_is_an_error_naming_the_port() {
        let (_dir, path, served) = device("");
        let e = connect_hybrid(&path, 1024, Duration::from_secs(5)).unwrap_err();
        served.join().unwrap();
        assert!(e.to_string().contains("vsock port 1024"), "{e}");
        let e = connect_hybrid(
            Path::new("/nonexistent/v.sock"),
            1024,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/v.sock"), "{e}");
    }

    #[test]
    fn kernel_cids_are_valid_and_differ_per_vm() {
        let a = kernel_guest_cid(Path::new("/run/shim-vm/aaaa"));
        let b = kernel_guest_cid(Path::new("/run/shim-vm/bbbb"));
        assert!((3..u32::MAX).contains(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_missing_device_names_the_binary_and_the_make_target() {
        let e = VhostUserVsock::start(
            Path::new("/nonexistent/vhost-device-vsock"),
            Path::new("/tmp/x.sock"),
            Path::new("/tmp/y.sock"),
            3,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/vhost-device-vsock"), "{e}");
        assert!(e.contains("make vhost-device-vsock"), "{e}");
    }
}
