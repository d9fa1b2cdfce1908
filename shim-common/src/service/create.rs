//! `Create` and `Exec`: a container, or a process in one, comes into being.

use super::*;

impl<B: Backend> Inner<B> {
    /// A chain of steps, each undone by a guard if a later one fails: reserve the id (a
    /// duplicate is refused before anything runs), decode and keep the options, open the
    /// stdio, mount the rootfs, let the backend create; a terminal's master comes last.
    pub(super) fn create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        validate_id("container", &req.id)?;
        let reserved = self.reserve(&req.id)?;
        let options: B::Options = options::decode(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        options::save(&bundle, &options)?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let owner = options.io_owner();
        let ctx = IoContext {
            id: &req.id,
            namespace: &self.namespace,
        };
        let span = trace::span("stdio open");
        let (pending, stdio) = PendingIo::open(B::HOST_STDIO, &paths, owner, ctx)?;
        drop(span);
        let rootfs = match B::MOUNTS_ROOTFS {
            true => {
                let _span = trace::span("rootfs mount");
                Some(BundleRootfs::mount(&bundle, &req.rootfs)?)
            }
            false => None,
        };
        let starting = self.starting();
        let created = self.backend.create(CreateRequest {
            id: &req.id,
            bundle: &bundle,
            rootfs: &req.rootfs,
            options: &options,
            checkpoint: &req.checkpoint,
            terminal: req.terminal,
            console_socket: pending.console_socket(),
            stdio,
            carried: pending.carried(),
        })?;
        let runtime = Arc::new(created.container);
        let io = match pending.finish(&paths) {
            Ok(io) => io,
            Err(e) => {
                // Before the rootfs guard unmounts what the container still uses.
                let _ = self.backend.delete(&runtime);
                return Err(e);
            }
        };
        let rootfs_mounted = rootfs.is_some_and(BundleRootfs::keep);
        let pid = created.pid.unwrap_or(0);
        let early = created.pid.and_then(|pid| self.claim(pid, &req.id, ""));
        let mut init = Proc::new(Lifecycle::init(&req.id), paths.clone());
        init.pid = pid;
        init.io = Some(io);
        let cell = Arc::new(Cell {
            exits: Mutex::new(ExitQueue::default()),
            state: Mutex::new(Container {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                runtime,
                rootfs_mounted,
                init,
                execs: HashMap::new(),
                running_execs: 0,
                deferred_init_exit: None,
                io_owner: owner,
                waiters: Vec::new(),
                deleted: false,
                kill_all_on_exit: shares_pid_namespace(&bundle),
                cgroup: (self.backend.host_cgroups() && pid > 0)
                    .then(|| crate::os::CgroupMetrics::of(pid))
                    .flatten(),
            }),
        });
        lock(&self.containers)
            .cells
            .insert(req.id.clone(), cell.clone());
        drop(reserved);
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: paths.stdin,
                stdout: paths.stdout,
                stderr: paths.stderr,
                terminal: paths.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_CREATE, &event);
        if self.backend.host_cgroups() {
            if let Some(w) = self.oom_watcher() {
                if let Err(e) = w.add(&req.id, pid) {
                    log::warn!("no OOM events for container {}: {e}", req.id);
                }
            }
        }
        if let Some(exit) = early {
            let drain = reaped(&mut lock(&cell.state), "");
            self.exit_after_output(cell, String::new(), exit, drain);
        }
        drop(starting);
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    pub(super) fn exec(&self, req: ExecProcessRequest) -> Result<()> {
        validate_id("exec", &req.exec_id)?;
        let spec = req
            .spec
            .as_ref()
            .map(|s| s.value.as_slice())
            .unwrap_or_default();
        let spec = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(spec)
            .and_then(|mut spec| {
                // The request decides, as in containerd's runc shim: the Go client sends the
                // container's process spec (`terminal: false`) with `terminal` on the request.
                spec.insert("terminal".into(), req.terminal.into());
                serde_json::to_vec(&spec)
            })
            .map_err(|e| {
                Error::InvalidArgument(format!("exec {} process spec: {e}", req.exec_id))
            })?;
        let cell = self.cell(&req.id)?;
        let mut c = lock(&cell.state);
        if c.init.life.status() == Status::STOPPED {
            return Err(Error::FailedPrecondition(format!(
                "container {} is stopped",
                req.id
            )));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!("exec {}", req.exec_id)));
        }
        let mut p = Proc::new(
            Lifecycle::exec(&req.exec_id),
            StdioPaths {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
            },
        );
        p.spec = spec;
        c.execs.insert(req.exec_id.clone(), p);
        let event = TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        };
        publish(&*self.publisher, topics::TASK_EXEC_ADDED, &event);
        Ok(())
    }
}
