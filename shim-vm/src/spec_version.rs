//! The OCI runtime-spec version a guest's runtime accepts.
//!
//! Debian 12's crun 1.8.1, the guest's default runtime, refuses a `config.json` whose
//! `ociVersion` does not contain "1.0" ("unknown version specified"), and containerd 2.0
//! writes 1.2.0, 2.3 writes 1.3.0 (1.6 writes 1.0.2-dev, 1.7 1.1.0). That string is only
//! crun's gate: crun, like the guest's runc 1.1.5 (which checks no version), applies the
//! fields it knows and ignores the rest. So a newer spec goes into the guest as
//! [`GUEST_OCI_VERSION`], unless it sets a field that neither runtime in the guest
//! implements: that is refused by name rather than silently dropped.

use serde_json::Value;
use shim_common::{Error, Result};

/// What a newer spec is written as for the guest: the version crun 1.8.1 was made for.
pub const GUEST_OCI_VERSION: &str = "1.0.2";

/// Fields of runtime-spec 1.1 and later that neither crun 1.8.1 nor runc 1.1.5 implements
/// (neither binary knows their names), as JSON pointers.
const UNKNOWN_TO_GUEST: &[&str] = &[
    "/process/scheduler",
    "/process/ioPriority",
    "/process/execCPUAffinity",
    "/linux/timeOffsets",
    "/linux/netDevices",
    "/linux/memoryPolicy",
];

/// Brings `spec` to a version the guest's runtime accepts; refuses a field it would ignore.
pub fn for_guest(spec: &mut Value) -> Result<()> {
    let version = spec["ociVersion"].as_str().unwrap_or_default().to_string();
    if let Some(field) = UNKNOWN_TO_GUEST
        .iter()
        .find(|p| spec.pointer(p).is_some_and(|v| !v.is_null()))
    {
        return Err(Error::InvalidArgument(format!(
            "config.json (runtime-spec {version}) sets {field}, which the guest's OCI runtimes \
             (crun 1.8.1, runc 1.1.5) do not implement"
        )));
    }
    // crun 1.8.1's own test: `strstr (oci_version, "1.0")`.
    if !version.contains("1.0") {
        spec["ociVersion"] = Value::String(GUEST_OCI_VERSION.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_containerd_writes_reaches_the_guest_as_crun_accepts_it() {
        for (written, guest) in [
            ("1.0.2-dev", "1.0.2-dev"),
            ("1.1.0", "1.1.0"),
            ("1.2.0", GUEST_OCI_VERSION),
            ("1.3.0", GUEST_OCI_VERSION),
            ("", GUEST_OCI_VERSION),
        ] {
            let mut spec = json!({"ociVersion": written, "process": {"args": ["true"]}});
            for_guest(&mut spec).unwrap();
            assert_eq!(spec["ociVersion"], guest, "{written}");
            assert_eq!(spec["process"]["args"], json!(["true"]));
        }
    }

    #[test]
    fn a_field_the_guest_runtime_would_ignore_is_refused_by_name() {
        let mut spec = json!({
            "ociVersion": "1.3.0",
            "process": {"args": ["true"], "ioPriority": {"class": "IOPRIO_CLASS_IDLE"}}
        });
        let e = for_guest(&mut spec).unwrap_err().to_string();
        assert!(
            e.contains("/process/ioPriority") && e.contains("1.3.0"),
            "{e}"
        );
        assert_eq!(spec["ociVersion"], "1.3.0");
        // A null is as if unset (Go's encoding of an empty pointer when not omitted).
        let mut spec = json!({"ociVersion": "1.2.0", "linux": {"timeOffsets": null}});
        for_guest(&mut spec).unwrap();
    }
}
