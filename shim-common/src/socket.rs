//! Where a shim daemon listens, and binding that place without races.
//!
//! The name is containerd's: `unix:///run/containerd/s/<hex sha256 of address/namespace/group>`.
//! The `start` process binds the socket itself and hands the listener to the daemon as an
//! inherited fd, so containerd can connect the moment `start` prints the address.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::error::{Context, Result};

/// containerd's state directory; sockets live in its `s/` subdirectory.
pub const DEFAULT_SOCKET_ROOT: &str = "/run/containerd";

/// The socket address containerd expects for a shim of `group` in `namespace`.
pub fn address(containerd_address: &str, namespace: &str, group: &str) -> String {
    address_in(
        Path::new(DEFAULT_SOCKET_ROOT),
        containerd_address,
        namespace,
        group,
    )
}

/// [`address`] with another state directory, for hosts that do not use `/run/containerd`.
pub fn address_in(root: &Path, containerd_address: &str, namespace: &str, group: &str) -> String {
    // Go's filepath.Join(address, ns, id): one separator between parts.
    let joined = format!(
        "{}/{}/{}",
        containerd_address.trim_end_matches('/'),
        namespace.trim_matches('/'),
        group.trim_matches('/')
    );
    let digest = Sha256::digest(joined.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("unix://{}/s/{hex}", root.display())
}

/// The filesystem path behind a `unix://` address.
pub fn path(address: &str) -> PathBuf {
    PathBuf::from(address.strip_prefix("unix://").unwrap_or(address))
}

/// Held while a process decides who owns a socket name in the directory (`start` binding
/// or taking it over, the `delete` action removing a dead shim's): such a decision is a
/// check, then an act, and another process acting in between would remove a socket just
/// bound — orphaning the shim behind it. A lock on the directory itself leaves no lock
/// files behind. A daemon removing its own socket needs no lock: while it listens no one
/// else can decide the name is dead.
pub struct DirLock(#[allow(dead_code)] Flock<fs::File>);

/// Takes [`DirLock`] on the directory of `address`, creating it (mode 0700) if needed.
pub fn lock_dir(address: &str) -> Result<DirLock> {
    let path = path(address);
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create socket directory {}", dir.display()))?;
    let file = fs::File::open(dir).with_context(|| format!("open {}", dir.display()))?;
    loop {
        match Flock::lock(
            file.try_clone().context("dup directory fd")?,
            FlockArg::LockExclusive,
        ) {
            Ok(lock) => return Ok(DirLock(lock)),
            Err((_, nix::Error::EINTR)) => continue,
            Err((_, e)) => return Err(e).with_context(|| format!("lock {}", dir.display())),
        }
    }
}

/// Outcome of [`bind`].
pub enum Bound {
    /// We own the socket now; hand the listener to the daemon.
    New(UnixListener),
    /// A live shim already serves this address (a second container of the same group).
    Existing,
}

/// Binds `address`, replacing a stale socket left by a dead shim, or reports that a live
/// shim already answers there. Only under the directory's lock ([`lock_dir`]).
pub fn bind(address: &str, _held: &DirLock) -> Result<Bound> {
    let path = path(address);
    match listen(&path) {
        Ok(l) => Ok(Bound::New(l)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if answers(address) {
                return Ok(Bound::Existing);
            }
            // Nobody answers: a shim died without cleaning up. Take the name over.
            remove(address)?;
            Ok(Bound::New(
                listen(&path).with_context(|| format!("bind {}", path.display()))?,
            ))
        }
        Err(e) => Err(e).with_context(|| format!("bind {}", path.display())),
    }
}

fn listen(path: &Path) -> io::Result<UnixListener> {
    let l = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// How long [`answers`] waits for a reply.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a live server answers at `address`: a ttrpc call (to a method no one serves) gets
/// a reply. A successful `connect` alone proves nothing: a dying shim's listener takes
/// connections until its last thread has closed the fd table, after its pid is a zombie.
pub fn answers(address: &str) -> bool {
    let Ok(client) = crate::rpc::Client::connect(address) else {
        return false;
    };
    let probe = protobuf::well_known_types::empty::Empty::new();
    match client.call("shim.liveness", "Probe", &probe, ANSWER_TIMEOUT) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.code(),
            ttrpc::Code::DEADLINE_EXCEEDED | ttrpc::Code::UNAVAILABLE
        ),
    }
}

/// Removes the socket file of `address`; a missing file is not an error.
pub fn remove(address: &str) -> Result<()> {
    let path = path(address);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove socket {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_addresses_are_a_hash_under_containerds_s_dir() {
        let a = address("/run/containerd/containerd.sock", "default", "c1");
        let dir = "unix:///run/containerd/s/";
        assert!(a.starts_with(dir) && a.len() == dir.len() + 64, "{a}");
    }

    #[test]
    fn address_is_deterministic_and_group_scoped() {
        let a = address("/run/containerd/containerd.sock", "default", "g");
        assert_eq!(
            a,
            address("/run/containerd/containerd.sock/", "default", "g")
        );
        assert_ne!(
            a,
            address("/run/containerd/containerd.sock", "default", "h")
        );
        assert_ne!(a, address("/run/containerd/containerd.sock", "other", "g"));
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_reused() {
        let dir = tempfile::tempdir().unwrap();
        let addr = address_in(dir.path(), "/c.sock", "ns", "g");
        let held = lock_dir(&addr).unwrap();
        let first = match bind(&addr, &held).unwrap() {
            Bound::New(l) => l,
            Bound::Existing => panic!("nothing listens yet"),
        };
        // Listening but never answering, as a shim in its last moments: not live.
        let silent = first.try_clone().unwrap();
        assert!(!answers(&addr));
        // A ttrpc server there, even one serving nothing: live.
        crate::rpc::Server::new(Default::default())
            .spawn(Some(first), Vec::new())
            .unwrap();
        assert!(answers(&addr));
        assert!(matches!(bind(&addr, &held).unwrap(), Bound::Existing));
        drop(silent);
        let _ = fs::remove_file(path(&addr));
        // The socket file left behind, like after a SIGKILLed shim.
        drop(UnixListener::bind(path(&addr)).unwrap());
        assert!(path(&addr).exists());
        assert!(matches!(bind(&addr, &held).unwrap(), Bound::New(_)));
        let mode = fs::metadata(path(&addr).parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
