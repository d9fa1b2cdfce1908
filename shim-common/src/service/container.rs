//! What the service keeps of each container and its processes.

use super::*;

pub(super) struct Proc {
    pub(super) pid: u32,
    /// Its state, and the backend call in flight on it ([`Lifecycle`]).
    pub(super) life: Lifecycle,
    /// Reaped during its `Start`: applied once the start event is out.
    pub(super) held_exit: Option<Exit>,
    pub(super) exit: Option<Exit>,
    pub(super) paths: StdioPaths,
    pub(super) io: Option<Io>,
    /// The OCI process spec of an exec, kept from `Exec` until `Start`.
    pub(super) spec: Vec<u8>,
}

impl Proc {
    pub(super) fn new(life: Lifecycle, paths: StdioPaths) -> Proc {
        Proc {
            pid: 0,
            life,
            held_exit: None,
            exit: None,
            paths,
            io: None,
            spec: Vec::new(),
        }
    }
}

/// A container as the SDK keeps it; `C` is the backend's own state of it.
pub(super) struct Container<C> {
    pub(super) id: String,
    pub(super) bundle: String,
    /// The backend's container, for every backend call about it. Cloned out of the lock, so
    /// a call that takes its time does not hold the container.
    pub(super) runtime: Arc<C>,
    /// Whether the SDK mounted the rootfs (and unmounts it after the backend's delete).
    pub(super) rootfs_mounted: bool,
    pub(super) init: Proc,
    pub(super) execs: HashMap<String, Proc>,
    /// Execs started (or starting) and not yet exited: the init's exit waits for them.
    pub(super) running_execs: usize,
    pub(super) deferred_init_exit: Option<Exit>,
    /// Owner of the stdio pipes of every process of the container (`io_uid`/`io_gid`).
    pub(super) io_owner: IoOwner,
    /// `Wait` calls answered when their process exits (or is deleted), by exec id.
    pub(super) waiters: Vec<(String, Waiter)>,
    /// Deleted: waits that arrive now find nothing.
    pub(super) deleted: bool,
    /// No pid namespace of its own ([`shares_pid_namespace`]).
    pub(super) kill_all_on_exit: bool,
    /// The init's cgroup, found at create (host cgroups only): `Stats` after the init's
    /// exit reads it.
    pub(super) cgroup: Option<crate::os::CgroupMetrics>,
}

/// The answer to a `Wait`, delivered whenever the process exits.
pub(super) type Waiter = Box<dyn FnOnce(Result<WaitResponse>) + Send>;

pub(super) fn wait_response(exit: Exit) -> WaitResponse {
    WaitResponse {
        exit_status: exit.status,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    }
}

impl<C> Container<C> {
    pub(super) fn process(&self, exec_id: &str) -> Result<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    pub(super) fn process_mut(&mut self, exec_id: &str) -> Result<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = &self.id;
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {id}")))
    }
}

pub(super) struct Cell<C> {
    pub(super) state: Mutex<Container<C>>,
    /// Exits reaped for this container and not yet applied, in reap order.
    pub(super) exits: Mutex<ExitQueue>,
}

/// Whether the processes of the container in `bundle` can outlive its init: it has no pid
/// namespace of its own (the host's, or one it joins by path), so the kernel does not end
/// them with the init. An unreadable spec counts as yes, the safe side; containerd's runc
/// shim decides the same way (`ShouldKillAllOnExit`).
pub(super) fn shares_pid_namespace(bundle: &std::path::Path) -> bool {
    let Ok(spec) = crate::bundle::spec(bundle) else {
        return true;
    };
    let own = spec["linux"]["namespaces"].as_array().is_some_and(|ns| {
        ns.iter()
            .any(|n| n["type"] == "pid" && n["path"].as_str().is_none_or(str::is_empty))
    });
    !own
}
