//! The runc backend: the SDK has mounted the rootfs; runc does the rest.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protobuf::well_known_types::any::Any;
use protobuf::Message;
use protocol::options::CheckpointOptions;
use shim_common::host_pods::HostPods;
use shim_common::prelude::*;
use shim_common::sandbox::Sandboxes;
use shim_common::stdio::ChildStdio;

use crate::options::RuncConfig;
use crate::runc::Runc;

pub struct Container {
    id: String,
    bundle: PathBuf,
    /// 0 for a restore, whose init is born at `start`.
    init_pid: u32,
    runc: Runc,
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
    /// Pods of containerd 2.x's sandbox API: namespaces held without a pause container.
    pods: HostPods,
}

impl Backend for RuncBackend {
    type Container = Container;
    type Options = RuncConfig;

    fn new(ctx: &ShimContext) -> Result<Self> {
        Ok(RuncBackend {
            namespace: ctx.namespace.clone(),
            pods: HostPods::default(),
        })
    }

    fn create(&self, req: CreateRequest<'_, RuncConfig>) -> Result<Created<Container>> {
        let runc = Runc::new(req.options, &self.namespace, req.bundle)?;
        let (id, bundle) = (req.id.to_string(), req.bundle.to_path_buf());
        let created = if req.checkpoint.is_empty() {
            runc.create(req).map(|pid| (Some(pid), None))
        } else if req.terminal {
            Err(Error::Unimplemented(
                "restore of a container with a terminal".into(),
            ))
        } else {
            let restore = Restore {
                image: req.checkpoint.into(),
                stdio: req.stdio,
            };
            runc.criu_check().map(|()| (None, Some(restore)))
        };
        let (pid, restore) = created.inspect_err(|_| {
            // Leave no half-created runc state behind.
            let _ = runc.delete(&id);
        })?;
        let container = Container {
            id,
            bundle,
            init_pid: pid.unwrap_or(0),
            runc,
            restore: Mutex::new(restore),
        };
        Ok(Created { container, pid })
    }

    fn start(&self, c: &Container) -> Result<u32> {
        let restore = c.restore.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = restore {
            let work = c.bundle.join("criu-work");
            let pid = c.runc.restore(&c.id, &c.bundle, &r.image, &work, r.stdio);
            let _ = std::fs::remove_dir_all(&work);
            return pid;
        }
        c.runc.start(&c.id, c.init_pid)?;
        Ok(c.init_pid)
    }

    fn checkpoint(&self, c: &Container, path: &str, options: Option<&Any>) -> Result<()> {
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
        let result = c.runc.checkpoint(&c.id, Path::new(image), &work, &opts);
        if ours {
            let _ = std::fs::remove_dir_all(&work);
        }
        result
    }

    fn exec(&self, c: &Container, req: ExecRequest<'_>) -> Result<u32> {
        let (id, exec_id) = (&c.id, req.exec_id);
        c.runc.exec(
            id,
            &c.bundle,
            exec_id,
            req.spec,
            req.console_socket,
            req.stdio,
        )
    }

    fn kill(&self, c: &Container, target: Target<'_>, signal: Signal, all: bool) -> Result<()> {
        match target {
            Target::Init { .. } => c.runc.cli.kill(&c.id, signal, all),
            Target::Exec { exec_id, pid } => signal.send(pid, &format!("exec {exec_id}")),
        }
    }

    fn delete(&self, c: &Container) -> Result<()> {
        c.runc.delete(&c.id)
    }

    fn pids(&self, c: &Container) -> Result<Vec<u32>> {
        c.runc.ps(&c.id)
    }

    fn update(&self, c: &Container, resources: &[u8]) -> Result<()> {
        c.runc.update(&c.id, &c.bundle, resources)
    }

    fn pause(&self, c: &Container) -> Result<()> {
        c.runc.simple("pause", &c.id)
    }

    fn resume(&self, c: &Container) -> Result<()> {
        c.runc.simple("resume", &c.id)
    }

    fn sandboxes(&self) -> Option<&dyn Sandboxes> {
        Some(&self.pods)
    }

    fn cleanup(ctx: &ShimContext, id: &str, bundle: &Path, options: &RuncConfig) -> Result<()> {
        // containerd runs this after every shim exit, clean or not. Without runc state
        // there is nothing for runc to delete, and skipping it keeps `ctr run --rm` fast.
        if !options.root.join(&ctx.namespace).join(id).exists() {
            return Ok(());
        }
        Runc::new(options, &ctx.namespace, bundle)?.delete(id)
    }

    /// runc options' `ShimCgroup` (containerd's `WithShimCgroup`).
    fn shim_cgroup(options: &RuncConfig) -> Option<String> {
        Some(options.shim_cgroup.clone()).filter(|c| !c.is_empty())
    }

    /// What `runc features` says, for containerd 2.x's `-info`.
    fn features(options: &RuncConfig) -> Result<Option<Any>> {
        crate::runc::features(options)
    }
}
