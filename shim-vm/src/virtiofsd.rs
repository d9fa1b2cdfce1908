//! virtiofsd, the vhost-user backend that serves a host directory to the guest as virtiofs.
//!
//! It runs as root without its own sandbox (`--sandbox none`): in the host's mount
//! namespace, so that what the shim mounts under the shared directory later (a container's
//! rootfs) is what the guest sees. It serves one VM and exits when QEMU disconnects.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use shim_common::{Context, Error, Result};

use crate::process::Process;

/// The binary's name, next to the shim or on `PATH`.
pub const BINARY: &str = "virtiofsd";

/// virtiofsd's `--cache`: how long the guest may keep what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cache {
    /// Every access goes to the host: host-side changes show at once.
    #[default]
    Never,
    /// Close-to-open consistency with short timeouts.
    Auto,
    /// The guest caches freely (a read-only share).
    Always,
}

impl Cache {
    fn as_arg(self) -> &'static str {
        match self {
            Cache::Never => "never",
            Cache::Auto => "auto",
            Cache::Always => "always",
        }
    }
}

/// A running virtiofsd.
#[derive(Debug)]
pub struct Virtiofsd {
    process: Process,
    socket: PathBuf,
    log: PathBuf,
}

/// `virtiofsd` next to the running executable, else on `PATH`.
pub fn locate() -> Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let beside = dir.join(BINARY);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    shim_common::executable::resolve("virtiofsd", BINARY).map_err(|_| {
        Error::FailedPrecondition(format!(
            "{BINARY} not found next to {} or on PATH: `make virtiofsd` builds it",
            std::env::current_exe()
                .map(|e| e.display().to_string())
                .unwrap_or_default()
        ))
    })
}

impl Virtiofsd {
    /// Starts `binary` serving `shared` on `socket`; returns once the socket exists. Its
    /// log goes to `socket` with `.log` appended.
    pub fn start(binary: &Path, socket: &Path, shared: &Path, cache: Cache) -> Result<Virtiofsd> {
        if !shared.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "shared directory {} is not a directory",
                shared.display()
            )));
        }
        let _ = std::fs::remove_file(socket);
        let log = socket.with_extension("sock.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--cache", cache.as_arg(), "--sandbox", "none"])
            // Raising RLIMIT_NOFILE needs CAP_SYS_RESOURCE, which root lacks here.
            .args(["--rlimit-nofile", "0"])
            // Mounts under the share are separate filesystems: tell the guest (st_dev).
            .arg("--announce-submounts")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut process = Process::spawn(&mut cmd, BINARY).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::FailedPrecondition(format!(
                    "{} not found: `make virtiofsd` builds it",
                    binary.display()
                ))
            } else {
                Error::Io {
                    context: format!("start {}", binary.display()),
                    source: e,
                }
            }
        })?;
        process.wait_for_socket("virtiofsd", socket, &log)?;
        Ok(Virtiofsd {
            process,
            socket: socket.to_path_buf(),
            log,
        })
    }

    /// The vhost-user socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops it (it exits by itself once QEMU is gone; SIGTERM, then SIGKILL, otherwise).
    pub fn stop(mut self, timeout: Duration) -> Result<()> {
        self.stop_inner(timeout)
    }

    fn stop_inner(&mut self, timeout: Duration) -> Result<()> {
        if !self.process.wait_timeout(Duration::from_millis(0))? {
            self.process.terminate(timeout)?;
        }
        let _ = std::fs::remove_file(&self.socket);
        Ok(())
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.stop_inner(Duration::from_secs(1));
    }
}
