//! `runj-standin`: runj's command line and state contract on Linux, for testing the jail shim
//! where FreeBSD cannot run. Tests copy it into a directory as `runj`.
//!
//! Faithful to runj (github.com/samuelkarp/runj): the state directory
//! `/var/lib/runj/jails/<id>/` with `state.json` (`ID`, `JID`, `Status`, `Bundle`, `PID`), a
//! copy of `config.json` and `exec.fifo`; `create <id> [bundle]` (`--bundle`, `--pid-file`,
//! `--console-socket`) starts an entrypoint that inherits create's stdio and blocks writing
//! the exec fifo until `start` reads it; `state` prints the OCI state (`created`, `running`,
//! `stopped`) and marks a finished container stopped; `kill [--all] <id> [signal]` refuses a
//! container that is not running; `delete` refuses a running one and forgets an unknown id
//! with "invalid jail id provided"; `extension exec -p process.json [--console-socket] <id>`
//! becomes the process (same pid). Errors are `Error: ...` on stderr with exit status 1.
//!
//! NOT isolated, unlike a jail: the process is a plain child chrooted into the bundle's root
//! (no separate process table, network, hostname, users or devfs; `freebsd.jail`, `hostname`
//! and `runj.ext.json` are read and ignored). The "jail" is the set of pids the stand-in
//! started. A file `runj-standin.fail-create` next to the binary makes `create` fail with its
//! text, after writing state, as runj does when jail creation fails.

use std::ffi::CString;
use std::fs;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::Pid;
use serde_json::{json, Value};

const STATE_ROOT: &str = "/var/lib/runj/jails";

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("create") => create(&args[1..]),
        Some("start") => start(&args[1..]),
        Some("state") => state(&args[1..]),
        Some("kill") => kill_cmd(&args[1..]),
        Some("delete") => delete(&args[1..]),
        Some("extension") | Some("ext") if args.get(1).map(String::as_str) == Some("exec") => {
            exec(&args[2..])
        }
        Some("__entrypoint") => entrypoint(&args[1..]),
        Some(other) => Err(format!("unknown command \"{other}\" for \"runj\"")),
        None => Err("usage: runj <create|start|state|kill|delete|extension exec> ...".into()),
    };
    if let Err(e) = result {
        eprintln!("Error: {e}");
        std::process::exit(1);
    }
}

/// Flags (`--name value`, `--name=value`, `-x value`) and positional arguments.
struct Args {
    flags: Vec<(String, String)>,
    positional: Vec<String>,
}

fn parse(args: &[String], valued: &[&str], boolean: &[&str]) -> Res<Args> {
    let mut a = Args {
        flags: Vec::new(),
        positional: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if !arg.starts_with('-') || a.positional.len() > 1 && !arg.starts_with("--") {
            a.positional.push(arg.clone());
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.trim_start_matches('-'), Some(v.to_string())),
            None => (arg.trim_start_matches('-'), None),
        };
        if boolean.contains(&name) {
            a.flags.push((name.into(), "true".into()));
        } else if valued.contains(&name) {
            let v = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or(format!("flag needs an argument: {arg}"))?
                    .clone(),
            };
            a.flags.push((name.into(), v));
        } else {
            return Err(format!("unknown flag: {arg}"));
        }
    }
    Ok(a)
}

impl Args {
    fn get(&self, names: &[&str]) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| names.contains(&n.as_str()))
            .map(|(_, v)| v.as_str())
    }

    fn id(&self) -> Res<&str> {
        self.positional
            .first()
            .map(String::as_str)
            .ok_or_else(|| "requires a container id".to_string())
    }
}

fn dir(id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(id)
}

fn load(id: &str) -> Res<Value> {
    let path = dir(id).join("state.json");
    let text = fs::read(&path).map_err(|e| {
        format!(
            "open {}: {}",
            path.display(),
            if e.kind() == std::io::ErrorKind::NotFound {
                "no such file or directory".to_string()
            } else {
                e.to_string()
            }
        )
    })?;
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

fn save(id: &str, s: &Value) -> Res<()> {
    let tmp = dir(id).join(".state.tmp");
    fs::write(&tmp, s.to_string()).map_err(|e| e.to_string())?;
    fs::rename(&tmp, dir(id).join("state.json")).map_err(|e| e.to_string())
}

/// A process that exists and is not a zombie.
fn alive(pid: i64) -> bool {
    if pid <= 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next()),
            Some("Z" | "X")
        ),
        Err(_) => false,
    }
}

