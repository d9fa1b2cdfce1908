//! A complete shim: runs a bundle's OCI process as a plain child, chrooted into its rootfs.
use shim_common::{bundle, prelude::*, reaper};
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
        let mut cmd = bundle::process_command(req.bundle)?;
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
    // `kill` is the SDK's default (signal the target's pid); `exec` and the rest: Unimplemented.
    fn pids(&self, (_, pid): &Self::Container) -> Result<Vec<u32>> {
        Ok(pid.get().copied().into_iter().collect())
    }
}

fn main() {
    shim_common::run::<Skeleton>("containerd-shim-skeleton-v2")
}
