//! containerd's runc shim on the shim SDK, as a library: the backend that
//! `containerd-shim-runc-v2` serves, and that the micro-VM guest agent serves inside its VM.

mod backend;
mod options;
mod runc;

pub use backend::RuncBackend;
