//! A kubelet stand-in: blocking calls to containerd's CRI plugin over its gRPC socket.
//!
//! Kubernetes reaches a shim only through CRI (RunPodSandbox → a sandbox container → the
//! shim's `start`; CreateContainer/StartContainer in that pod → the same shim, grouped by
//! the `io.kubernetes.cri.sandbox-id` annotation). The tests and the benchmark therefore
//! drive pods the way a kubelet does, through [`CriClient`], against a private containerd
//! started with [`ContainerdBuilder::cri`](crate::ContainerdBuilder::cri).
//!
//! The protos are `k8s-cri`'s (API `runtime.v1`, which containerd 1.6 serves beside
//! `v1alpha2`), re-exported as [`api`]. Calls are blocking: each helper runs one request on
//! a private current-thread tokio runtime, so test code stays plain sequential Rust and no
//! thread pool is spawned per client.
//!
//! ```no_run
//! use integration::cri::{container_config, pod_config, HANDLER_OURS};
//! # fn demo(c: &integration::Containerd) -> Result<(), Box<dyn std::error::Error>> {
//! let cri = c.cri_client()?;
//! let pod = pod_config("web", &c.dir().join("pod-logs"));
//! let pod_id = cri.run_pod_sandbox(&pod, HANDLER_OURS)?;
//! let ctr = container_config("app", integration::BUSYBOX_REF, &["sleep", "1000"]);
//! let id = cri.create_container(&pod_id, &ctr, &pod)?;
//! cri.start_container(&id)?;
//! assert_eq!(cri.exec_sync(&id, &["echo", "hi"], 10)?.stdout, b"hi\n");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use k8s_cri::v1 as api;

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

/// The containerd namespace the CRI plugin keeps pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Runtime handler whose `runtime_type` is `io.containerd.runc.v2`: our shim, because the
/// harness puts our target directory first on containerd's `PATH`.
pub const HANDLER_OURS: &str = "runc";

/// A second handler of the same runtime type, to show that a RuntimeClass other than the
/// default one reaches our shim too.
pub const HANDLER_ALT: &str = "runc-alt";

/// Handler for Debian's Go shim (`io.containerd.gorunc.v2`), the baseline; works when the
/// containerd was built with [`go_shim(true)`](crate::ContainerdBuilder::go_shim).
pub const HANDLER_GO: &str = "gorunc";

/// Handler whose `runtime_type` is `io.containerd.wasm.v2`: our `containerd-shim-wasm-v2`
/// (Wasm modules, and native entrypoints such as the pause container, in one pod).
pub const HANDLER_WASM: &str = "wasm";

/// Handler whose `runtime_type` is `io.containerd.vm.v2`: our `containerd-shim-vm-v2`, each
/// pod in its own micro-VM.
pub const HANDLER_VM: &str = "vm";

/// Every handler the harness configures, in config order.
pub const HANDLERS: &[&str] = &[
    HANDLER_OURS,
    HANDLER_ALT,
    HANDLER_GO,
    HANDLER_WASM,
    HANDLER_VM,
];

/// Reference of the locally built sandbox image (`pause`), CRI's `sandbox_image`. Its
/// registry part is loopback: should anything ever try to pull it, no packet leaves the host.
pub const PAUSE_REF: &str = "localhost/shimtest/pause:1";

/// Errors of the CRI client.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The client's tokio runtime could not be built (out of file descriptors, say).
    #[error("building the CRI client runtime: {0}")]
    Runtime(#[source] io::Error),

    /// The unix socket did not accept an HTTP/2 connection.
    #[error("connecting to CRI on {address}: {source}")]
    Connect {
        address: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },

    /// containerd answered an RPC with an error status.
    #[error("CRI {rpc} failed ({code:?}): {message}")]
    Rpc {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },

    /// A successful answer lacked a field the caller needs.
    #[error("CRI {rpc} answered without {what}")]
    Incomplete {
        rpc: &'static str,
        what: &'static str,
    },

    /// The pod's log directory could not be created.
    #[error("creating pod log directory {path}: {source}")]
    LogDirectory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A container log file could not be read.
    #[error("reading container log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CriError {
    /// The gRPC status code of a failed RPC (`None` for other errors).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn rpc_err(rpc: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |s| CriError::Rpc {
        rpc,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// What [`CriClient::exec_sync`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// A blocking CRI client on one containerd's socket.
///
/// Cloning the tonic clients is cheap (they share one HTTP/2 connection), which is what
/// lets every helper take `&self`.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CriClient")
    }
}

