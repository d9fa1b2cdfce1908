//! Kubernetes pods on the micro-VM shim through containerd 1.6's CRI (RuntimeClass handler
//! `vm`): the pause container's create boots the pod's VM, every later container of the
//! pod joins it (no new VM, no new shim), and StopPodSandbox + RemovePodSandbox leave
//! nothing of it. And containerd 2.x's `shim` sandboxer, played by the conformance runner:
//! the VM is the sandbox.

use std::collections::BTreeSet;
use std::path::PathBuf;

use integration::checks::{processes_mentioning, wait_until};
use integration::conformance::{run_sandbox_pod, Config, Generation, Report};
use integration::cri::{
    api, container_config, log_text, CriClient, CRI_NAMESPACE, HANDLER_OURS, HANDLER_VM,
};
use integration::cri_fixture::{
    assert_all_gone, containerd_with_cri, delete_pod, run_pod, run_pod_with, sleeper,
    start_busybox, start_container, Pod, LONG,
};
use integration::{Containerd, BUSYBOX_REF};

fn containerd() -> Containerd {
    containerd_with_cri(&["containerd-shim-vm-v2", "pause"])
}

/// The runtime directory of `pod`'s VM.
fn vm_dir(c: &Containerd, pod: &Pod) -> PathBuf {
    shim_vm::pod::run_dir(&c.address().to_string_lossy(), CRI_NAMESPACE, &pod.id)
}

/// The QEMU processes of `pod`'s VM.
fn qemus(c: &Containerd, pod: &Pod) -> BTreeSet<i32> {
    processes_mentioning(&vm_dir(c, pod).to_string_lossy())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect()
}

/// The command line of `pod`'s QEMU.
fn qemu_cmdline(c: &Containerd, pod: &Pod) -> String {
    processes_mentioning(&vm_dir(c, pod).to_string_lossy())
        .into_iter()
        .find(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(_, cmd)| cmd)
        .unwrap_or_default()
}

fn shims(c: &Containerd) -> BTreeSet<i32> {
    c.shim_pids().into_iter().collect()
}

