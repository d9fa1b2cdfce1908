//! Benchmark: our `containerd-shim-runc-v2` against Debian's Go shim, in one containerd,
//! in the same run.
//!
//! 1. `ctr run --rm busybox true`, alternating ours and Go's, median wall time over N runs.
//! 2. 10 detached containers per shim, each in its own shim: RSS and PSS per shim process
//!    from `/proc/PID/smaps_rollup`.
//!
//! 3. `ctr task exec` latency, alternating between a container on each shim, median.
//! 4. Exec soak: N execs straight over each shim's ttrpc socket, RSS before and after.
//!
//! 5. CRI pods, as Kubernetes runs them: N pods × 5 busybox containers through handler `runc`
//!    (ours) and `gorunc` (Go) in one CRI-enabled containerd: shim processes, total shim
//!    PSS, median RunPodSandbox and StartContainer latency.
//!
//! 6. Exec-with-output rounds per S seconds (issue 17 item 1): 4 execs at once, each
//!    writing 2.7 MB to stdout and to stderr through fifos, every byte counted and
//!    checksummed when `Wait` answers (`src/output.rs`); rounds done, and bytes lost.
//!
//! 7. Tracing on (issue 15): a second containerd whose environment names an OTLP endpoint
//!    (a receiver on loopback, `src/otlp.rs`), so our shims export a span per call: the
//!    same `ctr run --rm` median and per-shim RSS/PSS, beside the figures with it off.
//!
//! Usage: `shim-bench [--runs N] [--containers N] [--execs N] [--soak N] [--pods N]
//! [--output-secs S] [--tracing-runs N]` (as root). `0` skips a figure where it says N or S.

use std::time::{Duration, Instant};

use integration::bench::{median, run_rm};
use integration::checks::wait_until;
use integration::fixture::run_sleeping;
use integration::{
    pss_kb, require_root, rss_kb, target_bin_dir, unique_id, Containerd, BUSYBOX_REF, GO_RUNTIME,
    OUR_RUNTIME,
};

struct Args {
    runs: usize,
    containers: usize,
    execs: usize,
    soak: usize,
    pods: usize,
    output_secs: u64,
    tracing_runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        runs: 30,
        containers: 10,
        execs: 200,
        soak: 10_000,
        pods: 10,
        output_secs: 30,
        tracing_runs: 30,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--runs", Some(v)) => a.runs = v,
            ("--containers", Some(v)) => a.containers = v,
            ("--execs", Some(v)) => a.execs = v,
            ("--soak", Some(v)) => a.soak = v,
            ("--pods", Some(v)) => a.pods = v,
            ("--output-secs", Some(v)) => a.output_secs = v as u64,
            ("--tracing-runs", Some(v)) => a.tracing_runs = v,
            _ => {
                eprintln!(
                    "usage: shim-bench [--runs N] [--containers N] [--execs N] [--soak N] \
                     [--pods N] [--output-secs S] [--tracing-runs N]"
                );
                std::process::exit(2);
            }
        }
    }
    a
}

struct Traced {
    run_ms: f64,
    rss_kb: f64,
    pss_kb: f64,
    shims: usize,
    spans: usize,
}

/// Our shim with tracing on: `runs` × `ctr run --rm` and `containers` idle shims, in a
/// containerd whose environment sends spans to a receiver on loopback.
fn traced(runs: usize, containers: usize) -> Traced {
    let receiver = integration::otlp::Receiver::start().expect("start the OTLP receiver");
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .otlp_endpoint(receiver.endpoint())
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox");
    for _ in 0..3 {
        run_rm(&c, OUR_RUNTIME);
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| run_rm(&c, OUR_RUNTIME).as_secs_f64() * 1e3)
        .collect();
    let (rss_kb, pss_kb, shims) = footprint(&c, OUR_RUNTIME, containers);
    drop(c);
    Traced {
        run_ms: median(&mut times),
        rss_kb,
        pss_kb,
        shims,
        spans: receiver.spans().len(),
    }
}

/// Starts `n` detached containers on `runtime`, returns (mean RSS kB, mean PSS kB) per shim.
fn footprint(c: &Containerd, runtime: &str, n: usize) -> (f64, f64, usize) {
    let ids: Vec<String> = (0..n).map(|_| unique_id("idle")).collect();
    for id in &ids {
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            BUSYBOX_REF,
            id,
            "sleep",
            "100000",
        ]);
    }
    assert!(wait_until(Duration::from_secs(30), || c.shim_pids().len() == n));
    // Let every shim settle (event connections made, start-up garbage freed).
    std::thread::sleep(Duration::from_millis(500));
    let pids = c.shim_pids();
    let rss: Vec<u64> = pids.iter().filter_map(|&p| rss_kb(p).ok()).collect();
    let pss: Vec<u64> = pids.iter().filter_map(|&p| pss_kb(p).ok()).collect();
    for id in &ids {
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
    }
    for id in &ids {
        wait_until(Duration::from_secs(10), || {
            c.ctr(&["task", "delete", id]).success()
        });
        c.ctr_ok(&["container", "delete", id]);
    }
    assert!(wait_until(Duration::from_secs(30), || c
        .shim_pids()
        .is_empty()));
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    (mean(&rss), mean(&pss), pids.len())
}

