//! The Wasm backend: mount the rootfs, find the module (image layer or `args[0]`), compile or
//! fetch its artifact, and let libcontainer make a container whose init runs it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use oci_spec::runtime::{LinuxResources, Process, Spec};
use shim_common::cgroups::Cgroup;
use shim_common::host_pods::HostPods;
use shim_common::sandbox::Sandboxes;
use shim_common::trace;
use shim_common::{
    Backend, Context, CreateRequest, Created, Error, ExecRequest, Result, ShimContext, Signal,
    Target,
};
use wasmtime::Engine;

use crate::engine::{self, Kind};
use crate::entrypoint::{self, Entrypoint, Workload};
use crate::executor::WasmExecutor;
use crate::guest::Guest;
use crate::image::Images;
use crate::precompiled::{ArtifactStore, Cache, Source};
use crate::youki::Youki;

pub struct Container {
    id: String,
    bundle: PathBuf,
    /// The rootfs as the host sees it (for exec's lookup).
    rootfs: PathBuf,
    init_pid: u32,
    state: Mutex<libcontainer::container::Container>,
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
    /// Pods of containerd 2.x's sandbox API: namespaces held without a pause container.
    pods: HostPods,
}

impl WasmBackend {
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
            let _span = trace::span("wasm prepare");
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
    type Container = Container;
    type Options = ();

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
            pods: HostPods::default(),
        })
    }

    fn create(&self, req: CreateRequest<'_, ()>) -> Result<Created<Container>> {
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented("restore from a checkpoint".into()));
        }
        let mut spec = load_spec(req.bundle)?;
        if crate::cgroup_mount::adapt(&mut spec)? {
            // libcontainer reads the spec from the bundle alone.
            let path = req.bundle.join("config.json");
            spec.save(&path)
                .map_err(|e| Error::Runtime(format!("write {}: {e}", path.display())))?;
            log::info!(
                "{}: /sys/fs/cgroup as bind mounts (joins a pid namespace)",
                req.id
            );
        }
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
            let _span = trace::span("libcontainer create");
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
            id: req.id.to_string(),
            bundle: req.bundle.to_path_buf(),
            rootfs,
            init_pid: pid,
            state: Mutex::new(state),
        };
        Ok(Created {
            container,
            pid: Some(pid),
        })
    }

    fn start(&self, c: &Container) -> Result<u32> {
        let mut state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
        let _span = trace::span("libcontainer start");
        let _fork = self.fork.lock().unwrap_or_else(PoisonError::into_inner);
        self.youki.start(&mut state)?;
        Ok(c.init_pid)
    }

    fn exec(&self, c: &Container, req: ExecRequest<'_>) -> Result<u32> {
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
            let _span = trace::span("libcontainer exec");
            let _fork = self.fork.lock().unwrap_or_else(PoisonError::into_inner);
            self.youki.exec(&c.id, &file, req.stdio, req.console_socket)
        };
        let _ = std::fs::remove_file(&file);
        pid
    }

    fn kill(&self, c: &Container, target: Target<'_>, signal: Signal, all: bool) -> Result<()> {
        match target {
            Target::Init { .. } if all => {
                let mut state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
                Youki::kill_all(&mut state, signal)
            }
            Target::Init { pid } => signal.send(pid, &format!("container {}", c.id)),
            Target::Exec { exec_id, pid } => signal.send(pid, &format!("exec {exec_id}")),
        }
    }

    fn delete(&self, c: &Container) -> Result<()> {
        let _span = trace::span("libcontainer delete");
        self.youki.delete(&c.id)?;
        self.cache.release(&c.bundle);
        Ok(())
    }

    fn pids(&self, c: &Container) -> Result<Vec<u32>> {
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

    fn update(&self, c: &Container, resources: &[u8]) -> Result<()> {
        let resources: LinuxResources = serde_json::from_slice(resources)
            .map_err(|e| Error::InvalidArgument(format!("update resources: {e}")))?;
        let state = c.state.lock().unwrap_or_else(PoisonError::into_inner);
        Youki::update(&state, &resources)
    }

    fn pause(&self, c: &Container) -> Result<()> {
        Youki::pause(&mut c.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn resume(&self, c: &Container) -> Result<()> {
        Youki::resume(&mut c.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn sandboxes(&self) -> Option<&dyn Sandboxes> {
        Some(&self.pods)
    }

    fn cleanup(ctx: &ShimContext, id: &str, bundle: &Path, _: &()) -> Result<()> {
        let youki = Youki::new(&ctx.namespace);
        let result = youki.delete(id);
        Cache::new(youki.root().join("precompiled")).release(bundle);
        result
    }
}
