//! `make demo`: a private containerd with our shims first on its PATH, and a few containers
//! run through `containerd-shim-runc-v2`, `containerd-shim-wasm-v2` and `containerd-shim-vm-v2`,
//! printing each `ctr` command and what it answered.
//!
//! Every step says what it must show (output, exit status, the task list) and the demo stops
//! with a non-zero status at the first one that does not: a demo that prints "done" after
//! every container failed proves nothing.

use std::fmt::Display;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use integration::checks::wait_until;
use integration::wasm_fixture::{import_busybox_wasm, BUSYBOX_WASM_REF, HELLO_WAT_PATH};
use integration::{
    is_root, target_bin_dir, unique_id, Containerd, CtrOutput, BUSYBOX_REF, OUR_RUNTIME,
    WASM_RUNTIME, WASM_SHIM_BINARY,
};

/// Why the demo stopped: the step, and what it showed instead.
struct Failed(String);

impl<E: Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed(e.to_string())
    }
}

/// What a `ctr` command must show.
enum Expect<'a> {
    /// Exit status 0 and this text in its stdout.
    Prints(&'a str),
    /// This exit status (ctr passes a task's exit status on).
    Status(i32),
    /// Exit status 0.
    Succeeds,
}

fn show(c: &Containerd, args: &[&str]) -> CtrOutput {
    println!("$ ctr {}", args.join(" "));
    let out = c.ctr(args);
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        println!("  {line}");
    }
    if !out.success() {
        println!("  (exit status {})", out.status);
    }
    out
}

/// Runs `ctr args` and checks it against `expect`.
fn step(c: &Containerd, args: &[&str], expect: Expect<'_>) -> Result<CtrOutput, Failed> {
    let out = show(c, args);
    let ok = match expect {
        Expect::Prints(text) => out.success() && out.stdout.contains(text),
        Expect::Status(status) => out.status == status && !out.timed_out,
        Expect::Succeeds => out.success(),
    };
    if ok {
        return Ok(out);
    }
    let wanted = match expect {
        Expect::Prints(text) => format!("exit status 0 and {text:?} in its output"),
        Expect::Status(status) => format!("exit status {status}"),
        Expect::Succeeds => "exit status 0".to_string(),
    };
    Err(Failed(format!(
        "`ctr {}` should give {wanted}; it exited {}{}\n  stdout: {:?}\n  stderr: {:?}",
        args.join(" "),
        out.status,
        if out.timed_out { " (timed out)" } else { "" },
        out.stdout.trim(),
        out.stderr.trim(),
    )))
}

fn runc_containers(c: &Containerd, bin: &Path) -> Result<(), Failed> {
    let id = unique_id("demo");
    let hello = "hello from containerd-shim-runc-v2";
    step(
        c,
        &["run", "--rm", BUSYBOX_REF, &id, "echo", hello],
        Expect::Prints(hello),
    )?;
    step(
        c,
        &["run", "--rm", BUSYBOX_REF, &id, "sh", "-c", "exit 3"],
        Expect::Status(3),
    )?;

    let bg = unique_id("web");
    let forever = "while true; do sleep 1; done";
    step(
        c,
        &["run", "-d", BUSYBOX_REF, &bg, "sh", "-c", forever],
        Expect::Succeeds,
    )?;
    let tasks = step(c, &["task", "ls"], Expect::Prints(&bg))?;
    if !tasks
        .stdout
        .lines()
        .any(|l| l.starts_with(&bg) && l.contains("RUNNING"))
    {
        return Err(Failed(format!("`ctr task ls` does not show {bg} RUNNING")));
    }
    let ours = bin.join("containerd-shim-runc-v2");
    let shims = c.shim_pids();
    for pid in &shims {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        println!("  shim pid {pid}: {}", exe.display());
    }
    let ours_running = shims
        .iter()
        .any(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == ours));
    if !ours_running {
        return Err(Failed(format!(
            "no shim process runs {} (runtime {OUR_RUNTIME})",
            ours.display()
        )));
    }
    step(
        c,
        &[
            "task",
            "exec",
            "--exec-id",
            "hi",
            &bg,
            "sh",
            "-c",
            "echo exec in $(hostname); exit 5",
        ],
        Expect::Status(5),
    )?;
    let ps = step(c, &["task", "ps", &bg], Expect::Succeeds)?;
    if ps.stdout.lines().skip(1).count() == 0 {
        return Err(Failed(format!("`ctr task ps {bg}` lists no process")));
    }
    step(c, &["task", "kill", "-s", "SIGKILL", &bg], Expect::Succeeds)?;
    let deleted = wait_until(Duration::from_secs(10), || {
        c.ctr(&["task", "delete", &bg]).success()
    });
    if !deleted {
        return Err(Failed(format!(
            "task {bg} was not deleted within 10 s of SIGKILL"
        )));
    }
    step(c, &["container", "delete", &bg], Expect::Succeeds)?;
    Ok(())
}

