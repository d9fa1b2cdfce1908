//! What the standard `OTEL_*` variables ask of tracing: whether it is on, where spans go
//! and how ([`Config`]), and which traces are recorded ([`Sampler`]).

use std::borrow::Cow;
use std::time::Duration;

use super::export::{self, Config, Endpoint};
use super::otlp::{self, Value};
use super::w3c::SpanContext;

pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A variable that is set to something other than blanks, trimmed.
#[cold]
pub(super) fn var(env: Env<'_>, key: &str) -> Option<String> {
    env(key)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The signal-specific variable (`OTEL_EXPORTER_OTLP_TRACES_<name>`) or the general one.
#[cold]
pub(super) fn otlp_var(env: Env<'_>, name: &str) -> Option<String> {
    var(env, &format!("OTEL_EXPORTER_OTLP_TRACES_{name}"))
        .or_else(|| var(env, &format!("OTEL_EXPORTER_OTLP_{name}")))
}

/// Why tracing is off, or `None` when `env` asks for it: an OTLP endpoint is set
/// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` turns it off. Without an
/// endpoint nothing is exported: a shim never connects anywhere it was not told to.
#[cold]
pub(super) fn off_because(env: Env<'_>) -> Option<String> {
    if var(env, "OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Some("OTEL_SDK_DISABLED=true".into());
    }
    match var(env, "OTEL_TRACES_EXPORTER").as_deref() {
        None | Some("otlp") => {}
        Some(other) => {
            return Some(format!(
                "OTEL_TRACES_EXPORTER={other} (only otlp is built in)"
            ))
        }
    }
    if otlp_var(env, "ENDPOINT").is_none() {
        return Some("no OTLP endpoint set".into());
    }
    match otlp_var(env, "PROTOCOL").as_deref() {
        None | Some("http/protobuf") => None,
        Some(other) => Some(format!(
            "OTLP protocol {other} is not built in (http/protobuf is)"
        )),
    }
}

/// The service name spans carry: `OTEL_SERVICE_NAME`, unless it is unset or names
/// containerd (whose own setting the shim inherits), then `shim`, the binary's name.
#[cold]
pub(super) fn service_name(env: Env<'_>, shim: &str) -> String {
    match var(env, "OTEL_SERVICE_NAME") {
        Some(s) if s != "containerd" => s,
        _ => shim.to_string(),
    }
}

/// A duration in milliseconds from `key`, or `default`.
#[cold]
pub(super) fn millis(env: Env<'_>, key: &str, default: u64) -> Duration {
    let ms = var(env, key).and_then(|v| v.parse().ok());
    Duration::from_millis(ms.unwrap_or(default))
}

#[cold]
pub(super) fn count(env: Env<'_>, key: &str, default: usize) -> usize {
    var(env, key)
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// The exporter's settings from `env` (the defaults are the OpenTelemetry specification's).
#[cold]
pub(super) fn config(env: Env<'_>, shim: &str) -> std::result::Result<Config, String> {
    let endpoint = match var(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(url) => Endpoint::parse(&url, false)?,
        None => Endpoint::parse(&otlp_var(env, "ENDPOINT").unwrap_or_default(), true)?,
    };
    let headers = otlp_var(env, "HEADERS")
        .map(|h| export::pairs("OTEL_EXPORTER_OTLP_HEADERS", &h))
        .unwrap_or_default();
    let timeout = otlp_var(env, "TIMEOUT")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis);
    let mut resource: otlp::Attributes = var(env, "OTEL_RESOURCE_ATTRIBUTES")
        .map(|a| export::pairs("OTEL_RESOURCE_ATTRIBUTES", &a))
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "service.name")
        .map(|(k, v)| (Cow::Owned(k), Value::from(v)))
        .collect();
    resource.extend([
        ("service.name".into(), service_name(env, shim).into()),
        ("process.pid".into(), i64::from(std::process::id()).into()),
        ("telemetry.sdk.language".into(), "rust".into()),
    ]);
    let max_queue = count(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048);
    Ok(Config {
        endpoint,
        headers,
        timeout,
        delay: millis(env, "OTEL_BSP_SCHEDULE_DELAY", 5000),
        max_queue,
        max_batch: count(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).min(max_queue),
        resource,
    })
}

/// Which traces are recorded: `OTEL_TRACES_SAMPLER` (`parentbased_always_on` by default,
/// `always_on`, `always_off`, `traceidratio`, and their `parentbased_` forms) with
/// `OTEL_TRACES_SAMPLER_ARG` as the ratio. A span that is not recorded still passes its
/// context on, unsampled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Sampler {
    /// Follow the parent's sampled flag when there is a parent.
    pub parent_based: bool,
    /// For a trace that starts here: record when the trace id's low 63 bits fall under
    /// this bound (`u64::MAX`: always, 0: never), as OpenTelemetry's ratio sampler does.
    pub root_bound: u64,
}