impl CriClient {
    /// Connects to the CRI gRPC service on `address` (containerd's unix socket); every
    /// later call fails after 120 s rather than hang a test.
    pub fn connect(address: &Path) -> Result<Self, CriError> {
        Self::connect_with_timeout(address, Duration::from_secs(120))
    }

    /// Like [`connect`](Self::connect) with a per-call deadline of `timeout` (teardown uses
    /// a short one so a wedged containerd cannot stall it).
    pub fn connect_with_timeout(address: &Path, timeout: Duration) -> Result<Self, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(CriError::Runtime)?;
        let connect_err = |source| CriError::Connect {
            address: address.to_path_buf(),
            source,
        };
        let endpoint = Endpoint::from_shared(format!("unix://{}", address.display()))
            .map_err(connect_err)?
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout);
        let channel = rt.block_on(endpoint.connect()).map_err(connect_err)?;
        Ok(CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// `Status`: the runtime and network conditions (`RuntimeReady`, `NetworkReady`).
    pub fn status(&self) -> Result<api::RuntimeStatus, CriError> {
        let mut c = self.runtime.clone();
        let resp = self
            .rt
            .block_on(c.status(api::StatusRequest { verbose: false }))
            .map_err(rpc_err("Status"))?
            .into_inner();
        resp.status.ok_or(CriError::Incomplete {
            rpc: "Status",
            what: "status",
        })
    }

    /// Whether both runtime and network report ready; a fresh containerd's CRI is not
    /// until it has loaded its CNI config.
    pub fn ready(&self) -> Result<bool, CriError> {
        let st = self.status()?;
        let ok = |t: &str| st.conditions.iter().any(|c| c.r#type == t && c.status);
        Ok(ok("RuntimeReady") && ok("NetworkReady"))
    }

    /// `ImageStatus`: the image CRI knows under `image`, if any. CRI never pulls here.
    pub fn image_status(&self, image: &str) -> Result<Option<api::Image>, CriError> {
        let mut c = self.images.clone();
        let req = api::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        Ok(self
            .rt
            .block_on(c.image_status(req))
            .map_err(rpc_err("ImageStatus"))?
            .into_inner()
            .image)
    }

    /// `RunPodSandbox` with RuntimeClass handler `runtime_handler`; returns the pod id.
    ///
    /// Creates the pod's `log_directory` first, as the kubelet does: CRI writes container
    /// logs into it but does not create it.
    pub fn run_pod_sandbox(
        &self,
        config: &api::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, CriError> {
        if !config.log_directory.is_empty() {
            let dir = Path::new(&config.log_directory);
            std::fs::create_dir_all(dir).map_err(|source| CriError::LogDirectory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut c = self.runtime.clone();
        let req = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime_handler.to_string(),
        };
        let id = self
            .rt
            .block_on(c.run_pod_sandbox(req))
            .map_err(rpc_err("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        non_empty(id, "RunPodSandbox", "pod_sandbox_id")
    }

    /// `StopPodSandbox`: kills every container of the pod and tears its network down.
    pub fn stop_pod_sandbox(&self, pod_id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.rt
            .block_on(c.stop_pod_sandbox(req))
            .map_err(rpc_err("StopPodSandbox"))?;
        Ok(())
    }

    /// `RemovePodSandbox`: removes a stopped pod and its containers.
    pub fn remove_pod_sandbox(&self, pod_id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.rt
            .block_on(c.remove_pod_sandbox(req))
            .map_err(rpc_err("RemovePodSandbox"))?;
        Ok(())
    }

    /// `PodSandboxStatus` of one pod.
    pub fn pod_sandbox_status(&self, pod_id: &str) -> Result<api::PodSandboxStatus, CriError> {
        let mut c = self.runtime.clone();
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose: false,
        };
        self.rt
            .block_on(c.pod_sandbox_status(req))
            .map_err(rpc_err("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::Incomplete {
                rpc: "PodSandboxStatus",
                what: "status",
            })
    }

    /// `ListPodSandbox`: every pod of this containerd.
    pub fn list_pod_sandboxes(&self) -> Result<Vec<api::PodSandbox>, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ListPodSandboxRequest { filter: None };
        Ok(self
            .rt
            .block_on(c.list_pod_sandbox(req))
            .map_err(rpc_err("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// `CreateContainer` in pod `pod_id`; `sandbox_config` is the config the pod was run
    /// with (CRI takes the log directory and namespace options from it). Returns the id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &api::ContainerConfig,
        sandbox_config: &api::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let id = self
            .rt
            .block_on(c.create_container(req))
            .map_err(rpc_err("CreateContainer"))?
            .into_inner()
            .container_id;
        non_empty(id, "CreateContainer", "container_id")
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::StartContainerRequest {
            container_id: id.to_string(),
        };
        self.rt
            .block_on(c.start_container(req))
            .map_err(rpc_err("StartContainer"))?;
        Ok(())
    }

    /// `StopContainer`: SIGTERM, then SIGKILL after `grace_secs`.
    pub fn stop_container(&self, id: &str, grace_secs: i64) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::StopContainerRequest {
            container_id: id.to_string(),
            timeout: grace_secs,
        };
        self.rt
            .block_on(c.stop_container(req))
            .map_err(rpc_err("StopContainer"))?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.rt
            .block_on(c.remove_container(req))
            .map_err(rpc_err("RemoveContainer"))?;
        Ok(())
    }

    /// `ListContainers`, of one pod or (with `None`) of all.
    pub fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<api::Container>, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ListContainersRequest {
            filter: pod_id.map(|p| api::ContainerFilter {
                pod_sandbox_id: p.to_string(),
                ..Default::default()
            }),
        };
        Ok(self
            .rt
            .block_on(c.list_containers(req))
            .map_err(rpc_err("ListContainers"))?
            .into_inner()
            .containers)
    }

    /// `ContainerStatus` of one container (state, exit code, log path).
    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.rt
            .block_on(c.container_status(req))
            .map_err(rpc_err("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::Incomplete {
                rpc: "ContainerStatus",
                what: "status",
            })
    }

    /// `ExecSync`: runs `cmd` in container `id`, waits at most `timeout_secs` (0: no limit
    /// on containerd's side), returns its output and exit code. A non-zero exit code is a
    /// successful call.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecOutput, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        let r = self
            .rt
            .block_on(c.exec_sync(req))
            .map_err(rpc_err("ExecSync"))?
            .into_inner();
        Ok(ExecOutput {
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
        })
    }

    /// `UpdateContainerResources`: new Linux resources for container `id`.
    pub fn update_container_resources(
        &self,
        id: &str,
        linux: api::LinuxContainerResources,
    ) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(linux),
            ..Default::default()
        };
        self.rt
            .block_on(c.update_container_resources(req))
            .map_err(rpc_err("UpdateContainerResources"))?;
        Ok(())
    }

    /// `ContainerStats`: CPU and memory as the shim reports them from the cgroup.
    pub fn container_stats(&self, id: &str) -> Result<api::ContainerStats, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.rt
            .block_on(c.container_stats(req))
            .map_err(rpc_err("ContainerStats"))?
            .into_inner()
            .stats
            .ok_or(CriError::Incomplete {
                rpc: "ContainerStats",
                what: "stats",
            })
    }

    /// The log file of container `id`: `log_directory` of its pod joined with its
    /// `log_path`, as CRI reports it in `ContainerStatus`.
    pub fn container_log_path(&self, id: &str) -> Result<PathBuf, CriError> {
        let path = self.container_status(id)?.log_path;
        if path.is_empty() {
            return Err(CriError::Incomplete {
                rpc: "ContainerStatus",
                what: "log_path (pod without log_directory?)",
            });
        }
        Ok(PathBuf::from(path))
    }

    /// The parsed log of container `id` (see [`read_log`]).
    pub fn container_log(&self, id: &str) -> Result<Vec<LogLine>, CriError> {
        read_log(&self.container_log_path(id)?)
    }

    /// Stops and removes every pod (and so every container) this containerd's CRI knows,
    /// carrying on past failures; returns the first error. For teardown.
    pub fn remove_all_pods(&self) -> Result<(), CriError> {
        let mut first = None;
        for pod in self.list_pod_sandboxes()? {
            let r = self
                .stop_pod_sandbox(&pod.id)
                .and_then(|()| self.remove_pod_sandbox(&pod.id));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn non_empty(id: String, rpc: &'static str, what: &'static str) -> Result<String, CriError> {
    if id.is_empty() {
        Err(CriError::Incomplete { rpc, what })
    } else {
        Ok(id)
    }
}

fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// A pod config the way a kubelet sends one, reduced to what tests vary: metadata (`name`,
/// a unique uid, k8s namespace `shimtest`), hostname `name`, container logs under
/// `log_directory`, its own network namespace (CNI) and IPC, one PID namespace per container
/// (Kubernetes' default). Change the public fields for more (annotations, labels).
pub fn pod_config(name: &str, log_directory: &Path) -> api::PodSandboxConfig {
    let pod = api::NamespaceMode::Pod as i32;
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_string(),
            uid: crate::unique_id(&format!("uid-{name}")),
            namespace: "shimtest".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: pod,
                    pid: api::NamespaceMode::Container as i32,
                    ipc: pod,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config: `name`, image `image` (must already be in the CRI namespace: CRI
/// never pulls on CreateContainer), `command`, log file `<name>.log` in the pod's log
/// directory.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: HashMap::from([("shimtest".to_string(), name.to_string())]),
        ..Default::default()
    }
}

/// One line of a CRI container log: `<RFC 3339 time> <stream> <P|F> <content>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `P`: the line continues in the next entry (it exceeded CRI's line size); `F`: full.
    pub partial: bool,
    pub content: String,
}

/// Parses a CRI log file's text; malformed lines are skipped (a line being written while
/// we read has no newline yet and is dropped by `lines` only when complete).
pub fn parse_log(text: &str) -> Vec<LogLine> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(4, ' ');
            let (time, stream, tag) = (it.next()?, it.next()?, it.next()?);
            let partial = match tag {
                "P" => true,
                "F" => false,
                _ => return None,
            };
            Some(LogLine {
                time: time.to_string(),
                stream: stream.to_string(),
                partial,
                content: it.next().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// Reads and parses the CRI log at `path`.
pub fn read_log(path: &Path) -> Result<Vec<LogLine>, CriError> {
    let text = std::fs::read(path).map_err(|source| CriError::Log {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_log(&String::from_utf8_lossy(&text)))
}

/// The text of one stream (`"stdout"`/`"stderr"`, or every stream with `None`), partial
/// entries joined, one `\n` after each full line, as the process wrote it.
pub fn log_text(lines: &[LogLine], stream: Option<&str>) -> String {
    let mut out = String::new();
    for l in lines
        .iter()
        .filter(|l| stream.is_none_or(|s| l.stream == s))
    {
        out.push_str(&l.content);
        if !l.partial {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cri_log_lines() {
        let text = "2026-11-22T22:00:00.000000001Z stdout F hello world\n\
                    2026-11-22T22:00:00.1Z stderr P par\n\
                    2026-11-22T22:00:00.2Z stderr F tial\n\
                    garbage\n\
                    2026-11-22T22:00:00.3Z stdout F \n";
        let lines = parse_log(text);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].stream, "stdout");
        assert_eq!(lines[0].content, "hello world");
        assert!(lines[1].partial && !lines[2].partial);
        assert_eq!(log_text(&lines, Some("stderr")), "partial\n");
        assert_eq!(log_text(&lines, Some("stdout")), "hello world\n\n");
    }

    #[test]
    fn configs_carry_log_paths_and_namespaces() {
        let pod = pod_config("p", Path::new("/tmp/logs"));
        assert_eq!(pod.log_directory, "/tmp/logs");
        let ns = pod
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .expect("namespace options");
        assert_eq!(ns.network, api::NamespaceMode::Pod as i32);
        let c = container_config("c", "img", &["true"]);
        assert_eq!(c.log_path, "c.log");
        assert_eq!(c.image.map(|i| i.image).as_deref(), Some("img"));
    }
}
