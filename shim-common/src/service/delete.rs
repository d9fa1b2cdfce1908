//! `Delete` of an exec or of a whole container. A container's backend delete (`runc
//! delete`, an unmount) runs without its lock, the init `Busy::Deleting` meanwhile.

use super::*;

impl<B: Backend> Inner<B> {
    pub(super) fn delete(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        let cell = self.cell(&req.id)?;
        let mut c = lock(&cell.state);
        let response = |pid: u32, exit: Option<Exit>| {
            let exit = exit.unwrap_or(Exit {
                pid: pid as i32,
                status: 128 + libc::SIGKILL as u32,
                at: std::time::SystemTime::now(),
            });
            DeleteResponse {
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }
        };
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            p.life.check_delete()?;
            let resp = match p.exit {
                Some(exit) => response(p.pid, Some(exit)),
                // Never started: containerd's runc shim answers its exec's zero values,
                // status 0 and Go's zero time (0001-01-01T00:00:00Z).
                None => DeleteResponse {
                    pid: p.pid,
                    exit_status: 0,
                    exited_at: MessageField::some(
                        protobuf::well_known_types::timestamp::Timestamp {
                            seconds: -62_135_596_800,
                            ..Default::default()
                        },
                    ),
                    ..Default::default()
                },
            };
            let proc = c.execs.remove(&req.exec_id);
            let (gone, waiting) = std::mem::take(&mut c.waiters)
                .into_iter()
                .partition(|(e, _)| e == &req.exec_id);
            c.waiters = waiting;
            for (_, w) in gone {
                w(Err(Error::NotFound(format!("exec {}", req.exec_id))));
            }
            let runtime = c.runtime.clone();
            // Outside the lock: closing a logging binary waits for it to exit, and the
            // backend's part may be a call into a VM.
            drop(c);
            drop(proc);
            if let Err(e) = self.backend.delete_exec(&runtime, &req.exec_id) {
                log::warn!("delete exec {} of {}: {e}", req.exec_id, req.id);
            }
            return Ok(resp);
        }
        c.init.life.begin_delete()?;
        let runtime = c.runtime.clone();
        let rootfs = c
            .rootfs_mounted
            .then(|| PathBuf::from(&c.bundle).join("rootfs"));
        drop(c);
        let undone = self.backend.delete(&runtime).and_then(|()| match &rootfs {
            Some(rootfs) => unmount_rootfs(rootfs),
            None => Ok(()),
        });
        let mut c = lock(&cell.state);
        c.init.life.end(undone.is_ok());
        undone?;
        c.rootfs_mounted = false;
        if let Some(Some(w)) = self.oom.get() {
            w.remove(&req.id);
        }
        {
            let mut t = lock(&self.pids);
            t.owners.retain(|_, (id, _)| id != &req.id);
        }
        let resp = response(c.init.pid, c.init.exit);
        let event = TaskDelete {
            container_id: req.id.clone(),
            pid: resp.pid,
            exit_status: resp.exit_status,
            exited_at: resp.exited_at.clone(),
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_DELETE, &event);
        c.deleted = true;
        for (_, w) in std::mem::take(&mut c.waiters) {
            w(Err(Error::NotFound(format!("container {}", req.id))));
        }
        drop(c);
        lock(&self.containers).cells.remove(&req.id);
        Ok(resp)
    }
}
