//! From the `config.json` containerd writes (for Linux, whatever the host) to one runj can
//! run: pure functions on the JSON, so every rule is unit-tested against real files.
//!
//! - containerd's Linux default mounts (`/proc`, `/dev`, ... of Linux types) are removed:
//!   a jail gets its `devfs` from runj, and `proc`/`sysfs`/`devpts` do not exist here;
//! - `hostname` and the runtime-spec `freebsd.jail` section are what runj reads; their
//!   values are checked here so a mistake fails `Create` with a clear message;
//! - in a CRI pod, a container takes the sandbox's addresses (see [`share_pod_network`]);
//! - everything runj ignores (Linux namespaces, seccomp, cgroups, capabilities...) is
//!   listed, so the shim can warn instead of dropping it silently.

use serde_json::{Map, Value};

/// containerd's Linux default mounts: destination and the Linux file system types it uses
/// there. A user's own mount on one of these paths (a `nullfs`, say) is kept.
const LINUX_DEFAULT_MOUNTS: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/run",
];
const LINUX_MOUNT_TYPES: &[&str] = &[
    "proc", "sysfs", "devpts", "tmpfs", "mqueue", "cgroup", "cgroup2",
];

/// Fields of the runtime spec that runj reads; everything else is reported.
const PROCESS_FIELDS: &[&str] = &["terminal", "args", "env", "consoleSize"];
const TOP_FIELDS: &[&str] = &[
    "ociVersion",
    "process",
    "root",
    "mounts",
    "hostname",
    "domainname",
    "annotations",
    "freebsd",
    "hooks",
];
/// Values containerd always writes that mean "nothing special" and need no warning.
const HARMLESS_PROCESS: &[(&str, &str)] = &[("cwd", "\"/\""), ("user", "{\"gid\":0,\"uid\":0}")];

/// What [`translate`] made of a spec.
#[derive(Debug, Default, PartialEq)]
pub struct Translation {
    /// Destinations of the Linux default mounts removed.
    pub stripped: Vec<String>,
    /// Fields runj ignores, as dotted paths (`linux.namespaces`, `process.capabilities`).
    pub unsupported: Vec<String>,
    /// Anything else the operator should know (a pod network that cannot be shared).
    pub notes: Vec<String>,
}

/// Rewrites `spec` in place for runj. `sandbox` is the pod sandbox's spec (already
/// translated) when `spec` is an application container of a CRI pod.
pub fn translate(spec: &mut Value, sandbox: Option<&Value>) -> Result<Translation, String> {
    if !spec.is_object() {
        return Err("config.json is not a JSON object".into());
    }
    let mut t = Translation {
        stripped: strip_linux_default_mounts(spec),
        unsupported: unsupported(spec),
        notes: Vec::new(),
    };
    if let Some(sandbox) = sandbox {
        t.notes.extend(share_pod_network(spec, sandbox));
    }
    check_jail(spec)?;
    Ok(t)
}

/// Removes containerd's Linux default mounts; returns their destinations.
pub fn strip_linux_default_mounts(spec: &mut Value) -> Vec<String> {
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return Vec::new();
    };
    let mut stripped = Vec::new();
    mounts.retain(|m| {
        let dest = m["destination"].as_str().unwrap_or_default();
        let linux = LINUX_DEFAULT_MOUNTS.contains(&dest.trim_end_matches('/'))
            && LINUX_MOUNT_TYPES.contains(&m["type"].as_str().unwrap_or_default());
        if linux {
            stripped.push(dest.to_string());
        }
        !linux
    });
    stripped
}

