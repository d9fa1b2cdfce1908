//! Runtime options: decoded once by the SDK, from whichever form containerd sent, and kept in
//! the bundle so the `delete` action of a dead daemon gets the same values.
//!
//! containerd sends a backend's own message (`containerd.runc.v1.Options`, ...) or, for a CRI
//! runtime handler whose type is not the runtime's own, `runtimeoptions.v1.Options`: the
//! handler's `options` TOML section, in `config_body` or in the file at `config_path`. Its keys
//! are the Go field names of the runtime's message (`BinaryName`, `SystemdCgroup`), matched
//! case-insensitively as Go's TOML decoders do; keys a runtime does not know are ignored, as
//! containerd ignores them. Any other type is an error, never a silent default.
//!
//! ```
//! use shim_common::options::{self, RuntimeOptions, Toml};
//! #[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
//! struct Mine { binary: String }
//! impl RuntimeOptions for Mine {
//!     const TYPE_URL: Option<&'static str> = Some("example.mine.v1.Options");
//!     fn set(&mut self, key: &str, value: &Toml) -> Result<bool, String> {
//!         match key {
//!             "binaryname" => self.binary = options::string(value)?,
//!             _ => return Ok(false),
//!         }
//!         Ok(true)
//!     }
//! }
//! let mine: Mine = options::decode(None)?;
//! # Ok::<(), shim_common::Error>(())
//! ```

use std::fs;
use std::path::Path;

use protobuf::well_known_types::any::Any;
use protobuf::Message;
use protocol::runtimeoptions::Options as CriOptions;
use protocol::type_urls::RUNTIME_OPTIONS;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::stdio::IoOwner;

/// A TOML value of a CRI runtime handler's options.
pub use toml::Value as Toml;

/// Where the SDK keeps a container's decoded options, inside its bundle.
pub const SAVED: &str = "options.json";

/// A backend's runtime options, as the SDK decodes them for it.
pub trait RuntimeOptions:
    Default + Clone + Send + Sync + Serialize + DeserializeOwned + 'static
{
    /// The full name of the runtime's own protobuf message. `None`: the runtime takes no
    /// options and ignores whatever it is sent.
    const TYPE_URL: Option<&'static str>;

    /// Decodes the runtime's own message ([`RuntimeOptions::TYPE_URL`]).
    fn from_proto(_bytes: &[u8]) -> Result<Self> {
        Err(Error::InvalidArgument(
            "this runtime reads its options only as CRI TOML".into(),
        ))
    }

    /// Sets one key of a CRI handler's options TOML. `key` is lower-case without `_`
    /// (`binaryname`); `Ok(false)`: a key this runtime does not know (logged, ignored);
    /// `Err`: why the value is wrong.
    fn set(&mut self, key: &str, value: &Toml) -> std::result::Result<bool, String>;

    /// Who owns the container's stdio pipes.
    fn io_owner(&self) -> IoOwner {
        IoOwner::default()
    }
}

/// The runtime takes no options.
impl RuntimeOptions for () {
    const TYPE_URL: Option<&'static str> = None;

    fn set(&mut self, _: &str, _: &Toml) -> std::result::Result<bool, String> {
        Ok(false)
    }
}

/// Decodes the options of `Create` (or of `start` and `-info`): none means the defaults.
pub fn decode<O: RuntimeOptions>(any: Option<&Any>) -> Result<O> {
    let Some(any) = any.filter(|a| !(a.type_url.is_empty() && a.value.is_empty())) else {
        return Ok(O::default());
    };
    let Some(own) = O::TYPE_URL else {
        log::debug!("ignoring runtime options of type {:?}", any.type_url);
        return Ok(O::default());
    };
    match any.type_url.rsplit('/').next().unwrap_or_default() {
        name if name == own => O::from_proto(&any.value),
        RUNTIME_OPTIONS => {
            let cri = CriOptions::parse_from_bytes(&any.value)
                .context("decode runtimeoptions.v1.Options")?;
            from_cri(&cri, own)
        }
        _ => Err(Error::InvalidArgument(format!(
            "unsupported runtime options type {:?} (want {own} or {RUNTIME_OPTIONS})",
            any.type_url
        ))),
    }
}

