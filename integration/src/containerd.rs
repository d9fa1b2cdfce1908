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

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::cri::{
    self, CriClient, CRI_NAMESPACE, HANDLER_ALT, HANDLER_GO, HANDLER_OURS, HANDLER_VM, HANDLER_WASM,
};
use crate::error::{Error, IoContext};
use crate::image;
use crate::procfs::{cmdline, contains, list_pids, owner_token, proc_stat};
pub use crate::procfs::{pss_kb, rss_kb};
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
const DIR_PREFIX: &str = "shimtest-ctd-";

/// The system path appended after the test's own directories.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where containerd 1.6 shims put their ttrpc sockets (hard-coded in
/// containerd as `<DefaultStateDir>/s`, independent of our config).
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// The runc state root the runc v2 shim uses by default (`<root>/<namespace>/<id>`).
const RUNC_ROOT: &str = "/run/containerd/runc";

/// Plugins that only slow startup down or would look outside our directory.
/// Not `io.containerd.runtime.v1.linux`: although v2 shims do not use it,
/// containerd 1.6's tasks service refuses to load without it ("no plugins
/// registered for io.containerd.runtime.v1"), and every task call then fails.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
];

const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

/// Where Debian's `containernetworking-plugins` installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The CNI plugins the pod network uses.
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// Subnet of every harness pod network. Each containerd gets its own bridge and the
/// host keeps no address on it (no gateway), so parallel instances reuse the same range
/// without a routing clash, and nothing else on the machine uses 10.231.0.0/24.
pub const POD_SUBNET: &str = "10.231.0.0/24";

/// libcni's default cache of ADD results (`<network>-<container>-<ifname>`); containerd
/// 1.6 does not move it, so teardown removes our entries by name.
const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";

/// Result of one `ctr` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrOutput {
    /// Exit code; `128 + signal` if ctr was killed by a signal, `124` on timeout.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    /// True if the harness killed ctr because it exceeded its timeout.
    pub timed_out: bool,
}

impl CtrOutput {
    /// True if ctr exited 0.
    pub fn success(&self) -> bool {
        self.status == 0 && !self.timed_out
    }
}

/// Options for [`Containerd`]; obtained from [`Containerd::builder`].
#[derive(Debug, Clone)]
pub struct ContainerdBuilder {
    bin_dirs: Vec<PathBuf>,
    runtime_aliases: Vec<(String, PathBuf)>,
    go_shim: bool,
    cri: bool,
    namespace: String,
    snapshotter: Option<String>,
    start_timeout: Duration,
    ctr_timeout: Duration,
    log_level: String,
    otlp_endpoint: Option<String>,
}

impl Default for ContainerdBuilder {
    fn default() -> Self {
        ContainerdBuilder {
            bin_dirs: Vec::new(),
            runtime_aliases: Vec::new(),
            go_shim: false,
            cri: false,
            namespace: DEFAULT_NAMESPACE.to_string(),
            snapshotter: None,
            start_timeout: Duration::from_secs(30),
            ctr_timeout: Duration::from_secs(120),
            log_level: "info".to_string(),
            otlp_endpoint: None,
        }
    }
}

