//! The runc command line (also spoken by crun): runc's own subcommands and flags on top of
//! the SDK's [`RuntimeCli`].

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use protobuf::well_known_types::any::Any;
use protocol::options::CheckpointOptions;

use shim_common::reaper;
use shim_common::runtime_cli::RuntimeCli;
use shim_common::stdio::ChildStdio;
use shim_common::{Context, CreateRequest, Error, Result};

use crate::options::RuncConfig;

/// runc, configured for one container.
#[derive(Debug, Clone)]
pub struct Runc {
    pub cli: RuntimeCli,
    config: RuncConfig,
    /// runc `--root`, the namespace appended.
    root: PathBuf,
}

/// `runc features` (runc 1.1 and later), for `-info`. The binary must be there: a missing
/// one is a clear error. A runtime too old for the command has no features to tell, which
/// is no error: containerd's runc shim only logs it and answers without features.
pub fn features(config: &RuncConfig) -> Result<Option<Any>> {
    let cli = RuntimeCli::new("runtime", &config.binary)?;
    let out = match cli.call(&["features"])? {
        Ok(out) if serde_json::from_slice::<serde_json::Map<_, _>>(&out.stdout).is_ok() => out,
        other => {
            log::debug!(
                "{} features: {other:?}; answering without features",
                config.binary
            );
            return Ok(None);
        }
    };
    Ok(Some(Any {
        type_url: protocol::type_urls::OCI_FEATURES.into(),
        value: out.stdout,
        ..Default::default()
    }))
}

impl Runc {
    /// Resolves the binary now, so a wrong `binary_name` fails with a clear message.
    pub fn new(config: &RuncConfig, namespace: &str, bundle: &Path) -> Result<Runc> {
        let root = config.root.join(namespace);
        let mut cli = RuntimeCli::new("runtime", &config.binary)?;
        if config.criu != "criu" {
            cli = cli.global(["--criu", &config.criu]);
        }
        cli = cli.global(["--root".as_ref(), root.as_os_str()]);
        cli = cli.json_log(bundle.join("log.json"));
        if config.systemd_cgroup {
            cli = cli.global(["--systemd-cgroup"]);
        }
        Ok(Runc {
            cli,
            root,
            config: config.clone(),
        })
    }

    /// `runc create`: the init process exists, waiting for `start`. Returns its pid.
    pub fn create(&self, req: CreateRequest<'_, RuncConfig>) -> Result<u32> {
        let mut args = vec!["--bundle".as_ref(), req.bundle.as_os_str()];
        if self.config.no_pivot_root {
            args.push("--no-pivot".as_ref());
        }
        if self.config.no_new_keyring {
            args.push("--no-new-keyring".as_ref());
        }
        args.push(req.id.as_ref());
        self.cli
            .create(req.bundle, req.console_socket, &args, req.stdio)
    }

    /// `runc start`. A created runc container's init waits on `<root>/<id>/exec.fifo`;
    /// reading it and removing it is exactly what `runc start` does, so the shim does it
    /// itself and saves a runc process per container start. Without the fifo (an older
    /// runc, a container that is not in created state), and for any other runtime (crun's
    /// init reads its fifo where runc's writes it), the runtime does it.
    pub fn start(&self, id: &str, init_pid: u32) -> Result<()> {
        let is_runc = Path::new(&self.config.binary)
            .file_name()
            .is_some_and(|n| n == "runc");
        let fifo = self.root.join(id).join("exec.fifo");
        if is_runc && start_via_exec_fifo(&fifo, init_pid)? {
            return Ok(());
        }
        self.cli.start(id)
    }

    /// `runc exec --detach` of a process spec; returns the new process's pid.
    pub fn exec(
        &self,
        id: &str,
        bundle: &Path,
        exec_id: &str,
        spec: &[u8],
        console_socket: Option<&Path>,
        stdio: ChildStdio,
    ) -> Result<u32> {
        let spec_file = bundle.join(format!(".exec-{exec_id}.json"));
        let pid_file = bundle.join(format!(".exec-{exec_id}.pid"));
        fs::write(&spec_file, spec).context("write exec process spec")?;
        let mut cmd = self.cli.command();
        cmd.args(["exec", "--detach", "--process"]).arg(&spec_file);
        cmd.arg("--pid-file").arg(&pid_file);
        if let Some(sock) = console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        let result = self.cli.launch("exec", cmd, stdio, &pid_file);
        let _ = fs::remove_file(&spec_file);
        let _ = fs::remove_file(&pid_file);
        result
    }

    /// `runc delete --force`: gone, whatever state it was in. A missing container is fine.
    pub fn delete(&self, id: &str) -> Result<()> {
        Ok(self.cli.delete(id, true)??)
    }

