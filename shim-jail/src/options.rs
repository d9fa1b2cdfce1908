//! The jail shim's runtime options, as the SDK decodes them.
//!
//! containerd sends one of:
//! - nothing (`ctr run --runtime io.containerd.jail.v2`): `runj` on `PATH`, no extension file;
//! - runj's own `wtf.sbk.runj.v1.CreateOptions` (`ip4mode` = 64, `ip4addr` = 65), which
//!   runj's Go shim reads;
//! - `runtimeoptions.v1.Options` (a CRI runtime handler's `options` TOML): `BinaryName`,
//!   `Ip4Mode`, `Ip4Addr`, `VnetMode`, `VnetInterfaces`, matched case-insensitively.
//!
//! Network settings become the bundle's `runj.ext.json`, which runj merges over `config.json`.

use protobuf::CodedInputStream;
use serde_json::{json, Value};
use shim_common::options::{self as opt, Toml};
use shim_common::{Error, Result, RuntimeOptions};

/// runj's own options message.
pub const RUNJ_OPTIONS: &str = "wtf.sbk.runj.v1.CreateOptions";
/// The file runj reads next to `config.json`.
pub const EXT_FILE: &str = "runj.ext.json";

/// How to run runj for one container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JailConfig {
    /// runj binary: a name looked up on `PATH`, or a path.
    pub binary: String,
    pub ip4_mode: String,
    pub ip4_addr: Vec<String>,
    pub vnet_mode: String,
    pub vnet_interfaces: Vec<String>,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            binary: "runj".into(),
            ip4_mode: String::new(),
            ip4_addr: Vec::new(),
            vnet_mode: String::new(),
            vnet_interfaces: Vec::new(),
        }
    }
}

impl RuntimeOptions for JailConfig {
    const TYPE_URL: Option<&'static str> = Some(RUNJ_OPTIONS);

    /// `wtf.sbk.runj.v1.CreateOptions { string ip4mode = 64; repeated string ip4addr = 65; }`,
    /// decoded field by field (two strings do not warrant generated code); unknown fields
    /// are skipped, as protobuf does.
    fn from_proto(bytes: &[u8]) -> Result<Self> {
        let mut c = JailConfig::default();
        let mut is = CodedInputStream::from_bytes(bytes);
        let bad =
            |e: protobuf::Error| Error::InvalidArgument(format!("decode {RUNJ_OPTIONS}: {e}"));
        while let Some(tag) = is.read_raw_tag_or_eof().map_err(bad)? {
            match (tag >> 3, tag & 7) {
                (64, 2) => c.ip4_mode = is.read_string().map_err(bad)?,
                (65, 2) => c.ip4_addr.push(is.read_string().map_err(bad)?),
                (_, wire) => {
                    let wire = protobuf::rt::WireType::new(wire).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "decode {RUNJ_OPTIONS}: bad wire type {wire}"
                        ))
                    })?;
                    is.skip_field(wire).map_err(bad)?;
                }
            }
        }
        Ok(c)
    }

    fn set(&mut self, key: &str, v: &Toml) -> std::result::Result<bool, String> {
        match key {
            "binaryname" => self.binary = opt::string(v)?,
            "ip4mode" => self.ip4_mode = opt::string(v)?,
            "ip4addr" => self.ip4_addr = opt::strings(v)?,
            "vnetmode" => self.vnet_mode = opt::string(v)?,
            "vnetinterfaces" => self.vnet_interfaces = opt::strings(v)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl JailConfig {
    /// The `runj.ext.json` these options ask for, if any.
    pub fn ext(&self) -> Option<Value> {
        let section = |mode: &str, key: &str, list: &[String]| {
            let mut v = json!({});
            if !mode.is_empty() {
                v["mode"] = json!(mode);
            }
            if !list.is_empty() {
                v[key] = json!(list);
            }
            (!mode.is_empty() || !list.is_empty()).then_some(v)
        };
        let mut network = serde_json::Map::new();
        if let Some(v) = section(&self.ip4_mode, "addr", &self.ip4_addr) {
            network.insert("ipv4".into(), v);
        }
        if let Some(v) = section(&self.vnet_mode, "interfaces", &self.vnet_interfaces) {
            network.insert("vnet".into(), v);
        }
        (!network.is_empty()).then(|| json!({ "network": network }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::well_known_types::any::Any;
    use protocol::runtimeoptions::Options as RuntimeOptions;

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
        let c = opt::decode::<JailConfig>(None).unwrap();
        assert_eq!(c.binary, "runj");
        assert_eq!(c.ext(), None);
    }

    #[test]
    fn runj_create_options_become_runj_ext_json() {
        let any = runj_any(&[(64, "new"), (65, "10.0.0.2"), (65, "10.0.0.3")]);
        let c = opt::decode::<JailConfig>(Some(&any)).unwrap();
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
        let c = opt::decode::<JailConfig>(Some(&any)).unwrap();
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
        let err = opt::decode::<JailConfig>(Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Ip4Addr: must be a list"), "{err}");
    }

    #[test]
    fn runc_options_are_refused() {
        let any = protocol::pack(&protocol::options::Options::default()).unwrap();
        let err = opt::decode::<JailConfig>(Some(&any))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported runtime options type"), "{err}");
    }
}