/// `config_path` wins over `config_body`, as in containerd's CRI (which fills the body only
/// when no path is configured).
fn from_cri<O: RuntimeOptions>(cri: &CriOptions, own: &str) -> Result<O> {
    let url = cri.type_url.rsplit('/').next().unwrap_or_default();
    if !url.is_empty() && url != own {
        return Err(Error::InvalidArgument(format!(
            "runtimeoptions.v1.Options.type_url {:?}: this shim reads {own} in TOML",
            cri.type_url
        )));
    }
    let (text, origin) = cri_text(cri)?;
    from_toml(&text).map_err(|e| Error::InvalidArgument(format!("runtime options {origin}: {e}")))
}

/// A CRI handler's options TOML, and where it came from.
fn cri_text(cri: &CriOptions) -> Result<(String, String)> {
    if cri.config_path.is_empty() {
        let body = std::str::from_utf8(&cri.config_body).map_err(|e| {
            Error::InvalidArgument(format!("runtime options config_body is not UTF-8: {e}"))
        })?;
        Ok((body.to_string(), "config_body".to_string()))
    } else {
        let text = fs::read_to_string(&cri.config_path)
            .with_context(|| format!("read runtime options config_path {}", cri.config_path))?;
        Ok((text, format!("config_path {}", cri.config_path)))
    }
}

/// The SDK's own key of a CRI handler's options, which every shim reads: `Tracing`, a table
/// of `OTEL_*` variables for the shim's daemon, over what it inherits from containerd's
/// environment (see [`crate::trace`]). Read by `start`, so the first container of a group
/// sets them for its daemon.
const TRACING_KEY: &str = "tracing";

/// The `Tracing` table of `any`'s CRI options as environment variables; none for options of
/// another form or without it.
pub fn tracing_env(any: Option<&Any>) -> Result<Vec<(String, String)>> {
    let Some(any) = any.filter(|a| a.type_url.rsplit('/').next() == Some(RUNTIME_OPTIONS)) else {
        return Ok(Vec::new());
    };
    let cri =
        CriOptions::parse_from_bytes(&any.value).context("decode runtimeoptions.v1.Options")?;
    let (text, origin) = cri_text(&cri)?;
    let bad = |e: String| Error::InvalidArgument(format!("runtime options {origin}: {e}"));
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| bad(format!("malformed TOML: {e}")))?;
    match table.iter().find(|(k, _)| key_name(k) == TRACING_KEY) {
        Some((key, value)) => tracing_vars(value).map_err(|e| bad(format!("{key}: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// `Tracing`'s entries: `OTEL_*` names with string (or number, or boolean) values.
fn tracing_vars(value: &Toml) -> std::result::Result<Vec<(String, String)>, String> {
    let table = value.as_table().ok_or_else(|| {
        format!(
            "must be a table of OTEL_* variables, not {}",
            value.type_str()
        )
    })?;
    let mut vars = Vec::new();
    for (name, v) in table {
        if !name.starts_with("OTEL_") {
            return Err(format!("{name}: only OTEL_* variables are read here"));
        }
        let v = match v {
            Toml::String(s) => s.clone(),
            Toml::Integer(i) => i.to_string(),
            // serde_json's float formatting is in the binary already; std's would be more.
            Toml::Float(f) => serde_json::Number::from_f64(*f)
                .map(|n| n.to_string())
                .ok_or_else(|| format!("{name}: {f} is not a number"))?,
            Toml::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "{name}: must be a string, not {}",
                    other.type_str()
                ))
            }
        };
        vars.push((name.clone(), v));
    }
    Ok(vars)
}

/// Go's TOML decoders match field names case-insensitively; snake_case is the proto name.
fn key_name(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "")
}