impl ContainerdBuilder {
    /// Adds a directory to the front of containerd's `PATH` (after the ones
    /// added before it). Put `target_bin_dir()` here so containerd finds our
    /// `containerd-shim-runc-v2` before Debian's.
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dirs.push(dir.into());
        self
    }

    /// Adds several directories, see [`bin_dir`](Self::bin_dir).
    pub fn bin_dirs<I, P>(mut self, dirs: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.bin_dirs.extend(dirs.into_iter().map(Into::into));
        self
    }

    /// Makes runtime `runtime` (`io.containerd.<name>.<version>`) run `binary`.
    ///
    /// containerd maps a runtime name to the shim binary
    /// `containerd-shim-<name>-<version>` looked up on its `PATH`; the harness
    /// creates that name as a symlink in `<tmp>/aliasbin`, which is placed on
    /// `PATH` right after `bin_dirs`.
    pub fn runtime_alias(mut self, runtime: &str, binary: impl Into<PathBuf>) -> Self {
        self.runtime_aliases
            .push((runtime.to_string(), binary.into()));
        self
    }

    /// Makes [`GO_RUNTIME`] run Debian's Go shim ([`GO_SHIM_BINARY`]), through
    /// `<tmp>/gobin/containerd-shim-gorunc-v2`, so one containerd can run the
    /// same workload on both shims.
    pub fn go_shim(mut self, enable: bool) -> Self {
        self.go_shim = enable;
        self
    }

    /// Enables the CRI plugin (off by default: it is slow to start and the
    /// shim tests drive containerd through `ctr`).
    ///
    /// [`start`](Self::start) then also writes a CNI bridge network of this instance's
    /// own, imports the `pause` sandbox image (built from this crate's `pause` binary in
    /// [`target_bin_dir`](crate::target_bin_dir)) and busybox into namespace `k8s.io`, and
    /// returns only once CRI reports runtime and network ready and lists both images. The
    /// `gorunc` handler needs [`go_shim(true)`](Self::go_shim) as well.
    pub fn cri(mut self, enable: bool) -> Self {
        self.cri = enable;
        self
    }

    /// Namespace for `ctr` commands (default [`DEFAULT_NAMESPACE`]).
    ///
    /// Note: runc's default cgroup path is `/<namespace>/<container id>`, shared
    /// by all containerds on the host, so parallel tests must use distinct
    /// container ids (or distinct namespaces).
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_string();
        self
    }

    /// Forces a snapshotter (default: `overlayfs` if an overlay mount works in
    /// the temp directory, else `native`).
    pub fn snapshotter(mut self, name: &str) -> Self {
        self.snapshotter = Some(name.to_string());
        self
    }

    /// How long to wait for containerd to answer (default 30 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Default timeout for each `ctr` call (default 120 s), so a hung shim
    /// fails the test instead of hanging CI.
    pub fn ctr_timeout(mut self, timeout: Duration) -> Self {
        self.ctr_timeout = timeout;
        self
    }

    /// containerd's log level (default `info`; `debug` shows shim start-up).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Traces to `endpoint` (OTLP/HTTP): containerd's own tracing plugins on, every
    /// request sampled, and `OTEL_EXPORTER_OTLP_ENDPOINT` in containerd's environment,
    /// which the shims it starts inherit.
    pub fn otlp_endpoint(mut self, endpoint: &str) -> Self {
        self.otlp_endpoint = Some(endpoint.to_string());
        self
    }

    /// Starts containerd and waits until it answers `ctr version`.
    pub fn start(self) -> Result<Containerd, Error> {
        Containerd::start_with(self)
    }
}

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
        let log = fs::File::create(&log_path).ctx_path("creating", &log_path)?;
        let log2 = log.try_clone().ctx_path("duplicating", &log_path)?;
        let mut cmd = Command::new(CONTAINERD_BINARY);
        if let Some(endpoint) = &opts.otlp_endpoint {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        let child = cmd
            .arg("--config")
            .arg(&config)
            .env("PATH", &path_env)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .ctx(|| format!("spawning {CONTAINERD_BINARY}"))?;

        let mut c = Containerd {
            child: Some(child),
            dir: Some(dir),
            dir_path: d,
            address,
            namespace: opts.namespace.clone(),
            snapshotter,
            ctr_timeout: opts.ctr_timeout,
            path_env,
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
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .ctx_path("opening", &log_path)?;
        let log2 = log.try_clone().ctx_path("duplicating", &log_path)?;
        let child = Command::new(CONTAINERD_BINARY)
            .arg("--config")
            .arg(self.config_path())
            .env("PATH", &self.path_env)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .ctx(|| format!("spawning {CONTAINERD_BINARY}"))?;
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

    /// Runs `ctr --address <sock> -n <namespace> <args...>` with the default
    /// ctr timeout. Never fails: spawn errors are reported as status 127.
    pub fn ctr(&self, args: &[&str]) -> CtrOutput {
        self.ctr_timeout(args, self.ctr_timeout)
    }

    /// Like [`ctr`](Self::ctr) with an explicit timeout; on timeout ctr is
    /// killed and the output has `timed_out` set and status 124.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> CtrOutput {
        run_with_timeout(self.ctr_command(args), timeout)
    }

    /// Like [`ctr`](Self::ctr), with `input` on ctr's stdin (for `run` without `-d`).
    pub fn ctr_with_stdin(&self, args: &[&str], input: &[u8]) -> CtrOutput {
        let file = self.dir().join(format!("stdin-{}", crate::unique_id("in")));
        if let Err(e) = std::fs::write(&file, input) {
            panic!("write {}: {e}", file.display());
        }
        let mut cmd = self.ctr_command(args);
        match std::fs::File::open(&file) {
            Ok(f) => cmd.stdin(f),
            Err(e) => panic!("open {}: {e}", file.display()),
        };
        let out = run_with_timeout(cmd, self.ctr_timeout);
        let _ = std::fs::remove_file(&file);
        out
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        self.ctr_command_in(&self.namespace, args)
    }

    fn ctr_command_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR_BINARY);
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            // ctr reads the snapshotter for `images import` / `run` from here.
            .env("CONTAINERD_SNAPSHOTTER", &self.snapshotter)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null());
        cmd
    }

    /// Like [`ctr`](Self::ctr) but returns [`Error::Ctr`] if ctr fails.
    pub fn try_ctr(&self, args: &[&str]) -> Result<CtrOutput, Error> {
        self.try_ctr_in(&self.namespace, args)
    }

    /// Like [`try_ctr`](Self::try_ctr) in another namespace (CRI's is `k8s.io`).
    pub fn try_ctr_in(&self, namespace: &str, args: &[&str]) -> Result<CtrOutput, Error> {
        let out = run_with_timeout(self.ctr_command_in(namespace, args), self.ctr_timeout);
        if out.success() {
            Ok(out)
        } else {
            Err(Error::Ctr {
                args: args.join(" "),
                status: out.status,
                stdout: out.stdout,
                stderr: out.stderr,
            })
        }
    }

    /// Like [`ctr`](Self::ctr), but **panics** (test-only) with ctr's full
    /// output and the tail of containerd's log if ctr fails.
    pub fn ctr_ok(&self, args: &[&str]) -> CtrOutput {
        match self.try_ctr(args) {
            Ok(out) => out,
            Err(e) => panic!(
                "{e}\n--- containerd log tail ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(30)
            ),
        }
    }

    /// Imports the busybox image as [`image::BUSYBOX_REF`]. The archive is
    /// built once per process (and cached across processes).
    pub fn import_busybox(&self) -> Result<(), Error> {
        let archive = image::cached_busybox_archive()?;
        let archive = archive.to_string_lossy();
        self.try_ctr(&["images", "import", archive.as_ref()])?;
        let out = self.try_ctr(&["images", "ls", "-q"])?;
        if out.stdout.lines().any(|l| l.trim() == image::BUSYBOX_REF) {
            Ok(())
        } else {
            Err(Error::Ctr {
                args: format!("images import {archive} (image not listed afterwards)"),
                status: 0,
                stdout: out.stdout,
                stderr: out.stderr,
            })
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

    /// Whether the daemon runs and accepts connections: ctr waits ~10 s to connect to a
    /// dead socket, so teardown skips the polite steps when it is gone.
    fn daemon_alive(&mut self) -> bool {
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
            || self.restarted_pid().is_some();
        alive && UnixStream::connect(&self.address).is_ok()
    }

    /// The daemon [`restart_command`](Self::restart_command)'s script started, while it runs.
    fn restarted_pid(&self) -> Option<i32> {
        let pid = fs::read_to_string(self.dir_path.join("containerd.pid"))
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&*self.config_path().to_string_lossy())
            .then_some(pid)
    }

    /// Best-effort StopPodSandbox + RemovePodSandbox of every pod, so CRI runs CNI DEL
    /// (veth, IPAM lease, cached result) before the daemon goes.
    fn remove_pods(&mut self) {
        if !self.cri || !self.daemon_alive() {
            return;
        }
        let r = CriClient::connect_with_timeout(&self.address, Duration::from_secs(10))
            .and_then(|c| c.remove_all_pods());
        if let Err(e) = r {
            eprintln!("integration: removing CRI pods: {e}");
        }
    }

    /// Best-effort removal of all tasks and containers in our namespaces, with
    /// short timeouts so a broken shim cannot hang the teardown.
    fn remove_tasks_and_containers(&mut self) {
        if !self.daemon_alive() {
            return;
        }
        let mut namespaces = vec![self.namespace.clone()];
        if self.cri && self.namespace != CRI_NAMESPACE {
            namespaces.push(CRI_NAMESPACE.to_string());
        }
        let t = Duration::from_secs(10);
        for ns in &namespaces {
            let ctr = |args: &[&str]| run_with_timeout(self.ctr_command_in(ns, args), t);
            let tasks = ctr(&["tasks", "ls", "-q"]);
            if !tasks.success() {
                return; // containerd is not answering; the process sweep handles it
            }
            let ids: Vec<&str> = tasks.stdout.split_whitespace().collect();
            for id in &ids {
                ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            }
            for id in &ids {
                ctr(&["tasks", "delete", "-f", id]);
            }
            let containers = ctr(&["containers", "ls", "-q"]);
            for id in containers.stdout.split_whitespace() {
                ctr(&["containers", "delete", id]);
            }
        }
    }

    fn stop_daemon(&mut self) {
        // A daemon that `restart_command`'s script started is not our child: it is signalled
        // until /proc shows it gone (a zombie has no cmdline).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut signal = Some(libc::SIGTERM);
        while let Some(pid) = self.restarted_pid() {
            if Instant::now() > deadline {
                signal = Some(libc::SIGKILL);
            }
            if let Some(sig) = signal.take() {
                // SAFETY: kill(2) on the recorded pid, still running this containerd's config.
                unsafe { libc::kill(pid, sig) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_pods();
        self.remove_tasks_and_containers();
        self.stop_daemon();
        let clean = cleanup_dir(&self.dir_path, &self.address).clean;
        if let Some(dir) = self.dir.take() {
            if clean {
                if let Err(e) = dir.close() {
                    eprintln!("integration: removing {}: {e}", self.dir_path.display());
                }
            } else {
                // Never remove_dir_all through a mount: it could be a bind
                // mount of something outside the test directory.
                let kept = dir.keep();
                eprintln!(
                    "integration: mounts remain under {}; leaving it in place",
                    kept.display()
                );
            }
        }
    }
}

/// Base directory for temp dirs: `$SHIMTEST_TMPDIR`, else `/tmp`. Not
/// `$TMPDIR`, which may be long enough to overflow `sun_path`.
fn temp_base() -> PathBuf {
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

fn toml_str(p: &Path) -> String {
    let s = p.to_string_lossy();
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn config_toml(dir: &Path, address: &Path, opts: &ContainerdBuilder) -> String {
    let mut disabled: Vec<&str> = DISABLED_PLUGINS.to_vec();
    if !opts.cri {
        disabled.push(CRI_PLUGIN);
    }
    let tracing = match &opts.otlp_endpoint {
        Some(endpoint) => {
            disabled.retain(|p| !p.contains("tracing"));
            format!(
                "  [plugins.\"io.containerd.tracing.processor.v1.otlp\"]\n    endpoint = \"{endpoint}\"\n    protocol = \"http/protobuf\"\n  [plugins.\"io.containerd.internal.v1.tracing\"]\n    sampling_ratio = 1.0\n    service_name = \"containerd\"\n"
            )
        }
        None => String::new(),
    };
    let disabled = disabled
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# Generated by the integration harness.
version = 2
root = {root}
state = {state}
disabled_plugins = [{disabled}]

[grpc]
  address = {grpc}

[ttrpc]
  address = {ttrpc}

[debug]
  level = "{level}"

[metrics]
  address = ""

[stream_processors]
  [stream_processors."io.containerd.shimtest.wasm-layer"]
    accepts = [{wasm_types}]
    returns = "application/vnd.oci.image.layer.v1.tar"
    path = {processor}

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {opt}
{tracing}"#,
        root = toml_str(&dir.join("root")),
        state = toml_str(&dir.join("state")),
        grpc = toml_str(address),
        ttrpc = toml_str(&dir.join("t.sock")),
        opt = toml_str(&dir.join("opt")),
        processor = toml_str(&dir.join("wasm-layer-processor")),
        wasm_types = wasm_image::PROCESSED_MEDIA_TYPES
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", "),
        level = opts.log_level,
    )
}

/// The CNI network and bridge names of the containerd in `dir`, derived from the
/// directory's random suffix: unique among live instances, and recomputable by the sweep
/// of a dead test's directory without any record. Bridge names must fit IFNAMSIZ (15).
fn cni_names(dir: &Path) -> (String, String) {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: String = name
        .strip_prefix(DIR_PREFIX)
        .unwrap_or(&name)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let suffix = &suffix[suffix.len().saturating_sub(8)..];
    (format!("shimtest-{suffix}"), format!("shimbr{suffix}"))
}

/// Writes `<dir>/cni/net.d/10-shimtest.conflist`: a bridge of this instance's own with
/// host-local IPAM (leases kept in `<dir>/cni/ipam`), then loopback, which brings `lo` up
/// and passes the bridge's result through. No gateway and no masquerading: the host gets
/// no address on the bridge, IP forwarding stays as it is, no iptables rule is written.
fn write_cni_config(dir: &Path) -> Result<(), Error> {
    let (network, bridge) = cni_names(dir);
    let net_d = dir.join("cni").join("net.d");
    fs::create_dir_all(&net_d).ctx_path("creating", &net_d)?;
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_SUBNET }]],
                    "dataDir": dir.join("cni").join("ipam"),
                },
            },
            { "type": "loopback" },
        ],
    });
    let path = net_d.join("10-shimtest.conflist");
    let text = serde_json::to_string_pretty(&conf).map_err(|source| Error::Json {
        what: "CNI config",
        source,
    })?;
    fs::write(&path, text).ctx_path("writing", &path)
}