/// `cmd` in container `id`: its stdout, once it exited 0.
fn exec_ok(cri: &CriClient, id: &str, cmd: &[&str]) -> String {
    let out = cri.exec_sync(id, cmd, 30).expect("ExecSync");
    assert_eq!(
        out.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The network namespace CNI set `pod` up in (its pause container's spec names it).
fn pod_netns(c: &Containerd, pod: &Pod) -> PathBuf {
    let spec = c
        .state_dir()
        .join("io.containerd.runtime.v2.task")
        .join(CRI_NAMESPACE)
        .join(&pod.id)
        .join("config.json");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec).expect("the pause spec")).unwrap();
    let path = spec["linux"]["namespaces"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
        .and_then(|n| n["path"].as_str())
        .expect("a network namespace path");
    PathBuf::from(path)
}

/// `args` run in network namespace `netns` (through `nsenter`): stdout.
fn in_netns(netns: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{args:?} in {}: {}",
        netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `netns` still holds anything of a VM's network: the tap or a redirect.
fn vm_network_in(netns: &std::path::Path) -> Vec<String> {
    let mut left = Vec::new();
    let links = in_netns(netns, &["ip", "-o", "link", "show"]);
    if links.contains(shim_vm::network::TAP_NAME) {
        left.push(links);
    }
    let qdiscs = in_netns(netns, &["tc", "qdisc", "show", "dev", "eth0"]);
    if qdiscs.contains("ingress") {
        left.push(qdiscs);
    }
    left
}

/// The host namespace's links, addresses, routes and qdiscs, but the CNI bridges and
/// veths of the harness's containerds (this test's and parallel tests').
fn host_network() -> Vec<String> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect(args[0]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    [
        run(&["ip", "-o", "link", "show"]),
        run(&["ip", "-o", "addr", "show"]),
        run(&["ip", "route", "show", "table", "all"]),
        run(&["tc", "qdisc", "show"]),
    ]
    .iter()
    .flat_map(|t| t.lines().map(words).collect::<Vec<_>>())
    .filter(|l| !l.contains("shimbr") && !l.contains("veth"))
    .collect()
}

/// `line`'s words, one space apart, without an address's lifetimes (which count down).
fn words(line: &str) -> String {
    let mut out = Vec::new();
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "valid_lft" || w == "preferred_lft" {
            words.next();
        } else {
            out.push(w);
        }
    }
    out.join(" ")
}

/// A busybox httpd in `pod` on port 8080 serving `text` at `/`.
fn web_server(cri: &CriClient, pod: &Pod, text: &str) -> String {
    let script =
        format!("mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p 8080 -h /www");
    start_busybox(cri, pod, "web", &["sh", "-c", &script])
}

/// The body `from` (a container) fetches from `ip`'s web server, retried until it
/// answers. Through `nc`: bookworm's static busybox `wget` crashes.
fn fetch(cri: &CriClient, from: &str, ip: &str) -> String {
    let get = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080");
    let mut last = None;
    let fetched = wait_until(LONG, || {
        let out = cri.exec_sync(from, &["sh", "-c", &get], 30);
        let ok = out
            .as_ref()
            .is_ok_and(|o| o.exit_code == 0 && o.stdout.starts_with(b"HTTP/1.1 200"));
        last = Some(out);
        ok
    });
    let out = last.expect("no attempt").expect("ExecSync");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        fetched,
        "{from} fetching from {ip}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

fn pod_ip(cri: &CriClient, pod: &Pod) -> String {
    let status = cri.pod_sandbox_status(&pod.id).expect("PodSandboxStatus");
    let ip = status.network.expect("the pod's network").ip;
    assert!(ip.starts_with("10.231.0."), "pod IP {ip:?}");
    ip
}

/// Container `id`'s status once CRI saw it exit; panics with `c`'s log if it does not.
fn exited(c: &Containerd, cri: &CriClient, id: &str) -> api::ContainerStatus {
    let mut status = None;
    assert!(
        wait_until(LONG, || {
            status = cri.container_status(id).ok();
            status.as_ref().is_some_and(|s| s.finished_at > 0)
        }),
        "{id} did not exit: {status:?}\n{}",
        c.log_tail(80)
    );
    status.expect("status")
}

/// Nothing of `pod`'s VM is left once it is removed: no QEMU, no virtiofsd, no directory.
fn assert_no_vm_left(c: &Containerd, pod: &Pod) {
    let dir = vm_dir(c, pod);
    assert!(
        wait_until(LONG, || processes_mentioning(&dir.to_string_lossy())
            .is_empty()),
        "VM processes left: {:?}",
        processes_mentioning(&dir.to_string_lossy())
    );
    assert!(!dir.exists(), "VM directory left: {}", dir.display());
}

#[test]
fn a_pod_of_three_containers_runs_in_one_vm_with_its_volumes_logs_and_stats() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let pod = run_pod_with(&c, &cri, "vm-pod", HANDLER_VM, |config| {
        config.linux.get_or_insert_with(Default::default).sysctls =
            [("net.ipv4.ip_unprivileged_port_start".into(), "80".into())].into();
    });
    let shim = shims(&c);
    let vm = qemus(&c, &pod);
    assert_eq!(
        (shim.len(), vm.len()),
        (1, 1),
        "shims {shim:?}, QEMUs {vm:?}"
    );

    let volume = c.dir().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("from-host"), "host-data\n").unwrap();
    let mut writer = container_config(
        "writer",
        BUSYBOX_REF,
        &[
            "sh",
            "-c",
            "echo hello-stdout; echo hello-stderr >&2; cat /data/from-host; \
             echo guest-data > /data/from-guest; exec sleep 100000",
        ],
    );
    writer.mounts.push(api::Mount {
        container_path: "/data".into(),
        host_path: volume.to_string_lossy().into_owned(),
        ..Default::default()
    });
    writer.mounts.push(api::Mount {
        container_path: "/ro".into(),
        host_path: volume.to_string_lossy().into_owned(),
        readonly: true,
        ..Default::default()
    });
    let first = start_container(&cri, &pod, writer);
    let second = sleeper(&cri, &pod, "second");
    let third = start_busybox(
        &cri,
        &pod,
        "third",
        &["sh", "-c", "echo third; exec sleep 100000"],
    );
    assert_eq!(
        shims(&c),
        shim,
        "a container of the pod started another shim"
    );
    assert_eq!(
        qemus(&c, &pod),
        vm,
        "a container of the pod booted another VM"
    );

    // In the guest: its kernel, not the host's; the pod's hostname and IPC namespace.
    let host_kernel = nix::sys::utsname::uname().unwrap();
    let kernel = exec_ok(&cri, &second, &["uname", "-r"]);
    assert_ne!(
        kernel.trim(),
        host_kernel.release().to_string_lossy(),
        "not in a VM"
    );
    for id in [&first, &second, &third] {
        assert_eq!(exec_ok(&cri, id, &["hostname"]).trim(), pod.config.hostname);
    }
    // The pod's sysctl, set in the VM's network, which is the pod's.
    assert_eq!(
        exec_ok(
            &cri,
            &second,
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
        ),
        "80\n"
    );
    let ipc = |id: &str| exec_ok(&cri, id, &["readlink", "/proc/self/ns/ipc"]);
    assert_eq!(
        ipc(&first),
        ipc(&third),
        "containers of one pod share its IPC namespace"
    );
    let out = cri
        .exec_sync(&third, &["sh", "-c", "echo out; echo err >&2; exit 7"], 30)
        .expect("ExecSync");
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );

    // The volume, both ways; its read-only view stays read-only.
    assert!(
        wait_until(LONG, || std::fs::read_to_string(volume.join("from-guest"))
            .is_ok_and(|t| t == "guest-data\n")),
        "the guest's write did not reach the host volume"
    );
    assert_eq!(
        exec_ok(&cri, &first, &["cat", "/ro/from-guest"]),
        "guest-data\n"
    );
    let denied = cri
        .exec_sync(&first, &["sh", "-c", "echo x > /ro/new"], 30)
        .expect("ExecSync");
    assert_ne!(denied.exit_code, 0, "a read-only volume took a write");
    assert!(!volume.join("new").exists());
    // CRI's own files: /etc/hostname and /etc/hosts come from the pod's sandbox directory.
    assert_eq!(
        exec_ok(&cri, &second, &["cat", "/etc/hostname"]).trim(),
        pod.config.hostname
    );
    assert!(exec_ok(&cri, &second, &["cat", "/etc/hosts"]).contains("localhost"));

    // CRI logs at the log path, written on the host.
    let mut lines = Vec::new();
    let complete = wait_until(LONG, || {
        lines = cri.container_log(&first).unwrap_or_default();
        log_text(&lines, Some("stdout")) == "hello-stdout\nhost-data\n"
            && log_text(&lines, Some("stderr")) == "hello-stderr\n"
    });
    assert!(complete, "log of {first}: {lines:?}");
    assert!(wait_until(LONG, || cri
        .container_log(&third)
        .is_ok_and(|l| log_text(&l, None) == "third\n")));

    // Stats from the guest's cgroups.
    let stats = cri.container_stats(&first).expect("ContainerStats");
    let memory = stats.memory.expect("memory stats");
    assert!(
        memory
            .working_set_bytes
            .map(|v| v.value)
            .unwrap_or_default()
            > 0,
        "memory stats: {memory:?}"
    );
    let cpu = stats.cpu.expect("cpu stats");
    assert!(
        cpu.usage_core_nano_seconds
            .map(|v| v.value)
            .unwrap_or_default()
            > 0,
        "cpu stats: {cpu:?}"
    );

    delete_pod(&cri, &pod);
    assert_all_gone(&c, &cri, &[first, second, third, pod.id.clone()]);
    assert_no_vm_left(&c, &pod);
}

