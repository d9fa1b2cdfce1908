//! The shim SDK: everything a containerd shim does that is not running containers.
//!
//! A runtime implements [`Backend`] (create, start, exec, kill, delete, pids — the rest is
//! optional) and calls [`run`] from `main`. The SDK provides the binary contract containerd
//! relies on (`start` as containerd 1.6 through 2.3 drive it, up to 2.x's bootstrap protocol;
//! `delete`; the daemon; `-v`; `-info`), socket naming and per-pod grouping, the
//! ttrpc task service with containerd's state machine and event order, event forwarding,
//! subreaping, stdio plumbing and the shim log.
//!
//! ```no_run
//! use shim_common::{Backend, Created, CreateRequest, ExecRequest, Result, ShimContext, Signal, Target};
//! # use std::path::Path;
//! struct Mine;
//! impl Backend for Mine {
//!     type Container = ();
//!     type Options = ();
//!     fn new(_: &ShimContext) -> Result<Self> { Ok(Mine) }
//!     fn create(&self, req: CreateRequest<'_, ()>) -> Result<Created<()>> { todo!("make it") }
//!     fn start(&self, c: &()) -> Result<u32> { todo!() }
//!     fn exec(&self, c: &(), req: ExecRequest<'_>) -> Result<u32> { todo!() }
//!     fn kill(&self, c: &(), t: Target<'_>, sig: Signal, all: bool) -> Result<()> { todo!() }
//!     fn delete(&self, c: &()) -> Result<()> { todo!() }
//!     fn pids(&self, c: &()) -> Result<Vec<u32>> { todo!() }
//!     fn cleanup(_: &ShimContext, _: &str, _: &Path, _: &()) -> Result<()> { Ok(()) }
//! }
//! fn main() { shim_common::run::<Mine>("containerd-shim-mine-v2") }
//! ```
//!
//! A complete one, which runs a bundle's process as a plain child, is
//! `shim-common/examples/skeleton.rs`.
//!
//! Processes that are not host children (a micro-VM's, a remote runtime's) plug in through
//! three seams: the backend reports their exits through [`ShimContext::exits`]
//! ([`Backend::HOST_PROCESSES`] `= false`), carries their stdio itself
//! ([`Backend::HOST_STDIO`] `= false`, [`stdio::CarriedStdio`]), and the task service can be
//! served on any connected byte stream with [`serve_on`] (or on each of a succession of
//! them, [`serve_each`], so that a peer can reconnect) — a guest agent's port, with the
//! reaper it installed itself ([`reaper::install`], [`reaper::Exits`]) and its events
//! fetched by the host over that same stream ([`peer_events::PeerEvents`]).

#![deny(missing_docs)]

pub mod backend;
mod bootstrap;
pub mod bundle;
#[cfg(target_os = "linux")]
pub mod cgroups;
pub mod console;
pub mod error;
pub mod events;
pub mod executable;
mod flags;
#[cfg(target_os = "linux")]
pub mod host_pods;
pub mod logger;
pub mod mount;
pub mod options;
pub mod peer_events;
#[cfg(target_os = "linux")]
pub mod pidfd;
pub mod pod;
pub mod reaper;
pub mod rpc;
pub mod runtime_cli;
pub mod sandbox;
pub mod service;
pub mod signals;
mod socket;
mod start;
pub mod stdio;
pub mod trace;

mod os;
mod serve;

/// Scheduling and pipe tuning for code that runs beside the SDK (a VM's agent).
pub use os::{batch_this_thread, set_pipe_size};

/// What every backend uses: `use shim_common::prelude::*;`.
pub mod prelude {
    pub use crate::backend::{
        Backend, CreateRequest, Created, ExecRequest, ShimContext, Signal, Target,
    };
    pub use crate::error::{Context, Error, Result};
    pub use crate::options::RuntimeOptions;
}

pub use backend::{Backend, CreateRequest, Created, ExecRequest, ShimContext, Signal, Target};
pub use error::{Context, Error, Result};
pub use options::RuntimeOptions;
pub use protocol;
pub use serve::{serve_each, serve_on};
pub use service::TaskService;

use std::io::{Read, Write};
use std::path::Path;

use protobuf::Message;

use flags::{Action, Flags};

/// The shim binary's `main`: parses containerd's command line and runs the action.
/// Never returns; exits 0 on success and 1 with the error on stderr otherwise (containerd
/// shows that text to the user).
pub fn run<B: Backend>(name: &str) -> ! {
    let code = match dispatch::<B>(name) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{name}: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn dispatch<B: Backend>(name: &str) -> Result<()> {
    let (flags, action) = Flags::parse(std::env::args_os().skip(1))?;
    match action {
        Action::Version => {
            println!(
                "{name}:\n  Version: {}\n  Revision: {}",
                env!("CARGO_PKG_VERSION"),
                option_env!("SHIM_GIT_REVISION").unwrap_or("unknown")
            );
            Ok(())
        }
        Action::Start => {
            let answer = start::start::<B::Options>(&flags, B::shim_cgroup)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&answer).context("write start answer")?;
            out.flush().context("write start answer")
        }
        Action::Info => {
            let mut input = Vec::new();
            std::io::stdin()
                .take(bootstrap::STDIN_LIMIT)
                .read_to_end(&mut input)
                .context("read runtime options")?;
            let features = |any: Option<&_>| B::features(&options::decode(any)?);
            let info = bootstrap::info(name, &input, features)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&info).context("write runtime info")?;
            out.flush().context("write runtime info")
        }
        Action::Delete => {
            let bytes = delete::<B>(&flags)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes).context("write delete response")?;
            out.flush().context("write delete response")
        }
        Action::Serve => serve::serve::<B>(&flags),
    }
}

/// The `delete` action: let the backend clean up after a dead daemon and answer containerd
/// with a `DeleteResponse` (exit status 137: the task died with its shim).
fn delete<B: Backend>(flags: &Flags) -> Result<Vec<u8>> {
    let bundle = Path::new(&flags.bundle);
    let options = options::load::<B::Options>(bundle);
    let mut cleaned = B::cleanup(&serve::context(flags), &flags.id, bundle, &options);
    let address = std::fs::read_to_string(bundle.join("address")).ok();
    #[cfg(target_os = "linux")]
    if !address
        .as_deref()
        .is_some_and(|a| socket::answers(a.trim()))
    {
        // A sandbox's holder outlives a killed shim (as a pause container would).
        cleaned = cleaned.and(host_pods::cleanup(bundle));
    }
    if B::MOUNTS_ROOTFS {
        // Even if the backend failed: a leaked mount outlives everything else.
        let unmounted = mount::unmount_rootfs(&bundle.join("rootfs"));
        cleaned = cleaned.and(unmounted);
    }
    // The dead daemon's socket, unless a live shim of the same group still answers there;
    // removed even if the backend's cleanup failed, since nothing can use it any more. Under
    // the socket directory's lock: a `start` may be binding that name for a new shim.
    if let Some(address) = &address {
        let address = address.trim();
        match socket::lock_dir(address) {
            Ok(_held) => {
                if !socket::answers(address) {
                    socket::remove(address)?;
                }
            }
            // The task's cleanup is done; a socket left behind is replaced by the next start.
            Err(e) => log::warn!("leaving socket {address}: {e}"),
        }
    }
    cleaned?;
    let resp = protocol::shim::DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: protobuf::MessageField::some(events::timestamp(std::time::SystemTime::now())),
        ..Default::default()
    };
    resp.write_to_bytes().context("encode delete response")
}
