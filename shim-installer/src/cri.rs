//! containerd's CRI service, as a kubelet sees it: whether a handler really runs pods, and
//! which pods use a handler now.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as api;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};

use api::runtime_service_client::RuntimeServiceClient;

/// Per call: a probe pod of a micro-VM handler boots a VM (a few seconds without KVM).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The containerd namespace-like name the probe pods are made in.
const PROBE_NAMESPACE: &str = "shim-installer";

#[derive(Debug, Error)]
pub enum CriError {
    #[error("connecting to CRI at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("CRI {rpc}: {message}")]
    Rpc { rpc: &'static str, message: String },
    #[error("CRI at {address} not ready within {timeout:?}: {last}")]
    NotReady {
        address: String,
        timeout: Duration,
        last: String,
    },
}

fn rpc(rpc: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |s| CriError::Rpc {
        rpc,
        message: format!("{:?}: {}", s.code(), s.message()),
    }
}

/// A pod that uses one of the handlers asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodUse {
    pub namespace: String,
    pub name: String,
    pub handler: String,
}

/// A blocking CRI client on containerd's socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

impl Cri {
    /// Connects to `address` (containerd's socket), waiting up to `timeout` for CRI to
    /// answer `Status` with the runtime ready, as it does once containerd has (re)started.
    pub fn connect(address: &Path, timeout: Duration) -> Result<Cri, CriError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last =
                match Self::try_connect(address).and_then(|c| c.runtime_ready().map(|r| (c, r))) {
                    Ok((c, true)) => return Ok(c),
                    Ok((_, false)) => "RuntimeReady is false".to_string(),
                    Err(e) => e.to_string(),
                };
            if Instant::now() >= deadline {
                return Err(CriError::NotReady {
                    address: address.display().to_string(),
                    timeout,
                    last,
                });
            }
            // containerd gives no notice when its socket comes back: ask again shortly.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn try_connect(address: &Path) -> Result<Cri, CriError> {
        let connect_err = |message: String| CriError::Connect {
            address: address.display().to_string(),
            message,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| connect_err(e.to_string()))?;
        let endpoint = Endpoint::from_shared(format!("unix://{}", address.display()))
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT);
        let channel = rt
            .block_on(endpoint.connect())
            .map_err(|e| connect_err(format!("{e:?}")))?;
        Ok(Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        })
    }

    fn status(&self) -> Result<api::StatusResponse, CriError> {
        let mut c = self.client.clone();
        Ok(self
            .rt
            .block_on(c.status(api::StatusRequest { verbose: false }))
            .map_err(rpc("Status"))?
            .into_inner())
    }

    fn runtime_ready(&self) -> Result<bool, CriError> {
        let st = self.status()?;
        Ok(st.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.r#type == "RuntimeReady" && c.status)
        }))
    }

    /// The handlers CRI reports in `Status` (Kubernetes 1.30's `runtime_handlers`), or
    /// `None` when this CRI does not report them (containerd before 2.0).
    pub fn reported_handlers(&self) -> Result<Option<Vec<String>>, CriError> {
        let handlers = self.status()?.runtime_handlers;
        Ok((!handlers.is_empty()).then(|| handlers.into_iter().map(|h| h.name).collect()))
    }

    /// Runs a pod sandbox with `handler` (on the host's network, so it needs no CNI) and
    /// removes it again: the handler's shim starts and answers, or the error says why not.
    pub fn probe(&self, handler: &str) -> Result<(), CriError> {
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: format!("probe-{handler}"),
                uid: format!("shim-installer-{}-{handler}", std::process::id()),
                namespace: PROBE_NAMESPACE.into(),
                attempt: 0,
            }),
            linux: Some(api::LinuxPodSandboxConfig {
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: api::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = self.client.clone();
        let id = self
            .rt
            .block_on(c.run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: handler.into(),
            }))
            .map_err(rpc("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        let stopped = self
            .rt
            .block_on(c.stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }))
            .map_err(rpc("StopPodSandbox"));
        let removed = self
            .rt
            .block_on(c.remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id }))
            .map_err(rpc("RemovePodSandbox"));
        stopped.and(removed).map(drop)
    }

    /// The pod sandboxes (any state: a stopped pod still holds its handler until removed)
    /// that use one of `handlers`.
    pub fn pods_using(&self, handlers: &[String]) -> Result<Vec<PodUse>, CriError> {
        let mut c = self.client.clone();
        let pods = self
            .rt
            .block_on(c.list_pod_sandbox(api::ListPodSandboxRequest { filter: None }))
            .map_err(rpc("ListPodSandbox"))?
            .into_inner()
            .items;
        Ok(pods
            .into_iter()
            .filter(|p| handlers.contains(&p.runtime_handler))
            .map(|p| {
                let meta = p.metadata.unwrap_or_default();
                PodUse {
                    namespace: meta.namespace,
                    name: meta.name,
                    handler: p.runtime_handler,
                }
            })
            .collect())
    }
}
