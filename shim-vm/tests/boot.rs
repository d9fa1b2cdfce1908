//! End to end: a real QEMU microvm (TCG here) boots the guest kernel with an
//! initramfs whose `/init` is `src/bin/shim-vm-boot-probe.rs`; the probe reports over the agent's
//! virtio-serial port what `boot::setup` did, reads a virtiofs share, answers round trips.
//!
//! The kernel comes from `make guest`'s cache (`SHIM_VM_CACHE`, set by the
//! Makefile; else `target/vm-guest`), virtiofsd from `SHIM_BIN_DIR` (else
//! `target/virtiofsd/bin`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shim_vm::image::{Builder, GuestImage};
use shim_vm::virtiofsd::Cache;
use shim_vm::vmm::{Share, Vm, VmConfig};

fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The probe image, built (or found in the cache) without touching `current`.
fn probe_image() -> GuestImage {
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_shim-vm-boot-probe"));
    let cache = std::env::var_os("SHIM_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("vm-guest"));
    let built = Builder::new(cache, probe).link(None).build().unwrap();
    built.image
}

fn virtiofsd() -> PathBuf {
    let candidates = [
        std::env::var_os("SHIM_BIN_DIR").map(|d| PathBuf::from(d).join("virtiofsd")),
        Some(workspace_target().join("virtiofsd/bin/virtiofsd")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .or_else(|| shim_vm::virtiofsd::locate().ok())
        .expect("virtiofsd: run `make virtiofsd`")
}

struct Port {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Port {
    fn connect(vm: &Vm) -> Port {
        let s = UnixStream::connect(vm.agent_socket()).unwrap();
        // Generous: a TCG boot on a loaded 2-core machine. Not a timing assertion, a hang guard.
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Port {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    fn line(&mut self, vm: &Vm) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap_or(0);
        assert!(n > 0, "the guest closed its port; {}", vm.diagnostics());
        line.trim_end().to_string()
    }

    fn ask(&mut self, vm: &Vm, q: &str) -> String {
        writeln!(self.writer, "{q}").unwrap();
        self.line(vm)
    }
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn guest_boots_with_its_drivers_built_in_mounts_the_share_and_answers_on_its_port() {
    let image = probe_image();
    let run = tempfile::Builder::new()
        .prefix("vm")
        .tempdir_in("/tmp")
        .unwrap();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("hello.txt"), "hello from the host").unwrap();
    std::fs::create_dir(shared.path().join("late")).unwrap();
    shim_vm::share::provide_runtime(shared.path(), "runc").unwrap();

    let mut config = VmConfig::new(&image, run.path());
    config.share = Some(Share {
        dir: shared.path().to_path_buf(),
        tag: "shared".into(),
        virtiofsd: virtiofsd(),
        cache: Cache::Never,
    });
    let t0 = Instant::now();
    let vm = Vm::start(&config).unwrap();
    let started = t0.elapsed();
    assert!(vm.accel().reason.len() > 3);

    // A mount made after virtiofsd started (as the shim mounts a container's rootfs).
    let late = shared.path().join("late");
    nix::mount::mount(
        Some("tmpfs"),
        &late,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let _unmount = Unmount(late.clone());
    std::fs::write(late.join("hello.txt"), "mounted after start").unwrap();

    let mut port = Port::connect(&vm);
    let up: serde_json::Value = serde_json::from_str(&port.line(&vm)).unwrap();
    let ready_at = t0.elapsed();
    println!(
        "accel {} ({}); QEMU up in {:?}; boot to port ready {:?} (guest uptime {}s)",
        vm.accel().accel,
        vm.accel().reason,
        started,
        ready_at,
        up["ready"].as_str().unwrap_or("?")
    );
    let ready: serde_json::Value = serde_json::from_str(&port.line(&vm)).unwrap();
    println!("probe: {ready}");

    // Every driver is built in: nothing to load, and what the agent mounts is there.
    let filesystems: Vec<&str> = ready["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for fs in ["virtiofs", "overlay", "cgroup2", "tmpfs", "devpts", "proc"] {
        assert!(filesystems.contains(&fs), "{fs} missing: {filesystems:?}");
    }
    assert_eq!(ready["vsock"], true, "{ready}");
    assert_eq!(ready["share"], "shared");
    assert_eq!(ready["virtiofs_mounted"], true, "{ready}");
    assert_eq!(ready["cgroup2_mounted"], true, "{ready}");
    assert_eq!(ready["ptmx"], "pts/ptmx");
    assert_eq!(ready["shared_file"], "hello from the host");
    // crun runs in the guest: its libraries and loader made it into the image; runc, from
    // the share, runs with them too.
    assert!(
        ready["crun"].as_str().unwrap().starts_with("crun version"),
        "{ready}"
    );
    assert!(
        ready["runc"].as_str().unwrap().starts_with("runc version"),
        "{ready}"
    );

    assert_eq!(
        port.ask(&vm, "cat /run/shared/late/hello.txt"),
        "mounted after start"
    );
    let t = Instant::now();
    assert_eq!(port.ask(&vm, "echo round trip"), "round trip");
    println!("round trip over the agent port: {:?}", t.elapsed());

    let pid = vm.pid();
    let fs_pid = vm.virtiofsd_pid().unwrap();
    vm.shutdown(Duration::from_secs(10)).unwrap();
    for p in [pid, fs_pid] {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Gone, or the pid reused by something that is not QEMU/virtiofsd (never a zombie of ours).
        assert!(
            !stat.contains("qemu-system") && !stat.contains("virtiofsd"),
            "{stat}"
        );
    }
    for s in ["agent.sock", "qmp.sock", "virtiofs.sock"] {
        assert!(!run.path().join(s).exists(), "{s} left behind");
    }
}

#[test]
fn guest_poweroff_ends_qemu() {
    let image = probe_image();
    let run = tempfile::Builder::new()
        .prefix("vm")
        .tempdir_in("/tmp")
        .unwrap();
    let mut vm = Vm::start(&VmConfig::new(&image, run.path())).unwrap();
    let mut port = Port::connect(&vm);
    let _up = port.line(&vm);
    let ready: serde_json::Value = serde_json::from_str(&port.line(&vm)).unwrap();
    assert_eq!(ready["share"], serde_json::Value::Null);
    writeln!(port.writer, "poweroff").unwrap();
    assert!(
        vm.wait_timeout(Duration::from_secs(60)).unwrap(),
        "QEMU still running after the guest's poweroff; {}",
        vm.diagnostics()
    );
    // A powered-off guest, not a PID 1 that exited (which panics, and -no-reboot ends QEMU too).
    let console = vm.console_tail(4096);
    assert!(!console.contains("Kernel panic"), "{console}");
    vm.shutdown(Duration::from_secs(1)).unwrap();
    assert!(!run.path().join("agent.sock").exists());
}
