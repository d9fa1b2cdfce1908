//! A container's place in a CRI pod, from the annotations containerd's CRI plugin writes
//! into every container's spec: which shim serves it (one per pod) and what it shares.

use serde_json::Value;

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
