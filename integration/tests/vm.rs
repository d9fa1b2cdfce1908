//! The micro-VM shim (`containerd-shim-vm-v2`, runtime `io.containerd.vm.v2`) through a real
//! containerd 1.6: each container group boots a QEMU microvm (TCG on these machines) whose
//! guest agent runs the container with crun; output, exit codes, exec, signals, stdin and
//! cleanup are what `ctr` sees of any runc container.

use integration::checks::{mounts_mentioning, processes_mentioning, wait_until};
use integration::events::EventLog;
use integration::fixture::{
    assert_nothing_left, task_status, wait_status, with_our_shims, GROUP_ANNOTATION, LONG,
};
use integration::{unique_id, Containerd, BUSYBOX_REF};

const RUNTIME: &str = "io.containerd.vm.v2";
/// The runtime directory of the VM whose first container is `first`.
fn vm_dir(c: &Containerd, first: &str) -> std::path::PathBuf {
    shim_vm::pod::run_dir(&c.address().to_string_lossy(), c.namespace(), first)
}

/// No QEMU, virtiofsd or runtime directory is left of the VM whose first container is
/// `first`, nor anything of container `id`.
fn assert_no_vm_left(c: &Containerd, first: &str, id: &str) {
    assert_nothing_left(c, id);
    assert!(
        wait_until(LONG, || vm_processes(c, first).is_empty()),
        "VM processes left: {:?}",
        vm_processes(c, first)
    );
    let dir = vm_dir(c, first);
    assert!(!dir.exists(), "VM directory left: {}", dir.display());
}

/// QEMU and virtiofsd of the VM whose first container is `first`.
fn vm_processes(c: &Containerd, first: &str) -> Vec<(i32, String)> {
    processes_mentioning(&vm_dir(c, first).to_string_lossy())
}

/// `ctr run -d` of busybox `args` as `id` on the VM shim (with `extra` flags), once running.
fn run_detached(c: &Containerd, id: &str, extra: &[&str], args: &[&str]) {
    let mut all = vec!["run", "-d", "--runtime", RUNTIME];
    all.extend_from_slice(extra);
    all.extend_from_slice(&[BUSYBOX_REF, id]);
    all.extend_from_slice(args);
    c.ctr_ok(&all);
    wait_status(c, id, "RUNNING");
}

