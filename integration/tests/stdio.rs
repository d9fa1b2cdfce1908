//! Stdio URLs through a real containerd 1.6: `ctr run --log-uri` with `file://`,
//! `binary://` and `binary-v2://`, and the bad inputs (missing directory, a logger that
//! dies at once, an unknown scheme).
//!
//! ctr 1.6 turns `--log-uri` into the same URI for stdout and stderr and no stdin, with or
//! without `-d`; containerd passes it to the shim untouched. The logger is `test-logger`
//! (`src/bin/test_logger.rs`), which writes what it receives to the file named by `out`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::checks::{processes_mentioning, wait_until};
use integration::{require_root, target_bin_dir, unique_id, Containerd, BUSYBOX_REF};

const LONG: Duration = Duration::from_secs(20);

fn containerd() -> Containerd {
    require_root();
    for bin in ["containerd-shim-runc-v2", "test-logger"] {
        let path = target_bin_dir().join(bin);
        assert!(
            path.exists(),
            "build the binaries first: {} is missing",
            path.display()
        );
    }
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox image");
    c
}

fn logger_uri(scheme: &str, out: &Path, extra: &str) -> String {
    let logger = target_bin_dir().join("test-logger");
    format!(
        "{scheme}://{}?out={}{extra}",
        logger.display(),
        out.display()
    )
}

/// The logger's lines once `want` is among them (or whatever is there after [`LONG`]).
fn lines_once(out: &Path, want: &str) -> Vec<String> {
    let read = || -> Vec<String> {
        std::fs::read_to_string(out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    wait_until(LONG, || read().iter().any(|l| l == want));
    read()
}

fn logger_pid(lines: &[String]) -> i32 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("pid:")?.parse().ok())
        .unwrap_or_else(|| panic!("no pid line in {lines:?}"))
}

fn assert_no_shim(c: &Containerd) {
    assert!(
        wait_until(LONG, || c.shim_pids().is_empty()),
        "shim still running: {:?}",
        c.shim_pids()
    );
}

fn assert_no_logger(out: &Path) {
    let needle = out.display().to_string();
    assert!(
        wait_until(LONG, || processes_mentioning(&needle).is_empty()),
        "logger left behind: {:?}",
        processes_mentioning(&needle)
    );
}

fn run_rm_with_log(c: &Containerd, id: &str, uri: &str) {
    c.ctr_ok(&[
        "run",
        "--rm",
        "--log-uri",
        uri,
        BUSYBOX_REF,
        id,
        "sh",
        "-c",
        "echo out; echo err >&2",
    ]);
}

fn assert_logged(c: &Containerd, id: &str, out: &Path, lines: &[String]) {
    for want in [
        "stdout:out".to_string(),
        "stderr:err".to_string(),
        format!("env:CONTAINER_ID={id}"),
        format!("env:CONTAINER_NAMESPACE={}", c.namespace()),
        format!("argv:out {}", out.display()),
        "signal:TERM".to_string(),
    ] {
        assert!(lines.contains(&want), "missing {want:?} in {lines:?}");
    }
}

#[test]
fn binary_logger_gets_both_streams_and_the_container_identity() {
    let c = containerd();
    let id = unique_id("binlog");
    let out = c.dir().join(format!("{id}.log"));
    run_rm_with_log(&c, &id, &logger_uri("binary", &out, ""));
    let lines = lines_once(&out, "signal:TERM");
    assert_logged(&c, &id, &out, &lines);
    assert_no_shim(&c);
    assert_no_logger(&out);
}

#[test]
fn binary_v2_logger_signals_ready_with_a_byte() {
    let c = containerd();
    let id = unique_id("binlog2");
    let out = c.dir().join(format!("{id}.log"));
    run_rm_with_log(&c, &id, &logger_uri("binary-v2", &out, "&v2=1"));
    let lines = lines_once(&out, "signal:TERM");
    assert!(
        lines.contains(&format!("argv:out {} v2 1", out.display())),
        "{lines:?}"
    );
    assert!(lines.contains(&"stdout:out".to_string()), "{lines:?}");
    assert!(lines.contains(&"stderr:err".to_string()), "{lines:?}");
    assert_no_shim(&c);
    assert_no_logger(&out);
}

