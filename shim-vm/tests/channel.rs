//! The agent's channel for real: a QEMU microvm (TCG here) boots the real agent
//! (`shim-vm-agent` as `/init`), the host's [`Guest`] dials it over virtio-serial or vsock
//! (`vhost-device-vsock`), the test cuts the host's connection (`shutdown(2)` on it, as a
//! broken socket would), and the agent must serve the next connection with what it had.
//!
//! The kernel package comes from `make guest`'s cache (`SHIM_VM_CACHE`, else
//! `target/vm-guest`); vhost-device-vsock from `SHIM_BIN_DIR` (else
//! `target/vhost-device-vsock/bin`), which `make vhost-device-vsock` builds.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::well_known_types::empty::Empty;
use protocol::agent::{HelloRequest, HelloResponse, OpenStdioRequest, OpenStdioResponse};
use protocol::agent::{StdioRequest, WriteStdinRequest};
use shim_common::Error;
use shim_vm::channel::Address;
use shim_vm::guest::{Dial, Guest};
use shim_vm::image::{Builder, GuestImage};
use shim_vm::vmm::{Vm, VmChannel, VmConfig};

/// Generous: a TCG boot on a loaded 2-core machine. A hang guard, not a timing assertion.
const BOOT: Duration = Duration::from_secs(120);

fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The image with this build's agent, built (or found in the cache) without touching `current`.
fn agent_image() -> GuestImage {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_shim-vm-agent"));
    let cache = std::env::var_os("SHIM_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("vm-guest"));
    Builder::new(cache, agent).link(None).build().unwrap().image
}

fn vhost_device_vsock() -> PathBuf {
    let candidates = [
        std::env::var_os("SHIM_BIN_DIR").map(|d| PathBuf::from(d).join("vhost-device-vsock")),
        Some(workspace_target().join("vhost-device-vsock/bin/vhost-device-vsock")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .expect("vhost-device-vsock: run `make vhost-device-vsock`")
}

/// Dials `address` as the shim does, keeping a duplicate of every connection so that the
/// test can cut them.
fn recording_dial(address: Address) -> (Dial, Arc<Mutex<Vec<OwnedFd>>>) {
    let conns: Arc<Mutex<Vec<OwnedFd>>> = Arc::default();
    let kept = conns.clone();
    let dial: Dial = Box::new(move |timeout| {
        let fd = address.dial(timeout)?;
        kept.lock().unwrap().push(fd.try_clone().unwrap());
        Ok(fd)
    });
    (dial, conns)
}

/// Cuts every connection made so far, as a broken socket would: both directions end for
/// both its holders (the guest's and ours).
fn cut(conns: &Mutex<Vec<OwnedFd>>) {
    for fd in conns.lock().unwrap().drain(..) {
        // SAFETY: shutdown(2) on an fd we own.
        assert_eq!(
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) },
            0
        );
    }
}

/// `data` for `container`'s stdin, at byte `offset` of it.
fn stdin(container: &str, data: &str, offset: usize) -> WriteStdinRequest {
    WriteStdinRequest {
        container_id: container.into(),
        data: data.as_bytes().to_vec(),
        offset: offset as u64,
        ..Default::default()
    }
}

fn hello(guest: &Guest) -> HelloResponse {
    guest
        .agent("Hello", &HelloRequest::new(), Duration::from_secs(30))
        .unwrap()
}

/// Boots the agent on `channel`, then `rounds` times: cut the connection, see the next
/// call fail `Unavailable` naming it, and the one after it reach the same agent (same
/// `boot_ns`, one more connection) with the stdio state it had.
fn the_agent_serves_a_host_that_reconnects(channel: VmChannel, rounds: u64) {
    let image = agent_image();
    let run = tempfile::Builder::new()
        .prefix("vm")
        .tempdir_in("/tmp")
        .unwrap();
    let mut config = VmConfig::new(&image, run.path());
    config.channel = channel;
    let t0 = Instant::now();
    let mut vm = Vm::start(&config).unwrap();
    let (dial, conns) = recording_dial(vm.agent_address().clone());
    let (guest, first) =
        Guest::connect(dial, BOOT).unwrap_or_else(|e| panic!("{e}; {}", vm.diagnostics()));
    println!(
        "{}: agent answered after {:?} (serving {:?} after the guest kernel started)",
        vm.agent_address(),
        t0.elapsed(),
        Duration::from_nanos(first.boot_ns)
    );
    assert_eq!(first.connection, 1);

    // State the agent holds for the host: a process's stdio (fifos, a queued stdin).
    let open = OpenStdioRequest {
        container_id: "c1".into(),
        stdin: true,
        stdout: true,
        ..Default::default()
    };
    let opened: OpenStdioResponse = guest
        .agent("OpenStdio", &open, Duration::from_secs(30))
        .unwrap();
    assert!(opened.stdin.ends_with("/c1/init/stdin"), "{opened:?}");
    let _: Empty = guest
        .agent(
            "WriteStdin",
            &stdin("c1", "before\n", 0),
            Duration::from_secs(30),
        )
        .unwrap();

    let mut connection = first.connection;
    let mut written = "before\n".len();
    for round in 1..=rounds {
        cut(&conns);
        let e = guest
            .agent::<Empty>(
                "WriteStdin",
                &stdin("c1", "lost?\n", written),
                Duration::from_secs(30),
            )
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("lost during WriteStdin"), "{e}");
        assert_eq!(guest.connections(), round + 1);

        let again = hello(&guest);
        assert_eq!(again.boot_ns, first.boot_ns, "not the same agent");
        // One more connection at least: on a busy host a reconnect attempt may time out
        // after the agent took it, and the next attempt is another.
        assert!(
            again.connection > connection,
            "{again:?} after {connection}"
        );
        connection = again.connection;
        // The stdio is still there; a process never opened is not. Whether the agent took
        // the lost write is unknown: made again, it is taken at most once.
        for data in ["lost?\n", "after\n"] {
            let _: Empty = guest
                .agent(
                    "WriteStdin",
                    &stdin("c1", data, written),
                    Duration::from_secs(30),
                )
                .unwrap_or_else(|e| panic!("round {round}: {e}; {}", vm.console_tail(2048)));
            written += data.len();
        }
        let e = guest
            .agent::<Empty>("WriteStdin", &stdin("c2", "x", 0), Duration::from_secs(30))
            .unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }
    // State changed on a later connection stays changed on the next.
    let close = StdioRequest {
        container_id: "c1".into(),
        ..Default::default()
    };
    let _: Empty = guest
        .agent("CloseStdin", &close, Duration::from_secs(30))
        .unwrap();
    cut(&conns);
    let _ = guest.agent::<HelloResponse>("Hello", &HelloRequest::new(), Duration::from_secs(30));
    let e = guest
        .agent::<Empty>(
            "WriteStdin",
            &stdin("c1", "x", written),
            Duration::from_secs(30),
        )
        .unwrap_err();
    assert!(e.to_string().contains("stdin is closed"), "{e}");

    // The round trip on this channel (an agent call and its answer), median of 200.
    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            hello(&guest);
            t.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "{}: Hello round trip median {:?} (min {:?}, max {:?})",
        vm.agent_address(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );

    guest.retire();
    let _ = guest.agent::<Empty>("PowerOff", &Empty::new(), Duration::from_secs(5));
    assert!(
        vm.wait_timeout(Duration::from_secs(60)).unwrap(),
        "QEMU still running after PowerOff; {}",
        vm.diagnostics()
    );
    let vsock_pid = vm.vsock_pid();
    vm.shutdown(Duration::from_secs(5)).unwrap();
    if let Some(pid) = vsock_pid {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            !stat.contains("vhost-device"),
            "vhost-device-vsock left: {stat}"
        );
    }
    for s in ["agent.sock", "qmp.sock", "vsock.sock"] {
        assert!(!run.path().join(s).exists(), "{s} left behind");
    }
}

