//! A stand-in for `runc` that delays or records chosen subcommands, then runs the real one.
//! Used as `binary_name` (`ctr run --runc-binary`) to make shim races deterministic, in the
//! spirit of containerd's own regression tests for its runc shim.
//!
//! It reads `runc-wrapper.conf` next to its own path (argv[0]), one rule per line:
//! `delay <subcommand> <before-ms> <after-ms>` — sleep around the real command;
//! `fake <subcommand> <exit-code>` — do not run the real command, exit with the code;
//! `hold <subcommand>` — once the real command is done, create `held-<subcommand>` beside it
//! and wait until the test creates `release-<subcommand>` (a runtime as slow as the test
//! wants, with no clock involved);
//! `real <path>` — the real runtime (default `/usr/sbin/runc`).
//! Every invocation's arguments are appended to `runc-calls.log` beside it.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// runc's global flags that take a value, so the subcommand can be found after them.
const VALUED: &[&str] = &["--root", "--log", "--log-format", "--criu"];

fn subcommand(args: &[String]) -> Option<&str> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if VALUED.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(a);
        }
    }
    None
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&argv[0])
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let args = &argv[1..];
    let sub = subcommand(args).unwrap_or("").to_string();
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("runc-calls.log"))
    {
        let _ = writeln!(log, "{}", args.join(" "));
    }
    let conf = std::fs::read_to_string(dir.join("runc-wrapper.conf")).unwrap_or_default();
    let mut real = "/usr/sbin/runc".to_string();
    let (mut before, mut after) = (0u64, 0u64);
    let mut hold = false;
    for line in conf.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["real", path] => real = path.to_string(),
            ["delay", s, b, a] if *s == sub => {
                before = b.parse().unwrap_or(0);
                after = a.parse().unwrap_or(0);
            }
            ["fake", s, code] if *s == sub => std::process::exit(code.parse().unwrap_or(0)),
            ["hold", s] if *s == sub => hold = true,
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_millis(before));
    let status = Command::new(&real).args(args).status();
    std::thread::sleep(Duration::from_millis(after));
    if hold {
        let _ = std::fs::write(dir.join(format!("held-{sub}")), "");
        let release = dir.join(format!("release-{sub}"));
        while !release.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let code = match status {
        Ok(s) => s.code().unwrap_or(128),
        Err(e) => {
            eprintln!("runc-wrapper: cannot run {real}: {e}");
            127
        }
    };
    std::process::exit(code)
}
