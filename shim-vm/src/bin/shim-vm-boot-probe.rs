//! A stand-in guest PID 1 for `tests/boot.rs` (a binary, not an example, so that cargo
//! builds it for the test whichever targets were asked for): runs `boot::setup`, opens the
//! `agent` port, says it is ready, reports what it found (one JSON line each), then answers
//! `echo TEXT`, `cat PATH` and `poweroff`, one line each, until the host disconnects.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::time::Duration;

use shim_vm::boot;

fn main() {
    if let Err(e) = run() {
        eprintln!("shim-vm-boot-probe: {e}");
    }
    let _ = boot::poweroff();
}

fn run() -> shim_common::Result<()> {
    let booted = boot::setup()?;
    let port = File::from(boot::port("agent", Duration::from_secs(30))?);
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| format!("error: {e}"));
    let io = |e: std::io::Error| shim_common::Error::Runtime(e.to_string());
    let mut out = port.try_clone().map_err(io)?;
    // First what an agent would do: say it is up (blocks until the host connects).
    let uptime = read("/proc/uptime")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    writeln!(out, "{}", serde_json::json!({ "ready": uptime })).map_err(io)?;
    let crun = Command::new("/usr/bin/crun")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| format!("error: {e}"));
    // Not in the image: the host's, through the share (as `GuestRuntime = "runc"` has it).
    let runc = Command::new(shim_vm::share::guest_runtime("runc"))
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| format!("error: {e}"));
    let mountinfo = read("/proc/self/mountinfo");
    let facts = serde_json::json!({
        "filesystems": read("/proc/filesystems")
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .collect::<Vec<_>>(),
        "vsock": std::path::Path::new("/dev/vsock").exists(),
        "share": booted.share,
        "virtiofs_mounted": mountinfo.lines().any(|l| l.contains(" - virtiofs ")),
        "cgroup2_mounted": mountinfo.lines().any(|l| l.contains(" - cgroup2 ")),
        "ptmx": std::fs::read_link("/dev/ptmx").map(|p| p.display().to_string()).unwrap_or_default(),
        "shared_file": read("/run/shared/hello.txt"),
        "crun": crun,
        "runc": runc,
    });
    let mut out = port
        .try_clone()
        .map_err(|e| shim_common::Error::Runtime(e.to_string()))?;
    // Blocks until the host connects to the port's socket.
    writeln!(out, "{facts}").map_err(|e| shim_common::Error::Runtime(e.to_string()))?;
    for line in BufReader::new(port).lines() {
        let Ok(line) = line else { break };
        let reply = match line.split_once(' ') {
            Some(("echo", text)) => text.to_string(),
            Some(("cat", path)) => read(path).trim_end().to_string(),
            _ if line == "poweroff" => break,
            _ => format!("unknown: {line}"),
        };
        writeln!(out, "{reply}").map_err(io)?;
    }
    Ok(())
}
