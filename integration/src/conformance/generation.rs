//! The containerd generations whose shim contract the runner plays, and how each reads
//! `start`'s answer.

use protobuf::Message;
use protocol::bootstrap::BootstrapResult;

/// The containerd release whose shim contract to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// 1.6: env `TTRPC_ADDRESS`; stdin the options `Any`; only a plain address is understood.
    V1_6,
    /// 1.7: adds `GRPC_ADDRESS`, `NAMESPACE`, `MAX_SHIM_VERSION=2`; JSON answers up to version 2.
    V1_7,
    /// 2.0–2.2: same env and stdin as 1.7; JSON answers up to version 3 (task API v3).
    V2_0,
    /// 2.3+: stdin is a protobuf `BootstrapParams`; the answer may be a `BootstrapResult`.
    V2_3,
}

impl Generation {
    /// Every generation, oldest first.
    pub const ALL: [Generation; 4] = [
        Generation::V1_6,
        Generation::V1_7,
        Generation::V2_0,
        Generation::V2_3,
    ];

    /// The `ociVersion` this generation writes into `config.json`: the runtime-spec its Go
    /// module vendors (1.6.20 writes 1.0.2-dev, as measured here; 2.3 writes 1.3.0).
    pub fn oci_version(self) -> &'static str {
        match self {
            Generation::V1_6 => "1.0.2-dev",
            Generation::V1_7 => "1.1.0",
            Generation::V2_0 => "1.2.0",
            Generation::V2_3 => "1.3.0",
        }
    }
}

impl std::str::FromStr for Generation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.6" => Ok(Generation::V1_6),
            "1.7" => Ok(Generation::V1_7),
            "2.0" | "2.1" | "2.2" => Ok(Generation::V2_0),
            "2.3" => Ok(Generation::V2_3),
            other => Err(format!(
                "unknown containerd generation {other:?} (want 1.6, 1.7, 2.0 or 2.3)"
            )),
        }
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Generation::V1_6 => "1.6",
            Generation::V1_7 => "1.7",
            Generation::V2_0 => "2.0",
            Generation::V2_3 => "2.3",
        })
    }
}

/// The form `start` answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerForm {
    Plain,
    Json,
    BootstrapResult,
}

/// What containerd of a generation makes of `start`'s stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub form: AnswerForm,
    pub address: String,
    /// The task API version containerd will use: 2 → `containerd.task.v2.Task`, 3 → v3.
    pub version: u32,
}

/// Parses `stdout` of `start` exactly as containerd of `generation` does, refusing what it
/// would refuse.
pub fn parse_answer(generation: Generation, stdout: &[u8]) -> Result<Answer, String> {
    if generation == Generation::V2_3 {
        // 2.3 tries the protobuf first (a plain or JSON answer fails to decode as one).
        if let Ok(r) = BootstrapResult::parse_from_bytes(stdout) {
            if !r.address.is_empty() {
                let version = u32::try_from(r.version).unwrap_or(0);
                return check_answer(
                    generation,
                    AnswerForm::BootstrapResult,
                    r.address,
                    version,
                    &r.protocol,
                );
            }
        }
    }
    let text = String::from_utf8_lossy(stdout).trim().to_string();
    if generation == Generation::V1_6 {
        if text.starts_with('{') {
            return Err(format!(
                "containerd 1.6 only understands a plain address, got JSON {text:?}"
            ));
        }
        return check_answer(generation, AnswerForm::Plain, text, 2, "ttrpc");
    }
    let json = serde_json::from_str::<serde_json::Value>(&text).ok();
    let field = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let version = json
        .as_ref()
        .and_then(|j| j.get("version"))
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0);
    match json {
        Some(_) if version >= 2 => check_answer(
            generation,
            AnswerForm::Json,
            field("address"),
            u32::try_from(version).unwrap_or(u32::MAX),
            &field("protocol"),
        ),
        // containerd takes anything else as a legacy plain address, version 2 over ttrpc.
        _ => check_answer(generation, AnswerForm::Plain, text, 2, "ttrpc"),
    }
}

fn check_answer(
    generation: Generation,
    form: AnswerForm,
    address: String,
    version: u32,
    protocol: &str,
) -> Result<Answer, String> {
    let max = match generation {
        Generation::V1_6 | Generation::V1_7 => 2,
        Generation::V2_0 | Generation::V2_3 => 3,
    };
    if version > max {
        return Err(format!(
            "unsupported shim version ({version}): containerd {generation} accepts up to {max}"
        ));
    }
    if !protocol.eq_ignore_ascii_case("ttrpc") {
        return Err(format!(
            "protocol {protocol:?}: this runner speaks ttrpc only"
        ));
    }
    if address.is_empty() || address.contains('\n') {
        return Err(format!("{address:?} is not an address"));
    }
    Ok(Answer {
        form,
        address,
        version,
    })
}
