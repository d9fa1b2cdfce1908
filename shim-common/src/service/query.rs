//! Calls that only look: `State`, `Pids`, `Stats`, `Connect`.

use super::*;

impl<B: Backend> Inner<B> {
    pub(super) fn state(&self, req: StateRequest) -> Result<StateResponse> {
        let cell = self.cell(&req.id)?;
        let c = lock(&cell.state);
        let p = c.process(&req.exec_id)?;
        let (status, at) = p
            .exit
            .map(|e| (e.status, Some(timestamp(e.at))))
            .unwrap_or((0, None));
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.clone(),
            pid: p.pid,
            status: p.life.status().into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status: status,
            exited_at: at.into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    pub(super) fn pids(&self, req: PidsRequest) -> Result<PidsResponse> {
        let cell = self.cell(&req.id)?;
        let runtime = lock(&cell.state).runtime.clone();
        let pids = self.backend.pids(&runtime)?;
        let c = lock(&cell.state);
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let exec = c
                .execs
                .iter()
                .find(|(_, p)| p.pid == pid && p.life.status() == Status::RUNNING);
            let info = match exec {
                Some((exec_id, _)) => {
                    let details = protocol::options::ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    protocol::pack(&details).ok().into()
                }
                None => MessageField::none(),
            };
            processes.push(ProcessInfo {
                pid,
                info,
                ..Default::default()
            });
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    pub(super) fn stats(&self, r: StatsRequest) -> Result<StatsResponse> {
        let (runtime, pid, exited_cgroup) = {
            let cell = self.cell(&r.id)?;
            let c = lock(&cell.state);
            let exited = c.init.exit.is_some() || c.init.held_exit.is_some();
            (
                c.runtime.clone(),
                c.init.pid,
                c.cgroup.clone().filter(|_| exited),
            )
        };
        let stats = match exited_cgroup {
            // The init is gone (its pid may be another's now); its cgroup lives until delete.
            Some(cgroup) => cgroup.read()?,
            None => self.backend.stats(&runtime, pid)?,
        };
        Ok(StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    pub(super) fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse> {
        // containerd 2.x reconnects to a sandbox's shim with the sandbox's id.
        let task_pid = match self.cell(&req.id) {
            Ok(cell) => lock(&cell.state).init.pid,
            Err(_) => self.sandbox_pid(&req.id).unwrap_or(0),
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }
}