/// Median `ctr task exec` latency (ms) on a container of each runtime, alternating.
fn exec_latency(c: &Containerd, n: usize) -> (f64, f64) {
    let (a, b) = (unique_id("execours"), unique_id("execgo"));
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        OUR_RUNTIME,
        BUSYBOX_REF,
        &a,
        "sleep",
        "100000",
    ]);
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        GO_RUNTIME,
        BUSYBOX_REF,
        &b,
        "sleep",
        "100000",
    ]);
    let time = |id: &str, i: usize| {
        let t = Instant::now();
        c.ctr_ok(&["task", "exec", "--exec-id", &format!("e{i}"), id, "true"]);
        t.elapsed().as_secs_f64() * 1e3
    };
    let (mut ours, mut go) = (Vec::new(), Vec::new());
    for i in 0..n {
        if i % 2 == 0 {
            ours.push(time(&a, i));
            go.push(time(&b, i));
        } else {
            go.push(time(&b, i));
            ours.push(time(&a, i));
        }
    }
    for id in [&a, &b] {
        c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until(Duration::from_secs(10), || {
            c.ctr(&["task", "delete", id]).success()
        });
        c.ctr_ok(&["container", "delete", id]);
    }
    (median(&mut ours), median(&mut go))
}

/// Exec soak on one container of `runtime`: shim RSS (MB) after warm-up and at the end.
fn soak(c: &Containerd, runtime: &str, n: usize) -> (f64, f64) {
    let id = unique_id("soak");
    run_sleeping(c, runtime, &id);
    let pid = c.shim_pids()[0];
    let shim = integration::shim_client::connect(c, &id);
    let s = integration::soak::exec_soak(&shim, pid, &id, c.dir(), n, n.min(200));
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_until(Duration::from_secs(10), || {
        c.ctr(&["task", "delete", &id]).success()
    });
    c.ctr_ok(&["container", "delete", &id]);
    assert!(wait_until(Duration::from_secs(30), || c
        .shim_pids()
        .is_empty()));
    (
        s.rss_after_warmup_kb as f64 / 1024.0,
        s.rss_after_kb as f64 / 1024.0,
    )
}

/// What [`output_rounds`] measured on one shim.
struct OutputFigures {
    rounds: usize,
    bytes: u64,
    /// Streams that were not whole when `Wait` answered, and the bytes they were short.
    short_streams: usize,
    missing: u64,
}

/// Rounds of 4 concurrent execs with large outputs (fifos, checked at `Wait`) on one
/// container of `runtime` until `secs` have passed. Losses are counted, not fatal: the
/// figure is how the shims compare.
fn output_rounds(c: &Containerd, runtime: &str, secs: u64) -> OutputFigures {
    use integration::output::{Dest, ExecStress, Loss};
    let id = unique_id("output");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        BUSYBOX_REF,
        &id,
        "sleep",
        "100000",
    ]);
    let shim = integration::shim_client::connect(c, &id);
    let stress = ExecStress::new(4, 400_000, target_bin_dir().join("test-logger"));
    let mut f = OutputFigures {
        rounds: 0,
        bytes: 0,
        short_streams: 0,
        missing: 0,
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        let losses = stress.round(&shim, &id, c.dir(), &format!("r{}", f.rounds), Dest::Fifo);
        f.rounds += 1;
        f.bytes += stress.bytes_per_round();
        f.short_streams += losses.len();
        f.missing += losses.iter().map(Loss::missing).sum::<u64>();
    }
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_until(Duration::from_secs(10), || {
        c.ctr(&["task", "delete", &id]).success()
    });
    c.ctr_ok(&["container", "delete", &id]);
    f
}

/// Containers per pod in the CRI figures: a typical pod with sidecars.
const CONTAINERS_PER_POD: usize = 5;

/// What [`cri_pods`] measured, per handler: (ours, Go).
struct PodFigures {
    shims: (usize, usize),
    pss_kb: (u64, u64),
    run_pod_ms: (f64, f64),
    start_ms: (f64, f64),
}

