//! `make demo`: a private containerd with our shims first on its PATH, and a few containers
//! run through `containerd-shim-runc-v2` and `containerd-shim-wasm-v2`, printing each `ctr`
//! command and what it answered.

use std::time::Duration;

use integration::checks::wait_until;
use integration::wasm_fixture::{import_busybox_wasm, BUSYBOX_WASM_REF, HELLO_WAT_PATH};
use integration::{
    require_root, target_bin_dir, unique_id, Containerd, BUSYBOX_REF, WASM_RUNTIME,
    WASM_SHIM_BINARY,
};

fn show(c: &Containerd, args: &[&str]) -> String {
    println!("$ ctr {}", args.join(" "));
    let out = c.ctr(args);
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        println!("  {line}");
    }
    if !out.success() {
        println!("  (exit status {})", out.status);
    }
    out.stdout
}

fn main() {
    require_root();
    let bin = target_bin_dir();
    println!("shims from {}", bin.display());
    let c = Containerd::builder()
        .bin_dir(&bin)
        .start()
        .expect("start containerd");
    println!("private containerd at {}", c.address().display());
    c.import_busybox().expect("import busybox image");
    println!("imported {BUSYBOX_REF} (built offline from Debian's busybox-static)\n");

    let id = unique_id("demo");
    show(
        &c,
        &[
            "run",
            "--rm",
            BUSYBOX_REF,
            &id,
            "echo",
            "hello from containerd-shim-runc-v2",
        ],
    );
    show(&c, &["run", "--rm", BUSYBOX_REF, &id, "sh", "-c", "exit 3"]);

    let bg = unique_id("web");
    show(
        &c,
        &[
            "run",
            "-d",
            BUSYBOX_REF,
            &bg,
            "sh",
            "-c",
            "while true; do sleep 1; done",
        ],
    );
    show(&c, &["task", "ls"]);
    for pid in c.shim_pids() {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        println!("  shim pid {pid}: {}", exe.display());
    }
    show(
        &c,
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
    );
    show(&c, &["task", "ps", &bg]);
    show(&c, &["task", "kill", "-s", "SIGKILL", &bg]);
    wait_until(Duration::from_secs(10), || {
        c.ctr(&["task", "delete", &bg]).success()
    });
    show(&c, &["container", "delete", &bg]);

    if bin.join(WASM_SHIM_BINARY).exists() {
        let ns = c.namespace().to_string();
        import_busybox_wasm(&c, &ns).expect("import the busybox-wasm image");
        println!("\nimported {BUSYBOX_WASM_REF} (busybox plus Wasm programs built from source)\n");
        let w = unique_id("wasm");
        let wasm = |args: &[&str]| {
            let mut a = vec![
                "run",
                "--rm",
                "--runtime",
                WASM_RUNTIME,
                BUSYBOX_WASM_REF,
                &w,
            ];
            a.extend_from_slice(args);
            show(&c, &a);
        };
        wasm(&[HELLO_WAT_PATH]);
        wasm(&["/bin/echo", "a native binary under the same runtime"]);
    }
    println!("\ndone; containerd stops and its temp dir is removed");
}