/// The task `id` has stopped: deleting it reports exit `code`; then the container goes.
fn delete_stopped(c: &Containerd, id: &str, code: u32) {
    wait_status(c, id, "STOPPED");
    let deleted = c.ctr(&["task", "delete", id]);
    assert!(
        deleted.stderr.contains(&format!("exit code {code}")),
        "{deleted:?}"
    );
    c.ctr_ok(&["container", "delete", id]);
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn run(c: &Containerd, id: &str, args: &[&str]) -> integration::CtrOutput {
    let mut all = vec!["run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, id];
    all.extend_from_slice(args);
    c.ctr(&all)
}

#[test]
fn run_rm_delivers_output_and_exit_codes_from_the_guest() {
    let c = with_our_shims();
    let id = unique_id("vm-run");
    let out = run(
        &c,
        &id,
        &[
            "sh",
            "-c",
            "echo hello from the VM; echo to stderr >&2; exit 7",
        ],
    );
    assert_eq!(out.status, 7, "{out:?}\n{}", c.log_tail(60));
    assert_eq!(out.stdout.trim(), "hello from the VM", "{out:?}");
    assert!(out.stderr.contains("to stderr"), "{out:?}");
    assert_no_vm_left(&c, &id, &id);
    // It really ran in the guest: the guest's kernel, not the host's.
    let id = unique_id("vm-kernel");
    let out = run(&c, &id, &["uname", "-r"]);
    assert_eq!(out.status, 0, "{out:?}");
    assert_guest_kernel(&out);
    assert_no_vm_left(&c, &id, &id);
}

/// `out` (of a container that printed `uname -r` last) ran on the guest's kernel.
fn assert_guest_kernel(out: &integration::CtrOutput) {
    assert!(
        out.stdout
            .trim_end()
            .ends_with(shim_vm::image::kernel::LOCALVERSION),
        "not the guest kernel: {out:?}"
    );
}

/// `GuestRuntime = "runc"`: not in the image (crun is), the host's runc reaches the guest
/// through the VM's share and runs the container there.
#[test]
fn the_guest_runs_runc_from_the_share_when_asked() {
    let c = with_our_shims();
    let [flag, config] = options_flags(&c, "runc", "GuestRuntime = \"runc\"\n");
    let id = unique_id("vm-runc");
    let script = "echo run by runc in $(uname -r); exit 4";
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        &flag,
        &config,
        BUSYBOX_REF,
        &id,
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(out.status, 4, "{out:?}\n{}", c.log_tail(60));
    // The runc backend in the guest calls the runtime by the share's path: had the copy
    // not been there, the create would have failed.
    assert_guest_kernel(&out);
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn detached_run_exec_ps_and_signals() {
    let c = with_our_shims();
    let id = unique_id("vm-detach");
    // A container's PID 1 ignores signals it has no handler for: this one has one.
    let init = "trap 'exit 143' TERM; sleep 1000 & wait";
    run_detached(&c, &id, &[], &["sh", "-c", init]);
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo in exec; exit 3",
    ]);
    assert_eq!(exec.status, 3, "{exec:?}");
    assert_eq!(exec.stdout.trim(), "in exec", "{exec:?}");
    // Once deleted, an exec's id is free again: the guest forgot the process and its stdio
    // (it used to keep both, refusing the id with ALREADY_EXISTS and growing with every
    // probe a kubelet execs).
    for round in 0..3 {
        let script = format!("echo again {round}; exit {round}");
        let again = c.ctr(&["task", "exec", "--exec-id", "e1", &id, "sh", "-c", &script]);
        assert_eq!(again.status, round, "{again:?}");
        assert_eq!(again.stdout.trim(), format!("again {round}"), "{again:?}");
    }
    let ps = c.ctr_ok(&["task", "ps", &id]).stdout;
    assert!(ps.lines().count() >= 2, "ctr task ps shows the init: {ps}");
    c.ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]);
    wait_status(&c, &id, "STOPPED");
    // A kill of every process of a finished container (CRI's last SIGKILL when it stops
    // one) is done or NotFound, as containerd expects, never another error, whatever the
    // guest runtime says (crun, when the container's process just ended: "No such
    // process").
    let late = c.ctr(&["task", "kill", "--all", "-s", "SIGKILL", &id]);
    assert!(
        late.status == 0 || late.stderr.contains("not found"),
        "{late:?}"
    );
    delete_stopped(&c, &id, 143);
    assert_no_vm_left(&c, &id, &id);

    let id = unique_id("vm-kill");
    run_detached(&c, &id, &[], &["sleep", "1000"]);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    delete_stopped(&c, &id, 137);
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn stdin_reaches_the_guest_process_and_ends_it() {
    let c = with_our_shims();
    let id = unique_id("vm-stdin");
    let input: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let out = c.ctr_with_stdin(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX_REF,
            &id,
            "wc",
            "-c",
        ],
        &input,
    );
    assert_eq!(out.status, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), input.len().to_string(), "{out:?}");
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn large_output_arrives_whole() {
    let c = with_our_shims();
    let id = unique_id("vm-big");
    // 256 MiB of a pattern the host can check without holding it twice.
    // Under TCG on a busy 2-core host this takes minutes, longer than ctr's usual limit.
    let out = c.ctr_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX_REF,
            &id,
            "sh",
            "-c",
            "yes 0123456789abcdef | head -c 268435456",
        ],
        std::time::Duration::from_secs(900),
    );
    assert_eq!(out.status, 0, "{:?}", out.stderr);
    assert_eq!(out.stdout.len(), 256 << 20);
    assert!(
        out.stdout
            .as_bytes()
            .chunks(17)
            .all(|l| l.len() < 17 || l == b"0123456789abcdef\n"),
        "the output is not what the guest wrote"
    );
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn two_containers_of_one_group_share_one_vm() {
    let c = with_our_shims();
    let group = unique_id("vm-pod");
    let annotation = format!("{GROUP_ANNOTATION}={group}");
    let (a, b) = (format!("{group}-a"), format!("{group}-b"));
    for id in [&a, &b] {
        run_detached(&c, id, &["--annotation", &annotation], &["sleep", "1000"]);
    }
    let qemus: Vec<_> = vm_processes(&c, &a)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .collect();
    assert_eq!(qemus.len(), 1, "one VM for the group: {qemus:?}");
    // The second container sees the first one's processes: one guest kernel.
    let ps = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "ps",
        &b,
        "sh",
        "-c",
        "cat /proc/uptime",
    ]);
    assert_eq!(ps.status, 0, "{ps:?}");
    for id in [&a, &b] {
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_status(&c, id, "STOPPED");
        c.ctr_ok(&["task", "delete", id]);
        c.ctr_ok(&["container", "delete", id]);
    }
    assert_no_vm_left(&c, &a, &b);
}

