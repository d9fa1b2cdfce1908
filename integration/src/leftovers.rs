//! What killed test runs leave on the machine, found and removed.
//!
//! A test ended at its time bound (nextest kills its process group), a run interrupted by
//! hand, or a crashed harness never runs `Drop`: their private containerds' directories
//! (with a tmpfs, bundles, runc state, a CNI bridge), the shims they started (which left the
//! process group: shims are daemons), QEMU and its helpers, the conformance runner's
//! playgrounds and network namespaces stay behind. Each private containerd sweeps its
//! predecessors' directories when it starts; [`sweep`] does all of it at the start and end of
//! `make test` (the `shimtest-sweep` binary). Everything is matched by a path or name only
//! the harness uses, and only when its owner is gone, so a concurrent run is never touched.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::checks::processes_mentioning;
use crate::conformance;
use crate::containerd::{self, sweep_stale};

/// Where `ip netns add` keeps its named network namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// Name prefix of the network namespaces the conformance runner creates.
const NETNS_PREFIX: &str = "shimconf-";

/// The name the VM shim's binary has; a VM directory whose `shim.pid` names a live
/// process running it still belongs to a running shim.
const VM_SHIM_BINARY: &str = "containerd-shim-vm-v2";

/// Removes what earlier runs left; returns one line per process killed and thing removed.
pub fn sweep() -> Vec<String> {
    let (base, prefix) = containerd::temp_dirs();
    let mut done = sweep_stale(&base, prefix);
    done.extend(sweep_stale(&std::env::temp_dir(), conformance::DIR_PREFIX));
    done.extend(sweep_netns());
    done.extend(sweep_vm_dirs(Path::new(shim_vm::pod::RUN_DIR)));
    done
}

/// `shimconf-*` network namespaces no process is in (their runner died before dropping
/// them).
fn sweep_netns() -> Vec<String> {
    let mut done = Vec::new();
    let Ok(rd) = fs::read_dir(NETNS_DIR) else {
        return done;
    };
    let in_use = namespaces_in_use("net");
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(NETNS_PREFIX) {
            continue;
        }
        let used = fs::metadata(e.path()).is_ok_and(|m| in_use.contains(&(m.dev(), m.ino())));
        if used {
            continue;
        }
        let out = Command::new("ip")
            .args(["netns", "delete", &name])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => done.push(format!("deleted network namespace {name}")),
            Ok(o) => done.push(format!(
                "ip netns delete {name}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => done.push(format!("running ip netns delete {name}: {e}")),
        }
    }
    done
}

/// `(device, inode)` of every `kind` namespace some process is in.
fn namespaces_in_use(kind: &str) -> Vec<(u64, u64)> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| fs::metadata(e.path().join("ns").join(kind)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// VM runtime directories (`/run/shim-vm/<hash>`) whose shim is gone: the VM's processes
/// (QEMU, virtiofsd, vhost-device-vsock, which outlive a SIGKILLed shim) are killed and the
/// directory removed, as the VM shim's own `delete` action does. A directory without a
/// recorded shim is left alone while it is young (a VM still booting).
fn sweep_vm_dirs(run_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(rd) = fs::read_dir(run_dir) else {
        return done;
    };
    for e in rd.filter_map(Result::ok) {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let live = match shim_vm::pod::owner_pid(&dir) {
            Some(pid) => runs(pid, VM_SHIM_BINARY),
            None => young(&dir, Duration::from_secs(600)),
        };
        if live {
            continue;
        }
        let before = processes_mentioning(&dir.to_string_lossy());
        shim_vm::pod::cleanup_dir(&dir);
        for (pid, cmd) in before {
            done.push(format!("killed pid {pid} of {}: {cmd}", dir.display()));
        }
        if dir.exists() {
            done.push(format!("could not remove {}", dir.display()));
        } else {
            done.push(format!("removed {}", dir.display()));
        }
    }
    done
}

/// Whether `pid` runs an executable named `binary`.
fn runs(pid: u32, binary: &str) -> bool {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .is_some_and(|exe| exe.file_name().is_some_and(|n| n == binary))
}

fn young(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed < age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_dir_without_a_live_shim_is_removed_and_one_with_a_live_shim_stays() {
        let run = tempfile::tempdir().expect("tempdir");
        // Owned by a pid that runs something else (this test): stale.
        let stale = run.path().join("aa");
        fs::create_dir(&stale).expect("mkdir");
        fs::write(stale.join("shim.pid"), std::process::id().to_string()).expect("write");
        fs::write(stale.join("qemu.log"), "x").expect("write");
        // No shim recorded yet and just made: a VM still booting.
        let booting = run.path().join("bb");
        fs::create_dir(&booting).expect("mkdir");
        let done = sweep_vm_dirs(run.path());
        assert!(!stale.exists(), "{done:?}");
        assert!(booting.exists(), "{done:?}");
        assert_eq!(done, vec![format!("removed {}", stale.display())]);
    }

    #[test]
    fn our_own_network_namespace_counts_as_in_use() {
        let me = fs::metadata("/proc/self/ns/net").expect("own netns");
        assert!(namespaces_in_use("net").contains(&(me.dev(), me.ino())));
    }
}
