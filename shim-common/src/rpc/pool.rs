//! The worker pool that runs request handlers for every connection.
//!
//! Handlers may block for a long time (`Wait` lasts as long as the task), so a job never
//! waits behind a busy worker: if no worker is idle, a new one starts. Idle workers above
//! one retire after a while, so a shim at rest keeps a single worker.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// How long a spare idle worker lingers before it exits.
const LINGER: Duration = Duration::from_secs(5);
/// Workers kept even when idle.
const KEEP: usize = 1;

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    idle: usize,
    workers: usize,
    /// Jobs running now.
    running: usize,
}

#[derive(Default)]
pub(crate) struct Pool {
    state: Mutex<State>,
    ready: Condvar,
    /// Signalled when the last job in flight is done.
    drained: Condvar,
}

impl Pool {
    pub(crate) fn new() -> Arc<Pool> {
        Arc::new(Pool::default())
    }

    /// Runs `job` on an idle worker, or on a new one if all are busy.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        let mut st = self.lock();
        st.queue.push_back(job);
        if st.queue.len() <= st.idle {
            self.ready.notify_one();
            return;
        }
        st.workers += 1;
        let n = st.workers;
        drop(st);
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ttrpc-worker".into())
            .spawn(move || pool.work());
        if let Err(e) = spawned {
            // Nothing else can run the job; a busy worker will pick it up when it is done.
            log::error!("start ttrpc worker {n}: {e}");
            self.lock().workers -= 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn work(&self) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                st.running += 1;
                drop(st);
                job();
                st = self.lock();
                st.running -= 1;
                if st.queue.is_empty() {
                    if st.running == 0 {
                        self.drained.notify_all();
                    }
                    release_free_memory();
                }
                continue;
            }
            st.idle += 1;
            let (guard, timeout) = self
                .ready
                .wait_timeout(st, LINGER)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            st.idle -= 1;
            if timeout.timed_out() && st.queue.is_empty() && st.workers > KEEP {
                st.workers -= 1;
                return;
            }
        }
    }

    /// Waits until no job is queued or running, or `timeout` passed; whether it got there.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .drained
            .wait_timeout_while(st, timeout, |st| st.running > 0 || !st.queue.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        st.running == 0 && st.queue.is_empty()
    }

    #[cfg(test)]
    fn workers(&self) -> usize {
        self.lock().workers
    }
}

/// A request's garbage (decoded specs, responses) leaves free chunks all over the heap
/// that glibc keeps; a shim lives for days mostly idle, so hand whole free pages back.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A job blocked forever (a `Wait`) must not hold up the next one.
    #[test]
    fn blocked_jobs_do_not_starve_others() {
        let pool = Pool::new();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        pool.submit(Box::new(move || {
            let _ = release_rx.recv();
        }));
        for i in 0..3 {
            let done_tx = done_tx.clone();
            pool.submit(Box::new(move || done_tx.send(i).unwrap()));
        }
        let mut got: Vec<i32> = (0..3)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, [0, 1, 2]);
        assert!(pool.workers() >= 2);
        release_tx.send(()).unwrap();
    }
}
