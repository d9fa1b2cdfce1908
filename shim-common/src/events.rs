//! Publishing task events to containerd.
//!
//! Events go through a bounded queue to one sender thread, so they leave in the order they
//! were published. While containerd is unreachable (restarting, upgraded, stuck) they wait:
//! the oldest is retried until it is delivered or [`PATIENCE`] old, and the ones behind it
//! keep their place, so a containerd that is back within a minute gets every event, in order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protocol::events::{Envelope, ForwardRequest};

use crate::error::{Context, Result};
use crate::rpc::Client;
use crate::trace;

const EVENTS_SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a task service sends its events. The daemon forwards them to containerd; a guest
/// agent or a test can collect them some other way.
pub trait Publisher: Send + Sync {
    /// Queues `event` under `topic`. Never fails: delivery problems are logged.
    fn publish(&self, topic: &str, event: Any);
}

/// Packs and publishes a typed event.
pub fn publish<M: protocol::TypeUrl>(p: &dyn Publisher, topic: &str, event: &M) {
    match protocol::pack(event) {
        Ok(any) => p.publish(topic, any),
        Err(e) => log::error!("encode {topic} event: {e}"),
    }
}

/// Publishes that the OOM killer struck in container `id`: one place for the event's shape,
/// whoever saw the kill (the host's cgroup watcher, a backend's guest).
pub(crate) fn publish_oom(p: &dyn Publisher, id: &str) {
    let event = protocol::task_events::TaskOOM {
        container_id: id.to_string(),
        ..Default::default()
    };
    publish(p, protocol::topics::TASK_OOM, &event);
}

/// Events held at most: a busy pod's minute (a few execs a second, three events each) with
/// room to spare. Only the queued events take memory, a few hundred bytes each.
pub const QUEUE: usize = 4096;
/// How long an event is retried after it was published before it is given up.
pub const PATIENCE: Duration = Duration::from_secs(90);
/// The pause between attempts to reach containerd: 20 ms doubling to this.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

struct Queued {
    topic: String,
    event: Any,
    at: SystemTime,
    /// The trace of the request that caused the event: its `Forward` carries it on.
    trace: trace::Carried,
}

/// Forwards events to containerd's `containerd.services.events.ttrpc.v1.Events` service.
pub struct RemotePublisher {
    tx: Mutex<Option<Sender<Queued>>>,
    /// Events queued and not yet delivered or given up (the queue's bound, [`QUEUE`]).
    queued: Arc<AtomicUsize>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl RemotePublisher {
    /// Starts the sender thread; it connects to `ttrpc_address` lazily and reconnects.
    pub fn new(ttrpc_address: &str, namespace: &str) -> Result<Arc<RemotePublisher>> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let address = if ttrpc_address.contains("://") {
            ttrpc_address.to_string()
        } else {
            format!("unix://{ttrpc_address}")
        };
        let namespace = namespace.to_string();
        let worker = std::thread::Builder::new()
            .name("events".into())
            .stack_size(256 * 1024)
            .spawn(move || forward(rx, &taken, &address, &namespace))
            .context("spawn event publisher")?;
        Ok(Arc::new(RemotePublisher {
            tx: Mutex::new(Some(tx)),
            queued,
            worker: Mutex::new(Some(worker)),
        }))
    }

    /// Events queued and not yet delivered (or given up).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Stops accepting events and waits up to `timeout` for queued ones to be delivered.
    pub fn close(&self, timeout: Duration) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(worker) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let deadline = Instant::now() + timeout;
        while !worker.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Publisher for RemotePublisher {
    fn publish(&self, topic: &str, event: Any) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match tx {
            Some(tx) => {
                // Never block the caller (it may hold a container's lock): a full queue means
                // containerd has been unreachable for a long while; drop and say so.
                if self.queued.fetch_add(1, Ordering::SeqCst) >= QUEUE {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    log::error!("event queue full ({QUEUE}); dropped {topic}");
                    return;
                }
                let q = Queued {
                    topic: topic.to_string(),
                    event,
                    at: SystemTime::now(),
                    trace: trace::Carried::current(),
                };
                if tx.send(q).is_err() {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("event publisher stopped; dropped {topic}");
                }
            }
            None => log::warn!("event publisher closed; dropped {topic}"),
        }
    }
}

fn forward(rx: Receiver<Queued>, queued: &AtomicUsize, address: &str, namespace: &str) {
    let mut client: Option<Client> = None;
    loop {
        let Ok(q) = rx.recv() else { return };
        let req = ForwardRequest {
            envelope: protobuf::MessageField::some(Envelope {
                timestamp: protobuf::MessageField::some(timestamp(q.at)),
                namespace: namespace.to_string(),
                topic: q.topic.clone(),
                event: protobuf::MessageField::some(q.event),
                ..Default::default()
            }),
            ..Default::default()
        };
        let _trace = q.trace.enter();
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if client.is_none() {
                client = Client::connect(address).ok();
            }
            if let Some(c) = &client {
                match c.call(EVENTS_SERVICE, "Forward", &req, FORWARD_TIMEOUT) {
                    Ok(_) => break,
                    Err(e) => {
                        log::debug!("forward {} (attempt {attempt}): {e}", q.topic);
                        client = None;
                    }
                }
            }
            let age = q.at.elapsed().unwrap_or_default();
            if age >= PATIENCE {
                log::error!(
                    "could not deliver {} event to {address} in {:?}; dropped",
                    q.topic,
                    PATIENCE
                );
                break;
            }
            std::thread::sleep(backoff.min(PATIENCE - age));
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A protobuf timestamp for `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}