#[test]
fn over_virtio_serial_the_agent_serves_a_host_that_reconnects() {
    the_agent_serves_a_host_that_reconnects(VmChannel::Serial, 5);
}

#[test]
fn over_vsock_the_agent_serves_a_host_that_reconnects() {
    the_agent_serves_a_host_that_reconnects(
        VmChannel::Vsock {
            vhost_user: Some(vhost_device_vsock()),
        },
        5,
    );
}

#[test]
fn over_vsock_an_agent_that_never_listens_is_a_clear_error_within_the_timeout() {
    let image = agent_image();
    let run = tempfile::Builder::new()
        .prefix("vm")
        .tempdir_in("/tmp")
        .unwrap();
    let mut config = VmConfig::new(&image, run.path());
    config.channel = VmChannel::Vsock {
        vhost_user: Some(vhost_device_vsock()),
    };
    // The agent serves only what the command line names: told virtio-serial (which the VM
    // does not have), it never listens on vsock.
    config.cmdline = "shim_vm.channel=virtio-serial".into();
    let vm = Vm::start(&config).unwrap();
    let (dial, _conns) = recording_dial(vm.agent_address().clone());
    let t = Instant::now();
    let e = match Guest::connect(dial, Duration::from_secs(3)) {
        Ok(_) => panic!("an agent answered on vsock"),
        Err(e) => e,
    };
    println!("gave up after {:?}: {e}", t.elapsed());
    assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");
    assert!(e.to_string().contains("did not answer within 3s"), "{e}");
    assert!(e.to_string().contains("vsock port 1024"), "{e}");
    vm.kill().unwrap();
}

#[test]
fn vsock_without_its_device_is_a_clear_error_naming_it_and_the_make_target() {
    let image = agent_image();
    let run = tempfile::Builder::new()
        .prefix("vm")
        .tempdir_in("/tmp")
        .unwrap();
    let mut config = VmConfig::new(&image, run.path());
    config.channel = VmChannel::Vsock { vhost_user: None };
    // Where the kernel's vhost-vsock serves (KVM and /dev/vhost-vsock), the device is not
    // needed; this machine has neither.
    if std::path::Path::new("/dev/vhost-vsock").exists() {
        println!("skipped: /dev/vhost-vsock exists here, the kernel's vsock may serve");
        return;
    }
    let e = Vm::start(&config).unwrap_err().to_string();
    assert!(e.contains("vhost-device-vsock"), "{e}");
    assert!(e.contains("make vhost-device-vsock"), "{e}");
    assert!(
        std::fs::read_dir(run.path()).unwrap().all(|e| e
            .map(|e| !e.path().to_string_lossy().ends_with(".sock"))
            .unwrap_or(true)),
        "sockets left"
    );
}
