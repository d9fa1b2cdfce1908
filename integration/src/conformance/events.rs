//! The events service containerd offers its shims, played: every forwarded event kept.

use std::sync::{Arc, Mutex};

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::Message;
use protocol::events::{Envelope, ForwardRequest};
use protocol::events_ttrpc::Events;

/// One event the shim forwarded.
#[derive(Debug, Clone)]
pub struct ForwardedEvent {
    pub namespace: String,
    pub topic: String,
    pub event: Any,
    /// The `traceparent` the `Forward` request carried in its metadata.
    pub traceparent: Option<String>,
}

impl ForwardedEvent {
    /// `(container_id, id or exec_id, exit_status)` of a task event, by its type.
    pub fn ids(&self) -> (String, String, u32) {
        use protocol::task_events::*;
        let name = self.event.type_url.rsplit('/').next().unwrap_or_default();
        let v = &self.event.value;
        match name {
            "containerd.events.TaskCreate" => TaskCreate::parse_from_bytes(v)
                .map(|e| (e.container_id, String::new(), 0))
                .unwrap_or_default(),
            "containerd.events.TaskStart" => TaskStart::parse_from_bytes(v)
                .map(|e| (e.container_id, String::new(), 0))
                .unwrap_or_default(),
            "containerd.events.TaskExit" => TaskExit::parse_from_bytes(v)
                .map(|e| (e.container_id, e.id, e.exit_status))
                .unwrap_or_default(),
            "containerd.events.TaskDelete" => TaskDelete::parse_from_bytes(v)
                .map(|e| (e.container_id, e.id, e.exit_status))
                .unwrap_or_default(),
            "containerd.events.TaskExecAdded" => TaskExecAdded::parse_from_bytes(v)
                .map(|e| (e.container_id, e.exec_id, 0))
                .unwrap_or_default(),
            "containerd.events.TaskExecStarted" => TaskExecStarted::parse_from_bytes(v)
                .map(|e| (e.container_id, e.exec_id, 0))
                .unwrap_or_default(),
            _ => Default::default(),
        }
    }
}

/// containerd's side of `Events/Forward`: records every envelope.
#[derive(Default, Clone)]
pub struct EventSink {
    events: Arc<Mutex<Vec<ForwardedEvent>>>,
}

impl EventSink {
    pub fn events(&self) -> Vec<ForwardedEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `topic` of each event about `container`, in arrival order.
    pub fn topics(&self, container: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.ids().0 == container)
            .map(|e| e.topic)
            .collect()
    }
}

impl Events for EventSink {
    fn forward(&self, ctx: &ttrpc::TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        let traceparent = ctx
            .metadata
            .get("traceparent")
            .and_then(|v| v.first().cloned());
        let Envelope {
            namespace,
            topic,
            event,
            ..
        } = req.envelope.unwrap_or_default();
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ForwardedEvent {
                namespace,
                topic,
                event: event.unwrap_or_default(),
                traceparent,
            });
        Ok(Empty::new())
    }
}
