//! 10,000 execs in one container: the shim's RSS afterwards is at most 1 MiB above what it
//! was after warm-up. `SHIM_SOAK_EXECS` changes the count.

use integration::shim_client::connect;
use integration::soak::exec_soak;
use integration::{require_root, target_bin_dir, unique_id, Containerd, BUSYBOX_REF};

#[test]
fn ten_thousand_execs_do_not_grow_the_shim() {
    require_root();
    let total: usize = std::env::var("SHIM_SOAK_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .start()
        .expect("start containerd");
    c.import_busybox().expect("import busybox");
    let id = unique_id("soak");
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &id, "sleep", "100000"]);
    let pid = c.shim_pids()[0];
    let shim = connect(&c, &id);
    let soak = exec_soak(&shim, pid, &id, c.dir(), total, total.min(200));
    eprintln!("exec soak: {soak:?}");
    assert!(
        soak.rss_after_kb <= soak.rss_after_warmup_kb + 1024,
        "shim grew from {} kB to {} kB over {} execs",
        soak.rss_after_warmup_kb,
        soak.rss_after_kb,
        soak.execs
    );
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}
