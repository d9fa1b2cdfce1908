//! `containerd-shim-wasm-v2` under churn: native-entrypoint containers (busybox `/bin/echo`)
//! created, started, waited for and deleted over and over, two at a time in one shim group
//! (as a pod's containers share a shim), through a real containerd 1.6 (`ctr run --rm`).
//!
//! Every `ctr` call has a deadline far above its normal duration (a fraction of a second).
//! A call that misses it fails the test with the worker, the round and the call, and —
//! taken while the hang is still there — the kernel stack, wait channel and open fds of
//! every process of this containerd's shims (daemons, their forked helpers, container
//! inits) and the tail of containerd's log, which carries the shim log.
//!
//! `WASM_STRESS_ROUNDS` overrides the rounds per worker; `WASM_STRESS_HOLD_SECS` keeps a
//! hang alive that long after the report, for `gdb -p`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration::checks::wait_until;
use integration::containerd::CTR_BINARY;
use integration::fixture::LONG;
use integration::wasm_fixture::{parent, with_wasm_shim, BUSYBOX_WASM_REF};
use integration::{Containerd, WASM_RUNTIME};

/// The annotation that puts containers in one shim (as a pod's do).
const GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";

/// Containers run at the same time, in the same shim.
const WORKERS: usize = 2;

/// Rounds per worker of the shutdown churn unless `WASM_STRESS_ROUNDS` says otherwise. Before
/// the fix each of 6 runs failed within 5 rounds (5 hangs, 1 failed start); the rarer hang,
/// on a lock the fork copied held, came in about 1 run of 300 rounds in 7.
const ROUNDS: usize = 300;

/// Rounds per worker of the churn in one long-lived shim (same override).
const POD_ROUNDS: usize = 100;

/// How [`ctr_bounded`] reports a call that missed its deadline.
const TIMED_OUT: &str = "did not return within";

/// Upper bound of one `ctr run --rm` of `/bin/echo`; normally ~0.2 s here.
const CALL_DEADLINE: Duration = Duration::from_secs(20);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `ctr <args>` against `c`, bounded by [`CALL_DEADLINE`]. `Err` says why it failed;
/// on a timeout it carries [`diagnose`]'s report, taken before ctr is killed (killing ctr
/// makes containerd tear the stuck shim down, and the evidence with it).
fn ctr_bounded(c: &Containerd, what: &str, args: &[&str]) -> Result<String, String> {
    let tag = what.replace([' ', '/'], "_");
    let out_path = c.dir().join(format!("stress-{tag}.out"));
    let err_path = c.dir().join(format!("stress-{tag}.err"));
    let file = |p: &Path| File::create(p).map_err(|e| format!("create {}: {e}", p.display()));
    let mut child = Command::new(CTR_BINARY)
        .arg("--address")
        .arg(c.address())
        .arg("--namespace")
        .arg(c.namespace())
        .args(args)
        .env("CONTAINERD_SNAPSHOTTER", c.snapshotter())
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?)
        .spawn()
        .map_err(|e| format!("{what}: spawn ctr: {e}"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if started.elapsed() >= CALL_DEADLINE => {
                let report = diagnose(c);
                let hold = env_number("WASM_STRESS_HOLD_SECS", 0);
                if hold > 0 {
                    eprintln!("{what}: hung; holding {hold} s\n{report}");
                    std::thread::sleep(Duration::from_secs(hold));
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what}: `ctr {}` {TIMED_OUT} {CALL_DEADLINE:?}\n{report}",
                    args.join(" ")
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("{what}: wait for ctr: {e}")),
        }
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "{what}: `ctr {}` failed ({status}): {stderr}\n--- containerd log ---\n{}",
            args.join(" "),
            c.log_tail(40)
        ));
    }
    Ok(stdout)
}

