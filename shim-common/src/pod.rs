//! A container's place in a CRI pod, from the annotations containerd's CRI plugin writes
//! into every container's spec: which shim serves it (one per pod) and what it shares; and
//! what a pod sandbox's `PodSandboxConfig` says of the pod.

use std::collections::BTreeMap;

use protobuf::rt::WireType;
use protobuf::well_known_types::any::Any;
use protobuf::{CodedInputStream, CodedOutputStream};
use serde_json::Value;

use crate::error::{Error, Result};

/// CRI's `PodSandboxConfig`: the `options` of containerd 2.x's `CreateSandbox` for a pod.
pub const POD_SANDBOX_CONFIG: &str = "runtime.v1.PodSandboxConfig";

/// `sandbox` for the pod's sandbox (pause) container, `container` for the others.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The pod's sandbox id, on every container of the pod.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// How a container sits in a CRI pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// Not created by CRI.
    None,
    /// The pod's sandbox: it holds the pod's namespaces.
    Sandbox,
    /// An application container of the pod whose sandbox has this id.
    Container {
        /// The sandbox container's id.
        sandbox_id: String,
    },
}

impl PodRole {
    /// The role a spec's (`config.json`'s) annotations give its container.
    ///
    /// ```
    /// use shim_common::pod::PodRole;
    /// let spec = serde_json::json!({"annotations": {
    ///     "io.kubernetes.cri.container-type": "container",
    ///     "io.kubernetes.cri.sandbox-id": "sb1"}});
    /// assert_eq!(PodRole::of(&spec), PodRole::Container { sandbox_id: "sb1".into() });
    /// ```
    pub fn of(spec: &Value) -> PodRole {
        let a = &spec["annotations"];
        match (a[CONTAINER_TYPE].as_str(), a[SANDBOX_ID].as_str()) {
            (Some("sandbox"), _) => PodRole::Sandbox,
            (Some("container"), Some(id)) if !id.is_empty() => PodRole::Container {
                sandbox_id: id.to_string(),
            },
            _ => PodRole::None,
        }
    }
}

/// What the SDK reads of CRI's `PodSandboxConfig`, field by field: CRI's whole schema would
/// be a large dependency for two fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// `metadata` (field 1).
    pub metadata: PodMetadata,
    /// `hostname` (field 2): empty for a host-network pod (kubelet sends none).
    pub hostname: String,
    /// `linux.cgroup_parent` (fields 8, 1): the pod's cgroup, which its containers' cgroups
    /// nest in (a path, or a systemd slice name); empty when none is given.
    pub cgroup_parent: String,
    /// `linux.sysctls` (fields 8, 3): the pod's namespaced kernel parameters, set in the
    /// namespaces its sandbox holds.
    pub sysctls: BTreeMap<String, String>,
    /// `linux.resources` (fields 8, 5): the sum of the containers' limits, which the
    /// kubelet sends since Kubernetes 1.23; zeros when it sends none.
    pub resources: PodResources,
}

/// CRI's `LinuxContainerResources`, the fields a pod is sized by (0: not set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodResources {
    /// `cpu_period` (field 1), µs.
    pub cpu_period: i64,
    /// `cpu_quota` (field 2), µs per period.
    pub cpu_quota: i64,
    /// `memory_limit_in_bytes` (field 4).
    pub memory_limit: i64,
}

/// CRI's `PodSandboxMetadata`: who the pod is in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMetadata {
    /// `name` (field 1).
    pub name: String,
    /// `uid` (field 2).
    pub uid: String,
    /// `namespace` (field 3).
    pub namespace: String,
    /// `attempt` (field 4).
    pub attempt: u32,
}

