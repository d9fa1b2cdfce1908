//! The jail shim's runtime options, and the copy kept in the bundle for the `delete` action.
//!
//! containerd sends one of:
//! - nothing (`ctr run --runtime io.containerd.jail.v2`): `runj` on `PATH`, no extension file;
//! - runj's own `wtf.sbk.runj.v1.CreateOptions` (`ip4mode` = 64, `ip4addr` = 65), which
//!   runj's Go shim reads;
//! - `runtimeoptions.v1.Options` (a CRI runtime handler's `options` TOML): `BinaryName`,
//!   `Ip4Mode`, `Ip4Addr`, `VnetMode`, `VnetInterfaces`, matched case-insensitively.
//!
//! Network settings become the bundle's `runj.ext.json`, which runj merges over `config.json`.

use std::fs;
use std::path::Path;

use protobuf::well_known_types::any::Any;
use protobuf::CodedInputStream;
use protocol::runtimeoptions::Options as RuntimeOptions;
use protocol::type_urls;
use serde_json::{json, Value};
use shim_common::{Context, Error, Result};

/// runj's own options message.
pub const RUNJ_OPTIONS: &str = "wtf.sbk.runj.v1.CreateOptions";
/// The file runj reads next to `config.json`.
pub const EXT_FILE: &str = "runj.ext.json";
const SAVED: &str = "jail-options.json";

/// How to run runj for one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JailConfig {
    /// runj binary: a name looked up on `PATH`, or a path.
    pub binary: String,
    pub ip4_mode: String,
    pub ip4_addr: Vec<String>,
    pub vnet_mode: String,
    pub vnet_interfaces: Vec<String>,
}

impl JailConfig {
    /// Reads containerd's options; an options type this shim does not know is an error.
    pub fn from_any(any: Option<&Any>) -> Result<JailConfig> {
        let mut c = match any {
            None => JailConfig::default(),
            Some(a) if a.type_url.is_empty() && a.value.is_empty() => JailConfig::default(),
            Some(a) => match a.type_url.rsplit('/').next().unwrap_or_default() {
                RUNJ_OPTIONS => from_runj_options(&a.value)?,
                type_urls::RUNTIME_OPTIONS => {
                    let ro = protobuf::Message::parse_from_bytes(&a.value)
                        .context("decode runtimeoptions.v1.Options")?;
                    from_runtime_options(&ro)?
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unsupported runtime options type {:?} (want {RUNJ_OPTIONS} or {})",
                        a.type_url,
                        type_urls::RUNTIME_OPTIONS
                    )))
                }
            },
        };
        if c.binary.is_empty() {
            c.binary = "runj".into();
        }
        Ok(c)
    }

    /// The `runj.ext.json` these options ask for, if any.
    pub fn ext(&self) -> Option<Value> {
        let mut network = serde_json::Map::new();
        if !self.ip4_mode.is_empty() || !self.ip4_addr.is_empty() {
            let mut v = json!({});
            if !self.ip4_mode.is_empty() {
                v["mode"] = json!(self.ip4_mode);
            }
            if !self.ip4_addr.is_empty() {
                v["addr"] = json!(self.ip4_addr);
            }
            network.insert("ipv4".into(), v);
        }
        if !self.vnet_mode.is_empty() || !self.vnet_interfaces.is_empty() {
            let mut v = json!({});
            if !self.vnet_mode.is_empty() {
                v["mode"] = json!(self.vnet_mode);
            }
            if !self.vnet_interfaces.is_empty() {
                v["interfaces"] = json!(self.vnet_interfaces);
            }
            network.insert("vnet".into(), v);
        }
        (!network.is_empty()).then(|| json!({ "network": network }))
    }

    /// Keeps the binary in the bundle for the `delete` action.
    pub fn save(&self, bundle: &Path) -> Result<()> {
        let text = json!({ "binary_name": self.binary }).to_string();
        fs::write(bundle.join(SAVED), text).context("write jail-options.json")
    }

    /// The options a container was created with, or the defaults.
    pub fn load(bundle: &Path) -> JailConfig {
        let saved = fs::read(bundle.join(SAVED))
            .ok()
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok());
        let binary = saved
            .as_ref()
            .and_then(|v| v["binary_name"].as_str())
            .unwrap_or("runj");
        JailConfig {
            binary: binary.into(),
            ..Default::default()
        }
    }
}

