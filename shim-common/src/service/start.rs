//! `Start` of a container's init or of an exec. Neither runs under the container's lock:
//! `runc start` and `runc exec` are external commands (an exec can wait seconds for its
//! console), and `State`, `Pids`, other calls and exits must not wait for them. The process
//! is `Busy::Starting` meanwhile; an exit reaped in that time is held until the start
//! event is out, so containerd always sees start before exit.

use super::*;

impl<B: Backend> Inner<B> {
    pub(super) fn start(&self, req: StartRequest) -> Result<StartResponse> {
        let cell = self.cell(&req.id)?;
        let pid = match req.exec_id.is_empty() {
            true => self.start_init(&cell, &req.id)?,
            false => self.start_exec(&cell, &req.id, &req.exec_id)?,
        };
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn start_init(&self, cell: &Arc<Cell<B::Container>>, id: &str) -> Result<u32> {
        let runtime = {
            let mut c = lock(&cell.state);
            c.init.life.begin_start()?;
            c.runtime.clone()
        };
        let starting = self.starting();
        let started = self.backend.start(&runtime);
        let mut c = lock(&cell.state);
        c.init.life.end(started.is_ok());
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                self.release_held_exit(cell, c, "");
                return Err(e);
            }
        };
        // A restored init is born here: claim its pid like create does.
        let early = if pid != c.init.pid {
            c.init.pid = pid;
            self.claim(pid, id, "")
        } else {
            None
        };
        let event = TaskStart {
            container_id: id.to_string(),
            pid,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_START, &event);
        if let Some(exit) = early {
            c.init.held_exit = Some(exit);
        }
        self.release_held_exit(cell, c, "");
        drop(starting);
        Ok(pid)
    }

    fn start_exec(&self, cell: &Arc<Cell<B::Container>>, id: &str, exec_id: &str) -> Result<u32> {
        let mut c = lock(&cell.state);
        if c.init.life.status() != Status::RUNNING {
            return Err(Error::FailedPrecondition(format!(
                "cannot start exec {exec_id} in container {id}: container is not running"
            )));
        }
        let p = c.process_mut(exec_id)?;
        p.life.begin_start()?;
        let (paths, spec) = (p.paths.clone(), p.spec.clone());
        let (owner, runtime) = (c.io_owner, c.runtime.clone());
        c.running_execs += 1;
        drop(c);
        let ctx = IoContext {
            id,
            namespace: &self.namespace,
        };
        let launched =
            PendingIo::open(B::HOST_STDIO, &paths, owner, ctx).and_then(|(pending, stdio)| {
                let starting = self.starting();
                let exec = ExecRequest {
                    exec_id,
                    spec: &spec,
                    terminal: paths.terminal,
                    console_socket: pending.console_socket(),
                    stdio,
                    carried: pending.carried(),
                };
                let pid = self.backend.exec(&runtime, exec)?;
                match pending.finish(&paths) {
                    Ok(io) => Ok((io, pid, starting)),
                    Err(e) => {
                        self.kill_exec(&runtime, exec_id, pid);
                        Err(e)
                    }
                }
            });
        let mut c = lock(&cell.state);
        if let Ok(p) = c.process_mut(exec_id) {
            p.life.end(launched.is_ok());
        }
        let (io, pid, starting) = match launched {
            Ok(s) => s,
            Err(e) => {
                c.running_execs -= 1;
                self.release_init_exit(&mut c);
                return Err(e);
            }
        };
        // Under the lock, so the exit (held as early until now, or waiting for the lock)
        // is applied after the start event.
        let early = self.claim(pid, id, exec_id);
        drop(starting);
        if early.is_none() && c.deferred_init_exit.is_some() {
            // The init exited while this started: end it, as the init's exit did the others.
            self.kill_exec(&runtime, exec_id, pid);
        }
        let p = c.process_mut(exec_id)?;
        p.pid = pid;
        p.io = Some(io);
        p.spec = Vec::new();
        if early.is_some() {
            p.held_exit = early;
        }
        let event = TaskExecStarted {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            pid,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_EXEC_STARTED, &event);
        self.release_held_exit(cell, c, exec_id);
        Ok(pid)
    }

    /// Applies the exit held during `exec_id`'s start, if there is one, now that its start
    /// is over (the event out, or the call failed).
    fn release_held_exit(
        &self,
        cell: &Arc<Cell<B::Container>>,
        mut c: MutexGuard<'_, Container<B::Container>>,
        exec_id: &str,
    ) {
        let Some(exit) = c.process_mut(exec_id).ok().and_then(|p| p.held_exit.take()) else {
            return;
        };
        let drain = reaped(&mut c, exec_id);
        drop(c);
        self.exit_after_output(cell.clone(), exec_id.to_string(), exit, drain);
    }
}