fn from_toml<O: RuntimeOptions>(text: &str) -> std::result::Result<O, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("malformed TOML: {e}"))?;
    let mut options = O::default();
    for (key, value) in &table {
        let name = key_name(key);
        if name == TRACING_KEY {
            // The SDK's, for `start`; checked here so that `Create` refuses a bad one.
            tracing_vars(value).map_err(|e| format!("{key}: {e}"))?;
            continue;
        }
        let known = options
            .set(&name, value)
            .map_err(|e| format!("{key}: {e}"))?;
        if !known {
            log::warn!("runtime options: ignoring unknown key {key:?}");
        }
    }
    Ok(options)
}

/// Keeps a container's options in its bundle for the `delete` action.
pub fn save<O: RuntimeOptions>(bundle: &Path, options: &O) -> Result<()> {
    let json = serde_json::to_vec(options)
        .map_err(|e| Error::Runtime(format!("encode runtime options: {e}")))?;
    fs::write(bundle.join(SAVED), json).with_context(|| format!("write {SAVED}"))
}

/// The options a container was created with; the defaults when none were kept (a daemon that
/// died before `Create` wrote them) or they cannot be read.
pub fn load<O: RuntimeOptions>(bundle: &Path) -> O {
    let Ok(json) = fs::read(bundle.join(SAVED)) else {
        return O::default();
    };
    serde_json::from_slice(&json).unwrap_or_else(|e| {
        log::warn!("{}/{SAVED}: {e}; using default options", bundle.display());
        O::default()
    })
}

/// A TOML string.
pub fn string(v: &Toml) -> std::result::Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("must be a string, not {}", v.type_str()))
}

/// A TOML boolean.
pub fn boolean(v: &Toml) -> std::result::Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("must be a boolean, not {}", v.type_str()))
}

/// A TOML integer that fits a `u32` (a uid, a gid).
pub fn uint32(v: &Toml) -> std::result::Result<u32, String> {
    v.as_integer()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| format!("must be an integer from 0 to {}", u32::MAX))
}

