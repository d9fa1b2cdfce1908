//! A container's life on every backend, the same cases for each (`integration::backends`):
//! its own program's output and exit status, exec beside it, SIGKILL, and delete leaving
//! nothing. Through a real containerd 1.6 with `ctr`; the jail backend's `runj` is a
//! stand-in (FreeBSD cannot run here).

use integration::backends::Backend;
use integration::fixture::wait_status;
use integration::unique_id;

fn output_and_exit_codes(b: &Backend) {
    let c = b.start();
    let id = unique_id("hello");
    let out = b.run(&c, &["--rm"], &id, b.hello);
    assert!(out.success(), "{}: {out:?}", b.name);
    assert_eq!(out.stdout, b.hello_output, "{}", b.name);
    b.assert_gone(&c, &id);

    let id = unique_id("exit");
    let out = b.run(&c, &["--rm"], &id, b.exit7);
    assert_eq!(
        out.status, 7,
        "{}: a program that exits 7 reports 7: {out:?}",
        b.name
    );
    b.assert_gone(&c, &id);
}

fn exec_output_and_exit_code(b: &Backend) {
    let c = b.start();
    let id = unique_id("exec");
    assert!(b.run(&c, &["-d"], &id, b.idle).success(), "{}", b.name);
    wait_status(&c, &id, "RUNNING");
    let exec = |exec_id: &str, args: &[&str]| {
        let mut a = vec!["task", "exec", "--exec-id", exec_id, &id];
        a.extend_from_slice(args);
        c.ctr(&a)
    };
    let out = exec(
        "e1",
        &["sh", "-c", "echo in-exec; echo to-stderr >&2; exit 5"],
    );
    assert_eq!(out.status, 5, "{}: {out:?}", b.name);
    assert_eq!(out.stdout, "in-exec\n", "{}", b.name);
    assert!(out.stderr.contains("to-stderr"), "{}: {out:?}", b.name);
    // The exec id is free again once the exec is deleted.
    let out = exec("e1", &["echo", "again"]);
    assert!(out.success(), "{}: {out:?}", b.name);
    assert_eq!(out.stdout, "again\n", "{}", b.name);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    c.ctr(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
    b.assert_gone(&c, &id);
}

fn sigkill_ends_the_task_with_137(b: &Backend) {
    let c = b.start();
    let id = unique_id("kill");
    assert!(b.run(&c, &["-d"], &id, b.idle).success(), "{}", b.name);
    wait_status(&c, &id, "RUNNING");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_status(&c, &id, "STOPPED");
    let del = c.ctr(&["task", "delete", &id]);
    assert!(del.stderr.contains("exit code 137"), "{}: {del:?}", b.name);
    c.ctr_ok(&["container", "delete", &id]);
    b.assert_gone(&c, &id);
}

integration::for_each_backend!(
    output_and_exit_codes,
    exec_output_and_exit_code,
    sigkill_ends_the_task_with_137,
);
