//! The host's end of the channel to the guest agent: one multiplexed ttrpc connection
//! carrying the task calls (the guest's own task service), the agent's stdio calls, and
//! the guest's events; dialled again when it is lost while the VM lives.
//!
//! A lost connection fails the calls in flight on it with `Unavailable` (the agent may or
//! may not have done what they asked); the first of them to notice dials the agent again,
//! a bounded number of times, and says `Hello`. The agent serves the same task service on
//! the new connection ([`shim_common::serve_each`]), so later calls find every container
//! as it was, and the events long-poll resumes where it stopped.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protobuf::Message;
use protocol::agent::{HelloRequest, HelloResponse};
use protocol::events::Envelope;
use shim_common::peer_events::EVENTS_SERVICE;
use shim_common::rpc::Client;
use shim_common::{Error, Result};

/// How long a task call may take in the guest (a `runc create` under TCG takes ~0.3 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times a lost connection is dialled again before the VM counts as unreachable.
pub const RECONNECT_ATTEMPTS: u32 = 5;
/// The wait before the first of those attempts; doubled before each next one.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(20);
/// How long each of those attempts may take (dial and `Hello`), at most.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait between dials while the guest is not listening yet (vsock, booting).
const DIAL_RETRY: Duration = Duration::from_millis(10);
/// How long the first dial may wait for the guest to take the connection; doubled after
/// each one that was not taken, up to [`DIAL_ATTEMPT_MAX`]. A vsock `CONNECT` sent while
/// the guest's driver is still coming up can be left unanswered for good (the device holds
/// it until the guest next moves its queues): a fresh one gets through once it listens.
const DIAL_ATTEMPT_FIRST: Duration = Duration::from_millis(500);
/// The longest a single dial may wait.
const DIAL_ATTEMPT_MAX: Duration = Duration::from_secs(8);

/// Each connection's stream ids start `2^STREAM_ID_BITS` past the last one's.
const STREAM_ID_BITS: u32 = 24;

/// Makes a new connection to the agent within the timeout it is given.
pub type Dial = Box<dyn Fn(Duration) -> Result<OwnedFd> + Send + Sync>;

/// The guest agent, as the host calls it.
pub struct Guest {
    dial: Dial,
    /// What [`Guest::connect`]'s `Hello` answered: a reconnect must find the same agent.
    hello: HelloResponse,
    current: Mutex<Current>,
    /// Held while dialling again, so one caller does it for all.
    redial: Mutex<()>,
    /// Set once the VM is stopping or gone: a lost connection is then final.
    retired: AtomicBool,
    /// How long a reconnect's dial and `Hello` may take.
    timeout: Duration,
    /// Where each process's output relays stand, for its exit to wait on.
    pub relays: crate::relay::Relays,
}

struct Current {
    client: Arc<Client>,
    /// Counts connections: a caller that saw generation `n` fail reconnects only if no one
    /// has since.
    generation: u64,
}

impl Guest {
    /// The agent `dial` reaches, once it answers `Hello` within `timeout`: the VM has booted
    /// and serves. Dials again while the guest refuses (a vsock guest that is not listening
    /// yet); a virtio-serial port's socket connects at once and the `Hello` waits there.
    pub fn connect(dial: Dial, timeout: Duration) -> Result<(Arc<Guest>, HelloResponse)> {
        let (client, hello) = hello_within(&dial, timeout, true, 1)?;
        let guest = Guest {
            dial,
            hello: hello.clone(),
            current: Mutex::new(Current {
                client: Arc::new(client),
                generation: 1,
            }),
            redial: Mutex::new(()),
            retired: AtomicBool::new(false),
            timeout: timeout.min(RECONNECT_TIMEOUT),
            relays: Default::default(),
        };
        Ok((Arc::new(guest), hello))
    }

    /// A call of the guest's task service.
    pub fn task<M: Message>(&self, method: &str, req: &impl Message) -> Result<M> {
        self.call(protocol::TASK_SERVICE_V2, method, req, CALL_TIMEOUT)
    }

