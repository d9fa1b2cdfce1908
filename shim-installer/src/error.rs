//! What can stop an install, uninstall or status, named for the admin who reads it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::ConfigError;
use crate::cri::{CriError, PodUse};
use crate::files::FileError;
use crate::node::NodeError;

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("{0}")]
    File(#[from] FileError),
    #[error("{0}")]
    Node(#[from] NodeError),
    #[error("{0}")]
    Cri(#[from] CriError),
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("containerd refuses the merged config, so nothing was changed and containerd was not restarted: {0}")]
    Invalid(NodeError),
    #[error("containerd's merged config lacks handler {0:?} (an import replaced it, or containerd ignored our file): nothing was changed")]
    NotMerged(String),
    #[error("unknown shim {0:?} (runc, wasm, vm, jail)")]
    UnknownShim(String),
    #[error("the {0} shim runs on {1} only")]
    WrongOs(&'static str, &'static str),
    #[error("the release in {} lacks {shim}'s {files}", dir.display())]
    Incomplete {
        dir: PathBuf,
        shim: &'static str,
        files: String,
    },
    #[error("containerd is not run by systemd (or FreeBSD's rc.d) here: say how to restart it (--restart-command CMD), or --no-restart")]
    NoRestart,
    #[error("handler {handler:?} does not run pods: {source}")]
    Unhealthy {
        handler: String,
        #[source]
        source: CriError,
    },
    #[error("CRI does not report handler {0:?} after the restart")]
    NotReported(String),
    #[error("pods use the handlers to remove (--force removes them anyway): {}", list_pods(.0))]
    InUse(Vec<PodUse>),
    #[error("cannot tell whether pods use the handlers (--force removes them anyway): {0}")]
    UseUnknown(CriError),
}

impl InstallError {
    /// Maps a config error to one naming the file (host path) it is about.
    pub fn config(path: &Path) -> impl FnOnce(ConfigError) -> InstallError {
        let path = path.to_path_buf();
        move |source| InstallError::Config { path, source }
    }
}

fn list_pods(pods: &[PodUse]) -> String {
    pods.iter()
        .map(|p| format!("{}/{} ({})", p.namespace, p.name, p.handler))
        .collect::<Vec<_>>()
        .join(", ")
}
