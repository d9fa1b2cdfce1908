//! `containerd-shim-jail-v2` through a real containerd 1.6 with `ctr run --runtime
//! io.containerd.jail.v2`, with `runj` played by `runj-standin` (runj's CLI and state
//! contract, the process a chrooted Linux child). Jail isolation itself is not tested here.

use std::path::{Path, PathBuf};

use integration::fixture::{assert_nothing_left, wait_status, with_our_shims_and};
use integration::{target_bin_dir, unique_id, Containerd, BUSYBOX_REF};

const RUNTIME: &str = "io.containerd.jail.v2";
const RUNJ_STATE: &str = "/var/lib/runj/jails";

/// A directory holding the stand-in as `runj`.
fn runj_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        target_bin_dir().join("runj-standin"),
        dir.path().join("runj"),
    )
    .unwrap();
    dir
}

fn with_runj() -> (Containerd, tempfile::TempDir) {
    let dir = runj_dir();
    let c = with_our_shims_and(&[dir.path()]);
    (c, dir)
}

fn run(
    c: &Containerd,
    extra: &[&str],
    id: &str,
    args: &[&str],
) -> integration::containerd::CtrOutput {
    let mut a = vec!["run", "--runtime", RUNTIME];
    a.extend_from_slice(extra);
    a.push(BUSYBOX_REF);
    a.push(id);
    a.extend_from_slice(args);
    c.ctr(&a)
}

fn runj_state(id: &str) -> PathBuf {
    Path::new(RUNJ_STATE).join(id)
}

/// Nothing of `id` is left: no runj state, no mount, no process, no shim.
fn assert_gone(c: &Containerd, id: &str) {
    assert_nothing_left(c, id);
    assert!(!runj_state(id).exists(), "runj state of {id} left behind");
}

#[test]
fn exec_kill_and_delete_leave_nothing() {
    let (c, _runj) = with_runj();
    let id = unique_id("jexec");
    let out = run(&c, &["-d"], &id, &["sleep", "1000"]);
    assert!(out.success(), "{out:?}");
    wait_status(&c, &id, "RUNNING");
    let state = std::fs::read_to_string(runj_state(&id).join("state.json")).unwrap();
    assert!(state.contains("\"running\""), "{state}");

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo in-jail; exit 3",
    ]);
    assert_eq!(out.status, 3, "{out:?}");
    assert_eq!(out.stdout.trim(), "in-jail");

    c.ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]);
    wait_status(&c, &id, "STOPPED");
    let del = c.ctr(&["task", "delete", &id]);
    // sleep has no SIGTERM handler: 128 + 15, from the reaper, not a made-up 137.
    assert!(del.stderr.contains("exit code 143"), "{del:?}");
    c.ctr_ok(&["container", "delete", &id]);
    assert_gone(&c, &id);
}

#[test]
fn runj_missing_from_path_is_a_clear_error() {
    // No stand-in on containerd's PATH, and the host has no runj.
    let c = with_our_shims_and(&[]);
    let id = unique_id("jnorunj");
    let out = run(&c, &["--rm"], &id, &["true"]);
    assert!(!out.success());
    assert!(
        out.stderr.contains("runj binary \"runj\" not found"),
        "{out:?}"
    );
    let _ = c.ctr(&["container", "delete", &id]);
    assert_gone(&c, &id);
}

#[test]
fn failing_create_reports_runj_stderr_and_unmounts() {
    let (c, runj) = with_runj();
    std::fs::write(
        runj.path().join("runj-standin.fail-create"),
        "jail: create: jail_set: Operation not permitted",
    )
    .unwrap();
    let id = unique_id("jfail");
    let out = run(&c, &["--rm"], &id, &["true"]);
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("runj create failed: Error: jail: create: jail_set: Operation not permitted"),
        "{out:?}"
    );
    let _ = c.ctr(&["container", "delete", &id]);
    assert_gone(&c, &id);
}

#[test]
fn linux_only_spec_runs_with_a_warning_in_the_shim_log() {
    let (c, _runj) = with_runj();
    let id = unique_id("jwarn");
    let out = run(&c, &["--rm"], &id, &["true"]);
    assert!(out.success(), "{out:?}");
    let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
    let warning = log
        .lines()
        .find(|l| l.contains(&id) && l.contains("runj does not apply"))
        .unwrap_or_else(|| panic!("no warning in the shim log:\n{}", c.log_tail(40)));
    for field in [
        "linux.namespaces",
        "process.capabilities",
        "linux.cgroupsPath",
    ] {
        assert!(warning.contains(field), "{warning}");
    }
    assert_gone(&c, &id);
}

#[test]
fn kill_of_a_jail_that_is_gone_is_not_found() {
    let (c, _runj) = with_runj();
    // The jail's state disappears under a running container (an operator's `runj delete`
    // of a crashed jail): kill must answer NotFound at once, not hang.
    let id = unique_id("jgone");
    assert!(run(&c, &["-d"], &id, &["sleep", "1000"]).success());
    wait_status(&c, &id, "RUNNING");
    let pid: i32 = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(runj_state(&id).join("state.json")).unwrap(),
    )
    .unwrap()["PID"]
        .as_i64()
        .unwrap() as i32;
    std::fs::remove_dir_all(runj_state(&id)).unwrap();
    let out = c.ctr_timeout(
        &["task", "kill", "-s", "SIGKILL", &id],
        std::time::Duration::from_secs(10),
    );
    assert!(!out.timed_out && !out.success(), "{out:?}");
    assert!(out.stderr.contains("not found"), "{out:?}");
    // Clean up behind the shim's back, as the operator would.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_status(&c, &id, "STOPPED");
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
    assert_gone(&c, &id);

    // A jail whose process already ended: NotFound as well.
    let id = unique_id("jdone");
    assert!(run(&c, &["-d"], &id, &["true"]).success());
    wait_status(&c, &id, "STOPPED");
    let out = c.ctr(&["task", "kill", &id]);
    assert!(
        !out.success() && out.stderr.contains("not found"),
        "{out:?}"
    );
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
    assert_gone(&c, &id);
}

#[test]
fn pause_update_and_stats_say_why_not() {
    let (c, _runj) = with_runj();
    let id = unique_id("jpause");
    assert!(run(&c, &["-d"], &id, &["sleep", "1000"]).success());
    wait_status(&c, &id, "RUNNING");
    let out = c.ctr(&["task", "pause", &id]);
    assert!(
        !out.success() && out.stderr.contains("runj has no pause"),
        "{out:?}"
    );
    // containerd 1.6's Metrics API drops a task's error and says "no metrics received".
    let out = c.ctr(&["task", "metrics", &id]);
    assert!(!out.success(), "{out:?}");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
    assert_gone(&c, &id);
}
