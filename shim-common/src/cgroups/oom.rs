//! OOM-kill notifications for every container of a shim, from one thread.
//!
//! A shim serves a whole pod, so one thread waits for all of its containers: on cgroup v1
//! an eventfd per container registered on `memory.oom_control` through
//! `cgroup.event_control`, on v2 one inotify watch per container on `memory.events`, all in
//! one epoll set.
//!
//! Notifications only say "look now"; what counts is the kernel's `oom_kill` counter. A kill
//! is reported when the counter has grown past what was already reported, and the check and
//! the report happen under one lock per container. So one kill is reported once, whether the
//! notification or the container's exit ([`OomWatcher::check`]) sees it first, and a check
//! that runs while the thread reports waits for that report: whoever publishes the exit after
//! `check` returns publishes it after the OOM. The kernel raises the counter before it sends
//! `SIGKILL`, so by the time the reaper sees the victim die the counter already tells.
//!
//! A v1 notification comes when the cgroup *enters* OOM, before the killer picks a victim
//! (and v2 coalesces notifications within 10 ms), so a notification that finds the counter
//! unchanged is re-checked every [`RECHECK`] for up to [`RECHECK_FOR`]: a child killed while
//! the init lives on has no exit to catch it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::{Cgroup, OomCounter};
use crate::error::{Context, Error, Result};

const STOP: u64 = u64::MAX;
const INOTIFY: u64 = u64::MAX - 1;
/// How often a notified cgroup whose counter has not moved yet is looked at again.
const RECHECK: Duration = Duration::from_millis(10);
/// How long after a notification a kill is still expected; an OOM the kernel resolved
/// without killing (or with `oom_kill_disable`) stops being re-checked then.
const RECHECK_FOR: Duration = Duration::from_secs(2);

/// Called with the container id for each OOM kill; runs on the watcher thread or on the
/// thread calling [`OomWatcher::check`], with that container's report lock held.
type OnOom = Box<dyn Fn(&str) + Send + Sync>;

/// Watches the cgroups of any number of containers for OOM kills and reports each kill once.
///
/// ```no_run
/// use shim_common::cgroups::OomWatcher;
/// let watcher = OomWatcher::new(|id| eprintln!("container {id} was OOM-killed"))?;
/// # let init_pid = 1;
/// watcher.add("c1", init_pid)?;
/// // ... the init process exited: report a kill not seen yet before saying so.
/// watcher.check("c1");
/// watcher.remove("c1");
/// # Ok::<(), shim_common::Error>(())
/// ```
pub struct OomWatcher {
    shared: Arc<Shared>,
}

struct Shared {
    epoll: Epoll,
    stop: EventFd,
    /// Made on the first v2 container: a v1 host never needs it.
    inotify: OnceLock<Option<Inotify>>,
    watches: Mutex<Watches>,
    on_oom: OnOom,
}

#[derive(Default)]
struct Watches {
    by_id: HashMap<String, Arc<Watch>>,
    /// v1: the eventfd's number, which is the epoll token.
    by_token: HashMap<u64, Arc<Watch>>,
    by_wd: HashMap<WatchDescriptor, Arc<Watch>>,
}

struct Watch {
    id: String,
    counter: OomCounter,
    state: Mutex<Reported>,
    source: Source,
}

struct Reported {
    /// `oom_kill` as last reported; `None` when the kernel does not count kills (v1 before
    /// Linux 4.13): then every notification of a live cgroup is a report.
    kills: Option<u64>,
    removed: bool,
}

enum Source {
    V1 {
        efd: EventFd,
        /// Must stay open while the event is registered.
        _oom_control: OwnedFd,
    },
    V2 {
        wd: WatchDescriptor,
    },
}

