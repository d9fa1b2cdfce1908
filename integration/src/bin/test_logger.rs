//! `test-logger`: a logging binary for containerd's `binary://` and `binary-v2://` log URIs,
//! for the end-to-end tests (`tests/stdio.rs`).
//!
//! It implements the contract a shim offers a logger: fd 3 is the container's stdout, fd 4
//! its stderr, fd 5 the "ready" pipe; `CONTAINER_ID` and `CONTAINER_NAMESPACE` are in the
//! environment; argv is the URI query as `key value` pairs. Everything it learns goes, one
//! line per fact, to the file named by `out`, so a test can check what the shim did:
//!
//! ```text
//! pid:1234
//! env:CONTAINER_ID=<id>
//! env:CONTAINER_NAMESPACE=<ns>
//! argv:out /tmp/x/log.txt
//! stdout:<each line of fd 3>
//! stderr:<each line of fd 4>
//! signal:TERM
//! ```
//!
//! Query keys: `out=<file>` (required); `v2=1` signals ready with one byte on fd 5 instead
//! of closing it; `exit=now` exits with status 3 before it is ready, `exit=after-ready`
//! with status 4 just after; `raw=1` copies fd 3 and fd 4 byte for byte into `<out>.stdout`
//! and `<out>.stderr` instead of as lines (for output that is not text, and for counting
//! bytes: `tests/output.rs`), and records `eof:stdout <bytes>` when a stream ends. It runs
//! until `SIGTERM`, then finishes copying what the pipes still hold and exits 0; with
//! `raw=1` it waits for both streams' EOF however long that takes, so a test that counts
//! bytes never races the logger's own deadline.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Without a `SIGTERM` (a shim that died), give up after this long instead of lingering.
const MAX_LIFE: Duration = Duration::from_secs(300);
/// How long, after `SIGTERM`, to finish copying what is still in the pipes.
const FLUSH: Duration = Duration::from_secs(2);

fn main() {
    if let Err(e) = run() {
        eprintln!("test-logger: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let opts: HashMap<&str, &str> = argv
        .chunks(2)
        .map(|kv| (kv[0].as_str(), kv.get(1).map_or("", String::as_str)))
        .collect();
    let out_path = opts.get("out").ok_or("no `out` in the query")?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(out_path)
        .map_err(|e| format!("open {out_path}: {e}"))?;
    let out = Arc::new(Mutex::new(out));
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    record(&out, &format!("pid:{}", std::process::id()));
    record(&out, &format!("env:CONTAINER_ID={}", env("CONTAINER_ID")));
    record(
        &out,
        &format!("env:CONTAINER_NAMESPACE={}", env("CONTAINER_NAMESPACE")),
    );
    record(&out, &format!("argv:{}", argv.join(" ")));

    // Blocked before any thread exists, so only `sigtimedwait` below ever sees SIGTERM.
    let term = sigset(libc::SIGTERM);
    // SAFETY: a valid, initialised signal set; no old mask wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &term, std::ptr::null_mut()) };

    if opts.get("exit") == Some(&"now") {
        record(&out, "exit:now");
        std::process::exit(3);
    }
    let stdout = take_fd(3)?;
    let stderr = take_fd(4)?;
    let ready = take_fd(5)?;
    let mut ready = File::from(ready);
    if opts.contains_key("v2") {
        ready
            .write_all(b"R")
            .map_err(|e| format!("write the ready byte: {e}"))?;
    }
    drop(ready);
    if opts.get("exit") == Some(&"after-ready") {
        record(&out, "exit:after-ready");
        std::process::exit(4);
    }

    let raw = opts.contains_key("raw");
    let (done_tx, done_rx) = mpsc::channel();
    for (fd, prefix) in [(stdout, "stdout"), (stderr, "stderr")] {
        let (out, done) = (out.clone(), done_tx.clone());
        let raw_path = format!("{out_path}.{prefix}");
        std::thread::spawn(move || {
            if raw {
                let n = copy_raw(File::from(fd), &raw_path);
                record(&out, &format!("eof:{prefix} {n}"));
            } else {
                for line in BufReader::new(File::from(fd)).lines() {
                    let Ok(line) = line else { break };
                    record(&out, &format!("{prefix}:{line}"));
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);

    let timeout = libc::timespec {
        tv_sec: MAX_LIFE.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: valid pointers to a signal set and a timespec; no siginfo wanted.
    let sig = unsafe { libc::sigtimedwait(&term, std::ptr::null_mut(), &timeout) };
    if sig == libc::SIGTERM {
        // Whatever the container wrote before it exited is still in the pipes.
        let deadline = Instant::now() + if raw { MAX_LIFE } else { FLUSH };
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        record(&out, "signal:TERM");
    }
    Ok(())
}

/// Appends one line; each line is one `write`, so the two streams never split a line.
fn record(out: &Mutex<File>, line: &str) {
    let mut f = out.lock().unwrap_or_else(|e| e.into_inner());
    let _ = f.write_all(format!("{line}\n").as_bytes());
}

/// Copies `src` to a new file at `path` until EOF; the number of bytes copied.
fn copy_raw(mut src: File, path: &str) -> u64 {
    File::create(path)
        .and_then(|mut dst| std::io::copy(&mut src, &mut dst))
        .unwrap_or(0)
}

/// Takes ownership of an inherited fd, after checking the shim really passed it.
fn take_fd(fd: i32) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("fd {fd} is not open: not started by a shim?"));
    }
    // SAFETY: the fd is open, and inherited fds 3-5 belong to nobody else in this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sigset(sig: i32) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        set
    }
}
