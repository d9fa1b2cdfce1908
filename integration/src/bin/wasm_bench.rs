//! Benchmark of `containerd-shim-wasm-v2`, all figures from one containerd in one run.
//!
//! 1. `ctr run --rm` of `hello.wasm` from an OCI Wasm image: **cold** (each run a new image
//!    whose module differs by a custom section, so the shim compiles it and stores the
//!    artifact) and **precompiled** (the same image again), alternating with busybox `true`
//!    through our runc shim; medians and ratios. Also `hello.wasm` from a busybox rootfs.
//! 2. Footprint of one pod: N idle Wasm containers (`idle.wasm`, asleep in `poll_oneoff`)
//!    grouped into one shim by the `io.kubernetes.cri.sandbox-id` annotation, as CRI does;
//!    total PSS of the shim and every descendant (container inits) for N = 1, 10, 100, and
//!    MB per extra container.
//! 3. SIGTERM to STOPPED of a guest spinning in a loop (a core module, a WASI C program),
//!    beside a shell loop through our runc shim: the figure the Wasm tests once asserted.
//!
//! Usage: `wasm-bench [--runs N] [--max-containers N]` (as root, after building the shims).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use integration::bench::median;
use integration::checks::wait_until;
use integration::fixture::{task_pid, task_status, LONG};
use integration::procfs::cpu_ticks;
use integration::wasm_fixture::{
    import_busybox_wasm, parent, require_wasm_shim, shim_daemons, BUSYBOX_WASM_REF,
};
use integration::wasm_image::{wasm_oci_archive, WasmImage};
use integration::wasm_modules::{self, Program, HELLO_OUTPUT};
use integration::{
    pss_kb, require_root, target_bin_dir, unique_id, Containerd, BUSYBOX_REF, OUR_RUNTIME,
    WASM_RUNTIME,
};

/// The grouping annotation CRI puts on every container of a pod; the SDK's `start` hashes
/// it into the shim's socket, so all containers below share one shim.
const SANDBOX_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

struct Args {
    runs: usize,
    max_containers: usize,
}