#[test]
fn cri_updates_apply_in_the_guest_and_its_oom_kills_reach_cri() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let pod = run_pod(&c, &cri, "vm-update", HANDLER_VM);
    let id = sleeper(&cri, &pod, "limited");
    // The container's cgroup in the guest (cgroup v2 there, whatever the host has).
    let memory_max = "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max";
    assert_eq!(exec_ok(&cri, &id, &["sh", "-c", memory_max]).trim(), "max");
    cri.update_container_resources(
        &id,
        api::LinuxContainerResources {
            memory_limit_in_bytes: 48 << 20,
            ..Default::default()
        },
    )
    .expect("UpdateContainerResources");
    assert_eq!(
        exec_ok(&cri, &id, &["sh", "-c", memory_max]).trim(),
        (48u64 << 20).to_string()
    );

    // A container that outgrows its limit in the guest is OOM-killed there; the OOM event
    // reaches CRI before the exit, which it reports as the reason.
    let mut hog = container_config(
        "hog",
        BUSYBOX_REF,
        &["sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"],
    );
    hog.linux.get_or_insert_with(Default::default).resources = Some(api::LinuxContainerResources {
        memory_limit_in_bytes: 20 << 20,
        ..Default::default()
    });
    let hog = start_container(&cri, &pod, hog);
    let status = exited(&c, &cri, &hog);
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled")
    );
    assert_eq!(exec_ok(&cri, &id, &["echo", "alive"]), "alive\n");

    delete_pod(&cri, &pod);
    assert_all_gone(&c, &cri, &[id, hog, pod.id.clone()]);
    assert_no_vm_left(&c, &pod);
}