#[test]
fn file_uri_appends_both_streams() {
    let c = containerd();
    let id = unique_id("filelog");
    let log = c.dir().join(format!("{id}.log"));
    std::fs::write(&log, "before\n").unwrap();
    run_rm_with_log(&c, &id, &format!("file://{}", log.display()));
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"before"), "appended, not truncated");
    lines.sort_unstable();
    assert_eq!(lines, ["before", "err", "out"], "{text:?}");
    assert_no_shim(&c);
}

#[test]
fn file_uri_in_a_missing_directory_is_a_clear_error() {
    let c = containerd();
    let id = unique_id("nodir");
    let missing: PathBuf = c.dir().join("no-such-dir");
    let log = missing.join("x.log");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--log-uri",
        &format!("file://{}", log.display()),
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains(&log.display().to_string())
            && out.stderr.contains("directory must already exist"),
        "unclear error: {}",
        out.stderr
    );
    assert!(!missing.exists(), "the shim must not create the directory");
    let _ = c.ctr(&["container", "delete", &id]);
    assert_no_shim(&c);
}

#[test]
fn logger_that_exits_at_once_is_a_clear_error_and_leaks_nothing() {
    let c = containerd();
    for (scheme, extra) in [("binary", "&exit=now"), ("binary-v2", "&exit=now&v2=1")] {
        let id = unique_id("deadlog");
        let out = c.dir().join(format!("{id}.log"));
        let res = c.ctr(&[
            "run",
            "--rm",
            "--log-uri",
            &logger_uri(scheme, &out, extra),
            BUSYBOX_REF,
            &id,
            "sh",
            "-c",
            "echo never",
        ]);
        assert!(!res.success(), "{res:?}");
        assert!(
            res.stderr
                .contains("test-logger exited before it was ready (exit status 3)"),
            "unclear error: {}",
            res.stderr
        );
        let _ = c.ctr(&["container", "delete", &id]);
        assert_no_shim(&c);
        assert_no_logger(&out);
        let lines = lines_once(&out, "exit:now");
        assert!(!lines.iter().any(|l| l.starts_with("stdout:")), "{lines:?}");
    }
}

#[test]
fn unknown_scheme_is_invalid_argument() {
    let c = containerd();
    let id = unique_id("http");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--log-uri",
        "http://x",
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains("unknown stdio scheme \\\"http\\\"")
            || out.stderr.contains("unknown stdio scheme \"http\""),
        "unclear error: {}",
        out.stderr
    );
    assert!(out.stderr.contains("invalid argument"), "{}", out.stderr);
    let _ = c.ctr(&["container", "delete", &id]);
    assert_no_shim(&c);
}

#[test]
fn detached_task_killed_and_deleted_ends_its_logger() {
    let c = containerd();
    let id = unique_id("detlog");
    let out = c.dir().join(format!("{id}.log"));
    c.ctr_ok(&[
        "run",
        "-d",
        "--log-uri",
        &logger_uri("binary", &out, ""),
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        "echo started; exec sleep 1000",
    ]);
    let lines = lines_once(&out, "stdout:started");
    assert!(lines.contains(&"stdout:started".to_string()), "{lines:?}");
    let pid = logger_pid(&lines);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(
        wait_until(LONG, || c
            .ctr(&["task", "ls"])
            .stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED"))),
        "task never stopped"
    );
    // The logger outlives the process: it may still be flushing until the task is deleted.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    c.ctr_ok(&["task", "delete", &id]);
    assert!(
        wait_until(LONG, || !Path::new(&format!("/proc/{pid}")).exists()),
        "logger {pid} still running after the task was deleted"
    );
    assert!(
        lines_once(&out, "signal:TERM").contains(&"signal:TERM".to_string()),
        "the logger was not asked to stop with SIGTERM"
    );
    c.ctr_ok(&["container", "delete", &id]);
    assert_no_shim(&c);
}