fn args() -> Args {
    let mut a = Args {
        runs: 20,
        max_containers: 100,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--runs", Some(v)) if v > 0 => a.runs = v,
            ("--max-containers", Some(v)) if v > 0 => a.max_containers = v,
            _ => {
                eprintln!("usage: wasm-bench [--runs N] [--max-containers N]");
                std::process::exit(2);
            }
        }
    }
    a
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Wall time of `ctr run --rm --runtime <runtime> <image> <id> [args]`; an error (with
/// ctr's message) if it fails or a Wasm run does not print hello.
fn run_rm(c: &Containerd, runtime: &str, image: &str, args: &[&str]) -> Result<Duration, String> {
    let id = unique_id("bench");
    let mut a = vec!["run", "--rm", "--runtime", runtime, image, &id];
    a.extend_from_slice(args);
    let t = Instant::now();
    let out = c.ctr(&a);
    let took = t.elapsed();
    if !out.success() {
        return Err(format!("ctr run {image} {args:?}: {}", out.stderr.trim()));
    }
    if runtime == WASM_RUNTIME && out.stdout != HELLO_OUTPUT {
        return Err(format!("{image} {args:?} printed {:?}", out.stdout));
    }
    Ok(took)
}

/// Timings of one kind of run (ms), and the runs that failed: a failure is reported with
/// the figure, never retried away.
#[derive(Default)]
struct Series {
    ms: Vec<f64>,
    failures: usize,
    first_error: Option<String>,
}

impl Series {
    fn time(&mut self, run: impl FnOnce() -> Result<Duration, String>) {
        match run() {
            Ok(d) => self.ms.push(ms(d)),
            Err(e) => {
                self.failures += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn reset(&mut self) {
        *self = Series::default();
    }
}

/// Imports `n` OCI Wasm images of hello, each with a distinct module; returns their refs.
fn distinct_hello_images(c: &Containerd, n: usize) -> Vec<String> {
    let hello = wasm_modules::bytes(Program::Hello).expect("build hello.wasm");
    (0..n)
        .map(|i| {
            let image = format!("localhost/shimtest/hello-cold-{i}:{}", std::process::id());
            let module = wasm_modules::with_custom_section(&hello, "bench", image.as_bytes());
            let archive = wasm_oci_archive(
                &c.dir().join(format!("cold-{i}.oci.tar")),
                &image,
                WasmImage::Module,
                &module,
                &["/hello.wasm"],
            )
            .expect("build image");
            c.ctr_ok(&[
                "images",
                "import",
                "--all-platforms",
                &archive.to_string_lossy(),
            ]);
            image
        })
        .collect()
}

struct RunFigures {
    cold: Series,
    precompiled: Series,
    rootfs: Series,
    runc: Series,
}

fn run_times(c: &Containerd, runs: usize) -> RunFigures {
    let cold_images = distinct_hello_images(c, runs);
    let warm = distinct_hello_images(c, 1).remove(0);
    let (mut cold, mut pre, mut rootfs, mut runc) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    // Warm-up, untimed: the first run of `warm` compiles its module and stores the
    // artifact; one run of each other kind pages the binaries in.
    pre.time(|| run_rm(c, WASM_RUNTIME, &warm, &[]));
    runc.time(|| run_rm(c, OUR_RUNTIME, BUSYBOX_REF, &["true"]));
    rootfs.time(|| run_rm(c, WASM_RUNTIME, BUSYBOX_WASM_REF, &["/hello.wasm"]));
    for s in [&mut pre, &mut runc, &mut rootfs] {
        s.reset();
    }
    for image in &cold_images {
        cold.time(|| run_rm(c, WASM_RUNTIME, image, &[]));
        pre.time(|| run_rm(c, WASM_RUNTIME, &warm, &[]));
        rootfs.time(|| run_rm(c, WASM_RUNTIME, BUSYBOX_WASM_REF, &["/hello.wasm"]));
        runc.time(|| run_rm(c, OUR_RUNTIME, BUSYBOX_REF, &["true"]));
    }
    RunFigures {
        cold,
        precompiled: pre,
        rootfs,
        runc,
    }
}

/// SIGTERM to STOPPED, through ctr, of a container spinning in a loop, measured from the
/// kill; the container is removed afterwards whatever happened.
fn sigterm_to_stopped(
    c: &Containerd,
    runtime: &str,
    image: &str,
    args: &[&str],
) -> Result<Duration, String> {
    let id = unique_id("term");
    let mut a = vec!["run", "-d", "--runtime", runtime, image, &id];
    a.extend_from_slice(args);
    let out = c.ctr(&a);
    if !out.success() {
        return Err(format!("ctr run {args:?}: {}", out.stderr.trim()));
    }
    let measure = || {
        let mut pid = None;
        wait_until(LONG, || {
            pid = task_pid(c, &id);
            pid.is_some()
        });
        let pid = pid.ok_or("no pid")?;
        // In its loop once it burns CPU (20 ticks: more than a start takes).
        let before = cpu_ticks(pid).unwrap_or(0);
        if !wait_until(LONG, || cpu_ticks(pid).unwrap_or(0) >= before + 20) {
            return Err(format!("{args:?} never spun"));
        }
        let t = Instant::now();
        c.ctr(&["task", "kill", "-s", "SIGTERM", &id]);
        if !wait_until(LONG, || task_status(c, &id).as_deref() == Some("STOPPED")) {
            return Err(format!("{args:?} ignored SIGTERM for {LONG:?}"));
        }
        Ok(t.elapsed())
    };
    let took = measure();
    c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_until(LONG, || task_status(c, &id).as_deref() != Some("RUNNING"));
    c.ctr(&["task", "delete", &id]);
    c.ctr(&["container", "delete", &id]);
    took
}

/// `pids` and all their descendants, each once.
fn with_descendants(pids: &[i32]) -> BTreeSet<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some(ppid) = parent(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = BTreeSet::new();
    let mut stack = pids.to_vec();
    while let Some(p) = stack.pop() {
        if out.insert(p) {
            stack.extend(children.get(&p).into_iter().flatten());
        }
    }
    out
}

/// Total PSS (kB) of the shim daemons and their descendants, and how many processes.
fn pod_pss_kb(c: &Containerd) -> (u64, usize) {
    let all = with_descendants(&shim_daemons(c));
    let pss = all.iter().filter_map(|&p| pss_kb(p).ok()).sum();
    (pss, all.len())
}

struct Footprint {
    containers: usize,
    shims: usize,
    processes: usize,
    pss_kb: u64,
}

/// Grows one pod to each size in `sizes` (ascending) and measures it at each step.
fn footprint(c: &Containerd, sizes: &[usize]) -> Vec<Footprint> {
    let pod = unique_id("pod");
    let group = format!("{SANDBOX_ANNOTATION}={pod}");
    let mut ids = Vec::new();
    let mut out = Vec::new();
    for &n in sizes {
        while ids.len() < n {
            let id = unique_id("idle");
            c.ctr_ok(&[
                "run",
                "-d",
                "--runtime",
                WASM_RUNTIME,
                "--annotation",
                &group,
                BUSYBOX_WASM_REF,
                &id,
                "/idle.wasm",
            ]);
            ids.push(id);
        }
        // Let every container reach its sleep and the shim settle.
        std::thread::sleep(Duration::from_millis(1000));
        let (pss_kb, processes) = pod_pss_kb(c);
        out.push(Footprint {
            containers: n,
            shims: shim_daemons(c).len(),
            processes,
            pss_kb,
        });
    }
    for id in &ids {
        c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    for id in &ids {
        wait_until(Duration::from_secs(10), || {
            c.ctr(&["task", "delete", id]).success()
        });
        c.ctr(&["container", "delete", id]);
    }
    wait_until(Duration::from_secs(30), || c.shim_pids().is_empty());
    out
}

fn main() {
    let args = args();
    require_root();
    require_wasm_shim();
    let runc_shim = target_bin_dir().join("containerd-shim-runc-v2");
    assert!(
        runc_shim.exists(),
        "build the runc shim first: {} is missing",
        runc_shim.display()
    );

    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox");
    let ns = c.namespace().to_string();
    import_busybox_wasm(&c, &ns).expect("import busybox-wasm");

    println!(
        "# wasm-bench: containerd 1.6, one private instance, {} runs",
        args.runs
    );
    let mut r = run_times(&c, args.runs);
    println!();
    println!(
        "| `ctr run --rm`, median of {} | ms | / runc shim `true` | target |",
        args.runs
    );
    println!("|---|---|---|---|");
    let runc = median(&mut r.runc.ms);
    let row = |what: &str, s: &mut Series, target: &str| {
        let m = median(&mut s.ms);
        let failed = match &s.first_error {
            Some(e) => format!(
                " ({} of {} runs failed; first: {e})",
                s.failures,
                s.failures + s.ms.len()
            ),
            None => String::new(),
        };
        println!("| {what}{failed} | {m:.1} | {:.2} | {target} |", m / runc);
    };
    row("busybox `true`, our runc shim", &mut r.runc, "");
    row(
        "hello.wasm, OCI image, cold (compile + store)",
        &mut r.cold,
        "",
    );
    row(
        "hello.wasm, OCI image, precompiled",
        &mut r.precompiled,
        "≤ 1.0",
    );
    row(
        "hello.wasm from a busybox rootfs (node cache)",
        &mut r.rootfs,
        "",
    );

    let term_runs = args.runs.min(5);
    let (mut module, mut wasi, mut shell) =
        (Series::default(), Series::default(), Series::default());
    for _ in 0..term_runs {
        module.time(|| sigterm_to_stopped(&c, WASM_RUNTIME, BUSYBOX_WASM_REF, &["/busy.wasm"]));
        wasi.time(|| {
            sigterm_to_stopped(&c, WASM_RUNTIME, BUSYBOX_WASM_REF, &["/ctool.wasm", "busy"])
        });
        shell.time(|| {
            sigterm_to_stopped(
                &c,
                OUR_RUNTIME,
                BUSYBOX_REF,
                &["sh", "-c", "trap 'exit 0' TERM; while :; do :; done"],
            )
        });
    }
    println!();
    println!("| SIGTERM to STOPPED of a busy loop (through ctr), median of {term_runs} | ms | / runc shim shell loop | target |");
    println!("|---|---|---|---|");
    let base = median(&mut shell.ms);
    let row = |what: &str, s: &mut Series, target: &str| {
        let failed = s
            .first_error
            .as_ref()
            .map(|e| format!(" ({} failed; first: {e})", s.failures))
            .unwrap_or_default();
        let m = median(&mut s.ms);
        println!("| {what}{failed} | {m:.1} | {:.2} | {target} |", m / base);
    };
    row(
        "busybox `sh` loop with a TERM trap, our runc shim",
        &mut shell,
        "",
    );
    row("busy.wasm (a core module's `loop`)", &mut module, "< 1000");
    row("ctool busy (C, WASI)", &mut wasi, "< 1000");

    let mut sizes: Vec<usize> = [1, 10, 100]
        .into_iter()
        .filter(|&n| n <= args.max_containers)
        .collect();
    if sizes.last() != Some(&args.max_containers) && args.max_containers > 1 {
        sizes.push(args.max_containers);
    }
    let f = footprint(&c, &sizes);
    println!();
    println!("| idle wasm containers in one pod | shims | processes | total PSS (MB) | MB per extra container |");
    println!("|---|---|---|---|---|");
    let base = f.first().map_or(0, |x| x.pss_kb);
    for x in &f {
        let per = if x.containers > 1 {
            format!(
                "{:.2}",
                (x.pss_kb as f64 - base as f64) / 1024.0 / (x.containers - 1) as f64
            )
        } else {
            "".to_string()
        };
        println!(
            "| {} | {} | {} | {:.2} | {} |",
            x.containers,
            x.shims,
            x.processes,
            x.pss_kb as f64 / 1024.0,
            per
        );
    }
    println!("\ntarget: ≤ 3 MB per extra container (runwasi's wasmtime shim: ~22.7 MB for one)");
}