/// A container whose rootfs the guest cannot mount onto (an empty read-only file system:
/// no mount point for `/proc` can be made in it) fails to start with the guest runtime's
/// error; the pod's other container runs on in the same VM, and nothing of the failed one
/// is left.
#[test]
fn a_rootfs_the_guest_cannot_mount_onto_fails_that_container_alone() {
    let c = with_our_shims();
    let group = unique_id("vm-badroot");
    let annotation = format!("{GROUP_ANNOTATION}={group}");
    let (a, b) = (format!("{group}-a"), format!("{group}-b"));
    run_detached(&c, &a, &["--annotation", &annotation], &["sleep", "1000"]);

    let root = c.dir().join("ro-rootfs");
    std::fs::create_dir_all(&root).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(root.clone());
    let root_arg = root.to_string_lossy().into_owned();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        &annotation,
        "--rootfs",
        &root_arg,
        &b,
        "/bin/sh",
        "-c",
        "true",
    ]);
    assert_ne!(out.status, 0, "{out:?}");
    assert!(
        out.stderr.contains("in the VM") && out.stderr.contains("Read-only file system"),
        "not the guest runtime's error: {out:?}"
    );
    println!("{}", out.stderr.trim());
    // The VM still serves the pod's other container.
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &a,
        "sh",
        "-c",
        "echo alive; exit 2",
    ]);
    assert_eq!(exec.status, 2, "{exec:?}");
    assert_eq!(exec.stdout.trim(), "alive", "{exec:?}");
    c.ctr(&["container", "delete", &b]);
    assert_eq!(task_status(&c, &b), None);
    assert_eq!(mounts_mentioning(&b), Vec::<String>::new());
    assert!(
        !vm_dir(&c, &a).join("shared").join(&b).exists(),
        "the failed container's share is left"
    );
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &a]);
    delete_stopped(&c, &a, 137);
    assert_no_vm_left(&c, &a, &b);
}

#[test]
fn a_killed_vmm_is_reported_as_the_containers_exit_and_leaves_nothing() {
    let c = with_our_shims();
    let id = unique_id("vm-vmmkill");
    run_detached(&c, &id, &[], &["sleep", "1000"]);
    let qemu = vm_processes(&c, &id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("qemu-system"))
        .expect("the VM's QEMU");
    sigkill(qemu.0);
    delete_stopped(&c, &id, 137);
    assert_no_vm_left(&c, &id, &id);
}

/// A device process of the VM (`device`, on `channel`) dies under a running container: the
/// VM cannot serve it any more, so the shim stops the VM, says why, and the container's
/// exit (137) reaches containerd; nothing is left.
fn a_killed_device_process_stops_the_vm(channel: &str, device: &str) {
    let c = with_our_shims();
    let flags = channel_flags(&c, channel);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let id = unique_id("vm-devkill");
    run_detached(&c, &id, &flags, &["sleep", "1000"]);
    let victims: Vec<i32> = vm_processes(&c, &id)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(device))
        .map(|(pid, _)| pid)
        .collect();
    assert!(
        !victims.is_empty(),
        "no {device}: {:?}",
        vm_processes(&c, &id)
    );
    for pid in victims {
        sigkill(pid);
    }
    delete_stopped(&c, &id, 137);
    let log = c.log_tail(400);
    assert!(
        log.contains(&format!("{device} exited")),
        "the shim did not say why the VM stopped\n{log}"
    );
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn a_killed_virtiofsd_stops_the_vm_and_reports_the_exit() {
    a_killed_device_process_stops_the_vm("virtio-serial", "virtiofsd");
}

