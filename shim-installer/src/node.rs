//! The node the shims go on, as the installer sees it: its file system (the host's root,
//! or the host mounted into the DaemonSet's container), its containerd binary, which
//! validates a config exactly as the daemon will read it, and how containerd is restarted.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use thiserror::Error;

/// How long a command of the node may run: `config dump` takes milliseconds, a restart a
/// few seconds.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The `PATH` commands are looked up in on a host mounted elsewhere (Debian's default).
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{command} did not finish within {0:?}", COMMAND_TIMEOUT)]
    Timeout { command: String },
    #[error("{command} printed no version we can read: {output:?}")]
    Version { command: String, output: String },
    #[error("`containerd config dump` printed no TOML we can read: {0}")]
    Dump(String),
}

/// How containerd is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// The OS's service manager: `systemctl restart containerd` (systemd), `service
    /// containerd restart` (FreeBSD's rc.d).
    Service,
    /// A command run with `sh -c` on the node.
    Command(String),
    /// Never: the admin restarts it.
    Never,
}

/// The node: paths are the host's, read and written under `root`.
#[derive(Debug, Clone)]
pub struct Node {
    /// Where the host's `/` is: `/` on the host itself, the host mount in a container.
    pub root: PathBuf,
    /// The containerd binary (host path, or a name on the host's `PATH`).
    pub containerd: String,
}

impl Node {
    /// Where the host path `path` is from here.
    pub fn host(&self, path: &Path) -> PathBuf {
        match path.strip_prefix("/") {
            Ok(rel) => self.root.join(rel),
            Err(_) => self.root.join(path),
        }
    }

    /// A command run on the host: chrooted into it when the host is mounted elsewhere, so
    /// it finds the host's own binaries and libraries (the installer's image has no
    /// `chroot` binary, nor anything else).
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args);
        if self.root != Path::new("/") {
            let root = CString::new(self.root.as_os_str().as_bytes()).unwrap_or_default();
            // Searched by execvp in the child, after the chroot: the host's own PATH.
            c.env("PATH", HOST_PATH);
            // SAFETY: only async-signal-safe calls (chroot, chdir) between fork and exec.
            unsafe {
                c.pre_exec(move || {
                    if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c
    }

    /// containerd's major and minor version (`containerd --version`).
    pub fn containerd_version(&self) -> Result<(u32, u32), NodeError> {
        let out = run(self.command(&self.containerd, &["--version"]))?;
        parse_version(&out).ok_or_else(|| NodeError::Version {
            command: format!("{} --version", self.containerd),
            output: out,
        })
    }

    /// containerd's view of the config at `config` (host path) with its imports merged:
    /// the same binary and the same parser the daemon uses, so what it refuses the daemon
    /// would refuse at start.
    pub fn config_dump(&self, config: &Path) -> Result<toml::Table, NodeError> {
        let config = config.to_string_lossy();
        let out = run(self.command(
            &self.containerd,
            &["--config", config.as_ref(), "config", "dump"],
        ))?;
        out.parse::<toml::Table>()
            .map_err(|e| NodeError::Dump(e.to_string()))
    }

    /// What a shim binary (host path) prints for `-v`, on one line.
    pub fn shim_version(&self, binary: &Path) -> Option<String> {
        let out = run(self.command(&binary.to_string_lossy(), &["-v"])).ok()?;
        let words: Vec<&str> = out.split_whitespace().collect();
        (!words.is_empty()).then(|| words.join(" "))
    }

    /// Whether the OS's service manager runs containerd here: systemd with an active
    /// containerd unit, or on FreeBSD an rc.d service that reports it running.
    pub fn service_manages_containerd(&self) -> bool {
        if cfg!(target_os = "freebsd") {
            return run(self.command("service", &["containerd", "status"])).is_ok();
        }
        self.host(Path::new("/run/systemd/system")).is_dir()
            && run(self.command("systemctl", &["is-active", "--quiet", "containerd"])).is_ok()
    }

    /// Restarts containerd the way `restart` says; `Never` does nothing.
    pub fn restart(&self, restart: &Restart) -> Result<(), NodeError> {
        match restart {
            Restart::Service if cfg!(target_os = "freebsd") => {
                run(self.command("service", &["containerd", "restart"]))
            }
            Restart::Service => run(self.command("systemctl", &["restart", "containerd"])),
            Restart::Command(cmd) => run(self.command("/bin/sh", &["-c", cmd])),
            Restart::Never => Ok(String::new()),
        }
        .map(drop)
    }
}

/// A handler section of a `config dump` (either CRI plugin generation), if present.
pub fn dumped_handler<'a>(dump: &'a toml::Table, name: &str) -> Option<&'a toml::Table> {
    let plugins = dump.get("plugins")?.as_table()?;
    ["io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri"]
        .iter()
        .find_map(|p| {
            plugins
                .get(*p)?
                .get("containerd")?
                .get("runtimes")?
                .get(name)?
                .as_table()
        })
}

fn parse_version(out: &str) -> Option<(u32, u32)> {
    // `containerd github.com/containerd/containerd 1.6.20~ds1 <rev>`; 2.x: `... v2.0.0 <rev>`.
    let word = out.split_whitespace().nth(2)?;
    let mut parts = word.trim_start_matches('v').split(['.', '~', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Runs `cmd` to its end or [`COMMAND_TIMEOUT`]; its stdout on success.
fn run(mut cmd: Command) -> Result<String, NodeError> {
    let command = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NodeError::Spawn {
            command: command.clone(),
            source,
        })?;
    let readers = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .map(|r| {
        thread::spawn(move || {
            let mut buf = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut buf);
            }
            buf
        })
    });
    // The waiter owns the child; on timeout it is killed by pid, which stays valid until
    // the waiter reaps it.
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => return Err(NodeError::Spawn { command, source }),
        Err(_) => {
            // SAFETY: kill(2) on our child, not yet reaped (the waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv();
            return Err(NodeError::Timeout { command });
        }
    };
    let [stdout, stderr] = readers.map(|t| t.join().unwrap_or_default());
    if status.success() {
        Ok(stdout)
    } else {
        Err(NodeError::Failed {
            command,
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_both_generations_are_read() {
        assert_eq!(
            parse_version("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1\n"),
            Some((1, 6))
        );
        assert_eq!(
            parse_version("containerd github.com/containerd/containerd/v2 v2.3.1 abcdef\n"),
            Some((2, 3))
        );
        assert_eq!(parse_version("containerd\n"), None);
    }

    #[test]
    fn host_paths_are_read_under_the_root() {
        let n = Node {
            root: "/host".into(),
            containerd: "containerd".into(),
        };
        assert_eq!(
            n.host(Path::new("/etc/containerd/config.toml")),
            Path::new("/host/etc/containerd/config.toml")
        );
    }

    #[test]
    fn a_failing_command_says_what_it_printed() {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "echo oops >&2; exit 3"]);
        let e = run(c).unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "echo fine"]);
        assert_eq!(run(c).unwrap(), "fine\n");
    }

    #[test]
    fn dumped_handlers_are_found_in_either_cri_plugin() {
        let dump: toml::Table = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.a]\nruntime_path = \"/x\"\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.b]\nruntime_path = \"/y\"\n".parse().unwrap();
        assert!(dumped_handler(&dump, "a").is_some());
        assert!(dumped_handler(&dump, "b").is_some());
        assert!(dumped_handler(&dump, "c").is_none());
    }
}
