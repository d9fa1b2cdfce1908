//! What the CRI end-to-end tests start from: pods and containers made as a kubelet makes
//! them, deleted as it deletes them, and the check that nothing of them is left.

use std::time::Duration;

use crate::checks::{mounts_mentioning, processes_mentioning, runc_state, wait_until};
use crate::cri::{api, container_config, pod_config, CriClient, CRI_NAMESPACE};
use crate::{unique_id, Containerd, BUSYBOX_REF};

/// Generous upper bound for a pod's asynchronous teardown; never a figure.
pub const LONG: Duration = Duration::from_secs(30);

/// A private containerd with CRI on the binaries `make build` left in
/// [`crate::target_bin_dir`], once each of `binaries` (the shim under test, `pause`) is there.
pub fn containerd_with_cri(binaries: &[&str]) -> Containerd {
    crate::require_root();
    for bin in binaries {
        let p = crate::target_bin_dir().join(bin);
        assert!(
            p.exists(),
            "build first (make build): {} is missing",
            p.display()
        );
    }
    Containerd::builder()
        .bin_dir(crate::target_bin_dir())
        .cri(true)
        .start()
        .expect("start containerd with CRI")
}

/// A pod as the tests use it: its id and the config it was run with.
pub struct Pod {
    pub id: String,
    pub config: api::PodSandboxConfig,
}

/// Runs pod `name` (made unique) on `handler`; panics (test-only) with containerd's log.
pub fn run_pod(c: &Containerd, cri: &CriClient, name: &str, handler: &str) -> Pod {
    run_pod_with(c, cri, name, handler, |_| {})
}

/// [`run_pod`] with the pod config changed by `edit` first.
pub fn run_pod_with(
    c: &Containerd,
    cri: &CriClient,
    name: &str,
    handler: &str,
    edit: impl FnOnce(&mut api::PodSandboxConfig),
) -> Pod {
    let mut config = pod_config(
        &unique_id(name),
        &c.dir().join("pods").join(unique_id(name)),
    );
    edit(&mut config);
    let id = cri
        .run_pod_sandbox(&config, handler)
        .unwrap_or_else(|e| panic!("{e}\n--- containerd log ---\n{}", c.log_tail(30)));
    Pod { id, config }
}

/// Creates and starts a busybox container running `cmd` in `pod`; returns its id.
pub fn start_busybox(cri: &CriClient, pod: &Pod, name: &str, cmd: &[&str]) -> String {
    start_container(cri, pod, container_config(name, BUSYBOX_REF, cmd))
}

/// Creates and starts the container `config` in `pod`; returns its id.
pub fn start_container(cri: &CriClient, pod: &Pod, config: api::ContainerConfig) -> String {
    let id = cri
        .create_container(&pod.id, &config, &pod.config)
        .expect("CreateContainer");
    cri.start_container(&id).expect("StartContainer");
    id
}

/// A busybox container that sleeps until it is stopped.
pub fn sleeper(cri: &CriClient, pod: &Pod, name: &str) -> String {
    start_busybox(cri, pod, name, &["sleep", "100000"])
}

/// Stops and removes `pod` through CRI, as a kubelet deleting it does.
pub fn delete_pod(cri: &CriClient, pod: &Pod) {
    cri.stop_pod_sandbox(&pod.id).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox");
}

/// [`delete_pod`] for a pod whose shim was killed: containerd may still be handling the dead
/// shim's exits (its event monitor retries them with a back-off) and refuse the stop
/// meanwhile, and a kubelet then retries StopPodSandbox; so does this, until [`LONG`].
pub fn delete_pod_retrying(cri: &CriClient, pod: &Pod) {
    let mut last = None;
    let stopped = wait_until(LONG, || match cri.stop_pod_sandbox(&pod.id) {
        Ok(()) => true,
        Err(e) => {
            last = Some(e);
            false
        }
    });
    assert!(stopped, "StopPodSandbox: {last:?}");
    cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox");
}

/// Nothing of the listed pods and containers is left: no shim, no runc state, no mount
/// (rootfs, shm, network namespace), no process, no veth on the bridge, no CRI record.
pub fn assert_all_gone(c: &Containerd, cri: &CriClient, ids: &[String]) {
    assert!(
        wait_until(LONG, || c.shim_pids().is_empty()),
        "shims still running: {:?}",
        c.shim_pids()
    );
    for id in ids {
        assert!(
            !runc_state(CRI_NAMESPACE, id).exists(),
            "runc state of {id} left behind"
        );
        assert_eq!(
            mounts_mentioning(id),
            Vec::<String>::new(),
            "mounts of {id}"
        );
        let procs: Vec<_> = processes_mentioning(id)
            .into_iter()
            .filter(|(_, cmd)| !cmd.contains("cargo") && !cmd.contains("/deps/"))
            .collect();
        assert!(procs.is_empty(), "processes of {id} left behind: {procs:?}");
    }
    let netns: Vec<String> = mounts_mentioning(&c.dir().to_string_lossy())
        .into_iter()
        .filter(|m| m.contains("/netns/"))
        .collect();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
    if let Some(bridge) = c.cni_bridge() {
        let ports: Vec<_> = std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(ports.is_empty(), "veths left on {bridge}: {ports:?}");
    }
    assert!(cri.list_pod_sandboxes().expect("ListPodSandbox").is_empty());
    assert!(cri
        .list_containers(None)
        .expect("ListContainers")
        .is_empty());
}
