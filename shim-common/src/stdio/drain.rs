//! Knowing when a process's output has all reached its destination, so that its exit is
//! published (and `Wait` answered) only then.
//!
//! The shim's copies run on their own schedule ([`super::pump`], a console's thread): when
//! the reaper reports an exit, what the process wrote last may still sit in its pipes. A
//! client that takes the exit as "output complete" — `ctr run --rm`, whose shim exits right
//! after the delete; a `file://` log read on the exit event — would lose that tail.
//! containerd's Go shim waits for its copy goroutines for the same reason.
//!
//! Each copy of a process's output holds a [`Copying`] from the process's [`Drain`]. After
//! the exit, [`Drain::after_exit`] asks every copy to report once it has caught up: it has
//! read its pipe empty (or to EOF) *after* the exit, and its destination took every byte
//! read. Since the process is gone, nothing it wrote can still be on its way into the
//! pipe, so caught up means all of it is delivered. Waiting for EOF instead would wait for
//! every other holder of the pipe — a background child the process left behind — and hold
//! the exit as long as that child lives.
//!
//! The wait is bounded ([`Drain::after_exit`]'s `grace`) and never blocks a thread: the
//! callback runs on one shared thread when the last copy reports or the grace runs out,
//! so a stuck destination (a fifo nobody opened) delays only its own process's exit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::lock;

/// A process's output copies, as one thing to wait for.
///
/// A backend that copies output itself takes a [`Copying`] per copy with
/// [`Drain::copying`]; the SDK's own copies ([`super::ProcessIo`], consoles) already do.
///
/// ```
/// use std::time::Duration;
/// use shim_common::stdio::Drain;
/// let drain = Drain::new();
/// let copy = drain.copying();
/// std::thread::spawn(move || {
///     // ... copy the process's output; dropping `copy` says it is all delivered ...
///     drop(copy);
/// });
/// assert!(drain.wait(Duration::from_secs(5)));
/// ```
#[derive(Clone, Default)]
pub struct Drain {
    state: Arc<State>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("copying", &lock(&self.state.inner).copying)
            .finish()
    }
}

#[derive(Default)]
struct State {
    /// Set once the process exited: copies check it without taking the lock.
    exited: AtomicBool,
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Copies that have not reported yet.
    copying: usize,
    /// Run (once each) when `copying` reaches 0 after the exit.
    on_done: Vec<Box<dyn FnOnce() + Send>>,
}

impl Drain {
    /// A process with no output copies registered yet.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Registers one copy of the process's output; it reports when dropped or through
    /// [`Copying::caught_up`].
    pub fn copying(&self) -> Copying {
        lock(&self.state.inner).copying += 1;
        Copying {
            state: Some(self.state.clone()),
        }
    }

    /// Every copy has reported.
    pub fn is_done(&self) -> bool {
        lock(&self.state.inner).copying == 0
    }

    /// Tells the copies that the process has exited and calls `then(true)` once all have
    /// caught up, or `then(false)` after `grace` if some have not (logged). `then` runs at
    /// once on this thread when nothing is left to copy, otherwise on the drain thread: it
    /// must not block for long, other processes' exits wait behind it.
    pub fn after_exit(
        &self,
        what: &str,
        grace: Duration,
        then: impl FnOnce(bool) + Send + 'static,
    ) {
        self.state.exited.store(true, Ordering::SeqCst);
        let mut inner = lock(&self.state.inner);
        if inner.copying == 0 {
            drop(inner);
            return then(true);
        }
        let timer = match timer() {
            Ok(t) => t,
            Err(e) => {
                drop(inner);
                log::error!("{what}: cannot wait for its output ({e}); publishing its exit now");
                return then(false);
            }
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        // Sent under the lock: the copies report under it too, so `Done` cannot overtake.
        let _ = timer.send(Msg::Hold {
            id,
            what: what.to_string(),
            deadline: Instant::now() + grace,
            then: Box::new(then),
        });
        let done = timer.clone();
        inner.on_done.push(Box::new(move || {
            let _ = done.send(Msg::Done(id));
        }));
        drop(inner);
        // An idle pipe gives the pump no event: wake it to look at its streams.
        super::pump::wake();
    }

    /// Blocks until every copy has reported, up to `timeout`; `false` on timeout. For
    /// tests and simple callers; the task service uses [`Drain::after_exit`].
    pub fn wait(&self, timeout: Duration) -> bool {
        self.state.exited.store(true, Ordering::SeqCst);
        super::pump::wake();
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.state.inner);
        while inner.copying > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inner = self
                .state
                .changed
                .wait_timeout(inner, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        true
    }
}

/// One copy of a process's output, registered with its [`Drain`].
pub struct Copying {
    /// `None` once reported.
    state: Option<Arc<State>>,
}

impl Copying {
    /// The process has exited: the copy should report once it has caught up.
    pub fn asked(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| s.exited.load(Ordering::SeqCst))
    }

