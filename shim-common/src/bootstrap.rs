//! What each containerd generation writes on the stdin of `<shim> start`, and the answer it
//! expects on stdout.
//!
//! | containerd | stdin | answer the shim prints |
//! |---|---|---|
//! | 1.6 | runtime options: a protobuf `Any` (or nothing) | the plain address; nothing else parses |
//! | 1.7 | the same; env adds `GRPC_ADDRESS`, `NAMESPACE`, `MAX_SHIM_VERSION=2` | plain address, or JSON `{"version":2,...}`; version 3 is refused |
//! | 2.0–2.2 | the same, same env (`MAX_SHIM_VERSION` stays `2`) | plain address (taken as version 2, ttrpc), or JSON with version 2 or 3 |
//! | 2.3+ | a protobuf [`BootstrapParams`] carrying id, namespace, addresses, log level, and the options as an extension | a protobuf [`BootstrapResult`] |
//!
//! Nothing tells 2.0–2.2 apart from 1.7: both set the same env and write the same stdin, and
//! `MAX_SHIM_VERSION` is documented as "always 2". JSON version 3 would break 1.7, so a
//! pre-2.3 caller gets the plain address, which every generation accepts (2.x then talks
//! `containerd.task.v2.Task`, served alongside v3). Only a caller announcing
//! `MAX_SHIM_VERSION>=3` gets JSON version 3.
//!
//! 2.3 announces the bootstrap protocol neither by flag nor by env: its stdin simply is a
//! `BootstrapParams`. An `Any` also decodes as one (fields 1 and 2 are strings in both), so, as
//! containerd's own shims do, the message counts as `BootstrapParams` only when its
//! `instance_id` and `namespace` match `-id` and `-namespace`.

use protobuf::well_known_types::any::Any;
use protobuf::{Enum, Message};
use protocol::bootstrap::{BootstrapParams, BootstrapResult, LogLevel};
use protocol::introspection::{RuntimeInfo, RuntimeVersion};

use crate::error::{Context, Error, Result};
use crate::flags::Flags;

/// Env var containerd 1.7+ sets to the highest `version` it accepts in a JSON answer.
pub const MAX_SHIM_VERSION_ENV: &str = "MAX_SHIM_VERSION";
/// The task API version the SDK serves at best: `containerd.task.v3.Task` (v2 is served too).
pub const TASK_API_VERSION: u32 = 3;
/// The oldest task API the SDK serves, and the lowest `MAX_SHIM_VERSION` it can work with.
pub const MIN_TASK_API_VERSION: u32 = 2;
/// containerd's own shims read at most this much of stdin; a larger payload is not containerd.
pub const STDIN_LIMIT: u64 = 10 << 20;

/// How the caller wants `start` to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The address alone (containerd 1.6+; 2.x reads it as version 2 over ttrpc).
    Address,
    /// JSON `{"version":N,"address":...,"protocol":"ttrpc"}` (containerd 1.7–2.2).
    Json { version: u32 },
    /// A protobuf `BootstrapResult` (containerd 2.3+).
    Result { version: u32 },
}

/// Who started `start`, as told by its stdin.
#[derive(Debug, Clone)]
pub enum Caller {
    /// containerd ≤ 2.2: stdin held the runtime options, if any.
    Legacy { options: Option<Any> },
    /// containerd 2.3+: the bootstrap protocol.
    Bootstrap(Box<BootstrapParams>),
}

/// `start`'s stdin and environment, decoded and checked before anything is bound or spawned,
/// so bad input leaves neither a daemon nor a socket behind.
#[derive(Debug, Clone)]
pub struct StartInput {
    pub caller: Caller,
    pub reply: Reply,
}

