//! `Start` of a container's init or of an exec.

use super::*;

impl<B: Backend> Inner<B> {
    pub(super) fn start(&self, req: StartRequest) -> Result<StartResponse> {
        let cell = self.cell(&req.id)?;
        let mut c = lock(&cell.state);
        if req.exec_id.is_empty() {
            if c.init.status != Status::CREATED {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is not in created state",
                    req.id
                )));
            }
            let starting = self.starting();
            let pid = self.backend.start(&c.runtime)?;
            // A restored init is born here: claim its pid like create does.
            let early = if pid != c.init.pid {
                c.init.pid = pid;
                self.claim(pid, &req.id, "")
            } else {
                None
            };
            c.init.status = Status::RUNNING;
            let event = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            publish(&*self.publisher, topics::TASK_START, &event);
            if let Some(exit) = early {
                let drain = reaped(&mut c, "");
                drop(c);
                self.exit_after_output(cell.clone(), String::new(), exit, drain);
            }
            drop(starting);
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        if c.init.status != Status::RUNNING {
            return Err(Error::FailedPrecondition(format!(
                "cannot start exec {} in container {}: container is not running",
                req.exec_id, req.id
            )));
        }
        let p = c.process(&req.exec_id)?;
        if p.status != Status::CREATED {
            return Err(Error::FailedPrecondition(format!(
                "exec {} is already started",
                req.exec_id
            )));
        }
        if p.starting {
            return Err(Error::FailedPrecondition(format!(
                "exec {} is already starting",
                req.exec_id
            )));
        }
        let (paths, spec, owner) = (p.paths.clone(), p.spec.clone(), c.io_owner);
        let runtime = c.runtime.clone();
        c.running_execs += 1;
        c.process_mut(&req.exec_id)?.starting = true;
        // Not under the container's lock: `runc exec` can take seconds, and State, Pids or
        // another exec of the container must not wait for it. `starting` keeps the exec
        // from being started twice or deleted meanwhile.
        drop(c);
        let ctx = IoContext {
            id: &req.id,
            namespace: &self.namespace,
        };
        let launched =
            PendingIo::open(B::HOST_STDIO, &paths, owner, ctx).and_then(|(pending, stdio)| {
                let starting = self.starting();
                let exec = ExecRequest {
                    exec_id: &req.exec_id,
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
                        self.kill_exec(&runtime, &req.exec_id, pid);
                        Err(e)
                    }
                }
            });
        let mut c = lock(&cell.state);
        if let Ok(p) = c.process_mut(&req.exec_id) {
            p.starting = false;
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
        let early = self.claim(pid, &req.id, &req.exec_id);
        drop(starting);
        if early.is_none() && c.deferred_init_exit.is_some() {
            // The init exited while this started: end it, as the init's exit did the others.
            self.kill_exec(&runtime, &req.exec_id, pid);
        }
        let p = c.process_mut(&req.exec_id)?;
        p.pid = pid;
        p.status = Status::RUNNING;
        p.io = Some(io);
        p.spec = Vec::new();
        let event = TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_EXEC_STARTED, &event);
        if let Some(exit) = early {
            let drain = reaped(&mut c, &req.exec_id);
            drop(c);
            self.exit_after_output(cell.clone(), req.exec_id.clone(), exit, drain);
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }
}
