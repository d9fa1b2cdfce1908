//! Publishing task events to containerd.
//!
//! Events go through a bounded queue to one sender thread, so they leave in the order they
//! were published, a slow containerd slows the shim down instead of growing its memory, and
//! a containerd restart costs a few retries instead of lost events.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protocol::events::{Envelope, ForwardRequest};

use crate::error::{Context, Result};
use crate::rpc::Client;

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

const QUEUE: usize = 128;
/// Retries per event: 20 ms doubling to 1 s, about 10 s in all — a containerd restart.
const ATTEMPTS: u32 = 15;

struct Queued {
    topic: String,
    event: Any,
    at: SystemTime,
}

/// Forwards events to containerd's `containerd.services.events.ttrpc.v1.Events` service.
pub struct RemotePublisher {
    tx: Mutex<Option<SyncSender<Queued>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl RemotePublisher {
    /// Starts the sender thread; it connects to `ttrpc_address` lazily and reconnects.
    pub fn new(ttrpc_address: &str, namespace: &str) -> Result<Arc<RemotePublisher>> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let address = if ttrpc_address.contains("://") {
            ttrpc_address.to_string()
        } else {
            format!("unix://{ttrpc_address}")
        };
        let namespace = namespace.to_string();
        let worker = std::thread::Builder::new()
            .name("events".into())
            .stack_size(256 * 1024)
            .spawn(move || forward(rx, &address, &namespace))
            .context("spawn event publisher")?;
        Ok(Arc::new(RemotePublisher {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        }))
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
                let q = Queued {
                    topic: topic.to_string(),
                    event,
                    at: SystemTime::now(),
                };
                // Never block the caller (it may hold a container's lock): a full queue means
                // containerd has been unreachable for a while; drop and say so.
                match tx.try_send(q) {
                    Ok(()) => {}
                    Err(mpsc::TrySendError::Full(_)) => {
                        log::error!("event queue full; dropped {topic}")
                    }
                    Err(mpsc::TrySendError::Disconnected(_)) => {
                        log::warn!("event publisher stopped; dropped {topic}")
                    }
                }
            }
            None => log::warn!("event publisher closed; dropped {topic}"),
        }
    }
}

fn forward(rx: Receiver<Queued>, address: &str, namespace: &str) {
    let mut client: Option<Client> = None;
    loop {
        let q = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(q) => q,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
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
        let mut delivered = false;
        for attempt in 0..ATTEMPTS {
            if client.is_none() {
                client = Client::connect(address).ok();
            }
            if let Some(c) = &client {
                match c.call(EVENTS_SERVICE, "Forward", &req, FORWARD_TIMEOUT) {
                    Ok(_) => {
                        delivered = true;
                        break;
                    }
                    Err(e) => {
                        log::debug!("forward {} (attempt {}): {e}", q.topic, attempt + 1);
                        client = None;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis((20u64 << attempt.min(6)).min(1000)));
        }
        if !delivered {
            log::error!("could not deliver {} event to {address}", q.topic);
        }
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
