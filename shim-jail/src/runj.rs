//! The runj command line: one method per subcommand, runj's own stderr in every error.
//!
//! runj's contract, as its source defines it: `create <id> <bundle>` starts a
//! `runj-entrypoint` in the new jail that waits on `<state>/exec.fifo`; `start <id>` reads
//! that fifo so the entrypoint execs the process; `state <id>` prints the OCI state JSON
//! (`created`, `running`, `stopped`); `kill [--all] <id> <signal>` refuses a container that
//! is not running; `delete <id>` refuses a running jail; `extension exec -p <process.json>
//! <id>` does not detach — runj itself becomes the new process, so its pid is the exec's.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use shim_common::executable::{self, read_pid};
use shim_common::reaper::{self, Output};
use shim_common::stdio::ChildStdio;
use shim_common::{Context, Error, Result, Signal};

/// runj's state of a container (`runj state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub status: String,
    pub pid: u32,
}

/// The runj binary, resolved.
#[derive(Debug, Clone)]
pub struct Runj {
    binary: PathBuf,
}

impl Runj {
    /// Finds `name` on `PATH` (or at its path) now, so a missing runj is a clear error
    /// before anything is mounted.
    pub fn new(name: &str) -> Result<Runj> {
        let binary = executable::resolve("runj", name).map_err(|e| match e {
            Error::FailedPrecondition(m) => Error::FailedPrecondition(format!(
                "{m}: install runj (pkg install runj, or go install go.sbk.wtf/runj/cmd/runj) \
                 where containerd's PATH finds it, or set BinaryName in the runtime options"
            )),
            e => e,
        })?;
        Ok(Runj { binary })
    }

    fn command(&self) -> Command {
        Command::new(&self.binary)
    }

    /// Runs `cmd`; on failure the error carries runj's stderr.
    fn run(&self, what: &str, cmd: &mut Command) -> Result<Output> {
        let out = reaper::run(cmd)?;
        if out.success() {
            return Ok(out);
        }
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let reason = if said.is_empty() {
            format!("exit status {}", out.status)
        } else {
            said
        };
        Err(Error::Runtime(format!("runj {what} failed: {reason}")))
    }

    /// `runj create --pid-file`: the entrypoint exists, waiting for `start`. Returns its pid.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        console_socket: Option<&Path>,
        stdio: ChildStdio,
    ) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let mut cmd = self.command();
        cmd.arg("create").arg("--pid-file").arg(&pid_file);
        if let Some(sock) = console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id).arg(bundle);
        let ChildStdio {
            stdin,
            stdout,
            stderr,
        } = stdio;
        let tee = StderrTee::new(stderr)?;
        ChildStdio {
            stdin,
            stdout,
            stderr: Some(tee.input.try_clone().context("dup stderr pipe")?),
        }
        .apply(&mut cmd);
        let result = reaper::run(&mut cmd);
        drop(cmd); // close the shim's copies of the container's stdio
        let said = tee.finish(result.as_ref().is_ok_and(|o| !o.success()));
        let out = result?;
        if !out.success() {
            let reason = match said.trim() {
                "" => format!("exit status {}", out.status),
                s => s.to_string(),
            };
            return Err(Error::Runtime(format!("runj create failed: {reason}")));
        }
        read_pid(&pid_file)
    }

    pub fn start(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["start", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run("start", &mut cmd).map(drop)
    }

    /// `runj state`: `None` when runj holds no state for `id`.
    pub fn state(&self, id: &str) -> Result<Option<State>> {
        let mut cmd = self.command();
        cmd.args(["state", id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match self.run("state", &mut cmd) {
            Ok(out) => {
                let v: Value = serde_json::from_slice(&out.stdout)
                    .map_err(|e| Error::Runtime(format!("runj state output: {e}")))?;
                Ok(Some(State {
                    status: v["status"].as_str().unwrap_or_default().to_string(),
                    pid: v["pid"].as_u64().unwrap_or(0) as u32,
                }))
            }
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `runj kill`. A jail that is stopped or gone is `NotFound`, as containerd expects.
    pub fn kill(&self, id: &str, signal: Signal, all: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run("kill", &mut cmd).map(drop).map_err(|e| {
            if gone(&e) || e.to_string().contains("non-running") {
                Error::NotFound(format!("container {id}: jail is not running"))
            } else {
                e
            }
        })
    }

    /// `runj delete`; a container runj does not know is already deleted.
    pub fn delete(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["delete", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match self.run("delete", &mut cmd) {
            Err(e) if gone(&e) || e.to_string().contains("invalid jail id") => Ok(()),
            other => other.map(drop),
        }
    }

    /// Spawns `runj extension exec`, which becomes the process: its pid is the exec's, and
    /// its exit (through the reaper) is the exec's exit status. runj's own refusal (a jail
    /// that stopped meanwhile) therefore arrives as that process's exit and stderr.
    pub fn exec(
        &self,
        id: &str,
        process_json: &Path,
        console_socket: Option<&Path>,
        stdio: ChildStdio,
    ) -> Result<u32> {
        let mut cmd = self.command();
        cmd.args(["extension", "exec"]);
        if let Some(sock) = console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg("-p").arg(process_json).arg(id);
        stdio.apply(&mut cmd);
        // runj becomes the process. The reaper owns waitpid: the Child is dropped unwaited.
        let child = shim_common::reaper::spawn(&mut cmd)
            .with_context(|| format!("run {}", self.binary.display()))?;
        Ok(child.id())
    }
}

/// runj's words for "no such container".
fn gone(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("no such file or directory") || text.contains("does not exist")
}

/// runj hands its own stderr to the container, like runc, but has no log file for its
/// errors. So `create` gets a pipe the shim relays to the container's stderr while also
/// recording what arrives until `create` returns: runj's words reach the error, and the
/// container's stderr is unchanged (one relay thread per container, until it exits).
struct StderrTee {
    input: OwnedFd,
    recorded: Arc<Mutex<Option<Vec<u8>>>>,
    eof: mpsc::Receiver<()>,
}

impl StderrTee {
    fn new(container_stderr: Option<OwnedFd>) -> Result<StderrTee> {
        let (mut reader, writer) = std::io::pipe().context("stderr pipe")?;
        let recorded = Arc::new(Mutex::new(Some(Vec::new())));
        let (tx, eof) = mpsc::channel();
        let rec = recorded.clone();
        let mut out = container_stderr.map(fs::File::from);
        std::thread::Builder::new()
            .name("runj-stderr".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Some(r) = rec.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                        if r.len() < 64 * 1024 {
                            r.extend_from_slice(&buf[..n]);
                        }
                    }
                    if let Some(o) = out.as_mut() {
                        if o.write_all(&buf[..n]).is_err() {
                            out = None;
                        }
                    }
                }
                let _ = tx.send(());
            })
            .context("spawn stderr relay")?;
        Ok(StderrTee {
            input: OwnedFd::from(writer),
            recorded,
            eof,
        })
    }

    /// Stops recording and returns what was recorded. After a failed create, waits (briefly)
    /// for runj's last words: nothing else holds the pipe then.
    fn finish(self, failed: bool) -> String {
        drop(self.input);
        if failed {
            let _ = self.eof.recv_timeout(Duration::from_secs(2));
        }
        let bytes = self
            .recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runj_is_a_clear_error() {
        let Err(err) = Runj::new("/nonexistent/runj") else {
            panic!("a missing runj must be an error");
        };
        let err = err.to_string();
        assert!(err.contains("\"/nonexistent/runj\" not found"), "{err}");
        assert!(err.contains("BinaryName"), "{err}");
    }
}
