//! Many execs in one container, straight over the shim's ttrpc socket, watching the
//! shim's memory: the regression containerd saw as a shim growing to 96 MB (issue 13561).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use protocol::shim::*;
use protocol::shim_ttrpc::TaskClient;

use crate::shim_client::{ctx, process_spec};

/// RSS in kB of `pid` after `warmup` execs and after all `total` execs.
#[derive(Debug, Clone)]
pub struct Soak {
    pub rss_after_warmup_kb: u64,
    pub rss_after_kb: u64,
    pub execs: usize,
    /// RSS (kB) every 500 execs, to tell a leak (linear) from settling (a plateau).
    pub curve: Vec<u64>,
}

/// Runs `total` execs of `echo` in container `id` through `shim` (pid `shim_pid`), their
/// stdout going to one fifo in `dir` that a thread drains, and measures the shim's RSS.
pub fn exec_soak(
    shim: &TaskClient,
    shim_pid: i32,
    id: &str,
    dir: &Path,
    total: usize,
    warmup: usize,
) -> Soak {
    let fifo = dir.join("soak-out");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", fifo.display()));
    // O_RDWR keeps the fifo open between execs, so each exec's writer never blocks.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap_or_else(|e| panic!("open {}: {e}", fifo.display()));
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = reader.read(&mut buf) {}
    });
    let stdout = fifo.to_string_lossy().into_owned();
    let mut warm = 0;
    let mut curve = Vec::new();
    for i in 0..total {
        if i == warmup {
            warm = crate::rss_kb(shim_pid).unwrap_or(0);
        }
        if i % 500 == 0 {
            curve.push(crate::rss_kb(shim_pid).unwrap_or(0));
        }
        let exec_id = format!("soak{i}");
        let req = ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.clone(),
            stdout: stdout.clone(),
            // Debian's Go shim refuses an exec without a stderr path.
            stderr: stdout.clone(),
            spec: protobuf::MessageField::some(process_spec(&["echo", "soak"])),
            ..Default::default()
        };
        shim.exec(ctx(), &req)
            .unwrap_or_else(|e| panic!("exec {i}: {e}"));
        let key = StartRequest {
            id: id.into(),
            exec_id: exec_id.clone(),
            ..Default::default()
        };
        shim.start(ctx(), &key)
            .unwrap_or_else(|e| panic!("start exec {i}: {e}"));
        let wait = WaitRequest {
            id: id.into(),
            exec_id: exec_id.clone(),
            ..Default::default()
        };
        let status = shim
            .wait(ctx(), &wait)
            .unwrap_or_else(|e| panic!("wait exec {i}: {e}"));
        assert_eq!(status.exit_status, 0, "exec {i}");
        let del = DeleteRequest {
            id: id.into(),
            exec_id,
            ..Default::default()
        };
        shim.delete(ctx(), &del)
            .unwrap_or_else(|e| panic!("delete exec {i}: {e}"));
    }
    let _ = File::open("/dev/null");
    Soak {
        rss_after_warmup_kb: warm,
        rss_after_kb: crate::rss_kb(shim_pid).unwrap_or(0),
        execs: total,
        curve,
    }
}