    pub fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let out = self.cli.call(&["ps", "--format", "json", id])??;
        let pids: Option<Vec<u32>> = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::Runtime(format!("runc ps output: {e}")))?;
        Ok(pids.unwrap_or_default())
    }

    /// A subcommand that takes only the id: `pause`, `resume`.
    pub fn simple(&self, subcommand: &str, id: &str) -> Result<()> {
        Ok(self.cli.call(&[subcommand, id])?.map(drop)?)
    }

    /// `criu check`: checkpoint and restore cannot work without it, and runc's own failure
    /// deep inside a dump says far less than this does.
    pub fn criu_check(&self) -> Result<()> {
        let criu = &self.config.criu;
        let mut cmd = Command::new(criu);
        cmd.arg("check")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = reaper::run(&mut cmd).map_err(|e| {
            Error::FailedPrecondition(format!("checkpoint/restore needs CRIU: {e}"))
        })?;
        if out.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let reason = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_string();
        Err(Error::FailedPrecondition(format!(
            "checkpoint/restore needs CRIU, and `{criu} check` fails on this host: {reason}"
        )))
    }

    /// `runc checkpoint` with containerd's `CheckpointOptions` mapped onto runc's flags.
    pub fn checkpoint(
        &self,
        id: &str,
        image: &Path,
        work: &Path,
        o: &CheckpointOptions,
    ) -> Result<()> {
        let mut cmd = self.cli.command();
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(image)
            .arg("--work-path")
            .arg(work);
        let flags = [
            (!o.exit, "--leave-running"),
            (o.open_tcp, "--tcp-established"),
            (o.external_unix_sockets, "--ext-unix-sk"),
            (o.terminal, "--shell-job"),
            (o.file_locks, "--file-locks"),
        ];
        cmd.args(flags.iter().filter(|(on, _)| *on).map(|(_, f)| f));
        for ns in &o.empty_namespaces {
            cmd.arg("--empty-ns").arg(ns);
        }
        if !o.cgroups_mode.is_empty() {
            cmd.arg("--manage-cgroups-mode").arg(&o.cgroups_mode);
        }
        cmd.arg(id).stdout(Stdio::null()).stderr(Stdio::piped());
        self.cli.run("checkpoint", &mut cmd).map(drop)
    }

    /// `runc restore --detach`: the container comes back running. Returns the init's pid.
    pub fn restore(
        &self,
        id: &str,
        bundle: &Path,
        image: &Path,
        work: &Path,
        stdio: ChildStdio,
    ) -> Result<u32> {
        let pid_file = bundle.join("init.pid");
        let mut cmd = self.cli.command();
        cmd.args(["restore", "--detach", "--bundle"]).arg(bundle);
        cmd.arg("--pid-file")
            .arg(&pid_file)
            .arg("--image-path")
            .arg(image);
        cmd.arg("--work-path").arg(work);
        if self.config.no_pivot_root {
            cmd.arg("--no-pivot");
        }
        cmd.arg(id);
        self.cli.launch("restore", cmd, stdio, &pid_file)
    }

    /// `runc update --resources`: apply an OCI `LinuxResources` (JSON) to the container.
    pub fn update(&self, id: &str, bundle: &Path, resources: &[u8]) -> Result<()> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = bundle.join(format!(".update-{n}.json"));
        fs::write(&file, resources).context("write resources for runc update")?;
        let mut cmd = self.cli.command();
        cmd.args(["update", "--resources"]).arg(&file).arg(id);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let result = self.cli.run("update", &mut cmd).map(drop);
        let _ = fs::remove_file(&file);
        result
    }
}

/// Releases a created container's init by reading its exec fifo. Returns `false` when
/// there is no fifo to read.
fn start_via_exec_fifo(fifo: &Path, init_pid: u32) -> Result<bool> {
    // Non-blocking open never hangs on a dead init; blocking reads afterwards wait for the
    // init's single byte.
    let mut f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("open {}", fifo.display())),
    };
    nix::fcntl::fcntl(
        f.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .context("make exec fifo blocking")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 16];
    loop {
        match f.read(&mut buf) {
            Ok(0) => {
                // The init has not reopened its end yet — or it is gone.
                let alive = nix::sys::signal::kill(Pid::from_raw(init_pid as i32), None).is_ok();
                if !alive {
                    return Err(Error::FailedPrecondition(
                        "container process is already dead".into(),
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(Error::Runtime(
                        "container init never opened its exec fifo".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", fifo.display())),
        }
    }
    // runc reports "created" for as long as the fifo exists.
    fs::remove_file(fifo).with_context(|| format!("remove {}", fifo.display()))?;
    Ok(true)
}
