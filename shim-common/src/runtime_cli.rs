//! The command line OCI runtimes share (runc, crun, youki, runj): `create`, `start`, `state`,
//! `kill`, `delete`, run through the reaper, with the runtime's own words in every error.
//!
//! A runtime with a `--log` file (runc, crun) explains a failure in its last JSON error line;
//! one without (runj) on the stderr it also hands to the container, so [`RuntimeCli::launch`]
//! tees that stream while the command runs. A backend adds its own subcommands through
//! [`RuntimeCli::command`] and [`RuntimeCli::run`].
//!
//! ```no_run
//! use shim_common::runtime_cli::RuntimeCli;
//! let runc = RuntimeCli::new("runtime", "runc")?
//!     .global(["--root", "/run/runc/default"])
//!     .json_log("/run/bundle/log.json");
//! runc.start("web")?;
//! # Ok::<(), shim_common::Error>(())
//! ```

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::backend::Signal;
use crate::error::{Context, Error, Result};
use crate::executable::{self, read_pid};
use crate::reaper::{self, Output};
use crate::stdio::ChildStdio;
use crate::trace;

/// What runtimes say when the container, or its process, is already gone.
const GONE: &[&str] = &[
    "does not exist",
    "not exist",
    "no such file or directory",
    "not running",
    "non-running",
    "process already finished",
    "no such process",
];

/// One runtime binary and the global flags every subcommand gets.
#[derive(Debug, Clone)]
pub struct RuntimeCli {
    binary: PathBuf,
    global: Vec<OsString>,
    /// The runtime's `--log` in JSON lines, whose last error explains a failure.
    log: Option<PathBuf>,
}

/// A runtime command that ran and failed: which one, and why in the runtime's words.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// `<binary> <subcommand>`.
    pub command: String,
    /// The runtime's explanation (its last logged error, else its stderr, else the status).
    pub reason: String,
}

impl Refusal {
    /// Whether the runtime's explanation contains any of `words`, in any case: runtimes
    /// tell why only in text (crun's `kill` of an exited container says "open pidfd: No
    /// such process"), and this is the one place that reads it.
    pub fn says(&self, words: &[&str]) -> bool {
        let reason = self.reason.to_lowercase();
        words.iter().any(|w| reason.contains(&w.to_lowercase()))
    }

    /// The runtime says the container or process is gone.
    pub fn gone(&self) -> bool {
        self.says(GONE)
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        // runc already says "runc create failed: ..."; crun and runj do not.
        let sub = r.command.rsplit(' ').next().unwrap_or_default();
        if r.reason.contains(&format!("{sub} failed")) {
            Error::Runtime(r.reason)
        } else {
            Error::Runtime(format!("{} failed: {}", r.command, r.reason))
        }
    }
}

/// The OCI state a runtime prints for `state <id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// `creating`, `created`, `running` or `stopped`.
    pub status: String,
    /// The container's init, 0 when it has none.
    pub pid: u32,
}

impl RuntimeCli {
    /// Resolves `name` now (see [`executable::resolve`]; `kind` names it in the error), so
    /// a missing runtime fails before anything is set up.
    pub fn new(kind: &str, name: &str) -> Result<RuntimeCli> {
        Ok(RuntimeCli {
            binary: executable::resolve(kind, name)?,
            global: Vec::new(),
            log: None,
        })
    }

    /// Adds flags that precede every subcommand (`--root`, `--systemd-cgroup`, ...).
    pub fn global<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.global
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Has the runtime log JSON lines to `path` (`--log <path> --log-format json`), where
    /// failures are explained.
    pub fn json_log(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        self.global.push("--log".into());
        self.global.push(path.clone().into());
        self.global.extend(["--log-format".into(), "json".into()]);
        self.log = Some(path);
        self
    }

    /// A trace span for one command: `<binary> <what>` (`runc create`).
    fn span(&self, what: &str) -> trace::Span {
        if !trace::enabled() {
            return trace::Span::default();
        }
        let name = self
            .binary
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        trace::span(format!("{name} {what}"))
    }