#[test]
fn two_pods_get_two_vms_sized_by_their_resources_and_leave_nothing() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    // Pod a's containers may use 384 MiB and 2 CPUs (the kubelet's sum in the pod config,
    // which containerd's CRI hands the sandbox as annotations); pod b says nothing.
    let a = run_pod_with(&c, &cri, "vm-a", HANDLER_VM, |config| {
        config.linux.get_or_insert_with(Default::default).resources =
            Some(api::LinuxContainerResources {
                memory_limit_in_bytes: 384 << 20,
                cpu_quota: 150_000,
                cpu_period: 100_000,
                ..Default::default()
            });
    });
    let b = run_pod(&c, &cri, "vm-b", HANDLER_VM);
    let in_a = sleeper(&cri, &a, "a");
    let in_b = sleeper(&cri, &b, "b");
    assert_eq!(shims(&c).len(), 2);
    let (qa, qb) = (qemus(&c, &a), qemus(&c, &b));
    assert_eq!((qa.len(), qb.len()), (1, 1), "QEMUs {qa:?} {qb:?}");
    assert_ne!(qa, qb);
    // Sized: pod a's memory plus the default overhead (128 MiB), its CPUs rounded up (at
    // most the host's); pod b the defaults (128 + 128 MiB, 1 vCPU).
    let cpus = std::thread::available_parallelism().unwrap().get().min(2);
    let (cmd_a, cmd_b) = (qemu_cmdline(&c, &a), qemu_cmdline(&c, &b));
    assert!(cmd_a.contains(" -m 512M "), "{cmd_a}");
    assert!(cmd_a.contains(&format!(" -smp {cpus} ")), "{cmd_a}");
    assert!(
        cmd_b.contains(" -m 256M ") && cmd_b.contains(" -smp 1 "),
        "{cmd_b}"
    );
    assert_eq!(exec_ok(&cri, &in_a, &["nproc"]).trim(), cpus.to_string());
    assert_eq!(exec_ok(&cri, &in_b, &["nproc"]).trim(), "1");
    // Each pod's containers see their own VM: a file made in one is not in the other.
    exec_ok(&cri, &in_a, &["touch", "/dev/shm/only-a"]);
    let seen = cri
        .exec_sync(&in_b, &["ls", "/dev/shm/only-a"], 30)
        .expect("ExecSync");
    assert_ne!(seen.exit_code, 0, "pod b sees pod a's /dev/shm");

    delete_pod(&cri, &a);
    assert_no_vm_left(&c, &a);
    assert_eq!(exec_ok(&cri, &in_b, &["echo", "alive"]), "alive\n");
    delete_pod(&cri, &b);
    assert_all_gone(&c, &cri, &[in_a, in_b, a.id.clone(), b.id.clone()]);
    assert_no_vm_left(&c, &b);
}

