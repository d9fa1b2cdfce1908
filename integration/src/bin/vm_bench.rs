//! Benchmark: the micro-VM shim (`io.containerd.vm.v2`) beside our runc shim, in one
//! containerd, in the same run (TCG here: see the README).
//!
//! 1. `ctr run --rm busybox true`, alternating the VM shim and the runc shim: median.
//! 2. Boot to agent ready, per VM, from the shim's log ("VM up in ..."): median.
//! 3. Host memory of one idle 1-container VM: RSS and PSS of the shim, QEMU and virtiofsd.
//! 4. Stdout throughput out of a running container: `ctr task exec` of
//!    `head -c 512M /dev/zero` (the figure) and of `dd bs=1M`, through each shim;
//!    and the same `head` and `dd` into `/dev/null` in the guest, which bound them under
//!    TCG: the VM's stdio is judged by its ratio to those. Then a keystroke's echo round
//!    trip on a terminal (`ctr task exec -t ... sh`): batching must not delay it.
//! 5. Through containerd's CRI: a pod ready with its first container (RunPodSandbox +
//!    CreateContainer + StartContainer of busybox), handlers `vm`, our runc shim and
//!    Debian's Go shim in turn: median of `--pods` each. Then the host PSS of one pod of 3
//!    containers in a VM (shim + QEMU + virtiofsd): what `overhead.podFixed` should carry.
//!
//! 6. Through CRI too: TCP throughput into a pod on the harness's CNI bridge, from a runc
//!    pod on it (busybox `nc -e dd`, `--net-mib` MiB), into a VM pod (virtio-net, the tap and
//!    `tc` redirects) and into a runc pod of each runc shim (veths only).
//!
//! Usage: `vm-bench [--runs N] [--mib N] [--pods N] [--net-mib N] [--pods-only]` (as root;
//! `--pods-only` runs parts 5 and 6 alone).

use std::time::{Duration, Instant};

use integration::bench::{median, run_rm};
use integration::checks::{processes_mentioning, wait_until};
use integration::cri::{
    container_config, pod_config, CriClient, CRI_NAMESPACE, HANDLER_GO, HANDLER_OURS, HANDLER_VM,
};
use integration::terminal::Terminal;
use integration::{
    pss_kb, require_root, rss_kb, target_bin_dir, unique_id, Containerd, BUSYBOX_REF, OUR_RUNTIME,
    VM_RUNTIME,
};

/// The `VM up in <duration>` figures the shims logged, in ms.
fn boot_times(c: &Containerd) -> Vec<f64> {
    let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
    log.lines()
        .filter_map(|l| l.split("VM up in ").nth(1))
        .filter_map(|rest| parse_debug_duration(rest.split_whitespace().next()?))
        .collect()
}

/// Rust's `Debug` of a `Duration` ("1.63s", "912.3ms") in ms.
fn parse_debug_duration(s: &str) -> Option<f64> {
    let s = s.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    for (unit, ms) in [("ms", 1.0), ("µs", 0.001), ("ns", 0.000_001), ("s", 1000.0)] {
        if let Some(n) = s.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v * ms);
        }
    }
    None
}

fn detached(c: &Containerd, runtime: &str) -> String {
    let id = unique_id("vmidle");
    integration::fixture::run_sleeping(c, runtime, &id);
    id
}

fn remove(c: &Containerd, id: &str) {
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_until(Duration::from_secs(20), || {
        c.ctr(&["task", "delete", id]).success()
    });
    c.ctr_ok(&["container", "delete", id]);
}

/// The (shim, QEMU, virtiofsd) pids of the only VM of `c`, whose directory is `dir`.
fn vm_processes(c: &Containerd, dir: &std::path::Path) -> [Option<i32>; 3] {
    let shims = c.shim_pids();
    assert_eq!(shims.len(), 1, "one shim, the VM's: {shims:?}");
    let procs = processes_mentioning(&dir.to_string_lossy());
    let find = |name: &str| {
        procs
            .iter()
            .find(|(_, cmd)| cmd.contains(name))
            .map(|(pid, _)| *pid)
    };
    [
        shims.first().copied(),
        find("qemu-system"),
        find("virtiofsd"),
    ]
}