/// Removes what CNI leaves outside `dir` when pods were not torn down through CRI: the
/// bridge (the pods' veths went with their network namespaces) and cached ADD results.
fn cleanup_cni(dir: &Path) {
    let (network, bridge) = cni_names(dir);
    if Path::new("/sys/class/net").join(&bridge).exists() {
        let out = Command::new("ip")
            .args(["link", "delete", &bridge])
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "integration: ip link delete {bridge}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("integration: running ip link delete {bridge}: {e}"),
        }
    }
    // Results are `<network>-<container id>-<ifname>`; the loopback network CRI adds is
    // shared by name, so only the entries of this instance's sandboxes go.
    let sandboxes: Vec<String> = fs::read_dir(dir.join("root").join(CRI_PLUGIN).join("sandboxes"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let Ok(rd) = fs::read_dir(CNI_RESULTS_DIR) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(&format!("{network}-"))
            || sandboxes.iter().any(|id| name.contains(id.as_str()));
        if ours {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The CRI plugin's section of the config (containerd config version 2).
///
/// CRI keeps its root and state under containerd's (`<dir>/root|state/io.containerd.grpc.
/// v1.cri`), and with `netns_mounts_under_state_dir` the pods' network namespaces too, so
/// the harness's unmount-and-remove of `<dir>` covers them. `restrict_oom_score_adj`: root
/// here lacks CAP_SYS_RESOURCE. AppArmor is off so no profile is loaded into the host
/// kernel; the stream server (for Exec/Attach, unused) listens on loopback only; the
/// registry config points at an empty directory so no host mirror config applies.
/// `pod_annotations` passes the shim group annotation through to our handlers, so a test
/// can make two pods share one shim address.
fn cri_config_toml(dir: &Path, snapshotter: &str) -> String {
    let runtime = |name: &str, runtime_type: &str, passthrough: bool| {
        let annotations = if passthrough {
            format!(
                "        pod_annotations = [\"{}\"]\n",
                "io.containerd.runc.v2.group"
            )
        } else {
            String::new()
        };
        format!(
            "      [plugins.\"{CRI_PLUGIN}\".containerd.runtimes.{name}]\n        runtime_type = \"{runtime_type}\"\n{annotations}"
        )
    };
    let runtimes = [
        runtime(HANDLER_OURS, OUR_RUNTIME, true),
        runtime(&format!("\"{HANDLER_ALT}\""), OUR_RUNTIME, true),
        runtime(HANDLER_GO, GO_RUNTIME, false),
        runtime(HANDLER_WASM, WASM_RUNTIME, false),
        runtime(HANDLER_VM, VM_RUNTIME, false),
    ]
    .concat();
    format!(
        r#"
  [plugins."{CRI_PLUGIN}"]
    sandbox_image = "{pause}"
    restrict_oom_score_adj = true
    disable_apparmor = true
    enable_selinux = false
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_tls_streaming = false
    netns_mounts_under_state_dir = true
    max_container_log_line_size = 16384
    [plugins."{CRI_PLUGIN}".containerd]
      snapshotter = "{snapshotter}"
      default_runtime_name = "{HANDLER_OURS}"
      disable_snapshot_annotations = true
{runtimes}    [plugins."{CRI_PLUGIN}".cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = {conf_dir}
      max_conf_num = 1
      conf_template = ""
    [plugins."{CRI_PLUGIN}".registry]
      config_path = {certs}
"#,
        pause = cri::PAUSE_REF,
        conf_dir = toml_str(&dir.join("cni").join("net.d")),
        certs = toml_str(&dir.join("certs.d")),
    )
}

/// Whether an overlay mount (with two lower dirs, as containerd's overlayfs
/// snapshotter needs) works inside `dir`. Checked once per process.
fn overlay_works(dir: &Path) -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| probe_overlay(&dir.join("overlay-probe")))
}

fn probe_overlay(p: &Path) -> bool {
    let dirs = ["l1", "l2", "u", "w", "m"].map(|n| p.join(n));
    if dirs.iter().any(|d| fs::create_dir_all(d).is_err()) {
        return false;
    }
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        dirs[0].display(),
        dirs[1].display(),
        dirs[2].display(),
        dirs[3].display()
    );
    let ok = match (
        CString::new("overlay"),
        CString::new(dirs[4].as_os_str().as_bytes()),
        CString::new(opts),
    ) {
        (Ok(src), Ok(target), Ok(data)) => {
            // SAFETY: all pointers are valid NUL-terminated strings for the call.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    data.as_ptr().cast(),
                )
            };
            if rc == 0 {
                // SAFETY: as above.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            }
            rc == 0
        }
        _ => false,
    };
    let _ = fs::remove_dir_all(p);
    ok
}

