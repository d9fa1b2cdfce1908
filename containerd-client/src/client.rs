//! The connection: unary calls, and Content's Read and Write streams, with one retry after
//! containerd restarted.
//!
//! The client owns a current-thread tokio runtime that only runs inside a call: the shim
//! gains no thread, and dropping the client closes the connection and the runtime.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use protobuf::Message;
use protocol::{content, grpc, leases};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::codec::ProtoCodec;
use crate::error::{Error, Result};

/// containerd answers locally or not at all: fail fast rather than stall a task's creation.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per call; the longest is reading a large layer or writing a large artifact.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Per unary call (a container, an image, a lease, a blob's info): containerd answers these
/// locally in milliseconds. Connecting to a unix socket does not wait for the server, so
/// this is also what finds a peer that is not containerd's gRPC API at all: a daemon that
/// serves only ttrpc there reads HTTP/2's preface as the header of a 1.3 GB message and
/// never answers, and a create would otherwise wait [`CALL_TIMEOUT`] for it.
const UNARY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per `WriteContentRequest`: well under gRPC's default 4 MiB message limit.
const WRITE_CHUNK: usize = 1 << 20;

/// A connection to containerd in one namespace.
pub struct Client {
    // Declared before `rt`: the channel's background task lives on that runtime.
    channel: Channel,
    namespace: MetadataValue<Ascii>,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// Connects to containerd's socket `address` (a path, or `unix://` + path).
    pub fn connect(address: &str, namespace: &str) -> Result<Client> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        if path.is_empty() {
            return Err(Error::InvalidArgument(
                "containerd's gRPC address is empty".into(),
            ));
        }
        let namespace = metadata_value("namespace", namespace)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(Error::Runtime)?;
        let endpoint = Endpoint::from_shared(format!("unix://{path}"))
            .map_err(|e| Error::InvalidArgument(format!("containerd address {path:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = rt
            .block_on(endpoint.connect())
            .map_err(|e| Error::Connect {
                address: path.to_string(),
                reason: chain(&e),
            })?;
        Ok(Client {
            channel,
            namespace,
            rt,
        })
    }

    /// One unary call to method `path` (`protocol::grpc`'s constants); `lease` attaches a
    /// lease to it. The answer is containerd's status as it is: the caller knows what the
    /// call was about ([`Error::status`]).
    pub fn unary<Req, Resp>(
        &self,
        path: &'static str,
        req: Req,
        lease: Option<&str>,
    ) -> Result<Resp, Status>
    where
        Req: Message + Sync,
        Resp: Message + Sync,
    {
        self.retry(|| {
            let request = self.request(req.clone(), lease)?;
            let mut client = tonic::client::Grpc::new(self.channel.clone());
            let call = async move {
                ready(&mut client).await?;
                let resp = client
                    .unary(
                        request,
                        PathAndQuery::from_static(path),
                        ProtoCodec::default(),
                    )
                    .await?;
                Ok(resp.into_inner())
            };
            self.rt.block_on(async {
                tokio::time::timeout(UNARY_TIMEOUT, call)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "no answer to {path} in {UNARY_TIMEOUT:?}"
                        )))
                    })
            })
        })
    }

    /// Content/Read of a whole blob; `size` (from its descriptor) only sizes the buffer.
    pub fn read(&self, digest: &str, size: usize) -> Result<Vec<u8>, Status> {
        self.retry(|| self.read_once(digest, size))
    }

    fn read_once(&self, digest: &str, size: usize) -> Result<Vec<u8>, Status> {
        let req = content::ReadContentRequest {
            digest: digest.to_string(),
            ..Default::default()
        };
        let request = self.request(req, None)?;
        let mut client = tonic::client::Grpc::new(self.channel.clone());
        self.rt.block_on(async move {
            ready(&mut client).await?;
            let mut stream = client
                .server_streaming::<_, content::ReadContentResponse, _>(
                    request,
                    PathAndQuery::from_static(grpc::CONTENT_READ),
                    ProtoCodec::default(),
                )
                .await?
                .into_inner();
            let mut data = Vec::with_capacity(size);
            while let Some(chunk) = stream.message().await? {
                if usize::try_from(chunk.offset).ok() != Some(data.len()) {
                    return Err(Status::data_loss(format!(
                        "read {digest}: chunk at offset {} after {} bytes",
                        chunk.offset,
                        data.len()
                    )));
                }
                data.extend_from_slice(&chunk.data);
            }
            Ok(data)
        })
    }

    /// Content/Write of a whole blob under ingest `reference`, committed as `digest` with
    /// `labels`, inside `lease`. `AlreadyExists` means the store already has the blob.
    pub fn write(
        &self,
        reference: &str,
        data: &[u8],
        digest: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<(), Status> {
        let data = Bytes::copy_from_slice(data);
        self.retry(|| self.write_once(reference, data.clone(), digest, labels.clone(), lease))
    }

    fn write_once(
        &self,
        reference: &str,
        data: Bytes,
        digest: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<(), Status> {
        let messages = write_messages(reference, data, digest, labels);
        let request = self.request(tokio_stream::iter(messages), Some(lease))?;
        let mut client = tonic::client::Grpc::new(self.channel.clone());
        let committed = self.rt.block_on(async move {
            ready(&mut client).await?;
            let mut stream = client
                .streaming::<_, _, content::WriteContentResponse, _>(
                    request,
                    PathAndQuery::from_static(grpc::CONTENT_WRITE),
                    ProtoCodec::default(),
                )
                .await?
                .into_inner();
            let mut last = None;
            while let Some(resp) = stream.message().await? {
                last = Some(resp);
            }
            Ok::<_, Status>(last)
        })?;
        match committed {
            Some(resp) if resp.action.value() == content::WriteAction::COMMIT as i32 => {
                if resp.digest == digest {
                    Ok(())
                } else {
                    Err(Status::data_loss(format!(
                        "wrote {digest} but containerd committed {}",
                        resp.digest
                    )))
                }
            }
            _ => Err(Status::unknown(format!(
                "write {digest}: containerd ended the stream before the commit"
            ))),
        }
    }

    /// Leases/Create with a random id; returns the id.
    pub fn create_lease(&self, labels: HashMap<String, String>) -> Result<String, Status> {
        let req = leases::CreateRequest {
            labels,
            ..Default::default()
        };
        let resp: leases::CreateResponse = self.unary(grpc::LEASES_CREATE, req, None)?;
        resp.lease
            .into_option()
            .map(|l| l.id)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Status::unknown("containerd created a lease without an id"))
    }

    /// Leases/Delete; the garbage collector then reclaims whatever only the lease held.
    pub fn delete_lease(&self, id: &str) -> Result<(), Status> {
        let req = leases::DeleteRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.unary::<_, protobuf::well_known_types::empty::Empty>(grpc::LEASES_DELETE, req, None)
            .map(drop)
    }

    /// Runs `call` again once when the connection failed: the shim keeps its client for its
    /// lifetime, and after a containerd restart the first call finds the old connection
    /// closed (tonic reconnects on the next one).
    fn retry<T>(&self, call: impl Fn() -> Result<T, Status>) -> Result<T, Status> {
        match call() {
            Err(s) if is_transport(&s) => {
                log::debug!("containerd connection lost ({s}); reconnecting");
                call()
            }
            other => other,
        }
    }

    fn request<M>(&self, msg: M, lease: Option<&str>) -> Result<Request<M>, Status> {
        let mut request = Request::new(msg);
        let md = request.metadata_mut();
        md.insert(grpc::NAMESPACE_HEADER, self.namespace.clone());
        if let Some(lease) = lease {
            let value = MetadataValue::try_from(lease)
                .map_err(|_| Status::invalid_argument(format!("lease id {lease:?}")))?;
            md.insert(grpc::LEASE_HEADER, value);
        }
        Ok(request)
    }
}