#[test]
fn a_host_network_pod_with_a_shared_pid_namespace_is_one_host_in_its_vm() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    // The node's network and one PID namespace for the pod: CRI gives the containers the
    // host's UTS namespace with a hostname, which in the VM is the pod's own.
    let pod = run_pod_with(&c, &cri, "vm-hostnet", HANDLER_VM, |config| {
        let options = config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .namespace_options
            .get_or_insert_with(Default::default);
        options.network = api::NamespaceMode::Node as i32;
        options.pid = api::NamespaceMode::Pod as i32;
        config.linux.get_or_insert_with(Default::default).sysctls =
            [("kernel.shm_rmid_forced".into(), "1".into())].into();
    });
    let first = sleeper(&cri, &pod, "first");
    let second = sleeper(&cri, &pod, "second");
    let uts = |id: &str| exec_ok(&cri, id, &["readlink", "/proc/self/ns/uts"]);
    assert_eq!(uts(&first), uts(&second), "one UTS namespace for the pod");
    let name = exec_ok(&cri, &first, &["hostname"]);
    assert_eq!(exec_ok(&cri, &second, &["hostname"]), name);
    assert_ne!(name.trim(), "(none)");
    // One PID namespace: each container sees the other's sleep.
    let ps = exec_ok(&cri, &first, &["ps", "-o", "args"]);
    assert_eq!(ps.matches("sleep 100000").count(), 2, "{ps}");
    // No pause container runs in the guest: the pod's PID 1 is the guest's holder of its
    // namespaces, with the pod's IPC sysctl set in them.
    assert_eq!(
        exec_ok(&cri, &second, &["cat", "/proc/1/comm"]),
        "pod-holder\n"
    );
    assert!(!ps.contains("pause"), "{ps}");
    for id in [&first, &second] {
        assert_eq!(
            exec_ok(&cri, id, &["cat", "/proc/sys/kernel/shm_rmid_forced"]),
            "1\n"
        );
    }

    delete_pod(&cri, &pod);
    assert_all_gone(&c, &cri, &[first, second, pod.id.clone()]);
    assert_no_vm_left(&c, &pod);
}

/// RunPodSandbox of `config` fails with an error naming `why`, and its shim goes.
fn refused_pod(c: &Containerd, cri: &CriClient, config: &api::PodSandboxConfig, why: &str) {
    let err = cri
        .run_pod_sandbox(config, HANDLER_VM)
        .expect_err("a pod that cannot run ran")
        .to_string();
    assert!(err.contains(why), "{err}");
    assert!(
        wait_until(LONG, || c.shim_pids().is_empty()),
        "the refused pod's shim stays: {:?}",
        c.shim_pids()
    );
}

#[test]
fn bad_input_fails_its_own_request_and_the_pod_lives_on() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");

    // A pod whose memory no VM on this host can have: refused, naming why; nothing left.
    let mut huge = integration::cri::pod_config(
        &integration::unique_id("vm-huge"),
        &c.dir().join("pods/huge"),
    );
    huge.linux.get_or_insert_with(Default::default).resources =
        Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 1 << 50,
            ..Default::default()
        });
    refused_pod(&c, &cri, &huge, "MiB");
    // A pod sysctl that would change the VM's kernel for every pod: refused, named.
    let mut global = integration::cri::pod_config(
        &integration::unique_id("vm-sysctl"),
        &c.dir().join("pods/sysctl"),
    );
    global.linux.get_or_insert_with(Default::default).sysctls =
        [("vm.swappiness".into(), "1".into())].into();
    refused_pod(&c, &cri, &global, "vm.swappiness");

    // A container that cannot start in the guest fails alone; the pod's others run on.
    let pod = run_pod(&c, &cri, "vm-bad", HANDLER_VM);
    let good = sleeper(&cri, &pod, "good");
    let bad = cri
        .create_container(
            &pod.id,
            &container_config("bad", BUSYBOX_REF, &["/no/such/program"]),
            &pod.config,
        )
        .expect("CreateContainer");
    let err = cri
        .start_container(&bad)
        .expect_err("a missing program started")
        .to_string();
    assert!(err.contains("/no/such/program"), "{err}");
    assert_eq!(exec_ok(&cri, &good, &["echo", "alive"]), "alive\n");
    let after = sleeper(&cri, &pod, "after");
    assert_eq!(exec_ok(&cri, &after, &["echo", "alive"]), "alive\n");

    delete_pod(&cri, &pod);
    assert_all_gone(&c, &cri, &[good, bad, after, pod.id.clone()]);
    assert_no_vm_left(&c, &pod);
}

