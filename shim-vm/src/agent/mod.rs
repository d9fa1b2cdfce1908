//! The guest agent, PID 1 of the VM: set the guest up, then serve the SDK's own task
//! service with the runc backend on the virtio-serial port to the host — no second
//! implementation of the task API — beside the SDK's event stream and the agent's stdio
//! calls ([`stdio`]).

pub mod stdio;

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use protobuf::well_known_types::empty::Empty;
use protocol::agent::{HelloRequest, HelloResponse};
use shim_common::peer_events::PeerEvents;
use shim_common::{reaper, rpc, serve_on, signals, Context, Result, ShimContext};

use crate::boot;

/// The virtio-serial port's name, as the host's QEMU names it.
pub const PORT: &str = "agent";
/// Where the guest keeps the fifos of every process's stdio.
const STDIO_DIR: &str = "/run/shim-vm/io";
/// Where the guest task service keeps its own state (the SDK's bundle of the daemon).
const STATE_DIR: &str = "/run/shim-vm/state";
/// How long the port may take to appear once the modules are loaded.
const PORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Kernel command-line settings the host passes (`shim_vm.<key>=<value>`).
#[derive(Debug, Default)]
pub struct Cmdline {
    /// The containerd namespace of the pod.
    pub namespace: String,
    /// containerd runs with debug logging.
    pub debug: bool,
}

impl Cmdline {
    /// Parses `/proc/cmdline`'s text.
    pub fn parse(text: &str) -> Cmdline {
        let mut c = Cmdline {
            namespace: "default".into(),
            ..Default::default()
        };
        for word in text.split_whitespace() {
            let Some((key, value)) = word
                .strip_prefix("shim_vm.")
                .and_then(|w| w.split_once('='))
            else {
                continue;
            };
            match key {
                "ns" => c.namespace = value.to_string(),
                "debug" => c.debug = value == "1",
                _ => {}
            }
        }
        c
    }
}

/// Runs the agent; returns only if it could not serve (PID 1 then powers the VM off).
pub fn run() -> Result<()> {
    let started = uptime();
    // The kernel starts PID 1 without a PATH; the runc backend looks its runtime up there.
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    let booted = boot::setup()?;
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    shim_common::logger::init(cmdline.debug);
    signals::block()?;
    let reaper = reaper::install()?;
    signals::spawn(|| {})?;
    for dir in [STDIO_DIR, STATE_DIR] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {dir}"))?;
    }
    let port = boot::port(PORT, PORT_TIMEOUT)?;
    wait_for_host(&port)?;
    log::info!(
        "agent serving after {:?} of uptime (started at {started:?}; modules {:?}, share {:?})",
        uptime(),
        booted.modules,
        booted.share
    );

    let ctx = ShimContext {
        namespace: cmdline.namespace.clone(),
        id: "vm".into(),
        bundle: STATE_DIR.into(),
        debug: cmdline.debug,
        address: String::new(),
        exits: Default::default(),
    };
    let events = PeerEvents::new(&ctx.namespace);
    let mut methods = events.methods();
    methods.extend(stdio::Streams::new(Path::new(STDIO_DIR)).methods());
    methods.extend(agent_methods());
    serve_on::<shim_runc_v2::RuncBackend>(ctx, port, events, Some(reaper), methods)
}

/// `Hello` and `PowerOff`.
fn agent_methods() -> rpc::Methods {
    let mut m = rpc::Methods::new();
    m.insert(
        format!("/{}/Hello", protocol::AGENT_SERVICE),
        rpc::unary(|_: HelloRequest| {
            Ok(HelloResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                kernel: nix::sys::utsname::uname()
                    .map(|u| u.release().to_string_lossy().into_owned())
                    .unwrap_or_default(),
                boot_ns: u64::try_from(uptime().as_nanos()).unwrap_or(u64::MAX),
                ..Default::default()
            })
        }),
    );
    m.insert(
        format!("/{}/PowerOff", protocol::AGENT_SERVICE),
        Box::new(|_req, reply| {
            // The answer is on the port before the VM goes.
            reply.send(Ok(Empty::new()));
            if let Err(e) = boot::poweroff() {
                log::error!("power off: {e}");
            }
        }),
    );
    m
}

/// A virtio-serial port reads end-of-file while no host is connected: serving it then
/// would end at once. The host connects before the guest boots and sends its first call
/// right away, so the port turns readable; until then it polls hung up, and there is no
/// event for "a host connected" but that.
fn wait_for_host(port: &OwnedFd) -> Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u8)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(std::io::Error::from(e)).context("poll the agent port"),
        }
        let got = fds[0].revents().unwrap_or(PollFlags::empty());
        if got.contains(PollFlags::POLLIN) {
            return Ok(());
        }
        if got.contains(PollFlags::POLLHUP) {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Time since the guest kernel started.
fn uptime() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_settings_are_read_and_the_rest_ignored() {
        let c = Cmdline::parse("quiet shim_vm.ns=k8s.io shim_vm.debug=1 panic=-1 shim_vm.x");
        assert_eq!(c.namespace, "k8s.io");
        assert!(c.debug);
        let c = Cmdline::parse("console=ttyS0");
        assert_eq!(c.namespace, "default");
        assert!(!c.debug);
    }
}