#[test]
fn a_killed_vhost_device_vsock_stops_the_vm_and_reports_the_exit() {
    a_killed_device_process_stops_the_vm("vsock", "vhost-device-vsock");
}

#[test]
fn a_killed_shim_is_cleaned_up_by_delete() {
    let c = with_our_shims();
    let id = unique_id("vm-shimkill");
    run_detached(&c, &id, &[], &["sleep", "1000"]);
    for pid in c.shim_pids() {
        sigkill(pid);
    }
    // containerd notices the dead shim, runs `containerd-shim-vm-v2 delete`, and the task
    // is gone; the VM must be too.
    assert!(
        wait_until(LONG, || !c.ctr(&["task", "ls"]).stdout.contains(&id)),
        "the task outlived its shim"
    );
    c.ctr(&["task", "delete", &id]);
    c.ctr_ok(&["container", "delete", &id]);
    assert_no_vm_left(&c, &id, &id);
}

/// The guest kernel's OOM killer takes a container over its memory limit: containerd hears
/// `TaskOOM` before the exit (137), and the VM lives on for the rest of the pod.
#[test]
fn a_guest_oom_kill_is_reported_before_the_exit_and_the_vm_survives() {
    let c = with_our_shims();
    let events = EventLog::start(&c);
    let group = unique_id("vm-oom");
    let annotation = format!("{GROUP_ANNOTATION}={group}");
    let (a, b) = (format!("{group}-a"), format!("{group}-b"));
    run_detached(&c, &a, &["--annotation", &annotation], &["sleep", "1000"]);
    // The init itself grows (busybox sh doubles a variable in-process): it is the victim.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        &annotation,
        "--memory-limit",
        "20971520",
        BUSYBOX_REF,
        &b,
        "sh",
        "-c",
        "x=0123456789abcdef; while :; do x=$x$x; done",
    ]);
    assert_eq!(out.status, 137, "{out:?}");
    events.assert_oom_before_exit(&b);
    let alive = c.ctr(&["task", "exec", "--exec-id", "alive", &a, "echo", "alive"]);
    assert_eq!(
        (alive.status, alive.stdout.trim()),
        (0, "alive"),
        "{alive:?}"
    );
    assert_eq!(events.positions(&a, "/tasks/oom"), Vec::<usize>::new());
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &a]);
    delete_stopped(&c, &a, 137);
    assert_no_vm_left(&c, &a, &b);
}

