//! What `install` wrote, kept on the node so that `uninstall` removes exactly that and
//! `status` can say what is there.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

/// The record's file name in the state directory.
pub const FILE: &str = "installed.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The installer version that last wrote it.
    pub installer: String,
    /// containerd's config file (host path).
    pub config: PathBuf,
    /// Files copied, with the sha256 they were written with.
    pub files: Vec<InstalledFile>,
    /// Links made in containerd's `PATH` to installed binaries.
    #[serde(default)]
    pub links: Vec<InstalledLink>,
    /// Handler sections written.
    pub handlers: Vec<InstalledHandler>,
    /// How the config was changed.
    pub edit: Option<ConfigEdit>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstalledFile {
    pub shim: String,
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstalledLink {
    pub shim: String,
    pub path: PathBuf,
    pub target: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstalledHandler {
    pub shim: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConfigEdit {
    /// containerd 1.x: handler sections added to the main file. `backup` holds the file as it
    /// was before the first install (`None`: there was no file); `after` is the sha256 of
    /// what the last install left, so an uninstall of a file nobody touched since restores
    /// it exactly.
    Main {
        backup: Option<PathBuf>,
        after: String,
    },
    /// containerd 2.x: a drop-in of ours, imported by the main file; `import` is the entry
    /// added to the main file's `imports` (`None` when an existing entry covered the drop-in),
    /// `imports_created` whether the installer created the `imports` key itself.
    DropIn {
        path: PathBuf,
        import: Option<String>,
        imports_created: bool,
    },
}

impl Record {
    /// The record in `state_dir` (host path), or `None` when nothing is installed.
    pub fn load(state_dir: &Path) -> Result<Option<Record>, FileError> {
        let path = state_dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FileError::Io {
                    what: "reading",
                    path,
                    source,
                })
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| FileError::Io {
                what: "parsing",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), FileError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| FileError::Io {
            what: "encoding",
            path: state_dir.join(FILE),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        files::write_bytes(&state_dir.join(FILE), text.as_bytes(), 0o644)
    }

    pub fn remove(state_dir: &Path) -> Result<(), FileError> {
        let path = state_dir.join(FILE);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FileError::Io {
                what: "removing",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// The shims with a handler or a file in the record.
    pub fn shims(&self) -> Vec<String> {
        let mut shims: Vec<String> = self
            .handlers
            .iter()
            .map(|h| h.shim.clone())
            .chain(self.files.iter().map(|f| f.shim.clone()))
            .chain(self.links.iter().map(|l| l.shim.clone()))
            .collect();
        shims.sort();
        shims.dedup();
        shims
    }

    /// Notes a file (replacing an earlier entry of the same path).
    pub fn add_file(&mut self, file: InstalledFile) {
        self.files.retain(|f| f.path != file.path);
        self.files.push(file);
    }

    pub fn add_link(&mut self, link: InstalledLink) {
        self.links.retain(|l| l.path != link.path);
        self.links.push(link);
    }

    pub fn add_handler(&mut self, handler: InstalledHandler) {
        if !self.handlers.contains(&handler) {
            self.handlers.push(handler);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_a_round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Record::load(d.path()).unwrap(), None);
        let mut r = Record {
            installer: "0.1.0".into(),
            config: "/etc/containerd/config.toml".into(),
            edit: Some(ConfigEdit::Main {
                backup: Some("/var/lib/shim-installer/config.toml.orig".into()),
                after: "b".into(),
            }),
            ..Default::default()
        };
        r.add_file(InstalledFile {
            shim: "wasm".into(),
            path: "/opt/x".into(),
            sha256: "1".into(),
        });
        r.add_file(InstalledFile {
            shim: "wasm".into(),
            path: "/opt/x".into(),
            sha256: "2".into(),
        });
        r.add_handler(InstalledHandler {
            shim: "wasm".into(),
            name: "rs-wasm".into(),
        });
        r.add_handler(InstalledHandler {
            shim: "wasm".into(),
            name: "rs-wasm".into(),
        });
        assert_eq!((r.files.len(), r.handlers.len()), (1, 1));
        r.save(d.path()).unwrap();
        assert_eq!(Record::load(d.path()).unwrap(), Some(r.clone()));
        assert_eq!(r.shims(), ["wasm"]);
        Record::remove(d.path()).unwrap();
        Record::remove(d.path()).unwrap();
        assert_eq!(Record::load(d.path()).unwrap(), None);
    }
}
