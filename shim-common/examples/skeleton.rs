//! A complete shim: runs a bundle's OCI process as a plain child, chrooted into its rootfs.
use shim_common::{prelude::*, reaper};
use std::{env::set_current_dir, os::unix::fs::chroot, os::unix::process::CommandExt};
use std::{process::Command, sync::Mutex, sync::OnceLock};

struct Skeleton;

impl Backend for Skeleton {
    /// The command `start` spawns (with the container's stdio), then the init's pid.
    type Container = (Mutex<Option<Command>>, OnceLock<u32>);
    type Options = ();
    fn new(_: &ShimContext) -> Result<Self> {
        Ok(Skeleton)
    }
    fn create(&self, req: CreateRequest<'_, ()>) -> Result<Created<Self::Container>> {
        let json = std::fs::read(req.bundle.join("config.json")).context("read config.json")?;
        let bad = |e| Error::InvalidArgument(format!("config.json: {e}"));
        let p = serde_json::from_slice::<serde_json::Value>(&json).map_err(bad)?["process"].take();
        let get = |k: &str| serde_json::from_value::<Vec<String>>(p[k].clone()).unwrap_or_default();
        let (mut args, env) = (get("args").into_iter(), get("env"));
        let mut cmd = Command::new(args.next().unwrap_or_default());
        cmd.args(args).env_clear().current_dir(req.bundle);
        cmd.envs(env.iter().filter_map(|e| e.split_once('=')));
        let cwd = p["cwd"].as_str().unwrap_or("/").to_owned();
        // SAFETY: chroot(2) and chdir(2) are async-signal-safe; std chdirs to the bundle first.
        unsafe { cmd.pre_exec(move || chroot("rootfs").and_then(|()| set_current_dir(&cwd))) };
        req.stdio.apply(&mut cmd);
        Ok(Created {
            container: (Mutex::new(Some(cmd)), OnceLock::new()),
            pid: None,
        })
    }
    fn start(&self, (cmd, pid): &Self::Container) -> Result<u32> {
        let cmd = cmd.lock().ok().and_then(|mut cmd| cmd.take());
        let mut cmd = cmd.ok_or(Error::FailedPrecondition("already started".into()))?;
        let child = reaper::spawn(&mut cmd).context("spawn the init")?;
        Ok(*pid.get_or_init(|| child.id()))
    }
    fn kill(&self, _: &Self::Container, t: Target<'_>, sig: Signal, _all: bool) -> Result<()> {
        sig.send(t.pid(), &t.to_string())
    }
    fn pids(&self, (_, pid): &Self::Container) -> Result<Vec<u32>> {
        Ok(pid.get().copied().into_iter().collect())
    }
}

fn main() {
    shim_common::run::<Skeleton>("containerd-shim-skeleton-v2")
}