impl Sampler {
    #[cold]
    pub fn from_env(env: Env<'_>) -> Sampler {
        let name = var(env, "OTEL_TRACES_SAMPLER").unwrap_or_default();
        let ratio = || {
            let r = var(env, "OTEL_TRACES_SAMPLER_ARG").and_then(|a| a.parse::<f64>().ok());
            let r = r.filter(|r| (0.0..=1.0).contains(r)).unwrap_or(1.0);
            if r >= 1.0 {
                u64::MAX
            } else {
                (r * (1u64 << 63) as f64) as u64
            }
        };
        let (parent_based, root_bound) = match name.as_str() {
            "" | "parentbased_always_on" => (true, u64::MAX),
            "parentbased_always_off" => (true, 0),
            "parentbased_traceidratio" => (true, ratio()),
            "always_on" => (false, u64::MAX),
            "always_off" => (false, 0),
            "traceidratio" => (false, ratio()),
            other => {
                log::warn!(
                    "tracing: OTEL_TRACES_SAMPLER={other} is not built in; parentbased_always_on"
                );
                (true, u64::MAX)
            }
        };
        Sampler {
            parent_based,
            root_bound,
        }
    }

    #[cold]
    pub fn sampled(&self, parent: Option<&SpanContext>, trace_id: &[u8; 16]) -> bool {
        match parent {
            Some(p) if self.parent_based => p.sampled(),
            _ => match self.root_bound {
                u64::MAX => true,
                0 => false,
                bound => {
                    let low: [u8; 8] = trace_id[8..].try_into().unwrap_or_default();
                    (u64::from_be_bytes(low) >> 1) < bound
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn tracing_is_on_only_with_an_endpoint_and_not_disabled() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert_eq!(off_because(&env(&[ep])), None);
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://h:4318/v1/traces",
        );
        assert_eq!(off_because(&env(&[traces])), None);
        let said = |vars: &[(&str, &str)]| off_because(&env(vars)).unwrap_or_default();
        assert!(said(&[]).contains("no OTLP endpoint"));
        assert!(said(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).contains("no OTLP endpoint"));
        assert!(said(&[ep, ("OTEL_SDK_DISABLED", "TRUE")]).contains("OTEL_SDK_DISABLED"));
        assert_eq!(
            off_because(&env(&[ep, ("OTEL_SDK_DISABLED", "false")])),
            None
        );
        assert!(said(&[ep, ("OTEL_TRACES_EXPORTER", "none")]).contains("none"));
        let grpc = ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        assert!(said(&[ep, grpc]).contains("grpc is not built in"));
        let http = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf");
        assert_eq!(off_because(&env(&[ep, grpc, http])), None);
    }

    #[test]
    fn the_service_is_named_after_the_shim_unless_set_for_it() {
        let name = |vars: &[(&str, &str)]| service_name(&env(vars), "containerd-shim-runc-v2");
        assert_eq!(name(&[]), "containerd-shim-runc-v2");
        assert_eq!(
            name(&[("OTEL_SERVICE_NAME", "containerd")]),
            "containerd-shim-runc-v2"
        );
        assert_eq!(name(&[("OTEL_SERVICE_NAME", "node-shims")]), "node-shims");
    }

    #[test]
    fn the_exporter_reads_the_standard_settings() {
        let c = config(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://10.0.0.7:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=s3cret"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "k8s.node.name=n1,service.name=x",
                ),
            ]),
            "containerd-shim-runc-v2",
        )
        .unwrap();
        assert_eq!(c.endpoint.authority, "10.0.0.7:4318");
        assert_eq!(c.endpoint.path, "/v1/traces");
        assert_eq!(c.headers, [("api-key".to_string(), "s3cret".to_string())]);
        assert_eq!(
            (c.timeout, c.delay, c.max_queue, c.max_batch),
            (
                Duration::from_millis(2500),
                Duration::from_millis(200),
                100,
                100
            )
        );
        let attr = |k: &str| c.resource.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        assert_eq!(attr("k8s.node.name"), Some(&Value::from("n1")));
        assert_eq!(
            attr("service.name"),
            Some(&Value::from("containerd-shim-runc-v2"))
        );
        let https = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]);
        assert!(config(&https, "s").unwrap_err().contains("https"));
    }

    #[test]
    fn the_sampler_follows_the_parent_and_its_ratio() {
        let sampler = |name: &str, arg: &str| {
            Sampler::from_env(&env(&[
                ("OTEL_TRACES_SAMPLER", name),
                ("OTEL_TRACES_SAMPLER_ARG", arg),
            ]))
        };
        let parent = |sampled: bool| SpanContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            flags: u8::from(sampled),
            state: None,
        };
        let default = Sampler::from_env(&env(&[]));
        assert!(default.sampled(None, &[7; 16]));
        assert!(default.sampled(Some(&parent(true)), &[1; 16]));
        assert!(!default.sampled(Some(&parent(false)), &[1; 16]));
        assert!(!sampler("always_off", "").sampled(Some(&parent(true)), &[1; 16]));
        assert!(sampler("always_on", "").sampled(Some(&parent(false)), &[1; 16]));
        let half = sampler("traceidratio", "0.5");
        let mut low = [0u8; 16];
        low[8] = 0x10;
        let mut high = [0u8; 16];
        high[8] = 0xf0;
        assert!(half.sampled(None, &low) && !half.sampled(None, &high));
        assert_eq!(sampler("jaeger_remote", ""), default);
    }
}