fn wasm_containers(c: &Containerd) -> Result<(), Failed> {
    let ns = c.namespace().to_string();
    import_busybox_wasm(c, &ns)?;
    println!("\nimported {BUSYBOX_WASM_REF} (busybox plus Wasm programs built from source)\n");
    let w = unique_id("wasm");
    let wasm = |args: &[&str], expect| {
        let mut a = vec![
            "run",
            "--rm",
            "--runtime",
            WASM_RUNTIME,
            BUSYBOX_WASM_REF,
            &w,
        ];
        a.extend_from_slice(args);
        step(c, &a, expect)
    };
    wasm(&[HELLO_WAT_PATH], Expect::Prints("hello from wasm"))?;
    let native = "a native binary under the same runtime";
    wasm(&["/bin/echo", native], Expect::Prints(native))?;
    Ok(())
}

/// A container in a QEMU microvm: the guest's own kernel answers `uname -r`.
fn vm_container(c: &Containerd) -> Result<(), Failed> {
    let id = unique_id("demo-vm");
    println!("\n(containerd-shim-vm-v2: the container runs in its own QEMU microvm)");
    step(
        c,
        &[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.vm.v2",
            BUSYBOX_REF,
            &id,
            "sh",
            "-c",
            "echo kernel $(uname -r) in the VM; exit 3",
        ],
        Expect::Status(3),
    )
    .and_then(|out| {
        let guest = format!("{} in the VM", shim_vm::image::kernel::LOCALVERSION);
        if out.stdout.contains(&guest) {
            Ok(())
        } else {
            Err(Failed(format!(
                "the VM's container printed {:?}, not the guest kernel",
                out.stdout
            )))
        }
    })
}

fn demo() -> Result<(), Failed> {
    if !is_root() {
        return Err(Failed(
            "run as root: the demo starts a private containerd, mounts and creates cgroups".into(),
        ));
    }
    let bin = target_bin_dir();
    for shim in ["containerd-shim-runc-v2", WASM_SHIM_BINARY] {
        if !bin.join(shim).is_file() {
            return Err(Failed(format!(
                "{shim} is not built in {}: run `make build`",
                bin.display()
            )));
        }
    }
    println!("shims from {}", bin.display());
    let c = Containerd::builder().bin_dir(&bin).start()?;
    println!("private containerd at {}", c.address().display());
    c.import_busybox()?;
    println!("imported {BUSYBOX_REF} (built offline from Debian's busybox-static)\n");
    runc_containers(&c, &bin)?;
    wasm_containers(&c)?;
    vm_container(&c)?;
    Ok(())
}

fn main() -> ExitCode {
    match demo() {
        Ok(()) => {
            println!("\ndemo done: every step showed what it should; containerd stops and its temp dir is removed");
            ExitCode::SUCCESS
        }
        Err(Failed(why)) => {
            eprintln!("\ndemo FAILED: {why}");
            ExitCode::FAILURE
        }
    }
}
