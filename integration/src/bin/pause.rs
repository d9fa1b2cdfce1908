//! `pause`: the sandbox ("infra") container of a CRI pod, built here so the tests need no
//! registry.
//!
//! It holds the pod's namespaces open and does nothing else: it waits until SIGINT or
//! SIGTERM and exits 0, and, when the pod shares one PID namespace, it is that namespace's
//! init and reaps every orphan that gets reparented to it.
//!
//! The signals are *blocked* and taken with `sigwait` rather than caught by handlers: as
//! PID 1 of a namespace, a signal whose disposition is the default is dropped by the kernel,
//! but a blocked one is always queued, so SIGTERM from the host (runc kill) and from inside
//! the pod both arrive. Nothing allocates after start-up, so the process stays a few pages.

use std::process::ExitCode;

fn main() -> ExitCode {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for all calls; signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            eprintln!("pause: sigprocmask: {}", std::io::Error::last_os_error());
            return ExitCode::FAILURE;
        }
    }
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised above and `sig` is a valid out pointer.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            continue; // EINTR-like spurious return: wait again
        }
        match sig {
            libc::SIGINT | libc::SIGTERM => return ExitCode::SUCCESS,
            _ => reap(),
        }
    }
}

/// Collects every exited child: one SIGCHLD may stand for many exits.
fn reap() {
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid(2) with a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}
