//! The runc shim's options: containerd's `containerd.runc.v1.Options` (or the same fields as a
//! CRI handler's TOML, which the SDK reads through [`RuntimeOptions::set`]), defaults filled.

use std::path::PathBuf;

use protobuf::Message;
use protocol::options::Options;
use protocol::type_urls;
use shim_common::options::{self as opt, Toml};
use shim_common::stdio::IoOwner;
use shim_common::{Context, Result, RuntimeOptions};

/// runc's state root before the namespace is appended (containerd's default).
pub const DEFAULT_ROOT: &str = "/run/containerd/runc";

/// How to run runc for one container: containerd's runc `Options`, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RuncConfig {
    pub binary: String,
    /// runc `--root` before the namespace is appended.
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    pub io_uid: u32,
    pub io_gid: u32,
    /// CRIU binary for checkpoint/restore (`criu` on `PATH` by default).
    pub criu: String,
    /// The cgroup `start` moves the shim daemon into; empty: none.
    pub shim_cgroup: String,
}

impl Default for RuncConfig {
    fn default() -> Self {
        RuncConfig::from(&Options::default())
    }
}

impl From<&Options> for RuncConfig {
    fn from(o: &Options) -> RuncConfig {
        let or = |v: &str, default: &str| match v {
            "" => default.to_string(),
            v => v.to_string(),
        };
        RuncConfig {
            binary: or(&o.binary_name, "runc"),
            root: or(&o.root, DEFAULT_ROOT).into(),
            systemd_cgroup: o.systemd_cgroup,
            no_pivot_root: o.no_pivot_root,
            no_new_keyring: o.no_new_keyring,
            io_uid: o.io_uid,
            io_gid: o.io_gid,
            criu: or(&o.criu_path, "criu"),
            shim_cgroup: o.shim_cgroup.clone(),
        }
    }
}

impl RuntimeOptions for RuncConfig {
    const TYPE_URL: Option<&'static str> = Some(type_urls::RUNC_OPTIONS);

    fn from_proto(bytes: &[u8]) -> Result<Self> {
        let o = Options::parse_from_bytes(bytes).context("decode runc options")?;
        Ok(RuncConfig::from(&o))
    }

    /// The runc `Options` field names, as in containerd's `config.toml`.
    fn set(&mut self, key: &str, v: &Toml) -> std::result::Result<bool, String> {
        match key {
            "binaryname" => self.binary = opt::string(v)?,
            "root" => self.root = opt::string(v)?.into(),
            "systemdcgroup" => self.systemd_cgroup = opt::boolean(v)?,
            "nopivotroot" => self.no_pivot_root = opt::boolean(v)?,
            "nonewkeyring" => self.no_new_keyring = opt::boolean(v)?,
            "iouid" => self.io_uid = opt::uint32(v)?,
            "iogid" => self.io_gid = opt::uint32(v)?,
            "shimcgroup" => self.shim_cgroup = opt::string(v)?,
            "criupath" => self.criu = opt::string(v)?,
            // Checkpoint defaults containerd itself applies; known, not ours to use.
            "criuimagepath" | "criuworkpath" => drop(opt::string(v)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn io_owner(&self) -> IoOwner {
        let set = |v: u32| (v != 0).then_some(v);
        IoOwner {
            uid: set(self.io_uid),
            gid: set(self.io_gid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::runtimeoptions::Options as CriOptions;
    use std::path::Path;

    #[test]
    fn defaults() {
        let c: RuncConfig = opt::decode(None).unwrap();
        assert_eq!((c.binary.as_str(), c.criu.as_str()), ("runc", "criu"));
        assert_eq!(c.root, Path::new(DEFAULT_ROOT));
    }

    #[test]
    fn runc_options_are_honoured() {
        let opts = Options {
            binary_name: "crun".into(),
            root: "/r".into(),
            systemd_cgroup: true,
            io_uid: 7,
            ..Default::default()
        };
        let c: RuncConfig = opt::decode(Some(&protocol::pack(&opts).unwrap())).unwrap();
        assert_eq!(
            (c.binary.as_str(), c.root.as_path(), c.systemd_cgroup),
            ("crun", Path::new("/r"), true)
        );
        assert_eq!(c.io_owner().uid, Some(7));
        assert_eq!(c.io_owner().gid, None);
    }

    #[test]
    fn runtimeoptions_toml_maps_like_cri() {
        let any = protocol::pack(&CriOptions {
            config_body: b"BinaryName = \"crun\"\nRoot = \"/r\"\nSystemdCgroup = true\n\
                no_new_keyring = true\nCriuWorkPath = \"/w\"\nSomethingNew = 1\n"
                .to_vec(),
            ..Default::default()
        })
        .unwrap();
        let c: RuncConfig = opt::decode(Some(&any)).unwrap();
        assert_eq!(c.binary, "crun");
        assert_eq!(c.root, Path::new("/r"));
        assert!(c.systemd_cgroup && c.no_new_keyring);
    }
}
