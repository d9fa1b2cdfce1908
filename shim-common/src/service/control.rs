//! Calls that act on a running task: `Kill`, `Pause`/`Resume`, `CloseIO`, `ResizePty`,
//! `Checkpoint`, `Update`.

use super::*;

impl<B: Backend> Inner<B> {
    pub(super) fn kill(&self, req: KillRequest) -> Result<()> {
        let signal = Signal::new(req.signal)?;
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        if p.status == Status::STOPPED && !req.all {
            return Err(Error::NotFound(format!(
                "process {}: process already finished",
                if req.exec_id.is_empty() {
                    &req.id
                } else {
                    &req.exec_id
                }
            )));
        }
        if p.reaped && !req.exec_id.is_empty() {
            return Err(Error::NotFound(format!(
                "process {}: process already finished",
                req.exec_id
            )));
        }
        if req.exec_id.is_empty() {
            let (runtime, pid) = (c.runtime.clone(), p.pid);
            drop(c); // runc kill takes a while; do not block the container meanwhile
            if pid == 0 {
                // A restore's init is born at start.
                return Err(Error::NotFound(format!(
                    "container {}: process not started",
                    req.id
                )));
            }
            let target = Target::Init { pid };
            return self.backend.kill(&runtime, target, signal, req.all);
        }
        if p.status == Status::CREATED {
            return Err(Error::FailedPrecondition(format!(
                "exec {} is not started",
                req.exec_id
            )));
        }
        // Hold the lock: the pid cannot be reaped and reused while we signal it.
        let target = Target::Exec {
            exec_id: &req.exec_id,
            pid: p.pid,
        };
        self.backend.kill(&c.runtime, target, signal, req.all)
    }

    pub(super) fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let cell = self.cell(id)?;
        let mut c = lock(&cell.state);
        if paused {
            self.backend.pause(&c.runtime)?;
            c.init.status = Status::PAUSED;
            let e = TaskPaused {
                container_id: id.into(),
                ..Default::default()
            };
            publish(&*self.publisher, topics::TASK_PAUSED, &e);
        } else {
            self.backend.resume(&c.runtime)?;
            c.init.status = Status::RUNNING;
            let e = TaskResumed {
                container_id: id.into(),
                ..Default::default()
            };
            publish(&*self.publisher, topics::TASK_RESUMED, &e);
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
            Some(Io::Console(console)) => console.resize(req.width, req.height),
            // Nothing to resize, and no error: containerd's runc shim does the same, and
            // clients resize without asking first.
            _ if !p.paths.terminal => Ok(()),
            // A terminal the shim does not hold (a VM guest's, say): the backend's.
            _ => self
                .backend
                .resize_pty(&c.runtime, &req.exec_id, req.width, req.height),
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