    /// A call of the guest's sandbox service (the SDK's, with the runc backend's host pods).
    pub fn sandbox<M: Message>(&self, method: &str, req: &impl Message) -> Result<M> {
        self.call(protocol::SANDBOX_SERVICE, method, req, CALL_TIMEOUT)
    }

    /// A sandbox call that waits as long as the VM lives (`WaitSandbox`), made again on a
    /// new connection after a reconnect.
    pub fn sandbox_wait<M: Message>(&self, method: &str, req: &impl Message) -> Result<M> {
        self.call_again(protocol::SANDBOX_SERVICE, method, req, Duration::MAX)
    }

    /// A call of the agent's own service; `timeout` `Duration::MAX` waits as long as the
    /// connection lives (a pending `ReadStdio`).
    pub fn agent<M: Message>(
        &self,
        method: &str,
        req: &impl Message,
        timeout: Duration,
    ) -> Result<M> {
        self.call(protocol::AGENT_SERVICE, method, req, timeout)
    }

    /// A call of the agent's own service that may be made twice (its request says
    /// where it stands, as `ReadStdio`'s and `WriteStdin`'s offsets do): across a
    /// reconnect it is made again on the new connection, so only the VM's end ends it.
    pub fn agent_again<M: Message>(
        &self,
        method: &str,
        req: &impl Message,
        timeout: Duration,
    ) -> Result<M> {
        self.call_again(protocol::AGENT_SERVICE, method, req, timeout)
    }

    /// The guest's next event, waiting as long as the VM lives: across a reconnect, the
    /// long-poll resumes on the new connection (the agent kept what was queued).
    pub fn next_event(&self) -> Result<Envelope> {
        let empty = protobuf::well_known_types::empty::Empty::new();
        self.call_again(EVENTS_SERVICE, "Next", &empty, Duration::MAX)
    }

    fn call_again<M: Message>(
        &self,
        service: &str,
        method: &str,
        req: &impl Message,
        timeout: Duration,
    ) -> Result<M> {
        loop {
            let (client, generation) = self.current();
            match client.call_as(service, method, req, timeout) {
                Err(Error::Unavailable(why)) => self.lost(generation, method, &why)?,
                res => return res.map_err(guest_error),
            }
        }
    }

    /// How many connections this has made: 1 until a reconnect.
    pub fn connections(&self) -> u64 {
        self.current().1
    }

    /// The VM is stopping or gone: a lost connection is not dialled again.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Whether [`Guest::retire`] was called.
    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn call<M: Message>(
        &self,
        service: &str,
        method: &str,
        req: &impl Message,
        timeout: Duration,
    ) -> Result<M> {
        let (client, generation) = self.current();
        let started = std::time::Instant::now();
        let res = client.call_as(service, method, req, timeout);
        log::debug!("guest {method}: {:?}", started.elapsed());
        match res {
            Err(Error::Unavailable(why)) => {
                self.lost(generation, method, &why)?;
                Err(Error::Unavailable(format!(
                    "the connection to the VM's agent was lost during {method} ({why}); \
                     the agent is reachable again, but whether it did this is unknown"
                )))
            }
            res => res.map_err(guest_error),
        }
    }

    fn current(&self) -> (Arc<Client>, u64) {
        let c = lock(&self.current);
        (c.client.clone(), c.generation)
    }