/// Fields set in `spec` that runj does not apply.
pub fn unsupported(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(obj) = spec.as_object() else {
        return out;
    };
    for (k, v) in obj {
        if TOP_FIELDS.contains(&k.as_str()) || is_empty(v) {
            continue;
        }
        match v.as_object() {
            // Name the parts of a platform section (linux.namespaces, linux.seccomp...).
            Some(section) => out.extend(
                section
                    .iter()
                    .filter(|(_, v)| !is_empty(v))
                    .map(|(f, _)| format!("{k}.{f}")),
            ),
            None => out.push(k.clone()),
        }
    }
    out.extend(
        process_unsupported(&spec["process"])
            .into_iter()
            .map(|f| format!("process.{f}")),
    );
    if spec["root"]["readonly"].as_bool() == Some(true) {
        out.push("root.readonly".into());
    }
    out
}

/// Fields of an OCI `Process` (a container's or an exec's) that runj does not apply.
pub fn process_unsupported(process: &Value) -> Vec<String> {
    let Some(obj) = process.as_object() else {
        return Vec::new();
    };
    obj.iter()
        .filter(|(k, v)| {
            !PROCESS_FIELDS.contains(&k.as_str())
                && !is_empty(v)
                && !HARMLESS_PROCESS
                    .iter()
                    .any(|(f, harmless)| f == k && harmless_eq(v, harmless))
        })
        .map(|(k, _)| k.clone())
        .collect()
}