/// Every pid the "jail" holds: the init and the execs.
fn jail_pids(id: &str, s: &Value) -> Vec<i64> {
    let mut pids = vec![s["PID"].as_i64().unwrap_or(0)];
    let execs = fs::read_to_string(dir(id).join("pids")).unwrap_or_default();
    pids.extend(execs.lines().filter_map(|l| l.trim().parse::<i64>().ok()));
    pids.into_iter().filter(|p| alive(*p)).collect()
}

fn create(args: &[String]) -> Res<()> {
    let a = parse(args, &["bundle", "b", "console-socket", "pid-file"], &[])?;
    let id = a.id()?.to_string();
    let bundle = match (
        a.positional.get(1).map(String::as_str),
        a.get(&["bundle", "b"]),
    ) {
        (Some(p), Some(f)) => {
            return Err(format!(
                "must specify bundle via argument (\"{p}\") or flag (\"{f}\"), not both"
            ))
        }
        (Some(b), None) | (None, Some(b)) => PathBuf::from(b),
        (None, None) => {
            return Err("bundle is required, specify via argument or --bundle flag".into())
        }
    };
    let config_path = bundle.join("config.json");
    let meta =
        fs::metadata(&config_path).map_err(|e| format!("stat {}: {e}", config_path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "\"{}\" should be a regular file",
            config_path.display()
        ));
    }
    fs::create_dir_all(dir(&id)).map_err(|e| e.to_string())?;
    let initial = json!({"ID": id, "JID": 0, "Status": "creating", "Bundle": bundle, "PID": 0});
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir(&id).join("state.json"))
        .map_err(|e| format!("open {}/state.json: {e}", dir(&id).display()))?;
    let result = create_in_state(&id, &bundle, &a, initial);
    if result.is_err() {
        let _ = fs::remove_dir_all(dir(&id));
    }
    result
}

