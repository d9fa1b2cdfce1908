//! The runj command line, on the SDK's [`RuntimeCli`].
//!
//! runj's contract, as its source defines it: `create <id> <bundle>` starts a
//! `runj-entrypoint` in the new jail that waits on `<state>/exec.fifo`; `start <id>` reads
//! that fifo so the entrypoint execs the process; `state <id>` prints the OCI state JSON
//! (`created`, `running`, `stopped`); `kill [--all] <id> <signal>` refuses a container that
//! is not running; `delete <id>` refuses a running jail; `extension exec -p <process.json>
//! <id>` does not detach — runj itself becomes the new process, so its pid is the exec's.
//! runj has no log file: its errors are on the stderr it hands to the jail.

use std::path::Path;

use shim_common::runtime_cli::RuntimeCli;
use shim_common::stdio::ChildStdio;
use shim_common::{Context, Error, Result};

/// Finds `name` on `PATH` (or at its path) now, so a missing runj is a clear error before
/// anything is mounted.
pub fn resolve(name: &str) -> Result<RuntimeCli> {
    RuntimeCli::new("runj", name).map_err(|e| match e {
        Error::FailedPrecondition(m) => Error::FailedPrecondition(format!(
            "{m}: install runj (pkg install runj, or go install go.sbk.wtf/runj/cmd/runj) \
             where containerd's PATH finds it, or set BinaryName in the runtime options"
        )),
        e => e,
    })
}

/// `runj delete`; a container runj does not know is already deleted.
pub fn delete(runj: &RuntimeCli, id: &str) -> Result<()> {
    match runj.delete(id, false)? {
        Err(r) if !r.says(&["invalid jail id"]) => Err(r.into()),
        _ => Ok(()),
    }
}

/// Spawns `runj extension exec`, which becomes the process: its pid is the exec's, and its
/// exit (through the reaper) is the exec's exit status. runj's own refusal (a jail that
/// stopped meanwhile) therefore arrives as that process's exit and stderr.
pub fn exec(
    runj: &RuntimeCli,
    id: &str,
    process_json: &Path,
    console_socket: Option<&Path>,
    stdio: ChildStdio,
) -> Result<u32> {
    let mut cmd = runj.command();
    cmd.args(["extension", "exec"]);
    if let Some(sock) = console_socket {
        cmd.arg("--console-socket").arg(sock);
    }
    cmd.arg("-p").arg(process_json).arg(id);
    stdio.apply(&mut cmd);
    // runj becomes the process. The reaper owns waitpid: the Child is dropped unwaited.
    let child = shim_common::reaper::spawn(&mut cmd)
        .with_context(|| format!("run {}", runj.binary().display()))?;
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_runj_is_a_clear_error() {
        let Err(err) = super::resolve("/nonexistent/runj") else {
            panic!("a missing runj must be an error");
        };
        let err = err.to_string();
        assert!(err.contains("\"/nonexistent/runj\" not found"), "{err}");
        assert!(err.contains("BinaryName"), "{err}");
    }
}
