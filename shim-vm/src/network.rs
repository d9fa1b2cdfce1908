//! A pod's network, carried into its VM (host side). CNI sets the pod up in a network
//! namespace on the host: an interface (CRI names it `eth0`) with the pod's addresses and
//! routes. The VM takes that interface's place: in the same namespace a tap device, given to
//! QEMU as the guest's virtio-net device with the interface's MAC, is joined to the CNI
//! interface by `tc` redirects both ways (an ingress qdisc on each, a match-all filter
//! whose `mirred` action sends every frame out of the other), as Kata's default `tcfilter`
//! model does. Frames reach the guest before the namespace's own stack sees them, so the
//! guest answers for the pod's addresses, which it takes over with the routes and MTU read
//! here.
//!
//! Safety: every change is made from a thread that entered the pod's namespace and ends
//! there; a namespace that is the shim's own (a host-network pod, a wrong path) is refused
//! before anything is read or changed, so the host's own interfaces are never touched. All
//! of it goes through netlink (`netlink-packet-route`, the crate youki already brings), not
//! by running `ip` or `tc`.
//!
//! In the guest ([`configure`]) the same netlink code gives the VM's virtio-net device the
//! interface's name, MTU, addresses and routes, which the host sends in the agent's
//! `ConfigureNetwork` call ([`to_proto`], [`from_proto`]).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use protocol::agent::{IpNetwork, IpRoute, NetworkInterface};
use shim_common::{Context, Error, Result};

/// The interface CRI asks CNI to make in a pod's namespace.
pub const POD_INTERFACE: &str = "eth0";

/// The tap's name in the pod's namespace (at most 15 bytes, `IFNAMSIZ` - 1).
pub const TAP_NAME: &str = "tap0_vm";

/// What the guest needs to take the pod's interface's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// Addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// The main table's routes through this interface.
    pub routes: Vec<Route>,
}

/// A route: destination and prefix length (0.0.0.0/0 or ::/0 for a default route), and its
/// gateway (`None`: on the link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: (IpAddr, u8),
    pub gateway: Option<IpAddr>,
}

/// The pod's interface joined to a tap, until [`PodNetwork::detach`].
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    /// The CNI interface, as the guest should take it over.
    pub interface: Interface,
    /// The tap's file, shared with QEMU's config (`-netdev tap,fd=N`); the tap lives while
    /// a copy is open.
    pub tap: Arc<OwnedFd>,
}

impl PodNetwork {
    /// Joins interface `ifname` of network namespace `netns` to a new tap, both ways.
    /// Refuses the shim's own namespace. A failure halfway undoes what it did.
    pub fn attach(netns: &Path, ifname: &str) -> Result<PodNetwork> {
        let ifname = ifname.to_string();
        let (interface, tap) = in_netns(netns, move || {
            let mut rtnl = Rtnl::open()?;
            let interface = rtnl.interface(&ifname)?;
            let tap = open_tap(TAP_NAME)?;
            let tap_index = rtnl.index_of(TAP_NAME)?;
            let joined = (|| {
                rtnl.set_up(tap_index, interface.mtu)?;
                for (from, to) in [(interface.index, tap_index), (tap_index, interface.index)] {
                    rtnl.request(ingress_qdisc(from, true), NLM_F_CREATE | NLM_F_EXCL)?;
                    rtnl.request(redirect(from, to), NLM_F_CREATE | NLM_F_EXCL)?;
                }
                Ok(())
            })();
            if let Err(e) = joined {
                // The tap goes with its file; the interface's qdisc, if made, goes here.
                let _ = rtnl.request(ingress_qdisc(interface.index, false), 0);
                return Err(e);
            }
            Ok((interface, tap))
        })?;
        Ok(PodNetwork {
            netns: netns.to_path_buf(),
            interface,
            tap: Arc::new(tap),
        })
    }

