//! The `start` action: find or spawn the daemon serving this container's group, and answer
//! containerd in the form its generation expects (see [`crate::bootstrap`]).

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::bootstrap::{StartInput, MAX_SHIM_VERSION_ENV, STDIN_LIMIT};
use crate::error::{Context, Result};
use crate::flags::Flags;
use crate::options::{self, RuntimeOptions};
use crate::rpc;
use crate::service::GROUP_SERVICE;
use crate::socket::{self, Bound};

/// Annotation that puts containers in one shim (containerd's runc shim honours it too).
pub const GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";

/// The key that decides which containers share a shim: the group annotation, else the
/// pod's sandbox id, else the container's own id. A bundle without a spec is a sandbox's
/// (containerd 2.x's `shim` sandboxer writes none): its own group.
pub fn group_id(bundle: &Path, id: &str) -> Result<String> {
    if !bundle.join("config.json").exists() {
        return Ok(id.to_string());
    }
    let spec = crate::bundle::spec(bundle)?;
    let annotation = |k: &str| {
        spec.get("annotations")
            .and_then(|a| a.get(k))
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    Ok(annotation(GROUP_ANNOTATION)
        .or_else(|| annotation(crate::pod::SANDBOX_ID))
        .unwrap_or_else(|| id.to_string()))
}

/// Runs `start` and returns what to print on stdout: the address, JSON or a
/// `BootstrapResult`, depending on what containerd wrote on stdin.
///
/// The runtime options on stdin are kept in the bundle: containerd 2.x's `shim` sandboxer
/// sends a sandbox's options only here (its `CreateSandbox` carries CRI's pod config), and
/// a container's `Create` keeps its own over them. `shim_cgroup` names the cgroup the daemon
/// must run in, from those options (see [`crate::Backend::shim_cgroup`]).
pub fn start<O: RuntimeOptions>(
    flags: &Flags,
    shim_cgroup: impl FnOnce(&O) -> Option<String>,
) -> Result<Vec<u8>> {
    // Read all of stdin first (containerd's writer must never block), and refuse bad input
    // before anything is bound or spawned.
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(STDIN_LIMIT)
        .read_to_end(&mut stdin)
        .context("read stdin")?;
    let max_shim_version = std::env::var(MAX_SHIM_VERSION_ENV).ok();
    let input = StartInput::read(&stdin, flags, max_shim_version.as_deref())?;
    let mut flags = flags.clone();
    input.apply(&mut flags);
    // Options `start` cannot read are for `Create` (or `CreateSandbox`) to refuse, with the
    // reason: the defaults until then.
    let cgroup = match options::decode::<O>(input.options()) {
        Ok(o) => {
            if input.options().is_some_and(|a| !a.value.is_empty()) {
                options::save(Path::new(&flags.bundle), &o)?;
            }
            shim_cgroup(&o)
        }
        Err(e) => {
            log::warn!("runtime options on stdin: {e}");
            None
        }
    };
    let tracing = options::tracing_env(input.options()).unwrap_or_else(|e| {
        log::warn!("tracing settings in the runtime options: {e}");
        Vec::new()
    });
    let address = start_daemon(&flags, input.socket_dir(), cgroup.as_deref(), &tracing)?;
    input.answer(&address)
}

/// Finds the live daemon of this container's group or spawns one; returns its address.
fn start_daemon(
    flags: &Flags,
    socket_dir: Option<&str>,
    cgroup: Option<&str>,
    env: &[(String, String)],
) -> Result<String> {
    let bundle = Path::new(&flags.bundle);
    let group = group_id(bundle, &flags.id)?;
    let address = socket::address(&flags.address, &flags.namespace, &group);
    // containerd 2.3 may name another directory (kept short for sun_path): same name, there.
    let address = match socket_dir {
        Some(dir) => {
            let name = socket::path(&address)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("unix://{}/{name}", dir.trim_end_matches('/'))
        }
        None => address,
    };
    // A daemon found may be exiting (its last container just went): it then refuses the
    // join, having already given up its name, so the next bind is ours.
    let held = socket::lock_dir(&address)?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match socket::bind(&address, &held)? {
            Bound::Existing => match join(&address, &flags.id) {
                Ok(()) => break,
                Err(e) if attempts < JOIN_ATTEMPTS => {
                    log::debug!("shim at {address} cannot take {}: {e}", flags.id);
                }
                Err(e) => return Err(e),
            },
            Bound::New(listener) => {
                if let Err(e) = spawn_daemon(flags, &address, listener.into(), cgroup, env) {
                    let _ = socket::remove(&address);
                    return Err(e);
                }
                break;
            }
        }
    }
    // containerd reads this back when it restarts and reconnects.
    fs::write(bundle.join("address"), &address).context("write address file")?;
    Ok(address)
}

