//! The node as the installer changes it: where things are (host paths), how containerd is
//! restarted, and the one way its config is replaced — only after containerd validated it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Handler;
use crate::error::InstallError;
use crate::files::{self, FileError};
use crate::node::{self, Node, Restart};
use crate::release::{self, Release, Shim};

/// The drop-in file's name (containerd 2.x).
pub const DROPIN: &str = "shim-installer.toml";

/// Where things are on the node (host paths) and how to treat it.
#[derive(Debug, Clone)]
pub struct Target {
    pub node: Node,
    pub config: PathBuf,
    pub bin_dir: PathBuf,
    /// A directory on containerd's `PATH`, for the links to the shim binaries.
    pub link_dir: PathBuf,
    pub dropin_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub address: PathBuf,
    pub restart: Restart,
    pub ready_timeout: Duration,
}

impl Target {
    pub(crate) fn host(&self, p: &Path) -> PathBuf {
        self.node.host(p)
    }

    pub(crate) fn dropin_path(&self) -> PathBuf {
        match &self.dropin_dir {
            Some(d) => d.join(DROPIN),
            None => config_dir(&self.config).join("conf.d").join(DROPIN),
        }
    }
}

pub(crate) fn config_dir(config: &Path) -> &Path {
    config.parent().unwrap_or(Path::new("/"))
}

/// What to install: shims, their handler names, extra settings.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Shim names; empty: every shim of the release that runs here.
    pub shims: Vec<String>,
    /// shim → handler name (default `rs-<shim>`).
    pub names: Vec<(String, String)>,
    /// (handler, key, TOML value).
    pub settings: Vec<(String, String, String)>,
}

impl Selection {
    pub fn handler_name(&self, shim: &str) -> String {
        self.names
            .iter()
            .rev()
            .find(|(s, _)| s == shim)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| format!("rs-{shim}"))
    }

    /// The shims named, checked against the release; all of the release's for this OS when
    /// none is named.
    pub(crate) fn resolve(&self, release: &Release) -> Result<Vec<&'static Shim>, InstallError> {
        if self.shims.is_empty() {
            return Ok(release::SHIMS
                .iter()
                .filter(|s| s.for_this_os() && release.missing(s).is_empty())
                .collect());
        }
        self.shims
            .iter()
            .map(|name| {
                let shim =
                    release::shim(name).ok_or_else(|| InstallError::UnknownShim(name.clone()))?;
                if !shim.for_this_os() {
                    return Err(InstallError::WrongOs(shim.name, shim.os));
                }
                let missing = release.missing(shim);
                if !missing.is_empty() {
                    return Err(InstallError::Incomplete {
                        dir: release.dir.clone(),
                        shim: shim.name,
                        files: missing.join(", "),
                    });
                }
                Ok(shim)
            })
            .collect()
    }
}

/// What a step reports, a line each.
pub type Report = Vec<String>;

/// Whether containerd's merged view has `h` as we wrote it.
pub(crate) fn merged(dump: &toml::Table, h: &Handler) -> bool {
    let want = h.section.get("runtime_type").and_then(|v| v.as_str());
    node::dumped_handler(dump, &h.name)
        .and_then(|d| d.get("runtime_type"))
        .and_then(|v| v.as_str())
        == want
}

/// Writes `text` beside the config (host path `config`), has containerd validate it there
/// (relative imports resolve the same), checks `handlers` are in its merged view, and only
/// then renames it over the config.
pub(crate) fn replace_validated(
    t: &Target,
    config: &Path,
    text: &str,
    handlers: &[Handler],
) -> Result<(), InstallError> {
    let name = config
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let candidate = config_dir(config).join(format!(".{name}.shim-installer-candidate"));
    let candidate_host = t.host(&candidate);
    files::write_bytes(&candidate_host, text.as_bytes(), 0o644)?;
    let checked = t
        .node
        .config_dump(&candidate)
        .map_err(InstallError::Invalid)
        .and_then(|dump| match handlers.iter().find(|h| !merged(&dump, h)) {
            Some(h) => Err(InstallError::NotMerged(h.name.clone())),
            None => Ok(()),
        });
    if let Err(e) = checked {
        let _ = fs::remove_file(&candidate_host);
        return Err(e);
    }
    fs::rename(&candidate_host, t.host(config)).map_err(|source| FileError::Io {
        what: "renaming into place",
        path: t.host(config),
        source,
    })?;
    Ok(())
}

pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}