    /// The binary, as resolved.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// A command for the binary with the global flags; the caller adds the subcommand.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.global);
        cmd
    }

    /// Runs `cmd` (subcommand `what`) to completion. The outer error is a command that could
    /// not run at all; the inner one a runtime that ran and refused.
    pub fn output(&self, what: &str, cmd: &mut Command) -> Result<Result<Output, Refusal>> {
        // Only what this command logs explains its failure; earlier lines are history.
        let offset = self.log_len();
        let span = self.span(what);
        let out = reaper::run(cmd)?;
        span.attribute("process.exit.code", i64::from(out.status));
        if out.success() {
            return Ok(Ok(out));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Ok(Err(self.refusal(what, offset, &stderr, out.status)))
    }

    /// [`output`](Self::output), a refusal being an error.
    pub fn run(&self, what: &str, cmd: &mut Command) -> Result<Output> {
        Ok(self.output(what, cmd)??)
    }

    /// `<args...>` with no stdin or stdout: the usual shape of a control subcommand.
    pub fn call(&self, args: &[&str]) -> Result<Result<Output, Refusal>> {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.output(args.first().copied().unwrap_or_default(), &mut cmd)
    }

    /// Runs a command that creates a process (`create`, `restore`, `exec --detach`) with
    /// the container's stdio, and returns the pid the runtime wrote to `pid_file`. The
    /// shim's copies of the container's stdio are closed when this returns.
    pub fn launch(
        &self,
        what: &str,
        mut cmd: Command,
        stdio: ChildStdio,
        pid_file: &Path,
    ) -> Result<u32> {
        let offset = self.log_len();
        let (stdio, tee) = match self.log {
            Some(_) => (stdio, None),
            None => {
                let ChildStdio {
                    stdin,
                    stdout,
                    stderr,
                } = stdio;
                let tee = StderrTee::new(stderr)?;
                let stderr = Some(tee.input.try_clone().context("dup stderr pipe")?);
                let stdio = ChildStdio {
                    stdin,
                    stdout,
                    stderr,
                };
                (stdio, Some(tee))
            }
        };
        stdio.apply(&mut cmd);
        let span = self.span(what);
        let result = reaper::run(&mut cmd);
        if let Ok(out) = &result {
            span.attribute("process.exit.code", i64::from(out.status));
        }
        drop(span);
        drop(cmd);
        let failed = result.as_ref().is_ok_and(|o| !o.success());
        let said = tee.map(|t| t.finish(failed)).unwrap_or_default();
        let out = result?;
        if !out.success() {
            return Err(self.refusal(what, offset, &said, out.status).into());
        }
        read_pid(pid_file)
    }

    /// `create --pid-file <bundle>/init.pid [--console-socket <socket>] <args...>`, the part
    /// of `create` runtimes agree on; `args` hold the runtime's own flags and the id and
    /// bundle where it wants them. Returns the init's pid.
    pub fn create(
        &self,
        bundle: &Path,
        console_socket: Option<&Path>,
        args: &[&OsStr],
        stdio: ChildStdio,
    ) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let mut cmd = self.command();
        cmd.arg("create").arg("--pid-file").arg(&pid_file);
        if let Some(sock) = console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.args(args);
        self.launch("create", cmd, stdio, &pid_file)
    }

    /// `start <id>`.
    pub fn start(&self, id: &str) -> Result<()> {
        self.call(&["start", id])?.map(drop).map_err(Error::from)
    }

    /// `state <id>`; `None` when the runtime holds no state for `id`.
    pub fn state(&self, id: &str) -> Result<Option<State>> {
        let out = match self.call(&["state", id])? {
            Ok(out) => out,
            Err(r) if r.gone() => return Ok(None),
            Err(r) => return Err(r.into()),
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::Runtime(format!("{} state output: {e}", self.name())))?;
        Ok(Some(State {
            status: v["status"].as_str().unwrap_or_default().to_string(),
            pid: v["pid"].as_u64().unwrap_or(0) as u32,
        }))
    }

    /// `kill [--all] <id> <signal>`. A container whose processes are gone is `NotFound`,
    /// as containerd expects.
    pub fn kill(&self, id: &str, signal: Signal, all: bool) -> Result<()> {
        let signal = signal.to_string();
        let args: &[&str] = if all {
            &["kill", "--all", id, &signal]
        } else {
            &["kill", id, &signal]
        };
        match self.call(args)? {
            Ok(_) => Ok(()),
            Err(r) if r.gone() => Err(Error::NotFound(format!(
                "container {id}: process already finished"
            ))),
            Err(r) => Err(r.into()),
        }
    }

    /// `delete [--force] <id>`; a container the runtime does not know is already deleted.
    pub fn delete(&self, id: &str, force: bool) -> Result<Result<(), Refusal>> {
        let args: &[&str] = if force {
            &["delete", "--force", id]
        } else {
            &["delete", id]
        };
        Ok(match self.call(args)? {
            Err(r) if !r.gone() => Err(r),
            _ => Ok(()),
        })
    }

    fn name(&self) -> String {
        self.binary.display().to_string()
    }

    fn log_len(&self) -> u64 {
        let len = |p: &PathBuf| fs::metadata(p).map(|m| m.len()).ok();
        self.log.as_ref().and_then(len).unwrap_or(0)
    }

    fn refusal(&self, what: &str, offset: u64, stderr: &str, status: u32) -> Refusal {
        let stderr = stderr.trim();
        let reason = self
            .log
            .as_deref()
            .and_then(|log| last_error(log, offset))
            .or_else(|| (!stderr.is_empty()).then(|| stderr.to_string()))
            .unwrap_or_else(|| format!("exit status {status}"));
        Refusal {
            command: format!("{} {what}", self.name()),
            reason,
        }
    }
}

