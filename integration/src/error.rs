//! The harness's error type.
//!
//! Every variant carries enough context (which file, which command, the tail of
//! containerd's log) that a failing test explains itself without a rerun.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors returned by the harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed; `context` says what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// Building a JSON document for the image failed.
    #[error("serializing {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// A required external program is missing.
    #[error("required program {path} not found ({why})")]
    MissingProgram { path: PathBuf, why: &'static str },

    /// containerd exited before it answered.
    #[error("containerd exited during startup ({status}); config {config}; log tail:\n{log_tail}")]
    ContainerdExited {
        status: String,
        config: PathBuf,
        log_tail: String,
    },

    /// containerd did not answer within the startup timeout.
    #[error(
        "containerd did not answer on {address} within {timeout:?}; config {config}; log tail:\n{log_tail}"
    )]
    StartTimeout {
        address: PathBuf,
        timeout: Duration,
        config: PathBuf,
        log_tail: String,
    },

    /// A `ctr` command failed.
    #[error(
        "`ctr {args}` exited with {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )]
    Ctr {
        args: String,
        status: i32,
        stdout: String,
        stderr: String,
    },

    /// A `/proc` file did not have the expected content.
    #[error("unexpected content in {path}: {what}")]
    Proc { path: PathBuf, what: String },

    /// The runtime name does not follow containerd's `io.containerd.<name>.<version>` scheme.
    #[error("runtime name {0:?} is not of the form io.containerd.<name>.<version>")]
    BadRuntimeName(String),
}

impl Error {
    /// Wraps an [`io::Error`] with a description of the failed operation.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to `io::Result`s, so call sites stay one line.
pub(crate) trait IoContext<T> {
    /// Attaches `what` (evaluated lazily) to the error.
    fn ctx<F: FnOnce() -> String>(self, what: F) -> Result<T, Error>;

    /// Shorthand for "`verb` `path`".
    fn ctx_path(self, verb: &str, path: &Path) -> Result<T, Error>
    where
        Self: Sized,
    {
        self.ctx(|| format!("{verb} {}", path.display()))
    }
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, what: F) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}