fn harmless_eq(v: &Value, harmless: &str) -> bool {
    let mut v = v.clone();
    // containerd lists the primary group again as an additional one.
    if let Some(o) = v.as_object_mut() {
        if o.get("additionalGids") == Some(&Value::from(vec![0])) {
            o.remove("additionalGids");
        }
    }
    serde_json::from_str::<Value>(harmless).is_ok_and(|h| h == v)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// Checks `hostname` and `freebsd.jail` the way runj will use them.
pub fn check_jail(spec: &Value) -> Result<(), String> {
    let jail = &spec["freebsd"]["jail"];
    if jail.is_null() {
        return Ok(());
    }
    if !jail.is_object() {
        return Err("freebsd.jail must be an object".into());
    }
    let one_of = |field: &str, allowed: &[&str]| -> Result<(), String> {
        match &jail[field] {
            Value::Null => Ok(()),
            Value::String(s) if allowed.contains(&s.as_str()) => Ok(()),
            v => Err(format!(
                "freebsd.jail.{field} is {v}; runj accepts {}",
                allowed.join(", ")
            )),
        }
    };
    one_of("host", &["new", "inherit"])?;
    one_of("ip4", &["new", "inherit", "disable"])?;
    one_of("ip6", &["new", "inherit", "disable"])?;
    one_of("vnet", &["new", "inherit"])?;
    for list in ["ip4Addr", "ip6Addr", "vnetInterfaces"] {
        match &jail[list] {
            Value::Null => {}
            Value::Array(a) if a.iter().all(Value::is_string) => {}
            v => {
                return Err(format!(
                    "freebsd.jail.{list} must be a list of strings, not {v}"
                ))
            }
        }
    }
    match &jail["enforceStatfs"] {
        Value::Null => {}
        v if v.as_u64().is_some_and(|n| n <= 2) => {}
        v => {
            return Err(format!(
                "freebsd.jail.enforceStatfs is {v}; jail(8) allows 0, 1 or 2"
            ))
        }
    }
    if jail["host"] == "inherit" && spec["hostname"].as_str().is_some_and(|h| !h.is_empty()) {
        return Err("hostname is set but freebsd.jail.host is \"inherit\": a jail that shares the host's name cannot have its own".into());
    }
    if !is_empty(&jail["vnetInterfaces"]) && jail["vnet"] != "new" {
        return Err("freebsd.jail.vnetInterfaces need freebsd.jail.vnet = \"new\"".into());
    }
    Ok(())
}

/// A pod's containers share its network: a jail cannot enter another jail's network stack
/// through runj, but non-vnet jails may hold the same addresses, so an application
/// container takes the sandbox's `ip4`/`ip6` modes and addresses (and its hostname, when
/// it has none of its own). A vnet sandbox's stack belongs to that one jail: the container
/// keeps its own settings, and the returned note says so.
pub fn share_pod_network(spec: &mut Value, sandbox: &Value) -> Vec<String> {
    let sb = &sandbox["freebsd"]["jail"];
    let mut notes = Vec::new();
    if sb["vnet"] == "new" {
        notes.push(
            "the pod sandbox has its own vnet, which runj cannot share with another jail: \
             this container does not get the pod's network"
                .into(),
        );
        return notes;
    }
    let Some(obj) = spec.as_object_mut() else {
        return notes;
    };
    let jail = obj
        .entry("freebsd")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .map(|f| f.entry("jail").or_insert_with(|| Value::Object(Map::new())));
    let Some(Value::Object(jail)) = jail else {
        return notes;
    };
    for field in ["ip4", "ip4Addr", "ip6", "ip6Addr"] {
        if let Some(v) = sb.get(field).filter(|v| !is_empty(v)) {
            if jail
                .get(field)
                .is_some_and(|mine| !is_empty(mine) && mine != v)
            {
                notes.push(format!(
                    "freebsd.jail.{field} replaced by the pod sandbox's {v}"
                ));
            }
            jail.insert(field.into(), v.clone());
        }
    }
    let no_hostname = obj.get("hostname").is_none_or(is_empty);
    if no_hostname {
        if let Some(h) = sandbox.get("hostname").filter(|h| !is_empty(h)) {
            obj.insert("hostname".into(), h.clone());
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `ctr run` of busybox through containerd 1.6.20 and our runc shim, copied from the
    /// bundle as containerd wrote it.
    const CTR_RUN: &str = include_str!("../tests/fixtures/ctr-run-containerd-1.6.20.json");

    fn captured() -> Value {
        serde_json::from_str(CTR_RUN).unwrap()
    }

    #[test]
    fn containerd_linux_defaults_are_stripped_and_linux_sections_reported() {
        let mut spec = captured();
        let t = translate(&mut spec, None).unwrap();
        assert_eq!(
            t.stripped,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/run"
            ]
        );
        assert_eq!(spec["mounts"], json!([]));
        for field in [
            "linux.namespaces",
            "linux.resources",
            "linux.cgroupsPath",
            "linux.maskedPaths",
            "linux.readonlyPaths",
            "process.capabilities",
            "process.rlimits",
            "process.noNewPrivileges",
        ] {
            assert!(
                t.unsupported.contains(&field.to_string()),
                "{field}: {:?}",
                t.unsupported
            );
        }
        // root user and cwd "/" are what a jail does anyway: no noise about them.
        assert!(!t
            .unsupported
            .iter()
            .any(|f| f == "process.user" || f == "process.cwd"));
        // What runj reads is untouched.
        assert_eq!(spec["process"]["args"], json!(["sleep", "1000"]));
        assert_eq!(spec["root"]["path"], "rootfs");
    }

    #[test]
    fn a_users_mount_on_a_default_path_is_kept() {
        let mut spec = captured();
        spec["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/run", "type": "nullfs", "source": "/var/run/app", "options": ["ro"]
        }));
        spec["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "nullfs", "source": "/tank/data"
        }));
        strip_linux_default_mounts(&mut spec);
        let dests: Vec<_> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].clone())
            .collect();
        assert_eq!(dests, [json!("/run"), json!("/data")]);
    }

    #[test]
    fn freebsd_jail_section_and_hostname_pass_through_checked() {
        let mut spec = captured();
        spec["hostname"] = json!("web");
        spec["freebsd"] = json!({"jail": {
            "host": "new", "ip4": "new", "ip4Addr": ["10.0.0.2"], "ip6": "disable",
            "vnet": "new", "vnetInterfaces": ["epair0b"], "enforceStatfs": 1
        }});
        let before = spec["freebsd"].clone();
        let t = translate(&mut spec, None).unwrap();
        assert_eq!(spec["freebsd"], before);
        assert_eq!(spec["hostname"], "web");
        assert!(!t
            .unsupported
            .iter()
            .any(|f| f.starts_with("freebsd") || f == "hostname"));
    }

    #[test]
    fn bad_jail_values_are_clear_errors() {
        for (jail, hostname, want) in [
            (json!({"ip4": "shared"}), "", "freebsd.jail.ip4"),
            (json!({"vnet": "disable"}), "", "freebsd.jail.vnet"),
            (json!({"enforceStatfs": 3}), "", "enforceStatfs"),
            (json!({"ip4Addr": "10.0.0.1"}), "", "ip4Addr must be a list"),
            (json!({"host": "inherit"}), "web", "hostname is set"),
            (json!({"vnetInterfaces": ["epair0b"]}), "", "vnet = \"new\""),
        ] {
            let mut spec = captured();
            spec["freebsd"] = json!({ "jail": jail });
            if !hostname.is_empty() {
                spec["hostname"] = json!(hostname);
            }
            let err = translate(&mut spec, None).unwrap_err();
            assert!(err.contains(want), "{jail}: {err}");
        }
    }

    fn cri(spec: &mut Value, kind: &str, sandbox: &str) {
        use shim_common::pod::{CONTAINER_TYPE, SANDBOX_ID};
        spec["annotations"] = json!({ CONTAINER_TYPE: kind, SANDBOX_ID: sandbox });
    }

    #[test]
    fn pod_containers_share_the_sandbox_addresses_and_hostname() {
        let mut sandbox = captured();
        cri(&mut sandbox, "sandbox", "sb1");
        sandbox["hostname"] = json!("pod-a");
        sandbox["freebsd"] =
            json!({"jail": {"ip4": "new", "ip4Addr": ["10.88.0.7"], "ip6": "disable"}});
        translate(&mut sandbox, None).unwrap();

        let mut app = captured();
        cri(&mut app, "container", "sb1");
        let t = translate(&mut app, Some(&sandbox)).unwrap();
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        assert_eq!(
            app["freebsd"]["jail"],
            json!({"ip4": "new", "ip4Addr": ["10.88.0.7"], "ip6": "disable"})
        );
        assert_eq!(app["hostname"], "pod-a");

        // A container's own hostname stays; differing addresses are replaced, with a note.
        let mut own = captured();
        cri(&mut own, "container", "sb1");
        own["hostname"] = json!("mine");
        own["freebsd"] = json!({"jail": {"ip4Addr": ["10.0.0.9"], "enforceStatfs": 1}});
        let t = translate(&mut own, Some(&sandbox)).unwrap();
        assert_eq!(own["hostname"], "mine");
        assert_eq!(own["freebsd"]["jail"]["ip4Addr"], json!(["10.88.0.7"]));
        assert_eq!(own["freebsd"]["jail"]["enforceStatfs"], 1);
        assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
    }

    #[test]
    fn a_vnet_sandbox_is_not_shared_and_says_so() {
        let mut sandbox = captured();
        sandbox["freebsd"] = json!({"jail": {"vnet": "new", "vnetInterfaces": ["epair3b"]}});
        let mut app = captured();
        cri(&mut app, "container", "sb1");
        let t = translate(&mut app, Some(&sandbox)).unwrap();
        assert!(t.notes[0].contains("vnet"), "{:?}", t.notes);
        assert!(app.get("freebsd").is_none());
    }

    #[test]
    fn exec_process_fields_runj_ignores_are_listed() {
        let p = json!({"args": ["sh"], "env": ["A=1"], "cwd": "/tmp", "terminal": false,
                       "user": {"uid": 1000, "gid": 1000}, "capabilities": {"bounding": ["CAP_KILL"]}});
        let mut u = process_unsupported(&p);
        u.sort();
        assert_eq!(u, ["capabilities", "cwd", "user"]);
    }
}
