//! The runc shim's options: what containerd sends in `Create`, and the copy kept in the
//! bundle so the `delete` action can find the container after the daemon died.

use std::fs;
use std::path::{Path, PathBuf};

use protobuf::well_known_types::any::Any;
use protobuf::Message;
use protocol::options::Options;
use protocol::type_urls;
use shim_common::{Context, Error, Result};

/// runc's state root before the namespace is appended (containerd's default).
pub const DEFAULT_ROOT: &str = "/run/containerd/runc";
/// Where the options of a container are kept, inside its bundle.
const SAVED: &str = "options.json";

/// How to run runc for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncConfig {
    pub binary: String,
    /// runc `--root`, namespace included.
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    pub io_uid: u32,
    pub io_gid: u32,
    /// CRIU binary for checkpoint/restore (`criu` on `PATH` when empty).
    pub criu: String,
}

impl RuncConfig {
    /// Reads containerd's options. No options means runc's defaults; an options type
    /// this shim does not know is an error, not a silent default.
    pub fn from_any(any: Option<&Any>, namespace: &str) -> Result<RuncConfig> {
        let opts = match any {
            None => Options::default(),
            Some(a) if a.type_url.is_empty() && a.value.is_empty() => Options::default(),
            Some(a) => {
                let url = a.type_url.rsplit('/').next().unwrap_or_default();
                if url != type_urls::RUNC_OPTIONS {
                    return Err(Error::InvalidArgument(format!(
                        "unsupported runtime options type {:?} (want {})",
                        a.type_url,
                        type_urls::RUNC_OPTIONS
                    )));
                }
                Options::parse_from_bytes(&a.value).context("decode runc options")?
            }
        };
        Ok(Self::from_options(&opts, namespace))
    }

    fn from_options(o: &Options, namespace: &str) -> RuncConfig {
        let root = if o.root.is_empty() {
            DEFAULT_ROOT
        } else {
            &o.root
        };
        RuncConfig {
            binary: if o.binary_name.is_empty() {
                "runc".into()
            } else {
                o.binary_name.clone()
            },
            root: Path::new(root).join(namespace),
            systemd_cgroup: o.systemd_cgroup,
            no_pivot_root: o.no_pivot_root,
            no_new_keyring: o.no_new_keyring,
            io_uid: o.io_uid,
            io_gid: o.io_gid,
            criu: if o.criu_path.is_empty() {
                "criu".into()
            } else {
                o.criu_path.clone()
            },
        }
    }

    /// Keeps the options in the bundle for the `delete` action.
    pub fn save(&self, bundle: &Path) -> Result<()> {
        let json = serde_json::json!({
            "binary_name": self.binary,
            "root": self.root,
            "systemd_cgroup": self.systemd_cgroup,
            "criu_path": self.criu,
        });
        fs::write(bundle.join(SAVED), json.to_string()).context("write options.json")
    }

    /// The options a container was created with, or the defaults if none were kept.
    pub fn load(bundle: &Path, namespace: &str) -> RuncConfig {
        let mut config = Self::from_options(&Options::default(), namespace);
        let Ok(text) = fs::read(bundle.join(SAVED)) else {
            return config;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
            return config;
        };
        if let Some(b) = v["binary_name"].as_str() {
            config.binary = b.to_string();
        }
        if let Some(r) = v["root"].as_str() {
            config.root = PathBuf::from(r);
        }
        config.systemd_cgroup = v["systemd_cgroup"].as_bool().unwrap_or(false);
        if let Some(c) = v["criu_path"].as_str() {
            config.criu = c.to_string();
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_namespace_root() {
        let c = RuncConfig::from_any(None, "k8s.io").unwrap();
        assert_eq!(c.binary, "runc");
        assert_eq!(c.root, Path::new("/run/containerd/runc/k8s.io"));
    }

    #[test]
    fn runc_options_are_honoured() {
        let opts = Options {
            binary_name: "crun".into(),
            root: "/r".into(),
            systemd_cgroup: true,
            ..Default::default()
        };
        let any = protocol::pack(&opts).unwrap();
        let c = RuncConfig::from_any(Some(&any), "ns").unwrap();
        assert_eq!(
            (c.binary.as_str(), c.root.as_path(), c.systemd_cgroup),
            ("crun", Path::new("/r/ns"), true)
        );
    }

    #[test]
    fn unknown_options_type_is_rejected() {
        let any = Any {
            type_url: "example.com/Bogus".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        let err = RuncConfig::from_any(Some(&any), "ns")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported runtime options type"), "{err}");
    }

    #[test]
    fn saved_options_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let c = RuncConfig::from_options(
            &Options {
                binary_name: "crun".into(),
                ..Default::default()
            },
            "ns",
        );
        c.save(dir.path()).unwrap();
        assert_eq!(RuncConfig::load(dir.path(), "ns"), c);
    }
}
