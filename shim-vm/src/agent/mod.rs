//! The guest agent, PID 1 of the VM: set the guest up, then serve the SDK's own task
//! service with the runc backend on the channel to the host ([`crate::channel`]: the
//! virtio-serial port, or a vsock listener) — no second implementation of the task API —
//! beside the SDK's event stream and the agent's stdio calls ([`stdio`]). One service serves
//! each host connection in turn: a host that reconnects finds its containers, their stdio
//! and the events queued meanwhile.

pub mod stdio;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protobuf::well_known_types::empty::Empty;
use protocol::agent::{ConfigureNetworkRequest, HelloRequest, HelloResponse};
use shim_common::peer_events::PeerEvents;
use shim_common::{reaper, rpc, serve_each, signals, Context, Result, ShimContext};

use crate::channel::{Channel, Listener, CHANNEL_PARAM};
use crate::{boot, network};

/// The virtio-serial port's name, as the host's QEMU names it.
pub const PORT: &str = "agent";
/// Where the guest keeps the fifos of every process's stdio.
const STDIO_DIR: &str = "/run/shim-vm/io";
/// Where the guest task service keeps its own state (the SDK's bundle of the daemon).
const STATE_DIR: &str = "/run/shim-vm/state";
/// How long the port may take to appear after the agent starts.
const PORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the pod's network devices may take to appear (their driver probes them
/// asynchronously after boot).
pub const NETWORK_TIMEOUT: Duration = Duration::from_secs(10);

/// Kernel command-line settings the host passes (`shim_vm.<key>=<value>`).
#[derive(Debug, Default)]
pub struct Cmdline {
    /// The containerd namespace of the pod.
    pub namespace: String,
    /// containerd runs with debug logging.
    pub debug: bool,
    /// The channel to serve the host on (`shim_vm.channel=`).
    pub channel: Channel,
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
                "channel" => match Channel::parse(value) {
                    Ok(ch) => c.channel = ch,
                    Err(e) => eprintln!("{CHANNEL_PARAM}: {e}; serving on the default"),
                },
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
    signals::spawn(|| {}, || {})?;
    // One vCPU, emulated: a container writing its output as fast as it can must not be
    // switched away from at each write (see `stdio::Outbound`).
    shim_common::stdio::batch_output();
    for dir in [STDIO_DIR, STATE_DIR] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {dir}"))?;
    }
    let listener = Listener::open(cmdline.channel, PORT, PORT_TIMEOUT)?;
    let serving = uptime();
    log::info!(
        "{} {} after {:?} of uptime (started at {started:?}; share {:?})",
        crate::channel::LISTENING_ON,
        cmdline.channel,
        uptime(),
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
    // Calls the host makes within a traced request are recorded here; their spans reach
    // the host with the events, and leave with the host's.
    shim_common::trace::init_peer("shim-vm-agent", events.clone());
    let mut methods = events.methods();
    methods.extend(stdio::Streams::new(Path::new(STDIO_DIR)).methods());
    let connections = Arc::new(AtomicU64::new(0));
    methods.extend(agent_methods(serving, connections.clone(), events.clone()));
    let next = move || {
        let stream = listener.next()?;
        let n = connections.fetch_add(1, Ordering::Relaxed) + 1;
        if n > 1 {
            log::info!("host connection {n}: serving the same containers again");
        }
        Ok(stream)
    };
    serve_each::<shim_runc_v2::RuncBackend>(ctx, next, events, Some(reaper), methods)
}

/// `Hello` (saying when the agent started serving, `serving`, and which of `connections`
/// this is; a host's first call on each connection, so the last host's waiting `Next` of
/// `events` is dropped then), `ConfigureNetwork` and `PowerOff`.
fn agent_methods(
    serving: Duration,
    connections: Arc<AtomicU64>,
    events: Arc<PeerEvents>,
) -> rpc::Methods {
    let mut m = rpc::Methods::new();
    m.insert(
        format!("/{}/Hello", protocol::AGENT_SERVICE),
        rpc::unary(move |_: HelloRequest| {
            events.new_peer();
            Ok(HelloResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                kernel: nix::sys::utsname::uname()
                    .map(|u| u.release().to_string_lossy().into_owned())
                    .unwrap_or_default(),
                boot_ns: u64::try_from(serving.as_nanos()).unwrap_or(u64::MAX),
                connection: connections.load(Ordering::Relaxed),
                ..Default::default()
            })
        }),
    );
    m.insert(
        format!("/{}/ConfigureNetwork", protocol::AGENT_SERVICE),
        rpc::unary(|req: ConfigureNetworkRequest| {
            let interfaces = network::from_proto(&req.interfaces)?;
            let started = std::time::Instant::now();
            network::configure(&interfaces, NETWORK_TIMEOUT)?;
            log::info!(
                "pod network: {} in {:?}",
                interfaces
                    .iter()
                    .map(|i| format!("{} {:?}", i.name, i.addresses))
                    .collect::<Vec<_>>()
                    .join(", "),
                started.elapsed()
            );
            Ok(Empty::new())
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
        let c = Cmdline::parse(
            "quiet shim_vm.ns=k8s.io shim_vm.debug=1 panic=-1 shim_vm.x shim_vm.channel=vsock",
        );
        assert_eq!(c.namespace, "k8s.io");
        assert!(c.debug);
        assert_eq!(c.channel, Channel::Vsock);
        let c = Cmdline::parse("console=ttyS0 shim_vm.channel=carrier-pigeon");
        assert_eq!(c.namespace, "default");
        assert!(!c.debug);
        assert_eq!(c.channel, Channel::VirtioSerial);
    }
}
