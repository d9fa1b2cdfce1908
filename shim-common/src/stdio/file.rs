//! `file:///path`: stdout and stderr appended to one file on the host.
//!
//! The process still writes to pipes and the shim appends what arrives, as containerd's Go
//! shim does: `io_uid`/`io_gid` then apply to the pipes, never to a file the operator owns,
//! and a full disk loses log lines instead of failing the container's writes.
//!
//! Unlike the Go shim, the file's directory is not created: a typo in a log path is an
//! error at `Create`, not a new directory tree.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::pump::{self, Sink};
use super::{output_pipe, ChildStdio, Drain, IoOwner, StdioPaths};
use crate::error::{Context, Result};

/// Opens (creating, mode 0644) the log file for appending and copies each output stream
/// containerd asked for into it, under `drain`.
pub(super) fn open_outputs(
    path: &Path,
    paths: &StdioPaths,
    owner: IoOwner,
    drain: &Drain,
    child: &mut ChildStdio,
) -> Result<()> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .with_context(|| {
            format!(
                "open log file {} (its directory must already exist)",
                path.display()
            )
        })?;
    let streams = [
        (!paths.stdout.is_empty(), &mut child.stdout),
        (!paths.stderr.is_empty(), &mut child.stderr),
    ];
    for (wanted, slot) in streams {
        if !wanted {
            continue;
        }
        // Each stream gets its own fd on the same open file: O_APPEND keeps every write whole.
        let sink: File = file.try_clone().context("duplicate log file fd")?;
        let (r, w) = output_pipe(owner)?;
        *slot = Some(w.into());
        pump::copy(r, Sink::File(sink), Some(drain.copying()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{IoContext, ProcessIo};
    use super::*;
    use std::process::Command;

    fn paths(uri: &str) -> StdioPaths {
        StdioPaths {
            stdout: uri.into(),
            stderr: uri.into(),
            ..Default::default()
        }
    }

    #[test]
    fn stdout_and_stderr_are_appended_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        std::fs::write(&log, "before\n").unwrap();
        let uri = format!("file://{}", log.display());
        let (io, child) =
            ProcessIo::open(&paths(&uri), IoOwner::default(), IoContext::default()).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2"]);
        child.apply(&mut cmd);
        let status = cmd.spawn().unwrap().wait().unwrap();
        drop(cmd);
        assert!(status.success());
        assert!(
            io.drain().wait(std::time::Duration::from_secs(10)),
            "copies never caught up"
        );
        drop(io);
        let text = std::fs::read_to_string(&log).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(lines[0], "before", "{lines:?}");
        lines.sort();
        assert_eq!(lines, ["before", "err", "out"]);
    }

    #[test]
    fn missing_directory_is_an_error_and_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nope").join("c.log");
        let uri = format!("file://{}", log.display());
        let e = ProcessIo::open(&paths(&uri), IoOwner::default(), IoContext::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("directory must already exist"), "{e}");
        assert!(e.contains(&log.display().to_string()), "{e}");
        assert!(!dir.path().join("nope").exists());
    }

    #[test]
    fn new_file_is_created_with_mode_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("new.log");
        let uri = format!("file://{}", log.display());
        let _ = ProcessIo::open(&paths(&uri), IoOwner::default(), IoContext::default()).unwrap();
        let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o022, 0o644 & !0o022, "mode {mode:o}");
    }
}
