//! The host's end of the channel to the guest agent: one multiplexed ttrpc connection
//! carrying the task calls (the guest's own task service), the agent's stdio calls, and
//! the guest's events.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message;
use protocol::agent::{HelloRequest, HelloResponse};
use protocol::events::Envelope;
use shim_common::peer_events::EVENTS_SERVICE;
use shim_common::rpc::Client;
use shim_common::{Error, Result};

/// How long a task call may take in the guest (a `runc create` under TCG takes ~0.3 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest agent, as the host calls it.
pub struct Guest {
    client: Client,
}

impl Guest {
    /// The agent at the other end of `stream` (the VM's virtio-serial chardev socket),
    /// once it answers `Hello` within `timeout`: the VM has booted and serves.
    pub fn connect(stream: OwnedFd, timeout: Duration) -> Result<(Arc<Guest>, HelloResponse)> {
        let guest = Guest {
            client: Client::new(stream)?,
        };
        let hello: HelloResponse = guest
            .client
            .call_as(
                protocol::AGENT_SERVICE,
                "Hello",
                &HelloRequest::new(),
                timeout,
            )
            .map_err(|e| match e {
                Error::DeadlineExceeded(_) => Error::DeadlineExceeded(format!(
                    "the VM's agent did not answer within {timeout:?}"
                )),
                e => e,
            })?;
        Ok((Arc::new(guest), hello))
    }

    /// A call of the guest's task service.
    pub fn task<M: Message>(&self, method: &str, req: &impl Message) -> Result<M> {
        self.client
            .call_as(protocol::TASK_SERVICE_V2, method, req, CALL_TIMEOUT)
            .map_err(guest_error)
    }

    /// A call of the agent's own service; `timeout` `Duration::MAX` waits as long as the
    /// connection lives (a pending `ReadStdio`).
    pub fn agent<M: Message>(
        &self,
        method: &str,
        req: &impl Message,
        timeout: Duration,
    ) -> Result<M> {
        self.client
            .call_as(protocol::AGENT_SERVICE, method, req, timeout)
            .map_err(guest_error)
    }

    /// The guest's next event, waiting as long as the connection lives.
    pub fn next_event(&self) -> Result<Envelope> {
        let empty = protobuf::well_known_types::empty::Empty::new();
        self.client
            .call_as(EVENTS_SERVICE, "Next", &empty, Duration::MAX)
            .map_err(guest_error)
    }
}

/// The guest task service's errors keep their code (a `NotFound` there is one here); a
/// lost connection says the VM is gone.
fn guest_error(e: Error) -> Error {
    match e {
        Error::Remote { code, message } => Error::Remote {
            code,
            message: format!("in the VM: {message}"),
        },
        Error::Unavailable(m) => Error::Unavailable(format!("the VM is gone: {m}")),
        e => e,
    }
}