impl StartInput {
    /// Decodes `stdin` for the container `flags` names; `max_shim_version` is the value of
    /// [`MAX_SHIM_VERSION_ENV`], if set.
    pub fn read(stdin: &[u8], flags: &Flags, max_shim_version: Option<&str>) -> Result<StartInput> {
        let max = parse_max_version(max_shim_version)?;
        let caller = decode(stdin, flags)?;
        let reply = match (&caller, max) {
            (Caller::Bootstrap(_), _) => Reply::Result {
                version: TASK_API_VERSION,
            },
            // Only a caller that says it takes version 3 gets it: 1.7 refuses anything above 2.
            (Caller::Legacy { .. }, Some(m)) if m >= TASK_API_VERSION => Reply::Json {
                version: TASK_API_VERSION,
            },
            (Caller::Legacy { .. }, _) => Reply::Address,
        };
        Ok(StartInput { caller, reply })
    }

    /// The runtime options containerd passed: the legacy stdin `Any`, or under the bootstrap
    /// protocol the first extension (containerd 2.3 adds the options as the only one).
    pub fn options(&self) -> Option<&Any> {
        match &self.caller {
            Caller::Legacy { options } => options.as_ref(),
            Caller::Bootstrap(p) => p.extensions.iter().find_map(|e| e.value.as_ref()),
        }
    }

    /// Where containerd wants the socket instead of `/run/containerd/s` (bootstrap only).
    pub fn socket_dir(&self) -> Option<&str> {
        match &self.caller {
            Caller::Bootstrap(p) => p.socket_dir.as_deref().filter(|d| !d.is_empty()),
            Caller::Legacy { .. } => None,
        }
    }

    /// Fills in from `BootstrapParams` what older containerds passed as flags and env, so the
    /// daemon is started the same way whichever generation asked.
    pub fn apply(&self, flags: &mut Flags) {
        let Caller::Bootstrap(p) = &self.caller else {
            return;
        };
        let set = |field: &mut String, value: &str| {
            if !value.is_empty() {
                *field = value.to_string();
            }
        };
        set(&mut flags.ttrpc_address, &p.containerd_ttrpc_address);
        set(&mut flags.grpc_address, &p.containerd_grpc_address);
        if flags.address.is_empty() {
            set(&mut flags.address, &p.containerd_grpc_address);
        }
        if flags.publish_binary.is_empty() {
            set(&mut flags.publish_binary, &p.containerd_binary);
        }
        // An open enum: anything at or below DEBUG (-4) asks for debug logs.
        if p.log_level.value() <= LogLevel::LOG_LEVEL_DEBUG.value() {
            flags.debug = true;
        }
    }

    /// What `start` prints for a daemon serving at `address`.
    pub fn answer(&self, address: &str) -> Result<Vec<u8>> {
        match self.reply {
            Reply::Address => Ok(address.as_bytes().to_vec()),
            Reply::Json { version } => Ok(serde_json::json!({
                "version": version,
                "address": address,
                "protocol": "ttrpc",
            })
            .to_string()
            .into_bytes()),
            Reply::Result { version } => BootstrapResult {
                version: version as i32,
                address: address.to_string(),
                protocol: "ttrpc".into(),
                ..Default::default()
            }
            .write_to_bytes()
            .context("encode BootstrapResult"),
        }
    }
}

fn parse_max_version(value: Option<&str>) -> Result<Option<u32>> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let n: u32 = v.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{MAX_SHIM_VERSION_ENV}={v:?} is not a shim API version number"
        ))
    })?;
    if n < MIN_TASK_API_VERSION {
        return Err(Error::InvalidArgument(format!(
            "{MAX_SHIM_VERSION_ENV}={n}: containerd accepts shim API versions up to {n}, \
             this shim serves {MIN_TASK_API_VERSION} and {TASK_API_VERSION}"
        )));
    }
    Ok(Some(n))
}