/// (shim, QEMU, virtiofsd) as (RSS kB, PSS kB) of one idle VM.
fn vm_footprint(c: &Containerd) -> [(u64, u64); 3] {
    let id = detached(c, VM_RUNTIME);
    let dir = shim_vm::pod::run_dir(&c.address().to_string_lossy(), c.namespace(), &id);
    let best = settled(vm_processes(c, &dir));
    remove(c, &id);
    best
}

/// (RSS kB, PSS kB) of each of `pids` once the VM has settled: the guest idles once its
/// containers run and hands back the pages it freed (free page reporting, a few seconds
/// after they are freed). Sampled each second until the PSS has not fallen by 1 MB for
/// 3 s, at most 30 s.
fn settled<const N: usize>(pids: [Option<i32>; N]) -> [(u64, u64); N] {
    let sample = || {
        pids.map(|pid| {
            pid.map(|p| (rss_kb(p).unwrap_or(0), pss_kb(p).unwrap_or(0)))
                .unwrap_or((0, 0))
        })
    };
    let pss = |f: &[(u64, u64); N]| f.iter().map(|(_, p)| p).sum::<u64>();
    let started = Instant::now();
    let mut best = sample();
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(3) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
        let now = sample();
        if pss(&now) + 1024 < pss(&best) {
            since = Instant::now();
        }
        if pss(&now) < pss(&best) {
            best = now;
        }
    }
    eprintln!("vm-bench: VM PSS settled after {:.0?}", started.elapsed());
    best
}