/// `n` pods × [`CONTAINERS_PER_POD`] sleeping busybox containers per handler, all running
/// at once in one CRI containerd, pods of the two handlers alternating (and which goes
/// first alternating) so neither gets the warmer machine. Shims are told apart by their
/// executable; PSS is summed, since a pod's footprint is its whole shim.
fn cri_pods(n: usize) -> PodFigures {
    use integration::cri::{container_config, pod_config, HANDLER_GO, HANDLER_OURS};
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .go_shim(true)
        .cri(true)
        .start()
        .expect("start containerd with CRI");
    let cri = c.cri_client().expect("CRI client");
    let run_pod = |handler: &str, containers: usize, run: &mut Vec<f64>, start: &mut Vec<f64>| {
        let name = unique_id("benchpod");
        let cfg = pod_config(&name, &c.dir().join("pods").join(&name));
        let t = Instant::now();
        let id = cri.run_pod_sandbox(&cfg, handler).expect("RunPodSandbox");
        run.push(t.elapsed().as_secs_f64() * 1e3);
        for k in 0..containers {
            let ctr = container_config(&format!("c{k}"), BUSYBOX_REF, &["sleep", "100000"]);
            let cid = cri
                .create_container(&id, &ctr, &cfg)
                .expect("CreateContainer");
            let t = Instant::now();
            cri.start_container(&cid).expect("StartContainer");
            start.push(t.elapsed().as_secs_f64() * 1e3);
        }
        id
    };
    // Warm-up, not measured: the first pod of each handler unpacks snapshots and loads
    // the shim binary into the page cache.
    for h in [HANDLER_OURS, HANDLER_GO] {
        let id = run_pod(h, 1, &mut Vec::new(), &mut Vec::new());
        cri.stop_pod_sandbox(&id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(&id).expect("RemovePodSandbox");
    }
    assert!(wait_until(Duration::from_secs(30), || c
        .shim_pids()
        .is_empty()));

    let (mut run_o, mut run_g, mut start_o, mut start_g) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut pods = Vec::new();
    for i in 0..n {
        if i % 2 == 0 {
            pods.push(run_pod(
                HANDLER_OURS,
                CONTAINERS_PER_POD,
                &mut run_o,
                &mut start_o,
            ));
            pods.push(run_pod(
                HANDLER_GO,
                CONTAINERS_PER_POD,
                &mut run_g,
                &mut start_g,
            ));
        } else {
            pods.push(run_pod(
                HANDLER_GO,
                CONTAINERS_PER_POD,
                &mut run_g,
                &mut start_g,
            ));
            pods.push(run_pod(
                HANDLER_OURS,
                CONTAINERS_PER_POD,
                &mut run_o,
                &mut start_o,
            ));
        }
    }
    assert!(wait_until(Duration::from_secs(30), || c.shim_pids().len() == 2 * n));
    // Let every shim settle (event connections made, start-up garbage freed).
    std::thread::sleep(Duration::from_millis(500));
    let ours_exe = std::fs::canonicalize(target_bin_dir().join("containerd-shim-runc-v2"))
        .expect("our shim binary");
    let (mut shims, mut pss) = ((0, 0), (0, 0));
    for pid in c.shim_pids() {
        let kb = pss_kb(pid).unwrap_or(0);
        if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == ours_exe) {
            shims.0 += 1;
            pss.0 += kb;
        } else {
            shims.1 += 1;
            pss.1 += kb;
        }
    }
    for id in &pods {
        cri.stop_pod_sandbox(id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(id).expect("RemovePodSandbox");
    }
    assert!(wait_until(Duration::from_secs(60), || c
        .shim_pids()
        .is_empty()));
    PodFigures {
        shims,
        pss_kb: pss,
        run_pod_ms: (median(&mut run_o), median(&mut run_g)),
        start_ms: (median(&mut start_o), median(&mut start_g)),
    }
}

fn print_pod_rows(n: usize, f: &PodFigures) {
    let per = CONTAINERS_PER_POD;
    println!(
        "| CRI: shim processes for {n} pods × {per} containers | {} | {} | |",
        f.shims.0, f.shims.1
    );
    println!(
        "| CRI: total shim PSS, same (target ours / Go ≤ 0.15) | {:.2} MB | {:.2} MB | **{:.2}** |",
        f.pss_kb.0 as f64 / 1024.0,
        f.pss_kb.1 as f64 / 1024.0,
        f.pss_kb.0 as f64 / f.pss_kb.1 as f64
    );
    println!(
        "| CRI RunPodSandbox, median of {n} | {:.1} ms | {:.1} ms | {:.2} |",
        f.run_pod_ms.0,
        f.run_pod_ms.1,
        f.run_pod_ms.0 / f.run_pod_ms.1
    );
    println!(
        "| CRI StartContainer, median of {} | {:.1} ms | {:.1} ms | {:.2} |",
        n * per,
        f.start_ms.0,
        f.start_ms.1,
        f.start_ms.0 / f.start_ms.1
    );
}

fn main() {
    require_root();
    let a = args();
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .go_shim(true)
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox");
    for _ in 0..3 {
        run_rm(&c, OUR_RUNTIME);
        run_rm(&c, GO_RUNTIME);
    }
    let (mut ours, mut go) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        // Alternate which goes first so neither always runs on a warmer machine.
        if i % 2 == 0 {
            ours.push(run_rm(&c, OUR_RUNTIME).as_secs_f64() * 1e3);
            go.push(run_rm(&c, GO_RUNTIME).as_secs_f64() * 1e3);
        } else {
            go.push(run_rm(&c, GO_RUNTIME).as_secs_f64() * 1e3);
            ours.push(run_rm(&c, OUR_RUNTIME).as_secs_f64() * 1e3);
        }
    }
    let (mo, mg) = (median(&mut ours), median(&mut go));
    let (our_rss, our_pss, n1) = footprint(&c, OUR_RUNTIME, a.containers);
    let (go_rss, go_pss, n2) = footprint(&c, GO_RUNTIME, a.containers);
    let (eo, eg) = exec_latency(&c, a.execs);
    let (ours_soak, go_soak) = if a.soak > 0 {
        (soak(&c, OUR_RUNTIME, a.soak), soak(&c, GO_RUNTIME, a.soak))
    } else {
        ((f64::NAN, f64::NAN), (f64::NAN, f64::NAN))
    };
    let output = (a.output_secs > 0).then(|| {
        (
            output_rounds(&c, OUR_RUNTIME, a.output_secs),
            output_rounds(&c, GO_RUNTIME, a.output_secs),
        )
    });

    println!(
        "shim-bench: containerd 1.6 (Debian), runc, busybox; {} runs each, alternating",
        a.runs
    );
    println!("| figure | ours | Go shim | ours / Go |");
    println!("|---|---|---|---|");
    println!(
        "| `ctr run --rm busybox true`, median | {mo:.1} ms | {mg:.1} ms | {:.2} |",
        mo / mg
    );
    println!(
        "| shim RSS, 1 container per shim (mean of {n1} / {n2}) | {:.2} MB | {:.2} MB | {:.2} |",
        our_rss / 1024.0,
        go_rss / 1024.0,
        our_rss / go_rss
    );
    println!(
        "| shim PSS, same | {:.2} MB | {:.2} MB | {:.2} |",
        our_pss / 1024.0,
        go_pss / 1024.0,
        our_pss / go_pss
    );
    println!(
        "| `ctr task exec true`, median of {} | {eo:.1} ms | {eg:.1} ms | {:.2} |",
        a.execs,
        eo / eg
    );
    if a.soak > 0 {
        println!(
        "| shim RSS growth over {} execs (after 200 warm-up) | {:+.2} MB ({:.2} → {:.2}) | {:+.2} MB ({:.2} → {:.2}) | |",
        a.soak,
        ours_soak.1 - ours_soak.0,
        ours_soak.0,
        ours_soak.1,
        go_soak.1 - go_soak.0,
        go_soak.0,
        go_soak.1
    );
    }
    if let Some((o, g)) = &output {
        let secs = a.output_secs;
        println!(
            "| exec-with-output rounds in {secs} s (4 execs × 5.4 MB, fifos, checked at `Wait`) \
             | {} | {} | {:.2} |",
            o.rounds,
            g.rounds,
            o.rounds as f64 / g.rounds.max(1) as f64
        );
        let lost = |f: &OutputFigures| {
            format!(
                "{} of {:.1} MB ({} streams short)",
                f.missing,
                f.bytes as f64 / 1e6,
                f.short_streams
            )
        };
        println!("| bytes lost, same | {} | {} | |", lost(o), lost(g));
    }
    // The tracing and CRI figures need a containerd of their own; free the first one's
    // shims and mounts before.
    drop(c);
    if a.tracing_runs > 0 {
        let t = traced(a.tracing_runs, a.containers);
        println!(
            "| tracing on: `ctr run --rm busybox true`, median of {} | {:.1} ms | | {:.2} of off |",
            a.tracing_runs,
            t.run_ms,
            t.run_ms / mo
        );
        println!(
            "| tracing on: shim RSS / PSS, 1 container per shim (mean of {}) | {:.2} / {:.2} MB | | {:+.2} / {:+.2} MB vs off |",
            t.shims,
            t.rss_kb / 1024.0,
            t.pss_kb / 1024.0,
            (t.rss_kb - our_rss) / 1024.0,
            (t.pss_kb - our_pss) / 1024.0
        );
        println!("| tracing on: spans received | {} | | |", t.spans);
    }
    if a.pods > 0 {
        print_pod_rows(a.pods, &cri_pods(a.pods));
    }
}
