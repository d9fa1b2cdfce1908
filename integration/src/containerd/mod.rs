//! A private containerd per test.
//!
//! Each [`Containerd`] runs its own `/usr/bin/containerd` with root, state,
//! sockets, config and log inside one fresh temporary directory, so tests can
//! run in parallel with each other and with a system containerd, and so the
//! `PATH` containerd uses to find shim binaries is under the test's control
//! (that is how our `containerd-shim-runc-v2` shadows Debian's Go one).
//!
//! Dropping it tears everything down: tasks and containers through `ctr`, then
//! the daemon, then any process still referring to the directory (shims run in
//! their own sessions, so they do not die with containerd) and their
//! descendants, then mounts under the directory, then the directory itself.
//! A test process that dies without unwinding leaves its directory behind;
//! the next [`ContainerdBuilder::start`] sweeps such stale directories.
//!
//! With [`ContainerdBuilder::cri`] the daemon also serves Kubernetes' CRI (see
//! [`crate::cri`]): runtime handlers `runc` and `runc-alt` (our shim), `wasm` (our Wasm shim)
//! and `gorunc` (Debian's Go shim), a locally built sandbox image, and a CNI bridge network
//! of its own. Nothing of it needs the network: images are imported into namespace `k8s.io`
//! before any pod runs, so CRI never pulls. Teardown first stops and removes every pod
//! through CRI (which runs CNI DEL), and after the process sweep deletes the bridge and
//! CNI's cached results, so a panicking test leaves no interface behind either.
//!
//! Every instance also registers a stream processor for Wasm layer media types (see
//! [`crate::wasm_image`]): containerd 1.6 cannot otherwise unpack an OCI Wasm image.

mod builder;
mod cni;
mod config;
mod ctr;
mod mounts;
mod sweep;
mod teardown;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::procfs::{pss_kb, rss_kb};
pub use builder::ContainerdBuilder;
pub use cni::{CNI_BIN_DIR, POD_SUBNET};
pub use ctr::CtrOutput;
pub(crate) use sweep::{sweep_stale, temp_dirs, write_owner};

use cni::{cni_names, write_cni_config, CNI_PLUGINS};
use config::{config_toml, cri_config_toml};
use mounts::{mount_tmpfs, overlay_works};

use crate::cri::{self, CriClient, CRI_NAMESPACE};
use crate::error::{Error, IoContext};
use crate::image;
use crate::procfs::{cmdline, contains, list_pids};
use crate::wasm_image;

/// Runtime name that resolves to whatever `containerd-shim-runc-v2` comes
/// first on containerd's `PATH` (ours, when its directory is in `bin_dirs`).
pub const OUR_RUNTIME: &str = "io.containerd.runc.v2";

/// Runtime name that resolves to Debian's Go shim, via the
/// `containerd-shim-gorunc-v2` alias created by [`ContainerdBuilder::go_shim`].
pub const GO_RUNTIME: &str = "io.containerd.gorunc.v2";

/// Runtime name of our Wasm shim: containerd runs `containerd-shim-wasm-v2` from its `PATH`,
/// which is ours when `target_bin_dir()` is among `bin_dirs`.
pub const WASM_RUNTIME: &str = "io.containerd.wasm.v2";

/// Runtime type of our micro-VM shim, `containerd-shim-vm-v2`.
pub const VM_RUNTIME: &str = "io.containerd.vm.v2";

/// Our Wasm shim's binary name.
pub const WASM_SHIM_BINARY: &str = "containerd-shim-wasm-v2";

/// Debian's Go implementation of the runc v2 shim.
pub const GO_SHIM_BINARY: &str = "/usr/bin/containerd-shim-runc-v2";

/// The containerd daemon binary (Debian package `containerd`).
pub const CONTAINERD_BINARY: &str = "/usr/bin/containerd";

/// The containerd CLI used to drive the daemon.
pub const CTR_BINARY: &str = "/usr/bin/ctr";

/// Namespace used unless the builder says otherwise.
pub const DEFAULT_NAMESPACE: &str = "shimtest";

/// Prefix of our temporary directories; the stale-directory sweep only ever
/// looks at directories with this prefix *and* an `owner` file.
pub(super) const DIR_PREFIX: &str = "shimtest-ctd-";

/// The system path appended after the test's own directories.
pub(super) const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A running private containerd; torn down on drop (see the module docs).
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    /// `None` only after drop decided to keep the directory (mounts left).
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    address: PathBuf,
    namespace: String,
    snapshotter: String,
    ctr_timeout: Duration,
    path_env: String,
    /// The CRI plugin runs (teardown removes pods through it first).
    /// Given to every daemon this instance starts, the first and each restarted one.
    otlp_endpoint: Option<String>,
    cri: bool,
}