/// The CRI figures: for each of [`CRI_HANDLERS`], the median ms from RunPodSandbox to its
/// first container started, over `n` pods (handlers in turn, the first rotating, each pod
/// removed before the next); and the settled (shim, QEMU, virtiofsd) PSS in kB of one VM
/// pod of 3 containers.
#[allow(clippy::type_complexity)]
fn cri_pods(n: usize, net_mib: usize) -> ([f64; 3], [f64; 3], [(u64, u64); 3], [f64; 3]) {
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .go_shim(true)
        .cri(true)
        .start()
        .expect("start containerd with CRI");
    let cri = c.cri_client().expect("CRI client");
    // The pod's id, and ms to: RunPodSandbox, then the first CreateContainer, then the
    // first StartContainer; then all of it.
    let ready = |handler: &str, containers: usize| -> (String, [f64; 3], f64) {
        let name = unique_id("vmbench");
        let cfg = pod_config(&name, &c.dir().join("pods").join(&name));
        let t = Instant::now();
        let id = cri.run_pod_sandbox(&cfg, handler).expect("RunPodSandbox");
        let mut phases = [t.elapsed().as_secs_f64() * 1e3, 0.0, 0.0];
        for k in 0..containers {
            let ctr = container_config(&format!("c{k}"), BUSYBOX_REF, &["sleep", "100000"]);
            let p = Instant::now();
            let cid = cri
                .create_container(&id, &ctr, &cfg)
                .expect("CreateContainer");
            let created = p.elapsed().as_secs_f64() * 1e3;
            cri.start_container(&cid).expect("StartContainer");
            if k == 0 {
                phases[1] = created;
                phases[2] = p.elapsed().as_secs_f64() * 1e3 - created;
            }
        }
        (id, phases, t.elapsed().as_secs_f64() * 1e3)
    };
    let gone = |id: &str| {
        cri.stop_pod_sandbox(id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(id).expect("RemovePodSandbox");
    };
    // Warm-up, not measured: snapshots unpacked, binaries and guest files in the page cache.
    for h in CRI_HANDLERS {
        gone(&ready(h, 1).0);
    }
    let mut times: [Vec<f64>; 3] = Default::default();
    let mut vm_phases: [Vec<f64>; 3] = Default::default();
    for i in 0..n {
        for j in 0..CRI_HANDLERS.len() {
            let k = (i + j) % CRI_HANDLERS.len();
            let (id, phases, ms) = ready(CRI_HANDLERS[k], 1);
            times[k].push(ms);
            if CRI_HANDLERS[k] == HANDLER_VM {
                for (v, p) in vm_phases.iter_mut().zip(phases) {
                    v.push(p);
                }
            }
            gone(&id);
        }
    }
    let (id, _, _) = ready(HANDLER_VM, 3);
    let dir = shim_vm::pod::run_dir(&c.address().to_string_lossy(), CRI_NAMESPACE, &id);
    let pss = settled(vm_processes(&c, &dir));
    gone(&id);
    let net = network_throughput(&c, &cri, net_mib);
    let medians = |t: [Vec<f64>; 3]| t.map(|mut t| median(&mut t));
    (medians(times), medians(vm_phases), pss, net)
}

/// MB/s of `mib` MiB sent over TCP from a runc pod into a pod of each of [`CRI_HANDLERS`]
/// in turn (its IP, on the CNI bridge): the sender's exec from start to end; the
/// receiver's count of what arrived is checked.
fn network_throughput(c: &Containerd, cri: &CriClient, mib: usize) -> [f64; 3] {
    let pod = |handler: &str, cmd: &[&str]| {
        let name = unique_id("vmbench-net");
        let cfg = pod_config(&name, &c.dir().join("pods").join(&name));
        let id = cri.run_pod_sandbox(&cfg, handler).expect("RunPodSandbox");
        let ctr = container_config("c", BUSYBOX_REF, cmd);
        let cid = cri
            .create_container(&id, &ctr, &cfg)
            .expect("CreateContainer");
        cri.start_container(&cid).expect("StartContainer");
        let ip = cri
            .pod_sandbox_status(&id)
            .expect("PodSandboxStatus")
            .network
            .expect("the pod's network")
            .ip;
        (id, cid, ip)
    };
    let (sender_pod, sender, _) = pod(HANDLER_OURS, &["sleep", "100000"]);
    // busybox `nc -e`: dd on each end of the connection, 64 KiB at a time (nc's own copy
    // loop moves 1 KiB per call, which would be the figure then).
    let blocks = (mib << 20) / 65536;
    let rates = CRI_HANDLERS.map(|handler| {
        let (id, receiver, ip) = pod(
            handler,
            &[
                "nc",
                "-l",
                "-p",
                "9000",
                "-e",
                "dd",
                "of=/dev/null",
                "bs=65536",
                "iflag=fullblock",
            ],
        );
        let listening = wait_until(Duration::from_secs(60), || {
            cri.exec_sync(&receiver, &["netstat", "-ltn"], 30)
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(":9000 "))
        });
        assert!(listening, "{handler}: nothing listens on 9000");
        let count = format!("count={blocks}");
        let send = [
            "nc",
            &ip,
            "9000",
            "-e",
            "dd",
            "if=/dev/zero",
            "bs=65536",
            &count,
        ];
        let t = Instant::now();
        let out = cri.exec_sync(&sender, &send, 600).expect("ExecSync");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(
            out.exit_code,
            0,
            "{handler}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (want, mut got) = (format!("{blocks}+0 records in"), String::new());
        let arrived = wait_until(Duration::from_secs(60), || {
            got = cri
                .container_log(&receiver)
                .map(|l| integration::cri::log_text(&l, None))
                .unwrap_or_default();
            got.contains(&want)
        });
        assert!(
            arrived,
            "{handler}: the receiver's dd said {got:?}, not {want:?}"
        );
        cri.stop_pod_sandbox(&id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(&id).expect("RemovePodSandbox");
        (blocks * 65536) as f64 / 1e6 / secs
    });
    cri.stop_pod_sandbox(&sender_pod).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&sender_pod)
        .expect("RemovePodSandbox");
    rates
}

/// The CRI handlers compared: our VM shim, our runc shim, Debian's Go runc shim.
const CRI_HANDLERS: [&str; 3] = [HANDLER_VM, HANDLER_OURS, HANDLER_GO];

/// MB/s of `cmd` (writing `mib` MiB to stdout, or nowhere when `expect_out` is false) in an
/// exec of `runtime`.
fn throughput(c: &Containerd, runtime: &str, mib: usize, cmd: &str, expect_out: bool) -> f64 {
    let id = detached(c, runtime);
    let t = Instant::now();
    let out = c.ctr_timeout(
        &["task", "exec", "--exec-id", "tp", &id, "sh", "-c", cmd],
        Duration::from_secs(900),
    );
    let secs = t.elapsed().as_secs_f64();
    let want = if expect_out { mib << 20 } else { 0 };
    assert_eq!(out.stdout.len(), want, "output short: {:?}", out.stderr);
    remove(c, &id);
    mib as f64 * 1.048_576 / secs
}

/// Keystrokes timed per terminal.
const ECHOES: usize = 20;

/// ms from typing a key on ctr's terminal to seeing its echo, for [`ECHOES`] keys typed
/// into busybox `sh` in an exec of a container of `runtime`.
fn echo_round_trips(c: &Containerd, runtime: &str) -> Vec<f64> {
    let id = detached(c, runtime);
    let args = ["task", "exec", "-t", "--exec-id", "tty", &id, "sh"];
    let mut t = Terminal::run(c, &args, 24, 80);
    assert!(t.wait_for("# "), "no prompt: {:?}", t.screen());
    // A comment: whatever was typed, Enter runs nothing.
    t.echo_round_trip('#').expect("no echo");
    let times = (0..ECHOES)
        .map(|i| {
            let key = char::from(b'a' + i as u8);
            let rtt = t.echo_round_trip(key);
            let rtt = rtt.unwrap_or_else(|| panic!("no echo of {key:?}: {:?}", t.screen()));
            rtt.as_secs_f64() * 1e3
        })
        .collect();
    t.type_line("");
    t.type_line("exit");
    assert_eq!(t.exit_code(), Some(0), "{:?}", t.screen());
    remove(c, &id);
    times
}

fn main() {
    require_root();
    let mut runs = 10;
    let mut mib = 512;
    let mut pods = 10;
    let mut net_mib = 256;
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    let pods_only = argv.iter().any(|a| a == "--pods-only");
    argv.retain(|a| a != "--pods-only");
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1).and_then(|v| v.parse().ok())) {
            ("--runs", Some(v)) => runs = v,
            ("--mib", Some(v)) => mib = v,
            ("--pods", Some(v)) => pods = v,
            ("--net-mib", Some(v)) => net_mib = v,
            _ => {
                eprintln!(
                    "usage: vm-bench [--runs N] [--mib N] [--pods N] [--net-mib N] [--pods-only]"
                );
                std::process::exit(2);
            }
        }
    }
    let ctr_rows = (!pods_only).then(|| ctr_figures(runs, mib));
    let cri_rows = cri_figures(pods, net_mib);
    println!(
        "vm-bench: containerd 1.6 (Debian), QEMU microvm ({runs} runs, {pods} pods each, alternating)"
    );
    println!("| figure | VM shim | runc shim | VM / runc |");
    println!("|---|---|---|---|");
    for row in ctr_rows.into_iter().flatten().chain(cri_rows) {
        println!("{row}");
    }
}