    /// Removes the redirects and the tap (once QEMU's copy of its file is closed too). A
    /// namespace or interface already gone (CNI's DEL ran) is no error: nothing is left.
    pub fn detach(self) -> Result<()> {
        let index = self.interface.index;
        drop(self.tap);
        let removed = in_netns(&self.netns, move || {
            Rtnl::open()?.request(ingress_qdisc(index, false), 0)
        });
        match removed {
            Err(e) if !absent(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Whether `e` says the thing is gone already: the namespace (ENOENT), the interface
/// (ENODEV) or its qdisc (EINVAL, as the kernel answers a delete of none).
fn absent(e: &Error) -> bool {
    matches!(
        e,
        Error::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL))
    )
}

/// Runs `f` on a thread that entered network namespace `netns` and ends after `f`; refuses a
/// namespace that is the shim's own.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file =
        File::open(netns).with_context(|| format!("network namespace {}", netns.display()))?;
    let theirs = file
        .metadata()
        .with_context(|| format!("stat {}", netns.display()))?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net").context("stat our netns")?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(Error::InvalidArgument(format!(
            "network namespace {} is the host's own: a pod's network is set up only in a \
             namespace of its own",
            netns.display()
        )));
    }
    let netns = netns.to_path_buf();
    std::thread::Builder::new()
        .name("pod-netns".into())
        .spawn(move || {
            // SAFETY: setns on a valid namespace fd affects this thread only, which ends
            // after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Io {
                    context: format!("enter network namespace {}", netns.display()),
                    source: std::io::Error::last_os_error(),
                });
            }
            f()
        })
        .context("spawn a thread for the pod's network namespace")?
        .join()
        .map_err(|_| Error::Runtime("the pod network thread panicked".into()))?
}

