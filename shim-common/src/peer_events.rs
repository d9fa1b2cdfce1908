//! Events for a peer that fetches them over the stream it calls the task service on.
//!
//! A guest agent serves its task service on one byte stream to the host ([`crate::serve_on`])
//! and has no containerd socket to forward events to; nor may it write frames of its own
//! on that stream, which the server writes its answers to. So the host asks for them: it
//! keeps one call to [`EVENTS_SERVICE`]`/Next` pending, answered with the oldest queued
//! event as soon as there is one (like `Wait`, a pending call costs no thread), and calls
//! again. Events keep their order; at most [`crate::events::QUEUE`] wait, the oldest
//! dropped beyond that (and logged). A `Next` whose connection has closed gets nothing: the
//! event waits for the next connection's `Next` ([`crate::serve_each`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use protobuf::well_known_types::any::Any;
use protocol::events::Envelope;

use crate::events::{timestamp, Publisher, QUEUE};
use crate::rpc::{self, Methods, Reply};

/// The ttrpc service the host calls for the events: `Next` takes `Empty` and answers an
/// [`Envelope`].
pub const EVENTS_SERVICE: &str = "containerd.shim.sdk.v1.Events";

/// A [`Publisher`] whose events the peer fetches with `Next` ([`PeerEvents::methods`]).
///
/// ```
/// use shim_common::events::Publisher;
/// use shim_common::peer_events::PeerEvents;
/// let events = PeerEvents::new("default");
/// events.publish("/tasks/exit", Default::default());
/// let methods = events.methods(); // serve them beside the task service
/// assert!(methods.contains_key("/containerd.shim.sdk.v1.Events/Next"));
/// ```
pub struct PeerEvents {
    namespace: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queued: VecDeque<Envelope>,
    /// A `Next` waiting for an event.
    waiting: Option<Reply>,
}

impl PeerEvents {
    /// Events of containerd namespace `namespace`, queued until fetched.
    pub fn new(namespace: &str) -> Arc<PeerEvents> {
        Arc::new(PeerEvents {
            namespace: namespace.to_string(),
            state: Mutex::new(State::default()),
        })
    }

    /// The `Next` method, to serve beside the task service (see [`crate::serve_on`]).
    pub fn methods(self: &Arc<Self>) -> Methods {
        let me = self.clone();
        let next: rpc::Handler = Box::new(move |_req, reply| {
            let mut s = me.state.lock().unwrap_or_else(|e| e.into_inner());
            match s.queued.pop_front() {
                Some(event) => {
                    drop(s);
                    reply.send(Ok(event));
                }
                // A second `Next` replaces the first, whose caller has given up on it.
                None => s.waiting = Some(reply),
            }
        });
        let mut methods = Methods::new();
        methods.insert(format!("/{EVENTS_SERVICE}/Next"), next);
        methods
    }
}

impl PeerEvents {
    /// A new peer is there (it says so in its first call on a new connection): a `Next`
    /// that the last one left waiting is dropped, so no event is handed to a caller that has
    /// gone — also where the closed connection cannot be told from the new one (a
    /// virtio-serial port, one fd for every host).
    pub fn new_peer(&self) {
        let waiting = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .take();
        drop(waiting);
    }
}

impl Publisher for PeerEvents {
    fn publish(&self, topic: &str, event: Any) {
        let envelope = Envelope {
            timestamp: protobuf::MessageField::some(timestamp(SystemTime::now())),
            namespace: self.namespace.clone(),
            topic: topic.to_string(),
            event: protobuf::MessageField::some(event),
            ..Default::default()
        };
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.waiting.take() {
            // Sent under the lock, so a later event cannot overtake it.
            Some(reply) if !reply.peer_gone() => reply.send(Ok(envelope)),
            _ => {
                if s.queued.len() >= QUEUE {
                    s.queued.pop_front();
                    log::error!("event queue full ({QUEUE}); dropped the oldest");
                }
                s.queued.push_back(envelope);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{Client, Server};
    use protobuf::Message;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn next(c: &Client) -> Envelope {
        let empty = protobuf::well_known_types::empty::Empty::new();
        let bytes = c
            .call(EVENTS_SERVICE, "Next", &empty, Duration::from_secs(10))
            .unwrap();
        Envelope::parse_from_bytes(&bytes).unwrap()
    }

    #[test]
    fn a_pending_next_gets_the_next_event_and_queued_ones_keep_their_order() {
        let events = PeerEvents::new("ns");
        let (ours, theirs) = UnixStream::pair().unwrap();
        Server::new(events.methods())
            .spawn(None, vec![OwnedFd::from(theirs)])
            .unwrap();
        let client = Arc::new(Client::new(ours.into()).unwrap());
        let fetching = {
            let client = client.clone();
            std::thread::spawn(move || next(&client))
        };
        std::thread::sleep(Duration::from_millis(50));
        events.publish("/tasks/create", Any::new());
        assert_eq!(fetching.join().unwrap().topic, "/tasks/create");
        events.publish("/tasks/start", Any::new());
        events.publish("/tasks/exit", Any::new());
        assert_eq!(next(&client).topic, "/tasks/start");
        assert_eq!(next(&client).topic, "/tasks/exit");
    }

    #[test]
    fn a_next_left_by_a_peer_that_went_gets_no_event() {
        let events = PeerEvents::new("ns");
        let (ours, theirs) = UnixStream::pair().unwrap();
        Server::new(events.methods())
            .spawn(None, vec![OwnedFd::from(theirs)])
            .unwrap();
        let client = Client::new(ours.into()).unwrap();
        let empty = protobuf::well_known_types::empty::Empty::new();
        // Left waiting in the server when its caller gave up.
        let e = client
            .call(EVENTS_SERVICE, "Next", &empty, Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, crate::Error::DeadlineExceeded(_)), "{e}");
        events.new_peer();
        events.publish("/tasks/exit", Any::new());
        assert_eq!(next(&client).topic, "/tasks/exit");
    }
}
