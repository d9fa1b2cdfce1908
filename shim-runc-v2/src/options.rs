//! The runc shim's options: what containerd sends in `Create`, and the copy kept in the
//! bundle so the `delete` action can find the container after the daemon died.
//!
//! containerd sends either `containerd.runc.v1.Options` or, for a CRI runtime configured
//! with a type other than `io.containerd.runc.v1/v2`, `runtimeoptions.v1.Options`: the
//! runtime's `options` TOML section, in `config_body` or in the file at `config_path`. Its
//! keys are the runc options' Go field names, as in containerd's `config.toml`
//! (`BinaryName`, `Root`, `SystemdCgroup`, ...), matched case-insensitively like Go's TOML
//! decoders do; keys this shim does not know are ignored, as containerd ignores them.

use std::fs;
use std::path::{Path, PathBuf};

use protobuf::well_known_types::any::Any;
use protobuf::Message;
use protocol::options::Options;
use protocol::runtimeoptions::Options as RuntimeOptions;
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
    /// The cgroup `start` moves the shim daemon into; empty: none.
    pub shim_cgroup: String,
}

impl RuncConfig {
    /// Reads containerd's options. No options means runc's defaults; an options type
    /// this shim does not know is an error, not a silent default.
    pub fn from_any(any: Option<&Any>, namespace: &str) -> Result<RuncConfig> {
        let opts = match any {
            None => Options::default(),
            Some(a) if a.type_url.is_empty() && a.value.is_empty() => Options::default(),
            Some(a) => match a.type_url.rsplit('/').next().unwrap_or_default() {
                type_urls::RUNC_OPTIONS => {
                    Options::parse_from_bytes(&a.value).context("decode runc options")?
                }
                type_urls::RUNTIME_OPTIONS => {
                    let ro = RuntimeOptions::parse_from_bytes(&a.value)
                        .context("decode runtimeoptions.v1.Options")?;
                    from_runtime_options(&ro)?
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unsupported runtime options type {:?} (want {} or {})",
                        a.type_url,
                        type_urls::RUNC_OPTIONS,
                        type_urls::RUNTIME_OPTIONS
                    )))
                }
            },
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
            shim_cgroup: o.shim_cgroup.clone(),
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

/// The TOML of `runtimeoptions.v1.Options`: `config_path` wins over `config_body`, as in
/// containerd's CRI (which only fills the body when no path is configured).
fn from_runtime_options(ro: &RuntimeOptions) -> Result<Options> {
    let url = ro.type_url.rsplit('/').next().unwrap_or_default();
    if !url.is_empty() && url != type_urls::RUNC_OPTIONS {
        return Err(Error::InvalidArgument(format!(
            "runtimeoptions.v1.Options.type_url {:?}: this shim reads {} in TOML",
            ro.type_url,
            type_urls::RUNC_OPTIONS
        )));
    }
    let (text, origin) = if ro.config_path.is_empty() {
        let body = std::str::from_utf8(&ro.config_body).map_err(|e| {
            Error::InvalidArgument(format!("runtime options config_body is not UTF-8: {e}"))
        })?;
        (body.to_string(), "config_body".to_string())
    } else {
        let text = fs::read_to_string(&ro.config_path)
            .with_context(|| format!("read runtime options config_path {}", ro.config_path))?;
        (text, format!("config_path {}", ro.config_path))
    };
    options_from_toml(&text)
        .map_err(|e| Error::InvalidArgument(format!("runtime options {origin}: {e}")))
}

/// Maps the runc options' TOML keys onto `Options`; says which key is wrong and why.
fn options_from_toml(text: &str) -> std::result::Result<Options, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("malformed TOML: {e}"))?;
    let mut o = Options::default();
    for (key, value) in &table {
        let string = |v: &toml::Value| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{key} must be a string, not {}", v.type_str()))
        };
        let boolean = |v: &toml::Value| {
            v.as_bool()
                .ok_or_else(|| format!("{key} must be a boolean, not {}", v.type_str()))
        };
        let id = |v: &toml::Value| {
            v.as_integer()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| format!("{key} must be an integer from 0 to {}", u32::MAX))
        };
        // Go's TOML decoders match field names case-insensitively; snake_case is the proto name.
        match key.to_ascii_lowercase().replace('_', "").as_str() {
            "binaryname" => o.binary_name = string(value)?,
            "root" => o.root = string(value)?,
            "systemdcgroup" => o.systemd_cgroup = boolean(value)?,
            "nopivotroot" => o.no_pivot_root = boolean(value)?,
            "nonewkeyring" => o.no_new_keyring = boolean(value)?,
            "iouid" => o.io_uid = id(value)?,
            "iogid" => o.io_gid = id(value)?,
            "shimcgroup" => o.shim_cgroup = string(value)?,
            "criupath" => o.criu_path = string(value)?,
            "criuimagepath" => o.criu_image_path = string(value)?,
            "criuworkpath" => o.criu_work_path = string(value)?,
            _ => log::warn!("runtime options: ignoring unknown key {key:?}"),
        }
    }
    Ok(o)
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

    fn runtime_options(body: &str, path: &str) -> Any {
        protocol::pack(&RuntimeOptions {
            config_body: body.as_bytes().to_vec(),
            config_path: path.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn runtimeoptions_toml_body_maps_like_cri() {
        let any = runtime_options(
            "BinaryName = \"crun\"\nRoot = \"/r\"\nSystemdCgroup = true\nIoUid = 7\n\
             no_new_keyring = true\nShimCgroup = \"\"\nSomethingNew = 1\n",
            "",
        );
        let c = RuncConfig::from_any(Some(&any), "ns").unwrap();
        assert_eq!(c.binary, "crun");
        assert_eq!(c.root, Path::new("/r/ns"));
        assert!(c.systemd_cgroup && c.no_new_keyring);
        assert_eq!(c.io_uid, 7);
    }

    #[test]
    fn runtimeoptions_config_path_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runc.toml");
        fs::write(&file, "binaryname = \"runc-from-file\"").unwrap();
        let any = runtime_options("BinaryName = \"ignored\"", file.to_str().unwrap());
        let c = RuncConfig::from_any(Some(&any), "ns").unwrap();
        assert_eq!(c.binary, "runc-from-file");
        let missing = runtime_options("", "/nonexistent/runc.toml");
        let err = RuncConfig::from_any(Some(&missing), "ns").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/runc.toml"), "{err}");
    }

    #[test]
    fn malformed_runtimeoptions_are_invalid_arguments() {
        for (body, want) in [
            ("BinaryName = ", "malformed TOML"),
            ("[unclosed", "malformed TOML"),
            ("SystemdCgroup = \"yes\"", "SystemdCgroup must be a boolean"),
            ("IoUid = -1", "IoUid must be an integer"),
        ] {
            let err = RuncConfig::from_any(Some(&runtime_options(body, "")), "ns").unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{body}: {err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("config_body") && msg.contains(want),
                "{body}: {msg}"
            );
        }
        let other = protocol::pack(&RuntimeOptions {
            type_url: "io.example.Config".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(RuncConfig::from_any(Some(&other), "ns").is_err());
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
