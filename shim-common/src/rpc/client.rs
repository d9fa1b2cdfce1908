//! A ttrpc client for unary calls, one at a time — all a shim asks of containerd
//! (forwarding events). No threads: the caller writes the request and reads the answer.

use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use ttrpc::proto::{Code, Codec, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE};
use ttrpc::{Request, Response};

use super::frame;
use crate::error::{Context, Error, Result};

pub struct Client {
    conn: Mutex<Conn>,
}

struct Conn {
    stream: UnixStream,
    next_id: u32,
}

impl Client {
    /// Connects to `address`: a socket path, optionally prefixed with `unix://`.
    pub fn connect(address: &str) -> Result<Client> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = UnixStream::connect(path).context(format!("connect to {path}"))?;
        Ok(Client {
            conn: Mutex::new(Conn { stream, next_id: 1 }),
        })
    }

    /// A client on `stream`, already connected to a ttrpc server (one end of a socketpair,
    /// a VM's port).
    pub fn from_stream(stream: UnixStream) -> Client {
        Client {
            conn: Mutex::new(Conn { stream, next_id: 1 }),
        }
    }

    /// Calls `/service/method` with `req`; returns the response payload.
    pub fn call(
        &self,
        service: &str,
        method: &str,
        req: &impl protobuf::Message,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let what = format!("/{service}/{method}");
        let request = Request {
            service: service.to_string(),
            method: method.to_string(),
            payload: req.write_to_bytes().context(format!("encode {what}"))?,
            timeout_nano: timeout.as_nanos() as i64,
            ..Default::default()
        };
        let payload = <Request as Codec>::encode(&request)
            .map_err(|e| Error::Runtime(format!("encode {what}: {e}")))?;
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        // Client-initiated streams have odd ids.
        let id = conn.next_id;
        conn.next_id = conn.next_id.wrapping_add(2);
        conn.stream
            .set_read_timeout(Some(timeout))
            .context("set ttrpc read timeout")?;
        frame::write(&conn.stream, id, MESSAGE_TYPE_REQUEST, &payload)
            .context(format!("send {what}"))?;
        loop {
            let (mh, body) = frame::read(&conn.stream).context(format!("read {what} reply"))?;
            if mh.type_ != MESSAGE_TYPE_RESPONSE || mh.stream_id != id {
                continue;
            }
            let res = <Response as Codec>::decode(&body)
                .map_err(|e| Error::Runtime(format!("decode {what} reply: {e}")))?;
            let status = res.status.as_ref();
            let code = status.map(|s| s.code()).unwrap_or(Code::OK);
            if code != Code::OK {
                let msg = status.map(|s| s.message.clone()).unwrap_or_default();
                return Err(Error::Remote {
                    code,
                    message: format!("{what}: {code:?}: {msg}"),
                });
            }
            return Ok(res.payload);
        }
    }
}
