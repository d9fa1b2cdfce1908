//! What containerd prepares for a shim, laid out by hand: rootfs, bundle, events service,
//! stdio fifos; and the shim binary's `start` and `delete` actions run as containerd runs them.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use protobuf::well_known_types::any::Any;
use protobuf::Message;
use protocol::bootstrap::{BootstrapParams, Extension};
use protocol::events_ttrpc::create_events;
use protocol::shim::{CreateTaskRequest, DeleteResponse};
use sha2::{Digest, Sha256};

use super::events::EventSink;
use super::generation::Generation;
use super::lifecycle::{DIR_PREFIX, NAMESPACE};

/// What `start` printed and how it exited.
#[derive(Debug, Clone)]
pub struct StartOutput {
    pub success: bool,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// A fifo the runner reads like containerd's stdio copier, kept open for reading and writing
/// so it never reports EOF before the shim opens it.
struct FifoReader {
    path: PathBuf,
    data: Arc<Mutex<Vec<u8>>>,
}

impl FifoReader {
    fn new(path: PathBuf) -> Result<FifoReader, String> {
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| format!("mkfifo {}: {e}", path.display()))?;
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let data = Arc::new(Mutex::new(Vec::new()));
        let sink = data.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Ok(FifoReader { path, data })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// containerd's part of a shim's life, in a temp dir.
pub struct Playground {
    pub shim: PathBuf,
    pub generation: Generation,
    pub namespace: String,
    pub id: String,
    /// The stand-in for containerd's gRPC address: only hashed into the socket name.
    pub containerd_address: String,
    /// Where the events service listens (a plain path, as containerd passes it).
    pub ttrpc_address: String,
    pub events: EventSink,
    dir: tempfile::TempDir,
    server: Option<ttrpc::Server>,
    log: FifoReader,
    fifos: Mutex<Vec<FifoReader>>,
    /// The shim daemon's pid, once `Connect` told it.
    shim_pid: Mutex<Option<u32>>,
    /// The address `start` answered with, once it did.
    address: Mutex<Option<String>>,
    /// `CreateTaskRequest.rootfs`: none unless [`Playground::use_layered_rootfs`].
    rootfs_mounts: Mutex<Vec<protocol::mount::Mount>>,
    /// Environment the shim binary gets besides containerd's (`OTEL_*`).
    env: Mutex<Vec<(String, String)>>,
}

impl Playground {
    /// Lays out rootfs, bundle and events service for container `id`.
    pub fn new(shim: &Path, generation: Generation, id: &str) -> Result<Playground, String> {
        if !shim.is_file() {
            return Err(format!("shim binary {} not found", shim.display()));
        }
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        // A run killed before drop (a test ended at its time bound) is swept by the next.
        crate::containerd::write_owner(dir.path()).map_err(|e| e.to_string())?;
        let rootfs = dir.path().join("rootfs");
        busybox_rootfs(&rootfs)?;
        // containerd's layout, `<state>/<namespace>/<id>`: Go shims find the container by
        // the bundle directory's name in their `delete` action.
        let bundle = dir.path().join(NAMESPACE).join(id);
        // containerd always makes bundle/rootfs; shims unmount it in `delete`.
        fs::create_dir_all(bundle.join("rootfs")).map_err(|e| format!("create bundle: {e}"))?;
        let mut spec = spec(&rootfs, &["sh", "-c", "echo init-out; exec sleep 1000"]);
        spec["ociVersion"] = generation.oci_version().into();
        fs::write(bundle.join("config.json"), spec.to_string())
            .map_err(|e| format!("write config.json: {e}"))?;
        // containerd creates the shim log fifo before `start` and copies it to its own log;
        // Go shims open it and fail if it is missing.
        let log = FifoReader::new(bundle.join("log"))?;

        let events_sock = dir.path().join("events.sock");
        let sink = EventSink::default();
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", events_sock.display()))
            .map_err(|e| format!("bind events service: {e}"))?
            .register_service(create_events(Arc::new(sink.clone())));
        server
            .start()
            .map_err(|e| format!("start events service: {e}"))?;
        Ok(Playground {
            shim: shim.to_path_buf(),
            generation,
            namespace: NAMESPACE.into(),
            id: id.to_string(),
            containerd_address: dir.path().join("containerd.sock").display().to_string(),
            ttrpc_address: events_sock.display().to_string(),
            events: sink,
            dir,
            server: Some(server),
            log,
            fifos: Mutex::new(Vec::new()),
            shim_pid: Mutex::new(None),
            address: Mutex::new(None),
            rootfs_mounts: Mutex::new(Vec::new()),
            env: Mutex::new(Vec::new()),
        })
    }

    /// Where [`Playground::use_layered_rootfs`] keeps its image files.
    pub fn layers(&self) -> PathBuf {
        self.dir.path().join("layers")
    }

