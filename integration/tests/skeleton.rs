//! The skeleton shim (`shim-common/examples/skeleton.rs`, built as the example
//! `containerd-shim-skeleton-v2`) driven through a real containerd 1.6 with `ctr run --runtime
//! io.containerd.skeleton.v2`: the starting point the README gives runtime authors works.

use std::path::Path;

use integration::fixture::{assert_nothing_left, wait_status, with_our_shims_and};
use integration::{target_bin_dir, unique_id, Containerd, BUSYBOX_REF};

const RUNTIME: &str = "io.containerd.skeleton.v2";
const BINARY: &str = "containerd-shim-skeleton-v2";

/// A private containerd with cargo's examples directory on its `PATH`, where the skeleton is.
fn with_skeleton() -> Containerd {
    let examples = target_bin_dir().join("examples");
    assert!(
        examples.join(BINARY).exists(),
        "build the examples first (make build): {} is missing",
        examples.join(BINARY).display()
    );
    with_our_shims_and(&[&examples])
}

/// Every shim serving `c` is the skeleton.
fn assert_skeleton(c: &Containerd) {
    let ours = std::fs::canonicalize(target_bin_dir().join("examples").join(BINARY)).unwrap();
    let shims = c.shim_pids();
    assert!(!shims.is_empty(), "no shim runs");
    for pid in shims {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        assert_eq!(exe, ours, "shim {pid} is not the skeleton");
    }
}

#[test]
fn run_rm_delivers_output_and_the_chosen_exit_code() {
    let c = with_skeleton();
    let id = unique_id("skel-run");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "echo hello from the skeleton; exit 7",
    ]);
    assert_eq!(out.status, 7, "{out:?}");
    assert_eq!(out.stdout.trim(), "hello from the skeleton", "{out:?}");
    assert_nothing_left(&c, &id);
}

#[test]
fn detached_task_killed_then_deleted_leaves_nothing() {
    let c = with_skeleton();
    let id = unique_id("skel-kill");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX_REF,
        &id,
        "sleep",
        "1000",
    ]);
    assert_skeleton(&c);
    wait_status(&c, &id, "RUNNING");
    let pid = c
        .ctr_ok(&["task", "ls"])
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id.as_str()))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
        .expect("the task's pid");
    let ps = c.ctr_ok(&["task", "ps", &id]).stdout;
    assert!(
        ps.lines()
            .any(|l| l.split_whitespace().next() == Some(&pid.to_string())),
        "ctr task ps lacks the init {pid}: {ps}"
    );
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    let deleted = c.ctr(&["task", "delete", &id]);
    assert!(deleted.stderr.contains("exit code 137"), "{deleted:?}");
    c.ctr_ok(&["container", "delete", &id]);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "init {pid} still exists"
    );
    assert_nothing_left(&c, &id);
}