/// Every process of `c`'s shims and their descendants: command line, state, and per thread
/// the wait channel and kernel stack; open fds; then containerd's log tail.
fn diagnose(c: &Containerd) -> String {
    let mut pids = c.shim_pids();
    loop {
        let more: Vec<i32> = all_pids()
            .into_iter()
            .filter(|p| !pids.contains(p) && parent(*p).is_some_and(|pp| pids.contains(&pp)))
            .collect();
        if more.is_empty() {
            break;
        }
        pids.extend(more);
    }
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let mut report = String::from("--- shim processes ---\n");
    for pid in pids {
        let cmd = read(format!("/proc/{pid}/cmdline")).replace('\0', " ");
        let state = read(format!("/proc/{pid}/status"))
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        let cgroup = read(format!("/proc/{pid}/cgroup"));
        report.push_str(&format!(
            "pid {pid} (parent {:?}) {state} comm={} cgroup={} cmd={cmd}\n",
            parent(pid),
            read(format!("/proc/{pid}/comm")).trim(),
            cgroup
                .lines()
                .find(|l| l.contains(":pids:"))
                .unwrap_or_else(|| cgroup.lines().next().unwrap_or_default()),
        ));
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default();
        for tid in tasks {
            let tid = tid.to_string_lossy();
            let t = format!("/proc/{pid}/task/{tid}");
            report.push_str(&format!(
                "  thread {tid} {} wchan={}\n",
                read(format!("{t}/comm")).trim(),
                read(format!("{t}/wchan"))
            ));
            for frame in read(format!("{t}/stack")).lines() {
                report.push_str(&format!("    {frame}\n"));
            }
        }
        let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().parse().ok()?;
                        let target = std::fs::read_link(e.path()).ok()?;
                        Some((n, target.to_string_lossy().into_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        fds.sort();
        let fds: Vec<String> = fds.iter().map(|(n, t)| format!("{n}->{t}")).collect();
        report.push_str(&format!("  fds: {}\n", fds.join(" ")));
    }
    report.push_str("--- containerd log (last 60 lines) ---\n");
    report.push_str(&c.log_tail(60));
    report
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One worker's rounds: `ctr run --rm` of `/bin/echo <token>` in shim group `group`, whose
/// output must come back.
fn churn(
    c: &Containerd,
    group: &str,
    worker: usize,
    rounds: usize,
    stop: &AtomicBool,
) -> Result<(), String> {
    let annotation = format!("{GROUP_ANNOTATION}={group}");
    for round in 0..rounds {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let id = format!("{group}-{worker}-{round}");
        let what = format!("worker {worker} round {round}/{rounds} ({id})");
        let args = [
            "run",
            "--rm",
            "--runtime",
            WASM_RUNTIME,
            "--annotation",
            &annotation,
            BUSYBOX_WASM_REF,
            &id,
            "/bin/echo",
            &id,
        ];
        match ctr_bounded(c, &what, &args) {
            Ok(out) if out == format!("{id}\n") => {}
            Ok(out) => return Err(format!("{what}: /bin/echo printed {out:?}")),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`WORKERS`] churns at once; the first failure stops the others.
fn churn_in_parallel(c: &Containerd, group: &str, rounds: usize) -> Result<(), String> {
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for worker in 0..WORKERS {
            let (stop, failure) = (&stop, &failure);
            s.spawn(move || {
                if let Err(e) = churn(c, group, worker, rounds, stop) {
                    stop.store(true, Ordering::Relaxed);
                    failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// No shim process is left, and no shim panicked on the way.
fn assert_clean(c: &Containerd) {
    let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "a shim panicked:\n{}", panics.join("\n"));
    assert!(
        wait_until(LONG, || c.shim_pids().is_empty()),
        "processes of our shims left after every container was removed: {:?}\n{}",
        c.shim_pids(),
        diagnose(c)
    );
}

/// A pod's worth of churn: one long-lived container keeps the group's shim up (as a pod's
/// sandbox does), while two workers run short native containers in the same shim. Every
/// `Create` forks the shim while its other threads serve the other containers.
#[test]
fn native_containers_churning_in_one_shim_never_hang() {
    let c = with_wasm_shim();
    let rounds = env_number("WASM_STRESS_ROUNDS", POD_ROUNDS as u64) as usize;
    let group = format!("stress-{}", std::process::id());
    let anchor = format!("{group}-anchor");
    let annotation = format!("{GROUP_ANNOTATION}={group}");
    let run_anchor = [
        "run",
        "-d",
        "--runtime",
        WASM_RUNTIME,
        "--annotation",
        &annotation,
        BUSYBOX_WASM_REF,
        &anchor,
        "/bin/sleep",
        "600",
    ];
    let started = Instant::now();
    let result = ctr_bounded(&c, "start the long-lived container", &run_anchor)
        .and_then(|_| churn_in_parallel(&c, &group, rounds));
    if let Err(e) = result {
        panic!("after {:?}: {e}", started.elapsed());
    }
    eprintln!(
        "{WORKERS} workers x {rounds} rounds in one shim in {:?}",
        started.elapsed()
    );
    for (what, args) in [
        (
            "kill the long-lived container",
            &["task", "kill", "-s", "SIGKILL", &anchor][..],
        ),
        ("delete its task", &["task", "delete", &anchor][..]),
        ("delete it", &["container", "delete", &anchor][..]),
    ] {
        // The kill is asynchronous: a delete may need a moment.
        let ok = wait_until(LONG, || ctr_bounded(&c, what, args).is_ok());
        assert!(
            ok,
            "{what}: {}",
            ctr_bounded(&c, what, args).err().unwrap_or_default()
        );
    }
    assert_clean(&c);
}

/// The libcontainer states and cgroups of `group`'s containers still on the machine: what
/// a `Create` lost with its shim would leave (a container init waiting for a `Start`).
fn leftovers(c: &Containerd, group: &str) -> Vec<PathBuf> {
    let prefix = format!("{group}-");
    let ours = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let states = ours(&Path::new("/run/containerd/wasm").join(c.namespace()));
    // Every cgroup v1 hierarchy, and the v2 root.
    let cgroups = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/sys/fs/cgroup")])
        .flat_map(|root| ours(&root.join(c.namespace())))
        .filter(|p| p.is_dir());
    states.into_iter().chain(cgroups).collect()
}

/// The same churn without a long-lived container: the group's shim is shut down whenever
/// its last container goes, often while the other worker's `start` has just found it or
/// its `Create` is in flight. Before the fix a container init forked from the shim held
/// the shim's connection to containerd, so that `Create` never returned; and a shim that
/// accepted the shutdown exited under the other worker's `Create` (lost rounds, leaked
/// containers). Every round must now succeed and leave nothing behind.
#[test]
fn native_containers_churning_while_their_shim_shuts_down_never_hang() {
    let c = with_wasm_shim();
    let rounds = env_number("WASM_STRESS_ROUNDS", ROUNDS as u64) as usize;
    let group = format!("stress-{}-solo", std::process::id());
    let started = Instant::now();
    if let Err(e) = churn_in_parallel(&c, &group, rounds) {
        panic!("after {:?}: {e}", started.elapsed());
    }
    eprintln!(
        "{WORKERS} workers x {rounds} rounds, shim shut down in between, in {:?}",
        started.elapsed()
    );
    let left = leftovers(&c, &group);
    assert!(left.is_empty(), "containers left behind: {left:?}");
    assert_clean(&c);
}
