//! The shim's containers and the ones on their way: reservations, `Join`, `Shutdown`.

use super::*;

/// The shim's containers, and the ones on their way: what `Shutdown` must not abandon.
///
/// containerd shuts a group's shim down when its last task is deleted, while `start` for
/// the group's next container may already have found that shim, or its `Create` may be in
/// flight. So a `Create` reserves its id here before anything runs (a duplicate is refused,
/// not let through to undo the first), `start` announces the container it found the shim
/// for (`Join`), and `Shutdown` declines while either is pending. Once it accepts, new
/// containers are refused and `start` makes a new shim.
pub(super) struct Table<C> {
    pub(super) cells: HashMap<String, Arc<Cell<C>>>,
    pub(super) creating: HashSet<String>,
    /// Containers `start` found this shim for, and when, until their `Create` arrives.
    pub(super) joined: HashMap<String, Instant>,
    /// The sandboxes of containerd's sandbox API: the shim stays while one is there.
    pub(super) sandboxes: HashMap<String, Arc<SandboxCell>>,
    /// Shutdown accepted: the shim is exiting.
    pub(super) closing: bool,
}

impl<C> Default for Table<C> {
    fn default() -> Self {
        Table {
            cells: HashMap::new(),
            creating: HashSet::new(),
            joined: HashMap::new(),
            sandboxes: HashMap::new(),
            closing: false,
        }
    }
}

impl<C> Table<C> {
    /// Why the shim may not exit now, or `None` if it may. Forgets expired joins.
    pub(super) fn busy(&mut self) -> Option<String> {
        self.joined.retain(|_, at| at.elapsed() < JOIN_TIMEOUT);
        if let Some(id) = self.cells.keys().chain(&self.creating).next() {
            return Some(format!("container {id}"));
        }
        if let Some(id) = self.sandboxes.keys().next() {
            return Some(format!("sandbox {id}"));
        }
        self.joined
            .keys()
            .next()
            .map(|id| format!("container {id} announced by start"))
    }
}

/// An id reserved for a `Create` in flight ([`Inner::reserve`]).
pub(super) struct Reserved<'a, B: Backend> {
    pub(super) inner: &'a Inner<B>,
    pub(super) id: String,
}

impl<B: Backend> Drop for Reserved<'_, B> {
    fn drop(&mut self) {
        lock(&self.inner.containers).creating.remove(&self.id);
    }
}

impl<B: Backend> Inner<B> {
    pub(super) fn cell(&self, id: &str) -> Result<Arc<Cell<B::Container>>> {
        lock(&self.containers)
            .cells
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    /// Reserves `id` for a `Create`: refused if the container exists or is being created,
    /// or the shim is exiting. The reservation ends with the returned guard.
    pub(super) fn reserve(&self, id: &str) -> Result<Reserved<'_, B>> {
        let mut t = lock(&self.containers);
        if t.closing {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: the shim is shutting down"
            )));
        }
        // The `Create` that `start` announced has come, whatever its answer.
        t.joined.remove(id);
        if t.cells.contains_key(id) || !t.creating.insert(id.to_string()) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        Ok(Reserved {
            inner: self,
            id: id.to_string(),
        })
    }

    /// `start` found this shim for container `id` ([`GROUP_SERVICE`]): refused once the
    /// shim is exiting, so `start` makes a new one; otherwise shutdown waits for its `Create`.
    pub(super) fn join(&self, req: ConnectRequest) -> Result<()> {
        validate_id("container", &req.id)?;
        let mut t = lock(&self.containers);
        if t.closing {
            return Err(Error::FailedPrecondition(
                "the shim is shutting down".into(),
            ));
        }
        t.joined.insert(req.id, Instant::now());
        Ok(())
    }

    /// Exits (through the hook) unless a container is there or on its way ([`Table`]). A
    /// shutdown declined only for a container `start` announced is tried again when that
    /// announcement expires, so a `Create` that never comes does not keep the shim alive.
    pub(super) fn shutdown(&self, _req: ShutdownRequest) -> Result<()> {
        let mut t = lock(&self.containers);
        match t.busy() {
            None => {
                t.closing = true;
                (self.on_shutdown)();
            }
            Some(why) => {
                log::debug!("shutdown declined: {why}");
                let only_joined = t.cells.is_empty() && t.creating.is_empty();
                if only_joined {
                    self.shutdown_after(JOIN_TIMEOUT);
                }
            }
        }
        Ok(())
    }

    /// Tries [`Inner::shutdown`] again after `delay`, if the service is still there.
    pub(super) fn shutdown_after(&self, delay: Duration) {
        let me = self.me.clone();
        let spawned = std::thread::Builder::new()
            .name("shutdown-retry".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                std::thread::sleep(delay);
                if let Some(inner) = me.upgrade() {
                    let _ = inner.shutdown(ShutdownRequest::default());
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot schedule a later shutdown: {e}");
        }
    }
}