/// The message of the last error the runtime logged after `offset`.
fn last_error(log: &Path, offset: u64) -> Option<String> {
    let bytes = fs::read(log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(offset as usize..)?);
    text.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["level"] == "error" || v["level"] == "fatal")
            .then(|| v["msg"].as_str().unwrap_or(line).to_string())
    })
}

/// A runtime without a log file hands its own stderr to the container, so its errors would
/// reach only the container's log. A pipe the shim relays to the container's stderr records
/// what arrives until the command returns: the runtime's words reach the error, and the
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
            .name("runtime-stderr".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    if let Some(r) = rec.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                        if r.len() < 64 * 1024 {
                            r.extend_from_slice(&buf[..n]);
                        }
                    }
                    if out
                        .as_mut()
                        .is_some_and(|o| o.write_all(&buf[..n]).is_err())
                    {
                        out = None;
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

    /// Stops recording and returns what was recorded. After a failed command, waits
    /// (briefly) for the runtime's last words: nothing else holds the pipe then.
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

    fn sh(script: &str) -> (RuntimeCli, Command) {
        let cli = RuntimeCli::new("runtime", "sh").unwrap();
        let mut cmd = cli.command();
        cmd.args(["-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        (cli, cmd)
    }

    #[test]
    fn last_error_comes_from_the_json_log_after_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        fs::write(
            &log,
            "{\"level\":\"warning\",\"msg\":\"w\"}\n{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": executable file not found in $PATH\"}\n",
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

    #[test]
    fn a_refusal_carries_stderr_or_the_status() {
        let (cli, mut cmd) = sh("echo 'container \"x\" does not exist' >&2; exit 1");
        let r = cli.output("kill", &mut cmd).unwrap().unwrap_err();
        assert!(r.gone(), "{r:?}");
        assert!(r.command.ends_with("sh kill"), "{r:?}");
        let err = Error::from(r).to_string();
        assert!(
            err.ends_with("sh kill failed: container \"x\" does not exist"),
            "{err}"
        );

        let (cli, mut cmd) = sh("exit 3");
        let r = cli.output("pause", &mut cmd).unwrap().unwrap_err();
        assert_eq!(r.reason, "exit status 3");
        assert!(!r.gone());
    }

    #[test]
    fn each_runtime_s_words_for_a_gone_container_are_read_in_any_case() {
        let said = |reason: &str| Refusal {
            command: "crun kill".into(),
            reason: reason.into(),
        };
        for reason in [
            "open pidfd: No such process",
            "container \"x\" does not exist",
            "container not running",
            "Process already finished",
        ] {
            assert!(said(reason).gone(), "{reason}");
        }
        assert!(!said("permission denied").gone());
    }

    #[test]
    fn a_runtime_that_says_what_failed_is_not_repeated() {
        let r = Refusal {
            command: "/usr/bin/runc create".into(),
            reason: "runc create failed: unable to start container process".into(),
        };
        assert_eq!(
            Error::from(r).to_string(),
            "runc create failed: unable to start container process"
        );
    }

    #[test]
    fn launch_without_a_log_reports_stderr_and_relays_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let (cli, _) = sh("");
        let mut cmd = cli.command();
        cmd.args(["-c", "echo jail_set: Operation not permitted >&2; exit 1"]);
        let (mut container_err, w) = std::io::pipe().unwrap();
        let stdio = ChildStdio {
            stderr: Some(OwnedFd::from(w)),
            ..Default::default()
        };
        let err = cli
            .launch("create", cmd, stdio, &pid_file)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("sh create failed: jail_set: Operation not permitted"),
            "{err}"
        );
        let mut relayed = String::new();
        container_err.read_to_string(&mut relayed).unwrap();
        assert_eq!(relayed, "jail_set: Operation not permitted\n");

        let mut cmd = cli.command();
        cmd.arg("-c")
            .arg(format!("echo 42 > {}", pid_file.display()));
        assert_eq!(
            cli.launch("create", cmd, ChildStdio::default(), &pid_file)
                .unwrap(),
            42
        );
    }

    #[test]
    fn a_missing_runtime_is_an_error_before_anything_runs() {
        let err = RuntimeCli::new("runj", "/nonexistent/runj")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("runj binary \"/nonexistent/runj\" not found"),
            "{err}"
        );
    }
}
