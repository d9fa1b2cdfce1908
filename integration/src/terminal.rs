//! `ctr` on a pty the test holds: it types and reads like a user at a terminal.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checks::wait_until;
use crate::containerd::CTR_BINARY;
use crate::Containerd;

/// `ctr <args>` on a fresh pty of `rows`×`cols`; returns the child, the master for typing,
/// and everything ctr's terminal showed so far.
pub struct Terminal {
    child: Child,
    master: File,
    screen: Arc<Mutex<String>>,
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
        let screen = Arc::new(Mutex::new(String::new()));
        let (mut reader, sink) = (master.try_clone().unwrap(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
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
        self.screen.lock().unwrap().clone()
    }

    /// Waits (bounded) until the screen shows `text`.
    pub fn wait_for(&self, text: &str) -> bool {
        wait_until(Duration::from_secs(20), || self.screen().contains(text))
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