fn decode(stdin: &[u8], flags: &Flags) -> Result<Caller> {
    if stdin.is_empty() {
        return Ok(Caller::Legacy { options: None });
    }
    if let Ok(p) = BootstrapParams::parse_from_bytes(stdin) {
        let ours = !p.instance_id.is_empty()
            && p.instance_id == flags.id
            && p.namespace == flags.namespace;
        if ours {
            check_params(&p)?;
            return Ok(Caller::Bootstrap(Box::new(p)));
        }
        // Fields 3..9 never occur in an Any: this is certainly BootstrapParams, for someone else.
        if bootstrap_only_fields(&p) {
            return Err(Error::InvalidArgument(format!(
                "BootstrapParams are for container {:?} in namespace {:?}, but this shim was \
                 started with -id {:?} -namespace {:?}",
                p.instance_id, p.namespace, flags.id, flags.namespace
            )));
        }
    }
    let options = Any::parse_from_bytes(stdin).map_err(|e| {
        Error::InvalidArgument(format!(
            "stdin holds neither BootstrapParams for this container (containerd 2.3+) nor \
             runtime options as a protobuf Any (containerd 1.6-2.2): {e}"
        ))
    })?;
    Ok(Caller::Legacy {
        options: Some(options),
    })
}

fn bootstrap_only_fields(p: &BootstrapParams) -> bool {
    p.log_level.value() != 0
        || !p.containerd_version.is_empty()
        || !p.containerd_ttrpc_address.is_empty()
        || !p.containerd_grpc_address.is_empty()
        || !p.containerd_binary.is_empty()
        || !p.extensions.is_empty()
        || p.socket_dir.is_some()
}

