//! Pod networking's host side for real (root): the test makes two network namespaces of its
//! own, a "pod" one with a CNI-like `eth0` and a "bridge" one holding the veth's peer, on a
//! private subnet. [`PodNetwork::attach`] joins the pod's `eth0` to a tap; frames written
//! into the tap (as the guest's virtio-net device would send them) come out at the peer, and
//! frames the peer sends come out of the tap. Nothing of it reaches the host's namespace,
//! whose own namespace is refused outright, and `detach` leaves nothing in the pod's.
//! What `attach` reads, sent as the agent call carries it, `configure` sets up the same in
//! another namespace (as the guest does on its virtio-net device).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use shim_vm::network::{self, Interface, PodNetwork, Route, TAP_NAME};

/// An ethertype for local experiments (IEEE 802), which nothing else here sends.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// `struct virtio_net_hdr`: what a tap with `IFF_VNET_HDR` puts before each frame.
const VNET_HDR: usize = 10;
const WAIT: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace the test made (`ip netns add`), deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        // `shimconf-`: the leftovers sweep removes such namespaces that no process is in.
        let name = format!("shimconf-net{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        NetNs(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// `args` run inside the namespace.
    fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// What the host's own namespace shows of links, addresses, routes and qdiscs.
fn host_network() -> String {
    [
        run(&["ip", "-o", "link", "show"]),
        run(&["ip", "-o", "addr", "show"]),
        run(&["ip", "route", "show", "table", "all"]),
        run(&["tc", "qdisc", "show"]),
    ]
    .join("\n")
}

/// A raw socket on interface `ifname` of `ns`, for the frames of [`ETHERTYPE`].
fn packet_socket(ns: &NetNs, ifname: &str) -> OwnedFd {
    let file = std::fs::File::open(ns.path()).unwrap();
    let ifname = std::ffi::CString::new(ifname).unwrap();
    std::thread::spawn(move || unsafe {
        assert_eq!(libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET), 0);
        let proto = u16::from_be_bytes(ETHERTYPE).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
        assert!(addr.sll_ifindex > 0);
        let bound = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(bound, 0, "{}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    })
    .join()
    .unwrap()
}

/// An Ethernet frame of [`ETHERTYPE`] from `src` to everyone, carrying `payload`.
fn frame(src: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f
}

/// Reads frames from `fd` (skipping `skip` bytes of header each) until one carries
/// `payload`, or [`WAIT`] passes.
fn receives(fd: &OwnedFd, skip: usize, payload: &[u8]) -> bool {
    let deadline = Instant::now() + WAIT;
    let mut file = std::fs::File::from(fd.try_clone().unwrap());
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 200) } <= 0 {
            continue;
        }
        let n = file.read(&mut buf).unwrap();
        if n > skip + 14
            && buf[skip + 12..skip + 14] == ETHERTYPE
            && buf[skip + 14..n].starts_with(payload)
        {
            return true;
        }
    }
    false
}

#[test]
fn a_pod_interface_and_its_tap_carry_frames_both_ways_and_leave_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let before = host_network();
    let pod = NetNs::new("pod");
    let bridge = NetNs::new("br");
    pod.run(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", &bridge.0,
    ]);
    pod.run(&["ip", "addr", "add", "10.250.7.2/24", "dev", "eth0"]);
    pod.run(&["ip", "link", "set", "eth0", "up"]);
    pod.run(&["ip", "route", "add", "default", "via", "10.250.7.1"]);
    bridge.run(&["ip", "addr", "add", "10.250.7.1/24", "dev", "peer0"]);
    bridge.run(&["ip", "link", "set", "peer0", "up"]);

    let net = PodNetwork::attach(&pod.path(), "eth0").expect("attach");
    let i = &net.interface;
    assert_eq!((i.name.as_str(), i.mtu, i.mac.len()), ("eth0", 1500, 6));
    assert!(
        i.addresses
            .contains(&("10.250.7.2".parse::<IpAddr>().unwrap(), 24)),
        "{i:?}"
    );
    assert!(
        i.routes.contains(&Route {
            destination: ("0.0.0.0".parse().unwrap(), 0),
            gateway: Some("10.250.7.1".parse().unwrap()),
        }),
        "{i:?}"
    );
    let links = pod.run(&["ip", "-o", "link", "show"]);
    assert!(links.contains(TAP_NAME), "{links}");
    for dev in ["eth0", TAP_NAME] {
        let filters = pod.run(&["tc", "filter", "show", "dev", dev, "ingress"]);
        assert!(filters.contains("mirred"), "{dev}: {filters}");
    }

    // Guest → pod network: a frame into the tap leaves by eth0 and reaches the peer.
    let peer = packet_socket(&bridge, "peer0");
    let mut tap = std::fs::File::from(net.tap.try_clone().unwrap());
    let mut out = vec![0u8; VNET_HDR];
    out.extend(frame(&i.mac, b"from the guest"));
    tap.write_all(&out).unwrap();
    assert!(
        receives(&peer, 0, b"from the guest"),
        "the peer saw nothing"
    );
    // Pod network → guest: the peer's frame comes out of the tap.
    let mut peer_file = std::fs::File::from(peer.try_clone().unwrap());
    peer_file
        .write_all(&frame(&[0x02, 0, 0, 0, 0, 1], b"to the guest"))
        .unwrap();
    assert!(
        receives(&net.tap, VNET_HDR, b"to the guest"),
        "the tap saw nothing"
    );

    // QEMU's copy of the tap's file goes with QEMU; the test's goes here.
    drop((tap, peer_file, peer));
    net.detach().expect("detach");
    let links = pod.run(&["ip", "-o", "link", "show"]);
    assert!(!links.contains(TAP_NAME), "the tap is left: {links}");
    let qdiscs = pod.run(&["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "a qdisc is left: {qdiscs}");
    drop((pod, bridge));
    let after = host_network();
    for ours in [TAP_NAME, "peer0", "10.250.7."] {
        assert!(!after.contains(ours), "{ours} in the host's namespace");
    }
    let ingress = |s: &str| s.lines().filter(|l| l.contains("ingress")).count();
    assert_eq!(ingress(&before), ingress(&after), "host qdiscs changed");
}

#[test]
fn the_host_s_own_namespace_is_refused_and_left_as_it_was() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let before = run(&["ip", "-o", "link", "show"]);
    for path in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
        let e = PodNetwork::attach(std::path::Path::new(path), "eth0")
            .expect_err("the host's namespace was taken");
        assert!(e.to_string().contains("host's own"), "{path}: {e}");
    }
    let e = PodNetwork::attach(std::path::Path::new("/nonexistent/netns"), "eth0")
        .expect_err("a missing namespace was taken");
    assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
    // A namespace of the test's own without the interface: refused, naming it.
    let empty = NetNs::new("empty");
    let e = PodNetwork::attach(&empty.path(), "eth0").expect_err("no eth0 there");
    assert!(e.to_string().contains("eth0"), "{e}");
    assert!(!empty.run(&["ip", "-o", "link", "show"]).contains(TAP_NAME));
    // Other tests may add links of their own meanwhile: none of ours is there.
    let after = run(&["ip", "-o", "link", "show"]);
    assert!(
        !after.contains(TAP_NAME) && !before.contains(TAP_NAME),
        "{after}"
    );
}

