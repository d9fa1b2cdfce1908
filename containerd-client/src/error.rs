//! What a call to containerd can end in.

use tonic::{Code, Status};

/// A failed call, with what it was about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the caller passed cannot be sent: an empty address, a namespace or lease that is
    /// no gRPC metadata value, a malformed key.
    #[error("{0}")]
    InvalidArgument(String),
    /// containerd's socket could not be connected.
    #[error("connect to containerd at {address}: {reason}")]
    Connect {
        /// The socket's path.
        address: String,
        /// The transport's error and its causes, on one line.
        reason: String,
    },
    /// containerd answered the call about `what` with an error status (or gave no answer in
    /// time: `DeadlineExceeded`).
    #[error("{what}: containerd answered {code:?}: {message}")]
    Status {
        /// Which object the call was about (`container c1`, `image x: blob sha256:…`).
        what: String,
        /// The gRPC status code.
        code: Code,
        /// containerd's message.
        message: String,
    },
    /// What the content store holds is not what it should be: not JSON, over a size limit,
    /// fewer bytes than its descriptor says, a manifest without a config.
    #[error("{0}")]
    Content(String),
    /// The client's runtime could not be created.
    #[error("create the runtime of the containerd gRPC client: {0}")]
    Runtime(#[source] std::io::Error),
}

impl Error {
    /// containerd's answer `status` to the call about `what`.
    pub fn status(what: impl Into<String>, status: Status) -> Error {
        Error::Status {
            what: what.into(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// The gRPC code this error stands for: containerd's own, or the nearest one.
    pub fn code(&self) -> Code {
        match self {
            Error::Status { code, .. } => *code,
            Error::InvalidArgument(_) | Error::Content(_) => Code::InvalidArgument,
            Error::Connect { .. } => Code::Unavailable,
            Error::Runtime(_) => Code::Internal,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_keeps_its_code_and_says_what_it_was_about() {
        let e = Error::status("container c1", Status::not_found("no such container"));
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(
            e.to_string(),
            "container c1: containerd answered NotFound: no such container"
        );
        assert_eq!(Error::Content("x".into()).code(), Code::InvalidArgument);
    }
}