/// A tap device named `name` (no packet info, with virtio-net headers, one queue), alive
/// while its file is open.
fn open_tap(name: &str) -> Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("open /dev/net/tun")?;
    // SAFETY: an all-zero ifreq is valid; the name fits (checked) with its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(Error::InvalidArgument(format!(
            "tap name {name:?}: too long"
        )));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes the ifreq passed, which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(Error::Io {
            context: format!("create tap {name}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(OwnedFd::from(tun))
}

fn ingress_qdisc(index: u32, create: bool) -> RouteNetlinkMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    if create {
        RouteNetlinkMessage::NewQueueDiscipline(m)
    } else {
        RouteNetlinkMessage::DelQueueDiscipline(m)
    }
}

/// `tc filter add dev <from> parent ffff: protocol all u32 match u8 0 0 action mirred
/// egress redirect dev <to>`.
fn redirect(from: u32, to: u32) -> RouteNetlinkMessage {
    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    // One key matching every frame (mask 0).
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    // Priority 1; the protocol (all) in network byte order.
    m.header.info = (1 << 16) | u32::from((libc::ETH_P_ALL as u16).to_be());
    m.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.into()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    RouteNetlinkMessage::NewTrafficFilter(m)
}

/// A blocking rtnetlink socket, in the namespace of the thread that opened it.
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    fn open() -> Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("open a netlink socket")?;
        socket.bind_auto().context("bind the netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connect the netlink socket")?;
        Ok(Rtnl {
            socket,
            sequence: 0,
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<u32> {
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        self.sequence += 1;
        m.header.flags = NLM_F_REQUEST | flags;
        m.header.sequence_number = self.sequence;
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.socket.send(&buf, 0).context("netlink send")?;
        Ok(self.sequence)
    }

    /// The replies to `sequence` until its end (an ACK, or a dump's done); a netlink error
    /// is an error naming `what`.
    fn replies(&mut self, sequence: u32, what: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().context("netlink receive")?;
            let mut offset = 0;
            while offset < data.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| Error::Runtime(format!("netlink {what}: {e}")))?;
                let length = m.header.length as usize;
                if m.header.sequence_number == sequence {
                    match m.payload {
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(_) => Err(Error::Io {
                                    context: format!("netlink {what}"),
                                    source: e.to_io(),
                                }),
                            }
                        }
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::InnerMessage(inner) => out.push(inner),
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }

    /// Sends a change and waits for its ACK.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<()> {
        let what = describe(&message).unwrap_or_else(|| "request".into());
        let sequence = self.send(message, NLM_F_ACK | flags)?;
        self.replies(sequence, &what).map(drop)
    }

    fn dump(&mut self, message: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
        let what = describe(&message).unwrap_or_default();
        let sequence = self.send(message, NLM_F_DUMP)?;
        self.replies(sequence, &what)
    }

    fn links(&mut self) -> Result<Vec<LinkMessage>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    fn index_of(&mut self, name: &str) -> Result<u32> {
        self.links()?
            .iter()
            .find(|l| link_name(l) == Some(name))
            .map(|l| l.header.index)
            .ok_or_else(|| Error::NotFound(format!("interface {name} in the pod's namespace")))
    }

    /// Interface `name`, its addresses and the main table's routes through it.
    fn interface(&mut self, name: &str) -> Result<Interface> {
        let link = self
            .links()?
            .into_iter()
            .find(|l| link_name(l) == Some(name))
            .ok_or_else(|| Error::NotFound(format!("interface {name} in the pod's namespace")))?;
        let index = link.header.index;
        let (mut mac, mut mtu) = (Vec::new(), 0);
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(m) => mac = m.clone(),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let mut addresses = Vec::new();
        for m in self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index {
                continue;
            }
            for attr in &a.attributes {
                // A link-local IPv6 address the guest's kernel makes itself, from the MAC.
                if let AddressAttribute::Address(ip) = attr {
                    if !link_local(ip) {
                        addresses.push((*ip, a.header.prefix_len));
                    }
                }
            }
        }
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut get = RouteMessage::default();
            get.header.address_family = family;
            for m in self.dump(RouteNetlinkMessage::GetRoute(get))? {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                // The kernel's own routes (an address's subnet, fe80::/64) come back in the
                // guest with the addresses.
                if r.header.table != RouteHeader::RT_TABLE_MAIN
                    || r.header.protocol == RouteProtocol::Kernel
                    || r.header.kind != RouteType::Unicast
                {
                    continue;
                }
                let (mut oif, mut destination, mut gateway) = (None, None, None);
                for attr in &r.attributes {
                    match attr {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(d) => destination = ip_of(d),
                        RouteAttribute::Gateway(g) => gateway = ip_of(g),
                        _ => {}
                    }
                }
                if oif != Some(index) {
                    continue;
                }
                let unspecified = match family {
                    AddressFamily::Inet6 => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
                };
                routes.push(Route {
                    destination: (
                        destination.unwrap_or(unspecified),
                        r.header.destination_prefix_length,
                    ),
                    gateway,
                });
            }
        }
        Ok(Interface {
            name: name.to_string(),
            index,
            mac,
            mtu,
            addresses,
            routes,
        })
    }

    /// Sets link `index` up, with `mtu`.
    fn set_up(&mut self, index: u32, mtu: u32) -> Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        if mtu > 0 {
            link.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }
}

