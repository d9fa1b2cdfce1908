//! The runc backend: mount the rootfs, then let runc do the rest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protobuf::well_known_types::any::Any;
use protobuf::Message;
use protocol::options::CheckpointOptions;
use shim_common::mount::{unmount_all, BundleRootfs};
use shim_common::stdio::{ChildStdio, IoOwner};
use shim_common::{
    Backend, Context, CreateRequest, Error, ExecRequest, Result, ShimContext, Target,
};

use crate::options::RuncConfig;
use crate::runc::Runc;

struct Container {
    bundle: PathBuf,
    init_pid: u32,
    runc: Runc,
    /// Whether we mounted `bundle/rootfs` (and so must unmount it).
    mounted: bool,
    /// A restore waiting for `start`: containerd's runc shim restores there too, since a
    /// restored process runs at once and `create` must leave it not yet started.
    restore: Mutex<Option<Restore>>,
}

struct Restore {
    image: PathBuf,
    stdio: ChildStdio,
}

pub struct RuncBackend {
    namespace: String,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl RuncBackend {
    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }
}

impl Backend for RuncBackend {
    fn new(ctx: &ShimContext) -> Result<Self> {
        Ok(RuncBackend {
            namespace: ctx.namespace.clone(),
            containers: Mutex::new(HashMap::new()),
        })
    }

    fn io_owner(&self, options: Option<&Any>) -> Result<IoOwner> {
        let c = RuncConfig::from_any(options, &self.namespace)?;
        let set = |v: u32| (v != 0).then_some(v);
        Ok(IoOwner {
            uid: set(c.io_uid),
            gid: set(c.io_gid),
        })
    }

    fn create(&self, req: CreateRequest<'_>) -> Result<u32> {
        let config = RuncConfig::from_any(req.options, &self.namespace)?;
        let runc = Runc::new(config.clone(), req.bundle)?;
        config.save(req.bundle)?;
        let rootfs = BundleRootfs::mount(req.bundle, req.rootfs)?;
        let created = if req.checkpoint.is_empty() {
            runc.create(req.id, req.bundle, req.console_socket, req.stdio)
                .map(|pid| (pid, None))
        } else if req.terminal {
            Err(Error::Unimplemented(
                "restore of a container with a terminal".into(),
            ))
        } else {
            let restore = Restore {
                image: req.checkpoint.into(),
                stdio: req.stdio,
            };
            runc.criu_check().map(|()| (0, Some(restore)))
        };
        let (pid, restore) = match created {
            Ok(created) => created,
            Err(e) => {
                // Leave nothing behind: no half-created runc state (the mount goes with
                // `rootfs`).
                let _ = runc.delete(req.id);
                return Err(e);
            }
        };
        let mounted = rootfs.keep();
        let container = Container {
            bundle: req.bundle.to_path_buf(),
            init_pid: pid,
            runc,
            mounted,
            restore: Mutex::new(restore),
        };
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.to_string(), Arc::new(container));
        Ok(pid)
    }

    fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let restore = c.restore.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = restore {
            let work = c.bundle.join("criu-work");
            let pid = c.runc.restore(id, &c.bundle, &r.image, &work, r.stdio);
            let _ = std::fs::remove_dir_all(&work);
            return pid;
        }
        c.runc.start(id, c.init_pid)?;
        Ok(c.init_pid)
    }

    fn checkpoint(&self, id: &str, path: &str, options: Option<&Any>) -> Result<()> {
        let opts = match options {
            Some(a) if !a.value.is_empty() => {
                let url = a.type_url.rsplit('/').next().unwrap_or_default();
                if url != "containerd.runc.v1.CheckpointOptions" {
                    return Err(Error::InvalidArgument(format!(
                        "unsupported checkpoint options type {:?}",
                        a.type_url
                    )));
                }
                CheckpointOptions::parse_from_bytes(&a.value)
                    .context("decode checkpoint options")?
            }
            _ => CheckpointOptions::default(),
        };
        let c = self.get(id)?;
        c.runc.criu_check()?;
        let image = if path.is_empty() {
            opts.image_path.as_str()
        } else {
            path
        };
        if image.is_empty() {
            return Err(Error::InvalidArgument(
                "checkpoint needs an image path".into(),
            ));
        }
        // Keep a work directory the caller named; ours goes away afterwards, like Go's.
        let (work, ours) = match opts.work_path.as_str() {
            "" => (c.bundle.join("criu-work"), true),
            w => (PathBuf::from(w), false),
        };
        let result = c.runc.checkpoint(id, Path::new(image), &work, &opts);
        if ours {
            let _ = std::fs::remove_dir_all(&work);
        }
        result
    }

    fn exec(&self, req: ExecRequest<'_>) -> Result<u32> {
        let c = self.get(req.id)?;
        let (id, exec_id) = (req.id, req.exec_id);
        c.runc.exec(
            id,
            &c.bundle,
            exec_id,
            req.spec,
            req.console_socket,
            req.stdio,
        )
    }

    fn kill(&self, id: &str, target: Target<'_>, signal: u32, all: bool) -> Result<()> {
        match target {
            Target::Init => self.get(id)?.runc.kill(id, signal, all),
            Target::Exec { exec_id, pid } => {
                let sig = Signal::try_from(signal as i32)
                    .map_err(|_| Error::InvalidArgument(format!("signal {signal}")))?;
                kill(Pid::from_raw(pid as i32), sig).map_err(|e| match e {
                    nix::Error::ESRCH => {
                        Error::NotFound(format!("exec {exec_id}: process already finished"))
                    }
                    e => Error::Sys {
                        context: format!("kill exec {exec_id}"),
                        source: e,
                    },
                })
            }
        }
    }

    fn delete(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        c.runc.delete(id)?;
        if c.mounted {
            unmount_all(&c.bundle.join("rootfs"))?;
        }
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.get(id)?.runc.ps(id)
    }

    fn update(&self, id: &str, resources: Option<&Any>) -> Result<()> {
        let resources = shim_common::backend::linux_resources(resources)?;
        let c = self.get(id)?;
        c.runc.update(id, &c.bundle, resources)
    }

    fn pause(&self, id: &str) -> Result<()> {
        self.get(id)?.runc.pause(id)
    }

    fn resume(&self, id: &str) -> Result<()> {
        self.get(id)?.runc.resume(id)
    }

    fn cleanup(ctx: &ShimContext, id: &str, bundle: &Path) -> Result<()> {
        let config = RuncConfig::load(bundle, &ctx.namespace);
        // containerd runs this after every shim exit, clean or not. Without runc state
        // there is nothing for runc to delete, and skipping it keeps `ctr run --rm` fast.
        let result = if config.root.join(id).exists() {
            Runc::new(config, bundle).and_then(|runc| runc.delete(id))
        } else {
            Ok(())
        };
        // Unmount even if runc failed: a leaked mount outlives everything else.
        unmount_all(&bundle.join("rootfs"))?;
        result
    }

    /// runc options' `ShimCgroup` (containerd's `WithShimCgroup`).
    fn shim_cgroup(options: Option<&Any>) -> Option<String> {
        let config = RuncConfig::from_any(options, "").ok()?;
        Some(config.shim_cgroup).filter(|c| !c.is_empty())
    }

    /// What `runc features` says, for containerd 2.x's `-info`.
    fn features(options: Option<&Any>) -> Result<Option<Any>> {
        crate::runc::features(&RuncConfig::from_any(options, "")?)
    }
}