/// How often `start` tries a group's socket that another shim answers but will not join.
const JOIN_ATTEMPTS: usize = 5;

/// Tells the group's daemon at `address` that containerd's `Create` of `id` is coming, so
/// it does not exit meanwhile ([`crate::service::GROUP_SERVICE`]). A daemon without that
/// service (an older build) is joined as before, unannounced.
fn join(address: &str, id: &str) -> Result<()> {
    let req = protocol::shim::ConnectRequest {
        id: id.to_string(),
        ..Default::default()
    };
    let joined = rpc::Client::connect(address)
        .and_then(|c| c.call(GROUP_SERVICE, "Join", &req, Duration::from_secs(10)));
    match joined {
        Err(e) if e.code() == ttrpc::Code::UNIMPLEMENTED => Ok(()),
        r => r.map(drop),
    }
}

/// Re-executes this binary as the daemon: its own session (a signal to containerd's process
/// group must not reach it), the bundle as cwd, the listener as fd 3, `env` over the
/// environment it inherits.
fn spawn_daemon(
    flags: &Flags,
    address: &str,
    listener: OwnedFd,
    cgroup: Option<&str>,
    env: &[(String, String)],
) -> Result<()> {
    let exe = std::env::current_exe().context("find own executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", address])
        .current_dir(&flags.bundle)
        // Under the bootstrap protocol these came on stdin, not in the env: hand them down
        // the way the daemon reads them.
        .env("TTRPC_ADDRESS", &flags.ttrpc_address)
        .env("GRPC_ADDRESS", &flags.grpc_address)
        .env("NAMESPACE", &flags.namespace)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    let fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == crate::serve::LISTENER_FD {
                libc::fcntl(fd, libc::F_SETFD, 0);
            } else if libc::dup2(fd, crate::serve::LISTENER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The daemon is not waited for: once `start` exits it is re-parented to containerd.
    let mut daemon = crate::reaper::spawn(&mut cmd).context("spawn shim daemon")?;
    // Before it serves anything: everything it starts is then accounted in the cgroup, and
    // inherits its OOM score.
    let placed = match cgroup {
        Some(path) => join_cgroup(path, daemon.id()),
        None => Ok(()),
    }
    .and_then(|()| crate::os::oom_score_above_parent(daemon.id()));
    if let Err(e) = placed {
        let _ = daemon.kill();
        let _ = daemon.wait();
        return Err(e);
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn join_cgroup(path: &str, pid: u32) -> Result<()> {
    crate::cgroups::join(path, pid)
}

/// cgroups are Linux's: elsewhere (a FreeBSD jail shim) asking for one is an error.
#[cfg(not(target_os = "linux"))]
fn join_cgroup(path: &str, _pid: u32) -> Result<()> {
    Err(crate::Error::Unimplemented(format!(
        "shim cgroup {path}: cgroups exist on Linux only"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    #[test]
    fn grouping_prefers_group_then_sandbox_then_id() {
        let b = bundle(
            r#"{"annotations":{"io.containerd.runc.v2.group":"g","io.kubernetes.cri.sandbox-id":"s"}}"#,
        );
        assert_eq!(group_id(b.path(), "c").unwrap(), "g");
        let b = bundle(r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"s"}}"#);
        assert_eq!(group_id(b.path(), "c").unwrap(), "s");
        let b = bundle(r#"{"ociVersion":"1.0.2"}"#);
        assert_eq!(group_id(b.path(), "c").unwrap(), "c");
    }

    #[test]
    fn malformed_config_is_a_clear_error() {
        let b = bundle("{ not json");
        let err = group_id(b.path(), "c").unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
