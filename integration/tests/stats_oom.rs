//! Container metrics (`ctr task metrics`) and OOM-kill events through a real containerd 1.6
//! and our `containerd-shim-runc-v2`.

use integration::checks::wait_until;
use integration::events::EventLog;
use integration::fixture::{assert_ours, task_status, wait_status, with_our_shims, LONG};
use integration::{unique_id, BUSYBOX_REF};

/// The value of row `name` in `ctr task metrics`' table (`METRIC  VALUE`).
fn metric(table: &str, name: &str) -> Option<u64> {
    table.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
    })
}

#[test]
fn metrics_of_a_running_container() {
    let c = with_our_shims();
    let id = unique_id("metrics");
    c.ctr_ok(&[
        "run",
        "-d",
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "sleep 1000 & wait",
    ]);
    assert_ours(&c);
    wait_status(&c, &id, "RUNNING");

    let table = c.ctr_ok(&["task", "metrics", &id]).stdout;
    // v1 hosts print memory.usage_in_bytes, v2 hosts memory.usage.
    let memory = metric(&table, "memory.usage_in_bytes").or_else(|| metric(&table, "memory.usage"));
    assert!(memory.is_some_and(|m| m > 0), "memory usage:\n{table}");
    assert!(
        metric(&table, "pids.current").is_some_and(|p| p >= 2),
        "pids.current (sh and sleep):\n{table}"
    );

    let json = c
        .ctr_ok(&["task", "metrics", "--format", "json", &id])
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&json).expect("metrics JSON");
    assert!(v["pids"]["current"].as_u64() >= Some(2), "{json}");
    // v1: memory.usage.usage; v2: memory.usage.
    let usage = v["memory"]["usage"]["usage"]
        .as_u64()
        .or_else(|| v["memory"]["usage"].as_u64());
    assert!(usage > Some(0), "{json}");
    if v.get("cpu").is_some_and(|cpu| cpu.get("usage").is_some()) {
        // v1: the per-CPU figures are there, one per CPU the kernel counts.
        assert!(
            v["cpu"]["usage"]["per_cpu"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{json}"
        );
    }

    c.ctr_ok(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
}

#[test]
fn oom_kill_is_reported_before_the_exit() {
    let c = with_our_shims();
    let events = EventLog::start(&c);
    let id = unique_id("oom");
    // The init itself grows (busybox sh doubles a variable in-process), so the OOM killer's
    // victim is the init and its exit status tells: 128 + SIGKILL.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--memory-limit",
        "20971520",
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "x=0123456789abcdef; while :; do x=$x$x; done",
    ]);
    assert_eq!(out.status, 137, "{out:?}");
    events.assert_oom_before_exit(&id);
}

#[test]
fn no_oom_event_without_a_kill() {
    let c = with_our_shims();
    let events = EventLog::start(&c);
    let id = unique_id("nooom");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--memory-limit",
        "20971520",
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status, 3, "{out:?}");
    assert!(wait_until(LONG, || !events
        .positions(&id, "/tasks/delete")
        .is_empty()));
    assert_eq!(events.positions(&id, "/tasks/oom"), Vec::<usize>::new());
}

#[test]
fn oom_kill_of_a_child_is_reported_while_the_container_runs() {
    let c = with_our_shims();
    let events = EventLog::start(&c);
    let id = unique_id("oomchild");
    // A subshell grows and is the OOM killer's victim; the init lives on, so only the
    // watcher's notification (not the exit path) can report this kill.
    c.ctr_ok(&[
        "run",
        "-d",
        "--memory-limit",
        "20971520",
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "(x=0123456789abcdef; while :; do x=$x$x; done); sleep 1000",
    ]);
    assert_ours(&c);
    assert!(
        wait_until(LONG, || !events.positions(&id, "/tasks/oom").is_empty()),
        "no OOM event: {:#?}",
        events.for_container(&id)
    );
    assert_eq!(task_status(&c, &id).as_deref(), Some("RUNNING"));
    let table = c.ctr_ok(&["task", "metrics", &id]).stdout;
    assert!(
        metric(&table, "pids.current").is_some_and(|p| p >= 1),
        "{table}"
    );
    c.ctr_ok(&["task", "kill", "-a", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    c.ctr_ok(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
    assert!(wait_until(LONG, || !events
        .positions(&id, "/tasks/delete")
        .is_empty()));
    assert_eq!(
        events.positions(&id, "/tasks/oom").len(),
        1,
        "one kill, one event: {:#?}",
        events.for_container(&id)
    );
}