/// `wtf.sbk.runj.v1.CreateOptions { string ip4mode = 64; repeated string ip4addr = 65; }`,
/// decoded field by field (two strings do not warrant generated code); unknown fields are
/// skipped, as protobuf does.
fn from_runj_options(bytes: &[u8]) -> Result<JailConfig> {
    let mut c = JailConfig::default();
    let mut is = CodedInputStream::from_bytes(bytes);
    let bad = |e: protobuf::Error| Error::InvalidArgument(format!("decode {RUNJ_OPTIONS}: {e}"));
    while let Some(tag) = is.read_raw_tag_or_eof().map_err(bad)? {
        match (tag >> 3, tag & 7) {
            (64, 2) => c.ip4_mode = is.read_string().map_err(bad)?,
            (65, 2) => c.ip4_addr.push(is.read_string().map_err(bad)?),
            (_, wire) => {
                let wire = protobuf::rt::WireType::new(wire).ok_or_else(|| {
                    Error::InvalidArgument(format!("decode {RUNJ_OPTIONS}: bad wire type {wire}"))
                })?;
                is.skip_field(wire).map_err(bad)?;
            }
        }
    }
    Ok(c)
}

fn from_runtime_options(ro: &RuntimeOptions) -> Result<JailConfig> {
    let text = if ro.config_path.is_empty() {
        String::from_utf8(ro.config_body.clone()).map_err(|e| {
            Error::InvalidArgument(format!("runtime options config_body is not UTF-8: {e}"))
        })?
    } else {
        fs::read_to_string(&ro.config_path)
            .with_context(|| format!("read runtime options config_path {}", ro.config_path))?
    };
    from_toml(&text).map_err(|e| Error::InvalidArgument(format!("runtime options: {e}")))
}

fn from_toml(text: &str) -> std::result::Result<JailConfig, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("malformed TOML: {e}"))?;
    let mut c = JailConfig::default();
    for (key, value) in &table {
        let string = || {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{key} must be a string"))
        };
        let list = || {
            value
                .as_array()
                .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect())
                .ok_or_else(|| format!("{key} must be a list of strings"))
        };
        match key.to_ascii_lowercase().replace('_', "").as_str() {
            "binaryname" => c.binary = string()?,
            "ip4mode" => c.ip4_mode = string()?,
            "ip4addr" => c.ip4_addr = list()?,
            "vnetmode" => c.vnet_mode = string()?,
            "vnetinterfaces" => c.vnet_interfaces = list()?,
            _ => log::warn!("runtime options: ignoring unknown key {key:?}"),
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runj_any(fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        {
            let mut os = protobuf::CodedOutputStream::vec(&mut value);
            for (n, s) in fields {
                os.write_string(*n, s).unwrap();
            }
            os.write_string(7, "unknown field, skipped").unwrap();
            os.flush().unwrap();
        }
        Any {
            type_url: format!("type.googleapis.com/{RUNJ_OPTIONS}"),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn no_options_means_runj_on_path_and_no_ext_file() {
        let c = JailConfig::from_any(None).unwrap();
        assert_eq!(c.binary, "runj");
        assert_eq!(c.ext(), None);
    }

    #[test]
    fn runj_create_options_become_runj_ext_json() {
        let any = runj_any(&[(64, "new"), (65, "10.0.0.2"), (65, "10.0.0.3")]);
        let c = JailConfig::from_any(Some(&any)).unwrap();
        assert_eq!(
            c.ext().unwrap(),
            json!({"network": {"ipv4": {"mode": "new", "addr": ["10.0.0.2", "10.0.0.3"]}}})
        );
    }

    #[test]
    fn cri_toml_options_map_to_binary_and_network() {
        let any = protocol::pack(&RuntimeOptions {
            config_body:
                b"BinaryName = \"/opt/runj\"\nvnet_mode = \"new\"\nVnetInterfaces = [\"epair0b\"]\n"
                    .to_vec(),
            ..Default::default()
        })
        .unwrap();
        let c = JailConfig::from_any(Some(&any)).unwrap();
        assert_eq!(c.binary, "/opt/runj");
        assert_eq!(
            c.ext().unwrap(),
            json!({"network": {"vnet": {"mode": "new", "interfaces": ["epair0b"]}}})
        );
        let bad = protocol::pack(&RuntimeOptions {
            config_body: b"Ip4Addr = \"10.0.0.1\"".to_vec(),
            ..Default::default()
        })
        .unwrap();
        let err = JailConfig::from_any(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("Ip4Addr must be a list"), "{err}");
    }

    #[test]
    fn runc_options_are_refused() {
        let any = protocol::pack(&protocol::options::Options::default()).unwrap();
        let err = JailConfig::from_any(Some(&any)).unwrap_err().to_string();
        assert!(err.contains("unsupported runtime options type"), "{err}");
    }

    #[test]
    fn saved_binary_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(JailConfig::load(dir.path()).binary, "runj");
        let c = JailConfig {
            binary: "/opt/runj".into(),
            ..Default::default()
        };
        c.save(dir.path()).unwrap();
        assert_eq!(JailConfig::load(dir.path()).binary, "/opt/runj");
    }
}