/// The messages of one Write stream: WRITE chunks at their offsets (the first names the
/// ingest), then COMMIT at the final offset. containerd truncates the ingest when a WRITE or
/// COMMIT carries offset 0 over a non-empty ingest, so a stale ingest of the same ref
/// restarts cleanly, and the COMMIT must carry the real offset.
fn write_messages(
    reference: &str,
    data: Bytes,
    digest: &str,
    labels: HashMap<String, String>,
) -> impl Iterator<Item = content::WriteContentRequest> + Send + 'static {
    let total = data.len();
    let header = content::WriteContentRequest {
        ref_: reference.to_string(),
        total: total as i64,
        expected: digest.to_string(),
        ..Default::default()
    };
    let commit = content::WriteContentRequest {
        action: content::WriteAction::COMMIT.into(),
        offset: total as i64,
        labels,
        ..header.clone()
    };
    let chunks = (0..total).step_by(WRITE_CHUNK).map(move |start| {
        let end = (start + WRITE_CHUNK).min(total);
        content::WriteContentRequest {
            action: content::WriteAction::WRITE.into(),
            offset: start as i64,
            data: data.slice(start..end).to_vec(),
            ..header.clone()
        }
    });
    chunks.chain(std::iter::once(commit))
}

/// A failure of the connection rather than an answer from containerd.
fn is_transport(s: &Status) -> bool {
    s.code() == Code::Unavailable
        || std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

async fn ready(client: &mut tonic::client::Grpc<Channel>) -> Result<(), Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("containerd connection: {}", chain(&e))))
}

fn metadata_value(what: &str, value: &str) -> Result<MetadataValue<Ascii>> {
    MetadataValue::try_from(value).map_err(|_| {
        Error::InvalidArgument(format!(
            "{what} {value:?} is not a valid gRPC metadata value"
        ))
    })
}

/// An error and its sources on one line: tonic's transport errors say little at the top.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_stream_ends_with_commit_at_the_final_offset() {
        let data = Bytes::from(vec![7u8; WRITE_CHUNK + 3]);
        let msgs: Vec<_> = write_messages("r", data, "sha256:x", Default::default()).collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].offset, 0);
        assert_eq!(msgs[0].ref_, "r");
        assert_eq!(msgs[1].offset, WRITE_CHUNK as i64);
        assert_eq!(msgs[1].data.len(), 3);
        assert_eq!(msgs[2].action.value(), content::WriteAction::COMMIT as i32);
        assert_eq!(msgs[2].offset, (WRITE_CHUNK + 3) as i64);
        assert!(msgs[2].data.is_empty());
    }
}
