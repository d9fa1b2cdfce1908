//! The Wasm backend: mount the rootfs, find the module (image layer or `args[0]`), compile or
//! fetch its artifact, and let libcontainer make a container whose init runs it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use protobuf::well_known_types::any::Any;
use shim_common::cgroups::Cgroup;
use shim_common::mount::{unmount_all, BundleRootfs};
use shim_common::{
    Backend, Context, CreateRequest, Error, ExecRequest, Result, ShimContext, Target,
};
use wasmtime::Engine;

use crate::engine::{self, Kind};
use crate::entrypoint::{self, Entrypoint, Workload};
use crate::executor::WasmExecutor;
use crate::guest::Guest;
use crate::image::Images;
use crate::precompiled::{ArtifactStore, Cache, Source};
use crate::youki::Youki;

struct Container {
    bundle: PathBuf,
    /// The rootfs as the host sees it (for exec's lookup).
    rootfs: PathBuf,
    init_pid: u32,
    state: Mutex<libcontainer::container::Container>,
    /// Whether we mounted `bundle/rootfs` (and so must unmount it).
    mounted: bool,
}

pub struct WasmBackend {
    youki: Youki,
    cache: Cache,
    images: Images,
    /// Made on first use: a shim running only native containers never loads wasmtime.
    engine: OnceLock<Engine>,
    /// Held while the shim forks libcontainer's helper (see `fork`), while wasmtime
    /// compiles in the shim, and by `start`, which changes the process's cwd that a fork
    /// copies (see [`Youki::start`]).
    fork: Mutex<()>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl WasmBackend {
    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    fn engine(&self) -> Result<&Engine> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let e = engine::engine()?;
        Ok(self.engine.get_or_init(|| e))
    }

    /// What the init will run: `None` for a native entrypoint, or the guest with its
    /// artifact opened (the fd must outlive the clone).
    fn guest(
        &self,
        id: &str,
        bundle: &Path,
        spec: &Spec,
        rootfs: &Path,
    ) -> Result<Option<(Guest, OwnedFd)>> {
        let process = spec.process().as_ref();
        let args = process.and_then(|p| p.args().clone()).unwrap_or_default();
        let func = args.first().and_then(|a| Entrypoint::parse(a).func);
        // containerd unreachable must not stop native containers or rootfs modules; a Wasm
        // image that cannot run (no Wasm layer) must stop this one.
        let layer = match self.images.wasm_layer(id) {
            Ok(layer) => layer,
            Err(e @ Error::InvalidArgument(_)) => return Err(e),
            Err(e) => {
                log::warn!("{id}: cannot read the container's image ({e}); using the rootfs");
                None
            }
        };
        let rootfs_module;
        let (kind, bytes, digest, store): (Kind, &[u8], String, Option<&dyn ArtifactStore>) =
            match &layer {
                Some(l) => {
                    log::info!(
                        "{id}: running {} from image {}",
                        l.layer().digest,
                        l.image_name()
                    );
                    (l.kind, &l.layer().bytes, l.layer().digest.clone(), Some(l))
                }
                None => match entrypoint::classify(&args, path_env(process), rootfs)? {
                    Workload::Native => return Ok(None),
                    Workload::Wasm { bytes, .. } => {
                        rootfs_module = bytes;
                        let b = rootfs_module.as_slice();
                        (Kind::of(b), b, engine::digest(b), None)
                    }
                },
            };
        let src = Source {
            kind,
            bytes,
            digest,
            func: func.as_deref(),
            store,
        };
        let artifact = {
            let _fork = self.fork.lock().unwrap_or_else(PoisonError::into_inner);
            self.cache.prepare(self.engine()?, &src, bundle)?
        };
        let fd: OwnedFd = File::open(&artifact)
            .with_context(|| format!("open {}", artifact.display()))?
            .into();
        let guest = Guest {
            id: id.to_string(),
            kind,
            artifact_fd: fd.as_raw_fd(),
            func,
        };
        Ok(Some((guest, fd)))
    }
}

fn path_env(process: Option<&Process>) -> Option<&str> {
    process?
        .env()
        .as_ref()?
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
}

fn load_spec(bundle: &Path) -> Result<Spec> {
    Spec::load(bundle.join("config.json"))
        .map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))
}

/// The spec's root as a host path (relative roots are relative to the bundle).
fn rootfs_of(spec: &Spec, bundle: &Path) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    bundle.join(root)
}

impl Backend for WasmBackend {
    fn new(ctx: &ShimContext) -> Result<Self> {
        crate::log::init(ctx.debug);
        let youki = Youki::new(&ctx.namespace);
        let cache = Cache::new(youki.root().join("precompiled"));
        Ok(WasmBackend {
            youki,
            cache,
            images: Images::new(&ctx.address, &ctx.namespace),
            engine: OnceLock::new(),
            fork: Mutex::new(()),
            containers: Mutex::new(HashMap::new()),
        })
    }