/// Unknown fields and extension types are ignored, as protobuf evolution intends (a newer
/// containerd adds fields; an incompatible change would be a new package, `bootstrap.v2`).
/// What is refused is a caller this SDK cannot make sense of: a version that does not parse,
/// or a containerd 1.x, which never spoke this protocol.
fn check_params(p: &BootstrapParams) -> Result<()> {
    let v = p.containerd_version.trim();
    if !v.is_empty() {
        match containerd_major_minor(v) {
            None => {
                return Err(Error::InvalidArgument(format!(
                    "BootstrapParams.containerd_version {v:?} is not a containerd version"
                )))
            }
            Some((major, _)) if major < 2 => {
                return Err(Error::InvalidArgument(format!(
                    "BootstrapParams from containerd {v}: the bootstrap protocol starts with \
                     containerd 2.3, an older containerd sends runtime options instead"
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(dir) = p.socket_dir.as_deref().filter(|d| !d.is_empty()) {
        if !dir.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "BootstrapParams.socket_dir {dir:?} is not an absolute path"
            )));
        }
    }
    Ok(())
}

/// `"v2.3.0"`, `"2.3.0+unknown"`, `"2.3.0-rc.1"` → `(2, 3)`.
fn containerd_major_minor(v: &str) -> Option<(u32, u32)> {
    let v = v.strip_prefix('v').unwrap_or(v);
    let mut parts = v.splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// containerd's runtime name for a shim binary: `containerd-shim-runc-v2` →
/// `io.containerd.runc.v2` (the inverse of its binary-name rule); other names are kept.
pub fn runtime_name(binary: &str) -> String {
    binary
        .strip_prefix("containerd-shim-")
        .and_then(|rest| rest.rsplit_once('-'))
        .filter(|(name, version)| !name.is_empty() && !version.is_empty())
        .map(|(name, version)| format!("io.containerd.{name}.{version}"))
        .unwrap_or_else(|| binary.to_string())
}

/// The `-info` answer containerd 2.x asks for (introspection of a runtime): a
/// `containerd.types.RuntimeInfo` with the shim's runtime name and version, and the options
/// read from `stdin` (an `Any`, possibly empty) echoed back, and the runtime's `features`
/// for those options (see [`crate::Backend::features`]).
pub fn info(
    binary: &str,
    stdin: &[u8],
    features: impl FnOnce(Option<&Any>) -> Result<Option<Any>>,
) -> Result<Vec<u8>> {
    let options = if stdin.is_empty() {
        None
    } else {
        Some(Any::parse_from_bytes(stdin).map_err(|e| {
            Error::InvalidArgument(format!("-info: stdin is not runtime options (an Any): {e}"))
        })?)
    };
    let features = features(options.as_ref())?;
    let info = RuntimeInfo {
        name: runtime_name(binary),
        version: protobuf::MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: option_env!("SHIM_GIT_REVISION")
                .unwrap_or("unknown")
                .to_string(),
            ..Default::default()
        }),
        options: options.into(),
        features: features.into(),
        ..Default::default()
    };
    info.write_to_bytes().context("encode RuntimeInfo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_1_6_without_options_gets_the_address_itself() {
        let (flags, _) = Flags::parse(["-namespace", "default", "-id", "c1", "start"]).unwrap();
        let input = StartInput::read(&[], &flags, None).unwrap();
        let address = "unix:///run/containerd/s/ab";
        assert_eq!(input.answer(address).unwrap(), address.as_bytes());
    }

    #[test]
    fn runtime_names_follow_containerds_binary_name_rule() {
        assert_eq!(
            runtime_name("containerd-shim-runc-v2"),
            "io.containerd.runc.v2"
        );
        assert_eq!(runtime_name("my-shim"), "my-shim");
    }
    use protocol::bootstrap::Extension;

    fn flags() -> Flags {
        Flags {
            namespace: "k8s.io".into(),
            id: "c1".into(),
            ..Default::default()
        }
    }

    fn params() -> BootstrapParams {
        BootstrapParams {
            instance_id: "c1".into(),
            namespace: "k8s.io".into(),
            containerd_version: "v2.3.0".into(),
            containerd_ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            containerd_grpc_address: "/run/containerd/containerd.sock".into(),
            containerd_binary: "/usr/bin/containerd".into(),
            ..Default::default()
        }
    }

    fn runc_options() -> Any {
        protocol::pack(&protocol::options::Options {
            binary_name: "crun".into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn field_numbers_match_containerd() {
        // instance_id=1, namespace=2, log_level=3 (DEBUG = -4, a 10-byte varint), socket_dir=9.
        let p = BootstrapParams {
            instance_id: "i".into(),
            namespace: "n".into(),
            log_level: LogLevel::LOG_LEVEL_DEBUG.into(),
            socket_dir: Some("/s".into()),
            ..Default::default()
        };
        let mut want = vec![0x0a, 1, b'i', 0x12, 1, b'n', 0x18];
        want.extend([0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        want.extend([0x4a, 2, b'/', b's']);
        assert_eq!(p.write_to_bytes().unwrap(), want);
        // version=1, address=2, protocol=3.
        let r = BootstrapResult {
            version: 3,
            address: "a".into(),
            protocol: "t".into(),
            ..Default::default()
        };
        assert_eq!(
            r.write_to_bytes().unwrap(),
            [0x08, 3, 0x12, 1, b'a', 0x1a, 1, b't']
        );
        // RuntimeInfo: name=1, version=2 {version=1, revision=2}.
        let i = RuntimeInfo {
            name: "n".into(),
            version: protobuf::MessageField::some(RuntimeVersion {
                version: "v".into(),
                revision: "r".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            i.write_to_bytes().unwrap(),
            [0x0a, 1, b'n', 0x12, 6, 0x0a, 1, b'v', 0x12, 1, b'r']
        );
    }

    #[test]
    fn containerd_16_to_22_get_the_plain_address() {
        let opts = runc_options().write_to_bytes().unwrap();
        for (stdin, max) in [(&[][..], None), (&opts[..], None), (&opts[..], Some("2"))] {
            let input = StartInput::read(stdin, &flags(), max).unwrap();
            assert_eq!(input.reply, Reply::Address);
            assert_eq!(input.answer("unix:///s/x").unwrap(), b"unix:///s/x");
        }
        let input = StartInput::read(&opts, &flags(), None).unwrap();
        assert_eq!(
            input.options().unwrap().type_url,
            "containerd.runc.v1.Options"
        );
    }

    #[test]
    fn a_caller_taking_version_3_gets_json() {
        let input = StartInput::read(&[], &flags(), Some("3")).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&input.answer("unix:///s/x").unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version": 3, "address": "unix:///s/x", "protocol": "ttrpc"})
        );
    }

    #[test]
    fn containerd_23_gets_a_bootstrap_result_and_its_params_apply() {
        let mut p = params();
        p.log_level = LogLevel::LOG_LEVEL_TRACE.into();
        p.extensions.push(Extension {
            value: protobuf::MessageField::some(runc_options()),
            ..Default::default()
        });
        let input = StartInput::read(&p.write_to_bytes().unwrap(), &flags(), Some("2")).unwrap();
        assert_eq!(input.reply, Reply::Result { version: 3 });
        assert_eq!(
            input.options().unwrap().type_url,
            "containerd.runc.v1.Options"
        );
        let mut f = flags();
        input.apply(&mut f);
        assert_eq!(f.ttrpc_address, "/run/containerd/containerd.sock.ttrpc");
        assert_eq!(f.address, "/run/containerd/containerd.sock");
        assert_eq!(f.publish_binary, "/usr/bin/containerd");
        assert!(f.debug);
        let r = BootstrapResult::parse_from_bytes(&input.answer("unix:///s/x").unwrap()).unwrap();
        assert_eq!(
            (r.version, r.address.as_str(), r.protocol.as_str()),
            (3, "unix:///s/x", "ttrpc")
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut bytes = params().write_to_bytes().unwrap();
        // Field 200, a string: what a newer containerd might add.
        bytes.extend([0xc2, 0x0c, 3, b'n', b'e', b'w']);
        let input = StartInput::read(&bytes, &flags(), None).unwrap();
        assert!(matches!(input.caller, Caller::Bootstrap(_)));
    }

    #[test]
    fn unknown_or_old_containerd_version_is_refused() {
        for (v, want) in [
            ("unknown-version", "not a containerd version"),
            ("1.7.20", "starts with containerd 2.3"),
        ] {
            let mut p = params();
            p.containerd_version = v.into();
            let err = StartInput::read(&p.write_to_bytes().unwrap(), &flags(), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{v}: {err}");
        }
        assert_eq!(containerd_major_minor("2.3.0+unknown"), Some((2, 3)));
        assert_eq!(containerd_major_minor("v10.0.0-rc.1"), Some((10, 0)));
    }

    #[test]
    fn params_for_another_container_are_refused() {
        let mut p = params();
        p.instance_id = "other".into();
        let err = StartInput::read(&p.write_to_bytes().unwrap(), &flags(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"other\""), "{err}");
    }

    #[test]
    fn bad_max_shim_version_and_garbage_stdin_are_refused() {
        for max in ["1", "two"] {
            let err = StartInput::read(&[], &flags(), Some(max)).unwrap_err();
            assert!(err.to_string().contains(MAX_SHIM_VERSION_ENV), "{err}");
        }
        let err = StartInput::read(&[0xff, 0xff, 0xff], &flags(), None).unwrap_err();
        assert!(err.to_string().contains("neither BootstrapParams"), "{err}");
    }

    #[test]
    fn info_names_the_runtime_echoes_options_and_carries_features() {
        let opts = runc_options();
        let features = |o: Option<&Any>| {
            assert_eq!(o.map(|o| o.type_url.as_str()), Some(opts.type_url.as_str()));
            Ok(Some(Any {
                type_url: protocol::type_urls::OCI_FEATURES.into(),
                value: br#"{"ociVersionMin":"1.0.0"}"#.to_vec(),
                ..Default::default()
            }))
        };
        let bytes = info(
            "containerd-shim-runc-v2",
            &opts.write_to_bytes().unwrap(),
            features,
        )
        .unwrap();
        let i = RuntimeInfo::parse_from_bytes(&bytes).unwrap();
        assert_eq!(i.name, "io.containerd.runc.v2");
        assert_eq!(i.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(i.options.type_url, opts.type_url);
        assert_eq!(i.features.type_url, protocol::type_urls::OCI_FEATURES);
        assert!(info("containerd-shim-runc-v2", b"\xff\xff", |_| Ok(None)).is_err());
        let failing = |_: Option<&Any>| Err(Error::NotFound("runtime runc".into()));
        let err = info("containerd-shim-runc-v2", &[], failing).unwrap_err();
        assert!(err.to_string().contains("runtime runc"), "{err}");
    }
}
