//! Benchmark: our `containerd-shim-runc-v2` against Debian's Go shim, in one containerd,
//! in the same run.
//!
//! 1. `ctr run --rm busybox true`, alternating ours and Go's, median wall time over N runs.
//! 2. 10 detached containers per shim, each in its own shim: RSS and PSS per shim process
//!    from `/proc/PID/smaps_rollup`.
//!
//! Usage: `shim-bench [--runs N] [--containers N]` (as root, with the shims built).

use std::time::{Duration, Instant};

use integration::checks::wait_until;
use integration::{
    pss_kb, require_root, rss_kb, target_bin_dir, unique_id, Containerd, BUSYBOX_REF, GO_RUNTIME,
    OUR_RUNTIME,
};

struct Args {
    runs: usize,
    containers: usize,
}

fn args() -> Args {
    let mut a = Args {
        runs: 30,
        containers: 10,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--runs", Some(v)) => a.runs = v,
            ("--containers", Some(v)) => a.containers = v,
            _ => {
                eprintln!("usage: shim-bench [--runs N] [--containers N]");
                std::process::exit(2);
            }
        }
    }
    a
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run_rm(c: &Containerd, runtime: &str) -> Duration {
    let id = unique_id("bench");
    let t = Instant::now();
    c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        BUSYBOX_REF,
        &id,
        "true",
    ]);
    t.elapsed()
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
}