    /// Connection `generation` failed `method` with `why`: dials again unless someone did
    /// meanwhile. `Ok` once a connection is up; `Unavailable` if the VM is gone or did
    /// not answer [`RECONNECT_ATTEMPTS`] dials.
    fn lost(&self, generation: u64, method: &str, why: &str) -> Result<()> {
        let gone = || Error::Unavailable(format!("the VM is gone: {why}"));
        if self.retired.load(Ordering::Acquire) {
            return Err(gone());
        }
        let _one = lock(&self.redial);
        if self.current().1 != generation {
            return Ok(());
        }
        log::warn!(
            "the connection to the VM's agent was lost during {method} ({why}); dialling it again (up to {RECONNECT_ATTEMPTS} attempts)"
        );
        let mut backoff = RECONNECT_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=RECONNECT_ATTEMPTS {
            std::thread::sleep(backoff);
            backoff *= 2;
            if self.retired.load(Ordering::Acquire) {
                return Err(gone());
            }
            let generation = generation + 1;
            match hello_within(&self.dial, self.timeout, false, generation) {
                Ok((client, hello)) => {
                    if hello.boot_ns != self.hello.boot_ns {
                        // Not the agent whose containers we know: nothing of ours is there.
                        last = format!(
                            "a different agent answered (serving since {} ns of its boot, not {})",
                            hello.boot_ns, self.hello.boot_ns
                        );
                        break;
                    }
                    let mut c = lock(&self.current);
                    c.client = Arc::new(client);
                    c.generation = generation;
                    log::warn!(
                        "reconnected to the VM's agent on attempt {attempt}: connection {} of the same boot",
                        hello.connection
                    );
                    return Ok(());
                }
                Err(e) => {
                    log::warn!("reconnect to the VM's agent, attempt {attempt}: {e}");
                    last = e.to_string();
                }
            }
        }
        self.retire();
        Err(Error::Unavailable(format!(
            "the VM is unreachable: its agent's connection was lost ({why}) and dialling it again failed ({last})"
        )))
    }
}

/// A client on a new connection from `dial` whose agent answered `Hello`, all within
/// `timeout`; with `retry`, dials again while the guest refuses (it is still booting). The
/// client of connection `generation` numbers its streams apart from the earlier ones'.
fn hello_within(
    dial: &Dial,
    timeout: Duration,
    retry: bool,
    generation: u64,
) -> Result<(Client, HelloResponse)> {
    let first_stream = ((generation as u32).wrapping_sub(1) << STREAM_ID_BITS) | 1;
    let deadline = Instant::now().checked_add(timeout);
    let left = || {
        deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        })
    };
    let expired = |last: &str| {
        Error::DeadlineExceeded(format!(
            "the VM's agent did not answer within {timeout:?} (last: {last})"
        ))
    };
    let mut attempt = DIAL_ATTEMPT_FIRST;
    loop {
        let stream = match dial(left().min(attempt)) {
            Ok(s) => s,
            Err(e) if !retry => return Err(e),
            Err(e) => {
                if left() <= DIAL_RETRY {
                    return Err(expired(&e.to_string()));
                }
                if matches!(e, Error::DeadlineExceeded(_)) {
                    log::debug!("dial again, the last one was not taken: {e}");
                    attempt = (attempt * 2).min(DIAL_ATTEMPT_MAX);
                } else {
                    std::thread::sleep(DIAL_RETRY);
                }
                continue;
            }
        };
        let client = Client::with_first_stream_id(stream, first_stream)?;
        match client.call_as::<HelloResponse>(
            protocol::AGENT_SERVICE,
            "Hello",
            &HelloRequest::new(),
            left(),
        ) {
            Ok(hello) => return Ok((client, hello)),
            Err(Error::DeadlineExceeded(_)) => return Err(expired("no answer to Hello")),
            // A vsock connection accepted by the device but dropped by a guest that was not
            // ready: dial again.
            Err(Error::Unavailable(why)) if retry && left() > DIAL_RETRY => {
                log::debug!("agent connection closed before Hello: {why}");
                std::thread::sleep(DIAL_RETRY);
            }
            Err(Error::Unavailable(why)) => return Err(expired(&why)),
            Err(e) => return Err(e),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest task service's errors keep their code (a `NotFound` there is one here).
fn guest_error(e: Error) -> Error {
    match e {
        Error::Remote { code, message } => Error::Remote {
            code,
            message: format!("in the VM: {message}"),
        },
        e => e,
    }
}