/// Runs `cmd` collecting its output, killing it after `timeout`.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> CtrOutput {
    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            return CtrOutput {
                status: 127,
                stdout: String::new(),
                stderr: format!("integration: cannot spawn {cmd:?}: {e}"),
                timed_out: false,
            }
        }
    };
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );

    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
            Err(_) => break None,
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let mut stderr = err_t.join().unwrap_or_default();
    let status = if timed_out {
        stderr.push_str(&format!(
            "\nintegration: ctr killed after {timeout:?} timeout\n"
        ));
        124
    } else {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Some(st) => st
                .code()
                .or_else(|| st.signal().map(|s| 128 + s))
                .unwrap_or(-1),
            None => -1,
        }
    };
    CtrOutput {
        status,
        stdout,
        stderr,
        timed_out,
    }
}

fn mount_tmpfs(target: &Path) -> Result<(), Error> {
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let path = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|e| Error::io("tmpfs path", std::io::Error::other(e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c("tmpfs").as_ptr(),
            path.as_ptr(),
            c("tmpfs").as_ptr(),
            0,
            c("mode=0711").as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!("mount tmpfs on {}", target.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Teardown

/// Kills every process whose command line mentions `dir` or `address`, plus
/// all their descendants (container processes do not mention either), then
/// waits briefly for them to disappear. Returns each one killed with its command line.
fn kill_referencing(dir: &Path, address: &Path) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let dir_b = dir.as_os_str().as_bytes();
    let addr_b = address.as_os_str().as_bytes();
    let pids = list_pids();
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for &pid in &pids {
        if let Some((_, ppid, _)) = proc_stat(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut victims: BTreeSet<i32> = BTreeSet::new();
    let mut stack: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            cmdline(pid).is_some_and(|args| {
                args.iter()
                    .any(|a| contains(a, dir_b) || contains(a, addr_b))
            })
        })
        .collect();
    while let Some(pid) = stack.pop() {
        if pid != me && pid > 1 && victims.insert(pid) {
            stack.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    let killed: Vec<(i32, String)> = victims
        .iter()
        .map(|&pid| {
            let args = cmdline(pid).unwrap_or_default();
            let line = args
                .iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
                .join(" ");
            (pid, line)
        })
        .collect();
    for &pid in &victims {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let alive = victims
            .iter()
            .any(|&p| proc_stat(p).is_some_and(|(state, _, _)| state != 'Z'));
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let dir_b = dir.as_os_str().as_bytes();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| {
            let b = m.as_os_str().as_bytes();
            b == dir_b || (b.starts_with(dir_b) && b.get(dir_b.len()) == Some(&b'/'))
        })
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Lazily unmounts everything under `dir`; returns true if nothing is left.
fn unmount_all(dir: &Path) -> bool {
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return true;
        }
        for m in mounts {
            if let Ok(c) = CString::new(m.as_os_str().as_bytes()) {
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    mounts_under(dir).is_empty()
}

/// `(namespace, container id)` pairs that have a task bundle in `dir`'s state.
fn bundles(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let base = dir.join("state").join("io.containerd.runtime.v2.task");
    let names = |p: &Path| -> Vec<String> {
        fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ns in names(&base) {
        for id in names(&base.join(&ns)) {
            out.push((ns.clone(), id));
        }
    }
    out
}

/// What [`cleanup_dir`] did.
struct Teardown {
    /// Nothing is mounted under the directory any more: it may be removed. When false,
    /// the caller must not delete it.
    clean: bool,
    /// The processes it killed, with their command lines.
    killed: Vec<(i32, String)>,
}

/// Full teardown of a (dead or alive) containerd's directory, minus removing
/// the directory.
fn cleanup_dir(dir: &Path, address: &Path) -> Teardown {
    let leftovers = bundles(dir);
    let killed = kill_referencing(dir, address);
    for (ns, id) in &leftovers {
        // Sockets of killed shims: containerd 1.6 names them
        // sha256(<address>/<ns>/<id>) under /run/containerd/s.
        let key = Path::new(address).join(ns).join(id);
        let hash = Sha256::digest(key.as_os_str().as_bytes());
        let sock = Path::new(SHIM_SOCKET_DIR).join(hex(&hash));
        let _ = fs::remove_file(&sock);
        let _ = fs::remove_file(sock.with_extension("debug"));
        // A shim grouped by pod (CRI) or group annotation listens elsewhere: the bundle
        // records where. Its daemon was killed above, so nobody answers there any more.
        let bundle = dir
            .join("state")
            .join("io.containerd.runtime.v2.task")
            .join(ns)
            .join(id);
        if let Ok(a) = fs::read_to_string(bundle.join("address")) {
            let p = Path::new(a.trim().trim_start_matches("unix://"));
            if p.starts_with(SHIM_SOCKET_DIR) && UnixStream::connect(p).is_err() {
                let _ = fs::remove_file(p);
            }
        }
        // runc state of killed containers (the Go shim's default runc root is
        // /run/containerd/runc/<ns>); left alone if its init still runs, which
        // means another containerd uses the same namespace and id.
        let runc_state = Path::new(RUNC_ROOT).join(ns).join(id);
        if !runc_init_alive(&runc_state.join("state.json")) {
            let _ = fs::remove_dir_all(&runc_state);
        }
        // cgroups of killed containers (runc's default path /<ns>/<id>).
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for ctl in rd.filter_map(Result::ok) {
                let _ = fs::remove_dir(ctl.path().join(ns).join(id));
            }
        }
    }
    sweep_runc_states(dir);
    let clean = unmount_all(dir);
    cleanup_cni(dir);
    Teardown { clean, killed }
}

/// Removes runc state (and kills the container, cgroups too) of every container whose
/// bundle lies in `dir`, whatever namespace or id it has.
///
/// The per-bundle pass above misses containers whose bundle containerd already removed
/// while their cleanup was cut short: a shim killed with SIGKILL orphans its containers to
/// PID 1 (out of reach of the process sweep), and the `delete` action containerd runs for
/// it may itself be killed by the sweep mid-way. runc labels each state with its bundle,
/// which is how ours are told apart from other containerds'.
fn sweep_runc_states(dir: &Path) {
    let Ok(namespaces) = fs::read_dir(RUNC_ROOT) else {
        return;
    };
    let prefix = format!("bundle={}/", dir.display());
    for ns in namespaces.filter_map(Result::ok) {
        let Ok(ids) = fs::read_dir(ns.path()) else {
            continue;
        };
        for state_dir in ids.filter_map(Result::ok).map(|e| e.path()) {
            let Ok(text) = fs::read_to_string(state_dir.join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let ours = v["config"]["labels"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|x| x.as_str().is_some_and(|x| x.starts_with(&prefix)))
            });
            if !ours {
                continue;
            }
            if runc_init_alive(&state_dir.join("state.json")) {
                if let Some(pid) = v["init_process_pid"]
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                {
                    // SAFETY: kill(2) of a container init verified by pid and start time.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while runc_init_alive(&state_dir.join("state.json"))
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            if let Some(paths) = v["cgroup_paths"].as_object() {
                for p in paths.values().filter_map(|p| p.as_str()) {
                    let _ = fs::remove_dir(p);
                }
            }
            let _ = fs::remove_dir_all(&state_dir);
        }
    }
}

/// Whether the init process recorded in a runc `state.json` still runs
/// (same pid *and* start time, so pid reuse does not fool it).
fn runc_init_alive(state_json: &Path) -> bool {
    let Ok(text) = fs::read_to_string(state_json) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let pid = v["init_process_pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok());
    let start = v["init_process_start"].as_u64();
    match (pid, start) {
        (Some(pid), Some(start)) if pid > 0 => {
            proc_stat(pid).is_some_and(|(state, _, st)| st == start && state != 'Z')
        }
        _ => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Tears down directories left by test processes that died without running
/// `Drop` (SIGKILL, abort, a test ended at its time bound). Only directories under `base`
/// named `<prefix>*` with an `owner` file whose process no longer exists are touched.
/// Returns a line for each thing removed.
pub(crate) fn sweep_stale(base: &Path, prefix: &str) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(rd) = fs::read_dir(base) else {
        return done;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        if !name.as_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        let dir = e.path();
        let Ok(owner) = fs::read_to_string(dir.join("owner")) else {
            continue;
        };
        // Empty or partial while its owner is still writing it: not ours to judge.
        if !owner_gone(&owner) {
            continue;
        }
        let teardown = cleanup_dir(&dir, &dir.join("c.sock"));
        for (pid, cmd) in teardown.killed {
            done.push(format!("killed pid {pid} of {}: {cmd}", dir.display()));
        }
        if teardown.clean {
            match fs::remove_dir_all(&dir) {
                Ok(()) => done.push(format!("removed {}", dir.display())),
                Err(e) => done.push(format!("removing {}: {e}", dir.display())),
            }
        } else {
            done.push(format!(
                "mounts remain under {}: left in place",
                dir.display()
            ));
        }
    }
    done
}

/// Whether the process a complete `owner` file names (`"<pid> <start time>"`) is gone.
fn owner_gone(owner: &str) -> bool {
    let mut it = owner.split_whitespace();
    let (Some(pid), Some(start)) = (it.next(), it.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    owner_token(pid).is_none_or(|tok| tok != format!("{pid} {start}"))
}

/// Writes `dir/owner`, naming this process: [`sweep_stale`] leaves the directory alone
/// while it runs.
pub(crate) fn write_owner(dir: &Path) -> Result<(), Error> {
    fs::write(
        dir.join("owner"),
        owner_token(std::process::id()).unwrap_or_default(),
    )
    .ctx_path("writing", &dir.join("owner"))
}

/// Base directory for the private containerds' temp dirs (see [`temp_base`]), and their
/// name prefix.
pub(crate) fn temp_dirs() -> (PathBuf, &'static str) {
    (temp_base(), DIR_PREFIX)
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

    #[test]
    fn only_a_complete_owner_whose_process_is_gone_is_swept() {
        let me = owner_token(std::process::id()).expect("own token");
        assert!(!owner_gone(&me));
        // Being written by a live test: never swept.
        assert!(!owner_gone(""));
        assert!(!owner_gone(&std::process::id().to_string()));
        // pid_max is at most 2^22: this pid never runs.
        assert!(owner_gone("4194305 12345"));
        // The pid runs, but started at another time: reused.
        assert!(owner_gone(&format!("{} 1", std::process::id())));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b\134c"),
            PathBuf::from("/tmp/a b\\c")
        );
    }

    #[test]
    fn own_memory_is_readable() {
        let pid = std::process::id() as i32;
        assert!(rss_kb(pid).expect("rss") > 0);
        assert!(pss_kb(pid).expect("pss") > 0);
    }
}
