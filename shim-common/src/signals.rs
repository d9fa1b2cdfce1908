//! The daemon's signal handling: one thread waits for `SIGCHLD`, `SIGTERM` and `SIGINT`.
//!
//! The signals are blocked in every thread (the mask is inherited from the thread that calls
//! [`block`] before any other thread exists), so only this thread ever sees them; children
//! start with an empty mask because `std::process::Command` resets it.

use nix::sys::signal::{SigSet, Signal};

use crate::error::{Context, Result};
use crate::reaper;

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Blocks the handled signals in the calling thread. Call before spawning any thread.
pub fn block() -> Result<()> {
    handled().thread_block().context("block signals")
}

/// Spawns the signal thread: reaps on `SIGCHLD`, calls `on_term` once on `SIGTERM`/`SIGINT`.
pub fn spawn(on_term: impl Fn() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let set = handled();
            loop {
                match set.wait() {
                    Ok(Signal::SIGCHLD) => reaper::reap(),
                    Ok(_) => on_term(),
                    Err(_) => continue,
                }
            }
        })
        .context("spawn signal thread")?;
    Ok(())
}
