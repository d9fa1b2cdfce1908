//! `ctr` on a pty the test holds: it types and reads like a user at a terminal.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::checks::wait_until;
use crate::containerd::CTR_BINARY;
use crate::Containerd;

/// `ctr <args>` on a fresh pty of `rows`×`cols`; returns the child, the master for typing,
/// and everything ctr's terminal showed so far.
pub struct Terminal {
    child: Child,
    master: File,
    screen: Arc<Screen>,
}

/// What ctr's terminal showed, and a wake-up each time it shows more.
#[derive(Default)]
struct Screen {
    text: Mutex<String>,
    grew: Condvar,
}

impl Screen {
    /// Waits until `done` holds for the text, at most `timeout`.
    fn wait(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut text = self.text.lock().unwrap();
        while !done(&text) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            text = self.grew.wait_timeout(text, left).unwrap().0;
        }
        true
    }
}

impl Terminal {
    /// Starts `ctr <args>` on a `rows`×`cols` pty.
    pub fn run(c: &Containerd, args: &[&str], rows: u16, cols: u16) -> Terminal {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let mut cmd = Command::new(CTR_BINARY);
        cmd.arg("--address")
            .arg(c.address())
            .args(["--namespace", c.namespace()])
            .args(args)
            .env("CONTAINERD_SNAPSHOTTER", c.snapshotter())
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        let child = cmd.spawn().expect("spawn ctr");
        let master = File::from(pty.master);
        let screen = Arc::new(Screen::default());
        let (mut reader, sink) = (master.try_clone().unwrap(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.text
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                sink.grew.notify_all();
            }
        });
        Terminal {
            child,
            master,
            screen,
        }
    }

    /// Everything the terminal showed so far.
    pub fn screen(&self) -> String {
        self.screen.text.lock().unwrap().clone()
    }

    /// Waits (bounded) until the screen shows `text`.
    pub fn wait_for(&self, text: &str) -> bool {
        self.screen
            .wait(Duration::from_secs(20), |screen| screen.contains(text))
    }

    /// Types `key` (a printable character, echoed by the program's line editing or the
    /// terminal) and returns how long until the screen showed it: a keystroke's round trip
    /// through ctr, containerd and the shim. `None` when no echo came within 20 s.
    pub fn echo_round_trip(&mut self, key: char) -> Option<Duration> {
        let shown = self.screen.text.lock().unwrap().len();
        let t = Instant::now();
        self.master
            .write_all(key.encode_utf8(&mut [0; 4]).as_bytes())
            .unwrap();
        self.screen
            .wait(Duration::from_secs(20), |screen| {
                screen.get(shown..).is_some_and(|new| new.contains(key))
            })
            .then(|| t.elapsed())
    }

    /// Types `line` and Enter.
    pub fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    /// ctr's exit code, once it exits (bounded wait).
    pub fn exit_code(&mut self) -> Option<i32> {
        let mut code = None;
        wait_until(Duration::from_secs(20), || match self.child.try_wait() {
            Ok(Some(s)) => {
                code = s.code();
                true
            }
            _ => false,
        });
        code
    }
}
