//! Pids and exits: who owns each pid, exits reaped before their pid was known, each
//! container's queue of exits, and the order in which exits are published and `Wait`s answered.

use super::*;

/// A container's exits wait here while another call holds the container's lock (briefly:
/// no call holds it across an external command, but one may be signalling an exec or
/// closing a logger's pipes): the exits thread never waits for one
/// container, so no other container's exit events or `Wait` answers wait behind it. One
/// thread at a time applies a container's queue, so its exits keep their order.
#[derive(Default)]
pub(super) struct ExitQueue {
    pub(super) queue: VecDeque<(String, Exit)>,
    /// A thread is applying the queue; whoever adds to it leaves the rest to that thread.
    pub(super) applying: bool,
}

/// Which process each pid belongs to, and exits reaped before their pid was known.
#[derive(Default)]
pub(super) struct PidTable {
    pub(super) owners: HashMap<i32, (String, String)>,
    /// Sandboxes' processes (containerd's sandbox API), when they are host children.
    pub(super) sandboxes: HashMap<i32, String>,
    pub(super) early: HashMap<i32, Exit>,
    /// Backend calls in flight that will report a new pid.
    pub(super) starting: usize,
}

/// Marks a backend call that will report a new pid; exits of unknown pids are kept meanwhile.
pub(super) struct Starting<'a, B: Backend>(&'a Inner<B>);

impl<B: Backend> Drop for Starting<'_, B> {
    fn drop(&mut self) {
        let mut t = lock(&self.0.pids);
        t.starting -= 1;
        if t.starting == 0 {
            t.early.clear();
        }
    }
}