impl PodConfig {
    /// Decodes `options` when it is a `PodSandboxConfig`; other option types are `None`.
    ///
    /// ```
    /// use protobuf::well_known_types::any::Any;
    /// use shim_common::pod::PodConfig;
    /// // metadata {name: "web"}, hostname: "web-0"
    /// let value = b"\x0a\x05\x0a\x03web\x12\x05web-0".to_vec();
    /// let options = Any {
    ///     type_url: "type.googleapis.com/runtime.v1.PodSandboxConfig".into(),
    ///     value,
    ///     ..Default::default()
    /// };
    /// let config = PodConfig::of(&options)?.unwrap();
    /// assert_eq!((config.metadata.name.as_str(), config.hostname.as_str()), ("web", "web-0"));
    /// # Ok::<(), shim_common::Error>(())
    /// ```
    pub fn of(options: &Any) -> Result<Option<PodConfig>> {
        if !options.type_url.ends_with(POD_SANDBOX_CONFIG) {
            return Ok(None);
        }
        let mut config = PodConfig::default();
        let (mut metadata, mut linux) = (Vec::new(), Vec::new());
        fields(&options.value, |n, input| {
            match n {
                1 => metadata = input.read_bytes()?,
                2 => config.hostname = input.read_string()?,
                8 => linux = input.read_bytes()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        config.metadata = PodMetadata::decode(&metadata)?;
        let mut resources = Vec::new();
        fields(&linux, |n, input| {
            match n {
                1 => config.cgroup_parent = input.read_string()?,
                3 => {
                    let entry = input.read_bytes()?;
                    let (mut key, mut value) = (String::new(), String::new());
                    fields_raw(&entry, |n, input| {
                        match n {
                            1 => key = input.read_string()?,
                            2 => value = input.read_string()?,
                            _ => return Ok(false),
                        }
                        Ok(true)
                    })?;
                    config.sysctls.insert(key, value);
                }
                5 => resources = input.read_bytes()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        config.resources = PodResources::decode(&resources)?;
        Ok(Some(config))
    }

    /// What a CRI pod sandbox's (pause container's) spec says of its pod, as its
    /// `PodSandboxConfig` would: the hostname, the sysctls, and the pod's cgroup — the
    /// parent of the sandbox's own, as CRI places it (`<parent>/<id>`, or systemd's
    /// `<slice>:<prefix>:<name>`).
    ///
    /// ```
    /// use shim_common::pod::PodConfig;
    /// let spec = serde_json::json!({"hostname": "web-0", "linux": {
    ///     "cgroupsPath": "/kubepods/pod1/sb1", "sysctl": {"kernel.shm_rmid_forced": "1"}}});
    /// let c = PodConfig::of_sandbox_spec(&spec);
    /// assert_eq!((c.hostname.as_str(), c.cgroup_parent.as_str()), ("web-0", "/kubepods/pod1"));
    /// assert_eq!(c.sysctls["kernel.shm_rmid_forced"], "1");
    /// ```
    pub fn of_sandbox_spec(spec: &Value) -> PodConfig {
        let cgroups_path = spec["linux"]["cgroupsPath"].as_str().unwrap_or_default();
        let cgroup_parent = match cgroups_path.split_once(':') {
            Some((slice, _)) => slice,
            None => cgroups_path
                .rsplit_once('/')
                .map_or("", |(parent, _)| parent),
        };
        PodConfig {
            hostname: spec["hostname"].as_str().unwrap_or_default().to_string(),
            cgroup_parent: cgroup_parent.to_string(),
            sysctls: crate::bundle::string_map(&spec["linux"]["sysctl"]),
            ..Default::default()
        }
    }

    /// This config as a `PodSandboxConfig`, for a sandbox service that reads one (the VM
    /// shim's guest, told of a pod that came as a pause container's spec). Only the fields
    /// [`PodConfig::of`] reads are written.
    pub fn to_any(&self) -> Any {
        let message = |write: &dyn Fn(&mut CodedOutputStream) -> protobuf::Result<()>| {
            let mut bytes = Vec::new();
            let mut out = CodedOutputStream::vec(&mut bytes);
            // Writing into a Vec fails only when out of memory.
            let _ = write(&mut out).and_then(|()| out.flush());
            drop(out);
            bytes
        };
        let m = &self.metadata;
        let metadata = message(&|o| {
            o.write_string(1, &m.name)?;
            o.write_string(2, &m.uid)?;
            o.write_string(3, &m.namespace)?;
            o.write_uint32(4, m.attempt)
        });
        let r = &self.resources;
        let resources = message(&|o| {
            o.write_int64(1, r.cpu_period)?;
            o.write_int64(2, r.cpu_quota)?;
            o.write_int64(4, r.memory_limit)
        });
        let linux = message(&|o| {
            o.write_string(1, &self.cgroup_parent)?;
            for (key, value) in &self.sysctls {
                let entry = message(&|e| {
                    e.write_string(1, key)?;
                    e.write_string(2, value)
                });
                o.write_bytes(3, &entry)?;
            }
            o.write_bytes(5, &resources)
        });
        let value = message(&|o| {
            o.write_bytes(1, &metadata)?;
            o.write_string(2, &self.hostname)?;
            o.write_bytes(8, &linux)
        });
        Any {
            type_url: format!("type.googleapis.com/{POD_SANDBOX_CONFIG}"),
            value,
            ..Default::default()
        }
    }
}

impl PodResources {
    fn decode(bytes: &[u8]) -> Result<PodResources> {
        let mut r = PodResources::default();
        fields(bytes, |n, input| {
            match n {
                1 => r.cpu_period = input.read_int64()?,
                2 => r.cpu_quota = input.read_int64()?,
                4 => r.memory_limit = input.read_int64()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(r)
    }
}

impl PodMetadata {
    fn decode(bytes: &[u8]) -> Result<PodMetadata> {
        let mut m = PodMetadata::default();
        fields(bytes, |n, input| {
            match n {
                1 => m.name = input.read_string()?,
                2 => m.uid = input.read_string()?,
                3 => m.namespace = input.read_string()?,
                4 => m.attempt = input.read_uint32()?,
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(m)
    }

    /// The sandbox's name as containerd's CRI makes it: `<name>_<namespace>_<uid>_<attempt>`.
    pub fn sandbox_name(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.name, self.namespace, self.uid, self.attempt
        )
    }
}

/// Walks the fields of a protobuf message: `read` takes the fields it knows (returning
/// `true`) and the rest are skipped. Malformed input is an `InvalidArgument`.
fn fields(
    bytes: &[u8],
    read: impl FnMut(u32, &mut CodedInputStream) -> protobuf::Result<bool>,
) -> Result<()> {
    fields_raw(bytes, read).map_err(|e| Error::InvalidArgument(format!("PodSandboxConfig: {e}")))
}

/// [`fields`] with protobuf's own error, for use inside another walk's `read`.
fn fields_raw(
    bytes: &[u8],
    mut read: impl FnMut(u32, &mut CodedInputStream) -> protobuf::Result<bool>,
) -> protobuf::Result<()> {
    let mut input = CodedInputStream::from_bytes(bytes);
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        let wire = WireType::new(tag & 7).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("wire type {}", tag & 7),
            )
        })?;
        if !read(tag >> 3, &mut input)? {
            input.skip_field(wire)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(fields: &[(u32, &[u8])]) -> Any {
        let mut value = Vec::new();
        for (field, bytes) in fields {
            value.push(((field << 3) | 2) as u8);
            value.push(bytes.len() as u8);
            value.extend_from_slice(bytes);
        }
        Any {
            type_url: format!("type.googleapis.com/{POD_SANDBOX_CONFIG}"),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_config_gives_its_hostname_and_metadata() {
        // metadata {name 1, uid 2, namespace 3, attempt 4 (varint)}, hostname 2, log dir 3
        let metadata = b"\x0a\x03web\x12\x02u1\x1a\x07default\x20\x02";
        let any = config(&[(1, metadata), (2, b"web-0"), (3, b"/var/log/pods/x")]);
        let c = PodConfig::of(&any).unwrap().unwrap();
        assert_eq!(c.hostname, "web-0");
        assert_eq!(c.metadata.sandbox_name(), "web_default_u1_2");
        assert_eq!(
            PodConfig::of(&config(&[(1, b"")])).unwrap(),
            Some(PodConfig::default())
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x12, 0x01, b'x'],
            ..Default::default()
        };
        assert_eq!(PodConfig::of(&other).unwrap(), None);
        let mut cut = config(&[(2, b"web-0")]);
        cut.value.truncate(3);
        assert!(matches!(
            PodConfig::of(&cut),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_pod_config_gives_the_pod_s_resources() {
        // linux (8) {cgroup_parent (1), resources (5) {cpu_period 1, cpu_quota 2,
        // cpu_shares 3, memory_limit_in_bytes 4: varints}}
        let resources = b"\x08\xa0\x8d\x06\x10\xf0\x93\x09\x18\x02\x20\x80\x80\x80\x20";
        let mut linux = b"\x0a\x02/k".to_vec();
        linux.push(0x2a);
        linux.push(resources.len() as u8);
        linux.extend_from_slice(resources);
        let c = PodConfig::of(&config(&[(2, b"web-0"), (8, &linux)]))
            .unwrap()
            .unwrap();
        assert_eq!(c.cgroup_parent, "/k");
        assert_eq!(
            c.resources,
            PodResources {
                cpu_period: 100_000,
                cpu_quota: 150_000,
                memory_limit: 64 << 20,
            }
        );
        assert_eq!(
            PodConfig::of(&config(&[(2, b"x")]))
                .unwrap()
                .unwrap()
                .resources,
            PodResources::default()
        );
    }

    #[test]
    fn a_pod_config_gives_its_sysctls_and_survives_its_own_encoding() {
        // linux (8) {sysctls (3): entries {key 1, value 2}}
        let entry = b"\x0a\x16kernel.shm_rmid_forced\x12\x011";
        let mut linux = vec![0x1a, entry.len() as u8];
        linux.extend_from_slice(entry);
        let c = PodConfig::of(&config(&[(8, &linux)])).unwrap().unwrap();
        assert_eq!(
            c.sysctls,
            BTreeMap::from([("kernel.shm_rmid_forced".into(), "1".into())])
        );
        let full = PodConfig {
            metadata: PodMetadata {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 3,
            },
            hostname: "web-0".into(),
            cgroup_parent: "/kubepods/pod1".into(),
            sysctls: BTreeMap::from([
                ("net.ipv4.ip_forward".into(), "1".into()),
                ("kernel.msgmax".into(), "8192".into()),
            ]),
            resources: PodResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                memory_limit: 128 << 20,
            },
        };
        assert_eq!(PodConfig::of(&full.to_any()).unwrap(), Some(full));
    }

    #[test]
    fn roles_come_from_cri_annotations() {
        let cri = |kind: &str, sandbox: &str| json!({"annotations": { CONTAINER_TYPE: kind, SANDBOX_ID: sandbox }});
        assert_eq!(PodRole::of(&json!({"ociVersion": "1.0.2"})), PodRole::None);
        assert_eq!(PodRole::of(&cri("sandbox", "sb1")), PodRole::Sandbox);
        let container = PodRole::Container {
            sandbox_id: "sb1".into(),
        };
        assert_eq!(PodRole::of(&cri("container", "sb1")), container);
        assert_eq!(PodRole::of(&cri("container", "")), PodRole::None);
    }
}
