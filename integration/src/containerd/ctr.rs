//! `ctr`, containerd's CLI, run against a private containerd with a time bound.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Containerd, CTR_BINARY};
use crate::error::Error;
use crate::image;

/// Result of one `ctr` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrOutput {
    /// Exit code; `128 + signal` if ctr was killed by a signal, `124` on timeout.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    /// True if the harness killed ctr because it exceeded its timeout.
    pub timed_out: bool,
}

impl CtrOutput {
    /// True if ctr exited 0.
    pub fn success(&self) -> bool {
        self.status == 0 && !self.timed_out
    }
}

impl Containerd {
    /// Runs `ctr --address <sock> -n <namespace> <args...>` with the default
    /// ctr timeout. Never fails: spawn errors are reported as status 127.
    pub fn ctr(&self, args: &[&str]) -> CtrOutput {
        self.ctr_timeout(args, self.ctr_timeout)
    }

    /// Like [`ctr`](Self::ctr) with an explicit timeout; on timeout ctr is
    /// killed and the output has `timed_out` set and status 124.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> CtrOutput {
        run_with_timeout(self.ctr_command(args), timeout)
    }

    /// Like [`ctr`](Self::ctr), with `input` on ctr's stdin (for `run` without `-d`).
    pub fn ctr_with_stdin(&self, args: &[&str], input: &[u8]) -> CtrOutput {
        let file = self.dir().join(format!("stdin-{}", crate::unique_id("in")));
        if let Err(e) = std::fs::write(&file, input) {
            panic!("write {}: {e}", file.display());
        }
        let mut cmd = self.ctr_command(args);
        match std::fs::File::open(&file) {
            Ok(f) => cmd.stdin(f),
            Err(e) => panic!("open {}: {e}", file.display()),
        };
        let out = run_with_timeout(cmd, self.ctr_timeout);
        let _ = std::fs::remove_file(&file);
        out
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        self.ctr_command_in(&self.namespace, args)
    }

    pub(super) fn ctr_command_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR_BINARY);
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            // ctr reads the snapshotter for `images import` / `run` from here.
            .env("CONTAINERD_SNAPSHOTTER", &self.snapshotter)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null());
        cmd
    }

    /// Like [`ctr`](Self::ctr) but returns [`Error::Ctr`] if ctr fails.
    pub fn try_ctr(&self, args: &[&str]) -> Result<CtrOutput, Error> {
        self.try_ctr_in(&self.namespace, args)
    }

    /// Like [`try_ctr`](Self::try_ctr) in another namespace (CRI's is `k8s.io`).
    pub fn try_ctr_in(&self, namespace: &str, args: &[&str]) -> Result<CtrOutput, Error> {
        let out = run_with_timeout(self.ctr_command_in(namespace, args), self.ctr_timeout);
        if out.success() {
            Ok(out)
        } else {
            Err(Error::Ctr {
                args: args.join(" "),
                status: out.status,
                stdout: out.stdout,
                stderr: out.stderr,
            })
        }
    }

    /// Like [`ctr`](Self::ctr), but **panics** (test-only) with ctr's full
    /// output and the tail of containerd's log if ctr fails.
    pub fn ctr_ok(&self, args: &[&str]) -> CtrOutput {
        match self.try_ctr(args) {
            Ok(out) => out,
            Err(e) => panic!(
                "{e}\n--- containerd log tail ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(30)
            ),
        }
    }

    /// Imports the busybox image as [`image::BUSYBOX_REF`]. The archive is
    /// built once per process (and cached across processes).
    pub fn import_busybox(&self) -> Result<(), Error> {
        let archive = image::cached_busybox_archive()?;
        let archive = archive.to_string_lossy();
        self.try_ctr(&["images", "import", archive.as_ref()])?;
        let out = self.try_ctr(&["images", "ls", "-q"])?;
        if out.stdout.lines().any(|l| l.trim() == image::BUSYBOX_REF) {
            Ok(())
        } else {
            Err(Error::Ctr {
                args: format!("images import {archive} (image not listed afterwards)"),
                status: 0,
                stdout: out.stdout,
                stderr: out.stderr,
            })
        }
    }
}

/// Runs `cmd` collecting its output, killing it after `timeout`.
pub(super) fn run_with_timeout(mut cmd: Command, timeout: Duration) -> CtrOutput {
    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            return CtrOutput {
                status: 127,
                stdout: String::new(),
                stderr: format!("integration: cannot spawn {cmd:?}: {e}"),
                timed_out: false,
            }
        }
    };
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );

    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
            Err(_) => break None,
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let mut stderr = err_t.join().unwrap_or_default();
    let status = if timed_out {
        stderr.push_str(&format!(
            "\nintegration: ctr killed after {timeout:?} timeout\n"
        ));
        124
    } else {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Some(st) => st
                .code()
                .or_else(|| st.signal().map(|s| 128 + s))
                .unwrap_or(-1),
            None => -1,
        }
    };
    CtrOutput {
        status,
        stdout,
        stderr,
        timed_out,
    }
}
