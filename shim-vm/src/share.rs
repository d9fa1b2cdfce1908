//! A container's bundle as the guest sees it: a directory of the VM's shared directory
//! (virtiofs, so containers added to a running VM need no hot-plug) holding the rootfs the
//! SDK mounted on the host, every host path the spec binds in, and a `config.json`
//! rewritten for the guest.
//!
//! Only what must change across the VM boundary changes in the spec: host paths (the
//! rootfs, bind sources, namespace files), and what the guest has no use for (hooks, which
//! are host programs; AppArmor and SELinux labels, which the guest kernel does not
//! enforce). The process, mounts, resources and seccomp profile are the container's own.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use serde_json::Value;
use shim_common::mount::unmount_all;
use shim_common::{Context, Error, Result};

/// Where the guest mounts the VM's shared directory.
pub const GUEST_SHARED: &str = "/run/shared";

/// The guest runtime the image holds ([`crate::image::RUNTIMES`]).
pub const IMAGE_RUNTIME: &str = "crun";

/// Where [`provide_runtime`] puts another guest runtime: a name no container id can have.
const RUNTIMES: &str = ".runtimes";

/// The guest runtime `name` (`GuestRuntime`) as the guest's runc backend calls it.
pub fn guest_runtime(name: &str) -> String {
    if name == IMAGE_RUNTIME {
        name.to_string()
    } else {
        format!("{GUEST_SHARED}/{RUNTIMES}/{name}")
    }
}

/// Makes guest runtime `name` available in the VM whose shared directory is `shared`:
/// `crun` is in the image; another (`runc`: 9 MB that every guest would otherwise unpack at
/// boot and hold in its memory) is the host's own binary, copied in for this VM only. Its
/// libraries are crun's too.
pub fn provide_runtime(shared: &Path, name: &str) -> Result<()> {
    if name == IMAGE_RUNTIME {
        return Ok(());
    }
    let host = shim_common::executable::resolve("guest runtime", name)?;
    let dir = shared.join(RUNTIMES);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    fs::copy(&host, dir.join(name))
        .with_context(|| format!("copy {} into the VM's share", host.display()))?;
    Ok(())
}

/// One container's directory in the shared directory. Dropped before [`Share::keep`], it
/// unmounts and removes what it made.
pub struct Share {
    host: PathBuf,
    guest: String,
    kept: bool,
}

impl Share {
    /// Shares the container `id` of host bundle `bundle` (whose parsed `config.json` is
    /// `spec`) under `shared` (the VM's shared directory). `sandbox` is the guest pid of
    /// the pod's sandbox, if one runs.
    pub fn create(
        shared: &Path,
        id: &str,
        bundle: &Path,
        mut spec: Value,
        sandbox: Option<u32>,
    ) -> Result<Share> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(Error::InvalidArgument(format!("bad container id {id:?}")));
        }
        let share = Share {
            host: shared.join(id),
            guest: format!("{GUEST_SHARED}/{id}"),
            kept: false,
        };
        if share.host.exists() {
            // Left by a create that died halfway: start afresh.
            remove(&share.host);
        }
        fs::create_dir_all(&share.host)
            .with_context(|| format!("create {}", share.host.display()))?;
        share.rootfs(bundle, &spec)?;
        share.binds(&mut spec)?;
        for_guest(&mut spec, sandbox);
        crate::spec_version::for_guest(&mut spec)?;
        let text = serde_json::to_vec(&spec)
            .map_err(|e| Error::Runtime(format!("encode config.json: {e}")))?;
        fs::write(share.host.join("config.json"), text).context("write the guest's config.json")?;
        Ok(share)
    }

    /// The bundle's path in the guest.
    pub fn guest_bundle(&self) -> &str {
        &self.guest
    }

    /// The bundle's path on the host.
    pub fn host_dir(&self) -> &Path {
        &self.host
    }

    /// Keeps everything, for [`remove`] at delete.
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.host.clone()
    }

    /// The spec's root (the SDK's mount at `bundle/rootfs`, or a host directory), bound
    /// into the share.
    fn rootfs(&self, bundle: &Path, spec: &Value) -> Result<()> {
        let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
        let source = bundle.join(root);
        bind(&source, &self.host.join("rootfs"))
    }

    /// Every bind mount's host source, bound into `mounts/<n>` and named so in the spec.
    fn binds(&self, spec: &mut Value) -> Result<()> {
        let Some(mounts) = spec["mounts"].as_array_mut() else {
            return Ok(());
        };
        for (n, m) in mounts.iter_mut().enumerate() {
            let is_bind = m["type"].as_str() == Some("bind")
                || m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
            let Some(source) = m["source"].as_str().filter(|s| s.starts_with('/')) else {
                continue;
            };
            if !is_bind {
                continue;
            }
            let target = self.host.join("mounts").join(n.to_string());
            bind(Path::new(source), &target)?;
            m["source"] = Value::String(format!("{}/mounts/{n}", self.guest));
        }
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if !self.kept {
            remove(&self.host);
        }
    }
}