fn create_in_state(id: &str, bundle: &Path, a: &Args, mut s: Value) -> Res<()> {
    save(id, &s)?;
    fs::copy(bundle.join("config.json"), dir(id).join("config.json")).map_err(|e| e.to_string())?;
    let config: Value =
        serde_json::from_slice(&fs::read(dir(id).join("config.json")).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    if !config["process"].is_object() {
        return Err("OCI config Process is required".into());
    }
    let console = a.get(&["console-socket"]);
    let terminal = config["process"]["terminal"].as_bool().unwrap_or(false);
    match (terminal, console) {
        (true, None) => {
            return Err("console-socket is required when Process.Terminal is true".into())
        }
        (false, Some(_)) => {
            return Err("console-socket provided but Process.Terminal is false".into())
        }
        _ => {}
    }
    let knob = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("runj-standin.fail-create")));
    if let Some(text) = knob.and_then(|k| fs::read_to_string(k).ok()) {
        return Err(text.trim().to_string());
    }
    nix::unistd::mkfifo(
        &dir(id).join("exec.fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o622),
    )
    .map_err(|e| format!("fifo: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("__entrypoint").arg(id);
    if let Some(sock) = console {
        let slave = send_pty_master(Path::new(sock))?;
        cmd.stdin(slave.try_clone().map_err(|e| e.to_string())?)
            .stdout(slave.try_clone().map_err(|e| e.to_string())?)
            .stderr(slave);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if terminal {
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("start entrypoint: {e}"))?;
    let pid = child.id();
    if let Some(f) = a.get(&["pid-file"]) {
        fs::write(f, pid.to_string()).map_err(|e| e.to_string())?;
    }
    s["PID"] = json!(pid);
    s["Status"] = json!("created");
    save(id, &s)
}

/// Opens a pty, sends its master over the console socket, returns the slave.
fn send_pty_master(sock: &Path) -> Res<OwnedFd> {
    let pty = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
    let conn = UnixStream::connect(sock).map_err(|e| format!("dial {}: {e}", sock.display()))?;
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(b"/dev/ptmx")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("send pty master: {e}"))?;
    Ok(pty.slave)
}

/// The entrypoint: wait for `start` on the exec fifo, then become the process.
fn entrypoint(args: &[String]) -> Res<()> {
    let id = args.first().ok_or("entrypoint needs an id")?;
    let mut config: Value =
        serde_json::from_slice(&fs::read(dir(id).join("config.json")).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    config["__bundle"] = load(id)?["Bundle"].clone();
    {
        // Blocks until `start` opens the fifo for reading; closed by exec (O_CLOEXEC).
        let mut fifo = fs::OpenOptions::new()
            .write(true)
            .open(dir(id).join("exec.fifo"))
            .map_err(|e| format!("open exec fifo: {e}"))?;
        fifo.write_all(b"0").map_err(|e| e.to_string())?;
        std::mem::forget(fifo);
    }
    become_process(&config, &config["process"])
}

/// chroot into the container's root and exec the process (runj ignores `cwd`: "/").
fn become_process(config: &Value, process: &Value) -> Res<()> {
    let bundle = config["__bundle"].as_str().map(PathBuf::from);
    let root = config["root"]["path"].as_str().unwrap_or("root");
    let root = match (Path::new(root).is_absolute(), bundle) {
        (true, _) => PathBuf::from(root),
        (false, Some(b)) => b.join(root),
        (false, None) => PathBuf::from(root),
    };
    let args: Vec<String> = process["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let env: Vec<String> = process["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let arg0 = args.first().ok_or("process.args is empty")?;
    nix::unistd::chroot(&root).map_err(|e| format!("chroot {}: {e}", root.display()))?;
    std::env::set_current_dir("/").map_err(|e| e.to_string())?;
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/bin:/usr/bin:/sbin:/usr/sbin");
    let program = if arg0.contains('/') {
        PathBuf::from(arg0)
    } else {
        path.split(':')
            .map(|d| Path::new(d).join(arg0))
            .find(|p| p.is_file())
            .ok_or(format!(
                "exec: \"{arg0}\": executable file not found in $PATH"
            ))?
    };
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let argv = args.iter().map(|a| c(a)).collect::<Res<Vec<_>>>()?;
    let envp = env.iter().map(|e| c(e)).collect::<Res<Vec<_>>>()?;
    let prog = c(&program.to_string_lossy())?;
    // What runj's Go entrypoint leaves: no blocked signals, SIGPIPE at its default (Rust
    // ignores it in this stand-in).
    // SAFETY: plain signal-state syscalls before exec.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let e = nix::unistd::execve(&prog, &argv, &envp).unwrap_err();
    Err(format!("exec {}: {e}", program.display()))
}

fn start(args: &[String]) -> Res<()> {
    let a = parse(args, &[], &[])?;
    let id = a.id()?;
    let mut s = load(id)?;
    if s["Status"] != "created" {
        return Err("cannot start an already running container".into());
    }
    let fifo_path = dir(id).join("exec.fifo");
    let mut fifo = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo_path)
        .map_err(|e| format!("fifo: open exec fifo for reading: {e}"))?;
    let pid = s["PID"].as_i64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut data = Vec::new();
    // The entrypoint writes one byte, then its exec closes the fifo: read until EOF.
    loop {
        let mut buf = [0u8; 16];
        match fifo.read(&mut buf) {
            Ok(0) if !data.is_empty() => break,
            Ok(0) => {
                if !alive(pid) || Instant::now() > deadline {
                    return Err("cannot start an already running container".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("fifo: timed out".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    fs::remove_file(&fifo_path).map_err(|e| e.to_string())?;
    s["Status"] = json!("running");
    save(id, &s)
}

fn state(args: &[String]) -> Res<()> {
    let a = parse(args, &[], &[])?;
    let id = a.id()?;
    let mut s = load(id)?;
    if s["Status"] == "running" && jail_pids(id, &s).is_empty() {
        s["Status"] = json!("stopped");
        s["PID"] = json!(0);
        save(id, &s)?;
    }
    let mut out = json!({
        "ociVersion": "1.0.2",
        "id": id,
        "status": s["Status"],
        "bundle": s["Bundle"],
    });
    if s["PID"].as_i64().unwrap_or(0) != 0 {
        out["pid"] = s["PID"].clone();
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn parse_signal(raw: &str) -> Res<Signal> {
    if let Ok(n) = raw.parse::<i32>() {
        return Signal::try_from(n).map_err(|e| e.to_string());
    }
    let upper = raw.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| format!("unknown signal \"{raw}\""))
}

fn kill_cmd(args: &[String]) -> Res<()> {
    let a = parse(args, &["pid", "p"], &["all", "a"])?;
    let id = a.id()?;
    let all = a.get(&["all", "a"]).is_some();
    let pid: i64 = a
        .get(&["pid", "p"])
        .map(|p| p.parse().unwrap_or(0))
        .unwrap_or(0);
    if all && pid != 0 {
        return Err("cannot specify both --all and --pid".into());
    }
    let signal = parse_signal(a.positional.get(1).map(String::as_str).unwrap_or("SIGTERM"))?;
    let mut s = load(id)?;
    let pids = jail_pids(id, &s);
    if s["Status"] == "running" && pids.is_empty() {
        s["Status"] = json!("stopped");
        save(id, &s)?;
    }
    if s["Status"] != "running" {
        return Err("cannot signal non-running container".into());
    }
    let targets = if all {
        pids
    } else if pid != 0 {
        vec![pid]
    } else {
        vec![s["PID"].as_i64().unwrap_or(0)]
    };
    for p in targets {
        kill(Pid::from_raw(p as i32), signal).map_err(|e| format!("kill {p}: {e}"))?;
    }
    Ok(())
}

fn delete(args: &[String]) -> Res<()> {
    let a = parse(args, &[], &[])?;
    let id = a.id()?;
    let Ok(s) = load(id) else {
        return Err("invalid jail id provided".into());
    };
    if !jail_pids(id, &s).is_empty() {
        return Err(format!("delete: jail {id} is not stopped"));
    }
    fs::remove_dir_all(dir(id)).map_err(|e| e.to_string())
}

fn exec(args: &[String]) -> Res<()> {
    let a = parse(args, &["process", "p", "console-socket"], &[])?;
    let id = a.id()?;
    let s = load(id)?;
    if s["Status"] != "running" || !alive(s["PID"].as_i64().unwrap_or(0)) {
        return Err("cannot exec non-running container".into());
    }
    let mut config: Value =
        serde_json::from_slice(&fs::read(dir(id).join("config.json")).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    config["__bundle"] = s["Bundle"].clone();
    let process: Value = match a.get(&["process", "p"]) {
        Some(p) => serde_json::from_slice(&fs::read(p).map_err(|e| format!("open {p}: {e}"))?)
            .map_err(|e| e.to_string())?,
        None => {
            let mut p = config["process"].clone();
            p["args"] = json!(a.positional[1..]);
            p
        }
    };
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let console = a.get(&["console-socket"]);
    match (terminal, console) {
        (true, None) => {
            return Err("console-socket is required when Process.Terminal is true".into())
        }
        (false, Some(_)) => {
            return Err("console-socket provided but Process.Terminal is false".into())
        }
        _ => {}
    }
    let mut pids = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir(id).join("pids"))
        .map_err(|e| e.to_string())?;
    writeln!(pids, "{}", std::process::id()).map_err(|e| e.to_string())?;
    if let Some(sock) = console {
        let slave = send_pty_master(Path::new(sock))?;
        // SAFETY: plain syscalls on fds this process owns.
        unsafe {
            libc::setsid();
            for fd in 0..3 {
                libc::dup2(slave.as_raw_fd(), fd);
            }
            libc::ioctl(0, libc::TIOCSCTTY, 0);
        }
    }
    become_process(&config, &process)
}
