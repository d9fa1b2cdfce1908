//! containerd 2.x's sandbox API (`sandboxer = "shim"`), played by the conformance runner
//! against our runc and Wasm shims (one SDK): a pod without a pause container, its container
//! in the sandbox's namespaces and the test's own netns, a reconnect as after a containerd
//! restart, stop, wait, shutdown and the `delete` action; every out-of-order call refused; a
//! SIGKILLed shim's pod stopped by `delete`; what containerd 2.3 reads besides (the sandbox
//! spec, `SandboxInfo`, `Stats` after an exit, a host-network sandbox).

use integration::conformance::{run_sandbox_pod, Config, Generation, Report};
use integration::{require_root, target_bin_dir, unique_id};

fn pod(generation: Generation, kill_shim: bool) -> Report {
    pod_of("containerd-shim-runc-v2", generation, kill_shim)
}

fn pod_of(binary: &str, generation: Generation, kill_shim: bool) -> Report {
    require_root();
    let shim = target_bin_dir().join(binary);
    assert!(shim.exists(), "build the shims first: {}", shim.display());
    let report = run_sandbox_pod(
        &Config {
            shim,
            generation,
            runtime_options: None,
            id: unique_id("pod"),
            one_socket: false,
            in_vm: false,
            rootfs: Default::default(),
        },
        kill_shim,
    );
    assert!(report.passed(), "as containerd {generation}:\n{report}");
    eprintln!("as containerd {generation}:\n{report}");
    report
}

fn step_names(r: &Report) -> Vec<&str> {
    r.steps.iter().map(|s| s.name.as_str()).collect()
}

#[test]
fn a_pause_less_pod_lives_and_ends_as_containerd_20_drives_it() {
    let r = pod(Generation::V2_0, false);
    // Every step ran (a walk that stops early passes only what it reached).
    assert_eq!(
        step_names(&r),
        [
            "start",
            "start before create",
            "bad netns refused",
            "bad pod config refused",
            "global sysctl refused",
            "create sandbox",
            "create twice",
            "status of an unknown sandbox",
            "start sandbox",
            "sandbox spec",
            "start twice",
            "platform",
            "status ready",
            "status info",
            "create through a second start",
            "host-network sandbox",
            "pod container",
            "sandbox metrics",
            "reconnect",
            "status after reconnect",
            "stats after exit",
            "container gone",
            "stop sandbox",
            "wait sandbox",
            "status after stop",
            "holder gone",
            "shutdown sandbox",
            "shim exits",
            "netns as CNI left it",
            "delete action",
        ],
        "{r}"
    );
}

#[test]
fn a_pause_less_pod_lives_and_ends_as_containerd_23_drives_it() {
    let r = pod(Generation::V2_3, false);
    assert_eq!(
        r.steps.last().map(|s| s.name.as_str()),
        Some("delete action"),
        "{r}"
    );
}

#[test]
fn a_killed_shims_pod_is_stopped_by_the_delete_action() {
    // Racy by nature (the delete runs as the dead shim's last threads go): repeated.
    for _ in 0..6 {
        let r = pod(Generation::V2_0, true);
        assert_eq!(
            r.steps.last().map(|s| s.name.as_str()),
            Some("pod stopped by delete"),
            "{r}"
        );
    }
}

#[test]
fn the_wasm_shim_serves_the_same_pod_from_the_same_sdk() {
    let r = pod_of("containerd-shim-wasm-v2", Generation::V2_0, false);
    assert_eq!(
        r.steps.last().map(|s| s.name.as_str()),
        Some("delete action"),
        "{r}"
    );
    let r = pod_of("containerd-shim-wasm-v2", Generation::V2_0, true);
    assert_eq!(
        r.steps.last().map(|s| s.name.as_str()),
        Some("pod stopped by delete"),
        "{r}"
    );
}