#[test]
fn a_killed_vmm_ends_the_pod_s_containers_and_removal_cleans_up() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let pod = run_pod(&c, &cri, "vm-killed", HANDLER_VM);
    let ids = [sleeper(&cri, &pod, "one"), sleeper(&cri, &pod, "two")];
    let vm = qemus(&c, &pod);
    assert_eq!(vm.len(), 1, "QEMUs {vm:?}");
    // Read now: the pause container's bundle goes once CRI sees it exit.
    let netns = pod_netns(&c, &pod);
    assert_eq!(vm_network_in(&netns).len(), 2, "no tap and redirect");
    for pid in &vm {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill QEMU");
    }
    // CRI sees every container of the pod exit, killed.
    for id in &ids {
        assert_eq!(exited(&c, &cri, id).exit_code, 137);
    }
    // The dead VM's tap and redirects are gone from the pod's netns before CNI's DEL runs.
    let mut left = Vec::new();
    assert!(
        wait_until(LONG, || {
            left = vm_network_in(&netns);
            left.is_empty()
        }),
        "left in the pod's netns: {left:?}"
    );
    delete_pod(&cri, &pod);
    let mut all = ids.to_vec();
    all.push(pod.id.clone());
    assert_all_gone(&c, &cri, &all);
    assert_no_vm_left(&c, &pod);
}

#[test]
fn a_vm_pod_answers_on_its_ip_and_reaches_runc_and_vm_pods_on_the_bridge() {
    let before = host_network();
    let c = containerd_with_cri(&["containerd-shim-vm-v2", "containerd-shim-runc-v2", "pause"]);
    let cri = c.cri_client().expect("CRI client");
    let vm = run_pod(&c, &cri, "vm-net", HANDLER_VM);
    let vm_web = web_server(&cri, &vm, "from-the-vm");
    let runc = run_pod(&c, &cri, "runc-net", HANDLER_OURS);
    let runc_web = web_server(&cri, &runc, "from-runc");
    let other = run_pod(&c, &cri, "vm-net2", HANDLER_VM);
    let other_client = sleeper(&cri, &other, "client");
    let (vm_ip, runc_ip, other_ip) = (pod_ip(&cri, &vm), pod_ip(&cri, &runc), pod_ip(&cri, &other));

    // The guest has the pod's address and CNI's routes, on the pod's MAC.
    let netns = pod_netns(&c, &vm);
    let addr = exec_ok(
        &cri,
        &vm_web,
        &["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
    );
    assert!(addr.contains(&format!("inet {vm_ip}/24")), "{addr}");
    let routes = exec_ok(&cri, &vm_web, &["ip", "-4", "route", "show"]);
    let cni_routes = in_netns(&netns, &["ip", "-4", "route", "show"]);
    // busybox's `ip` does not say `proto kernel`.
    let lines = |t: &str| {
        t.lines()
            .map(|l| words(l).replace(" proto kernel", ""))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        lines(&routes),
        lines(&cni_routes),
        "the guest's routes are not CNI's"
    );
    let mac = |text: &str| {
        text.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_string)
    };
    let guest_link = exec_ok(&cri, &vm_web, &["ip", "-o", "link", "show", "dev", "eth0"]);
    let cni_link = in_netns(&netns, &["ip", "-o", "link", "show", "dev", "eth0"]);
    assert_eq!(mac(&guest_link), mac(&cni_link), "{guest_link}\n{cni_link}");
    assert!(
        vm_network_in(&netns).len() == 2,
        "no tap and redirect in the pod's netns"
    );

    // Both ways between the VM pod and a runc pod, and between two VM pods.
    assert_eq!(fetch(&cri, &runc_web, &vm_ip), "from-the-vm\n");
    assert_eq!(fetch(&cri, &vm_web, &runc_ip), "from-runc\n");
    assert_eq!(fetch(&cri, &other_client, &vm_ip), "from-the-vm\n");
    let other_web = web_server(&cri, &other, "from-the-other-vm");
    assert_eq!(fetch(&cri, &vm_web, &other_ip), "from-the-other-vm\n");

    let ids = [vm_web, runc_web, other_client, other_web];
    for pod in [&vm, &runc, &other] {
        delete_pod(&cri, pod);
    }
    let mut all = ids.to_vec();
    all.extend([vm.id.clone(), runc.id.clone(), other.id.clone()]);
    assert_all_gone(&c, &cri, &all);
    assert_no_vm_left(&c, &vm);
    assert_no_vm_left(&c, &other);
    assert!(
        !netns.exists(),
        "the pod's netns is left: {}",
        netns.display()
    );
    drop(c);
    assert_eq!(host_network(), before, "the host's network changed");
}