/// What a look at a cgroup's counter found.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Reported, or nothing that a later look could change.
    Done,
    /// The counter is readable and has not grown: a kill may still come.
    Unchanged,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OomWatcher {
    /// Starts the watcher thread; `on_oom` is called once per OOM kill with the container id.
    pub fn new(on_oom: impl Fn(&str) + Send + Sync + 'static) -> Result<OomWatcher> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .context("eventfd")?;
        epoll
            .add(&stop, EpollEvent::new(EpollFlags::EPOLLIN, STOP))
            .context("epoll_ctl")?;
        let shared = Arc::new(Shared {
            epoll,
            stop,
            inotify: OnceLock::new(),
            watches: Mutex::new(Watches::default()),
            on_oom: Box::new(on_oom),
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("oom".into())
            .stack_size(128 * 1024)
            .spawn(move || thread.run())
            .context("spawn OOM watcher")?;
        Ok(OomWatcher { shared })
    }

    /// Watches the memory cgroup of `pid` (a container's init) as container `id`. Kills that
    /// happened before this call are not reported.
    pub fn add(&self, id: &str, pid: u32) -> Result<()> {
        let cgroup = Cgroup::of(pid)?;
        let counter = OomCounter::of(&cgroup)
            .ok_or_else(|| Error::NotFound(format!("memory cgroup of pid {pid}")))?;
        let state = Mutex::new(Reported {
            kills: counter.read(),
            removed: false,
        });
        self.remove(id);
        let s = &self.shared;
        let mut w = lock(&s.watches);
        match cgroup {
            Cgroup::V1(dirs) => {
                let dir = dirs
                    .get("memory")
                    .ok_or_else(|| Error::NotFound(format!("memory cgroup of pid {pid}")))?;
                let (efd, oom_control) = register_v1(dir)?;
                let token = efd.as_raw_fd() as u64;
                let watch = Arc::new(Watch {
                    id: id.to_string(),
                    counter,
                    state,
                    source: Source::V1 {
                        efd,
                        _oom_control: oom_control,
                    },
                });
                if let Source::V1 { efd, .. } = &watch.source {
                    s.epoll
                        .add(efd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                        .context("epoll_ctl")?;
                }
                w.by_token.insert(token, watch.clone());
                w.by_id.insert(id.to_string(), watch);
            }
            Cgroup::V2(_) => {
                let inotify = s.inotify()?;
                let wd = inotify
                    .add_watch(&counter.file, AddWatchFlags::IN_MODIFY)
                    .with_context(|| format!("inotify {}", counter.file.display()))?;
                let watch = Arc::new(Watch {
                    id: id.to_string(),
                    counter,
                    state,
                    source: Source::V2 { wd },
                });
                w.by_wd.insert(wd, watch.clone());
                w.by_id.insert(id.to_string(), watch);
            }
        }
        Ok(())
    }

    /// Reports a kill of container `id` that no notification reported yet. Call it before
    /// publishing the exit of the container's init, so the OOM event comes first.
    pub fn check(&self, id: &str) {
        let watch = lock(&self.shared.watches).by_id.get(id).cloned();
        if let Some(watch) = watch {
            self.shared.report(&watch, false);
        }
    }

    /// Stops watching container `id`; nothing is reported for it afterwards.
    pub fn remove(&self, id: &str) {
        let s = &self.shared;
        let mut w = lock(&s.watches);
        let Some(watch) = w.by_id.remove(id) else {
            return;
        };
        lock(&watch.state).removed = true;
        match &watch.source {
            Source::V1 { efd, .. } => {
                let _ = s.epoll.delete(efd);
                w.by_token.remove(&(efd.as_raw_fd() as u64));
            }
            Source::V2 { wd } => {
                // The watch is gone already when the cgroup was removed first.
                if let Some(Some(inotify)) = s.inotify.get() {
                    let _ = inotify.rm_watch(*wd);
                }
                w.by_wd.remove(wd);
            }
        }
    }
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        let _ = self.shared.stop.write(1);
    }
}

/// Asks the kernel to signal a new eventfd when the memory cgroup `dir` runs out of memory.
fn register_v1(dir: &Path) -> Result<(EventFd, OwnedFd)> {
    let efd =
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).context("eventfd")?;
    let path = dir.join("memory.oom_control");
    let oom_control = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    let line = format!("{} {}", efd.as_raw_fd(), oom_control.as_raw_fd());
    let ctl = dir.join("cgroup.event_control");
    std::fs::write(&ctl, line).with_context(|| format!("write {}", ctl.display()))?;
    Ok((efd, oom_control.into()))
}

impl Shared {
    fn inotify(&self) -> Result<&Inotify> {
        self.inotify
            .get_or_init(|| {
                let made =
                    Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).and_then(|i| {
                        self.epoll
                            .add(&i, EpollEvent::new(EpollFlags::EPOLLIN, INOTIFY))
                            .map(|()| i)
                    });
                made.map_err(|e| log::warn!("OOM watcher: inotify: {e}"))
                    .ok()
            })
            .as_ref()
            .ok_or_else(|| Error::Runtime("OOM watcher: no inotify".into()))
    }

    fn run(&self) {
        let mut events = [EpollEvent::empty(); 16];
        // Notified cgroups whose kill has not shown in the counter yet, with a deadline.
        let mut pending: Vec<(Arc<Watch>, Instant)> = Vec::new();
        loop {
            let timeout = if pending.is_empty() {
                EpollTimeout::NONE
            } else {
                EpollTimeout::from(RECHECK.as_millis() as u16)
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("OOM watcher stopped: epoll_wait: {e}");
                    return;
                }
            };
            let mut notified = Vec::new();
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return,
                    INOTIFY => self.on_inotify(&mut notified),
                    token => {
                        let watch = lock(&self.watches).by_token.get(&token).cloned();
                        if let Some(watch) = watch {
                            if let Source::V1 { efd, .. } = &watch.source {
                                // Level-triggered: drain it, or epoll wakes us forever.
                                let _ = efd.read();
                            }
                            notified.push(watch);
                        }
                    }
                }
            }
            let now = Instant::now();
            for watch in notified {
                if self.report(&watch, true) == Outcome::Unchanged
                    && !pending.iter().any(|(w, _)| Arc::ptr_eq(w, &watch))
                {
                    pending.push((watch, now + RECHECK_FOR));
                }
            }
            pending.retain(|(watch, deadline)| {
                self.report(watch, false) == Outcome::Unchanged && now < *deadline
            });
        }
    }

    fn on_inotify(&self, notified: &mut Vec<Arc<Watch>>) {
        let Some(Some(inotify)) = self.inotify.get() else {
            return;
        };
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                return;
            }
            let mut w = lock(&self.watches);
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The cgroup is gone; `remove` will find the id alone.
                    w.by_wd.remove(&e.wd);
                } else if let Some(watch) = w.by_wd.get(&e.wd) {
                    notified.push(watch.clone());
                }
            }
        }
    }

    /// Reports new kills of `watch`'s cgroup; `notified` when the kernel just signalled it.
    fn report(&self, watch: &Watch, notified: bool) -> Outcome {
        let mut st = lock(&watch.state);
        if st.removed {
            return Outcome::Done;
        }
        match (st.kills, watch.counter.read()) {
            (Some(seen), Some(now)) if now > seen => {
                st.kills = Some(now);
                (self.on_oom)(&watch.id);
                Outcome::Done
            }
            (Some(_), Some(_)) => Outcome::Unchanged,
            // The counter appears only when it grew from nothing, e.g. a cgroup file that
            // was unreadable at registration.
            (None, Some(now)) if now > 0 => {
                st.kills = Some(now);
                (self.on_oom)(&watch.id);
                Outcome::Done
            }
            // No counter: the v1 eventfd also fires when the cgroup is removed, so only a
            // notification of a cgroup that still exists is an OOM.
            (None, None) if notified && watch.counter.file.exists() => {
                (self.on_oom)(&watch.id);
                Outcome::Done
            }
            // Nothing to wait for: no counter, or the cgroup is gone.
            _ => Outcome::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::mpsc;

    fn fake_watch(file: PathBuf, kills: Option<u64>) -> Watch {
        Watch {
            id: "c1".into(),
            counter: OomCounter { file },
            state: Mutex::new(Reported {
                kills,
                removed: false,
            }),
            source: Source::V2 {
                wd: {
                    // A real descriptor is not needed to test reporting.
                    let i = Inotify::init(InitFlags::IN_CLOEXEC).unwrap();
                    i.add_watch("/", AddWatchFlags::IN_ATTRIB).unwrap()
                },
            },
        }
    }

    #[test]
    fn one_kill_is_reported_once() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let watcher = OomWatcher::new(move |id| {
            let _ = lock(&tx).send(id.to_string());
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "oom 0\noom_kill 0\n").unwrap();
        let watch = fake_watch(file.clone(), Some(0));
        let s = &watcher.shared;
        s.report(&watch, true);
        assert!(rx.try_recv().is_err(), "no kill yet");
        std::fs::write(&file, "oom 1\noom_kill 1\n").unwrap();
        s.report(&watch, false); // the exit path sees it first
        s.report(&watch, true); // then the notification arrives
        assert_eq!(rx.try_recv().unwrap(), "c1");
        assert!(rx.try_recv().is_err(), "reported twice");
        std::fs::write(&file, "oom 3\noom_kill 3\n").unwrap();
        s.report(&watch, true);
        assert_eq!(rx.try_recv().unwrap(), "c1");
        lock(&watch.state).removed = true;
        std::fs::write(&file, "oom 4\noom_kill 4\n").unwrap();
        s.report(&watch, true);
        assert!(rx.try_recv().is_err(), "reported after removal");
    }

    #[test]
    fn without_a_counter_only_live_notifications_count() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let watcher = OomWatcher::new(move |id| {
            let _ = lock(&tx).send(id.to_string());
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.oom_control");
        std::fs::write(&file, "oom_kill_disable 0\nunder_oom 1\n").unwrap();
        let watch = fake_watch(file.clone(), None);
        watcher.shared.report(&watch, false);
        assert!(rx.try_recv().is_err(), "exit check without a counter");
        watcher.shared.report(&watch, true);
        assert_eq!(rx.try_recv().unwrap(), "c1");
        std::fs::remove_file(&file).unwrap();
        watcher.shared.report(&watch, true);
        assert!(rx.try_recv().is_err(), "cgroup removal is no OOM");
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let watcher = OomWatcher::new(|_| panic!("nothing to report")).unwrap();
        watcher.check("nope");
        watcher.remove("nope");
        assert!(watcher.add("x", u32::MAX).is_err());
    }
}
