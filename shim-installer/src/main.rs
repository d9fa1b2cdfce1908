//! `shim-installer`: puts the shims of a release on a node and takes them off again.
//!
//! ```text
//! shim-installer install   [--shims runc,wasm,vm] [options]
//! shim-installer uninstall [--shims ...] [--force] [options]
//! shim-installer status    [--probe] [options]
//! shim-installer config    --schema 2|3|4 [--shims ...]   # the handler sections, to paste
//! ```
//!
//! Every step is idempotent: run it again and nothing changes (and containerd is not
//! restarted). See docs/admin.md.

mod config;
mod cri;
mod error;
mod files;
mod install;
mod node;
mod record;
mod release;
mod status;
mod target;
mod uninstall;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use node::{Node, Restart};
use target::{Selection, Target};

const USAGE: &str = "Usage: shim-installer install|uninstall|status|config [options]";

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optopt("", "shims", "shims to install or remove (default: every shim of the release for this OS; uninstall: all installed)", "runc,wasm,vm,jail");
    o.optmulti(
        "",
        "handler",
        "name of a shim's runtime handler (default rs-<shim>)",
        "SHIM=NAME",
    );
    o.optmulti(
        "",
        "set",
        "a setting in a handler's section, as a TOML value",
        "HANDLER.KEY=VALUE",
    );
    o.optopt(
        "",
        "release",
        "the release directory, with SHA256SUMS (default: the installer's own directory)",
        "DIR",
    );
    o.optopt(
        "",
        "bin-dir",
        "where the shims go on the node (default /opt/containerd-shims/bin)",
        "DIR",
    );
    o.optopt(
        "",
        "link-dir",
        "a directory on containerd's PATH, for links to the shims (default /usr/local/bin)",
        "DIR",
    );
    o.optopt(
        "",
        "config",
        "containerd's config file (default /etc/containerd/config.toml)",
        "FILE",
    );
    o.optopt(
        "",
        "dropin-dir",
        "containerd 2.x: the directory of our drop-in (default conf.d beside the config)",
        "DIR",
    );
    o.optopt(
        "",
        "state-dir",
        "where the record of what was installed is kept (default /var/lib/shim-installer)",
        "DIR",
    );
    o.optopt(
        "",
        "address",
        "containerd's socket (default /run/containerd/containerd.sock)",
        "PATH",
    );
    o.optopt(
        "",
        "containerd",
        "containerd's binary on the node (default containerd)",
        "PATH",
    );
    o.optopt(
        "",
        "host-root",
        "where the host's / is mounted (default /; in the DaemonSet /host)",
        "DIR",
    );
    o.optopt(
        "",
        "restart-command",
        "how to restart containerd when systemd does not manage it",
        "CMD",
    );
    o.optflag("", "no-restart", "never restart containerd");
    o.optopt(
        "",
        "timeout",
        "seconds to wait for CRI after a restart (default 60)",
        "SECS",
    );
    o.optflag("", "force", "uninstall even while pods use the handlers");
    o.optflag("", "probe", "status: run a probe pod per handler");
    o.optflag(
        "",
        "wait",
        "install: then wait for SIGTERM (a DaemonSet's container stays up)",
    );
    o.optopt(
        "",
        "schema",
        "config: containerd's config version to print for (2, 3 or 4)",
        "N",
    );
    o.optflag("h", "help", "this help");
    o
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = options();
    let m = match opts.parse(&args) {
        Ok(m) => m,
        Err(e) => return fail(&format!("{e}\n{USAGE}")),
    };
    if m.opt_present("help") {
        print!("{}", opts.usage(USAGE));
        return ExitCode::SUCCESS;
    }
    let [command] = m.free.as_slice() else {
        return fail(USAGE);
    };
    let result = parse(&m).and_then(|(target, sel)| {
        let report = match command.as_str() {
            "install" => {
                let dir = match m.opt_str("release") {
                    Some(d) => PathBuf::from(d),
                    None => own_dir()?,
                };
                let release = release::Release::open(&dir).map_err(|e| e.to_string())?;
                install::install(&target, &release, &sel)
            }
            "uninstall" => uninstall::uninstall(&target, &sel, m.opt_present("force")),
            "status" => status::status(&target, m.opt_present("probe")),
            "config" => {
                let schema = m.opt_str("schema").unwrap_or_else(|| "2".into());
                install::config_text(&schema, &sel).map(|t| vec![t])
            }
            other => return Err(format!("unknown command {other:?}\n{USAGE}")),
        };
        report.map_err(|e| e.to_string())
    });
    match result {
        Ok(report) => {
            for line in report {
                println!("{line}");
            }
            if command == "install" && m.opt_present("wait") {
                wait_for_term();
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("shim-installer: {msg}");
    ExitCode::FAILURE
}

/// Blocks until SIGTERM or SIGINT. Blocked and taken with `sigwait`: as a container's PID 1
/// a signal left at its default disposition would be dropped.
fn wait_for_term() {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the signal
    // numbers are valid; sigwait writes only `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

fn own_dir() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("finding the installer's own path: {e}"))?;
    Ok(exe.parent().unwrap_or(Path::new("/")).to_path_buf())
}

fn parse(m: &getopts::Matches) -> Result<(Target, Selection), String> {
    let path = |name: &str, default: &str| -> Result<PathBuf, String> {
        let p = PathBuf::from(m.opt_str(name).unwrap_or_else(|| default.to_string()));
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(format!(
                "--{name} {}: an absolute path is needed",
                p.display()
            ))
        }
    };
    let restart = match (m.opt_str("restart-command"), m.opt_present("no-restart")) {
        (Some(_), true) => return Err("--restart-command and --no-restart contradict".into()),
        (Some(cmd), false) => Restart::Command(cmd),
        (None, true) => Restart::Never,
        (None, false) => Restart::Service,
    };
    let timeout = match m.opt_str("timeout") {
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| format!("--timeout {s:?}: a number of seconds is needed"))?,
        None => 60,
    };
    let target = Target {
        node: Node {
            root: path("host-root", "/")?,
            containerd: m
                .opt_str("containerd")
                .unwrap_or_else(|| "containerd".into()),
        },
        config: path("config", "/etc/containerd/config.toml")?,
        link_dir: path("link-dir", "/usr/local/bin")?,
        bin_dir: path("bin-dir", "/opt/containerd-shims/bin")?,
        dropin_dir: m
            .opt_str("dropin-dir")
            .map(|_| path("dropin-dir", ""))
            .transpose()?,
        state_dir: path("state-dir", "/var/lib/shim-installer")?,
        address: path("address", "/run/containerd/containerd.sock")?,
        restart,
        ready_timeout: Duration::from_secs(timeout),
    };

    let mut sel = Selection::default();
    if let Some(list) = m.opt_str("shims") {
        sel.shims = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
    }
    for h in m.opt_strs("handler") {
        let (shim, name) = h
            .split_once('=')
            .filter(|(s, n)| !s.is_empty() && valid_handler(n))
            .ok_or_else(|| {
                format!("--handler {h:?}: SHIM=NAME with a name of letters, digits, '-' or '_'")
            })?;
        sel.names.push((shim.into(), name.into()));
    }
    for s in m.opt_strs("set") {
        let parsed = s.split_once('=').and_then(|(k, v)| {
            let (handler, key) = k.split_once('.')?;
            (!handler.is_empty() && !key.is_empty()).then(|| (handler.into(), key.into(), v.into()))
        });
        sel.settings
            .push(parsed.ok_or_else(|| format!("--set {s:?}: HANDLER.KEY=VALUE is needed"))?);
    }
    Ok((target, sel))
}

/// Handler names are what RuntimeClasses name: DNS-label-like, and a bare TOML key.
fn valid_handler(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