impl Containerd {
    /// Default options; see [`ContainerdBuilder`].
    pub fn builder() -> ContainerdBuilder {
        ContainerdBuilder::default()
    }

    /// Starts a containerd with default options (no extra shims on `PATH`).
    pub fn start() -> Result<Self, Error> {
        Self::builder().start()
    }

    fn start_with(opts: ContainerdBuilder) -> Result<Self, Error> {
        for (p, why) in [
            (CONTAINERD_BINARY, "install Debian package containerd"),
            (CTR_BINARY, "install Debian package containerd"),
        ] {
            if !Path::new(p).exists() {
                return Err(Error::MissingProgram {
                    path: p.into(),
                    why,
                });
            }
        }
        if opts.go_shim && !Path::new(GO_SHIM_BINARY).exists() {
            return Err(Error::MissingProgram {
                path: GO_SHIM_BINARY.into(),
                why: "install Debian package containerd",
            });
        }
        if opts.cri {
            for plugin in CNI_PLUGINS {
                let p = Path::new(CNI_BIN_DIR).join(plugin);
                if !p.exists() {
                    return Err(Error::MissingProgram {
                        path: p,
                        why: "install Debian package containernetworking-plugins",
                    });
                }
            }
        }

        let base = temp_base();
        for line in sweep_stale(&base, DIR_PREFIX) {
            eprintln!("integration: {line}");
        }
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(&base)
            .ctx_path("creating temp dir in", &base)?;
        let d = dir.path().to_path_buf();
        // Mark ownership first, so a later sweep can tell whether we are alive.
        write_owner(&d)?;

        // Like a production host (state in /run, root on disk): task bundles live on tmpfs,
        // the metadata database and snapshots on the temp dir's filesystem. Drop unmounts it
        // with everything else under the temp dir.
        let state = d.join("state");
        fs::create_dir(&state).ctx_path("creating", &state)?;
        mount_tmpfs(&state)?;

        let address = d.join("c.sock");
        // sun_path is 108 bytes including the NUL; ttrpc adds nothing, but the
        // shim's own sockets live elsewhere, so only ours matter here.
        if address.as_os_str().len() > 100 {
            return Err(Error::io(
                format!("socket path {} too long for sun_path", address.display()),
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }

        // PATH: bin_dirs first, then the alias dirs, then the system.
        let mut path_dirs: Vec<PathBuf> = opts.bin_dirs.clone();
        if opts.go_shim {
            let gobin = d.join("gobin");
            fs::create_dir(&gobin).ctx_path("creating", &gobin)?;
            link_shim(
                Path::new(GO_SHIM_BINARY),
                &gobin.join(shim_binary_name(GO_RUNTIME)?),
            )?;
            path_dirs.push(gobin);
        }
        if !opts.runtime_aliases.is_empty() {
            let aliasbin = d.join("aliasbin");
            fs::create_dir(&aliasbin).ctx_path("creating", &aliasbin)?;
            for (runtime, binary) in &opts.runtime_aliases {
                link_shim(binary, &aliasbin.join(shim_binary_name(runtime)?))?;
            }
            path_dirs.push(aliasbin);
        }
        let mut path_env = String::new();
        for p in &path_dirs {
            path_env.push_str(&p.to_string_lossy());
            path_env.push(':');
        }
        path_env.push_str(SYSTEM_PATH);

        let snapshotter = match &opts.snapshotter {
            Some(s) => s.clone(),
            None if overlay_works(&d) => "overlayfs".to_string(),
            None => "native".to_string(),
        };

        // Wasm layers become empty tars on unpack (see `wasm_image`): containerd 1.6
        // refuses to unpack an image whose layers it has no processor for.
        let processor = d.join("wasm-layer-processor");
        fs::write(&processor, wasm_image::PROCESSOR_SCRIPT).ctx_path("writing", &processor)?;
        fs::set_permissions(
            &processor,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .ctx_path("chmod", &processor)?;

        let mut toml = config_toml(&d, &address, &opts);
        if opts.cri {
            write_cni_config(&d)?;
            toml.push_str(&cri_config_toml(&d, &snapshotter));
        }
        let config = d.join("config.toml");
        fs::write(&config, toml).ctx_path("writing", &config)?;

        let log_path = d.join("containerd.log");
        fs::File::create(&log_path).ctx_path("creating", &log_path)?;
        let child = spawn_daemon(&config, &path_env, &log_path, opts.otlp_endpoint.as_deref())?;

        let mut c = Containerd {
            child: Some(child),
            dir: Some(dir),
            dir_path: d,
            address,
            namespace: opts.namespace.clone(),
            snapshotter,
            ctr_timeout: opts.ctr_timeout,
            path_env,
            otlp_endpoint: opts.otlp_endpoint.clone(),
            cri: opts.cri,
        };
        // On error `c` is dropped, which tears down whatever did start.
        c.wait_ready(opts.start_timeout)?;
        if opts.cri {
            c.prepare_cri(opts.start_timeout)?;
        }
        Ok(c)
    }

    /// Imports the sandbox and busybox images into CRI's namespace and waits until CRI
    /// is ready and lists both: a pod started before that would make CRI pull the
    /// sandbox image, which must never happen here.
    fn prepare_cri(&self, timeout: Duration) -> Result<(), Error> {
        let pause = image::pause_oci_archive(
            &self.dir_path.join("pause.oci.tar"),
            &crate::target_bin_dir().join("pause"),
            cri::PAUSE_REF,
        )?;
        let busybox = image::cached_busybox_archive()?;
        for archive in [&pause, &busybox] {
            let archive = archive.to_string_lossy();
            self.try_ctr_in(CRI_NAMESPACE, &["images", "import", archive.as_ref()])?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let check = || -> Result<Option<&'static str>, cri::CriError> {
                let c = CriClient::connect_with_timeout(&self.address, Duration::from_secs(10))?;
                if !c.ready()? {
                    return Ok(Some("runtime or network not ready"));
                }
                for image in [cri::PAUSE_REF, image::BUSYBOX_REF] {
                    if c.image_status(image)?.is_none() {
                        return Ok(Some("imported images not listed yet"));
                    }
                }
                Ok(None)
            };
            let last = match check() {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => why.to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::io(
                    format!(
                        "CRI on {} not ready within {timeout:?} ({last}); log tail:\n{}",
                        self.address.display(),
                        self.log_tail(30)
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The bridge of this containerd's CNI network (exists while a pod has run; removed
    /// at teardown), or `None` without CRI.
    pub fn cni_bridge(&self) -> Option<String> {
        self.cri.then(|| cni_names(&self.dir_path).1)
    }

    /// A CRI client on this containerd (needs [`ContainerdBuilder::cri`]).
    pub fn cri_client(&self) -> Result<CriClient, Error> {
        CriClient::connect(&self.address)
            .map_err(|e| Error::io("connecting the CRI client", std::io::Error::other(e)))
    }

    /// Stops containerd only (SIGTERM), as a daemon restart or crash would: shims and their
    /// containers keep running.
    pub fn stop_containerd(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: plain kill(2) on our own, not yet reaped, child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = child.wait();
        }
    }

    /// Starts containerd again with the same configuration and state (after
    /// [`stop_containerd`](Self::stop_containerd)); it reconnects to running shims.
    pub fn restart_containerd(&mut self) -> Result<(), Error> {
        self.stop_containerd();
        let child = spawn_daemon(
            &self.config_path(),
            &self.path_env,
            &self.log_path(),
            self.otlp_endpoint.as_deref(),
        )?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    /// A command that restarts this containerd the way a service manager would, for tools
    /// under test that restart containerd themselves (the installer's `--restart-command`):
    /// it stops the running daemon, waits for it to go, and starts a new one detached, with
    /// the same config, `PATH` and log. The new daemon's pid goes in `containerd.pid` (teardown
    /// stops it); each restart adds a line to `restarts`, which [`restarts`](Self::restarts)
    /// counts.
    pub fn restart_command(&self) -> Result<String, Error> {
        let script = self.dir_path.join("restart-containerd");
        let pidfile = self.dir_path.join("containerd.pid");
        let first = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let text = format!(
            r#"#!/bin/sh
# Generated by the integration harness: restarts this test's containerd.
set -e
pid=$(cat {pidfile} 2>/dev/null || echo {first})
kill -TERM "$pid" 2>/dev/null || true
# Gone, or a zombie of the test process (which reaps it at teardown).
while [ -e /proc/"$pid" ] && ! grep -q '^State:[[:space:]]*Z' /proc/"$pid"/status 2>/dev/null; do
	sleep 0.05
done
PATH={path} setsid {containerd} --config {config} </dev/null >>{log} 2>&1 &
echo $! >{pidfile}
echo restart >>{restarts}
"#,
            pidfile = sh_quote(&pidfile),
            path = sh_quote(Path::new(&self.path_env)),
            containerd = CONTAINERD_BINARY,
            config = sh_quote(&self.config_path()),
            log = sh_quote(&self.log_path()),
            restarts = sh_quote(&self.dir_path.join("restarts")),
        );
        fs::write(&script, text).ctx_path("writing", &script)?;
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .ctx_path("chmod", &script)?;
        Ok(script.to_string_lossy().into_owned())
    }

    /// How many times [`restart_command`](Self::restart_command)'s script ran.
    pub fn restarts(&self) -> usize {
        fs::read_to_string(self.dir_path.join("restarts"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Error::ContainerdExited {
                        status: status.to_string(),
                        config: self.config_path(),
                        log_tail: self.log_tail(40),
                    });
                }
            }
            if UnixStream::connect(&self.address).is_ok() {
                let out = self.ctr_timeout(&["version"], Duration::from_secs(10));
                if out.success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::StartTimeout {
                    address: self.address.clone(),
                    timeout,
                    config: self.config_path(),
                    log_tail: self.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The containerd gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The temporary directory holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// containerd's `root` (persistent data: content store, snapshots).
    pub fn root(&self) -> PathBuf {
        self.dir_path.join("root")
    }

    /// containerd's `state` (runtime data: task bundles).
    pub fn state_dir(&self) -> PathBuf {
        self.dir_path.join("state")
    }

    /// containerd's combined stdout/stderr log.
    pub fn log_path(&self) -> PathBuf {
        self.dir_path.join("containerd.log")
    }

    /// The generated `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir_path.join("config.toml")
    }

    /// Namespace used by [`ctr`](Self::ctr).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Snapshotter in use (`overlayfs` or `native`).
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// The `PATH` containerd (and therefore every shim) runs with.
    pub fn path_env(&self) -> &str {
        &self.path_env
    }

    /// containerd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `lines` lines of containerd's log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read log: {e}>"));
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Pids of shim processes serving this containerd: processes whose `argv[0]`
    /// is a `containerd-shim-*` binary and whose command line mentions our
    /// address (shims are started with `-address <sock>`).
    pub fn shim_pids(&self) -> Vec<i32> {
        let addr = self.address.as_os_str().as_bytes();
        let mut pids: Vec<i32> = list_pids()
            .into_iter()
            .filter(|&pid| {
                let Some(args) = cmdline(pid) else {
                    return false;
                };
                let is_shim = args.first().is_some_and(|a0| {
                    Path::new(OsStr::from_bytes(a0))
                        .file_name()
                        .is_some_and(|n| n.as_bytes().starts_with(b"containerd-shim-"))
                });
                is_shim && args.iter().any(|a| contains(a, addr))
            })
            .collect();
        pids.sort_unstable();
        pids
    }
}

/// Starts `containerd --config <config>` with `PATH` set to `path_env`, its output appended
/// to `log`, and `OTEL_EXPORTER_OTLP_ENDPOINT` set when tracing.
fn spawn_daemon(
    config: &Path,
    path_env: &str,
    log: &Path,
    otlp_endpoint: Option<&str>,
) -> Result<Child, Error> {
    let out = fs::OpenOptions::new()
        .append(true)
        .open(log)
        .ctx_path("opening", log)?;
    let err = out.try_clone().ctx_path("duplicating", log)?;
    let mut cmd = Command::new(CONTAINERD_BINARY);
    if let Some(endpoint) = otlp_endpoint {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    }
    cmd.arg("--config")
        .arg(config)
        .env("PATH", path_env)
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .ctx(|| format!("spawning {CONTAINERD_BINARY}"))
}

/// Base directory for temp dirs: `$SHIMTEST_TMPDIR`, else `/tmp`. Not
/// `$TMPDIR`, which may be long enough to overflow `sun_path`.
pub(super) fn temp_base() -> PathBuf {
    match std::env::var_os("SHIMTEST_TMPDIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/tmp"),
    }
}

/// containerd's binary name for a runtime: `io.containerd.runc.v2` ->
/// `containerd-shim-runc-v2`.
fn shim_binary_name(runtime: &str) -> Result<String, Error> {
    let parts: Vec<&str> = runtime.split('.').collect();
    match parts.as_slice() {
        ["io", "containerd", name, version]
            if !name.is_empty() && version.starts_with('v') && !name.contains('/') =>
        {
            Ok(format!("containerd-shim-{name}-{version}"))
        }
        _ => Err(Error::BadRuntimeName(runtime.to_string())),
    }
}

/// Makes `link` run `binary`. A symlink is enough: containerd execs the name
/// it found on `PATH`, and a Go shim re-execs itself through
/// `os.Executable()` (= the resolved `/proc/self/exe`), which works for both
/// symlinks and copies.
fn link_shim(binary: &Path, link: &Path) -> Result<(), Error> {
    std::os::unix::fs::symlink(binary, link)
        .ctx(|| format!("symlinking {} -> {}", link.display(), binary.display()))
}

/// `p` as one single-quoted shell word.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_map_to_binaries() {
        assert_eq!(
            shim_binary_name(OUR_RUNTIME).expect("ours"),
            "containerd-shim-runc-v2"
        );
        assert_eq!(
            shim_binary_name(GO_RUNTIME).expect("go"),
            "containerd-shim-gorunc-v2"
        );
        assert!(shim_binary_name("runc").is_err());
    }
}
