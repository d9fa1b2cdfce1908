//! The runc command line (also spoken by crun): one method per subcommand, with runc's own
//! error text taken from its JSON log so it reaches the user.

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use protobuf::well_known_types::any::Any;
use protocol::options::CheckpointOptions;

use shim_common::executable::{self, read_pid};
use shim_common::reaper::{self, Output};
use shim_common::stdio::ChildStdio;
use shim_common::{Context, Error, Result, Signal};

use crate::options::RuncConfig;

/// runc, configured for one container.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    config: RuncConfig,
    /// runc `--root`, the namespace appended.
    root: PathBuf,
    /// runc's `--log`: JSON lines whose last error is the reason a command failed.
    log: PathBuf,
}

/// `runc features` (runc 1.1 and later), for `-info`. The binary must be there: a missing
/// one is a clear error. A runtime too old for the command has no features to tell, which
/// is no error: containerd's runc shim only logs it and answers without features.
pub fn features(config: &RuncConfig) -> Result<Option<Any>> {
    let binary = executable::resolve("runtime", &config.binary)?;
    let out = reaper::run(
        Command::new(&binary)
            .arg("features")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let valid = out.success()
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&out.stdout)
            .is_ok();
    if !valid {
        log::debug!(
            "{} features: {} ({}); answering without features",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(None);
    }
    Ok(Some(Any {
        type_url: protocol::type_urls::OCI_FEATURES.into(),
        value: out.stdout,
        ..Default::default()
    }))
}

impl Runc {
    /// Resolves the binary now, so a wrong `binary_name` fails with a clear message.
    pub fn new(config: &RuncConfig, namespace: &str, bundle: &Path) -> Result<Runc> {
        let binary = executable::resolve("runtime", &config.binary)?;
        Ok(Runc {
            binary,
            root: config.root.join(namespace),
            config: config.clone(),
            log: bundle.join("log.json"),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        if self.config.criu != "criu" {
            cmd.arg("--criu").arg(&self.config.criu);
        }
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .args(["--log-format", "json"]);
        if self.config.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd
    }

    /// Runs `cmd`; on failure returns runc's own explanation.
    fn run(&self, what: &str, cmd: &mut Command) -> Result<Output> {
        // Only what this command logs explains its failure; earlier lines are history.
        let offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let out = reaper::run(cmd)?;
        if out.success() {
            return Ok(out);
        }
        let reason = last_error(&self.log, offset)
            .or_else(|| {
                let s = String::from_utf8_lossy(&out.stderr).trim().to_string();
                (!s.is_empty()).then_some(s)
            })
            .unwrap_or_else(|| format!("exit status {}", out.status));
        // runc already says "runc create failed: ..."; crun does not.
        if reason.contains(&format!("{what} failed")) {
            return Err(Error::Runtime(reason));
        }
        Err(Error::Runtime(format!(
            "{} {what} failed: {reason}",
            self.binary.display()
        )))
    }

    /// `runc create`: the init process exists, waiting for `start`. Returns its pid.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        console_socket: Option<&Path>,
        stdio: ChildStdio,
    ) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let mut cmd = self.command();
        cmd.arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file);
        if self.config.no_pivot_root {
            cmd.arg("--no-pivot");
        }
        if self.config.no_new_keyring {
            cmd.arg("--no-new-keyring");
        }
        if let Some(sock) = console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        stdio.apply(&mut cmd);
        self.run("create", &mut cmd)?;
        drop(cmd); // close the shim's copies of the container's stdio
        read_pid(&pid_file)
    }

    /// `runc start`. A created container's init waits on `<root>/<id>/exec.fifo`; reading
    /// it and removing it is exactly what `runc start` does, so the shim does it itself and
    /// saves a runc process per container start. Without the fifo (an older or different
    /// runtime, or a container that is not in created state), runc does it.
    pub fn start(&self, id: &str, init_pid: u32) -> Result<()> {
        let fifo = self.root.join(id).join("exec.fifo");
        if start_via_exec_fifo(&fifo, init_pid)? {
            return Ok(());
        }
        self.run(
            "start",
            self.command()
                .args(["start", id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .map(drop)
    }

    /// `runc exec --detach` of a process spec; returns the new process's pid.
    pub fn exec(
        &self,
        id: &str,
        bundle: &Path,
        exec_id: &str,
        spec: &[u8],
        console_socket: Option<&Path>,
        stdio: ChildStdio,
    ) -> Result<u32> {
        let spec_file = bundle.join(format!(".exec-{exec_id}.json"));
        let pid_file = bundle.join(format!(".exec-{exec_id}.pid"));
        fs::write(&spec_file, spec).context("write exec process spec")?;
        let mut cmd = self.command();
        cmd.args(["exec", "--detach", "--process"])
            .arg(&spec_file)
            .arg("--pid-file")
            .arg(&pid_file);
        if let Some(sock) = console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        stdio.apply(&mut cmd);
        let result = self.run("exec", &mut cmd).and_then(|_| read_pid(&pid_file));
        drop(cmd);
        let _ = fs::remove_file(&spec_file);
        let _ = fs::remove_file(&pid_file);
        result
    }

    pub fn kill(&self, id: &str, signal: Signal, all: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id)
            .arg(signal.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run("kill", &mut cmd).map(drop).map_err(|e| {
            let text = e.to_string();
            if [
                "not running",
                "process already finished",
                "no such process",
                "does not exist",
            ]
            .iter()
            .any(|s| text.contains(s))
            {
                Error::NotFound(format!("container {id}: process already finished"))
            } else {
                e
            }
        })
    }

    /// `runc delete --force`: gone, whatever state it was in. A missing container is fine.
    pub fn delete(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match self.run("delete", &mut cmd) {
            Err(e)
                if e.to_string().contains("does not exist")
                    || e.to_string().contains("not exist") =>
            {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    pub fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let mut cmd = self.command();
        cmd.args(["ps", "--format", "json", id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = self.run("ps", &mut cmd)?;
        let pids: Option<Vec<u32>> = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::Runtime(format!("runc ps output: {e}")))?;
        Ok(pids.unwrap_or_default())
    }

    /// `criu check`: checkpoint and restore cannot work without it, and runc's own failure
    /// deep inside a dump says far less than this does.
    pub fn criu_check(&self) -> Result<()> {
        let criu = &self.config.criu;
        let mut cmd = Command::new(criu);
        cmd.arg("check")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = reaper::run(&mut cmd).map_err(|e| {
            Error::FailedPrecondition(format!("checkpoint/restore needs CRIU: {e}"))
        })?;
        if out.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let reason = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_string();
        Err(Error::FailedPrecondition(format!(
            "checkpoint/restore needs CRIU, and `{criu} check` fails on this host: {reason}"
        )))
    }

    /// `runc checkpoint` with containerd's `CheckpointOptions` mapped onto runc's flags.
    pub fn checkpoint(
        &self,
        id: &str,
        image: &Path,
        work: &Path,
        o: &CheckpointOptions,
    ) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(image)
            .arg("--work-path")
            .arg(work);
        let flags = [
            (!o.exit, "--leave-running"),
            (o.open_tcp, "--tcp-established"),
            (o.external_unix_sockets, "--ext-unix-sk"),
            (o.terminal, "--shell-job"),
            (o.file_locks, "--file-locks"),
        ];
        cmd.args(flags.iter().filter(|(on, _)| *on).map(|(_, f)| f));
        for ns in &o.empty_namespaces {
            cmd.arg("--empty-ns").arg(ns);
        }
        if !o.cgroups_mode.is_empty() {
            cmd.arg("--manage-cgroups-mode").arg(&o.cgroups_mode);
        }
        cmd.arg(id).stdout(Stdio::null()).stderr(Stdio::piped());
        self.run("checkpoint", &mut cmd).map(drop)
    }

    /// `runc restore --detach`: the container comes back running. Returns the init's pid.
    pub fn restore(
        &self,
        id: &str,
        bundle: &Path,
        image: &Path,
        work: &Path,
        stdio: ChildStdio,
    ) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let mut cmd = self.command();
        cmd.args(["restore", "--detach", "--bundle"]).arg(bundle);
        cmd.arg("--pid-file")
            .arg(&pid_file)
            .arg("--image-path")
            .arg(image);
        cmd.arg("--work-path").arg(work);
        if self.config.no_pivot_root {
            cmd.arg("--no-pivot");
        }
        cmd.arg(id);
        stdio.apply(&mut cmd);
        self.run("restore", &mut cmd)?;
        drop(cmd);
        read_pid(&pid_file)
    }

    /// `runc update --resources`: apply an OCI `LinuxResources` (JSON) to the container.
    pub fn update(&self, id: &str, bundle: &Path, resources: &[u8]) -> Result<()> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = bundle.join(format!(".update-{n}.json"));
        fs::write(&file, resources).context("write resources for runc update")?;
        let mut cmd = self.command();
        cmd.args(["update", "--resources"]).arg(&file).arg(id);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let result = self.run("update", &mut cmd).map(drop);
        let _ = fs::remove_file(&file);
        result
    }

    pub fn pause(&self, id: &str) -> Result<()> {
        self.run(
            "pause",
            self.command()
                .args(["pause", id])
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .map(drop)
    }

    pub fn resume(&self, id: &str) -> Result<()> {
        self.run(
            "resume",
            self.command()
                .args(["resume", id])
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .map(drop)
    }
}

/// Releases a created container's init by reading its exec fifo. Returns `false` when
/// there is no fifo to read.
fn start_via_exec_fifo(fifo: &Path, init_pid: u32) -> Result<bool> {
    // Non-blocking open never hangs on a dead init; blocking reads afterwards wait for the
    // init's single byte.
    let mut f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("open {}", fifo.display())),
    };
    nix::fcntl::fcntl(
        f.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .context("make exec fifo blocking")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 16];
    loop {
        match f.read(&mut buf) {
            Ok(0) => {
                // The init has not reopened its end yet — or it is gone.
                let alive = nix::sys::signal::kill(Pid::from_raw(init_pid as i32), None).is_ok();
                if !alive {
                    return Err(Error::FailedPrecondition(
                        "container process is already dead".into(),
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(Error::Runtime(
                        "container init never opened its exec fifo".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", fifo.display())),
        }
    }
    // runc reports "created" for as long as the fifo exists.
    fs::remove_file(fifo).with_context(|| format!("remove {}", fifo.display()))?;
    Ok(true)
}

/// The message of the last error runc logged.
fn last_error(log: &Path, offset: u64) -> Option<String> {
    let bytes = fs::read(log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(offset as usize..)?);
    text.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["level"] == "error" || v["level"] == "fatal")
            .then(|| v["msg"].as_str().unwrap_or(line).to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_non_executable_binaries_are_clear_errors() {
        let err = executable::resolve("runtime", "/nonexistent/runc")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"/nonexistent/runc\" not found"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("runc");
        fs::write(&f, "").unwrap();
        let err = executable::resolve("runtime", f.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not executable"), "{err}");
        assert!(executable::resolve("runtime", "sh").is_ok());
    }

    #[test]
    fn last_error_comes_from_runc_json_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        fs::write(
            &log,
            "{\"level\":\"warning\",\"msg\":\"w\"}\n{\"level\":\"error\",\"msg\":\"container_linux.go:380: starting container process caused: exec: \\\"nope\\\": executable file not found in $PATH\"}\n",
        )
        .unwrap();
        let len = fs::metadata(&log).unwrap().len();
        assert_eq!(
            last_error(&log, len),
            None,
            "earlier errors are not this command's"
        );
        assert!(last_error(&log, 0)
            .unwrap()
            .contains("executable file not found"));
    }
}
