//! ttrpc on our own threads.
//!
//! The `ttrpc` crate gives us the wire types only; its sync server, client and generated
//! handler glue are not used (that transport does not build on FreeBSD either). They start several threads per connection (reader,
//! writer, control, a worker pool), and containerd opens one connection per task: a pod of
//! five containers cost a shim ~60 threads. Here one poll loop reads every connection, one
//! shared pool runs handlers, and responses are written by the worker that made them. The
//! transport is any byte-stream fd — a unix socket from `start`, or a guest agent's port.
//! The [`Client`] shares one connection among every thread that calls through it (one
//! reader thread routes the answers), so a VM's host can keep `Wait`s open to its guest
//! agent while other calls go on over the same serial port.

mod client;
mod frame;
mod pool;
mod server;

pub use client::Client;
pub use server::{decode, unary, Handler, Idle, Methods, Reply, Server};
