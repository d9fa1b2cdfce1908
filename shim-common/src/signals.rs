//! The daemon's signal handling: one thread waits for `SIGCHLD`, `SIGTERM`, `SIGINT` and
//! `SIGUSR1` (an operator asking what the shim is doing).
//!
//! The signals are blocked in every thread (the mask is inherited from the thread that calls
//! [`block`] before any other thread exists), so only this thread ever sees them. A blocked
//! mask — and Rust's ignored `SIGPIPE` — survive `exec`, so everything the shim spawns goes
//! through [`reset_in_child`], or a container would ignore `SIGTERM`.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, Signal};

use crate::error::{Context, Result};
use crate::reaper;

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGUSR1);
    set
}

/// Blocks the handled signals in the calling thread. Call before spawning any thread.
pub fn block() -> Result<()> {
    handled().thread_block().context("block signals")
}

/// Spawns the signal thread: reaps on `SIGCHLD`, calls `on_term` on `SIGTERM`/`SIGINT`,
/// and `on_report` on `SIGUSR1` on a thread of its own (a report that waits for a lock
/// must not hold up reaping).
pub fn spawn(
    on_term: impl Fn() + Send + 'static,
    on_report: impl Fn() + Send + Sync + 'static,
) -> Result<()> {
    let on_report = std::sync::Arc::new(on_report);
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let set = handled();
            loop {
                match set.wait() {
                    Ok(Signal::SIGCHLD) => reaper::reap(),
                    Ok(Signal::SIGUSR1) => {
                        let report = on_report.clone();
                        let spawned = std::thread::Builder::new()
                            .name("report".into())
                            .stack_size(256 * 1024)
                            .spawn(move || report());
                        if let Err(e) = spawned {
                            log::warn!("SIGUSR1: spawn the report: {e}");
                        }
                    }
                    Ok(_) => on_term(),
                    Err(_) => continue,
                }
            }
        })
        .context("spawn signal thread")?;
    Ok(())
}

/// Makes `cmd` start with the signal state of a fresh process: nothing blocked, `SIGPIPE`
/// at its default. [`crate::reaper::spawn`] applies it to every process the shim starts.
pub fn reset_in_child(cmd: &mut Command) {
    // SAFETY: sigemptyset, sigprocmask and signal are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn children_start_with_nothing_blocked_and_sigpipe_default() {
        handled().thread_block().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status"])
            .stdout(Stdio::piped());
        reset_in_child(&mut cmd);
        let out = cmd.output().unwrap();
        handled().thread_unblock().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mask = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(mask("SigBlk:"), 0, "{text}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
    }
}