    /// Already reported (then there is nothing left to check).
    pub fn reported(&self) -> bool {
        self.state.is_none()
    }

    /// Reports that everything the process wrote is delivered (or will never be: the
    /// destination is gone). Later calls, and the drop, do nothing.
    pub fn caught_up(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let mut inner = lock(&state.inner);
        inner.copying = inner.copying.saturating_sub(1);
        if inner.copying > 0 {
            return;
        }
        state.changed.notify_all();
        // Under the lock, as `after_exit` sends its `Hold` under it; each only queues a
        // message for the drain thread.
        for f in std::mem::take(&mut inner.on_done) {
            f();
        }
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        self.caught_up();
    }
}

impl std::fmt::Debug for Copying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copying")
            .field("reported", &self.reported())
            .finish()
    }
}

enum Msg {
    Hold {
        id: u64,
        what: String,
        deadline: Instant,
        then: Box<dyn FnOnce(bool) + Send>,
    },
    Done(u64),
}

type Held = (String, Instant, Box<dyn FnOnce(bool) + Send>);

/// The drain thread's queue, started on first use.
fn timer() -> crate::error::Result<Sender<Msg>> {
    static TIMER: OnceLock<std::result::Result<Mutex<Sender<Msg>>, String>> = OnceLock::new();
    let tx = TIMER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("drain".into())
            .stack_size(256 * 1024)
            .spawn(move || run(rx))
            .map(|_| Mutex::new(tx))
            .map_err(|e| format!("spawn drain thread: {e}"))
    });
    match tx {
        Ok(tx) => Ok(lock(tx).clone()),
        Err(e) => Err(crate::Error::Runtime(e.clone())),
    }
}

fn run(rx: mpsc::Receiver<Msg>) {
    let mut held: HashMap<u64, Held> = HashMap::new();
    loop {
        let next = held.values().map(|(_, d, _)| *d).min();
        let msg = match next {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(Msg::Hold {
                id,
                what,
                deadline,
                then,
            }) => {
                held.insert(id, (what, deadline, then));
            }
            Ok(Msg::Done(id)) => {
                if let Some((_, _, then)) = held.remove(&id) {
                    then(true);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let expired: Vec<u64> = held
                    .iter()
                    .filter(|(_, (_, d, _))| *d <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in expired {
                    if let Some((what, _, then)) = held.remove(&id) {
                        log::warn!(
                            "{what}: output still not delivered after the exit's grace \
                             period (a child still writing to it, or nobody reading its \
                             fifo?); publishing the exit anyway"
                        );
                        then(false);
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_copy_runs_at_once() {
        let (tx, rx) = mpsc::channel();
        Drain::new().after_exit("p", Duration::from_secs(5), move |ok| tx.send(ok).unwrap());
        assert_eq!(rx.try_recv(), Ok(true));
    }

    #[test]
    fn runs_when_the_last_copy_reports() {
        let drain = Drain::new();
        let (a, mut b) = (drain.copying(), drain.copying());
        let (tx, rx) = mpsc::channel();
        drain.after_exit("p", Duration::from_secs(60), move |ok| tx.send(ok).unwrap());
        assert!(a.asked() && b.asked());
        drop(a);
        assert!(rx.try_recv().is_err(), "ran before every copy reported");
        b.caught_up();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        drop(b); // reported already: nothing more happens
        assert!(drain.is_done());
    }

    #[test]
    fn grace_bounds_the_wait() {
        let drain = Drain::new();
        let _stuck = drain.copying();
        let (tx, rx) = mpsc::channel();
        let t = Instant::now();
        drain.after_exit("p", Duration::from_millis(50), move |ok| {
            tx.send(ok).unwrap()
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(false));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn a_stuck_process_does_not_hold_up_another() {
        let (stuck, quick) = (Drain::new(), Drain::new());
        let _s = stuck.copying();
        let q = quick.copying();
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        stuck.after_exit("stuck", Duration::from_secs(60), move |_| {
            let _ = tx2.send("stuck");
        });
        quick.after_exit("quick", Duration::from_secs(60), move |_| {
            let _ = tx.send("quick");
        });
        drop(q);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok("quick"));
    }
}