/// Unmounts and removes a container's share (also the `delete` action's, after a crash).
/// Once the mounts are gone, only files and empty directories are removed (the guest's
/// runtime writes its own files into the bundle): a mount that would not go away keeps its
/// directory, so nothing below it is ever deleted.
pub fn remove(dir: &Path) {
    let mounts = dir.join("mounts");
    if let Ok(entries) = fs::read_dir(&mounts) {
        for e in entries.flatten() {
            remove_mount_point(&e.path());
        }
    }
    remove_mount_point(&dir.join("rootfs"));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir(&path),
                _ => fs::remove_file(&path),
            };
            if let Err(e) = gone {
                log::warn!("remove {}: {e}", path.display());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {}: {e}", dir.display());
        }
    }
}

fn remove_mount_point(path: &Path) {
    if let Err(e) = unmount_all(path) {
        log::warn!("unmount {}: {e}", path.display());
    }
    let gone = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(e) = gone {
        log::warn!("remove {}: {e}", path.display());
    }
}

/// Binds host `source` (a file or a directory, with what is mounted below it) on
/// `target`, which is made to match.
fn bind(source: &Path, target: &Path) -> Result<()> {
    let meta = fs::metadata(source).with_context(|| format!("share {}", source.display()))?;
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    if meta.is_dir() {
        fs::create_dir_all(target)
    } else {
        fs::write(target, b"")
    }
    .with_context(|| format!("create {}", target.display()))?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
    .with_context(|| format!("bind {} on {}", source.display(), target.display()))
}

/// What the guest does without: host programs as hooks, host namespace files, host LSM
/// labels. `sandbox`: the guest pid of the pod's sandbox.
fn for_guest(spec: &mut Value, sandbox: Option<u32>) {
    if let Some(obj) = spec.as_object_mut() {
        obj.remove("hooks");
    }
    spec["root"]["path"] = Value::String("rootfs".into());
    if let Some(process) = spec["process"].as_object_mut() {
        process.remove("apparmorProfile");
        process.remove("selinuxLabel");
    }
    if let Some(linux) = spec["linux"].as_object_mut() {
        linux.remove("mountLabel");
        if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            guest_namespaces(ns);
        }
    }
    own_uts(spec, sandbox);
}

/// A hostname without a UTS namespace: a host-network pod's (containerd's CRI gives its
/// containers the node's hostname and the host's UTS namespace). In a VM the pod's host is
/// its own, so the container joins the pod sandbox's UTS namespace, or gets one (the
/// sandbox itself): the guest runtime refuses a hostname without one.
fn own_uts(spec: &mut Value, sandbox: Option<u32>) {
    if spec["hostname"].as_str().is_none_or(str::is_empty) {
        return;
    }
    let Some(linux) = spec["linux"].as_object_mut() else {
        return;
    };
    let ns = linux
        .entry("namespaces")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Some(ns) = ns.as_array_mut() else {
        return;
    };
    if ns.iter().any(|n| n["type"] == "uts") {
        return;
    }
    ns.push(match sandbox {
        Some(pid) => serde_json::json!({"type": "uts", "path": format!("/proc/{pid}/ns/uts")}),
        None => serde_json::json!({"type": "uts"}),
    });
}

