//! The channel between the host shim and the guest agent: one byte stream carrying
//! multiplexed ttrpc (task calls, the agent's stdio calls, the events long-poll), over
//! virtio-serial (the default, works everywhere) or vsock ([`crate::vsock`]).
//!
//! | `Channel` | host side | guest side | a host reconnect |
//! |---|---|---|---|
//! | `virtio-serial` | QEMU's chardev unix socket (one client at a time) | `/dev/vportNpM` | the port reads end-of-file, then turns readable when the next host is there |
//! | `vsock`, no KVM | `vhost-device-vsock`'s unix socket, `CONNECT <port>` | `AF_VSOCK` listener | a new `accept` |
//! | `vsock`, KVM and `/dev/vhost-vsock` | `AF_VSOCK` to the guest's CID | `AF_VSOCK` listener | a new `accept` |
//!
//! Either way the agent serves one task service on each connection in turn
//! ([`shim_common::serve_each`]), so a host that lost its connection finds its containers.
//!
//! ```
//! use shim_vm::channel::Channel;
//! assert_eq!(Channel::parse("vsock"), Ok(Channel::Vsock));
//! assert_eq!(Channel::default(), Channel::VirtioSerial);
//! ```

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shim_common::{Context, Result};

use crate::vsock;

/// The kernel command-line parameter telling the agent which channel to serve on.
pub const CHANNEL_PARAM: &str = "shim_vm.channel";
/// What the agent says on the serial console, followed by the channel's name, once it
/// listens there.
pub const LISTENING_ON: &str = "agent listening on";
/// How much of the console is searched for that line: it comes early in the boot.
const CONSOLE_SEARCHED: u64 = 1 << 20;

/// Which channel a VM's agent is reached through (runtime option `Channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Channel {
    /// A virtio-serial port (`virtserialport,name=agent`) behind QEMU's chardev socket.
    #[default]
    #[serde(rename = "virtio-serial")]
    VirtioSerial,
    /// `AF_VSOCK` port [`vsock::AGENT_PORT`] of the guest.
    #[serde(rename = "vsock")]
    Vsock,
}

impl Channel {
    /// The option's spelling: `virtio-serial` or `vsock`.
    pub fn parse(name: &str) -> std::result::Result<Channel, String> {
        match name {
            "virtio-serial" => Ok(Channel::VirtioSerial),
            "vsock" => Ok(Channel::Vsock),
            other => Err(format!(
                "{other:?}: the agent's channel is \"virtio-serial\" or \"vsock\""
            )),
        }
    }

    /// The option's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::VirtioSerial => "virtio-serial",
            Channel::Vsock => "vsock",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the host reaches a running VM's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// QEMU's chardev socket of the agent's virtio-serial port.
    Serial(PathBuf),
    /// `vhost-device-vsock`'s unix socket, and the guest port to `CONNECT` to.
    HybridVsock {
        /// The unix socket.
        uds: PathBuf,
        /// The guest's port.
        port: u32,
        /// The VM's serial console log: no `CONNECT` before the agent said there that it
        /// listens ([`LISTENING_ON`]). vhost-device-vsock 0.3 takes a host connection
        /// while the guest's driver is still setting up its queues, fails to use them,
        /// and its worker thread ends on that error: the device would never move a byte
        /// again. Once the agent listens, the driver is up.
        console: PathBuf,
    },
    /// The guest's `AF_VSOCK` address, through the kernel's vhost-vsock.
    Vsock {
        /// The guest's CID.
        cid: u32,
        /// The guest's port.
        port: u32,
    },
}

impl Address {
    /// A new connection to the agent, made within `timeout`. A guest not listening yet is
    /// an error here (to try again); a virtio-serial port's socket connects before the
    /// guest has booted, and the agent reads what was sent once it serves.
    pub fn dial(&self, timeout: Duration) -> Result<OwnedFd> {
        match self {
            Address::Serial(path) => {
                let s = UnixStream::connect(path)
                    .with_context(|| format!("connect {}", path.display()))?;
                Ok(OwnedFd::from(s))
            }
            Address::HybridVsock { uds, port, console } => {
                if !said_listening(console, Channel::Vsock) {
                    return Err(shim_common::Error::Unavailable(format!(
                        "vsock port {port}: the agent has not said on the console ({}) that it listens",
                        console.display()
                    )));
                }
                vsock::connect_hybrid(uds, *port, timeout)
            }
            Address::Vsock { cid, port } => vsock::connect(*cid, *port),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Serial(p) => write!(f, "virtio-serial via {}", p.display()),
            Address::HybridVsock { uds, port, .. } => {
                write!(f, "vsock port {port} via {}", uds.display())
            }
            Address::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
        }
    }
}

/// Whether the agent said on `console` that it listens on `channel`.
fn said_listening(console: &std::path::Path, channel: Channel) -> bool {
    use std::io::Read;
    let mut head = Vec::new();
    let read =
        std::fs::File::open(console).and_then(|f| f.take(CONSOLE_SEARCHED).read_to_end(&mut head));
    if read.is_err() {
        return false;
    }
    let line = format!("{LISTENING_ON} {channel} ");
    head.windows(line.len()).any(|w| w == line.as_bytes())
}

/// The guest's side: where the agent finds each host connection.
pub enum Listener {
    /// The virtio-serial port, opened once; every host connection is the same fd.
    Serial(OwnedFd),
    /// A vsock listener.
    Vsock(OwnedFd),
}

impl Listener {
    /// The agent's end of `channel`: the port named `port_name` (waiting up to
    /// `port_timeout` for its driver), or a vsock listener on [`vsock::AGENT_PORT`].
    pub fn open(channel: Channel, port_name: &str, port_timeout: Duration) -> Result<Listener> {
        Ok(match channel {
            Channel::VirtioSerial => Listener::Serial(crate::boot::port(port_name, port_timeout)?),
            Channel::Vsock => Listener::Vsock(vsock::listen(vsock::AGENT_PORT)?),
        })
    }

    /// The next host connection, once a host is there.
    pub fn next(&self) -> Result<OwnedFd> {
        match self {
            Listener::Serial(port) => {
                wait_for_host(port)?;
                port.try_clone().context("duplicate the agent port")
            }
            Listener::Vsock(listener) => vsock::accept(listener),
        }
    }
}

/// A virtio-serial port reads end-of-file while no host is connected: serving it then
/// would end at once. It polls readable *and* hung up then (the end-of-file is there to
/// read); a host that connects sends its first call right away, so the port turns readable
/// without the hang-up, and there is no event for "a host connected" but that.
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
        if got.contains(PollFlags::POLLHUP) {
            std::thread::sleep(Duration::from_millis(2));
        } else if got.contains(PollFlags::POLLIN) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_spelled_as_the_option_spells_them() {
        for c in [Channel::VirtioSerial, Channel::Vsock] {
            assert_eq!(Channel::parse(c.as_str()), Ok(c));
        }
        let e = Channel::parse("tcp").unwrap_err();
        assert!(e.contains("virtio-serial") && e.contains("vsock"), "{e}");
    }

    #[test]
    fn a_serial_address_without_qemu_is_an_error_naming_the_socket() {
        let a = Address::Serial("/nonexistent/agent.sock".into());
        let e = a.dial(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/agent.sock"), "{e}");
    }
}
