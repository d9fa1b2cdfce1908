//! Calls that act on a running task: `Kill`, `Pause`/`Resume`, `CloseIO`, `ResizePty`,
//! `Checkpoint`, `Update`.

use super::*;

impl<B: Backend> Inner<B> {
    pub(super) fn kill(&self, req: KillRequest) -> Result<()> {
        let signal = Signal::new(req.signal)?;
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        p.life.check_kill(req.all)?;
        let (runtime, pid, reaped) = (c.runtime.clone(), p.pid, p.life.is_reaped());
        if req.exec_id.is_empty() {
            drop(c); // `runc kill` is a command: the container does not wait for it
            if pid == 0 {
                // A restore's init is born at start.
                return Err(Error::NotFound(format!(
                    "container {}: process not started",
                    req.id
                )));
            }
            let pid = if reaped { 0 } else { pid };
            return self
                .backend
                .kill(&runtime, Target::Init { pid }, signal, req.all);
        }
        let target = Target::Exec {
            exec_id: &req.exec_id,
            pid,
        };
        if B::HOST_PROCESSES {
            // A signal, under the lock: the pid is not reaped and reused meanwhile.
            return self.backend.kill(&runtime, target, signal, req.all);
        }
        drop(c); // elsewhere (a guest's): the backend asks, and its pids are not ours
        self.backend.kill(&runtime, target, signal, req.all)
    }

    /// `Pause`/`Resume` of the container's init, unlocked while the backend runs (the init
    /// is `Busy::Pausing`/`Busy::Resuming`); an exit meanwhile wins over the outcome.
    pub(super) fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let cell = self.cell(id)?;
        let runtime = {
            let mut c = lock(&cell.state);
            match paused {
                true => c.init.life.begin_pause()?,
                false => c.init.life.begin_resume()?,
            }
            c.runtime.clone()
        };
        let done = match paused {
            true => self.backend.pause(&runtime),
            false => self.backend.resume(&runtime),
        };
        let mut c = lock(&cell.state);
        c.init.life.end(done.is_ok());
        done?;
        let container_id = id.to_string();
        match c.init.life.status() {
            Status::PAUSED if paused => {
                let e = TaskPaused {
                    container_id,
                    ..Default::default()
                };
                publish(&*self.publisher, topics::TASK_PAUSED, &e);
            }
            Status::RUNNING if !paused => {
                let e = TaskResumed {
                    container_id,
                    ..Default::default()
                };
                publish(&*self.publisher, topics::TASK_RESUMED, &e);
            }
            _ => {} // it exited meanwhile: its exit is the news
        }
        Ok(())
    }

    pub(super) fn close_io(&self, req: CloseIORequest) -> Result<()> {
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            match &p.io {
                Some(Io::Pipes(io)) => io.close_stdin(),
                Some(Io::Console(console)) => console.close_stdin(),
                Some(Io::Carried(_)) => {
                    let runtime = c.runtime.clone();
                    drop(c); // the backend may have to ask its guest
                    return self.backend.close_io(&runtime, &req.exec_id);
                }
                None => {}
            }
        }
        Ok(())
    }

    pub(super) fn resize_pty(&self, req: ResizePtyRequest) -> Result<()> {
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        match &p.io {
            Some(Io::Console(console)) => {
                console.resize(req.width, req.height)?;
                if B::HOST_PROCESSES {
                    return Ok(());
                }
                // The pty relays a terminal elsewhere (a VM guest's): resize that one too.
                let runtime = c.runtime.clone();
                drop(c);
                let (w, h) = (req.width, req.height);
                self.backend.resize_pty(&runtime, &req.exec_id, w, h)
            }
            // Nothing to resize, and no error: containerd's runc shim does the same, and
            // clients resize without asking first.
            _ if !p.paths.terminal => Ok(()),
            // A terminal the shim does not hold (a VM guest's, say): the backend's.
            _ => {
                let runtime = c.runtime.clone();
                drop(c);
                let (w, h) = (req.width, req.height);
                self.backend.resize_pty(&runtime, &req.exec_id, w, h)
            }
        }
    }

    pub(super) fn checkpoint(&self, r: CheckpointTaskRequest) -> Result<Empty> {
        let runtime = self.runtime(&r.id)?;
        empty(
            self.backend
                .checkpoint(&runtime, &r.path, r.options.as_ref()),
        )
    }

    pub(super) fn update(&self, r: UpdateTaskRequest) -> Result<Empty> {
        let runtime = self.runtime(&r.id)?;
        let resources = linux_resources(r.resources.as_ref())?;
        empty(self.backend.update(&runtime, resources))
    }

    pub(super) fn runtime(&self, id: &str) -> Result<Arc<B::Container>> {
        Ok(lock(&self.cell(id)?.state).runtime.clone())
    }
}
