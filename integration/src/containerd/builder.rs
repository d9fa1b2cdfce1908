//! The options of a private containerd.

use std::path::PathBuf;
use std::time::Duration;

use super::{Containerd, DEFAULT_NAMESPACE};
use crate::error::Error;

/// Options for [`Containerd`]; obtained from [`Containerd::builder`].
#[derive(Debug, Clone)]
pub struct ContainerdBuilder {
    pub(super) bin_dirs: Vec<PathBuf>,
    pub(super) runtime_aliases: Vec<(String, PathBuf)>,
    pub(super) go_shim: bool,
    pub(super) cri: bool,
    pub(super) namespace: String,
    pub(super) snapshotter: Option<String>,
    pub(super) start_timeout: Duration,
    pub(super) ctr_timeout: Duration,
    pub(super) log_level: String,
    pub(super) otlp_endpoint: Option<String>,
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