impl<B: Backend> Inner<B> {
    pub(super) fn starting(&self) -> Starting<'_, B> {
        lock(&self.pids).starting += 1;
        Starting(self)
    }

    /// Records that `pid` holds sandbox `id`, or returns its exit if it was reaped already.
    pub(super) fn claim_sandbox(&self, pid: u32, id: &str) -> Option<Exit> {
        let mut t = lock(&self.pids);
        let pid = pid as i32;
        t.early.remove(&pid).or_else(|| {
            t.sandboxes.insert(pid, id.to_string());
            None
        })
    }

    /// Records who owns `pid`, or returns its exit if it was reaped already.
    pub(super) fn claim(&self, pid: u32, id: &str, exec_id: &str) -> Option<Exit> {
        let mut t = lock(&self.pids);
        let pid = pid as i32;
        t.early.remove(&pid).or_else(|| {
            t.owners.insert(pid, (id.to_string(), exec_id.to_string()));
            None
        })
    }

    pub(super) fn on_exit(&self, exit: Exit) {
        let (id, exec_id) = {
            let mut t = lock(&self.pids);
            match t.owners.remove(&exit.pid) {
                Some(owner) => owner,
                None => {
                    if let Some(id) = t.sandboxes.remove(&exit.pid) {
                        drop(t);
                        return self.sandbox_exited(&id, exit.status, exit.at);
                    }
                    if t.starting > 0 {
                        t.early.insert(exit.pid, exit);
                    }
                    return;
                }
            }
        };
        let Ok(cell) = self.cell(&id) else { return };
        {
            let mut q = lock(&cell.exits);
            q.queue.push_back((exec_id, exit));
            if q.applying {
                return;
            }
            q.applying = true;
        }
        // A free container's exit is applied here; a busy one's on a thread of its own.
        let busy = matches!(cell.state.try_lock(), Err(TryLockError::WouldBlock));
        if busy {
            let me = self.me.clone();
            let queued = cell.clone();
            let spawned = std::thread::Builder::new()
                .name("exits-busy".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    if let Some(inner) = me.upgrade() {
                        inner.apply_queued_exits(&queued);
                    }
                });
            match spawned {
                Ok(_) => return,
                Err(e) => log::warn!("container {id}: exits applied in line: {e}"),
            }
        }
        self.apply_queued_exits(&cell);
    }

    /// Applies `cell`'s queued exits in order until none is left (see [`ExitQueue`]).
    pub(super) fn apply_queued_exits(&self, cell: &Arc<Cell<B::Container>>) {
        loop {
            let (exec_id, exit) = {
                let mut q = lock(&cell.exits);
                match q.queue.pop_front() {
                    Some(next) => next,
                    None => {
                        q.applying = false;
                        return;
                    }
                }
            };
            let drain = {
                let mut c = lock(&cell.state);
                match c.process_mut(&exec_id) {
                    Ok(p) if p.life.holds_exits() => {
                        // Its start is in flight: it applies the exit after its event.
                        p.life.reap();
                        p.held_exit = Some(exit);
                        continue;
                    }
                    _ => reaped(&mut c, &exec_id),
                }
            };
            self.exit_after_output(cell.clone(), exec_id, exit, drain);
        }
    }

    /// Applies `exit` once the process's output is delivered (see [`OUTPUT_GRACE`]), at
    /// once if it is already. Call without holding the container's lock: the wait runs on
    /// the drain thread, so neither this caller nor other containers' exits wait for it.
    pub(super) fn exit_after_output(
        &self,
        cell: Arc<Cell<B::Container>>,
        exec_id: String,
        exit: Exit,
        drain: Option<Drain>,
    ) {
        let (id, kill_all, runtime) = {
            let c = lock(&cell.state);
            (c.id.clone(), c.kill_all_on_exit, c.runtime.clone())
        };
        if exec_id.is_empty() && kill_all {
            // No pid namespace of its own: the init's end is not the end of its processes.
            // End them before its exit is published, as containerd's runc shim does. The
            // init is reaped: its pid is no longer its own (pid 0, see `Target::Init`).
            let target = Target::Init { pid: 0 };
            match self.backend.kill(&runtime, target, Signal::KILL, true) {
                Ok(()) | Err(Error::NotFound(_)) => {}
                Err(e) => {
                    log::warn!("container {id}: kill what is left after its init exited: {e}")
                }
            }
        }
        let what = drain.as_ref().map(|_| {
            if exec_id.is_empty() {
                format!("container {id}")
            } else {
                format!("exec {exec_id} of container {id}")
            }
        });
        let me = self.me.clone();
        let apply = move |_delivered: bool| {
            if let Some(inner) = me.upgrade() {
                let mut c = lock(&cell.state);
                inner.apply_exit(&mut c, &exec_id, exit);
            }
        };
        match (drain, what) {
            (Some(drain), Some(what)) => drain.after_exit(&what, OUTPUT_GRACE, apply),
            _ => apply(true),
        }
    }

    pub(super) fn apply_exit(&self, c: &mut Container<B::Container>, exec_id: &str, exit: Exit) {
        if exec_id.is_empty() {
            if c.running_execs > 0 {
                // Execs outlive init only in a shared pid namespace; end them, then report init.
                for (exec_id, p) in &c.execs {
                    if p.life.live() {
                        self.kill_exec(&c.runtime, exec_id, p.pid);
                    }
                }
                c.deferred_init_exit = Some(exit);
                return;
            }
            self.finish(c, "", exit);
            return;
        }
        self.finish(c, exec_id, exit);
        c.running_execs = c.running_execs.saturating_sub(1);
        self.release_init_exit(c);
    }

    /// SIGKILLs an exec's process; it is gone or going either way, so errors are moot.
    pub(super) fn kill_exec(&self, runtime: &B::Container, exec_id: &str, pid: u32) {
        let target = Target::Exec { exec_id, pid };
        let _ = self.backend.kill(runtime, target, Signal::KILL, false);
    }

    pub(super) fn release_init_exit(&self, c: &mut Container<B::Container>) {
        if c.running_execs == 0 {
            if let Some(exit) = c.deferred_init_exit.take() {
                self.finish(c, "", exit);
            }
        }
    }

    pub(super) fn finish(&self, c: &mut Container<B::Container>, exec_id: &str, exit: Exit) {
        if c.deleted {
            return; // nothing is published about a container after its delete
        }
        let id = c.id.clone();
        let Ok(p) = c.process_mut(exec_id) else {
            return;
        };
        p.life.stop();
        p.exit = Some(exit);
        if exec_id.is_empty() {
            // An OOM kill the watcher has not reported yet goes out before the exit.
            if let Some(Some(w)) = self.oom.get() {
                w.check(&id);
            }
        }
        let event = TaskExit {
            container_id: id.clone(),
            id: if exec_id.is_empty() {
                id
            } else {
                exec_id.to_string()
            },
            pid: p.pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_EXIT, &event);
        let (done, waiting) = std::mem::take(&mut c.waiters)
            .into_iter()
            .partition(|(e, _)| e == exec_id);
        c.waiters = waiting;
        for (_, w) in done {
            w(Ok(wait_response(exit)));
        }
    }

    /// `Wait` without a thread: `done` gets the answer now if the process has exited, or
    /// when it exits or is deleted.
    pub(super) fn wait_later(&self, req: WaitRequest, done: Waiter) {
        let cell = match self.cell(&req.id) {
            Ok(cell) => cell,
            Err(e) => return done(Err(e)),
        };
        let mut c = lock(&cell.state);
        if c.deleted {
            drop(c);
            return done(Err(Error::NotFound(format!("container {}", req.id))));
        }
        match c.process(&req.exec_id).map(|p| p.exit) {
            Ok(Some(exit)) => {
                drop(c);
                done(Ok(wait_response(exit)))
            }
            Ok(None) => c.waiters.push((req.exec_id, done)),
            Err(e) => {
                drop(c);
                done(Err(e))
            }
        }
    }
}

/// Marks `exec_id`'s process reaped; the drain its exit must wait for, if it has stdio.
pub(super) fn reaped<C>(c: &mut Container<C>, exec_id: &str) -> Option<Drain> {
    let p = c.process_mut(exec_id).ok()?;
    p.life.reap();
    p.io.as_ref().map(|io| io.drain().clone())
}