/// A TOML list of strings.
pub fn strings(v: &Toml) -> std::result::Result<Vec<String>, String> {
    v.as_array()
        .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect())
        .ok_or_else(|| "must be a list of strings".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Opts {
        binary: String,
        flag: bool,
        uid: u32,
        list: Vec<String>,
    }

    impl RuntimeOptions for Opts {
        const TYPE_URL: Option<&'static str> = Some("example.v1.Options");

        fn from_proto(bytes: &[u8]) -> Result<Self> {
            Ok(Opts {
                binary: String::from_utf8_lossy(bytes).into(),
                ..Default::default()
            })
        }

        fn set(&mut self, key: &str, v: &Toml) -> std::result::Result<bool, String> {
            match key {
                "binaryname" => self.binary = string(v)?,
                "flag" => self.flag = boolean(v)?,
                "iouid" => self.uid = uint32(v)?,
                "list" => self.list = strings(v)?,
                _ => return Ok(false),
            }
            Ok(true)
        }
    }

    fn any(type_url: &str, value: &[u8]) -> Any {
        Any {
            type_url: type_url.into(),
            value: value.to_vec(),
            ..Default::default()
        }
    }

    fn cri(body: &str, path: &str) -> Any {
        protocol::pack(&CriOptions {
            config_body: body.as_bytes().to_vec(),
            config_path: path.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn the_tracing_table_sets_otel_variables_for_the_daemon() {
        let body = "BinaryName = \"crun\"\n[Tracing]\nOTEL_EXPORTER_OTLP_ENDPOINT = \"http://c:4318\"\nOTEL_TRACES_SAMPLER_ARG = 0.25\n";
        let options = cri(body, "");
        assert_eq!(
            tracing_env(Some(&options)).unwrap(),
            [
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                    "http://c:4318".to_string()
                ),
                ("OTEL_TRACES_SAMPLER_ARG".into(), "0.25".into()),
            ]
        );
        // The backend's keys are read as ever, the SDK's left to it.
        let o: Opts = decode(Some(&options)).unwrap();
        assert_eq!(o.binary, "crun");
        assert!(tracing_env(None).unwrap().is_empty());
        assert!(tracing_env(Some(&cri("BinaryName = \"x\"", "")))
            .unwrap()
            .is_empty());
        assert!(tracing_env(Some(&any("example.v1.Options", b"x")))
            .unwrap()
            .is_empty());
        // A bad table: `start` says why, `Create` refuses it.
        for bad in [
            "Tracing = 1",
            "[tracing]\nPATH = \"/x\"",
            "[Tracing]\nOTEL_X = [1]",
        ] {
            let e = tracing_env(Some(&cri(bad, ""))).unwrap_err().to_string();
            assert!(e.contains("acing"), "{bad}: {e}");
            assert!(decode::<Opts>(Some(&cri(bad, ""))).is_err(), "{bad}");
        }
    }

    #[test]
    fn none_own_type_and_unknown_type() {
        assert_eq!(decode::<Opts>(None).unwrap(), Opts::default());
        assert_eq!(
            decode::<Opts>(Some(&any("", b""))).unwrap(),
            Opts::default()
        );
        let own = decode::<Opts>(Some(&any("types.example/example.v1.Options", b"x"))).unwrap();
        assert_eq!(own.binary, "x");
        let err = decode::<Opts>(Some(&any("example.com/Bogus", b"1"))).unwrap_err();
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.to_string().contains("unsupported runtime options type"));
        // A runtime without options takes whatever it is sent.
        decode::<()>(Some(&any("example.com/Bogus", b"1"))).unwrap();
    }

    #[test]
    fn cri_toml_keys_match_like_go() {
        let o: Opts = decode(Some(&cri(
            "BinaryName = \"crun\"\nFLAG = true\nio_uid = 7\nList = [\"a\"]\nSomethingNew = 1\n",
            "",
        )))
        .unwrap();
        assert_eq!(
            o,
            Opts {
                binary: "crun".into(),
                flag: true,
                uid: 7,
                list: vec!["a".into()],
            }
        );
    }

    #[test]
    fn cri_config_path_wins_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("opts.toml");
        fs::write(&file, "binaryname = \"from-file\"").unwrap();
        let o: Opts = decode(Some(&cri(
            "BinaryName = \"ignored\"",
            file.to_str().unwrap(),
        )))
        .unwrap();
        assert_eq!(o.binary, "from-file");
        let err = decode::<Opts>(Some(&cri("", "/nonexistent/opts.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/opts.toml"), "{err}");
    }

    #[test]
    fn malformed_cri_options_say_where_and_why() {
        for (body, want) in [
            ("BinaryName = ", "malformed TOML"),
            ("[unclosed", "malformed TOML"),
            ("Flag = \"yes\"", "Flag: must be a boolean"),
            ("IoUid = -1", "IoUid: must be an integer"),
            ("List = \"a\"", "List: must be a list of strings"),
        ] {
            let err = decode::<Opts>(Some(&cri(body, ""))).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{body}: {err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("config_body") && msg.contains(want),
                "{body}: {msg}"
            );
        }
        let other = protocol::pack(&CriOptions {
            type_url: "io.example.Config".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(decode::<Opts>(Some(&other)).is_err());
    }

    #[test]
    fn saved_options_round_trip_and_default_when_absent_or_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load::<Opts>(dir.path()), Opts::default());
        let o = Opts {
            binary: "crun".into(),
            flag: true,
            ..Default::default()
        };
        save(dir.path(), &o).unwrap();
        assert_eq!(load::<Opts>(dir.path()), o);
        fs::write(dir.path().join(SAVED), "{not json").unwrap();
        assert_eq!(load::<Opts>(dir.path()), Opts::default());
    }
}