/// Parts 1 to 4, through `ctr`: the table's rows.
fn ctr_figures(runs: usize, mib: usize) -> Vec<String> {
    let c = Containerd::builder()
        .bin_dir(integration::target_bin_dir())
        .ctr_timeout(Duration::from_secs(600))
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox");
    // Warm caches (the image, the guest files) for both, once.
    run_rm(&c, VM_RUNTIME);
    run_rm(&c, OUR_RUNTIME);
    let before = boot_times(&c).len();
    let (mut vm, mut runc) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        vm.push(run_rm(&c, VM_RUNTIME).as_secs_f64() * 1e3);
        runc.push(run_rm(&c, OUR_RUNTIME).as_secs_f64() * 1e3);
    }
    let mut boots: Vec<f64> = boot_times(&c).into_iter().skip(before).collect();
    let [shim, qemu, fsd] = vm_footprint(&c);
    let head = format!("head -c {} /dev/zero", mib << 20);
    let dd = format!("dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null");
    let tp = |runtime, cmd: &str, out| throughput(&c, runtime, mib, cmd, out);
    let (vm_head, runc_head) = (tp(VM_RUNTIME, &head, true), tp(OUR_RUNTIME, &head, true));
    let (vm_dd, runc_dd) = (tp(VM_RUNTIME, &dd, true), tp(OUR_RUNTIME, &dd, true));
    let head_alone = tp(VM_RUNTIME, &format!("{head} >/dev/null"), false);
    let dd_alone = tp(VM_RUNTIME, &format!("{dd} >/dev/null"), false);
    let (mut vm_echo, mut runc_echo) = (
        echo_round_trips(&c, VM_RUNTIME),
        echo_round_trips(&c, OUR_RUNTIME),
    );
    drop(c);

    let (v, r) = (median(&mut vm), median(&mut runc));
    vec![
        format!(
            "| `ctr run --rm busybox true`, median | {v:.0} ms | {r:.1} ms | {:.1} |",
            v / r
        ),
        format!(
            "| boot to agent ready (shim log), median of {} | {:.0} ms | | |",
            boots.len(),
            median(&mut boots)
        ),
        format!(
            "| host RSS of an idle 1-container VM: shim + QEMU + virtiofsd | {:.1} + {:.1} + {:.1} MB | | |",
            mb(shim.0),
            mb(qemu.0),
            mb(fsd.0)
        ),
        format!(
            "| host PSS, same | {:.1} + {:.1} + {:.1} = {:.1} MB | | |",
            mb(shim.1),
            mb(qemu.1),
            mb(fsd.1),
            mb(shim.1 + qemu.1 + fsd.1)
        ),
        format!(
            "| stdout throughput, `head -c {mib}M /dev/zero` in an exec | {vm_head:.0} MB/s | {runc_head:.0} MB/s | {:.2} |",
            vm_head / runc_head
        ),
        format!(
            "| same, `dd bs=1M` (1 MiB writes) | {vm_dd:.0} MB/s | {runc_dd:.0} MB/s | {:.2} |",
            vm_dd / runc_dd
        ),
        format!(
            "| the same `head` into `/dev/null` in the guest (no stdio: its bound under TCG); stdout / it | {head_alone:.0} MB/s; {:.2} | | |",
            vm_head / head_alone
        ),
        format!(
            "| the same `dd` into `/dev/null` in the guest; stdout / it | {dd_alone:.0} MB/s; {:.2} | | |",
            vm_dd / dd_alone
        ),
        format!(
            "| terminal: a keystroke's echo round trip (`ctr task exec -t sh`), median of {ECHOES} | {:.1} ms | {:.1} ms | {:.1} |",
            median(&mut vm_echo),
            median(&mut runc_echo),
            median(&mut vm_echo) / median(&mut runc_echo)
        ),
    ]
}

