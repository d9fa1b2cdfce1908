//! The SDK's error type and how it maps onto ttrpc status codes containerd understands.

use std::io;

use ttrpc::Code;

/// What went wrong, in terms containerd's `errdefs` can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The task, process or object is gone: containerd forgets it (`errdefs.NotFound`).
    #[error("{0}: not found")]
    NotFound(String),
    /// A second create of one id.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The request itself is wrong (a malformed spec, an unknown option): retrying is futile.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request is fine but the state is not (start twice, a missing binary).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The backend does not implement this operation; answered as ttrpc `Unimplemented`.
    #[error("{0} is not implemented by this shim")]
    Unimplemented(String),
    /// The runtime (runc, wasmtime, runj, ...) failed; the message carries its own words.
    #[error("{0}")]
    Runtime(String),
    /// What another ttrpc server answered (containerd, or another shim), with its code.
    #[error("{message}")]
    Remote {
        /// The status code the peer answered.
        code: Code,
        /// Which call, and the peer's message.
        message: String,
    },
    /// A call to another ttrpc server got no answer in time; answered as `DeadlineExceeded`.
    #[error("{0}: deadline exceeded")]
    DeadlineExceeded(String),
    /// The connection to another ttrpc server is closed or broken, so the call could not be
    /// made or answered; answered as `Unavailable`.
    #[error("{0}")]
    Unavailable(String),
    /// A system call through std failed.
    #[error("{context}: {source}")]
    Io {
        /// What the shim was doing.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A system call through nix failed.
    #[error("{context}: {source}")]
    Sys {
        /// What the shim was doing.
        context: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A protobuf message did not encode or decode.
    #[error("{context}: {source}")]
    Protobuf {
        /// What the shim was doing.
        context: String,
        /// The cause.
        #[source]
        source: protobuf::Error,
    },
    /// ttrpc's wire layer failed.
    #[error("{context}: {source}")]
    Ttrpc {
        /// What the shim was doing.
        context: String,
        /// The cause.
        #[source]
        source: ttrpc::Error,
    },
}

/// The SDK's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to foreign errors: `file.read(..).context("read config.json")?`.
pub trait Context<T> {
    /// Wraps the error with what the shim was doing.
    fn context(self, context: impl Into<String>) -> Result<T>;
    /// [`context`](Context::context), the text made only on failure.
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

macro_rules! context_for {
    ($ty:ty, $variant:ident) => {
        impl<T> Context<T> for std::result::Result<T, $ty> {
            fn context(self, context: impl Into<String>) -> Result<T> {
                self.map_err(|source| Error::$variant {
                    context: context.into(),
                    source,
                })
            }
            fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
                self.map_err(|source| Error::$variant {
                    context: f(),
                    source,
                })
            }
        }
    };
}

context_for!(io::Error, Io);
context_for!(nix::Error, Sys);
context_for!(protobuf::Error, Protobuf);
context_for!(ttrpc::Error, Ttrpc);

impl Error {
    /// The ttrpc status code containerd maps back onto its `errdefs` kinds. Only the SDK's
    /// own verdicts are `NotFound`: a file missing on the way (a runtime binary removed,
    /// a state dir gone) is the shim's failure, not word that the task is gone — containerd
    /// would take it as that and forget the task.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Remote { code, .. } => *code,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Unavailable(_) => Code::UNAVAILABLE,
            _ => Code::UNKNOWN,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
