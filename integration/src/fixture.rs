//! What every end-to-end test of our shims starts from, and the questions they all ask.

use std::path::Path;
use std::time::Duration;

use crate::checks::{mounts_mentioning, processes_mentioning, wait_until};
use crate::{require_root, target_bin_dir, Containerd, BUSYBOX_REF};

/// Generous upper bound for something containerd does asynchronously; never a figure.
pub const LONG: Duration = Duration::from_secs(20);

/// A private containerd with our `target/` binaries first on its `PATH` (so
/// `io.containerd.runc.v2` is our shim) and busybox imported.
pub fn with_our_shims() -> Containerd {
    with_our_shims_and(&[])
}

/// [`with_our_shims`] plus Debian's Go shim as `io.containerd.gorunc.v2`: the baseline a
/// test or benchmark compares ours with.
pub fn with_our_and_go_shims() -> Containerd {
    require_root();
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .go_shim(true)
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox image");
    c
}

/// `ctr run -d` of busybox `sleep 100000` as container `id` on `runtime`.
pub fn run_sleeping(c: &Containerd, runtime: &str, id: &str) {
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        BUSYBOX_REF,
        id,
        "sleep",
        "100000",
    ]);
}

/// [`with_our_shims`] with more directories on `PATH` after ours (stand-ins for `criu`...).
pub fn with_our_shims_and(extra: &[&Path]) -> Containerd {
    require_root();
    let shim = target_bin_dir().join("containerd-shim-runc-v2");
    assert!(
        shim.exists(),
        "build the shims first: {} is missing",
        shim.display()
    );
    let mut b = Containerd::builder().bin_dir(target_bin_dir());
    for dir in extra {
        b = b.bin_dir(dir);
    }
    let c = b.start().expect("start containerd");
    c.import_busybox().expect("import busybox image");
    c
}

/// Every shim serving `c` is ours, not Debian's.
pub fn assert_ours(c: &Containerd) {
    let ours = std::fs::canonicalize(target_bin_dir().join("containerd-shim-runc-v2"))
        .expect("our shim binary");
    for pid in c.shim_pids() {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        assert_eq!(exe, ours, "shim {pid} is not ours");
    }
}

/// The STATUS column of `ctr task ls` for `id`.
pub fn task_status(c: &Containerd, id: &str) -> Option<String> {
    c.ctr(&["task", "ls"])
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
}

/// The PID column of `ctr task ls` for `id` (the init's pid on the host).
pub fn task_pid(c: &Containerd, id: &str) -> Option<u32> {
    c.ctr(&["task", "ls"])
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// Waits until task `id` has status `want`.
pub fn wait_status(c: &Containerd, id: &str, want: &str) {
    assert!(
        wait_until(LONG, || task_status(c, id).as_deref() == Some(want)),
        "task {id} never became {want}: {:?}",
        task_status(c, id)
    );
}

/// Nothing of container `id` is left behind: no shim daemon, no mount, no process (cargo and
/// test binaries aside). Each backend's tests add their runtime's own state on top.
pub fn assert_nothing_left(c: &Containerd, id: &str) {
    assert!(
        wait_until(LONG, || c.shim_pids().is_empty()),
        "shim still running: {:?}",
        c.shim_pids()
    );
    assert_eq!(
        mounts_mentioning(id),
        Vec::<String>::new(),
        "mounts of {id} left behind"
    );
    let procs: Vec<_> = processes_mentioning(id)
        .into_iter()
        .filter(|(_, cmd)| !cmd.contains("cargo") && !cmd.contains("/deps/"))
        .collect();
    assert!(procs.is_empty(), "processes of {id} left behind: {procs:?}");
}

/// The annotation that puts containers in one shim, as a pod's are.
pub const GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";

/// `ctr run -d` of a sleeping busybox `id` in shim group `group` (on `c`'s default runtime).
pub fn sleep_in_group(c: &Containerd, group: &str, id: &str) {
    let annotation = format!("{GROUP_ANNOTATION}={group}");
    c.ctr_ok(&[
        "run",
        "-d",
        "--annotation",
        &annotation,
        crate::BUSYBOX_REF,
        id,
        "sleep",
        "1000",
    ]);
}