/// The namespaces a container joins, as the guest can join them. A `/proc/<pid>/ns/<type>`
/// path names a guest process — the VM shim reports guest pids, so containerd's CRI points
/// a pod's containers at its sandbox's namespaces that way — and stays. Any other path is a
/// host file the guest cannot open: a host network namespace (CNI's, of the pod) is the
/// VM's own network, so the container stays in the guest's, where the pod's interface is;
/// any other becomes a new namespace of the guest.
fn guest_namespaces(ns: &mut Vec<Value>) {
    let of_guest = |path: &str| {
        let mut parts = path.split('/');
        parts.next() == Some("")
            && parts.next() == Some("proc")
            && parts.next().is_some_and(|p| p.parse::<u32>().is_ok())
            && parts.next() == Some("ns")
            && parts.next().is_some()
            && parts.next().is_none()
    };
    ns.retain(|n| {
        let host_path = n["path"].as_str().is_some_and(|p| !of_guest(p));
        !(host_path && n["type"] == "network")
    });
    for n in ns.iter_mut().filter_map(Value::as_object_mut) {
        if n.get("path")
            .and_then(Value::as_str)
            .is_some_and(|p| !of_guest(p))
        {
            n.remove("path");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_guest_spec_loses_host_paths_and_keeps_the_container_s_own() {
        let mut spec = json!({
            "ociVersion": "1.1.0",
            "root": {"path": "/var/lib/x/rootfs", "readonly": true},
            "process": {"args": ["true"], "apparmorProfile": "cri-default"},
            "hooks": {"createRuntime": [{"path": "/usr/bin/hook"}]},
            "linux": {
                "namespaces": [
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/7/ns/ipc"},
                    {"type": "uts", "path": "/run/host/uts"}
                ],
                "mountLabel": "x",
                "resources": {"memory": {"limit": 1}}
            }
        });
        for_guest(&mut spec, Some(7));
        assert_eq!(spec["root"], json!({"path": "rootfs", "readonly": true}));
        assert!(spec.get("hooks").is_none());
        assert_eq!(spec["process"], json!({"args": ["true"]}));
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts"}
            ])
        );
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 1);
        assert!(spec["linux"].get("mountLabel").is_none());
    }

    #[test]
    fn a_host_network_pod_gets_the_uts_namespace_of_its_sandbox_in_the_guest() {
        let host_network = |ns: Value| json!({"hostname": "node-1", "linux": {"namespaces": ns}});
        // The sandbox: a namespace of its own for the hostname.
        let mut sandbox = host_network(json!([{"type": "pid"}]));
        for_guest(&mut sandbox, None);
        assert_eq!(
            sandbox["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "uts"}])
        );
        // Its containers: the sandbox's.
        let mut container = host_network(json!([{"type": "ipc", "path": "/proc/7/ns/ipc"}]));
        for_guest(&mut container, Some(7));
        assert_eq!(
            container["linux"]["namespaces"][1],
            json!({"type": "uts", "path": "/proc/7/ns/uts"})
        );
        // A spec with its UTS namespace, or without a hostname, stays as it is.
        let mut own = host_network(json!([{"type": "uts"}]));
        for_guest(&mut own, Some(7));
        assert_eq!(own["linux"]["namespaces"], json!([{"type": "uts"}]));
        let mut plain = json!({"linux": {"namespaces": []}});
        for_guest(&mut plain, Some(7));
        assert_eq!(plain["linux"]["namespaces"], json!([]));
    }

    #[test]
    fn a_share_binds_rootfs_and_bind_sources_and_goes_with_its_guard() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        fs::write(bundle.join("rootfs/bin/sh"), b"sh").unwrap();
        fs::write(tmp.path().join("hosts"), b"127.0.0.1 here\n").unwrap();
        let spec = json!({
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": tmp.path().join("hosts"), "options": ["rbind", "ro"]}
            ]
        });
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let shared = tmp.path().join("shared");
        let spec = shim_common::bundle::spec(&bundle).unwrap();
        let share = Share::create(&shared, "c1", &bundle, spec, None).unwrap();
        let dir = shared.join("c1");
        assert_eq!(share.guest_bundle(), "/run/shared/c1");
        assert_eq!(fs::read(dir.join("rootfs/bin/sh")).unwrap(), b"sh");
        assert_eq!(fs::read(dir.join("mounts/1")).unwrap(), b"127.0.0.1 here\n");
        let written: Value =
            serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(written["mounts"][1]["source"], "/run/shared/c1/mounts/1");
        assert_eq!(written["mounts"][0]["source"], "proc");
        drop(share);
        assert!(
            !dir.exists(),
            "a dropped share unmounts and removes its directory"
        );
        assert_eq!(
            fs::read(bundle.join("rootfs/bin/sh")).unwrap(),
            b"sh",
            "the source is untouched"
        );
    }

    #[test]
    fn a_guest_runtime_missing_on_the_host_is_named_and_nothing_is_copied() {
        let shared = tempfile::tempdir().unwrap();
        provide_runtime(shared.path(), IMAGE_RUNTIME).unwrap();
        assert!(
            !shared.path().join(RUNTIMES).exists(),
            "crun is the image's"
        );
        let e = provide_runtime(shared.path(), "no-such-runtime").unwrap_err();
        assert!(
            e.to_string().contains("\"no-such-runtime\" not found"),
            "{e}"
        );
        assert!(!shared.path().join(RUNTIMES).exists());
        provide_runtime(shared.path(), "sh").unwrap();
        assert!(shared.path().join(RUNTIMES).join("sh").is_file());
        assert_eq!(guest_runtime("sh"), format!("{GUEST_SHARED}/{RUNTIMES}/sh"));
        assert_eq!(guest_runtime(IMAGE_RUNTIME), "crun");
    }
}
