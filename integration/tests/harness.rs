//! Smoke test of the harness itself, using only Debian's Go shim, so it is
//! meaningful before (and independently of) our own shim.

use std::path::PathBuf;
use std::time::Instant;

use integration::{require_root, unique_id, Containerd, BUSYBOX_REF, GO_RUNTIME};

/// Pids whose command line mentions `needle`.
fn procs_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) {
                out.push((pid, cmd));
            }
        }
    }
    out
}

#[test]
fn go_shim_runs_busybox_and_teardown_is_clean() {
    require_root();
    let t0 = Instant::now();
    let c = Containerd::builder()
        .go_shim(true)
        .start()
        .expect("start containerd");
    eprintln!(
        "containerd ready in {:?} (snapshotter {}) at {}",
        t0.elapsed(),
        c.snapshotter(),
        c.address().display()
    );
    let dir: PathBuf = c.dir().to_path_buf();
    let address = c.address().to_string_lossy().into_owned();

    let t1 = Instant::now();
    c.import_busybox().expect("import busybox");
    eprintln!("import took {:?}", t1.elapsed());

    // Unique ids: runc state and cgroup paths are host-wide, so fixed ids
    // would collide with a concurrently running copy of this test.
    let (id1, id2, id3) = (unique_id("t1"), unique_id("t2"), unique_id("t3"));
    let t2 = Instant::now();
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        GO_RUNTIME,
        BUSYBOX_REF,
        &id1,
        "echo",
        "hello",
    ]);
    eprintln!("ctr run echo took {:?}", t2.elapsed());
    assert_eq!(out.stdout.trim(), "hello", "{out:?}");

    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        GO_RUNTIME,
        BUSYBOX_REF,
        &id2,
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status, 3, "exit code not propagated: {out:?}");

    // A long-running task left for Drop to clean up, to prove the teardown
    // kills shims and container processes, not just an idle daemon.
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        GO_RUNTIME,
        BUSYBOX_REF,
        &id3,
        "sleep",
        "1000",
    ]);
    let shims = c.shim_pids();
    assert!(!shims.is_empty(), "no shim found for {address}");
    let argv0 = std::fs::read(format!("/proc/{}/cmdline", shims[0])).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&argv0).contains("containerd-shim-"),
        "unexpected shim cmdline"
    );
    let pss = integration::pss_kb(shims[0]).expect("pss");
    let rss = integration::rss_kb(shims[0]).expect("rss");
    eprintln!("Go shim pid {} pss {pss} kB rss {rss} kB", shims[0]);
    assert!(pss > 0 && rss >= pss);
    let ps = c.ctr_ok(&["tasks", "ls"]);
    // Columns: TASK PID STATUS.
    let task_pid: i32 = ps
        .stdout
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id3.as_str()) && f.get(2) == Some(&"RUNNING"))
                .then(|| f.get(1)?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{id3} not running: {ps:?}"));
    let shim_set = shims.clone();

    let t3 = Instant::now();
    drop(c);
    eprintln!("teardown took {:?}", t3.elapsed());

    assert!(!dir.exists(), "{} still exists", dir.display());
    let left = procs_mentioning(&dir.to_string_lossy());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    // Match by pid, not by command line: other test processes may be running
    // their own `sleep 1000` containers concurrently.
    for pid in shim_set.iter().copied().chain([task_pid]) {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "process {pid} (shim or container) left behind");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*dir.to_string_lossy()),
        "mounts left behind:\n{mounts}"
    );
}

#[test]
fn startup_failure_reports_log_tail() {
    require_root();
    // containerd rejects an invalid log level and exits at once: the error
    // must say so and carry the log, not wait for the start timeout.
    let err = Containerd::builder()
        .log_level("no-such-level")
        .start()
        .expect_err("containerd should refuse an invalid log level");
    let msg = err.to_string();
    assert!(msg.contains("exited during startup"), "{msg}");
    assert!(msg.contains("not a valid logrus Level"), "{msg}");
}

#[test]
fn parallel_instances_do_not_interfere() {
    require_root();
    let workers: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let c = Containerd::builder()
                    .go_shim(true)
                    .start()
                    .expect("start containerd");
                c.import_busybox().expect("import busybox");
                let id = unique_id("par");
                let msg = format!("instance {i}");
                let out = c.ctr_ok(&[
                    "run",
                    "--rm",
                    "--runtime",
                    GO_RUNTIME,
                    BUSYBOX_REF,
                    &id,
                    "echo",
                    &msg,
                ]);
                assert_eq!(out.stdout.trim(), msg);
                c.dir().to_path_buf()
            })
        })
        .collect();
    for w in workers {
        let dir = w.join().expect("worker panicked");
        assert!(!dir.exists(), "{} still exists", dir.display());
    }
}