    fn create(&self, req: CreateRequest<'_>) -> Result<u32> {
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented("restore from a checkpoint".into()));
        }
        let spec = load_spec(req.bundle)?;
        let rootfs_mount = BundleRootfs::mount(req.bundle, req.rootfs)?;
        let rootfs = rootfs_of(&spec, req.bundle);
        let guest = match self.guest(req.id, req.bundle, &spec, &rootfs) {
            Ok(g) => g,
            Err(e) => {
                self.cache.release(req.bundle);
                return Err(e);
            }
        };
        let (guest, artifact_fd) = match guest {
            Some((g, fd)) => (Some(g), Some(fd)),
            None => (None, None),
        };
        let created = {
            let _fork = self.fork.lock().unwrap_or_else(PoisonError::into_inner);
            self.youki.create(
                req.id,
                req.bundle,
                req.stdio,
                req.console_socket,
                WasmExecutor { guest },
            )
        };
        // The init holds its own copy now.
        drop(artifact_fd);
        let (state, pid) = match created {
            Ok(c) => c,
            Err(e) => {
                self.cache.release(req.bundle);
                return Err(e);
            }
        };
        let container = Container {
            bundle: req.bundle.to_path_buf(),
            rootfs,
            init_pid: pid,
            state: Mutex::new(state),
            mounted: rootfs_mount.keep(),
        };
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(req.id.to_string(), Arc::new(container));
        Ok(pid)
    }

    fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let mut state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
        let _fork = self.fork.lock().unwrap_or_else(PoisonError::into_inner);
        self.youki.start(&mut state)?;
        Ok(c.init_pid)
    }

    fn exec(&self, req: ExecRequest<'_>) -> Result<u32> {
        let c = self.get(req.id)?;
        let process: Process = serde_json::from_slice(req.spec)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        let args = process.args().clone().unwrap_or_default();
        // Only a program the kernel can execute runs beside a guest; say so up front
        // rather than let a tenant process fail inside the container.
        match entrypoint::classify(&args, path_env(Some(&process)), &c.rootfs)? {
            Workload::Wasm { entry, .. } => {
                return Err(Error::Unimplemented(format!(
                    "exec of Wasm module {:?}: exec runs native programs only",
                    entry.path
                )))
            }
            Workload::Native => {}
        }
        let arg0 = args.first().map(String::as_str).unwrap_or_default();
        let found = entrypoint::find(arg0, path_env(Some(&process)), &c.rootfs).is_some();
        if !found {
            return Err(Error::FailedPrecondition(format!(
                "exec: {arg0:?} not found in the container's rootfs (a Wasm container can exec only native programs it ships)"
            )));
        }
        let file = c.bundle.join(format!("exec-{}.json", req.exec_id));
        std::fs::write(&file, req.spec).with_context(|| format!("write {}", file.display()))?;
        let pid = {
            let _fork = self.fork.lock().unwrap_or_else(PoisonError::into_inner);
            self.youki
                .exec(req.id, &file, req.stdio, req.console_socket)
        };
        let _ = std::fs::remove_file(&file);
        pid
    }

    fn kill(&self, id: &str, target: Target<'_>, signal: u32, all: bool) -> Result<()> {
        let c = self.get(id)?;
        let (pid, what) = match target {
            Target::Init if all => {
                return Youki::kill_all(
                    &mut c.state.lock().unwrap_or_else(PoisonError::into_inner),
                    signal,
                )
            }
            Target::Init => (c.init_pid, format!("container {id}")),
            Target::Exec { exec_id, pid } => (pid, format!("exec {exec_id}")),
        };
        let sig = Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("signal {signal}")))?;
        kill(Pid::from_raw(pid as i32), sig).map_err(|e| match e {
            nix::Error::ESRCH => Error::NotFound(format!("{what}: process already finished")),
            e => Error::Sys {
                context: format!("kill {what}"),
                source: e,
            },
        })
    }

    fn delete(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        self.youki.delete(id)?;
        self.cache.release(&c.bundle);
        if c.mounted {
            unmount_all(&c.bundle.join("rootfs"))?;
        }
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        Ok(())
    }

    fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        let dir = match Cgroup::of(c.init_pid) {
            Ok(Cgroup::V2(dir)) => dir,
            Ok(Cgroup::V1(dirs)) => match ["pids", "memory", "cpu", "devices"]
                .iter()
                .find_map(|k| dirs.get(*k))
            {
                Some(d) => d.clone(),
                None => return Ok(vec![c.init_pid]),
            },
            // The init is gone: so is every process of its pid namespace.
            Err(_) => return Ok(Vec::new()),
        };
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
            .with_context(|| format!("read {}/cgroup.procs", dir.display()))?;
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    fn update(&self, id: &str, resources: Option<&Any>) -> Result<()> {
        let json = shim_common::backend::linux_resources(resources)?;
        let resources: LinuxResources = serde_json::from_slice(json)
            .map_err(|e| Error::InvalidArgument(format!("update resources: {e}")))?;
        let c = self.get(id)?;
        let state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
        Youki::update(&state, &resources)
    }

    fn pause(&self, id: &str) -> Result<()> {
        Youki::pause(
            &mut self
                .get(id)?
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn resume(&self, id: &str) -> Result<()> {
        Youki::resume(
            &mut self
                .get(id)?
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn cleanup(ctx: &ShimContext, id: &str, bundle: &Path) -> Result<()> {
        let youki = Youki::new(&ctx.namespace);
        let result = youki.delete(id);
        Cache::new(youki.root().join("precompiled")).release(bundle);
        // Unmount even if libcontainer failed: a leaked mount outlives everything else.
        unmount_all(&bundle.join("rootfs"))?;
        result
    }
}