/// `ctr run --rm` on the VM shim with runtime options `toml` fails, its error says every
/// one of `says`, and nothing of the VM is left.
fn refused_with(toml: &str, says: &[&str]) {
    let c = Containerd::builder()
        .bin_dir(integration::target_bin_dir())
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox");
    let id = unique_id("vm-bad");
    let config = c.dir().join("vm-options.toml");
    std::fs::write(&config, toml).unwrap();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        config.to_str().unwrap(),
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    assert_ne!(out.status, 0, "{out:?}");
    for text in says {
        assert!(out.stderr.contains(text), "no {text:?} in {out:?}");
    }
    c.ctr(&["container", "delete", &id]);
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn a_missing_kernel_is_a_clear_error_naming_it_and_leaves_nothing() {
    refused_with(
        "KernelPath = \"/nonexistent/vmlinux\"\n",
        &["/nonexistent/vmlinux", "make guest"],
    );
}

#[test]
fn a_missing_qemu_is_a_clear_error_naming_the_package_and_leaves_nothing() {
    refused_with(
        "QemuPath = \"/nonexistent/qemu-system-x86_64\"\n",
        &["/nonexistent/qemu-system-x86_64", "qemu-system-x86"],
    );
}

/// The agent cannot answer within 1 ms (it takes ~1.4 s to boot under TCG): the dial
/// timeout is a clear error, and the VM it waited for is gone.
#[test]
fn an_agent_that_does_not_answer_in_time_is_a_clear_error_and_leaves_no_vm() {
    refused_with("DialTimeoutMs = 1\n", &["did not answer within 1ms"]);
}

#[test]
fn a_terminal_run_is_sized_and_takes_input() {
    let c = with_our_shims();
    let id = unique_id("vm-tty");
    let script = "until stty size 2>/dev/null | grep -qv '^0 '; do sleep 0.1; done; stty size; tty; read l; echo got-$l; exit 6";
    let mut t = integration::terminal::Terminal::run(
        &c,
        &[
            "run",
            "-t",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX_REF,
            &id,
            "sh",
            "-c",
            script,
        ],
        33,
        101,
    );
    // ctr resizes right after Start: the guest's pty gets that size.
    assert!(t.wait_for("33 101"), "size not applied: {:?}", t.screen());
    assert!(t.wait_for("/dev/pts/"), "not a terminal: {:?}", t.screen());
    t.type_line("hello");
    assert!(t.wait_for("got-hello"), "input lost: {:?}", t.screen());
    assert_eq!(t.exit_code(), Some(6), "{:?}", t.screen());
    assert_no_vm_left(&c, &id, &id);
}

/// The `shim-conformance` runner's lifecycle (start, connect, create, start, state, exec,
/// wait, kill, delete, shutdown) against the VM shim, as each containerd generation calls.
/// `ctr task exec -t` (as `kubectl exec -it`) ends when its shell does: the host's pty is
/// let go of once the guest's output ends (its input relay held it open, and ctr waited
/// for the terminal's copy forever).
#[test]
fn a_terminal_exec_ends_with_its_shell() {
    let c = with_our_shims();
    let id = unique_id("vm-ttyexec");
    run_detached(&c, &id, &[], &["sleep", "1000"]);
    let args = ["task", "exec", "-t", "--exec-id", "sh", &id, "sh"];
    let mut t = integration::terminal::Terminal::run(&c, &args, 24, 80);
    assert!(t.wait_for("# "), "no prompt: {:?}", t.screen());
    t.type_line("echo in-$((6*7))");
    assert!(t.wait_for("in-42"), "input lost: {:?}", t.screen());
    t.type_line("exit 5");
    assert_eq!(t.exit_code(), Some(5), "{:?}", t.screen());
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    delete_stopped(&c, &id, 137);
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn the_conformance_runner_passes_against_the_vm_shim_for_every_generation() {
    use integration::conformance::{run_lifecycle, Config, Generation};
    let shim = integration::target_bin_dir().join("containerd-shim-vm-v2");
    assert!(
        shim.exists(),
        "build the shims first: {} is missing",
        shim.display()
    );
    for generation in Generation::ALL {
        let report = run_lifecycle(&Config {
            shim: shim.clone(),
            generation,
            runtime_options: None,
            id: unique_id("vm-conf"),
            one_socket: false,
            in_vm: false,
            rootfs: Default::default(),
        });
        assert!(report.passed(), "as containerd {generation}:\n{report}");
    }
}

// ---- The agent's channel (issue 12, item 3): vsock, and a host that reconnects. ----------
// Kept together at the end of the file.

/// A runtime options file in `c`'s directory selecting `channel`; the `--runtime-config-path`
/// flags for `ctr run`.
fn channel_flags(c: &Containerd, channel: &str) -> [String; 2] {
    options_flags(c, channel, &format!("Channel = \"{channel}\"\n"))
}

/// A runtime options file `vm-<name>.toml` in `c`'s directory holding `toml`; the
/// `--runtime-config-path` flags for `ctr run`.
fn options_flags(c: &Containerd, name: &str, toml: &str) -> [String; 2] {
    let config = c.dir().join(format!("vm-{name}.toml"));
    std::fs::write(&config, toml).unwrap();
    [
        "--runtime-config-path".to_string(),
        config.to_string_lossy().into_owned(),
    ]
}

#[test]
fn over_vsock_a_container_runs_execs_and_exits_as_over_virtio_serial() {
    let c = with_our_shims();
    let flags = channel_flags(&c, "vsock");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let id = unique_id("vm-vsock-rm");
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(&flags);
    args.extend_from_slice(&[BUSYBOX_REF, &id, "sh", "-c", "echo over vsock; exit 5"]);
    let out = c.ctr(&args);
    assert_eq!(out.status, 5, "{out:?}\n{}", c.log_tail(60));
    assert_eq!(out.stdout.trim(), "over vsock", "{out:?}");
    assert!(
        c.log_tail(400).contains("vsock through"),
        "the shim did not log its vsock device"
    );
    assert_no_vm_left(&c, &id, &id);

    let id = unique_id("vm-vsock-exec");
    run_detached(&c, &id, &flags, &["sleep", "1000"]);
    assert!(
        vm_processes(&c, &id)
            .iter()
            .any(|(_, cmd)| cmd.contains("vhost-device-vsock")),
        "no vhost-device-vsock for the VM: {:?}",
        vm_processes(&c, &id)
    );
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo in exec; exit 3",
    ]);
    assert_eq!(exec.status, 3, "{exec:?}");
    assert_eq!(exec.stdout.trim(), "in exec", "{exec:?}");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    delete_stopped(&c, &id, 137);
    // vhost-device-vsock too: it names the VM's directory on its command line.
    assert_no_vm_left(&c, &id, &id);
}

