//! The task API client, under the service name the shim's answer selected.

use std::collections::HashMap;
use std::time::Duration;

use protobuf::Message;

/// The task API under the name the answer selected (`containerd.task.v2.Task` or `v3`):
/// the generated client hard-codes v2, so requests are built here.
pub struct TaskApi {
    client: ttrpc::Client,
    service: &'static str,
    namespace: String,
    /// Metadata sent with every call besides the namespace (a `traceparent`).
    metadata: Vec<(String, String)>,
}

/// How long a task API call may take before the runner calls it a failure.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl TaskApi {
    pub fn connect(address: &str, version: u32, namespace: &str) -> Result<TaskApi, String> {
        let service = if version >= 3 {
            protocol::TASK_SERVICE_V3
        } else {
            protocol::TASK_SERVICE_V2
        };
        let client =
            ttrpc::Client::connect(address).map_err(|e| format!("connect to {address}: {e}"))?;
        Ok(TaskApi {
            client,
            service,
            namespace: namespace.to_string(),
            metadata: Vec::new(),
        })
    }

    /// Sends `key: value` in the metadata of every later call, as containerd 2.x's client
    /// interceptor sends `traceparent`.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value.to_string()));
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    /// One unary call; the namespace travels in the metadata, as containerd sends it.
    pub fn call<Req: Message, Resp: Message>(
        &self,
        method: &str,
        req: &Req,
    ) -> ttrpc::Result<Resp> {
        self.call_on(self.service, method, req, Some(CALL_TIMEOUT))
    }

    /// A unary call of another service on the same connection (the sandbox API), with
    /// `timeout` (`None`: none, as containerd's `WaitSandbox`).
    pub fn call_on<Req: Message, Resp: Message>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> ttrpc::Result<Resp> {
        let payload = req
            .write_to_bytes()
            .map_err(|e| ttrpc::Error::Others(format!("encode {method}: {e}")))?;
        let mut creq = ttrpc::Request::new();
        creq.set_service(service.to_string());
        creq.set_method(method.to_string());
        creq.set_timeout_nano(timeout.map_or(0, |t| t.as_nanos() as i64));
        let mut md = HashMap::new();
        md.insert(
            "containerd-namespace-ttrpc".to_string(),
            vec![self.namespace.clone()],
        );
        for (k, v) in &self.metadata {
            md.insert(k.clone(), vec![v.clone()]);
        }
        creq.set_metadata(ttrpc::context::to_pb(md));
        creq.payload = payload;
        let res = self.client.request(creq)?;
        Resp::parse_from_bytes(&res.payload)
            .map_err(|e| ttrpc::Error::Others(format!("decode {method} answer: {e}")))
    }
}

/// How a failed call reads in a report: the status code and message.
pub fn describe(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}