#[test]
fn a_pod_whose_container_exited_on_its_own_stops_and_goes() {
    let c = containerd();
    let cri = c.cri_client().expect("CRI client");
    let pod = run_pod(&c, &cri, "vm-exited", HANDLER_VM);
    let done = start_busybox(&cri, &pod, "done", &["true"]);
    exited(&c, &cri, &done);
    // StopPodSandbox kills what is left of each container with `all` (crun in the guest
    // then says "No such process"): a finished container is no error.
    delete_pod(&cri, &pod);
    assert_all_gone(&c, &cri, &[done, pod.id.clone()]);
    assert_no_vm_left(&c, &pod);
}

/// containerd 2.x's `shim` sandboxer, played by the conformance runner: the VM is the pod's
/// sandbox and no pause container runs. `kill_shim`: the shim is SIGKILLed under the pod,
/// and containerd's `delete` action must stop its VM.
fn vm_sandbox(generation: Generation, kill_shim: bool) -> Report {
    let report = walk_vm_sandbox(
        generation,
        kill_shim,
        None,
        &integration::unique_id("vmpod"),
    );
    assert!(report.passed(), "as containerd {generation}:\n{report}");
    eprintln!("as containerd {generation}:\n{report}");
    report
}

/// The runner's pod walk on the VM shim, with `options` on `start`'s stdin.
fn walk_vm_sandbox(
    generation: Generation,
    kill_shim: bool,
    options: Option<protobuf::well_known_types::any::Any>,
    id: &str,
) -> Report {
    integration::require_root();
    let shim = integration::target_bin_dir().join("containerd-shim-vm-v2");
    assert!(
        shim.exists(),
        "build first (make build): {}",
        shim.display()
    );
    run_sandbox_pod(
        &Config {
            shim,
            generation,
            runtime_options: options,
            id: id.to_string(),
            one_socket: false,
            in_vm: true,
            rootfs: Default::default(),
        },
        kill_shim,
    )
}

#[test]
fn the_vm_is_the_pod_s_sandbox_as_containerd_23_drives_it() {
    let r = vm_sandbox(Generation::V2_3, false);
    let names: Vec<&str> = r.steps.iter().map(|s| s.name.as_str()).collect();
    for step in [
        "start sandbox",
        "pod container",
        "reconnect",
        "wait sandbox",
        "delete action",
    ] {
        assert!(names.contains(&step), "{step} did not run:\n{r}");
    }
}

#[test]
fn the_vm_is_the_pod_s_sandbox_as_containerd_20_drives_it() {
    vm_sandbox(Generation::V2_0, false);
}

#[test]
fn a_killed_vm_shim_s_pod_is_stopped_by_delete() {
    let r = vm_sandbox(Generation::V2_3, true);
    assert!(
        r.steps.iter().any(|s| s.name == "pod stopped by delete"),
        "{r}"
    );
}

#[test]
fn a_sandbox_s_options_come_on_start_s_stdin_and_a_missing_vmm_fails_its_start_alone() {
    // containerd 2.x's `shim` sandboxer sends a sandbox's runtime options only to `start`
    // (its CreateSandbox carries CRI's pod config): a VMM path there must be the one used.
    let missing = "/nonexistent/qemu-system-x86_64";
    let options = protocol::pack(&protocol::runtimeoptions::Options {
        config_body: format!("qemu_path = {missing:?}\n").into_bytes(),
        ..Default::default()
    })
    .expect("pack runtime options");
    let id = integration::unique_id("vmnoqemu");
    let r = walk_vm_sandbox(Generation::V2_3, false, Some(options), &id);
    eprintln!("{r}");
    let step = |name: &str| r.steps.iter().find(|s| s.name == name);
    let start = step("start sandbox").unwrap_or_else(|| panic!("no start sandbox step:\n{r}"));
    assert!(
        !start.ok && start.detail.contains(missing),
        "StartSandbox must fail naming {missing}:\n{r}"
    );
    // containerd then releases it: ShutdownSandbox, the shim's exit, `delete`.
    for name in [
        "create sandbox",
        "shutdown sandbox",
        "shim exits",
        "delete action",
    ] {
        assert!(step(name).is_some_and(|s| s.ok), "{name}:\n{r}");
    }
    assert!(
        wait_until(LONG, || processes_mentioning(&id).is_empty()),
        "left: {:?}",
        processes_mentioning(&id)
    );
}