fn link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn family_of(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// In the guest: gives each of `interfaces` to the network device with its MAC (waiting up
/// to `timeout` for the driver to probe it): its name, MTU, addresses and routes, up.
pub fn configure(interfaces: &[Interface], timeout: Duration) -> Result<()> {
    let mut rtnl = Rtnl::open()?;
    for interface in interfaces {
        let index = rtnl.wait_for_mac(&interface.mac, timeout)?;
        rtnl.configure(index, interface).map_err(|e| {
            Error::Runtime(format!(
                "configure the pod's interface {} ({}): {e}",
                interface.name,
                mac_text(&interface.mac)
            ))
        })?;
    }
    Ok(())
}

impl Rtnl {
    /// The index of the link with address `mac`, once it exists.
    fn wait_for_mac(&mut self, mac: &[u8], timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.links()?.into_iter().find(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Address(m) if m == mac))
            });
            if let Some(link) = found {
                return Ok(link.header.index);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no network device with MAC {} appeared within {timeout:?}: is the \
                     virtio-net driver in the guest image?",
                    mac_text(mac)
                )));
            }
            // No udev to say when the driver has probed the device: look again shortly.
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn configure(&mut self, index: u32, interface: &Interface) -> Result<()> {
        // Named while down (a rename of an up link is refused).
        let mut rename = LinkMessage::default();
        rename.header.index = index;
        rename
            .attributes
            .push(LinkAttribute::IfName(interface.name.clone()));
        self.request(RouteNetlinkMessage::SetLink(rename), 0)?;
        self.set_up(index, interface.mtu)?;
        for (ip, prefix) in &interface.addresses {
            let mut a = AddressMessage::default();
            a.header.family = family_of(ip);
            a.header.prefix_len = *prefix;
            a.header.index = index;
            a.attributes.push(AddressAttribute::Local(*ip));
            a.attributes.push(AddressAttribute::Address(*ip));
            if ip.is_ipv6() {
                // The host's namespace checked the address already: no second DAD delay.
                a.header.flags = AddressHeaderFlags::Nodad;
                a.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            self.request_new(RouteNetlinkMessage::NewAddress(a))?;
        }
        // Routes on the link first: a gateway must be reachable when its route is added.
        let mut routes: Vec<&Route> = interface.routes.iter().collect();
        routes.sort_by_key(|r| r.gateway.is_some());
        for route in routes {
            let (destination, prefix) = route.destination;
            let mut r = RouteMessage::default();
            r.header.address_family = family_of(&destination);
            r.header.destination_prefix_length = prefix;
            r.header.table = RouteHeader::RT_TABLE_MAIN;
            r.header.protocol = RouteProtocol::Boot;
            r.header.kind = RouteType::Unicast;
            r.header.scope = match route.gateway {
                Some(_) => RouteScope::Universe,
                None => RouteScope::Link,
            };
            if prefix > 0 {
                r.attributes
                    .push(RouteAttribute::Destination(destination.into()));
            }
            if let Some(gateway) = route.gateway {
                r.attributes.push(RouteAttribute::Gateway(gateway.into()));
            }
            r.attributes.push(RouteAttribute::Oif(index));
            self.request_new(RouteNetlinkMessage::NewRoute(r))?;
        }
        Ok(())
    }

    /// Adds something; one that exists already (a route the kernel made) is fine.
    fn request_new(&mut self, message: RouteNetlinkMessage) -> Result<()> {
        match self.request(message, NLM_F_CREATE | NLM_F_EXCL) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }
}