/// `f` on a thread inside `ns`.
fn in_ns<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns.path()).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd, for this thread only.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

/// `ip` output of `dev` in `ns` with what differs between two hosts' copies left out
/// (interface indexes, the kernel's link-local addresses and their routes, lifetimes).
fn shown(ns: &NetNs, args: &[&str]) -> Vec<String> {
    ns.run(args)
        .lines()
        .map(|l| {
            l.split_whitespace()
                .take_while(|w| *w != "\\")
                .filter(|w| {
                    w.strip_suffix(':')
                        .is_none_or(|n| n.parse::<u32>().is_err())
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|l| !l.contains("fe80") && !l.is_empty())
        .collect()
}

#[test]
fn what_the_host_reads_the_guest_sets_up_the_same() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let pod = NetNs::new("cfgpod");
    let bridge = NetNs::new("cfgbr");
    pod.run(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", &bridge.0,
    ]);
    pod.run(&["ip", "link", "set", "eth0", "mtu", "1400", "up"]);
    pod.run(&["ip", "addr", "add", "10.250.8.2/24", "dev", "eth0"]);
    pod.run(&[
        "ip",
        "addr",
        "add",
        "fd00:250::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.run(&["ip", "route", "add", "default", "via", "10.250.8.1"]);
    pod.run(&["ip", "route", "add", "10.99.0.0/16", "via", "10.250.8.254"]);
    pod.run(&["ip", "route", "add", "10.98.0.0/16", "dev", "eth0"]);
    pod.run(&["ip", "-6", "route", "add", "default", "via", "fd00:250::1"]);
    let net = PodNetwork::attach(&pod.path(), "eth0").expect("attach");
    let read = net.interface.clone();
    net.detach().expect("detach");

    // The guest: a device with the pod's MAC, under the kernel's name for it.
    let guest = NetNs::new("cfgguest");
    let mac = network::mac_text(&read.mac);
    guest.run(&[
        "ip", "link", "add", "vnet0", "address", &mac, "type", "veth", "peer", "name", "vpeer",
    ]);
    let sent = network::from_proto(&network::to_proto(std::slice::from_ref(&read))).unwrap();
    assert_eq!(
        sent,
        vec![Interface {
            index: 0,
            ..read.clone()
        }],
        "the agent call lost something"
    );
    in_ns(&guest, move || network::configure(&sent, WAIT)).expect("configure");

    for args in [
        &["ip", "-o", "-4", "addr", "show", "dev", "eth0"][..],
        &[
            "ip", "-o", "-6", "addr", "show", "dev", "eth0", "scope", "global",
        ],
        &["ip", "-4", "route", "show"],
        &["ip", "-6", "route", "show"],
    ] {
        assert_eq!(shown(&guest, args), shown(&pod, args), "{args:?}");
    }
    let link = guest.run(&["ip", "-o", "link", "show", "dev", "eth0"]);
    assert!(
        link.contains("mtu 1400") && link.contains(&mac) && link.contains(",UP"),
        "{link}"
    );
    // Configured again (a retried call): nothing changes, nothing fails.
    let again = vec![Interface { index: 0, ..read }];
    in_ns(&guest, move || network::configure(&again, WAIT)).expect("configure again");

    // A device that never comes: a clear error, in time.
    let absent = vec![Interface {
        name: "eth1".into(),
        index: 0,
        mac: vec![0x02, 0, 0, 0, 0x0b, 0xad],
        mtu: 1500,
        addresses: Vec::new(),
        routes: Vec::new(),
    }];
    let started = Instant::now();
    let e = in_ns(&guest, move || {
        network::configure(&absent, Duration::from_millis(200))
    })
    .expect_err("configured a device that does not exist");
    assert!(e.to_string().contains("02:00:00:00:0b:ad"), "{e}");
    assert!(started.elapsed() < WAIT);
}