/// Cuts the VM shim's connection to its agent (of the VM whose first container is `first`)
/// as a broken socket would: `shutdown(2)` on the shim's own socket, reached through
/// `pidfd_getfd`. Both channels' host ends are unix sockets accepted at the VM's
/// `agent.sock` (QEMU's chardev, or vhost-device-vsock's): `ss` names their peers.
fn cut_agent_connection(c: &Containerd, first: &str) {
    let dir = vm_dir(c, first);
    let shim: i32 = std::fs::read_to_string(dir.join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let agent = dir.join("agent.sock").to_string_lossy().into_owned();
    let ss = std::process::Command::new("ss")
        .args(["-xn"])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    // Netid State Recv-Q Send-Q Local Port Peer Port
    let peers: Vec<String> = ss
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 8 && f[1] == "ESTAB" && f[4] == agent)
        .map(|f| format!("socket:[{}]", f[7]))
        .collect();
    assert_eq!(peers.len(), 1, "connections at {agent}: {ss}");
    let fd: i32 = std::fs::read_dir(format!("/proc/{shim}/fd"))
        .unwrap()
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == peers[0]))
        .and_then(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("the shim {shim} holds no {}", peers[0]));
    // SAFETY: pidfd_open and pidfd_getfd return new fds or -1; shutdown and close take fds
    // this function owns.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, shim, 0) as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open {shim}: {}",
            std::io::Error::last_os_error()
        );
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        assert!(
            dup >= 0,
            "pidfd_getfd {shim} {fd}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::shutdown(dup, libc::SHUT_RDWR), 0);
        libc::close(dup);
        libc::close(pidfd);
    }
}

/// How many times the shim's log says it reconnected to its agent.
fn reconnects(c: &Containerd) -> usize {
    std::fs::read_to_string(c.log_path())
        .unwrap_or_default()
        .matches("reconnected to the VM's agent")
        .count()
}

/// A running container outlives its shim's agent connection, cut `rounds` times while it
/// writes numbered lines without pause: each time the shim dials again, the output keeps
/// coming, and the container still execs (output, exit code); in the end every line is
/// there once, in order (what was in flight at each cut included), and its exit, published
/// by the guest after the last reconnect, reaches containerd.
fn a_cut_agent_connection_is_dialled_again(channel: &str, rounds: usize) {
    let c = with_our_shims();
    let mut flags = channel_flags(&c, channel).to_vec();
    let log = c.dir().join(format!("recon-{channel}.out"));
    flags.extend(["--log-uri".to_string(), format!("file://{}", log.display())]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let id = unique_id("vm-recon");
    let count = "i=0; while :; do i=$((i+1)); echo $i; done";
    run_detached(&c, &id, &flags, &["sh", "-c", count]);
    let written = || std::fs::metadata(&log).map_or(0, |m| m.len());
    for round in 1..=rounds {
        let before = written();
        assert!(
            wait_until(LONG, || written() > before),
            "round {round}: no output\n{}",
            c.log_tail(60)
        );
        cut_agent_connection(&c, &id);
        assert!(
            wait_until(LONG, || reconnects(&c) >= round),
            "round {round}: the shim did not reconnect\n{}",
            c.log_tail(60)
        );
        let after = written();
        assert!(
            wait_until(LONG, || written() > after),
            "round {round}: the output stopped at the reconnect\n{}",
            c.log_tail(60)
        );
        let exec_id = format!("e{round}");
        let exec = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            &exec_id,
            &id,
            "sh",
            "-c",
            "echo still here; exit 4",
        ]);
        assert_eq!(
            exec.status,
            4,
            "round {round}: {exec:?}\n{}",
            c.log_tail(60)
        );
        assert_eq!(exec.stdout.trim(), "still here", "round {round}: {exec:?}");
    }
    let ps = c.ctr_ok(&["task", "ps", &id]).stdout;
    assert!(ps.lines().count() >= 2, "ctr task ps shows the init: {ps}");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    delete_stopped(&c, &id, 137);
    // Each `echo` is one write of a whole line: the lines count 1, 2, 3... without a gap
    // or a repeat.
    let out = std::fs::read_to_string(&log).unwrap();
    let mut lines = 0u64;
    for line in out.lines() {
        lines += 1;
        assert_eq!(
            line.parse::<u64>().ok(),
            Some(lines),
            "line {lines} of {}",
            log.display()
        );
    }
    assert!(lines > rounds as u64, "{lines} lines");
    println!("{channel}: {lines} lines, whole across {rounds} cuts");
    assert_no_vm_left(&c, &id, &id);
}