/// Part 5, through CRI: the table's rows.
fn cri_figures(pods: usize, net_mib: usize) -> Vec<String> {
    let (
        [cri_vm, cri_ours, cri_go],
        [run, create, start],
        [pod_shim, pod_qemu, pod_fsd],
        [net_vm, net_ours, net_go],
    ) = cri_pods(pods, net_mib);
    vec![
        format!(
            "| CRI: pod ready with its first busybox container, median of {pods} (target VM ≤ 3.0 s) | {cri_vm:.0} ms | {cri_ours:.0} ms | {:.1} |",
            cri_vm / cri_ours
        ),
        format!(
            "| same, VM: RunPodSandbox + CreateContainer + StartContainer, medians | {run:.0} + {create:.0} + {start:.0} ms | | |"
        ),
        format!(
            "| same, Debian's Go runc shim | | {cri_go:.0} ms | VM / Go {:.1}; ours / Go {:.2} |",
            cri_vm / cri_go,
            cri_ours / cri_go
        ),
        format!(
            "| CRI: host PSS of a 3-container VM pod, shim + QEMU + virtiofsd (target ≤ 300 MiB) | {:.1} + {:.1} + {:.1} = {:.1} MB | | |",
            mb(pod_shim.1),
            mb(pod_qemu.1),
            mb(pod_fsd.1),
            mb(pod_shim.1 + pod_qemu.1 + pod_fsd.1)
        ),
        format!(
            "| CRI: TCP into the pod from a runc pod on the CNI bridge, {net_mib} MiB, busybox `nc -e dd` both ends | {net_vm:.0} MB/s | {net_ours:.0} MB/s | {:.2} (Go shim's runc pod: {net_go:.0} MB/s) |",
            net_vm / net_ours
        ),
    ]
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::parse_debug_duration;

    #[test]
    fn durations_as_rust_prints_them() {
        assert_eq!(parse_debug_duration("1.5s"), Some(1500.0));
        assert_eq!(parse_debug_duration("912.5ms"), Some(912.5));
        assert_eq!(parse_debug_duration("2s,"), Some(2000.0));
    }
}