/// `mac` as `02:00:0a:fa:09:02`, as QEMU's `mac=` and `ip link` write it.
pub fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The agent call's form of `interfaces`.
pub fn to_proto(interfaces: &[Interface]) -> Vec<NetworkInterface> {
    let net = |(ip, prefix): (IpAddr, u8)| IpNetwork {
        ip: ip.to_string(),
        prefix_len: u32::from(prefix),
        ..Default::default()
    };
    interfaces
        .iter()
        .map(|i| NetworkInterface {
            name: i.name.clone(),
            mac: i.mac.clone(),
            mtu: i.mtu,
            addresses: i.addresses.iter().copied().map(net).collect(),
            routes: i
                .routes
                .iter()
                .map(|r| IpRoute {
                    destination: protobuf::MessageField::some(net(r.destination)),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

/// `interfaces` from the agent call; a malformed one is an `InvalidArgument` naming it.
pub fn from_proto(interfaces: &[NetworkInterface]) -> Result<Vec<Interface>> {
    let net = |n: &IpNetwork| -> Result<(IpAddr, u8)> {
        let ip: IpAddr =
            n.ip.parse()
                .map_err(|_| Error::InvalidArgument(format!("address {:?}", n.ip)))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match u8::try_from(n.prefix_len) {
            Ok(p) if p <= max => Ok((ip, p)),
            _ => Err(Error::InvalidArgument(format!(
                "prefix length {} of {ip}",
                n.prefix_len
            ))),
        }
    };
    interfaces
        .iter()
        .map(|i| {
            if i.mac.len() != 6 {
                return Err(Error::InvalidArgument(format!(
                    "interface {:?}: MAC of {} bytes",
                    i.name,
                    i.mac.len()
                )));
            }
            if i.name.is_empty() || i.name.len() >= libc::IFNAMSIZ || i.name.contains('/') {
                return Err(Error::InvalidArgument(format!(
                    "interface name {:?}",
                    i.name
                )));
            }
            let routes = i
                .routes
                .iter()
                .map(|r| {
                    let destination = r
                        .destination
                        .as_ref()
                        .ok_or_else(|| {
                            Error::InvalidArgument("a route without a destination".into())
                        })
                        .and_then(net)?;
                    let gateway = match r.gateway.as_str() {
                        "" => None,
                        g => Some(
                            g.parse::<IpAddr>()
                                .map_err(|_| Error::InvalidArgument(format!("gateway {g:?}")))?,
                        ),
                    };
                    Ok(Route {
                        destination,
                        gateway,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Interface {
                name: i.name.clone(),
                index: 0,
                mac: i.mac.clone(),
                mtu: i.mtu,
                addresses: i.addresses.iter().map(net).collect::<Result<_>>()?,
                routes,
            })
        })
        .collect()
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A request's name for errors.
fn describe(m: &RouteNetlinkMessage) -> Option<String> {
    Some(match m {
        RouteNetlinkMessage::NewQueueDiscipline(t) => {
            format!("add the ingress qdisc of link {}", t.header.index)
        }
        RouteNetlinkMessage::DelQueueDiscipline(t) => {
            format!("delete the ingress qdisc of link {}", t.header.index)
        }
        RouteNetlinkMessage::NewTrafficFilter(t) => {
            format!("add the redirect filter of link {}", t.header.index)
        }
        RouteNetlinkMessage::SetLink(l) => format!("set link {}", l.header.index),
        RouteNetlinkMessage::NewAddress(a) => format!("add an address to link {}", a.header.index),
        RouteNetlinkMessage::NewRoute(_) => "add a route".into(),
        RouteNetlinkMessage::GetLink(_) => "list links".into(),
        RouteNetlinkMessage::GetAddress(_) => "list addresses".into(),
        RouteNetlinkMessage::GetRoute(_) => "list routes".into(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interface() -> Interface {
        Interface {
            name: "eth0".into(),
            index: 7,
            mac: vec![0x02, 0, 0, 0, 0, 1],
            mtu: 1450,
            addresses: vec![
                ("10.1.2.3".parse().unwrap(), 24),
                ("fd00::3".parse().unwrap(), 64),
            ],
            routes: vec![
                Route {
                    destination: ("0.0.0.0".parse().unwrap(), 0),
                    gateway: Some("10.1.2.1".parse().unwrap()),
                },
                Route {
                    destination: ("10.9.0.0".parse().unwrap(), 16),
                    gateway: None,
                },
            ],
        }
    }

    #[test]
    fn the_agent_call_carries_an_interface_whole() {
        let back = from_proto(&to_proto(&[interface()])).unwrap();
        assert_eq!(
            back,
            vec![Interface {
                index: 0,
                ..interface()
            }]
        );
    }

    #[test]
    fn a_malformed_interface_is_refused_naming_what() {
        type Spoil = fn(&mut NetworkInterface);
        let cases: [(Spoil, &str); 6] = [
            (|i| i.mac.truncate(3), "MAC of 3 bytes"),
            (|i| i.name = "a/b".into(), "interface name"),
            (|i| i.name = "x".repeat(16), "interface name"),
            (
                |i| i.addresses[0].ip = "10.1.2".into(),
                "address \"10.1.2\"",
            ),
            (|i| i.addresses[1].prefix_len = 129, "prefix length 129"),
            (|i| i.routes[0].gateway = "gw".into(), "gateway \"gw\""),
        ];
        for (spoil, want) in cases {
            let mut proto = to_proto(&[interface()]);
            spoil(&mut proto[0]);
            let e = from_proto(&proto).expect_err(want);
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
        let mut proto = to_proto(&[interface()]);
        proto[0].routes[1].destination = protobuf::MessageField::none();
        assert!(from_proto(&proto).is_err());
    }

    #[test]
    fn only_ipv6_link_local_addresses_are_link_local() {
        assert!(link_local(&"fe80::1".parse().unwrap()));
        assert!(link_local(&"febf::1".parse().unwrap()));
        assert!(!link_local(&"fec0::1".parse().unwrap()));
        assert!(!link_local(&"10.0.0.1".parse().unwrap()));
    }
}