#[test]
fn over_virtio_serial_a_cut_agent_connection_is_dialled_again() {
    a_cut_agent_connection_is_dialled_again("virtio-serial", 3);
}

#[test]
fn over_vsock_a_cut_agent_connection_is_dialled_again() {
    a_cut_agent_connection_is_dialled_again("vsock", 3);
}

#[test]
fn over_vsock_an_agent_that_does_not_answer_in_time_is_a_clear_error_and_leaves_no_vm() {
    refused_with(
        "Channel = \"vsock\"\nDialTimeoutMs = 1\n",
        &["did not answer within 1ms"],
    );
}

#[test]
fn a_channel_the_shim_does_not_know_is_refused_naming_both() {
    refused_with("Channel = \"tcp\"\n", &["virtio-serial", "vsock"]);
}

/// A traced call crosses into the VM: the host's `Create` span has the call to the guest
/// agent as a client span, the agent's own `Create` is its child (in the agent's service),
/// and the guest runtime's `create` is under that. The agent's spans reach the host with
/// the guest's events and leave with the host's, to the receiver containerd's environment
/// names. (containerd 1.6 sends no trace context: the host's calls are root spans.)
#[test]
fn a_traced_call_crosses_into_the_guest_agent() {
    integration::require_root();
    let receiver = integration::otlp::Receiver::start().unwrap();
    let c = Containerd::builder()
        .bin_dir(integration::target_bin_dir())
        .otlp_endpoint(receiver.endpoint())
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox image");
    let id = unique_id("vm-traced");
    let out = run(&c, &id, &["true"]);
    assert!(out.success(), "{out:?}\n{}", c.log_tail(60));
    const CREATE: &str = "containerd.task.v2.Task/Create";
    let find = |spans: &[integration::otlp::Span], service: &str, kind: i32, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.kind == kind && s.name == name)
            .cloned()
    };
    let (host, agent) = ("containerd-shim-vm-v2", "shim-vm-agent");
    let complete = || {
        let spans = receiver.spans();
        find(&spans, agent, 2, CREATE).is_some()
            && spans
                .iter()
                .any(|s| s.service == agent && s.name.ends_with(" create"))
    };
    let arrived = wait_until(LONG, complete);
    let spans = receiver.spans();
    assert!(
        arrived,
        "the agent's spans did not arrive:\n{}",
        integration::otlp::tree(&spans)
    );
    eprintln!("{}", integration::otlp::tree(&spans));
    let server = find(&spans, host, 2, CREATE).expect("the host's Create");
    let client = find(&spans, host, 3, CREATE).expect("the host's call to the agent");
    let in_guest = find(&spans, agent, 2, CREATE).expect("the agent's Create");
    let runtime = spans
        .iter()
        .find(|s| s.service == agent && s.name.ends_with(" create"))
        .expect("the guest runtime's create");
    assert_eq!(client.parent_span_id, server.span_id, "{client:#?}");
    assert_eq!(in_guest.parent_span_id, client.span_id, "{in_guest:#?}");
    assert_eq!(runtime.parent_span_id, in_guest.span_id, "{runtime:#?}");
    for s in [&client, &in_guest, runtime] {
        assert_eq!(s.trace_id, server.trace_id, "one trace: {s:#?}");
    }
    assert_eq!(in_guest.attribute("rpc.grpc.status_code"), Some("0"));
}