    /// Switches the container to [`RootfsLayout::Layered`]: makes `layer.erofs` from the
    /// busybox rootfs with `mkfs.erofs`, points the spec's `root.path` at `<bundle>/rootfs`,
    /// has the init write `/layered`, and sends the EROFS snapshotter's block-mode mounts.
    pub fn use_layered_rootfs(&self) -> Result<Vec<protocol::mount::Mount>, String> {
        use protocol::mount::Mount;
        let layers = self.layers();
        fs::create_dir_all(&layers).map_err(|e| format!("create {}: {e}", layers.display()))?;
        let erofs = layers.join("layer.erofs");
        let out = Command::new("mkfs.erofs")
            .args(["--quiet", "-Enoinline_data"])
            .arg(&erofs)
            .arg(self.rootfs())
            .output()
            .map_err(|e| format!("run mkfs.erofs (apt install erofs-utils): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mkfs.erofs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let config = self.bundle().join("config.json");
        let mut spec: serde_json::Value = fs::read(&config)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("read back config.json")?;
        spec["root"]["path"] = "rootfs".into();
        spec["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "echo layered > /layered; echo init-out; exec sleep 1000"
        ]);
        fs::write(&config, spec.to_string()).map_err(|e| format!("write config.json: {e}"))?;
        let m = |type_: &str, source: &Path, options: &[&str]| Mount {
            type_: type_.into(),
            source: source.display().to_string(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        };
        let mounts = vec![
            m(
                "mkfs/ext4",
                &layers.join("rwlayer.img"),
                &[
                    "X-containerd.mkfs.fs=ext4",
                    "X-containerd.mkfs.size=16777216",
                    "rw",
                    "loop",
                ],
            ),
            m("erofs", &erofs, &["ro", "loop"]),
            m(
                "format/mkdir/overlay",
                Path::new("overlay"),
                &[
                    "X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
                    "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
                    "workdir={{ mount 0 }}/work",
                    "upperdir={{ mount 0 }}/upper",
                    "lowerdir={{ mount 1 }}",
                ],
            ),
        ];
        *self.rootfs_mounts.lock().unwrap_or_else(|p| p.into_inner()) = mounts.clone();
        Ok(mounts)
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join(&self.namespace).join(&self.id)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// What the shim wrote to the bundle's `log` fifo so far.
    pub fn shim_log(&self) -> String {
        self.log.text()
    }

    /// The socket a shim following containerd's naming (sha256 of address/namespace/id under
    /// `/run/containerd/s`) binds for this container.
    pub fn default_socket(&self) -> PathBuf {
        let digest = Sha256::digest(
            format!("{}/{}/{}", self.containerd_address, self.namespace, self.id).as_bytes(),
        );
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// What containerd of this generation writes on `start`'s stdin.
    pub fn start_stdin(&self, options: Option<&Any>) -> Vec<u8> {
        match self.generation {
            Generation::V2_3 => {
                let mut p = BootstrapParams {
                    instance_id: self.id.clone(),
                    namespace: self.namespace.clone(),
                    containerd_version: "v2.3.0".into(),
                    containerd_ttrpc_address: self.ttrpc_address.clone(),
                    containerd_grpc_address: self.containerd_address.clone(),
                    containerd_binary: self.publish_binary(),
                    ..Default::default()
                };
                if let Some(o) = options {
                    p.extensions.push(Extension {
                        value: protobuf::MessageField::some(o.clone()),
                        ..Default::default()
                    });
                }
                p.write_to_bytes().unwrap_or_default()
            }
            _ => options
                .and_then(|o| o.write_to_bytes().ok())
                .unwrap_or_default(),
        }
    }

    fn publish_binary(&self) -> String {
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Runs `<shim> ... start` with this generation's flags, env and `stdin`.
    pub fn run_start(&self, stdin: &[u8]) -> Result<StartOutput, String> {
        let out = self.shim_command("start", stdin)?;
        Ok(out)
    }

    /// Runs `<shim> ... -bundle <bundle> delete` and decodes its `DeleteResponse`.
    pub fn run_delete_action(&self) -> Result<(StartOutput, Option<DeleteResponse>), String> {
        let out = self.shim_command("delete", &[])?;
        let resp = if out.success {
            DeleteResponse::parse_from_bytes(&out.stdout).ok()
        } else {
            None
        };
        Ok((out, resp))
    }

    fn shim_command(&self, action: &str, stdin: &[u8]) -> Result<StartOutput, String> {
        let mut cmd = Command::new(&self.shim);
        cmd.args(["-namespace", &self.namespace])
            .args(["-address", &self.containerd_address])
            .args(["-publish-binary", &self.publish_binary()])
            .args(["-id", &self.id]);
        if action == "delete" {
            cmd.args(["-bundle", &self.bundle().display().to_string()]);
        }
        cmd.arg(action).current_dir(self.bundle());
        for k in [
            "TTRPC_ADDRESS",
            "GRPC_ADDRESS",
            "NAMESPACE",
            "MAX_SHIM_VERSION",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("GOMAXPROCS", "2")
            .env("TTRPC_ADDRESS", &self.ttrpc_address);
        for (k, v) in self.env.lock().unwrap().iter() {
            cmd.env(k, v);
        }
        if self.generation != Generation::V1_6 {
            cmd.env("GRPC_ADDRESS", &self.containerd_address)
                .env("NAMESPACE", &self.namespace)
                .env("MAX_SHIM_VERSION", "2");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("run {} {action}: {e}", self.shim.display()))?;
        if let Some(mut w) = child.stdin.take() {
            let data = stdin.to_vec();
            // A shim that never reads stdin must not block us: write from a thread.
            std::thread::spawn(move || {
                let _ = std::io::Write::write_all(&mut w, &data);
            });
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait for {action}: {e}"))?;
        Ok(StartOutput {
            success: out.status.success(),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// Runs the shim binary with `key=value` in its environment, as if containerd had it.
    pub fn set_env(&self, key: &str, value: &str) {
        self.env
            .lock()
            .unwrap()
            .push((key.to_string(), value.to_string()));
    }

    /// A new fifo for a process's stdout or stderr, read in the background.
    pub fn fifo(&self, name: &str) -> Result<String, String> {
        let path = self.dir.path().join(name);
        let reader = FifoReader::new(path.clone())?;
        self.fifos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reader);
        Ok(path.display().to_string())
    }

    /// What arrived on the fifo named `name` so far.
    pub fn fifo_text(&self, name: &str) -> String {
        let path = self.dir.path().join(name);
        self.fifos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|f| f.path == path)
            .map(FifoReader::text)
            .unwrap_or_default()
    }

    /// A `CreateTaskRequest` for the init process with stdout/stderr on fresh fifos.
    pub fn create_request(&self, options: Option<&Any>) -> Result<CreateTaskRequest, String> {
        Ok(CreateTaskRequest {
            id: self.id.clone(),
            bundle: self.bundle().display().to_string(),
            stdout: self.fifo("init-stdout")?,
            stderr: self.fifo("init-stderr")?,
            options: options.cloned().into(),
            rootfs: self
                .rootfs_mounts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            ..Default::default()
        })
    }

    /// Remembers the daemon's pid so [`Drop`] can make sure it is gone.
    pub fn set_shim_pid(&self, pid: u32) {
        *self.shim_pid.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
    }

    pub fn shim_pid(&self) -> Option<u32> {
        *self.shim_pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The daemon serving the address `start` answered, found by its command line (it is
    /// started with `-socket ADDRESS`): for a walk that failed before `Connect` told it.
    pub fn daemon_pid(&self) -> Option<u32> {
        let address = self
            .address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let found = crate::checks::processes_mentioning(&format!("-socket {address}"));
        found.first().map(|(pid, _)| *pid as u32)
    }

    /// Remembers where the shim serves so [`Drop`] can remove a socket a killed shim left.
    pub fn set_address(&self, address: &str) {
        *self.address.lock().unwrap_or_else(|p| p.into_inner()) = Some(address.to_string());
    }
}

impl Drop for Playground {
    /// A failed run must not leave a daemon or container behind: SIGKILL the daemon (its
    /// container dies with its pid namespace), clean runc's state, stop the events service.
    fn drop(&mut self) {
        if let Some(pid) = self.shim_pid() {
            if process_alive(pid) {
                // SAFETY: plain kill(2) of a pid this playground's shim reported as its own.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let state = PathBuf::from("/run/containerd/runc")
            .join(&self.namespace)
            .join(&self.id);
        if state.exists() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(PathBuf::from("/run/containerd/runc").join(&self.namespace))
                .args(["delete", "--force", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let socket = self
            .address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .map(|a| PathBuf::from(a.trim_start_matches("unix://")))
            .unwrap_or_else(|| self.default_socket());
        if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let _ = fs::remove_file(&socket);
        }
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
    }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A busybox rootfs in `dir`: the static binary and a link per applet the run uses.
pub fn busybox_rootfs(dir: &Path) -> Result<(), String> {
    let busybox = Path::new(crate::image::BUSYBOX_BINARY);
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        fs::create_dir_all(dir.join(d)).map_err(|e| format!("create rootfs/{d}: {e}"))?;
    }
    let target = dir.join("bin/busybox");
    fs::copy(busybox, &target).map_err(|e| {
        format!(
            "copy {} (apt install busybox-static): {e}",
            busybox.display()
        )
    })?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod busybox: {e}"))?;
    for applet in [
        "sh", "echo", "sleep", "true", "cat", "ls", "kill", "hostname", "ip", "grep", "ping",
    ] {
        symlink("busybox", dir.join("bin").join(applet))
            .map_err(|e| format!("link {applet}: {e}"))?;
    }
    File::create(dir.join("etc/passwd")).map_err(|e| format!("create etc/passwd: {e}"))?;
    Ok(())
}

/// An OCI runtime spec like `runc spec`'s, running `args`, with `root.path` at `rootfs`.
pub fn spec(rootfs: &Path, args: &[&str]) -> serde_json::Value {
    let caps = serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs.display().to_string(), "readonly": false},
        "hostname": "conformance",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}
